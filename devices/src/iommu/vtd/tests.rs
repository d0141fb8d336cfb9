use super::*;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn w64(u: &VtdUnit, off: u64, v: u64) {
    u.write_at(off, &v.to_le_bytes());
}

fn w32(u: &VtdUnit, off: u64, v: u32) {
    u.write_at(off, &v.to_le_bytes());
}

fn r64(u: &VtdUnit, off: u64) -> u64 {
    let mut b = [0u8; 8];
    u.read_at(off, &mut b);
    u64::from_le_bytes(b)
}

fn r32(u: &VtdUnit, off: u64) -> u32 {
    let mut b = [0u8; 4];
    u.read_at(off, &mut b);
    u32::from_le_bytes(b)
}

const ROOT: u64 = 0x10_0000;
const CTX: u64 = 0x10_1000;
const L4: u64 = 0x10_2000;
const L3: u64 = 0x10_3000;
const L2: u64 = 0x10_4000;
const L1: u64 = 0x10_5000;
const SID: u16 = 0x0008; // 00:01.0

/// Builds tables mapping IOVA 0x1234_5000 → GPA 0x80_0000 (read+write) and
/// 0x1234_6000 → 0x80_1000 (read only), for SID 00:01.0, 4-level.
fn setup(u: &VtdUnit, m: &GuestMemoryMmap) {
    m.write_obj(CTX | 1, GuestAddress(ROOT)).unwrap(); // bus 0
    m.write_obj(L4 | 1, GuestAddress(CTX + 8 * 16)).unwrap(); // devfn 8, TT=0
    m.write_obj(2u64 | 5 << 8, GuestAddress(CTX + 8 * 16 + 8)).unwrap(); // AW=2 (48-bit), DID 5
    let iova = 0x1234_5000u64;
    let idx = |level: u32| (iova >> (12 + 9 * (level - 1))) & 0x1ff;
    m.write_obj(L3 | 3, GuestAddress(L4 + idx(4) * 8)).unwrap();
    m.write_obj(L2 | 3, GuestAddress(L3 + idx(3) * 8)).unwrap();
    m.write_obj(L1 | 3, GuestAddress(L2 + idx(2) * 8)).unwrap();
    m.write_obj(0x80_0000u64 | 3, GuestAddress(L1 + idx(1) * 8)).unwrap();
    m.write_obj(0x80_1000u64 | 1, GuestAddress(L1 + (idx(1) + 1) * 8)).unwrap();
    w64(u, reg::RTADDR, ROOT);
    w32(u, reg::GCMD, GCMD_SRTP);
    assert_ne!(r32(u, reg::GSTS) & GSTS_RTPS, 0);
    w32(u, reg::GCMD, GCMD_TE);
    assert_ne!(r32(u, reg::GSTS) & GSTS_TES, 0);
}

#[test]
fn identification_registers() {
    let u = VtdUnit::new(mem(), VtdConfig { caching_mode: true });
    assert_eq!(r32(&u, reg::VER), 0x10);
    let cap = r64(&u, reg::CAP);
    assert_ne!(cap & CAP_CM, 0);
    assert_eq!((cap >> 16) & 0x3f, 47, "MGAW");
    assert_eq!((cap >> 8) & 0x1f, 0x6, "SAGAW 39+48");
    assert_eq!(((cap >> 24) & 0x3ff) * 16, reg::FRCD, "FRO");
    let ecap = r64(&u, reg::ECAP);
    assert_eq!(((ecap >> 8) & 0x3ff) * 16, reg::IVA, "IRO");
    assert_eq!(ecap & (1 << 3), 0, "no interrupt remapping");
    assert_eq!(ecap & (1 << 1), 0, "no queued invalidation");
    assert_eq!(r64(&VtdUnit::new(mem(), VtdConfig { caching_mode: false }), reg::CAP) & CAP_CM, 0);
    // Halves of a 64-bit register.
    assert_eq!(u64::from(r32(&u, reg::CAP)) | u64::from(r32(&u, reg::CAP + 4)) << 32, cap);
    assert_eq!(r32(&u, reg::FECTL), FECTL_IM, "fault events masked at reset");
}

#[test]
fn translation_off_is_identity_then_walks() {
    let m = mem();
    let u = VtdUnit::new(m.clone(), VtdConfig { caching_mode: true });
    assert_eq!(u.translate(SID, 0xdead_b000, false), Ok(0xdead_b000));
    setup(&u, &m);
    assert_eq!(u.translate(SID, 0x1234_5678, true), Ok(0x80_0678));
    assert_eq!(u.translate(SID, 0x1234_6010, false), Ok(0x80_1010));
    assert_eq!(u.translate(SID, 0x1234_6010, true), Err(Fault { reason: fault::WRITE, addr: 0x1234_6010 }));
    // Turning translation off again.
    w32(&u, reg::GCMD, 0);
    assert_eq!(r32(&u, reg::GSTS) & GSTS_TES, 0);
    assert_eq!(u.translate(SID, 0x1234_6010, true), Ok(0x1234_6010));
}

