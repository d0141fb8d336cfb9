//! A passed-through function's virtualized config space and trapped BAR pages as a hostile
//! guest reaches them: ECAM accesses (BARs sized and moved, command register, MSI and MSI-X
//! capabilities, the hidden ROM) and accesses to the MSI-X table and PBA pages, on a fake
//! VFIO device shaped like QEMU's NVMe controller (MSI-X 4 vectors in BAR0, MSI, an I/O BAR),
//! KVM faked. No BAR write reaches the device's own BAR registers, and disabling the
//! function's interrupts (as its release does) unbinds every irqfd.
#![no_main]

use std::sync::{Arc, LazyLock, Mutex};

use devices::pci::{Bdf, PciConfigMmio, PciRoot};
use libfuzzer_sys::fuzz_target;
use siovmm_fuzz::{Access, Input};
use siovmm_interrupts::fake::FakeRoutes;
use siovmm_interrupts::MsiRouter;
use siovmm_vfio::pci::fake::FakeDevice;
use siovmm_vfio::pci::{bars, Bar, VfioBarMapper, VfioPciFunction};

/// KVM's routes, faked, and the router over them: built once (it runs a thread).
static ROUTES: LazyLock<(Arc<FakeRoutes>, Arc<MsiRouter>)> = LazyLock::new(|| {
    let routes = Arc::new(FakeRoutes::default());
    let router = MsiRouter::new(routes.clone(), 16).unwrap_or_else(|e| panic!("router: {e}"));
    (routes, Arc::new(router))
});

/// Maps every BAR anywhere except one address, which is "another device's".
struct Mapper;

impl VfioBarMapper for Mapper {
    fn remap(&self, _: Bdf, _: Bar, _: Option<u64>, new: Option<u64>) -> bool {
        new != Some(0xd000_0000)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let intx = input.u8().is_some_and(|b| b & 1 == 1);
    let device = Arc::new(if intx { FakeDevice::with_intx() } else { FakeDevice::new() });
    let (routes, router) = &*ROUTES;
    let mapper: Arc<dyn VfioBarMapper> = Arc::new(Mapper);
    let guest_bars = bars(device.as_ref());
    let placement: Vec<(Bar, u64)> = guest_bars.iter().map(|b| (*b, if b.io { 0xc000 } else { 0x1_0000_0000 })).collect();
    let bdf = Bdf::new(0, 3, 0);
    let function = Arc::new(Mutex::new(VfioPciFunction::new(bdf, device.clone(), &placement, router.clone(), Arc::downgrade(&mapper))));
    let root = Arc::new(PciRoot::new());
    root.add(bdf, function.clone());
    let mut ecam = PciConfigMmio::new(root, 1);
    let bar_registers = device.config_bytes(0x10, 24);
    while let Some(step) = input.u8() {
        if step & 1 == 0 {
            // Function 00:03.0's 4 KiB of ECAM.
            let Some(a) = Access::next(&mut input, 4096) else { break };
            a.at(3 << 15).apply(&mut ecam);
        } else {
            // A trapped BAR access, inside the BAR (the bus delivers nothing else).
            let Some(bar) = input.u8().and_then(|i| guest_bars.get(usize::from(i) % guest_bars.len().max(1))) else { break };
            let Some(a) = Access::next(&mut input, bar.size) else { break };
            let mut f = siovmm_fuzz::lock(&function);
            match a {
                Access::Read { offset, len } if offset + len as u64 <= bar.size => f.bar_read(bar.index, offset, &mut [0u8; 8][..len]),
                Access::Write { offset, len, data } if offset + len as u64 <= bar.size => f.bar_write(bar.index, offset, &data[..len]),
                _ => {}
            }
        }
    }
    assert_eq!(device.config_bytes(0x10, 24), bar_registers, "a BAR write reached the device");
    // Released as the VMM releases it: every vector's irqfd unbound.
    siovmm_fuzz::lock(&function).disable_interrupts();
    assert!(siovmm_fuzz::lock(&routes.irqfds).is_empty(), "irqfds left bound after the function's interrupts were disabled");
    routes.forget_history();
    drop(mapper);
});
