//! PCI hotplug of a running VM, as a stock guest understands it: ACPI PCI hotplug
//! (`devices::pci::hotplug`, the DSDT's slots and Generic Event Device in `siovmm_acpi`).
//!
//! A slot (a device number of a root bus) is what comes and goes: functions added at run
//! time are announced with a Device Check on their slot, and the guest's `acpiphp` scans it,
//! assigns BARs and binds drivers; a removal asks the guest to eject the slot (Eject Request),
//! and the guest unbinds its drivers, stops the functions and calls `_EJ0`.
//!
//! A guest may also eject a slot on its own (a user's `echo 0 > /sys/bus/pci/slots/N/power`):
//! its functions are then removed from the VM, as a card pulled from a slot is gone, by the
//! VM's `pci-eject` thread (`Vm::run`), and whoever added them sees them gone (`vm.info`).
//!
//! Whether a guest handles hotplug events is read from the guest itself: its ACPI subsystem
//! unmasks the event device's IOAPIC pin when it takes the interrupt (`drivers/acpi/evged.c`
//! requests it at probe); a guest that never did (no ACPI, another OS, still booting) would
//! never answer, so it is not asked.

use std::sync::Arc;
use std::time::Duration;

use devices::pci::hotplug::{HotplugRegisters, HotplugSlots};
use devices::pci::Bdf;
use devices::Bus;
use vmm_sys_util::eventfd::EventFd;

use crate::kvm_irq::KvmIrq;
use crate::Error;
use siovmm_interrupts::router::RouteBackend;

/// The VM's hotplug controller and the interrupt it raises.
#[derive(Debug)]
pub(crate) struct Hotplug {
    slots: Arc<HotplugSlots>,
    irq: Arc<KvmIrq>,
}

impl Hotplug {
    /// Puts the registers of `root_buses` buses on `mmio` and wires their interrupt (an irqfd
    /// on `arch::layout::PCI_HOTPLUG_GSI`, so raising it never enters a VMM thread).
    pub(crate) fn new(irq: Arc<KvmIrq>, root_buses: u8, mmio: &Bus) -> Result<Self, Error> {
        let event = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| Error::Io("eventfd (PCI hotplug)".into(), e))?;
        irq.irqfd(&event, arch::layout::PCI_HOTPLUG_GSI, true).map_err(|e| Error::Io("KVM_IRQFD (PCI hotplug)".into(), e))?;
        let slots = Arc::new(HotplugSlots::new(root_buses, event));
        let registers = Arc::new(std::sync::Mutex::new(HotplugRegisters(slots.clone())));
        let (base, len) = (arch::layout::PCI_HOTPLUG_START, HotplugRegisters::size(root_buses));
        mmio.insert(registers, base, len).map_err(|e| Error::Place(base, e))?;
        Ok(Self { slots, irq })
    }

    /// Whether the guest takes hotplug events now (its event device's pin is unmasked).
    pub(crate) fn guest_listens(&self) -> bool {
        match self.irq.ioapic_pin_masked(arch::layout::PCI_HOTPLUG_GSI) {
            Ok(masked) => !masked,
            Err(e) => {
                log::warn!("pci hotplug: reading the IOAPIC (KVM_GET_IRQCHIP): {e}; taking the guest as not listening");
                false
            }
        }
    }

    /// Tells the guest the slots of `functions` changed.
    pub(crate) fn announce(&self, functions: &[Bdf]) {
        let mut slots: Vec<(u8, u8)> = functions.iter().map(|b| (b.bus(), b.device())).collect();
        slots.sort_unstable();
        slots.dedup();
        for (bus, device) in slots {
            self.slots.announce(bus, device);
        }
    }

    /// The guest runs no more: removals in progress stop waiting for its eject.
    pub(crate) fn stop(&self) {
        self.slots.stop();
    }

    /// Waits until the guest ejects slots on its own (bus, device); `None` once it has stopped.
    pub(crate) fn wait_guest_ejects(&self) -> Option<Vec<(u8, u8)>> {
        self.slots.wait_guest_ejects()
    }

    /// Asks the guest to eject `bdf`'s slot and waits up to `timeout`; true when it did.
    pub(crate) fn eject(&self, bdf: Bdf, timeout: Duration) -> bool {
        self.slots.request_eject(bdf.bus(), bdf.device());
        self.slots.wait_ejected(bdf.bus(), bdf.device(), timeout)
    }
}
