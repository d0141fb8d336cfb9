//! The software device's descriptor engine on any 64-byte descriptor (opcodes, flags, sizes
//! from zero to huge, addresses anywhere), DMA into guest memory (1 MiB at 0, 64 KiB at
//! 4 GiB, a hole between) directly or through a vIOMMU whose root, context and page tables
//! come from the input; completion records decoded from any 32 bytes. A descriptor either
//! completes with a status or faults, its record reads back as written; nothing outside guest
//! memory is touched (the sanitizer would see it).
#![no_main]

use std::sync::Arc;

use devices::iommu::vtd::{reg, VtdConfig, VtdUnit};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{guest_memory, Input};
use siovmm_vdcm::iommu_dma::VtdDma;
use siovmm_vfio::dma::{DmaSpace, GuestRam};
use siovmm_vfio::soft::descriptor::{Completion, Descriptor, COMPLETION_SIZE, DESC_SIZE};
use siovmm_vfio::soft::engine;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = guest_memory();
    let Some(mode) = input.u8() else { return };
    // Guest memory's first 64 KiB from the input: page tables, buffers.
    let Some(len) = input.u16() else { return };
    let Some(image) = input.bytes(usize::from(len).min(input.0.len())) else { return };
    let _ = mem.write_slice(image, GuestAddress(0));
    let ram = GuestRam(mem.clone());
    let dma: Box<dyn DmaSpace> = if mode & 1 == 0 {
        Box::new(ram)
    } else {
        // The guest's vIOMMU: root table at an address from the input, translation on.
        let unit = Arc::new(VtdUnit::new(mem.clone(), VtdConfig { caching_mode: false }));
        let Some(root) = input.u64() else { return };
        let mut regs = unit.clone();
        regs.write(reg::RTADDR, &root.to_le_bytes());
        regs.write(reg::GCMD, &(1u32 << 30).to_le_bytes()); // SRTP: latch the root table
        regs.write(reg::GCMD, &(1u32 << 31).to_le_bytes()); // TE: translate
        Box::new(VtdDma { unit, sid: u16::from(mode >> 1), ram })
    };
    while let Some(bytes) = input.bytes(DESC_SIZE) {
        let Ok(b) = <&[u8; DESC_SIZE]>::try_from(bytes) else { break };
        let c = engine::execute(&Descriptor::decode(b), dma.as_ref());
        assert_eq!(Completion::decode(&c.encode()), c, "a completion record reads back as written");
    }
    if let Some(Ok(b)) = input.bytes(COMPLETION_SIZE).map(<&[u8; COMPLETION_SIZE]>::try_from) {
        let _ = Completion::decode(b);
    }
});
