//! A daemon ADI's IMS slots as siovmm keeps them (`siovmm_vdcm::remote_ims`), hostile on both
//! sides: the guest drives one function's hypercall calls (alloc, free, compose, mask with
//! any arguments) and another's trapped IMS window (any access, opted in or not), while the
//! device daemon answers every mailbox request and eventfd bind with whatever the input says
//! (any status, slot number or state: a faulty or hostile daemon). The VM's quota (16 per
//! function, 24 for the VM) holds after every step, and when the functions go every entry
//! is the VM's again and no route or irqfd is left.
#![no_main]

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex};

use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{lock, Input};
use siovmm_hypercall::Status;
use siovmm_interrupts::fake::FakeRoutes;
use siovmm_interrupts::{MsiMessage, MsiRouter};
use siovmm_vdcm::remote_ims::{RemoteImsSlots, RemoteImsWindow};
use siovmm_vdcm::{ImsOptIn, ImsQuota, PvIms};
use siovmm_vfio::pci::BarOverlay;
use siovmm_vfio::user::ims_mailbox::{ImsMailbox, Request};
use vmm_sys_util::eventfd::EventFd;

/// The daemon's side: each answer taken from a script the input fills; an empty script is a
/// daemon that does not answer.
#[derive(Default)]
struct ScriptedMailbox(Mutex<VecDeque<u8>>);

impl ScriptedMailbox {
    fn take(&self, n: usize) -> Option<Vec<u8>> {
        let mut script = lock(&self.0);
        (script.len() >= n).then(|| script.drain(..n).collect())
    }
}

impl ImsMailbox for ScriptedMailbox {
    fn request(&self, _: Request) -> Result<u64, Status> {
        let Some(b) = self.take(9) else { return Err(Status::NoSuchAdi) };
        let value = u64::from_le_bytes(b[1..9].try_into().unwrap_or([0; 8]));
        match b[0] % 8 {
            0..=3 => Ok(value),
            s => Err(Status::from_code(-i64::from(s)).unwrap_or(Status::InvalidArgument)),
        }
    }
    fn bind(&self, _: u32, _: &EventFd) -> std::io::Result<()> {
        match self.take(1) {
            Some(b) if b[0] & 1 == 0 => Ok(()),
            _ => Err(std::io::Error::other("refused")),
        }
    }
}

static ROUTES: LazyLock<(Arc<FakeRoutes>, Arc<MsiRouter>)> = LazyLock::new(|| {
    let routes = Arc::new(FakeRoutes::default());
    let router = Arc::new(MsiRouter::new(routes.clone(), 64).unwrap_or_else(|e| panic!("router: {e}")));
    (routes, router)
});

/// A guest message: any address and data (the hypercall endpoint validates the destination
/// before a compose; the window validates its own).
fn message(input: &mut Input<'_>) -> Option<MsiMessage> {
    Some(MsiMessage { address: 0xfee0_0000 | u64::from(input.u32()? & 0x000f_fffc), data: u32::from(input.u8()?.max(32)) })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (routes, router) = &*ROUTES;
    let quota = ImsQuota::new(16, 24);
    let opt_in = ImsOptIn::default();
    let mailbox = Arc::new(ScriptedMailbox::default());
    let Some(script) = input.bytes(18) else { return };
    lock(&mailbox.0).extend(script);
    let Ok((mut pv, _)) = RemoteImsSlots::new(mailbox.clone(), 0x0100, router.clone(), quota.clone()) else { return };
    let Ok((slots, _)) = RemoteImsSlots::new(mailbox.clone(), 0x0108, router.clone(), quota.clone()) else { return };
    let mut window = RemoteImsWindow::new("fuzz".into(), slots, opt_in.clone(), 2);
    while let Some(op) = input.u8() {
        // The daemon's next answers.
        let Some(n) = input.u8() else { break };
        let Some(script) = input.bytes(usize::from(n % 32)) else { break };
        lock(&mailbox.0).extend(script);
        let done = match op % 8 {
            0 => input.u32().map(|count| {
                let _ = pv.pv_alloc(count % 40);
            }),
            1 => input.u32().map(|first| {
                let _ = pv.pv_free(first);
            }),
            2 => input.u32().zip(message(&mut input)).map(|(slot, m)| {
                let _ = pv.pv_compose(slot, m);
            }),
            3 => input.u32().zip(input.u8()).map(|(slot, masked)| {
                let _ = pv.pv_mask(slot, masked & 1 == 1);
            }),
            4 => Some(opt_in.set()),
            5 => input.u32().zip(input.u32()).map(|(offset, value)| window.write(u64::from(offset % 0x4000), &value.to_le_bytes())),
            6 => input.u32().map(|offset| window.read(u64::from(offset % 0x4000), &mut [0; 4])),
            _ => input.u32().zip(input.u8()).map(|(offset, len)| {
                let len = usize::from(len % 8) + 1;
                window.write(u64::from(offset % 0x4000), &[0xff; 8][..len]);
            }),
        };
        if done.is_none() {
            break;
        }
        assert!(pv.held() <= 16 && window.held() <= 16, "per-function quota exceeded: {} {}", pv.held(), window.held());
        assert_eq!(quota.held(), pv.held() + window.held(), "the VM's books and the functions' differ");
        assert!(quota.held() <= 24, "VM quota exceeded: {}", quota.held());
    }
    drop((pv, window));
    assert_eq!(quota.held(), 0, "entries not given back");
    router.settle().unwrap_or_else(|e| panic!("settle: {e}"));
    assert!(lock(&routes.irqfds).is_empty() && routes.messages().is_empty(), "routes left behind");
    // The fake lives as long as the process: its record of commits would grow without end.
    routes.forget_history();
});
