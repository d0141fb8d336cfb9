//! The function model against a fake VFIO device and the interrupt crate's fake routing table:
//! no /dev/vfio, no KVM.

use std::sync::Mutex;

use siovmm_interrupts::fake::FakeRoutes;
use siovmm_interrupts::MsiMessage;

use super::fake::{FakeDevice, MSIX_CAP, MSI_CAP};
use super::*;

/// (BAR, from, to) per move.
type MoveLog = Mutex<Vec<(u8, Option<u64>, Option<u64>)>>;

#[derive(Default)]
struct Moves(MoveLog);
/// An address this fake bus refuses, as a bus does a BAR over another device.
const TAKEN: u64 = 0xd000_0000;

impl VfioBarMapper for Moves {
    fn remap(&self, _: Bdf, bar: Bar, old: Option<u64>, new: Option<u64>) -> bool {
        self.0.lock().unwrap().push((bar.index, old, new));
        new != Some(TAKEN)
    }
}

struct Setup {
    f: VfioPciFunction,
    device: Arc<FakeDevice>,
    routes: Arc<FakeRoutes>,
    router: Arc<MsiRouter>,
    moves: Arc<Moves>,
    _mapper: Arc<dyn VfioBarMapper>,
}

fn setup() -> Setup {
    setup_with(FakeDevice::new())
}

fn setup_with(device: FakeDevice) -> Setup {
    let device = Arc::new(device);
    let routes = Arc::new(FakeRoutes::default());
    let router = Arc::new(MsiRouter::new(routes.clone(), 64).unwrap());
    let moves = Arc::new(Moves::default());
    let mapper: Arc<dyn VfioBarMapper> = moves.clone();
    let bars = bars(device.as_ref());
    let placement: Vec<(Bar, u64)> =
        bars.iter().map(|b| (*b, if b.io { 0xc000 } else { 0x1_0000_0000 })).collect();
    let f = VfioPciFunction::new(Bdf::new(0, 3, 0), device.clone(), &placement, router.clone(), Arc::downgrade(&mapper));
    Setup { f, device, routes, router, moves, _mapper: mapper }
}

fn enable_memory_and_io(f: &mut VfioPciFunction) {
    f.config_write(REG_COMMAND, 0, &[(CMD_MEMORY | CMD_IO) as u8, 0]);
}

#[test]
fn bars_come_from_regions_and_config_types() {
    let device = FakeDevice::new();
    let b = bars(&device);
    assert_eq!(b.len(), 2);
    assert_eq!(b[0], Bar { index: 0, size: 0x4000, io: false, wide: true, prefetchable: false, mmap: true });
    assert_eq!(b[1], Bar { index: 2, size: 0x100, io: true, wide: false, prefetchable: false, mmap: false });
}

