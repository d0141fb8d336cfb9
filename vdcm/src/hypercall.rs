//! The IMS hypercall endpoint (ABI: `siovmm-hypercall`, docs/hypercall.md).
//!
//! A guest's 64-bit store of its argument block's address to [`HYPERCALL_ADDR`] exits to siovmm
//! (one MMIO exit; the call is synchronous on the calling vCPU). The block is read from guest RAM,
//! decoded with every argument range-checked, executed against **this VM's** ADIs only (looked
//! up by the requester ID of the function the guest names), and the status and result are
//! written back into the block.

use devices::bus::{lock, read_lock};
use siovmm_interrupts::MsiMessage;
use devices::BusDevice;
use siovmm_hypercall::{
    complete, compose_msi, Call, Status, ABI_VERSION, BLOCK_SIZE, FLAG_IMS_ALLOWED, FLAG_IMS_IN_QUEUE, FLAG_IMS_TRAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{AdiTable, ImsOptIn, ImsQuota};

/// Guest-physical address of the hypercall register (next to the boot timer, outside RAM
/// and the PCI windows; announced through CPUID).
pub const HYPERCALL_ADDR: u64 = 0xfeb0_1000;

/// What a VM's IMS policy offers a guest that opts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImsOffer {
    /// Nothing: IMS_OPT_IN answers NOT_ALLOWED.
    None,
    /// IMS vectors through these calls; `in_queue` when the device keeps IMS in memory next
    /// to each queue, where the guest stores the host messages IMS_COMPOSE returns.
    Pv {
        /// IMS storage is the queues' memory.
        in_queue: bool,
    },
    /// The trapped window in each ADI's BAR0 (the calls stay refused).
    Trap,
}

impl ImsOffer {
    /// The flags CPUID's info leaf announces and IMS_OPT_IN returns (`siovmm-hypercall`).
    pub fn flags(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Pv { in_queue: false } => FLAG_IMS_ALLOWED,
            Self::Pv { in_queue: true } => FLAG_IMS_ALLOWED | FLAG_IMS_IN_QUEUE,
            Self::Trap => FLAG_IMS_TRAP,
        }
    }
}

/// The endpoint of one VM.
pub struct Hypercalls {
    mem: GuestMemoryMmap,
    functions: AdiTable,
    vcpus: u32,
    offer: ImsOffer,
    opt_in: ImsOptIn,
    quota: ImsQuota,
    calls: u64,
}

impl std::fmt::Debug for Hypercalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypercalls").field("calls", &self.calls).finish_non_exhaustive()
    }
}

impl Hypercalls {
    /// An endpoint for a VM with `vcpus` vCPUs whose ADIs are `functions` (by requester ID;
    /// the VDCM keeps the table current as ADIs come and go).
    /// `offer` is what the VM's policy lets a guest that opts in use; `opt_in` and `quota` are
    /// shared with the VM's ADIs (their trapped windows follow the opt-in; their slots count
    /// against the quota, which QUERY reports).
    pub fn new(mem: GuestMemoryMmap, functions: AdiTable, vcpus: u32, offer: ImsOffer, (opt_in, quota): (ImsOptIn, ImsQuota)) -> Self {
        Self { mem, functions, vcpus, offer, opt_in, quota, calls: 0 }
    }

