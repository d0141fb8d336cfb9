//! A passed-through function's interrupt vectors (MSI-X or MSI): one eventfd per vector that
//! the device signals through `VFIO_DEVICE_SET_IRQS`, bound to a KVM route while the guest
//! has the vector unmasked, so a device interrupt reaches the guest without entering siovmm.
//!
//! Masking is emulated. vfio-pci has no per-vector MSI-X mask (linux drivers/vfio/pci/
//! vfio_pci_intrs.c: the host vector stays enabled), so a masked vector's eventfd is detached
//! from its route instead: the device's signals then accumulate in the eventfd's counter,
//! which is the vector's pending bit (read by the PBA, consumed on unmask, which delivers one
//! interrupt by signalling the eventfd once it is routed again). Nothing watches a masked
//! eventfd: the counter keeps the state until the guest looks or unmasks.

use std::sync::Arc;

use siovmm_interrupts::{FunctionId, MsiMessage, MsiRouter, VectorKey, VectorSource};
use vmm_sys_util::eventfd::EventFd;

use super::VfioBackend;

/// One vector's state.
struct Vector {
    fd: Arc<EventFd>,
    /// Routed to the guest (unmasked, with a message).
    routed: bool,
    /// Signalled while masked, and not yet delivered.
    pending: bool,
}

/// The vectors of one interrupt index (MSI-X or MSI) of one function.
pub(crate) struct Vectors {
    function: FunctionId,
    source: VectorSource,
    /// The VFIO interrupt index (`VFIO_PCI_MSIX_IRQ_INDEX` or `VFIO_PCI_MSI_IRQ_INDEX`).
    irq_index: u32,
    /// Empty while the index is disabled.
    vectors: Vec<Vector>,
}

impl Vectors {
    pub(crate) fn new(function: FunctionId, source: VectorSource, irq_index: u32) -> Self {
        Self { function, source, irq_index, vectors: Vec::new() }
    }

    fn key(&self, v: usize) -> VectorKey {
        VectorKey { function: self.function, source: self.source, index: v as u32 }
    }

    /// Whether the index is enabled on the device.
    pub(crate) fn enabled(&self) -> bool {
        !self.vectors.is_empty()
    }

    /// Enables `count` vectors on the device, each with its own eventfd, all masked.
    fn enable(&mut self, backend: &dyn VfioBackend, count: u32) -> std::io::Result<()> {
        let mut vectors = Vec::with_capacity(count as usize);
        for _ in 0..count {
            vectors.push(Vector { fd: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?), routed: false, pending: false });
        }
        let fds: Vec<&EventFd> = vectors.iter().map(|v| v.fd.as_ref()).collect();
        backend.set_irqs(self.irq_index, 0, &fds)?;
        self.vectors = vectors;
        Ok(())
    }

    /// Enables `count` vectors (`Some`) or disables the index (`None`), if the device is not
    /// so already.
    pub(crate) fn set_enabled(&mut self, backend: &dyn VfioBackend, router: &MsiRouter, count: Option<u32>) -> std::io::Result<()> {
        match count {
            Some(n) if !self.enabled() => self.enable(backend, n),
            None if self.enabled() => self.disable(backend, router),
            _ => Ok(()),
        }
    }

    /// Detaches every route (one routing-table commit) and disables the index on the device.
    fn disable(&mut self, backend: &dyn VfioBackend, router: &MsiRouter) -> std::io::Result<()> {
        let routed: Vec<VectorKey> = (0..self.vectors.len()).filter(|&v| self.vectors[v].routed).map(|v| self.key(v)).collect();
        let mut first_error = router.unbind_all(routed).err();
        self.vectors.clear();
        if let Err(e) = backend.disable_irqs(self.irq_index) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Each `(v, message, masked)`: vector `v` now carries `message`, masked or not (vectors
    /// that do not exist, or any while the index is disabled, are skipped). The routes change
    /// in one routing-table commit for the whole guest action; unmasking delivers a pending
    /// interrupt once.
    pub(crate) fn update_all(&mut self, router: &MsiRouter, changes: &[(usize, MsiMessage, bool)]) -> std::io::Result<()> {
        let changes: Vec<_> = changes.iter().copied().filter(|&(v, _, _)| v < self.vectors.len()).collect();
        let detach: Vec<usize> =
            changes.iter().filter(|&&(v, msg, masked)| (masked || msg.address == 0) && self.vectors[v].routed).map(|c| c.0).collect();
        let attach: Vec<(usize, MsiMessage)> =
            changes.iter().filter(|&&(_, msg, masked)| !masked && msg.address != 0).map(|&(v, msg, _)| (v, msg)).collect();
        router.unbind_all(detach.iter().map(|&v| self.key(v)))?;
        for &v in &detach {
            self.vectors[v].routed = false;
        }
        // Signals that arrived while detached, or a pending bit seen by the PBA earlier: taken
        // before the router has the eventfd (its injector would deliver each signal), given
        // back as one.
        let mut redeliver = Vec::new();
        for &(v, _) in &attach {
            let vector = &mut self.vectors[v];
            if !vector.routed {
                let arrived = vector.fd.read().is_ok_and(|n| n > 0);
                if std::mem::take(&mut vector.pending) || arrived {
                    redeliver.push(v);
                }
            }
        }
        if let Err(e) = router.bind_all(attach.iter().map(|&(v, msg)| (self.key(v), self.vectors[v].fd.clone(), msg))) {
            for v in redeliver {
                self.vectors[v].pending = true;
            }
            return Err(e);
        }
        for &(v, _) in &attach {
            self.vectors[v].routed = true;
        }
        for v in redeliver {
            self.vectors[v].fd.write(1)?;
        }
        Ok(())
    }

    /// Whether vector `v` has an interrupt the guest has not received (only a masked
    /// vector can).
    pub(crate) fn pending(&mut self, v: usize) -> bool {
        let Some(vector) = self.vectors.get_mut(v) else { return false };
        if !vector.routed && vector.fd.read().is_ok_and(|n| n > 0) {
            vector.pending = true;
        }
        vector.pending
    }

    /// Vector `v`'s eventfd (tests signal it as the device would).
    #[cfg(test)]
    pub(crate) fn eventfd(&self, v: usize) -> Option<Arc<EventFd>> {
        self.vectors.get(v).map(|v| v.fd.clone())
    }
}
