//! The CPUID a guest vCPU sees: KVM's supported set, made truthful about this VM's topology,
//! with the TSC-deadline timer and the TSC frequency advertised.
//!
//! Pure: it rewrites a list of `kvm_cpuid_entry2`; `vmm` feeds it KVM_GET_SUPPORTED_CPUID
//! and hands the result to KVM_SET_CPUID2.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: TSC-deadline mode of the local APIC timer (SDM Vol. 2A, CPUID leaf 01H).
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (the logical-processor count in EBX is valid).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// 0x8000_0001 ECX: AMD TOPOEXT. We clear it: leaf 0x8000_001E would otherwise have to
/// describe a core/node topology we do not model.
pub const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
/// KVM's hypervisor signature leaf ("KVMKVMKVM\0\0\0").
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// Hypervisor timing leaf: EAX = TSC frequency in kHz, EBX = APIC bus frequency in kHz
/// (the convention VMware introduced and KVM/QEMU follow).
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's in-kernel local APIC timer runs at 1 GHz.
pub const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

/// What this vCPU's CPUID must say.
#[derive(Clone, Copy, Debug)]
pub struct VcpuTopology {
    /// This vCPU's index; it is also its APIC ID.
    pub vcpu_id: u8,
    /// vCPUs in the VM.
    pub vcpu_count: u8,
    /// Guest TSC frequency in kHz (KVM_GET_TSC_KHZ), 0 when unknown.
    pub tsc_khz: u32,
    /// Whether KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
}

fn bits_needed(count: u8) -> u32 {
    // Width of an APIC-ID field able to number `count` items.
    (u32::from(count.max(1)) - 1).checked_ilog2().map_or(0, |b| b + 1)
}

/// Rewrites `entries` (KVM's supported CPUID) for one vCPU.
pub fn patch(entries: &mut Vec<kvm_cpuid_entry2>, topo: &VcpuTopology) {
    let apic_id = u32::from(topo.vcpu_id);
    let count = u32::from(topo.vcpu_count.max(1));
    let id_bits = bits_needed(topo.vcpu_count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if topo.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            // Intel deterministic cache parameters: EAX[31:26] = cores per package - 1,
            // EAX[25:14] = threads sharing this cache - 1. One thread per core here.
            4 => {
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
            }
            // Extended topology (x2APIC): level 0 = SMT (1 thread), level 1 = core (all vCPUs).
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = apic_id;
            }
            0x8000_0001 => e.ecx &= !EXT1_ECX_TOPOEXT,
            // AMD: ECX[7:0] = cores - 1, ECX[15:12] = APIC-ID bits used for the core.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits << 12) | (count - 1);
            }
            KVM_SIGNATURE_LEAF => e.eax = e.eax.max(TIMING_LEAF),
            _ => {}
        }
    }
    // Leaves AMD's TOPOEXT would have required: drop them rather than leave them lying.
    entries.retain(|e| e.function != 0x8000_001e);
    if topo.tsc_khz != 0 && !entries.iter().any(|e| e.function == TIMING_LEAF) {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: topo.tsc_khz,
            ebx: KVM_APIC_BUS_KHZ,
            ..Default::default()
        });
    }
}