    /// Executes one decoded call.
    pub fn execute(&self, call: Call) -> Result<u64, Status> {
        match (call, self.offer) {
            (Call::Query, ImsOffer::Pv { .. }) => return Ok(u64::from(ABI_VERSION) << 32 | u64::from(self.quota.slots_per_adi())),
            (Call::Query, _) => return Ok(u64::from(ABI_VERSION) << 32),
            (Call::ImsOptIn, ImsOffer::None) => return Err(Status::NotAllowed),
            (Call::ImsOptIn, offer) => {
                self.opt_in.set();
                log::info!("the guest opted in to IMS ({offer:?})");
                return Ok(u64::from(offer.flags()));
            }
            // IMS calls: only in pv mode, and only once the guest has opted in.
            (_, ImsOffer::Pv { .. }) if self.opt_in.get() => {}
            _ => return Err(Status::NotAllowed),
        }
        let adi = |rid: u16| read_lock(&self.functions).get(&rid).cloned().ok_or(Status::NoSuchAdi);
        match call {
            // Answered above; kept total without a panic path.
            Call::Query | Call::ImsOptIn => Err(Status::NoSuchCall),
            Call::ImsAlloc { adi: rid, count } => lock(adi(rid)?.as_ref()).pv_alloc(count).map(u64::from),
            Call::ImsFree { adi: rid, first } => lock(adi(rid)?.as_ref()).pv_free(first).map(|_| 0),
            Call::ImsCompose { adi: rid, slot, vector, apic_id } => {
                // The message may only name this VM's vCPUs; the route lives in this VM anyway.
                if apic_id >= self.vcpus {
                    return Err(Status::InvalidArgument);
                }
                let (address, data) = compose_msi(vector, apic_id).ok_or(Status::InvalidArgument)?;
                lock(adi(rid)?.as_ref()).pv_compose(slot, MsiMessage { address, data })
            }
            Call::ImsMask { adi: rid, slot, masked } => lock(adi(rid)?.as_ref()).pv_mask(slot, masked).map(|_| 0),
        }
    }

    fn handle(&mut self, block_addr: u64) {
        self.calls += 1;
        // The block must be 8-byte aligned and wholly in guest RAM; otherwise nothing is
        // written anywhere.
        if !block_addr.is_multiple_of(8) {
            return;
        }
        let mut block = [0u8; BLOCK_SIZE];
        if self.mem.read_slice(&mut block, GuestAddress(block_addr)).is_err() {
            return;
        }
        let result = Call::decode(&block).and_then(|c| self.execute(c));
        complete(&mut block, result);
        // Read from the same guest RAM a moment ago; a failure here means the guest's memory
        // went away under it, and the call's result is then lost to the guest alone.
        if let Err(e) = self.mem.write_slice(&block[48..], GuestAddress(block_addr + 48)) {
            log::warn!("hypercall: writing the result block at {block_addr:#x}: {e}");
        }
    }
}

impl BusDevice for Hypercalls {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 8 {
            let mut a = [0u8; 8];
            a.copy_from_slice(data);
            self.handle(u64::from_le_bytes(a));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(offer: ImsOffer) -> (Hypercalls, ImsOptIn) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let opt_in = ImsOptIn::default();
        (Hypercalls::new(mem, AdiTable::default(), 1, offer, (opt_in.clone(), ImsQuota::new(300, 200))), opt_in)
    }

    #[test]
    fn ims_calls_are_refused_until_the_guest_opts_in() {
        let alloc = Call::ImsAlloc { adi: 8, count: 1 };
        let (in_queue, _) = endpoint(ImsOffer::Pv { in_queue: true });
        assert_eq!(in_queue.execute(Call::ImsOptIn), Ok(u64::from(FLAG_IMS_ALLOWED | FLAG_IMS_IN_QUEUE)));
        let (pv, opt_in) = endpoint(ImsOffer::Pv { in_queue: false });
        assert_eq!(pv.execute(alloc), Err(Status::NotAllowed), "the platform said no IMS; the guest has not overridden it");
        assert!(!opt_in.get());
        assert_eq!(pv.execute(Call::ImsOptIn), Ok(u64::from(FLAG_IMS_ALLOWED)));
        assert!(opt_in.get());
        assert_eq!(pv.execute(alloc), Err(Status::NoSuchAdi), "past the gate: the ADI is looked up");
        assert_eq!(pv.execute(Call::Query), Ok(u64::from(ABI_VERSION) << 32 | 200), "the quota, not the slot numbers");

        let (off, opt_in) = endpoint(ImsOffer::None);
        assert_eq!(off.execute(Call::ImsOptIn), Err(Status::NotAllowed));
        assert!(!opt_in.get());
        assert_eq!(off.execute(Call::Query), Ok(u64::from(ABI_VERSION) << 32));

        let (trap, opt_in) = endpoint(ImsOffer::Trap);
        assert_eq!(trap.execute(Call::ImsOptIn), Ok(u64::from(FLAG_IMS_TRAP)));
        assert!(opt_in.get(), "the trapped windows follow");
        assert_eq!(trap.execute(alloc), Err(Status::NotAllowed), "trap mode has no pv calls");
    }
}
