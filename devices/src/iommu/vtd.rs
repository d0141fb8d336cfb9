//! A virtual Intel VT-d DMA-remapping unit (Intel VT-d spec rev 4.x, chapters 3, 9, 10;
//! register offsets as in Linux `include/linux/intel-iommu.h` and QEMU `intel_iommu_internal.h`).
//!
//! What it does: legacy-mode root and context tables, second-level translation with 3- or
//! 4-level tables (39/48-bit), pass-through contexts, register-based context-cache and IOTLB
//! invalidation, global command/status (root table pointer, translation enable), and primary
//! fault recording (one fault record). Every DMA of the devices behind it is translated on each
//! access by walking the guest's tables, so nothing is cached and invalidations complete at
//! once; that is what Caching Mode (CAP.CM) lets a guest expect anyway, and siovmm sets CM
//! when guests must not use IMS (docs/ims-policy.md).
//!
//! What it does not: queued invalidation, interrupt remapping, scalable mode / PASID,
//! superpages, device-TLBs, protected memory regions, the fault-event interrupt (faults are
//! recorded in the registers; the device reports them in its completion status).
//!
//! Everything the guest writes (registers, table entries) is untrusted: table walks read guest
//! memory through bounds-checked accessors and fail closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::lock;
use crate::BusDevice;

/// Register window size.
pub const REG_SIZE: u64 = 0x1000;

/// Register offsets.
pub mod reg {
    /// Version.
    pub const VER: u64 = 0x00;
    /// Capability.
    pub const CAP: u64 = 0x08;
    /// Extended capability.
    pub const ECAP: u64 = 0x10;
    /// Global command.
    pub const GCMD: u64 = 0x18;
    /// Global status.
    pub const GSTS: u64 = 0x1c;
    /// Root table address.
    pub const RTADDR: u64 = 0x20;
    /// Context command.
    pub const CCMD: u64 = 0x28;
    /// Fault status.
    pub const FSTS: u64 = 0x34;
    /// Fault event control.
    pub const FECTL: u64 = 0x38;
    /// Fault event data.
    pub const FEDATA: u64 = 0x3c;
    /// Fault event address.
    pub const FEADDR: u64 = 0x40;
    /// Fault event upper address.
    pub const FEUADDR: u64 = 0x44;
    /// Protected memory enable.
    pub const PMEN: u64 = 0x64;
    /// IOTLB invalidate address (ECAP.IRO × 16).
    pub const IVA: u64 = 0xf0;
    /// IOTLB invalidate.
    pub const IOTLB: u64 = 0xf8;
    /// The fault record (CAP.FRO × 16).
    pub const FRCD: u64 = 0x220;
}

const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GSTS_TES: u32 = 1 << 31;
const GSTS_RTPS: u32 = 1 << 30;
const CCMD_ICC: u64 = 1 << 63;
const IOTLB_IVT: u64 = 1 << 63;
const FSTS_PFO: u32 = 1 << 0;
const FSTS_PPF: u32 = 1 << 1;
const FECTL_IM: u32 = 1 << 31;
const FRCD_F: u64 = 1 << 63;
/// RTADDR bits 11:10: translation table mode; 00 = legacy.
const RTADDR_TTM: u64 = 3 << 10;

/// CAP.CM (Caching Mode), bit 7.
pub const CAP_CM: u64 = 1 << 7;

/// VT-d fault reasons (spec §7.1.3, table 26).
pub mod fault {
    /// Root entry not present.
    pub const ROOT_NOT_PRESENT: u8 = 0x01;
    /// Context entry not present.
    pub const CONTEXT_NOT_PRESENT: u8 = 0x02;
    /// Invalid context entry (bad TT or AW).
    pub const CONTEXT_INVALID: u8 = 0x03;
    /// Address beyond the guest address width.
    pub const ADDRESS_BEYOND_AW: u8 = 0x04;
    /// Write without write permission.
    pub const WRITE: u8 = 0x05;
    /// Read without read permission.
    pub const READ: u8 = 0x06;
    /// Table entry unreadable (outside guest memory).
    pub const TABLE_ACCESS: u8 = 0x07;
    /// Root table address invalid (e.g. scalable mode requested).
    pub const ROOT_INVALID: u8 = 0x08;
    /// Reserved bits set in a paging entry.
    pub const RESERVED: u8 = 0x0c;
}

