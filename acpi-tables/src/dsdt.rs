//! DSDT: a PCI host bridge per root bus (with its INTx routing and hotplug slots), the PCI
//! hotplug registers and event device (`hotplug`), the ECAM reservation, COM1 and the S5
//! sleep state.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, PackageBuilder,
    Path, ResourceTemplate, IO,
};
use acpi_tables::sdt::Sdt;
use arch::layout;

use crate::{aml_bytes, hotplug, pm, Platform, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// DSDT revision 2: integers are 64-bit.
const DSDT_REVISION: u8 = 2;

/// Root bus `bus`'s host bridge `\_SB_.PCIn` (PNP0A08, PCI Express), segment 0, decoding
/// bus `bus` alone, with its share of the BAR windows (`arch::pci::PciTopology`). Bus 0's
/// bridge also owns the configuration ports and the legacy I/O ranges.
fn pci_host_bridge(platform: &Platform, bus: u8) -> Vec<u8> {
    let pci = &platform.pci;
    let (mmio32_start, mmio32_size) = pci.mmio32_window(bus);
    let (mmio64_start, mmio64_size) = pci.mmio64_window(bus, platform.mem_size);
    let bus_range = AddressSpace::new_bus_number(u16::from(bus), u16::from(bus));
    let cfg_ports = IO::new(layout::PCI_CONFIG_IO_START, layout::PCI_CONFIG_IO_START, 1, layout::PCI_CONFIG_IO_SIZE as u8);
    let io_low = AddressSpace::new_io(0u16, layout::PCI_CONFIG_IO_START - 1, None);
    let io_high = AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_start as u32,
        (mmio32_start + mmio32_size - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + mmio64_size - 1,
        None,
    );
    let resources: Vec<&dyn acpi_tables::Aml> = if bus == 0 {
        vec![&bus_range, &cfg_ports, &io_low, &io_high, &mmio32, &mmio64]
    } else {
        vec![&bus_range, &mmio32, &mmio64]
    };
    let crs = ResourceTemplate::new(resources);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &0u8);
    let seg = Name::new("_SEG".into(), &0u8);
    let uid = Name::new("_UID".into(), &bus);
    let bbn = Name::new("_BBN".into(), &bus);
    let crs = Name::new("_CRS".into(), &crs);
    let prt = Name::new("_PRT".into(), &intx_routing(bus));
    let slots = hotplug::Raw(hotplug::bus_slots(bus));
    let path = format!("_SB_.PCI{bus:X}");
    aml_bytes(&Device::new(path.as_str().into(), vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt, &slots]))
}

/// Root bus `bus`'s `_PRT` (ACPI 6.5 §6.2.13): for every device and interrupt pin, the GSI
/// its INTx is wired to (`arch::pci::intx_gsi`). Each entry is `{address: device << 16 |
/// 0xFFFF (any function), pin: 0 = INTA#, source: 0, source index: GSI}`; a zero source means
/// a GSI, level-triggered, active-low and shareable.
fn intx_routing(bus: u8) -> PackageBuilder {
    let mut table = PackageBuilder::new();
    for device in 0..32u8 {
        for pin in 1..=4u8 {
            let Some(gsi) = arch::pci::intx_gsi(bus, device, pin) else { continue };
            let address = u32::from(device) << 16 | 0xffff;
            let (pin_index, source) = (pin - 1, 0u8);
            table.add_element(&Package::new(vec![&address, &pin_index, &source, &gsi]));
        }
    }
    table
}

/// A motherboard-resources device (PNP0C02) reserving the ECAM window, which Linux requires
/// before it trusts MCFG ("MMCONFIG ... reserved as ACPI motherboard resource").
fn ecam_reservation() -> Vec<u8> {
    let ecam = Memory32Fixed::new(false, layout::PCI_ECAM_START as u32, layout::PCI_ECAM_SIZE as u32);
    let crs = ResourceTemplate::new(vec![&ecam]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let uid = Name::new("_UID".into(), &1u8);
    let crs = Name::new("_CRS".into(), &crs);
    aml_bytes(&Device::new("_SB_.MRES".into(), vec![&hid, &uid, &crs]))
}

/// COM1 (PNP0501): 0x3F8, IRQ 4.
fn com1() -> Vec<u8> {
    let io = IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let irq = Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &1u8);
    let crs = Name::new("_CRS".into(), &crs);
    aml_bytes(&Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]))
}

/// The CMOS RTC (PNP0B00) at 0x70, without an interrupt: `devices::cmos` has no alarm or
/// periodic IRQ. Without this device Linux's legacy platform probe of rtc_cmos looks for IRQ 8,
/// which a hardware-reduced platform does not have, and fails.
fn rtc() -> Vec<u8> {
    let io = IO::new(layout::CMOS_PORT, layout::CMOS_PORT, 1, 2);
    let crs = ResourceTemplate::new(vec![&io]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0B00"));
    let crs = Name::new("_CRS".into(), &crs);
    aml_bytes(&Device::new("_SB_.RTC_".into(), vec![&hid, &crs]))
}

/// `\_S5_`: the SLP_TYP value `devices::acpi_pm` recognises as soft-off.
fn s5() -> Vec<u8> {
    let typ = pm::S5_SLEEP_TYPE;
    let pkg = Package::new(vec![&typ]);
    aml_bytes(&Name::new(Path::new("_S5_"), &pkg))
}

/// The complete DSDT.
pub fn dsdt(platform: &Platform) -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for bus in 0..platform.pci.root_buses() {
        t.append_slice(&pci_host_bridge(platform, bus));
    }
    let hotplug = [hotplug::registers(platform.pci.root_buses()), hotplug::event_device()];
    for body in hotplug.into_iter().chain([ecam_reservation(), com1(), rtc(), s5()]) {
        t.append_slice(&body);
    }
    t.as_slice().to_vec()
}
