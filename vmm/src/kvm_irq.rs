//! The KVM side of the interrupt plumbing (`siovmm_interrupts`): MSI routes, irqfds and
//! KVM_SIGNAL_MSI for the router, ioeventfds for doorbells.

use std::sync::Arc;

use siovmm_interrupts::router::{RouteBackend, IOAPIC_GSIS};
use siovmm_interrupts::{IoEvents, MsiMessage};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irqchip, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// Interrupts and doorbells of one KVM VM.
#[derive(Debug)]
pub struct KvmIrq(pub Arc<VmFd>);

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn io(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

impl KvmIrq {
    /// Whether the guest has pin `pin` of its IOAPIC masked (KVM_GET_IRQCHIP; the mask is bit
    /// 16 of the pin's redirection entry, 82093AA datasheet §3.2.4). A pin beyond the IOAPIC's
    /// counts as masked.
    pub(crate) fn ioapic_pin_masked(&self, pin: u32) -> std::io::Result<bool> {
        let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
        self.0.get_irqchip(&mut chip).map_err(io)?;
        // SAFETY: for chip_id KVM_IRQCHIP_IOAPIC, KVM filled the `ioapic` member, and every
        // bit pattern of a redirection entry is a valid u64.
        let entry = unsafe { chip.chip.ioapic.redirtbl.get(pin as usize).map(|e| e.bits) };
        Ok(entry.is_none_or(|bits| bits & (1 << 16) != 0))
    }

    /// Masks or unmasks IOAPIC pin `pin` as a guest would (tests: a guest that takes an
    /// interrupt, without a guest kernel).
    #[cfg(test)]
    pub(crate) fn set_ioapic_pin_masked(&self, pin: usize, masked: bool) -> std::io::Result<()> {
        let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
        self.0.get_irqchip(&mut chip).map_err(io)?;
        // SAFETY: as in `ioapic_pin_masked`; any u64 is a valid redirection entry.
        unsafe {
            let entry = &mut chip.chip.ioapic.redirtbl[pin];
            entry.bits = if masked { entry.bits | 1 << 16 } else { entry.bits & !(1 << 16) };
        }
        self.0.set_irqchip(&chip).map_err(io)
    }
}

impl RouteBackend for KvmIrq {
    fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()> {
        // KVM_SET_GSI_ROUTING replaces the whole table, so the default irqchip routes KVM set
        // up (kvm_setup_default_irq_routing: GSI n → IOAPIC pin n, and PIC pins for 0..15)
        // are restated first.
        let mut entries = Vec::with_capacity(40 + routes.len());
        for gsi in 0..IOAPIC_GSIS {
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        for &(gsi, msg) in routes {
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi.address_lo = msg.address as u32;
            e.u.msi.address_hi = (msg.address >> 32) as u32;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        self.0.set_gsi_routing(&table).map_err(io)
    }

    fn irqfd(&self, fd: &EventFd, gsi: u32, assign: bool) -> std::io::Result<()> {
        if assign {
            self.0.register_irqfd(fd, gsi).map_err(io)
        } else {
            self.0.unregister_irqfd(fd, gsi).map_err(io)
        }
    }

    fn intx_irqfd(&self, fd: &EventFd, resample: Option<&EventFd>, gsi: u32) -> std::io::Result<()> {
        match resample {
            Some(r) => self.0.register_irqfd_with_resample(fd, r, gsi).map_err(io),
            None => self.0.unregister_irqfd(fd, gsi).map_err(io),
        }
    }

    fn signal_msi(&self, msg: MsiMessage) -> std::io::Result<()> {
        let m = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.0.signal_msi(m).map(|_| ()).map_err(io)
    }
}

impl IoEvents for KvmIrq {
    fn ioeventfd(&self, fd: &EventFd, addr: u64, assign: bool) -> std::io::Result<()> {
        if assign {
            self.0.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(io)
        } else {
            self.0.unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(io)
        }
    }
}