/// A refused translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Fault reason.
    pub reason: u8,
    /// Faulting address.
    pub addr: u64,
}

#[derive(Debug, Default)]
struct Regs {
    gsts: u32,
    rtaddr: u64,
    root: u64,
    ccmd: u64,
    iva: u64,
    iotlb: u64,
    fsts: u32,
    fectl: u32,
    fedata: u32,
    feaddr: u32,
    feuaddr: u32,
    pmen: u32,
    frcd_lo: u64,
    frcd_hi: u64,
}

/// The unit.
#[derive(Debug)]
pub struct VtdUnit {
    cap: u64,
    ecap: u64,
    mem: GuestMemoryMmap,
    regs: Mutex<Regs>,
    /// Translations done with translation enabled (start-up trace, tests).
    translations: AtomicU64,
}

/// The unit's features.
#[derive(Clone, Copy, Debug)]
pub struct VtdConfig {
    /// Report Caching Mode.
    pub caching_mode: bool,
}

impl VtdUnit {
    /// A unit translating into `mem`.
    pub fn new(mem: GuestMemoryMmap, config: VtdConfig) -> Self {
        let cap = 2 // ND: 256 domains
            | if config.caching_mode { CAP_CM } else { 0 }
            | (0x6 << 8) // SAGAW: 39-bit (3-level) and 48-bit (4-level)
            | (47 << 16) // MGAW: 48 bits
            | ((reg::FRCD / 16) << 24); // FRO; NFR = 0: one fault record
        let ecap = 1 // C: page walks are coherent
            | (1 << 6) // PT: pass-through
            | ((reg::IVA / 16) << 8); // IRO
        Self {
            cap,
            ecap,
            mem,
            regs: Mutex::new(Regs { fectl: FECTL_IM, ..Regs::default() }),
            translations: AtomicU64::new(0),
        }
    }

    /// CAP as the guest reads it.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Page translations done while translation was enabled.
    pub fn translations(&self) -> u64 {
        self.translations.load(Ordering::Relaxed)
    }

    /// Whether the guest has enabled translation.
    pub fn translating(&self) -> bool {
        lock(&self.regs).gsts & GSTS_TES != 0
    }

    fn read_entry(&self, addr: u64, iova: u64) -> Result<u64, Fault> {
        self.mem.read_obj::<u64>(GuestAddress(addr)).map_err(|_| Fault { reason: fault::TABLE_ACCESS, addr: iova })
    }

    /// Translates a DMA to `iova` by source `sid` (bus/devfn); `Ok(iova)` when translation is off.
    /// A fault is recorded in the fault registers (first one wins until the guest clears it).
    pub fn translate(&self, sid: u16, iova: u64, write: bool) -> Result<u64, Fault> {
        let (tes, root) = {
            let r = lock(&self.regs);
            (r.gsts & GSTS_TES != 0, r.root)
        };
        if !tes {
            return Ok(iova);
        }
        self.translations.fetch_add(1, Ordering::Relaxed);
        let result = self.walk(root, sid, iova, write);
        if let Err(f) = result {
            self.record_fault(sid, f, write);
        }
        result
    }