/// Adds siovmm's hypercall discovery leaves (ABI in the `siovmm-hypercall` crate):
/// `signature_leaf` → EAX = `info_leaf`, EBX:ECX:EDX = `signature`; `info_leaf` → EAX =
/// `version`, EBX = `flags`, ECX:EDX = `register` address (low, high).
pub fn add_hypercall_leaves(
    entries: &mut Vec<kvm_cpuid_entry2>,
    (signature_leaf, info_leaf): (u32, u32),
    signature: [u32; 3],
    version: u32,
    flags: u32,
    register: u64,
) {
    entries.retain(|e| e.function != signature_leaf && e.function != info_leaf);
    entries.push(kvm_cpuid_entry2 {
        function: signature_leaf,
        eax: info_leaf,
        ebx: signature[0],
        ecx: signature[1],
        edx: signature[2],
        ..Default::default()
    });
    entries.push(kvm_cpuid_entry2 {
        function: info_leaf,
        eax: version,
        ebx: flags,
        ecx: register as u32,
        edx: (register >> 32) as u32,
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        let mk = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        vec![
            mk(0, 0, 0x1f, 0, 0, 0),
            mk(1, 0, 0x806f8, 0xff00_0000, 0, 0),
            mk(4, 0, 0x121, 0, 0, 0),
            mk(0xb, 0, 0, 0, 0, 0),
            mk(0xb, 1, 0, 0, 0, 0),
            mk(0x4000_0000, 0, 0x4000_0001, 0, 0, 0),
            mk(0x8000_0001, 0, 0, 0, EXT1_ECX_TOPOEXT | 1, 0),
            mk(0x8000_0008, 0, 0x3030, 0, 0xffff, 0),
            mk(0x8000_001e, 0, 0, 0, 0, 0),
        ]
    }

    #[test]
    fn apic_id_and_count_per_vcpu() {
        for id in 0..4u8 {
            let mut e = sample();
            patch(&mut e, &VcpuTopology { vcpu_id: id, vcpu_count: 4, tsc_khz: 2_000_000, tsc_deadline: true });
            let l1 = leaf(&e, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
            assert_eq!(leaf(&e, 0xb, 0).edx, u32::from(id));
            assert_eq!(leaf(&e, 0xb, 1).ebx, 4);
            assert_eq!(leaf(&e, 0xb, 1).eax, 2);
            assert_eq!(leaf(&e, 4, 0).eax >> 26, 3);
            assert_eq!(leaf(&e, 0x8000_0008, 0).ecx & 0xff, 3);
        }
    }

    #[test]
    fn tsc_deadline_hypervisor_and_frequency() {
        let mut e = sample();
        patch(&mut e, &VcpuTopology { vcpu_id: 0, vcpu_count: 1, tsc_khz: 2_345_678, tsc_deadline: true });
        let l1 = leaf(&e, 1, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        let timing = leaf(&e, TIMING_LEAF, 0);
        assert_eq!(timing.eax, 2_345_678);
        assert_eq!(timing.ebx, KVM_APIC_BUS_KHZ);
        assert!(leaf(&e, KVM_SIGNATURE_LEAF, 0).eax >= TIMING_LEAF);
    }

    #[test]
    fn no_deadline_when_kvm_lacks_it_and_topoext_cleared() {
        let mut e = sample();
        patch(&mut e, &VcpuTopology { vcpu_id: 0, vcpu_count: 1, tsc_khz: 0, tsc_deadline: false });
        assert_eq!(leaf(&e, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(leaf(&e, 0x8000_0001, 0).ecx & EXT1_ECX_TOPOEXT, 0);
        assert!(!e.iter().any(|x| x.function == 0x8000_001e));
        assert!(!e.iter().any(|x| x.function == TIMING_LEAF));
    }

    #[test]
    fn hypercall_leaves() {
        let mut e = sample();
        add_hypercall_leaves(&mut e, (0x4000_0100, 0x4000_0101), [1, 2, 3], 1, 1, 0x1_feb0_1000);
        add_hypercall_leaves(&mut e, (0x4000_0100, 0x4000_0101), [1, 2, 3], 1, 0, 0xfeb0_1000);
        let sig = leaf(&e, 0x4000_0100, 0);
        assert_eq!((sig.eax, sig.ebx, sig.ecx, sig.edx), (0x4000_0101, 1, 2, 3));
        let info = leaf(&e, 0x4000_0101, 0);
        assert_eq!((info.eax, info.ebx, info.ecx, info.edx), (1, 0, 0xfeb0_1000, 0), "replaced, not duplicated");
        assert_eq!(e.iter().filter(|x| x.function == 0x4000_0101).count(), 1);
    }

    #[test]
    fn id_bits() {
        assert_eq!(bits_needed(1), 0);
        assert_eq!(bits_needed(2), 1);
        assert_eq!(bits_needed(3), 2);
        assert_eq!(bits_needed(4), 2);
        assert_eq!(bits_needed(5), 3);
        assert_eq!(bits_needed(255), 8);
    }
}
