//! The ACPI tables a siovmm guest boots with.
//!
//! The platform is *hardware-reduced* ACPI (FADT flag HW_REDUCED_ACPI, ACPI 6.5 §4.1): no
//! PM1/GPE blocks, no SCI, no legacy PIC or PIT. Power-off and reset go through the FADT sleep
//! control/status and reset registers, which `devices::acpi_pm` implements. Interrupts are
//! the local APICs and one IOAPIC (MADT). PCI config space is reachable both through ports
//! 0xCF8/0xCFC and ECAM (MCFG), and the DSDT describes the host bridge, the ECAM reservation,
//! COM1, the CMOS RTC and the S5 sleep state.
//!
//! Table bytes come from the `acpi_tables` crate's builders and AML encoder; this crate only
//! decides what the tables say and where they live (`arch::layout::ACPI_START..ACPI_END`).

pub mod dmar;
mod dsdt;
mod hotplug;
mod madt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use arch::layout;

pub use dsdt::dsdt;
pub use madt::madt;

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"SIOVMM";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"SIOVMM  ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// The ACPI PM register block the FADT describes: the device's own layout.
pub use devices::acpi_pm::regs as pm;

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct Platform {
    /// vCPUs; APIC IDs are 0..vcpus.
    pub vcpus: u8,
    /// Guest RAM (places the 64-bit PCI window).
    pub mem_size: u64,
    /// PCI root buses and their windows (MCFG, the DSDT's host bridges).
    pub pci: arch::pci::PciTopology,
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables outgrew the area reserved for them.
    #[error("ACPI tables need {0} bytes, more than the {1} reserved")]
    TooLarge(usize, usize),
}

/// The tables, laid out for copying to guest memory at `base`.
#[derive(Clone, Debug)]
pub struct Tables {
    /// Guest-physical address of `bytes[0]`, where the RSDP is.
    pub base: u64,
    /// All tables, contiguous.
    pub bytes: Vec<u8>,
    /// (signature, offset into `bytes`, length) of every table, RSDP included.
    pub index: Vec<([u8; 4], usize, usize)>,
}

impl Tables {
    /// Guest-physical address of the RSDP.
    pub fn rsdp_addr(&self) -> u64 {
        self.base
    }

    /// One table's bytes by signature (`b"RSDP"` for the RSDP).
    pub fn table(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        self.index
            .iter()
            .find(|(sig, _, _)| sig == signature)
            .map(|&(_, off, len)| &self.bytes[off..off + len])
    }
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// FADT: hardware-reduced, DSDT at `dsdt_addr`, sleep/reset registers in our PM block.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |off: u16| {
        GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(layout::ACPI_PM_PORT + off))
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton) // no fixed power button
        .flag(Flags::SlpButton); // no fixed sleep button
    b.sleep_control_reg = port(pm::SLEEP_CONTROL);
    b.sleep_status_reg = port(pm::SLEEP_STATUS);
    b.reset_reg = port(pm::RESET);
    b.reset_value = pm::RESET_VALUE;
    // IA-PC boot architecture flags (§5.2.9.3): VGA not present (bit 2), ASPM controls off (bit 4).
    b.iapc_boot_arch = ((1u16 << 2) | (1 << 4)).into();
    // CMOS index of the century byte, where devices::cmos keeps it.
    b.century = devices::cmos::REG_CENTURY;
    aml_bytes(&b.finalize())
}

/// MCFG: ECAM for segment 0, buses 0..root_buses.
pub fn mcfg(pci: &arch::pci::PciTopology) -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.add_ecam(pci.ecam().0, 0, 0, pci.root_buses() - 1);
    aml_bytes(&t)
}

const ALIGN: usize = 16;

fn push_aligned(bytes: &mut Vec<u8>, table: &[u8]) -> usize {
    let off = bytes.len().div_ceil(ALIGN) * ALIGN;
    bytes.resize(off, 0);
    bytes.extend_from_slice(table);
    off
}

