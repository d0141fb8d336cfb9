//! The virtual VT-d unit as a guest drives it: register accesses (any offset in its 4 KiB,
//! 1-8 bytes: global command, root table, fault registers, invalidation) interleaved with DMA
//! translations by any requester of any address, over root, context and page tables the
//! input writes into guest memory. A translation either gives an address or records a fault;
//! a translated address never comes from a walk through memory outside the guest's.
#![no_main]

use std::sync::Arc;

use devices::iommu::vtd::{VtdConfig, VtdUnit, REG_SIZE};
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{guest_memory, Access, Input};
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = guest_memory();
    let Some(caching_mode) = input.u8() else { return };
    let unit = Arc::new(VtdUnit::new(mem.clone(), VtdConfig { caching_mode: caching_mode & 1 == 1 }));
    let mut regs = unit.clone();
    while let Some(step) = input.u8() {
        match step % 3 {
            0 => {
                let Some(a) = Access::next(&mut input, REG_SIZE) else { break };
                a.apply(&mut regs);
            }
            1 => {
                // Eight bytes of a table somewhere in the first MiB.
                let (Some(at), Some(v)) = (input.u32(), input.u64()) else { break };
                let _ = mem.write_obj(v, GuestAddress(u64::from(at % (1 << 20)) & !7));
            }
            _ => {
                let (Some(sid), Some(iova), Some(write)) = (input.u16(), input.u64(), input.u8()) else { break };
                let _ = unit.translate(sid, iova, write & 1 == 1);
            }
        }
    }
});
