//! Whether an exception raised in user mode can enter a guest's kernel, read from the guest's
//! own structures in its memory: the IDT gate of the vector, the handler that gate names, and
//! the stack the CPU switches to (the TSS's RSP0, or the gate's IST slot). Layouts: Intel SDM
//! Vol. 3A §6.14.1 (64-bit IDT gate descriptors), §6.14.2 (the frame the CPU pushes), §8.7
//! (the 64-bit TSS: RSP0 at byte 4, IST1-IST7 from byte 0x24).
//!
//! Used after a triple fault on AMD, where KVM has reset the vCPU: a guest whose user-mode
//! page fault could not be delivered although its IDT, handler and stack are all mapped did
//! not fail on its own structures (docs/testing.md, "Guest triple faults"). Like
//! [`crate::paging`], it reads the structures as they are now, not what a TLB held.

use vm_memory::{Bytes, GuestMemory};

use crate::paging::translate;

/// Where a vCPU keeps what it needs to enter its kernel: IDTR and TR (the TSS's base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// IDTR base (a kernel virtual address).
    pub idt_base: u64,
    /// IDTR limit: the IDT's last byte, relative to its base.
    pub idt_limit: u16,
    /// The TSS's base (a kernel virtual address).
    pub tss_base: u64,
}

/// How the CPU would enter the kernel for one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPath {
    /// The gate's handler address, mapped executable.
    pub handler: u64,
    /// The stack pointer the CPU loads, the frame below it mapped writable.
    pub stack: u64,
    /// The gate's IST slot (0: RSP0).
    pub ist: u8,
}

impl std::fmt::Display for EntryPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ist {
            0 => write!(f, "enters at {:#x} on stack {:#x} (RSP0)", self.handler, self.stack),
            n => write!(f, "enters at {:#x} on stack {:#x} (IST{n})", self.handler, self.stack),
        }
    }
}

/// 64-bit interrupt gate and trap gate types.
const INTERRUPT_GATE: u8 = 0xe;
const TRAP_GATE: u8 = 0xf;
/// The TSS's RSP0 and IST1 offsets.
const TSS_RSP0: u64 = 4;
const TSS_IST1: u64 = 0x24;
/// What the CPU pushes for an exception with an error code: SS, RSP, RFLAGS, CS, RIP, error code.
const FRAME: u64 = 6 * 8;

/// Reads `buf.len()` bytes at virtual `va` through the tables at `root`, page by page.
fn read_virtual<M: GuestMemory>(mem: &M, root: u64, five_level: bool, va: u64, buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        let at = va.wrapping_add(done as u64);
        let t = translate(mem, root, five_level, at).ok_or_else(|| format!("{at:#x} not mapped"))?;
        let in_page = (0x1000 - (at & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], vm_memory::GuestAddress(t.gpa))
            .map_err(|_| format!("{at:#x} maps outside guest memory"))?;
        done += n;
    }
    Ok(())
}

