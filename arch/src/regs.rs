//! Register state the boot vCPU enters the kernel with.
//!
//! Two entry protocols:
//! - **PVH** (ELF vmlinux with a XEN_ELFNOTE_PHYS32_ENTRY note): 32-bit protected mode, paging
//!   off, flat segments, %ebx = guest-physical address of `hvm_start_info`.
//! - **Linux 64-bit boot protocol** (bzImage, or ELF without the PVH note): long mode with an
//!   identity map of the first 1 GiB, flat 64-bit code segment, %rsi = zero page.
//!   (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL".)
//!
//! Application processors are never touched: KVM holds them in wait-for-SIPI until the guest
//! starts them through its local APIC (INIT/SIPI), like real hardware.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{BOOT_GDT_START, PDE_START, PDPTE_START, PML4_START};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors (index × 8).
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit entry, `start_info` in %ebx.
    Pvh {
        /// PVH entry point.
        entry: u64,
        /// Guest-physical address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit entry, zero page in %rsi.
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
        /// Guest-physical address of the zero page.
        zero_page: u64,
    },
}

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory too small for the boot GDT or page tables.
    #[error("guest memory too small for the boot structures at {0:#x}")]
    BootStructures(u64),
}

/// A GDT descriptor from its parts (SDM Vol. 3A §3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The `kvm_segment` a selector loads from `entry`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The boot GDT for `mode`: null, code, data, TSS.
pub fn boot_gdt(mode: &EntryMode) -> [u64; 4] {
    let code = match mode {
        // 32-bit code: G, D/B, P, S, type 0xB (execute/read, accessed).
        EntryMode::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
        // 64-bit code: G, L, P, S, type 0xB.
        EntryMode::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, P, S, type 0x3 (read/write, accessed)
        gdt_entry(0x008b, 0, 0x67),    // TSS: P, type 0xB (busy 32/64-bit TSS)
    ]
}

/// General-purpose registers at entry.
pub fn boot_regs(mode: &EntryMode) -> kvm_regs {
    match *mode {
        EntryMode::Pvh { entry, start_info } => kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: 0x2,
            ..Default::default()
        },
        EntryMode::Linux64 { entry, zero_page } => kvm_regs {
            rip: entry,
            rsi: zero_page,
            rflags: 0x2,
            // The boot protocol wants a usable stack; the zero page's own page serves.
            rsp: zero_page + 0x1000 - 0x10,
            rbp: zero_page + 0x1000 - 0x10,
            ..Default::default()
        },
    }
}

/// The x87/SSE state Linux expects from firmware (FCW 0x37f, MXCSR default).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Writes the GDT (and, for 64-bit entry, the identity page tables) into guest memory and sets
/// the segment and control registers in `sregs` accordingly.
pub fn setup_sregs<M: GuestMemory>(mem: &M, mode: &EntryMode, sregs: &mut kvm_sregs) -> Result<(), Error> {
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        let addr = BOOT_GDT_START + (i as u64) * 8;
        mem.write_obj(*entry, GuestAddress(addr)).map_err(|_| Error::BootStructures(addr))?;
    }
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;

    let code = segment_from_gdt(gdt[1], CODE_SEL);
    let data = segment_from_gdt(gdt[2], DATA_SEL);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], TSS_SEL);

    match mode {
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 { .. } => {
            write_identity_map(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the kernel's own page-table
/// setup, which replaces this map early.
fn write_identity_map<M: GuestMemory>(mem: &M) -> Result<(), Error> {
    let err = |a: u64| Error::BootStructures(a);
    // Present | writable.
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START)).map_err(|_| err(PML4_START))?;
    mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START)).map_err(|_| err(PDPTE_START))?;
    for i in 0..512u64 {
        // Present | writable | page size (2 MiB).
        let addr = PDE_START + i * 8;
        mem.write_obj((i << 21) | 0x83, GuestAddress(addr)).map_err(|_| err(addr))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entry_round_trips() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment_from_gdt(e, CODE_SEL);
        assert_eq!((s.type_, s.present, s.s, s.l, s.db, s.g), (0xb, 1, 1, 1, 0, 1));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
        let d = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), DATA_SEL);
        assert_eq!(d.base, 0x1234_5678);
        assert_eq!((d.type_, d.db, d.l), (3, 1, 0));
        let t = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), TSS_SEL);
        assert_eq!((t.limit, t.g, t.type_, t.s), (0x67, 0, 0xb, 0));
    }

    #[test]
    fn pvh_is_32bit_protected_mode_without_paging() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mode = EntryMode::Pvh { entry: 0x100_0000, start_info: 0x6000 };
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, &mode, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
        assert_eq!(sregs.efer, 0);
        let regs = boot_regs(&mode);
        assert_eq!((regs.rip, regs.rbx), (0x100_0000, 0x6000));
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, boot_gdt(&mode)[1]);
    }

    #[test]
    fn linux64_is_long_mode_with_identity_map() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mode = EntryMode::Linux64 { entry: 0x100_200, zero_page: 0x7000 };
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, &mode, &mut sregs).unwrap();
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!((sregs.cs.l, sregs.cs.db), (1, 0));
        let pde5: u64 = mem.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pde5, (5 << 21) | 0x83);
        assert_eq!(boot_regs(&mode).rsi, 0x7000);
    }

    #[test]
    fn tiny_memory_is_an_error_not_a_panic() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mode = EntryMode::Linux64 { entry: 0, zero_page: 0x7000 };
        assert!(setup_sregs(&mem, &mode, &mut kvm_sregs::default()).is_err());
    }
}