/// Builds every table for `platform`, plus `extra` finished tables (each listed in the XSDT).
pub fn build(platform: &Platform, extra: &[Vec<u8>]) -> Result<Tables, Error> {
    let base = layout::ACPI_START;
    let capacity = (layout::ACPI_END - layout::ACPI_START) as usize;
    // The RSDP goes first: a fixed 36 bytes, written last once the XSDT address is known.
    let rsdp_len = Rsdp::len();
    let mut bytes = vec![0u8; rsdp_len];
    let mut index = Vec::new();

    let dsdt = dsdt(platform);
    let dsdt_off = push_aligned(&mut bytes, &dsdt);
    index.push((*b"DSDT", dsdt_off, dsdt.len()));

    let mut listed: Vec<Vec<u8>> = vec![fadt(base + dsdt_off as u64), madt(platform), mcfg(&platform.pci)];
    listed.extend(extra.iter().cloned());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for t in &listed {
        let off = push_aligned(&mut bytes, t);
        xsdt.add_entry(base + off as u64);
        let sig = [t[0], t[1], t[2], t[3]];
        index.push((sig, off, t.len()));
    }
    let xsdt = aml_bytes(&xsdt);
    let xsdt_off = push_aligned(&mut bytes, &xsdt);
    index.push((*b"XSDT", xsdt_off, xsdt.len()));

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, base + xsdt_off as u64));
    bytes[..rsdp_len].copy_from_slice(&rsdp);
    index.insert(0, (*b"RSDP", 0, rsdp_len));

    if bytes.len() > capacity {
        return Err(Error::TooLarge(bytes.len(), capacity));
    }
    Ok(Tables { base, bytes, index })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(t: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(t[off..off + 4].try_into().unwrap())
    }

    fn u64_at(t: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(t[off..off + 8].try_into().unwrap())
    }

    fn platform() -> Platform {
        Platform { vcpus: 2, mem_size: 512 << 20, pci: Default::default() }
    }

    #[test]
    fn every_table_has_valid_length_and_checksum() {
        let t = build(&platform(), &[]).unwrap();
        for (sig, off, len) in &t.index {
            let bytes = &t.bytes[*off..*off + *len];
            if sig == b"RSDP" {
                assert!(checksum_ok(&bytes[..20]), "RSDP v1 checksum");
                assert!(checksum_ok(bytes), "RSDP extended checksum");
                assert_eq!(u32_at(bytes, 20) as usize, bytes.len());
            } else {
                assert_eq!(&bytes[..4], sig);
                assert_eq!(u32_at(bytes, 4) as usize, *len, "{} length", String::from_utf8_lossy(sig));
                assert!(checksum_ok(bytes), "{} checksum", String::from_utf8_lossy(sig));
                assert_eq!(&bytes[10..16], &OEM_ID);
            }
            assert_eq!(off % ALIGN, 0);
        }
    }

    #[test]
    fn rsdp_points_at_xsdt_which_lists_tables() {
        let t = build(&platform(), &[]).unwrap();
        let rsdp = t.table(b"RSDP").unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt_addr = u64_at(rsdp, 24);
        let xsdt = &t.bytes[(xsdt_addr - t.base) as usize..];
        assert_eq!(&xsdt[..4], b"XSDT");
        let n = (u32_at(xsdt, 4) as usize - 36) / 8;
        let sigs: Vec<[u8; 4]> = (0..n)
            .map(|i| {
                let a = (u64_at(xsdt, 36 + 8 * i) - t.base) as usize;
                t.bytes[a..a + 4].try_into().unwrap()
            })
            .collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC", *b"MCFG"]);
    }

    #[test]
    fn fadt_fields() {
        let t = build(&platform(), &[]).unwrap();
        let f = t.table(b"FACP").unwrap();
        assert_eq!(f.len(), 276, "ACPI 6.x FADT length");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // X_DSDT at 140 points at the DSDT.
        let dsdt_addr = u64_at(f, 140);
        assert_eq!(&t.bytes[(dsdt_addr - t.base) as usize..][..4], b"DSDT");
        // RESET_REG (GAS at 116): system I/O, our port + 2; value at 128.
        assert_eq!(f[116], 1);
        assert_eq!(u64_at(f, 120), u64::from(layout::ACPI_PM_PORT + pm::RESET));
        assert_eq!(f[128], pm::RESET_VALUE);
        // SLEEP_CONTROL_REG (GAS at 244) and SLEEP_STATUS_REG (GAS at 256).
        assert_eq!(u64_at(f, 248), u64::from(layout::ACPI_PM_PORT + pm::SLEEP_CONTROL));
        assert_eq!(u64_at(f, 260), u64::from(layout::ACPI_PM_PORT + pm::SLEEP_STATUS));
        assert_eq!(f[108], 0x32, "century");
    }

    #[test]
    fn mcfg_describes_the_root_buses_ecam() {
        let t = build(&platform(), &[]).unwrap();
        let m = t.table(b"MCFG").unwrap();
        assert_eq!(m.len(), 44 + 16);
        assert_eq!(u64_at(m, 44), layout::PCI_ECAM_START);
        assert_eq!((m[54], m[55]), (0, 0), "bus range 0..0");
        let pci = arch::pci::PciTopology::new(5).unwrap();
        let t = build(&Platform { pci, ..platform() }, &[]).unwrap();
        let m = t.table(b"MCFG").unwrap();
        assert_eq!((m[54], m[55]), (0, 4), "bus range 0..4");
    }

    #[test]
    fn extra_tables_are_listed() {
        let mut extra = vec![0u8; 48];
        extra[..4].copy_from_slice(b"TEST");
        extra[4..8].copy_from_slice(&48u32.to_le_bytes());
        let t = build(&platform(), &[extra]).unwrap();
        assert!(t.table(b"TEST").is_some());
    }

    #[test]
    fn max_vcpus_fit() {
        // With the most root buses too: each has 31 hotplug slots in the DSDT.
        let pci = arch::pci::PciTopology::new(u32::from(arch::pci::MAX_ROOT_BUSES)).unwrap();
        let t = build(&Platform { vcpus: 255, mem_size: 64 << 30, pci }, &[]).unwrap();
        eprintln!("tables for 255 vCPUs and 16 root buses: {} bytes", t.bytes.len());
        assert!(t.bytes.len() <= (layout::ACPI_END - layout::ACPI_START) as usize);
    }

    /// Disassembles every table with ACPICA's `iasl -d` (Debian package acpica-tools) and fails on
    /// any error or warning it reports.
    #[test]
    fn iasl_disassembles_every_table_cleanly() {
        let dir = std::env::temp_dir().join(format!("siovmm-iasl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let extra = [dmar::dmar(0xfed9_0000, 48), dmar::siov(dmar::SIOV_IMS_OPT_OUT)];
        // Three root buses: three host bridges in the DSDT, buses 0..2 in MCFG.
        let pci = arch::pci::PciTopology::new(3).unwrap();
        let t = build(&Platform { vcpus: 4, mem_size: 6 << 30, pci }, &extra).unwrap();
        for (sig, off, len) in &t.index {
            if sig == b"RSDP" {
                continue;
            }
            let name = String::from_utf8_lossy(sig).to_lowercase();
            let path = dir.join(format!("{name}.dat"));
            std::fs::write(&path, &t.bytes[*off..*off + *len]).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&path)
                .current_dir(&dir)
                .output()
                .expect("iasl (Debian package acpica-tools) must be installed: tests/setup.sh does it");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "iasl -d {name} failed:\n{text}");
            for bad in ["Error", "Warning", "Invalid"] {
                assert!(!text.contains(bad), "iasl -d {name} reported {bad:?}:\n{text}");
            }
            let mut dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            if sig == b"SIOV" {
                // Our own table: iasl checks its header and length, and cannot know its body.
                assert!(dsl.contains("Table Length : 0000002C"), "{dsl}");
                dsl = dsl.replace("**** Unknown ACPI table signature [SIOV]", "");
            }
            assert!(!dsl.contains("Unknown") && !dsl.contains("Error") && !dsl.contains("**** "), "{name}.dsl:\n{dsl}");
        }
        let dmar = std::fs::read_to_string(dir.join("dmar.dsl")).unwrap();
        for needle in ["[Hardware Unit Definition]", "Flags : 01", "00000000FED90000", "Host Address Width : 2F"] {
            assert!(dmar.contains(needle), "DMAR lacks {needle}:\n{dmar}");
        }
        let dsdt = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for needle in ["PNP0A08", "PNP0C02", "PNP0501", "PNP0B00", "_S5_", "0xE0000000", "Device (_SB.PCI1)", "Device (_SB.PCI2)"] {
            assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
        }
        // Every host bridge routes all 32 devices' 4 pins; bus 0's device 1 INTA# is GSI 17
        // and bus 2's device 31 INTD# wraps to GSI 20 (arch::pci::intx_gsi).
        assert_eq!(dsdt.matches("Name (_PRT, Package (0x80)").count(), 3, "{dsdt}");
        // PCI hotplug: 31 slots per bus, each ejectable; the GED's interrupt and _EVT; the
        // register block of three buses (devices::pci::hotplug).
        assert_eq!(dsdt.matches("Method (_EJ0, 1, NotSerialized)").count(), 3 * 31, "{dsdt}");
        assert_eq!(dsdt.matches("Method (PCNT, 0, NotSerialized)").count(), 3, "{dsdt}");
        assert_eq!(dsdt.matches("Notify (S1F, 0x03) // Eject Request").count(), 3, "{dsdt}");
        let flat = dsdt.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("Package (0x04) { 0x0001FFFF, Zero, Zero, 0x11 }"), "{dsdt}");
        assert!(flat.contains("Package (0x04) { 0x001FFFFF, 0x03, Zero, 0x14 }"), "{dsdt}");
        for needle in [
            "Device (S1F) { Name (_ADR, 0x001F0000) // _ADR: Address Name (_SUN, 0x5F) // _SUN: Slot User Number Method (_EJ0, 1, NotSerialized) // _EJx: Eject Device, x=0-9 { \\_SB.PHPR.E2 = 0x80000000 } }",
            "Local0 = \\_SB.PHPR.U1 Local1 = \\_SB.PHPR.D1 If (Local2 = (Local0 & 0x02)) { Notify (S01, One) // Device Check }",
            "OperationRegion (PCST, SystemMemory, 0xFEB02000, 0x30)",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005, } }) Method (_EVT, 1, Serialized) // _EVT: Event { \\_SB.PHPR.PSCN () }",
        ] {
            assert!(flat.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
