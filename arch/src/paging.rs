//! Reading a guest's x86-64 page tables out of its memory: which virtual ranges a page-table
//! root maps, present, with what access (4- and 5-level paging; 4 KiB, 2 MiB and 1 GiB pages).
//!
//! Used after a triple fault on AMD, where KVM has already reset the vCPU (its VMCB is
//! undefined after a shutdown intercept) and nothing of the faulting state survives: what the
//! guest's own tables say about the faulting address is what separates a fault they explain
//! (a wild jump, a corrupted entry) from one they do not (the CPU raised "not present" on a
//! page its tables map). Entry layout: Intel SDM Vol. 3A §4.5, tables 4-15 to 4-20.
//!
//! What it does not do: it reads the tables as they are *now*; it knows neither the TLB nor
//! what the tables held at the fault. Page-table pages outside guest RAM read as not present.
//! Everything is bounded by the range asked for, so hostile tables (loops, every entry
//! present) cost at most one read per entry in the range.

use std::ops::RangeInclusive;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Present.
const P: u64 = 1;
/// Writable.
const RW: u64 = 1 << 1;
/// Page size: the entry maps a 1 GiB (PDPTE) or 2 MiB (PDE) page.
const PS: u64 = 1 << 7;
/// Execute-disable (with EFER.NXE).
const XD: u64 = 1 << 63;
/// Bits 51:12: the next table's guest-physical address.
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// A virtual range the tables map, every page of it present with the same access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First byte (canonical).
    pub start: u64,
    /// Last byte (canonical, inclusive: a range may end at the top of the address space).
    pub last: u64,
    /// Writable at every level.
    pub writable: bool,
    /// No level sets execute-disable.
    pub executable: bool,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = if self.writable { 'w' } else { '-' };
        let x = if self.executable { 'x' } else { '-' };
        write!(f, "{:#x}-{:#x} r{w}{x}", self.start, self.last)
    }
}

/// The tables' present mappings inside `range` (canonical addresses, both in the same half),
/// in address order, adjacent ranges with the same access merged. `root` is CR3 (bits 11:0,
/// PCID or flags, are ignored); `five_level` is CR4.LA57.
pub fn mappings<M: GuestMemory>(
    mem: &M,
    root: u64,
    five_level: bool,
    range: RangeInclusive<u64>,
) -> Vec<Mapping> {
    let levels = if five_level { 5 } else { 4 };
    let width = 12 + 9 * levels;
    let mask = (1u64 << width) - 1;
    let walk = Walk {
        mem,
        width,
        first: range.start() & mask,
        last: range.end() & mask,
    };
    let mut out = Vec::new();
    if walk.first <= walk.last {
        walk.table(root & ADDRESS, levels, 0, true, true, &mut out);
    }
    out
}

/// Whether the root's last entry is present: the tables map something of the top 512 GiB
/// (256 TiB with 5 levels), where Linux keeps its image, modules and fixmap. One read; the
/// boot tables siovmm hands a 64-bit kernel map only the low identity range and fail it.
pub fn maps_top_entry<M: GuestMemory>(mem: &M, root: u64) -> bool {
    mem.read_obj::<u64>(GuestAddress((root & ADDRESS) + 511 * 8))
        .is_ok_and(|entry| entry & P != 0)
}

/// Where the tables map one virtual address, and with what access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address `va` maps to.
    pub gpa: u64,
    /// Writable at every level.
    pub writable: bool,
    /// No level sets execute-disable.
    pub executable: bool,
}

/// Translates `va` through the tables at `root` (CR3) as the CPU's walk would, without a TLB:
/// `None` when some level is not present or a table lies outside guest memory.
pub fn translate<M: GuestMemory>(mem: &M, root: u64, five_level: bool, va: u64) -> Option<Translation> {
    let levels: u32 = if five_level { 5 } else { 4 };
    let (mut table, mut writable, mut executable) = (root & ADDRESS, true, true);
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (va >> shift) & 511;
        let entry = mem.read_obj::<u64>(GuestAddress(table + index * 8)).ok()?;
        if entry & P == 0 {
            return None;
        }
        writable &= entry & RW != 0;
        executable &= entry & XD == 0;
        if level == 1 || (level <= 3 && entry & PS != 0) {
            // A large page's bit 12 is its PAT bit, not part of the frame.
            let offset = (1u64 << shift) - 1;
            return Some(Translation { gpa: (entry & ADDRESS & !offset) | (va & offset), writable, executable });
        }
        table = entry & ADDRESS;
    }
    None
}