    fn walk(&self, root: u64, sid: u16, iova: u64, write: bool) -> Result<u64, Fault> {
        let f = |reason| Fault { reason, addr: iova };
        if root & RTADDR_TTM != 0 {
            return Err(f(fault::ROOT_INVALID));
        }
        let root_table = root & !0xfff;
        let bus = u64::from(sid >> 8);
        let devfn = u64::from(sid & 0xff);
        let re = self.read_entry(root_table + bus * 16, iova)?;
        if re & 1 == 0 {
            return Err(f(fault::ROOT_NOT_PRESENT));
        }
        let ctx_table = re & 0x000f_ffff_ffff_f000;
        let ce_lo = self.read_entry(ctx_table + devfn * 16, iova)?;
        let ce_hi = self.read_entry(ctx_table + devfn * 16 + 8, iova)?;
        if ce_lo & 1 == 0 {
            return Err(f(fault::CONTEXT_NOT_PRESENT));
        }
        let tt = (ce_lo >> 2) & 3;
        match tt {
            2 => return Ok(iova), // pass-through (ECAP.PT)
            0 => {}
            _ => return Err(f(fault::CONTEXT_INVALID)),
        }
        let levels = match ce_hi & 7 {
            1 => 3,
            2 => 4,
            _ => return Err(f(fault::CONTEXT_INVALID)),
        };
        let width = 12 + 9 * levels;
        if iova >> width != 0 {
            return Err(f(fault::ADDRESS_BEYOND_AW));
        }
        let mut table = ce_lo & 0x000f_ffff_ffff_f000;
        // Access rights accumulate down the walk: a translation allows what every entry on its
        // path allows, as with the CPU's R/W bits (VT-d spec, second-level translation, §3.7;
        // QEMU's intel_iommu walk ANDs each level's R and W the same way).
        let (mut readable, mut writable) = (true, true);
        for level in (1..=levels).rev() {
            let index = (iova >> (12 + 9 * (level - 1))) & 0x1ff;
            let pte = self.read_entry(table + index * 8, iova)?;
            let (r, w) = (pte & 1 != 0, pte & 2 != 0);
            if !r && !w {
                return Err(f(if write { fault::WRITE } else { fault::READ }));
            }
            if pte & (1 << 7) != 0 {
                // Superpages are not advertised (CAP.SLLPS = 0): reserved here.
                return Err(f(fault::RESERVED));
            }
            readable &= r;
            writable &= w;
            table = pte & 0x000f_ffff_ffff_f000;
        }
        match (write, readable, writable) {
            (true, _, false) => Err(f(fault::WRITE)),
            (false, false, _) => Err(f(fault::READ)),
            _ => Ok(table | (iova & 0xfff)),
        }
    }

    fn record_fault(&self, sid: u16, f: Fault, write: bool) {
        let mut r = lock(&self.regs);
        if r.frcd_hi & FRCD_F != 0 {
            r.fsts |= FSTS_PFO; // overflow: the only record is in use
            return;
        }
        r.frcd_lo = f.addr & !0xfff;
        // T (bit 62 of the upper half): 1 = read, 0 = write.
        r.frcd_hi = FRCD_F | if write { 0 } else { 1 << 62 } | u64::from(f.reason) << 32 | u64::from(sid);
        r.fsts |= FSTS_PPF;
    }

    fn read_reg(&self, offset: u64) -> u64 {
        let r = lock(&self.regs);
        match offset {
            reg::VER => 0x10,
            reg::CAP => self.cap,
            reg::ECAP => self.ecap,
            reg::GSTS => u64::from(r.gsts),
            reg::RTADDR => r.rtaddr,
            reg::CCMD => r.ccmd,
            reg::FSTS => u64::from(r.fsts),
            reg::FECTL => u64::from(r.fectl),
            reg::FEDATA => u64::from(r.fedata),
            reg::FEADDR => u64::from(r.feaddr),
            reg::FEUADDR => u64::from(r.feuaddr),
            reg::PMEN => u64::from(r.pmen),
            reg::IVA => r.iva,
            reg::IOTLB => r.iotlb,
            reg::FRCD => r.frcd_lo,
            o if o == reg::FRCD + 8 => r.frcd_hi,
            _ => 0,
        }
    }