#[test]
fn faults_are_recorded_once_and_cleared() {
    let m = mem();
    let u = VtdUnit::new(m.clone(), VtdConfig { caching_mode: true });
    setup(&u, &m);
    // Unmapped IOVA.
    assert_eq!(u.translate(SID, 0x5000_0000, false).unwrap_err().reason, fault::READ);
    assert_ne!(r32(&u, reg::FSTS) & FSTS_PPF, 0);
    let hi = r64(&u, reg::FRCD + 8);
    assert_ne!(hi & FRCD_F, 0);
    assert_eq!((hi >> 32) & 0xff, u64::from(fault::READ));
    assert_eq!(hi & 0xffff, u64::from(SID));
    assert_eq!(r64(&u, reg::FRCD), 0x5000_0000);
    // A second fault overflows.
    assert_eq!(u.translate(0x0010, 0, false).unwrap_err().reason, fault::CONTEXT_NOT_PRESENT);
    assert_ne!(r32(&u, reg::FSTS) & FSTS_PFO, 0);
    // Clear: write 1 to F (upper dword of the record's high half), then PFO.
    w32(&u, reg::FRCD + 12, (FRCD_F >> 32) as u32);
    w32(&u, reg::FSTS, FSTS_PFO);
    assert_eq!(r32(&u, reg::FSTS), 0);
}

#[test]
fn hostile_tables_fail_closed() {
    let m = mem();
    let u = VtdUnit::new(m.clone(), VtdConfig { caching_mode: true });
    setup(&u, &m);
    // Unknown bus: root entry not present.
    assert_eq!(u.translate(0x0500, 0x1234_5000, false).unwrap_err().reason, fault::ROOT_NOT_PRESENT);
    // Beyond the 48-bit width.
    assert_eq!(u.translate(SID, 1 << 48, false).unwrap_err().reason, fault::ADDRESS_BEYOND_AW);
    // An intermediate table outside guest memory: the walk cannot read it and fails closed.
    // (A leaf pointing outside RAM translates; the DMA then fails its own range check.)
    let l3_index = (0x4000_0000u64 >> 30) & 0x1ff;
    m.write_obj(0xfff0_0000_0000u64 | 3, GuestAddress(L3 + l3_index * 8)).unwrap();
    assert_eq!(u.translate(SID, 0x4000_0000, false).unwrap_err().reason, fault::TABLE_ACCESS);
    // Superpage bit: not supported.
    m.write_obj(L1 | 3 | 1 << 7, GuestAddress(L2 + ((0x1234_5000u64 >> 21) & 0x1ff) * 8)).unwrap();
    assert_eq!(u.translate(SID, 0x1234_5000, false).unwrap_err().reason, fault::RESERVED);
    // Scalable-mode root table requested.
    w64(&u, reg::RTADDR, ROOT | 1 << 10);
    w32(&u, reg::GCMD, GCMD_SRTP | GCMD_TE);
    assert_eq!(u.translate(SID, 0, false).unwrap_err().reason, fault::ROOT_INVALID);
    // Odd-sized and misaligned register accesses are ignored.
    u.write_at(reg::RTADDR + 1, &[1, 2, 3, 4]);
    u.write_at(reg::RTADDR, &[1, 2]);
    let mut b = [0xffu8; 2];
    u.read_at(reg::CAP, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn invalidations_complete_at_once() {
    let u = VtdUnit::new(mem(), VtdConfig { caching_mode: true });
    // Global context invalidation: CIRG = 01 (61), ICC.
    w64(&u, reg::CCMD, CCMD_ICC | 1 << 61);
    let ccmd = r64(&u, reg::CCMD);
    assert_eq!(ccmd & CCMD_ICC, 0);
    assert_eq!((ccmd >> 59) & 3, 1, "CAIG reports global");
    // Domain-selective IOTLB invalidation: IIRG = 10 (60), IVT.
    w64(&u, reg::IOTLB, IOTLB_IVT | 2 << 60);
    let iotlb = r64(&u, reg::IOTLB);
    assert_eq!(iotlb & IOTLB_IVT, 0);
    assert_eq!((iotlb >> 57) & 3, 2);
    // Linux writes the IOTLB register's upper half alone as well.
    w32(&u, reg::IOTLB + 4, ((IOTLB_IVT | 1 << 60) >> 32) as u32);
    assert_eq!(r64(&u, reg::IOTLB) & IOTLB_IVT, 0);
}

#[test]
fn permissions_are_cumulative_across_levels() {
    // The access rights of a translation are those every entry walked allows, not the leaf's
    // alone (VT-d spec, second-level translation, §3.7).
    let m = mem();
    let u = VtdUnit::new(m.clone(), VtdConfig { caching_mode: true });
    setup(&u, &m);
    let iova = 0x1234_5000u64;
    let l4_index = (iova >> 39) & 0x1ff;
    // The top-level entry made read-only: the read+write leaf below it can no longer be written.
    m.write_obj(L3 | 1, GuestAddress(L4 + l4_index * 8)).unwrap();
    assert_eq!(u.translate(SID, iova, false), Ok(0x80_0000));
    assert_eq!(u.translate(SID, iova, true), Err(Fault { reason: fault::WRITE, addr: iova }));
    // Write-only in the middle: reads fault even though the leaf allows them.
    m.write_obj(L3 | 3, GuestAddress(L4 + l4_index * 8)).unwrap();
    let l2_index = (iova >> 21) & 0x1ff;
    m.write_obj(L1 | 2, GuestAddress(L2 + l2_index * 8)).unwrap();
    assert_eq!(u.translate(SID, iova, false), Err(Fault { reason: fault::READ, addr: iova }));
    assert_eq!(u.translate(SID, iova, true), Ok(0x80_0000));
}
