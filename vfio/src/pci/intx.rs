//! A VFIO function's legacy INTx line, for guests and drivers that use neither MSI-X nor MSI
//! (Linux with `pci=nomsi`, old drivers, firmware).
//!
//! The path never enters the VMM: vfio-pci signals the *trigger* eventfd when the device
//! asserts INTx, and masks the line on the host (it is level-triggered and may be shared
//! there); KVM, through an irqfd with a resampler, asserts the IOAPIC input the DSDT's `_PRT`
//! names for the function (`arch::pci::intx_gsi`); the guest's EOI lowers it and signals the
//! *resample* eventfd, which vfio-pci takes as "unmask" (`VFIO_IRQ_SET_ACTION_UNMASK`) and
//! fires again if the device still asserts. Linux: drivers/vfio/pci/vfio_pci_intrs.c,
//! virt/kvm/eventfd.c (`KVM_IRQFD_FLAG_RESAMPLE`).
//!
//! vfio-pci allows one interrupt type at a time, so the line is enabled while MSI and MSI-X
//! are both off and disabled before either is enabled, as on real hardware, where enabling
//! MSI turns INTx off (PCI Local Bus 3.0 §6.8.1.3).

use std::sync::Arc;

use siovmm_interrupts::{FunctionId, MsiRouter, VectorKey};
use vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
use vmm_sys_util::eventfd::EventFd;

use super::VfioBackend;

/// The line and its two eventfds.
pub(super) struct Intx {
    /// Interrupt pin, 1 (INTA#) to 4 (INTD#), as the device reports it.
    pin: u8,
    /// The IOAPIC input it is wired to.
    gsi: u32,
    key: VectorKey,
    trigger: Arc<EventFd>,
    resample: EventFd,
    enabled: bool,
}

impl Intx {
    /// The line of `function` on `pin`, wired to `gsi`; not enabled yet.
    pub(super) fn new(function: FunctionId, pin: u8, gsi: u32) -> std::io::Result<Self> {
        Ok(Self {
            pin,
            gsi,
            key: VectorKey::intx(function),
            trigger: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            resample: EventFd::new(libc::EFD_NONBLOCK)?,
            enabled: false,
        })
    }

    /// The interrupt pin register's value.
    pub(super) fn pin(&self) -> u8 {
        self.pin
    }

    /// The IOAPIC input.
    pub(super) fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Whether the line is wired now.
    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Wires the line (KVM first, so no assertion is lost, then the device), or unwires it
    /// (the device first, so nothing fires into a line being taken down). A failure leaves it
    /// off on both sides.
    pub(super) fn set_enabled(&mut self, backend: &dyn VfioBackend, router: &MsiRouter, on: bool) -> std::io::Result<()> {
        if on == self.enabled {
            return Ok(());
        }
        if on {
            router.bind_intx(self.key, self.gsi, self.trigger.clone(), &self.resample)?;
            let device = backend
                .set_irqs(VFIO_PCI_INTX_IRQ_INDEX, 0, &[&self.trigger])
                .and_then(|()| backend.set_irq_unmask(VFIO_PCI_INTX_IRQ_INDEX, &self.resample));
            if let Err(e) = device {
                let _ = backend.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX);
                let _ = router.unbind(self.key);
                return Err(e);
            }
            self.enabled = true;
        } else {
            self.enabled = false;
            let device = backend.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX);
            router.unbind(self.key)?;
            device?;
        }
        Ok(())
    }
}