struct Walk<'a, M> {
    mem: &'a M,
    /// Virtual address width (48 or 57).
    width: u32,
    /// The range, without its sign extension.
    first: u64,
    last: u64,
}

impl<M: GuestMemory> Walk<'_, M> {
    /// Walks the table at `table` of `level` (1 = page table), which maps from `base`
    /// (without sign extension) with the access the levels above allow.
    fn table(
        &self,
        table: u64,
        level: u32,
        base: u64,
        writable: bool,
        executable: bool,
        out: &mut Vec<Mapping>,
    ) {
        let shift = 12 + 9 * (level - 1);
        let span = 1u64 << shift;
        for index in 0..512u64 {
            let start = base + (index << shift);
            let last = start + (span - 1);
            if last < self.first || start > self.last {
                continue;
            }
            let Ok(entry) = self.mem.read_obj::<u64>(GuestAddress(table + index * 8)) else {
                continue;
            };
            if entry & P == 0 {
                continue;
            }
            let writable = writable && entry & RW != 0;
            let executable = executable && entry & XD == 0;
            if level == 1 || (level <= 3 && entry & PS != 0) {
                let m = Mapping {
                    start: self.canonical(start.max(self.first)),
                    last: self.canonical(last.min(self.last)),
                    writable,
                    executable,
                };
                match out.last_mut() {
                    Some(prev)
                        if prev.last.wrapping_add(1) == m.start
                            && (prev.writable, prev.executable) == (m.writable, m.executable) =>
                    {
                        prev.last = m.last
                    }
                    _ => out.push(m),
                }
            } else {
                self.table(entry & ADDRESS, level - 1, start, writable, executable, out);
            }
        }
    }

    /// `va` with bits above the width copied from its top bit.
    fn canonical(&self, va: u64) -> u64 {
        let unused = 64 - self.width;
        (((va << unused) as i64) >> unused) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const KERNEL_TEXT: u64 = 0xffff_ffff_8100_0000;

    /// 4 MiB of guest memory and a bump allocator of 4 KiB tables from 1 MiB.
    struct Tables {
        mem: GuestMemoryMmap,
        next: u64,
    }

    impl Tables {
        fn new() -> Self {
            Self {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
                next: 0x10_0000,
            }
        }
        fn table(&mut self) -> u64 {
            self.next += 0x1000;
            self.next - 0x1000
        }
        fn set(&self, table: u64, index: u64, entry: u64) {
            self.mem
                .write_obj(entry, GuestAddress(table + index * 8))
                .unwrap();
        }
        /// The root of 4-level tables mapping `va` (2 MiB aligned) with one 2 MiB page and the
        /// next 2 MiB with 4 KiB pages, the first of those read-only and execute-disabled.
        fn kernel_like(&mut self, va: u64) -> (u64, u64, u64) {
            let (pml4, pdpt, pd, pt) = (self.table(), self.table(), self.table(), self.table());
            let i = |level: u32| (va >> (12 + 9 * (level - 1))) & 511;
            self.set(pml4, i(4), pdpt | P | RW);
            self.set(pdpt, i(3), pd | P | RW);
            self.set(pd, i(2), 0x20_0000 | P | PS);
            self.set(pd, i(2) + 1, pt | P | RW);
            self.set(pt, 0, P | XD);
            for e in 1..512 {
                self.set(pt, e, (e << 12) | P | RW);
            }
            (pml4, pd, pt)
        }
    }

    fn all(tables: &Tables, root: u64) -> Vec<Mapping> {
        mappings(&tables.mem, root, false, 0xffff_8000_0000_0000..=u64::MAX)
    }

    #[test]
    fn the_top_entry_is_seen_only_when_present() {
        let mut t = Tables::new();
        let (root, _, _) = t.kernel_like(KERNEL_TEXT);
        assert!(maps_top_entry(&t.mem, root));
        // CR3's low bits (PCID, PWT/PCD) are not part of the address.
        assert!(maps_top_entry(&t.mem, root | 0xfff));
        let low = t.table();
        t.set(low, 0, 0x20_0000 | P | RW);
        assert!(!maps_top_entry(&t.mem, low), "an identity-only root maps nothing up there");
        // A root outside guest memory reads as not present.
        assert!(!maps_top_entry(&t.mem, 1 << 40));
    }

    #[test]
    fn large_and_small_pages_with_their_access() {
        let mut t = Tables::new();
        let (root, _, _) = t.kernel_like(KERNEL_TEXT);
        let m = all(&t, root);
        let two_mib = 2 << 20;
        assert_eq!(
            m,
            [
                Mapping {
                    start: KERNEL_TEXT,
                    last: KERNEL_TEXT + two_mib - 1,
                    writable: false,
                    executable: true
                },
                Mapping {
                    start: KERNEL_TEXT + two_mib,
                    last: KERNEL_TEXT + two_mib + 0xfff,
                    writable: false,
                    executable: false
                },
                Mapping {
                    start: KERNEL_TEXT + two_mib + 0x1000,
                    last: KERNEL_TEXT + 2 * two_mib - 1,
                    writable: true,
                    executable: true
                },
            ]
        );
        assert_eq!(
            m[0].to_string(),
            "0xffffffff81000000-0xffffffff811fffff r-x"
        );
    }

    #[test]
    fn a_cleared_entry_is_a_hole_and_flags_in_cr3_are_ignored() {
        let mut t = Tables::new();
        let (root, _, pt) = t.kernel_like(KERNEL_TEXT);
        t.set(pt, 7, 0);
        let m = all(&t, root | 0x18);
        let hole = KERNEL_TEXT + (2 << 20) + 7 * 0x1000;
        assert!(
            m.iter().all(|m| m.last < hole || m.start > hole + 0xfff),
            "{m:?}"
        );
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn the_range_bounds_the_answer() {
        let mut t = Tables::new();
        let (root, _, _) = t.kernel_like(KERNEL_TEXT);
        let m = mappings(
            &t.mem,
            root,
            false,
            KERNEL_TEXT + 0x1000..=KERNEL_TEXT + 0x1fff,
        );
        assert_eq!(
            m,
            [Mapping {
                start: KERNEL_TEXT + 0x1000,
                last: KERNEL_TEXT + 0x1fff,
                writable: false,
                executable: true
            }]
        );
        assert!(
            mappings(&t.mem, root, false, 0..=0x7fff_ffff_ffff).is_empty(),
            "nothing in the lower half"
        );
    }

    #[test]
    fn hostile_tables_end() {
        // Every PML4 entry points back at the PML4 and every table entry is present: the walk
        // still ends (four levels, bounded by the range), and tables outside RAM are holes.
        let t = Tables::new();
        let root = 0x10_0000;
        for e in 0..512 {
            t.set(root, e, root | P | RW);
        }
        let m = mappings(
            &t.mem,
            root,
            false,
            KERNEL_TEXT..=KERNEL_TEXT + (4 << 20) - 1,
        );
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(
            (m[0].start, m[0].last),
            (KERNEL_TEXT, KERNEL_TEXT + (4 << 20) - 1)
        );
        t.set(root, 511, 0xffff_f000 | P);
        assert!(
            mappings(&t.mem, root, false, KERNEL_TEXT..=u64::MAX).is_empty(),
            "a table past RAM maps nothing"
        );
    }

    #[test]
    fn translate_follows_small_and_large_pages() {
        let mut t = Tables::new();
        let (root, _, pt) = t.kernel_like(KERNEL_TEXT);
        let two_mib = 2 << 20;
        // The 2 MiB page maps to 0x200000.
        assert_eq!(
            translate(&t.mem, root, false, KERNEL_TEXT + 0x1234),
            Some(Translation { gpa: 0x20_1234, writable: false, executable: true })
        );
        // 4 KiB page 5 of the second 2 MiB maps to 0x5000; page 0 is execute-disabled.
        assert_eq!(
            translate(&t.mem, root | 0x18, false, KERNEL_TEXT + two_mib + 0x5008),
            Some(Translation { gpa: 0x5008, writable: true, executable: true })
        );
        assert_eq!(translate(&t.mem, root, false, KERNEL_TEXT + two_mib).map(|t| t.executable), Some(false));
        t.set(pt, 5, 0);
        assert_eq!(translate(&t.mem, root, false, KERNEL_TEXT + two_mib + 0x5008), None, "a cleared entry");
        assert_eq!(translate(&t.mem, root, false, 0x40_0000), None, "nothing in the lower half");
        assert_eq!(translate(&t.mem, 1 << 40, false, KERNEL_TEXT), None, "a root past RAM");
    }

    #[test]
    fn five_level_tables_add_a_level() {
        let mut t = Tables::new();
        let (pml4, _, _) = t.kernel_like(KERNEL_TEXT);
        let pml5 = t.table();
        t.set(pml5, 511, pml4 | P | RW);
        let m = mappings(&t.mem, pml5, true, 0xff00_0000_0000_0000..=u64::MAX);
        // With 57-bit addresses the same tables map KERNEL_TEXT with bits 56:48 set.
        assert_eq!(m.first().map(|m| m.start), Some(KERNEL_TEXT));
        assert_eq!(m.len(), 3);
    }
}