#[test]
fn guest_bars_are_virtual_sized_and_moved() {
    let mut s = setup();
    // Firmware's placement, not the host's, and BAR1 is BAR0's high half.
    assert_eq!(s.f.config_read(4), 0x4);
    assert_eq!(s.f.config_read(5), 1);
    assert_eq!(s.f.config_read(6), 0xc001);
    assert_eq!(s.f.config_read(7), 0, "unimplemented");
    // Nothing is mapped until decode is on; then both.
    assert!(s.moves.0.lock().unwrap().is_empty());
    enable_memory_and_io(&mut s.f);
    assert_eq!(*s.moves.0.lock().unwrap(), vec![(0, None, Some(0x1_0000_0000)), (2, None, Some(0xc000))]);
    // Sizing BAR0 as Linux does (decode off meanwhile): all ones reads back the size; placed
    // again at the new address when decode comes back.
    s.f.config_write(REG_COMMAND, 0, &[0, 0]);
    assert_eq!(s.moves.0.lock().unwrap().len(), 4, "both BARs off the bus");
    s.f.config_write(4, 0, &u32::MAX.to_le_bytes());
    s.f.config_write(5, 0, &u32::MAX.to_le_bytes());
    assert_eq!(s.f.config_read(4), 0xffff_c004);
    assert_eq!(s.f.config_read(5), u32::MAX);
    s.f.config_write(4, 0, &0xe000_0000u32.to_le_bytes());
    s.f.config_write(5, 0, &0u32.to_le_bytes());
    assert_eq!(s.moves.0.lock().unwrap().len(), 4, "nothing moves with decode off");
    enable_memory_and_io(&mut s.f);
    assert_eq!(s.moves.0.lock().unwrap()[4], (0, None, Some(0xe000_0000)));
    // Sized with decode on, the BAR is off the bus while it holds the size pattern.
    s.f.config_write(4, 0, &u32::MAX.to_le_bytes());
    s.f.config_write(5, 0, &u32::MAX.to_le_bytes());
    assert_eq!(s.moves.0.lock().unwrap().last().map(|m| (m.0, m.2)), Some((0, None)));
    s.f.config_write(4, 0, &0xe000_0000u32.to_le_bytes());
    s.f.config_write(5, 0, &0u32.to_le_bytes());
    assert_eq!(s.moves.0.lock().unwrap().last().map(|m| (m.0, m.2)), Some((0, Some(0xe000_0000))));
    // Placed where the bus refuses it: not mapped, so the next move takes nothing (whatever
    // is at TAKEN belongs to someone else) off the bus.
    s.f.config_write(4, 0, &(TAKEN as u32).to_le_bytes());
    s.f.config_write(4, 0, &0xe000_0000u32.to_le_bytes());
    let log = s.moves.0.lock().unwrap().clone();
    assert_eq!(log[log.len() - 2..], [(0, Some(0xe000_0000), Some(TAKEN)), (0, None, Some(0xe000_0000))]);
    // The I/O BAR sizes to 256 bytes.
    s.f.config_write(6, 0, &u32::MAX.to_le_bytes());
    assert_eq!(s.f.config_read(6), 0xffff_ff01);
    // BAR writes never reach the device.
    assert_eq!(&s.device.config.lock().unwrap()[0x10..0x14], &4u32.to_le_bytes());
    // Removal takes every mapped BAR off the bus.
    s.f.unmap_bars();
    assert_eq!(s.moves.0.lock().unwrap().last(), Some(&(0, Some(0xe000_0000), None)));
}

#[test]
fn rom_and_interrupt_pin_are_hidden_the_rest_is_the_devices() {
    let mut s = setup();
    assert_eq!(s.f.config_read(REG_ROM), 0);
    s.f.config_write(REG_ROM, 0, &u32::MAX.to_le_bytes());
    assert_eq!(s.f.config_read(REG_ROM), 0);
    assert_eq!(s.f.config_read(REG_INTERRUPT), 0, "no INTx pin");
    s.f.config_write(REG_INTERRUPT, 0, &[11]);
    assert_eq!(s.f.config_read(REG_INTERRUPT), 11, "the line is scratch");
    assert_eq!(s.f.config_read(0), 0x0010_1b36);
    assert_eq!(s.f.config_read(0x68 / 4), 0xdead_beef);
    // A write the model does not own goes to the device.
    s.f.config_write(0x68 / 4, 0, &[0x11]);
    assert_eq!(s.device.config.lock().unwrap()[0x68], 0x11);
    // Writes spilling past the dword are dropped.
    s.f.config_write(0x68 / 4, 3, &[1, 2]);
    assert_eq!(s.device.config.lock().unwrap()[0x6b], 0xde);
}