    fn write_reg(&self, offset: u64, value: u64, mask: u64) {
        let mut r = lock(&self.regs);
        let merge = |old: u64| (old & !mask) | (value & mask);
        match offset {
            reg::GCMD => {
                let cmd = value as u32;
                if cmd & GCMD_SRTP != 0 {
                    r.root = r.rtaddr;
                    r.gsts |= GSTS_RTPS;
                }
                if cmd & GCMD_TE != 0 {
                    r.gsts |= GSTS_TES;
                } else {
                    r.gsts &= !GSTS_TES;
                }
            }
            reg::RTADDR => r.rtaddr = merge(r.rtaddr),
            reg::CCMD => {
                let v = merge(r.ccmd);
                // Invalidation completes at once; CAIG (60:59) reports the granularity asked
                // for (CIRG, 62:61). Nothing is cached, so nothing else happens.
                r.ccmd = if v & CCMD_ICC != 0 { (v & !CCMD_ICC & !(3 << 59)) | ((v >> 61 & 3) << 59) } else { v };
            }
            reg::FSTS => {
                // PFO and the other error bits are write-1-to-clear; PPF follows the record.
                r.fsts &= !(value as u32 & 0x7d);
            }
            reg::FECTL => r.fectl = (value as u32) & FECTL_IM,
            reg::FEDATA => r.fedata = value as u32,
            reg::FEADDR => r.feaddr = value as u32 & !3,
            reg::FEUADDR => r.feuaddr = value as u32,
            reg::PMEN => r.pmen = value as u32 & (1 << 31),
            reg::IVA => r.iva = merge(r.iva),
            reg::IOTLB => {
                let v = merge(r.iotlb);
                // IAIG (58:57) reports IIRG (61:60).
                r.iotlb = if v & IOTLB_IVT != 0 { (v & !IOTLB_IVT & !(3 << 57)) | ((v >> 60 & 3) << 57) } else { v };
            }
            // Writing 1 to F clears the record.
            o if o == reg::FRCD + 8 && value & mask & FRCD_F != 0 => {
                r.frcd_hi = 0;
                r.frcd_lo = 0;
                r.fsts &= !FSTS_PPF;
            }
            _ => {}
        }
    }
}

/// The unit on the MMIO bus; DMA translation shares the same `Arc`.
impl BusDevice for std::sync::Arc<VtdUnit> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.read_at(offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_at(offset, data)
    }
}

impl VtdUnit {
    /// A guest read of 4 or 8 bytes (naturally aligned) at `offset`.
    pub fn read_at(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let v = if is_32bit(offset) {
            self.read_reg(offset) & u64::from(u32::MAX)
        } else {
            let base = offset & !7;
            self.read_reg(base) >> ((offset - base) * 8)
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    /// A guest write of 4 or 8 bytes (naturally aligned) at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) {
        let value = match data.len() {
            4 if offset.is_multiple_of(4) => u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
            8 if offset.is_multiple_of(8) => u64::from_le_bytes(data.try_into().unwrap_or([0; 8])),
            _ => return,
        };
        // 32-bit registers live at their own offsets; for 64-bit registers a 4-byte write
        // updates one half.
        if is_32bit(offset) {
            self.write_reg(offset, value, u64::from(u32::MAX));
            return;
        }
        let base = offset & !7;
        let shift = (offset - base) * 8;
        let mask = if data.len() == 8 { u64::MAX } else { u64::from(u32::MAX) << shift };
        self.write_reg(base, value << shift, mask);
    }
}

/// The 32-bit registers (the others are 64-bit, 8-byte aligned).
fn is_32bit(offset: u64) -> bool {
    matches!(
        offset,
        reg::VER | reg::GCMD | reg::GSTS | reg::FSTS | reg::FECTL | reg::FEDATA | reg::FEADDR | reg::FEUADDR | reg::PMEN
    )
}

#[cfg(test)]
mod tests;
