//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT used to enter the kernel
//! 0x0000_6000  PVH hvm_start_info, module list and memory map
//! 0x0000_7000  Linux zero page (boot_params) for bzImage / 64-bit ELF entry
//! 0x0000_9000  identity page tables (PML4, PDPT, PD: first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x000E_0000  ACPI tables (RSDP first, so the legacy BIOS-area scan finds it too)
//! 0x0010_0000  start of high RAM (kernel, initramfs at the top of low RAM)
//! 0xC000_0000  32-bit PCI MMIO window (BARs), 512 MiB
//! 0xE000_0000  PCI ECAM, one MiB per root bus (up to 16)
//! 0xFEB0_0000  boot timer, hypercall page, PCI hotplug registers (a page each)
//! 0xFEC0_0000  IOAPIC
//! 0xFEE0_0000  local APICs
//! 4 GiB        RAM above the 32-bit hole, then the 64-bit PCI MMIO window
//! ```

/// GDT the boot vCPU starts with.
pub const BOOT_GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`; the PVH entry gets its address in %ebx.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Most PVH memory map entries we ever write.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 16;
/// Linux zero page; the 64-bit entry gets its address in %rsi.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Page-map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 × 2 MiB = the first 1 GiB) of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we accept, including the NUL (Linux x86 COMMAND_LINE_SIZE is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the ACPI table area.
pub const ACPI_START: u64 = 0xE0000;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x100000;
/// End of conventional memory; 640 KiB to 1 MiB is the legacy BIOS/VGA area.
pub const LOW_RAM_END: u64 = 0xA0000;
/// First byte of high RAM.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO hole; RAM beyond this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// 32-bit PCI BAR window.
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration access (ECAM) base.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
/// The ECAM window reserved for the most root buses (`pci::MAX_ROOT_BUSES` × 1 MiB); a VM's
/// MCFG announces the buses it has (`pci::PciTopology::ecam`).
pub const PCI_ECAM_SIZE: u64 = crate::pci::MAX_ROOT_BUSES as u64 * crate::pci::ECAM_BUS_SIZE;
/// IOAPIC register window.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// The virtual VT-d remapping unit's registers (where QEMU puts its unit too).
pub const VTD_START: u64 = 0xFED9_0000;
/// Local APIC register window.
pub const APIC_START: u64 = 0xFEE0_0000;
/// First address above the 32-bit space.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI BAR window, placed after the last RAM byte (1 GiB aligned).
pub const PCI_MMIO64_SIZE: u64 = 0x4_0000_0000;

/// PCI configuration mechanism #1 ports (0xCF8 address, 0xCFC..0xCFF data).
pub const PCI_CONFIG_IO_START: u16 = 0xCF8;
/// Number of ports of configuration mechanism #1.
pub const PCI_CONFIG_IO_SIZE: u16 = 8;
/// COM1.
pub const COM1_PORT: u16 = 0x3F8;
/// COM1's ISA IRQ (and IOAPIC GSI).
pub const COM1_IRQ: u32 = 4;
/// CMOS/RTC index and data ports.
pub const CMOS_PORT: u16 = 0x70;
/// i8042 command port; a write of 0xFE there is the legacy reset.
pub const I8042_CMD_PORT: u16 = 0x64;
/// Our ACPI power-management block (sleep control/status, reset), see `devices::acpi_pm`.
pub const ACPI_PM_PORT: u16 = 0x600;
/// The ports siovmm gives I/O BARs of passed-through devices, as firmware would (QEMU's
/// SeaBIOS starts at 0xC000 too): inside the range bus 0's host bridge claims (0x0D00-0xFFFF,
/// the DSDT), above every port siovmm's own devices use. Only root bus 0 has I/O space.
pub const PCI_IO_BAR_START: u16 = 0xC000;
/// Ports in that range.
pub const PCI_IO_BAR_SIZE: u16 = 0x4000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;
/// The ACPI PCI hotplug registers (`devices::pci::hotplug`), 16 bytes per root bus.
pub const PCI_HOTPLUG_START: u64 = 0xFEB0_2000;
/// The Generic Event Device's interrupt, through which PCI hotplug events reach the guest: an
/// ISA IRQ no other device uses (COM1 has 4), edge-triggered and active-high as ISA IRQs are
/// by default, so the MADT needs no override for it.
pub const PCI_HOTPLUG_GSI: u32 = 5;

// The fixed windows must not overlap; checked at compile time.
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_IO_BAR_START as u32 + PCI_IO_BAR_SIZE as u32 == 0x1_0000 && ACPI_PM_PORT < PCI_IO_BAR_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
const _: () = assert!(PCI_HOTPLUG_START + 0x1000 <= IOAPIC_START && PCI_HOTPLUG_GSI != COM1_IRQ);
const _: () = assert!(IOAPIC_START < VTD_START && VTD_START + 0x1000 <= APIC_START);
const _: () = assert!(ACPI_START >= LOW_RAM_END && ACPI_END <= HIMEM_START);
const _: () = assert!(PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= ZERO_PAGE_START);

/// Guest RAM regions for `mem_size` bytes of RAM: below the 32-bit hole first, the rest
/// from 4 GiB up.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (RAM_64BIT_START, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// End (exclusive) of RAM below the 32-bit hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// The 64-bit PCI window: after the last RAM byte, aligned to 1 GiB, never below 4 GiB.
pub fn pci_mmio64_window(mem_size: u64) -> (u64, u64) {
    let ram_end = ram_regions(mem_size)
        .last()
        .map(|(start, size)| start + size)
        .unwrap_or(0)
        .max(RAM_64BIT_START);
    const GIB: u64 = 1 << 30;
    let start = ram_end.div_ceil(GIB) * GIB;
    (start, PCI_MMIO64_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(low_ram_end(512 << 20), 512 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let regions = ram_regions(6 << 30);
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 3 << 30)]);
        assert_eq!(low_ram_end(6 << 30), 3 << 30);
        assert_eq!(pci_mmio64_window(6 << 30).0, 7 << 30);
    }

    #[test]
    fn mmio64_window_starts_at_4g_for_small_guests() {
        assert_eq!(pci_mmio64_window(512 << 20).0, RAM_64BIT_START);
    }
}