/// The guest programs MSI-X vector `v` in the trapped table.
fn program_msix(f: &mut VfioPciFunction, v: u64, data: u32, masked: bool) {
    f.bar_write(0, 0x2000 + v * 16, &0xfee0_0000u32.to_le_bytes());
    f.bar_write(0, 0x2000 + v * 16 + 4, &0u32.to_le_bytes());
    f.bar_write(0, 0x2000 + v * 16 + 8, &data.to_le_bytes());
    f.bar_write(0, 0x2000 + v * 16 + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn msix_vectors_are_routed_and_masking_is_emulated_with_the_pending_bit() {
    let mut s = setup();
    enable_memory_and_io(&mut s.f);
    let ctrl = |f: &mut VfioPciFunction| f.config_read(MSIX_CAP / 4) >> 16;
    assert_eq!(ctrl(&mut s.f), 3, "4 vectors, disabled");
    // Enable: all 4 vectors get eventfds on the device at once.
    s.f.config_write(MSIX_CAP / 4, 2, &0x8000u16.to_le_bytes());
    assert_eq!(ctrl(&mut s.f), 0x8003);
    assert_eq!(*s.device.irq_sets.lock().unwrap(), vec![(VFIO_PCI_MSIX_IRQ_INDEX, 0, 4)]);
    assert_eq!(s.device.config.lock().unwrap()[MSIX_CAP + 3], 0, "message control never reaches the device");
    // Vector 1 unmasked: one route with the guest's message, and its irqfd.
    program_msix(&mut s.f, 1, 0x45, false);
    s.router.settle().unwrap();
    assert_eq!(s.routes.messages(), vec![MsiMessage { address: 0xfee0_0000, data: 0x45 }]);
    assert_eq!(s.routes.irqfds.lock().unwrap().len(), 1);
    // The table is trapped: it reads back what the guest wrote, and the device's BAR0 there
    // is untouched.
    let mut d = [0u8; 4];
    s.f.bar_read(0, 0x2018, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x45);
    assert!(s.device.bar0.lock().unwrap()[0x2000..0x3000].iter().all(|b| *b == 0));
    // Masked: the irqfd goes; the device signals while masked; the PBA says pending.
    program_msix(&mut s.f, 1, 0x45, true);
    assert!(s.routes.irqfds.lock().unwrap().is_empty());
    let fd = s.f.msix.as_ref().unwrap().2.eventfd(1).unwrap();
    fd.write(1).unwrap();
    let mut pba = [0u8; 8];
    s.f.bar_read(0, 0x3000, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0b10);
    // Unmasked: routed again and the pending interrupt delivered once (the eventfd signalled
    // once: the router's injector delivers it until the route is committed); the PBA clears.
    fd.write(2).unwrap();
    program_msix(&mut s.f, 1, 0x45, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.routes.injected.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the pending interrupt never arrived");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    s.router.settle().unwrap();
    assert_eq!(*s.routes.injected.lock().unwrap(), vec![MsiMessage { address: 0xfee0_0000, data: 0x45 }], "one delivery");
    assert_eq!(s.routes.irqfds.lock().unwrap().len(), 1);
    s.f.bar_read(0, 0x3000, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0);
    // A write to the PBA is ignored; other BAR0 offsets reach the device.
    s.f.bar_write(0, 0x3000, &u64::MAX.to_le_bytes());
    s.f.bar_write(0, 0x14, &7u32.to_le_bytes());
    assert_eq!(s.device.bar0.lock().unwrap()[0x14], 7);
    assert_eq!(s.device.bar0.lock().unwrap()[0x3000], 0);
    // Disable: routes gone, the device's MSI-X off.
    s.f.config_write(MSIX_CAP / 4, 2, &0u16.to_le_bytes());
    assert!(s.routes.irqfds.lock().unwrap().is_empty());
    assert_eq!(s.device.irq_sets.lock().unwrap().last(), Some(&(VFIO_PCI_MSIX_IRQ_INDEX, 0, 0)));
    assert_eq!(s.f.failures(), 0);
}

#[test]
fn a_function_is_in_use_while_bus_mastering_or_msix_is_on() {
    let mut s = setup();
    enable_memory_and_io(&mut s.f);
    assert!(!s.f.in_use(), "decode only");
    // Bus master goes through to the device, where in_use reads it back.
    s.f.config_write(REG_COMMAND, 0, &[(CMD_MEMORY | CMD_IO) as u8 | CMD_BUS_MASTER as u8, 0]);
    assert!(s.f.in_use());
    enable_memory_and_io(&mut s.f);
    assert!(!s.f.in_use());
    s.f.config_write(MSIX_CAP / 4, 2, &0x8000u16.to_le_bytes());
    assert!(s.f.in_use(), "MSI-X on");
    s.f.config_write(MSIX_CAP / 4, 2, &0u16.to_le_bytes());
    assert!(!s.f.in_use());
}

#[test]
fn an_msix_enable_or_disable_is_one_routing_commit_for_all_vectors() {
    let mut s = setup();
    enable_memory_and_io(&mut s.f);
    for v in 0..4 {
        program_msix(&mut s.f, v, 0x50 + v as u32, false);
    }
    assert!(s.routes.log.lock().unwrap().is_empty(), "nothing routed while disabled");
    for _ in 0..2 {
        s.f.config_write(MSIX_CAP / 4, 2, &0x8000u16.to_le_bytes());
        s.router.settle().unwrap();
        assert_eq!(s.routes.irqfds.lock().unwrap().len(), 4);
        s.f.config_write(MSIX_CAP / 4, 2, &0u16.to_le_bytes());
        assert!(s.routes.irqfds.lock().unwrap().is_empty(), "irqfds go at once");
        s.router.settle().unwrap();
    }
    assert_eq!(s.routes.log.lock().unwrap().len(), 4, "one commit per enable and per disable (each waited for here)");
    assert_eq!(s.f.failures(), 0);
}

#[test]
fn the_msix_pages_trap_the_rest_of_bar0_can_be_mapped() {
    let s = setup();
    assert_eq!(s.f.trapped_pages(0, 4096), vec![(0x2000, 0x1000), (0x3000, 0x1000)]);
    assert_eq!(s.f.trapped_pages(0, 0x10000), vec![(0, 0x10000)]);
    assert!(s.f.trapped_pages(2, 4096).is_empty());
}

/// What an overlay was written: (offset, bytes) per write.
type Written = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// An overlay that records its writes and reads back its offset's low byte, then `0xa5`s.
struct Scratch(Written);

impl BarOverlay for Scratch {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xa5);
        data[0] = offset as u8;
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().push((offset, data.to_vec()));
    }
}

#[test]
fn an_overlay_serves_its_part_of_a_bar_and_the_device_never_sees_it() {
    let mut s = setup();
    let written: Written = Arc::default();
    let scratch = || Box::new(Scratch(written.clone()));
    assert_eq!(s.f.overlay(0, 0x1000, 0x800, scratch()), Ok(()));
    assert_eq!(s.f.overlay(0, 0x3800, 0x1000, scratch()), Err(OverlayError::OutOfBar { bar: 0, start: 0x3800, size: 0x1000 }), "past BAR0's 16 KiB");
    assert_eq!(s.f.overlay(2, 0, 4, scratch()), Err(OverlayError::OutOfBar { bar: 2, start: 0, size: 4 }), "an I/O BAR");
    assert_eq!(s.f.overlay(0, 0, 0, scratch()), Err(OverlayError::OutOfBar { bar: 0, start: 0, size: 0 }), "empty");
    assert_eq!(s.f.overlay(0, 0x1f00, 0x200, scratch()), Err(OverlayError::Taken { bar: 0, start: 0x1f00 }), "over the MSI-X table");
    assert_eq!(s.f.overlay(0, 0x1400, 0x100, scratch()), Err(OverlayError::Taken { bar: 0, start: 0x1400 }), "over the first overlay");
    assert_eq!(s.f.overlay(0, u64::MAX - 1, 4, scratch()), Err(OverlayError::OutOfBar { bar: 0, start: u64::MAX - 1, size: 4 }));
    assert_eq!(s.f.trapped_pages(0, 4096), vec![(0x1000, 0x1000), (0x2000, 0x1000), (0x3000, 0x1000)], "its page is not mapped");
    s.f.bar_write(0, 0x1010, &[1, 2, 3, 4]);
    s.f.bar_write(0, 0x1800, &[9]);
    assert_eq!(*written.lock().unwrap(), vec![(0x10, vec![1, 2, 3, 4])], "0x1800 is past the overlay");
    assert_eq!(s.device.bar0.lock().unwrap()[0x1010..0x1014], [0; 4], "the device never saw the overlay's write");
    assert_eq!(s.device.bar0.lock().unwrap()[0x1800], 9, "but got the one past it");
    let mut b = [0u8; 4];
    s.f.bar_read(0, 0x17fc, &mut b);
    assert_eq!(b, [0xfc, 0xa5, 0xa5, 0xa5]);
}

#[test]
fn msi_is_emulated_and_multiple_messages_get_consecutive_data() {
    let mut s = setup();
    let base = MSI_CAP / 4;
    // 64-bit with per-vector mask: control, address lo/hi, data, mask, pending.
    let control = s.f.config_read(base) >> 16;
    assert_eq!(control & 0x1ff, 0x184, "64-bit, PVM, 4 capable (MMC=2), disabled");
    s.f.config_write(base + 1, 0, &0xfee0_1000u32.to_le_bytes());
    s.f.config_write(base + 2, 0, &0u32.to_le_bytes());
    s.f.config_write(base + 3, 0, &0x60u32.to_le_bytes());
    s.f.config_write(base + 4, 0, &0b0010u32.to_le_bytes()); // vector 1 masked
    // Enable with 4 messages (MME = 2).
    s.f.config_write(base, 2, &(1u16 | 2 << 4).to_le_bytes());
    assert_eq!(s.f.config_read(base) >> 16 & 0x71, 0x21);
    assert_eq!(*s.device.irq_sets.lock().unwrap(), vec![(VFIO_PCI_MSI_IRQ_INDEX, 0, 4)]);
    s.router.settle().unwrap();
    let datas: Vec<u32> = s.routes.routes.lock().unwrap().iter().map(|r| r.1.data).collect();
    assert_eq!(datas, vec![0x60, 0x62, 0x63], "vector 1 masked");
    assert_eq!(s.f.config_read(base + 1), 0xfee0_1000);
    assert!(s.device.config.lock().unwrap()[MSI_CAP + 4..MSI_CAP + 24].iter().all(|b| *b == 0), "the guest's MSI registers never reach the device");
    // Vector 1 signalled while masked: pending reads 1 << 1; unmasking delivers it.
    s.f.msi.as_ref().unwrap().1.eventfd(1).unwrap().write(1).unwrap();
    assert_eq!(s.f.config_read(base + 5), 0b10);
    s.f.config_write(base + 4, 0, &0u32.to_le_bytes());
    assert_eq!(s.f.config_read(base + 5), 0);
    s.router.settle().unwrap();
    assert_eq!(s.routes.routes.lock().unwrap().len(), 4);
    // More messages than capable are clamped.
    s.f.config_write(base, 2, &(1u16 | 7 << 4).to_le_bytes());
    assert_eq!(s.f.config_read(base) >> 20 & 7, 2);
    s.f.config_write(base, 2, &0u16.to_le_bytes());
    s.router.settle().unwrap();
    assert!(s.routes.routes.lock().unwrap().is_empty());
    assert_eq!(s.f.failures(), 0);
}

#[test]
fn intx_is_wired_while_msi_and_msix_are_off() {
    let mut s = setup_with(FakeDevice::with_intx());
    // Device 3 on bus 0, INTA#: the _PRT's GSI, wired at once with a resampler.
    let gsi = arch::pci::intx_gsi(0, 3, 1).unwrap();
    assert_eq!(s.f.config_read(REG_INTERRUPT) >> 8 & 0xff, 1, "pin A");
    assert_eq!(s.f.intx_gsi(), Some(gsi));
    assert_eq!(*s.device.irq_sets.lock().unwrap(), vec![(VFIO_PCI_INTX_IRQ_INDEX, 0, 1)]);
    assert_eq!(*s.device.unmasks.lock().unwrap(), vec![VFIO_PCI_INTX_IRQ_INDEX]);
    assert_eq!(s.routes.intx.lock().unwrap().len(), 1);
    assert_eq!(s.routes.intx.lock().unwrap()[0].0, gsi);
    // The line register is the guest's scratch; the pin is read-only.
    s.f.config_write(REG_INTERRUPT, 0, &[0x0b, 0x04]);
    assert_eq!(s.f.config_read(REG_INTERRUPT) & 0xffff, 0x010b);
    // MSI-X on: INTx off on the device before MSI-X is enabled there (vfio-pci refuses a
    // second type), and off in KVM.
    s.device.irq_sets.lock().unwrap().clear();
    s.f.config_write(MSIX_CAP / 4, 2, &0x8000u16.to_le_bytes());
    assert_eq!(*s.device.irq_sets.lock().unwrap(), vec![(VFIO_PCI_INTX_IRQ_INDEX, 0, 0), (VFIO_PCI_MSIX_IRQ_INDEX, 0, 4)]);
    assert!(s.routes.intx.lock().unwrap().is_empty());
    assert_eq!(s.f.intx_gsi(), None);
    // A table write while MSI-X is on leaves INTx alone.
    program_msix(&mut s.f, 0, 0x41, false);
    assert!(s.device.irq_sets.lock().unwrap().iter().all(|x| x.0 != VFIO_PCI_INTX_IRQ_INDEX || x.2 == 0));
    // MSI-X off: MSI-X disabled on the device first, then INTx wired again.
    s.device.irq_sets.lock().unwrap().clear();
    s.f.config_write(MSIX_CAP / 4, 2, &0u16.to_le_bytes());
    assert_eq!(*s.device.irq_sets.lock().unwrap(), vec![(VFIO_PCI_MSIX_IRQ_INDEX, 0, 0), (VFIO_PCI_INTX_IRQ_INDEX, 0, 1)]);
    assert_eq!(s.f.intx_gsi(), Some(gsi));
    // The same around MSI.
    s.device.irq_sets.lock().unwrap().clear();
    let base = MSI_CAP / 4;
    s.f.config_write(base, 2, &1u16.to_le_bytes());
    s.f.config_write(base, 2, &0u16.to_le_bytes());
    assert_eq!(
        *s.device.irq_sets.lock().unwrap(),
        vec![(VFIO_PCI_INTX_IRQ_INDEX, 0, 0), (VFIO_PCI_MSI_IRQ_INDEX, 0, 1), (VFIO_PCI_MSI_IRQ_INDEX, 0, 0), (VFIO_PCI_INTX_IRQ_INDEX, 0, 1)]
    );
    // Removal takes the line down.
    s.f.disable_interrupts();
    assert!(s.routes.intx.lock().unwrap().is_empty());
    assert_eq!(s.device.irq_sets.lock().unwrap().last(), Some(&(VFIO_PCI_INTX_IRQ_INDEX, 0, 0)));
    assert_eq!(s.f.failures(), 0);
}

#[test]
fn no_intx_index_no_pin() {
    let s = setup();
    let mut f = s.f;
    assert_eq!(f.config_read(REG_INTERRUPT) >> 8 & 0xff, 0, "the device's pin A is not offered without VFIO's INTx");
    assert_eq!(f.intx_gsi(), None);
    assert!(s.routes.intx.lock().unwrap().is_empty());
}

#[test]
fn a_looping_capability_list_ends() {
    let device = FakeDevice::new();
    // MSI's next pointer back to MSI-X.
    device.config.lock().unwrap()[MSI_CAP + 1] = MSIX_CAP as u8;
    let caps = caps::Capabilities::discover(|reg| read_config_dword(&device, reg));
    assert!(caps.msix.is_some() && caps.msi.is_some());
}
