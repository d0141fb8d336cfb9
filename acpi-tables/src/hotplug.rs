//! ACPI PCI hotplug in the DSDT: a slot object per device number of every root bus, the
//! register block of `devices::pci::hotplug`, and the Generic Event Device whose interrupt
//! makes the guest read it.
//!
//! ```text
//! \_SB_.PCIb.Sdd_          slot dd of root bus b: _ADR dd << 16, _SUN 32 b + dd,
//!                          _EJ0 writes 1 << dd to Eb__ (the guest ejected the slot)
//! \_SB_.PCIb.PCNT          reads Ub__ and Db__ once each; Notify(Sdd_, 1) (Device Check)
//!                          for each bit of the first, Notify(Sdd_, 3) (Eject Request) of the second
//! \_SB_.PHPR               the registers (OperationRegion PCST: Ub__ = PCIU, Db__ = PCID,
//!                          Eb__ = PCEJ of bus b), PSCN calls every bus's PCNT
//! \_SB_.GED_               ACPI0013 on arch::layout::PCI_HOTPLUG_GSI; _EVT calls PSCN
//! ```
//!
//! Linux's `acpiphp` registers a hotplug slot for each child of a host bridge with `_ADR` and
//! `_EJ0`, rescans a slot on Device Check and ejects it on Eject Request
//! (`drivers/pci/hotplug/acpiphp_glue.c`); `drivers/acpi/evged.c` runs `_EVT` on the GED's
//! interrupt. Both are built into Debian's kernels (CONFIG_HOTPLUG_PCI_ACPI=y).

use acpi_tables::aml::{
    And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt,
    Local, Memory32Fixed, Method, MethodCall, Name, Notify, OpRegion, OpRegionSpace, Path, ResourceTemplate, Store,
};
use acpi_tables::{Aml, AmlSink};
use arch::layout;
use devices::pci::hotplug::BUS_STRIDE;

use crate::aml_bytes;

/// Device numbers with a slot object: 1..=31 (bus 0's device 0 is the host bridge, and the
/// allocator starts every bus at 1).
const SLOTS: std::ops::RangeInclusive<u8> = 1..=arch::pci::DEVICES_PER_BUS;

/// Notify values (ACPI 6.5 §5.6.6, Table 5.166).
const DEVICE_CHECK: u8 = 1;
const EJECT_REQUEST: u8 = 3;

/// AML bytes made elsewhere, as one more child of a device.
pub(crate) struct Raw(pub(crate) Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn field_name(prefix: char, bus: u8) -> String {
    format!("{prefix}{bus:X}__")[..4].to_string()
}

fn slot_name(device: u8) -> String {
    format!("S{device:02X}_")
}

/// The slot objects and the `PCNT` method of root bus `bus`, to go inside its host bridge.
pub(crate) fn bus_slots(bus: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    let eject_register = Path::new(&format!("\\_SB_.PHPR.{}", field_name('E', bus)));
    for device in SLOTS {
        let adr = u32::from(device) << 16;
        let sun = u32::from(bus) * 32 + u32::from(device);
        let mask = 1u32 << device;
        let store = Store::new(&eject_register, &mask);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&store]);
        let adr = Name::new("_ADR".into(), &adr);
        let sun = Name::new("_SUN".into(), &sun);
        bytes.extend(aml_bytes(&Device::new(slot_name(device).as_str().into(), vec![&adr, &sun, &ej0])));
    }
    let (up_register, down_register) = (
        Path::new(&format!("\\_SB_.PHPR.{}", field_name('U', bus))),
        Path::new(&format!("\\_SB_.PHPR.{}", field_name('D', bus))),
    );
    let (up, down) = (Store::new(&Local(0), &up_register), Store::new(&Local(1), &down_register));
    let mut checks = Vec::new();
    for device in SLOTS {
        for (bits, value) in [(0u8, DEVICE_CHECK), (1, EJECT_REQUEST)] {
            let mask = 1u32 << device;
            let read = Local(bits);
            let test = And::new(&Local(2), &read, &mask);
            let slot = Path::new(&slot_name(device));
            let notify = Notify::new(&slot, &value);
            checks.push(Raw(aml_bytes(&If::new(&test, vec![&notify]))));
        }
    }
    let mut body: Vec<&dyn Aml> = vec![&up, &down];
    body.extend(checks.iter().map(|c| c as &dyn Aml));
    bytes.extend(aml_bytes(&Method::new("PCNT".into(), 0, false, body)));
    bytes
}

/// `\_SB_.PHPR`: the register block, and `PSCN`, which runs every bus's `PCNT`.
pub(crate) fn registers(root_buses: u8) -> Vec<u8> {
    let base = layout::PCI_HOTPLUG_START as u32;
    let size = devices::pci::hotplug::HotplugRegisters::size(root_buses) as u32;
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A06"));
    let uid = Name::new("_UID".into(), &"PCI hotplug");
    let window = Memory32Fixed::new(true, base, size);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&window]));
    let region = OpRegion::new("PCST".into(), OpRegionSpace::SystemMemory, &base, &size);
    let mut fields = Vec::new();
    for bus in 0..root_buses {
        for prefix in ['U', 'D', 'E'] {
            let name: [u8; 4] = field_name(prefix, bus).as_bytes().try_into().expect("four characters");
            fields.push(FieldEntry::Named(name, 32));
        }
        fields.push(FieldEntry::Reserved((BUS_STRIDE as usize - 12) * 8));
    }
    let field = Field::new("PCST".into(), FieldAccessType::DWord, FieldLockRule::NoLock, FieldUpdateRule::WriteAsZeroes, fields);
    let calls: Vec<MethodCall> = (0..root_buses).map(|b| MethodCall::new(format!("\\_SB_.PCI{b:X}.PCNT").as_str().into(), vec![])).collect();
    let scan = Method::new("PSCN".into(), 0, true, calls.iter().map(|c| c as &dyn Aml).collect());
    aml_bytes(&Device::new("_SB_.PHPR".into(), vec![&hid, &uid, &crs, &region, &field, &scan]))
}

/// `\_SB_.GED_`: the Generic Event Device (ACPI 6.5 §5.6.9) whose interrupt runs `PSCN`.
pub(crate) fn event_device() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &0u8);
    // Consumer, edge-triggered, active-high, exclusive: an ISA IRQ's defaults.
    let irq = Interrupt::new(true, true, false, false, layout::PCI_HOTPLUG_GSI);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
    let scan = MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&scan]);
    aml_bytes(&Device::new("_SB_.GED_".into(), vec![&hid, &uid, &crs, &evt]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_four_characters_per_bus_and_slot() {
        assert_eq!(field_name('U', 0), "U0__");
        assert_eq!(field_name('E', 15), "EF__");
        assert_eq!(slot_name(31), "S1F_");
        assert_eq!(slot_name(1), "S01_");
    }
}