/// How an exception `vector` raised in user mode would enter the kernel, through the tables
/// at `root` (the vCPU's CR3; `five_level` is CR4.LA57), or what stops it, in words.
pub fn from_user<M: GuestMemory>(
    mem: &M,
    root: u64,
    five_level: bool,
    entry: &KernelEntry,
    vector: u8,
) -> Result<EntryPath, String> {
    let offset = u64::from(vector) * 16;
    if offset + 15 > u64::from(entry.idt_limit) {
        return Err(format!("vector {vector} lies beyond the IDT's limit {:#x}", entry.idt_limit));
    }
    let gate_at = entry.idt_base.wrapping_add(offset);
    let mut gate = [0u8; 16];
    read_virtual(mem, root, five_level, gate_at, &mut gate).map_err(|e| format!("IDT gate: {e}"))?;
    let attributes = gate[5];
    if attributes & 0x80 == 0 {
        return Err(format!("IDT gate at {gate_at:#x} not present"));
    }
    let kind = attributes & 0xf;
    if kind != INTERRUPT_GATE && kind != TRAP_GATE {
        return Err(format!("IDT gate at {gate_at:#x} has type {kind:#x}, not a 64-bit interrupt or trap gate"));
    }
    let word = |i: usize| u64::from(u16::from_le_bytes([gate[i], gate[i + 1]]));
    let high = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    let handler = word(0) | word(6) << 16 | high << 32;
    match translate(mem, root, five_level, handler) {
        None => return Err(format!("handler {handler:#x} not mapped")),
        Some(t) if !t.executable => return Err(format!("handler {handler:#x} not executable")),
        Some(_) => {}
    }
    let ist = gate[4] & 7;
    let slot = if ist == 0 { TSS_RSP0 } else { TSS_IST1 + 8 * u64::from(ist - 1) };
    let mut pointer = [0u8; 8];
    read_virtual(mem, root, five_level, entry.tss_base.wrapping_add(slot), &mut pointer).map_err(|e| format!("TSS: {e}"))?;
    let stack = u64::from_le_bytes(pointer);
    // The CPU aligns the new stack pointer down to 16 bytes before pushing the frame.
    let top = stack & !0xf;
    for at in [top.wrapping_sub(8), top.wrapping_sub(FRAME)] {
        match translate(mem, root, five_level, at) {
            Some(t) if t.writable => {}
            _ => return Err(format!("stack {stack:#x}: {at:#x} not mapped writable")),
        }
    }
    Ok(EntryPath { handler, stack, ist })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Kernel half at 0xffffffff80000000: guest-physical 0..2 MiB mapped as 4 KiB pages, page 1
    /// (the handler's) read-only and executable, the others writable and execute-disabled.
    const BASE: u64 = 0xffff_ffff_8000_0000;
    const IDT: u64 = BASE + 0x2000;
    const TSS: u64 = BASE + 0x3ff8; // RSP0 straddles a page, as nothing forbids
    const HANDLER: u64 = BASE + 0x1040;
    const STACK: u64 = BASE + 0x6000;

    struct Guest {
        mem: GuestMemoryMmap,
        root: u64,
        pt: u64,
    }

    fn guest() -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (root, pdpt, pd, pt) = (0x20_0000u64, 0x20_1000u64, 0x20_2000u64, 0x20_3000u64);
        let set = |table: u64, i: u64, e: u64| mem.write_obj(e, GuestAddress(table + i * 8)).unwrap();
        set(root, 511, pdpt | 3);
        set(pdpt, 510, pd | 3);
        set(pd, 0, pt | 3);
        for page in 0..512u64 {
            let entry = if page == 1 { (page << 12) | 1 } else { (page << 12) | 3 | 1 << 63 };
            set(pt, page, entry);
        }
        Guest { mem, root, pt }
    }

    fn gate(g: &Guest, vector: u8, handler: u64, attributes: u8, ist: u8) {
        let mut d = [0u8; 16];
        d[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        d[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        d[4] = ist;
        d[5] = attributes;
        d[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        d[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        g.mem.write_slice(&d, GuestAddress(IDT - BASE + u64::from(vector) * 16)).unwrap();
    }

    fn tss_slot(g: &Guest, offset: u64, value: u64) {
        g.mem.write_obj(value, GuestAddress(TSS - BASE + offset)).unwrap();
    }

    const ENTRY: KernelEntry = KernelEntry { idt_base: IDT, idt_limit: 256 * 16 - 1, tss_base: TSS };

    #[test]
    fn a_mapped_path_names_handler_and_stack() {
        let g = guest();
        gate(&g, 14, HANDLER, 0x8e, 0);
        tss_slot(&g, TSS_RSP0, STACK + 8);
        assert_eq!(
            from_user(&g.mem, g.root, false, &ENTRY, 14),
            Ok(EntryPath { handler: HANDLER, stack: STACK + 8, ist: 0 })
        );
        gate(&g, 8, HANDLER, 0x8e, 2);
        tss_slot(&g, TSS_IST1 + 8, STACK + 0x1000);
        let path = from_user(&g.mem, g.root, false, &ENTRY, 8).unwrap();
        assert_eq!(path.to_string(), format!("enters at {HANDLER:#x} on stack {:#x} (IST2)", STACK + 0x1000));
    }

    #[test]
    fn each_broken_link_is_named() {
        let g = guest();
        let err = |entry: &KernelEntry| from_user(&g.mem, g.root, false, entry, 14).unwrap_err();
        assert!(err(&ENTRY).contains("not present"), "an empty gate");
        gate(&g, 14, HANDLER, 0x85, 0);
        assert!(err(&ENTRY).contains("type 0x5"), "a task gate");
        gate(&g, 14, BASE + 0x3000, 0x8e, 0);
        assert!(err(&ENTRY).contains("not executable"), "a handler on an execute-disabled page");
        gate(&g, 14, 0x40_0000, 0x8f, 0);
        assert!(err(&ENTRY).contains("handler 0x400000 not mapped"));
        gate(&g, 14, HANDLER, 0x8e, 0);
        tss_slot(&g, TSS_RSP0, HANDLER + 0x800);
        assert!(err(&ENTRY).contains("not mapped writable"), "a stack on the read-only page");
        tss_slot(&g, TSS_RSP0, STACK);
        assert!(from_user(&g.mem, g.root, false, &ENTRY, 14).is_ok());
        let short = KernelEntry { idt_limit: 14 * 16 + 14, ..ENTRY };
        assert!(err(&short).contains("beyond the IDT's limit"));
        // The TSS's second page unmapped: RSP0 straddles it.
        g.mem.write_obj(0u64, GuestAddress(g.pt + 4 * 8)).unwrap();
        assert!(err(&ENTRY).starts_with("TSS: 0xffffffff80004000 not mapped"), "{}", err(&ENTRY));
        // Tables outside guest memory: nothing is mapped.
        assert!(from_user(&g.mem, 1 << 40, false, &ENTRY, 14).unwrap_err().starts_with("IDT gate: "));
    }
}
