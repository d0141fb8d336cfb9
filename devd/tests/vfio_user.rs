//! The daemon's ADIs end to end over a real vfio-user socket, driven by siovmm's own client
//! (`siovmm_vfio::user`) as the VMM drives it: config space, DMA map of a memfd, queue set-up through BAR0, MSI-X
//! vectors bound to eventfds with SET_IRQS, a submission through the doorbell, its completion
//! record in the client's memory and its interrupt on the client's eventfd; then the client
//! leaves and the ADI's IMS entries go back to the device, so a second client gets the ADI.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::unix::net::{UnixListener, UnixStream};

use siovmm_devd::pool::{Limits, Pool};
use siovmm_devd::reactor::{Reactor, MESSAGE_TIMEOUT};
use siovmm_devd::socket_path;
use siovmm_vdcm::adi::registers::reg;
use siovmm_vdcm::adi::{ADI_DEVICE_ID, DOORBELL};
use siovmm_vfio::siov::{AdiId, ImsStorage, SiovDevice};
use siovmm_vfio::soft::descriptor::{flags, opcode, status, Descriptor, COMPLETION_SIZE};
use siovmm_vfio::soft::{SoftSiovDevice, RING_OFFSET};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use siovmm_vfio::pci::VfioBackend;
use siovmm_vfio::user::protocol::{Body, Header, FLAG_ERROR};
use siovmm_vfio::user::UserDevice;
use vmm_sys_util::eventfd::EventFd;

const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 1 << 20;
const QUEUE: u64 = RAM + 0x1000;
const RECORD: u64 = RAM + 0x8000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("siovmm-devd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn memfd(size: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"client-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// A daemon with `adis` ADIs of `vectors` vectors on a device with `ims` entries.
fn daemon(dir: &Path, adis: u32, vectors: u16, ims: u32) -> Arc<dyn SiovDevice> {
    daemon_with(dir, adis, vectors, ims, Limits::default()).0
}

/// [`daemon`] with per-VM limits; also returns its accounting.
fn daemon_with(dir: &Path, adis: u32, vectors: u16, ims: u32, limits: Limits) -> (Arc<dyn SiovDevice>, Arc<Pool>) {
    let device: Arc<dyn SiovDevice> = Arc::new(SoftSiovDevice::new(adis, ims, ImsStorage::OnDevice, 1).unwrap());
    let pool = Arc::new(Pool::new(limits, None));
    serve_all(dir, adis, device.clone(), vectors, pool.clone(), 2);
    (device, pool)
}

/// Serves `adis` ADIs of `device` in `dir` with `threads` server threads, as the daemon does,
/// until the test process ends.
fn serve_all(dir: &Path, adis: u32, device: Arc<dyn SiovDevice>, vectors: u16, pool: Arc<Pool>, threads: usize) -> usize {
    let listeners = (0..adis).map(|adi| (AdiId(adi), UnixListener::bind(socket_path(dir, adi)).unwrap())).collect();
    let reactor = Reactor::start(listeners, device, vectors, pool, threads).unwrap();
    let threads = reactor.threads();
    std::thread::spawn(move || reactor.join());
    threads
}

fn write32(c: &UserDevice, offset: u64, value: u32) {
    c.region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, &value.to_le_bytes());
}

fn read32(c: &UserDevice, region: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, offset, &mut b);
    u32::from_le_bytes(b)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How a session rings the doorbell.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ring {
    /// A REGION_WRITE to BAR0's doorbell.
    RegionWrite,
    /// The ioeventfd the daemon offers for it (as KVM signals it on a guest's write).
    IoEventFd,
}

/// One client's whole session on `path`: returns the interrupts its vector 1 took.
fn session(path: &Path, ring: Ring) -> u64 {
    let c = UserDevice::connect(path).unwrap();
    let config = read32(&c, VFIO_PCI_CONFIG_REGION_INDEX, 0);
    assert_eq!(config >> 16, u32::from(ADI_DEVICE_ID), "device ID in the config region");
    assert_eq!(c.region(VFIO_PCI_BAR0_REGION_INDEX).size, 0x8000);
    assert_eq!(c.irq_count(VFIO_PCI_MSIX_IRQ_INDEX), 2);

    let ram = memfd(RAM_SIZE);
    c.dma_map(RAM, RAM_SIZE, ram.as_raw_fd(), 0).unwrap();
    let caps = read32(&c, VFIO_PCI_BAR0_REGION_INDEX, reg::CAPS);
    assert_eq!(caps >> 16, 2, "two vectors = two interrupt handles");

    let irqs = [EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()];
    // Refused by the daemon (vectors 1-2 of a 2-vector table): an error, and the connection
    // carries on.
    assert!(c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 1, &[&irqs[0], &irqs[1]]).is_err());
    c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[&irqs[0], &irqs[1]]).unwrap();

    write32(&c, reg::QUEUE_BASE_LO, QUEUE as u32);
    write32(&c, reg::QUEUE_BASE_HI, 0);
    write32(&c, reg::QUEUE_SIZE, 8);
    write32(&c, reg::CONTROL, 1);
    assert_eq!(read32(&c, VFIO_PCI_BAR0_REGION_INDEX, reg::STATUS), 1, "queue enabled");

    // A NOOP asking for a completion record and an interrupt on handle 1.
    let d = Descriptor {
        opcode: opcode::NOOP,
        flags: flags::CRAV | flags::RCR | flags::RCI,
        completion_addr: RECORD,
        int_handle: 1,
        ..Default::default()
    };
    ram.write_all_at(&d.encode(), QUEUE - RAM + RING_OFFSET).unwrap();
    ram.write_all_at(&1u32.to_le_bytes(), QUEUE - RAM).unwrap();
    let doorbells = c.io_eventfds(VFIO_PCI_BAR0_REGION_INDEX).unwrap();
    assert_eq!(doorbells.iter().map(|d| (d.offset, d.size)).collect::<Vec<_>>(), vec![(DOORBELL, 8)], "the doorbell, offered as an ioeventfd");
    match ring {
        Ring::RegionWrite => write32(&c, DOORBELL, 1),
        Ring::IoEventFd => doorbells[0].fd.write(1).unwrap(),
    }
    wait_for("the completion record", || {
        let mut b = [0u8; COMPLETION_SIZE];
        ram.read_exact_at(&mut b, RECORD - RAM).unwrap();
        b[0] == status::SUCCESS
    });
    let mut taken = 0;
    wait_for("the completion interrupt", || {
        taken += irqs[1].read().unwrap_or(0);
        taken > 0
    });
    assert_eq!(irqs[0].read().ok(), None, "vector 0 was not asked for");
    c.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert!(!c.broken());
    assert_eq!(c.failures(), 1, "the refused SET_IRQS only");
    taken
}

#[test]
fn a_client_submits_and_takes_its_interrupt_then_the_next_client_gets_the_adi() {
    let dir = TempDir::new("e2e");
    // Exactly enough IMS entries for one ADI's two vectors: the second session can open the
    // ADI only if the first one's entries went back to the device.
    let device = daemon(&dir.0, 1, 2, 2);
    let path = socket_path(&dir.0, 0);
    assert_eq!(session(&path, Ring::IoEventFd), 1);
    assert_eq!(session(&path, Ring::RegionWrite), 1, "the ADI and its IMS entries came back when the first client left");
    drop(device);
}

#[test]
fn a_taken_adi_refuses_other_clients_and_one_vmms_adis_share_a_doorbell() {
    let dir = TempDir::new("taken");
    let soft = Arc::new(SoftSiovDevice::new(3, 8, ImsStorage::OnDevice, 1).unwrap().share_doorbells(8));
    serve_all(&dir.0, 3, soft.clone(), 2, Arc::new(Pool::new(Limits::default(), None)), 2);
    let held = UserDevice::connect(&socket_path(&dir.0, 1)).unwrap();
    // Served: the ADI's listening socket is closed while this client has it.
    let refused = UnixStream::connect(socket_path(&dir.0, 1)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    assert_eq!(soft.doorbell_fds(), 1);
    // Another ADI of the same VMM (this process) rings the same eventfd: its submission runs,
    // and the pass of the held, idle ADI that the ring also costs finds nothing.
    assert_eq!(session(&socket_path(&dir.0, 0), Ring::IoEventFd), 1);
    assert_eq!(soft.doorbell_fds(), 1, "ADI 0's doorbell was ADI 1's; ADI 1 still holds it");
    drop(held);
    // Given back: bound again, and the next client is served (its connect tried again while
    // the daemon rebinds).
    assert_eq!(session(&socket_path(&dir.0, 1), Ring::IoEventFd), 1);
    wait_for("the last doorbell to close", || soft.doorbell_fds() == 0);
}

#[test]
fn a_mapped_portal_page_rings_the_doorbell_with_a_plain_store() {
    use siovmm_vfio::siov::PortalKind;
    let dir = TempDir::new("mapped");
    let soft = Arc::new(SoftSiovDevice::with_portals(2, 8, ImsStorage::OnDevice, 1, PortalKind::Mapped).unwrap());
    serve_all(&dir.0, 2, soft.clone(), 2, Arc::new(Pool::new(Limits::default(), None)), 1);
    // ADI 1: its page is not the file's first.
    let c = UserDevice::connect(&socket_path(&dir.0, 1)).unwrap();
    assert!(c.region(VFIO_PCI_BAR0_REGION_INDEX).mmap, "BAR0 offered for mmap");
    assert!(!c.region(VFIO_PCI_CONFIG_REGION_INDEX).mmap);
    let maps = c.map_region(VFIO_PCI_BAR0_REGION_INDEX).unwrap();
    assert_eq!(maps.iter().map(|m| (m.offset(), m.len())).collect::<Vec<_>>(), vec![(DOORBELL, 0x1000)], "the doorbell page only");
    assert!(c.map_region(VFIO_PCI_BAR0_REGION_INDEX).unwrap().is_empty(), "mapped once; its file closed");
    let ram = memfd(RAM_SIZE);
    c.dma_map(RAM, RAM_SIZE, ram.as_raw_fd(), 0).unwrap();
    let irqs = [EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()];
    c.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[&irqs[0], &irqs[1]]).unwrap();
    write32(&c, reg::QUEUE_BASE_LO, QUEUE as u32);
    write32(&c, reg::QUEUE_BASE_HI, 0);
    write32(&c, reg::QUEUE_SIZE, 8);
    write32(&c, reg::CONTROL, 1);
    for round in 1..=2u32 {
        let d = Descriptor { opcode: opcode::NOOP, flags: flags::CRAV | flags::RCR | flags::RCI, completion_addr: RECORD, int_handle: 1, ..Default::default() };
        ram.write_all_at(&[0u8; COMPLETION_SIZE], RECORD - RAM).unwrap();
        ram.write_all_at(&d.encode(), QUEUE - RAM + RING_OFFSET + u64::from(round - 1) * 64).unwrap();
        ram.write_all_at(&round.to_le_bytes(), QUEUE - RAM).unwrap();
        // What a guest's store to BAR0 + 0x1000 does once the page is mapped there.
        let word = maps[0].host(0).unwrap().cast::<u32>();
        // SAFETY: the first word of a page this test mapped; the device swaps it atomically.
        unsafe { std::ptr::write_volatile(word, 1) };
        wait_for("the completion record", || {
            let mut b = [0u8; COMPLETION_SIZE];
            ram.read_exact_at(&mut b, RECORD - RAM).unwrap();
            b[0] == status::SUCCESS
        });
        wait_for("the completion interrupt", || irqs[1].read().is_ok());
    }
    assert_eq!(soft.portal_rings(), 2, "both rings came through the page, none by message");
}

/// MSI-X message control reads back the enable and function-mask bits the client wrote, as
/// kernel vfio-pci's virtualized config space does (a client passing the guest's
/// read-modify-write through would otherwise disable MSI-X when Linux clears the mask).
#[test]
fn msix_control_reads_back_what_the_client_wrote() {
    use siovmm_devd::adi::AdiBackend;
    use vfio_user::ServerBackend;
    const CONTROL: u64 = 0x42; // the MSI-X capability at 0x40
    let device: Arc<dyn SiovDevice> = Arc::new(SoftSiovDevice::new(1, 4, ImsStorage::OnDevice, 1).unwrap());
    let mut b = AdiBackend::open(device, AdiId(0), 4, Some(1)).unwrap();
    let control = |b: &mut AdiBackend| {
        let mut c = [0u8; 2];
        b.region_read(VFIO_PCI_CONFIG_REGION_INDEX, CONTROL, &mut c).unwrap();
        u16::from_le_bytes(c)
    };
    assert_eq!(control(&mut b), 3, "table size 4, disabled");
    for (write, read) in [(0xc000u16, 0xc003u16), (0x8000, 0x8003), (0x07ff, 0x0003)] {
        b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, CONTROL, &write.to_le_bytes()).unwrap();
        assert_eq!(control(&mut b), read, "after writing {write:#x}: the table size is the device's");
    }
}

#[test]
fn hostile_requests_are_refused_and_the_adi_keeps_working() {
    use siovmm_devd::adi::AdiBackend;
    use vfio_user::{DmaMapFlags, ServerBackend};

    // The backend directly, where each refusal is visible (the crate's client ignores a
    // reply's error flag and then waits for data that never comes).
    let device: Arc<dyn SiovDevice> = Arc::new(SoftSiovDevice::new(1, 2, ImsStorage::OnDevice, 1).unwrap());
    let mut b = AdiBackend::open(device.clone(), AdiId(0), 2, Some(1)).unwrap();
    assert!(AdiBackend::open(device.clone(), AdiId(0), 2, Some(1)).is_err(), "the ADI is taken");
    let mut buf = [0u8; 8];
    assert!(b.region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x7ffc, &mut buf).is_err(), "past BAR0's end");
    assert!(b.region_read(5, 0, &mut buf).is_err(), "a region the ADI does not have");
    assert!(b.region_write(VFIO_PCI_CONFIG_REGION_INDEX, u64::MAX - 2, &[1, 2, 3, 4]).is_err(), "offset wraps");
    let ram = memfd(0x3000);
    let fd = || Some(ram.try_clone().unwrap());
    assert!(b.dma_map(DmaMapFlags::READ_WRITE, 0, 0x1001, 0x1000, fd()).is_err(), "unaligned");
    assert!(b.dma_map(DmaMapFlags::READ_WRITE, 0x2000, !0xfff_u64, 0x2000, fd()).is_err(), "wraps");
    assert!(b.dma_map(DmaMapFlags::READ_WRITE, 0, 0x1000, 0x1000, None).is_err(), "no descriptor");
    // SAFETY: each descriptor is a fresh eventfd whose ownership moves into the File.
    let eventfds = |n: usize| (0..n).map(|_| unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(EventFd::new(0).unwrap())) }).collect::<Vec<_>>();
    let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert!(b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trigger, 1, 3, eventfds(3)).is_err(), "vectors past the table");
    assert!(b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trigger, u32::MAX, 1, eventfds(1)).is_err(), "start + count wraps");
    assert!(b.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, trigger, 0, 2, eventfds(1)).is_err(), "fewer descriptors than vectors");
    assert!(b.set_irqs(0, trigger, 0, 1, eventfds(1)).is_err(), "INTx: the ADI has none");
    assert_eq!(b.bound_vectors(), 0, "nothing bound by the refused requests");
    let write = |b: &mut AdiBackend, offset: u64, v: u32| b.region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, &v.to_le_bytes());
    write(&mut b, reg::QUEUE_BASE_LO, 0xdead_0000).unwrap();
    write(&mut b, reg::QUEUE_SIZE, 3).unwrap();
    write(&mut b, reg::CONTROL, 1).unwrap();
    let mut status = [0u8; 4];
    b.region_read(VFIO_PCI_BAR0_REGION_INDEX, reg::STATUS, &mut status).unwrap();
    assert_eq!(u32::from_le_bytes(status), 2, "enable refused: bad base and size");
    write(&mut b, DOORBELL, 1).unwrap();
    drop(b);

    // Served over a socket after all that, the ADI works for a well-behaved client.
    let dir = TempDir::new("hostile");
    serve_all(&dir.0, 1, device, 2, Arc::new(Pool::new(Limits::default(), None)), 1);
    assert_eq!(session(&socket_path(&dir.0, 0), Ring::IoEventFd), 1);
}

/// Many sockets, few threads: 500 ADIs served by 2 threads (the daemon's default), sessions
/// on ADIs spread over them at once, each with its submission and interrupt; then a client
/// that sends half a message holds one of only one server thread for at most
/// MESSAGE_TIMEOUT, and loses its connection, while a session on another ADI completes.
#[test]
fn a_few_threads_serve_hundreds_of_adis_and_a_stalled_client_holds_none_for_long() {
    let dir = TempDir::new("many");
    let device: Arc<dyn SiovDevice> = Arc::new(SoftSiovDevice::new(500, 1000, ImsStorage::OnDevice, 1).unwrap());
    let pool = Arc::new(Pool::new(Limits::default(), None));
    assert_eq!(serve_all(&dir.0, 500, device, 2, pool.clone(), 2), 2);
    let sessions: Vec<_> = [0u32, 137, 256, 499]
        .into_iter()
        .map(|adi| {
            let path = socket_path(&dir.0, adi);
            std::thread::spawn(move || session(&path, Ring::IoEventFd))
        })
        .collect();
    for s in sessions {
        assert_eq!(s.join().unwrap(), 1);
    }
    wait_for("every ADI back in the pool", || pool.totals().0 == 0);

    let dir = TempDir::new("stalled");
    let device: Arc<dyn SiovDevice> = Arc::new(SoftSiovDevice::new(2, 4, ImsStorage::OnDevice, 1).unwrap());
    let pool = Arc::new(Pool::new(Limits::default(), None));
    assert_eq!(serve_all(&dir.0, 2, device, 2, pool.clone(), 1), 1);
    let stalled = UnixStream::connect(socket_path(&dir.0, 0)).unwrap();
    wait_for("the stalled client's ADI open", || pool.totals().0 == 1);
    {
        use std::io::Write;
        // Half a header, then nothing.
        (&stalled).write_all(&[0u8; 8]).unwrap();
    }
    let start = Instant::now();
    assert_eq!(session(&socket_path(&dir.0, 1), Ring::IoEventFd), 1);
    let took = start.elapsed();
    assert!(took < MESSAGE_TIMEOUT * 5, "a whole session behind a stalled client took {took:?}");
    // The stalled connection was ended: the server closed it, and its ADI serves again.
    let mut byte = [0u8; 1];
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(std::io::Read::read(&mut &stalled, &mut byte).unwrap(), 0, "closed by the server");
    assert_eq!(session(&socket_path(&dir.0, 0), Ring::IoEventFd), 1);
}

/// Sends one raw message and reads the reply's header and payload.
fn raw_request(stream: &UnixStream, id: u16, command: u16, size: u32, body: &[u8]) -> std::io::Result<(Header, Vec<u8>)> {
    use std::io::{Read, Write};
    let header = Header { id, command, size, flags: 0, error: 0 };
    (&*stream).write_all(&[&header.encode()[..], body].concat())?;
    let mut raw = [0u8; 16];
    (&*stream).read_exact(&mut raw)?;
    let reply = Header::decode(&raw);
    let mut payload = vec![0u8; (reply.size as usize).saturating_sub(16)];
    (&*stream).read_exact(&mut payload)?;
    Ok((reply, payload))
}

#[test]
fn malformed_messages_are_refused_and_the_connection_stays_in_step() {
    let dir = TempDir::new("malformed");
    let device = daemon(&dir.0, 1, 2, 2);
    let stream = UnixStream::connect(socket_path(&dir.0, 0)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let refused = |(h, _): (Header, Vec<u8>)| (h.flags & FLAG_ERROR != 0).then_some(h.error as i32);
    // VERSION whose JSON has no NUL (the crate's server panics on it): answered.
    let (reply, payload) = raw_request(&stream, 1, 1, 16 + 6, &[0, 0, 1, 0, b'{', b'}']).unwrap();
    assert_eq!((reply.id, reply.flags & FLAG_ERROR), (1, 0));
    assert!(String::from_utf8_lossy(&payload).contains("max_msg_fds"));
    // A command nobody knows.
    assert_eq!(refused(raw_request(&stream, 2, 99, 16, &[]).unwrap()), Some(libc::ENOSYS));
    // REGION_READ of 4 GiB - 1 bytes: refused before anything is allocated.
    let read = |count: u32| Body::default().u64(0).u32(0).u32(count).0;
    assert_eq!(refused(raw_request(&stream, 3, 9, 32, &read(u32::MAX)).unwrap()), Some(libc::E2BIG));
    // A region the device does not have, with a body that must be skipped whole.
    let write = Body::default().u64(0).u32(42).u32(4).u32(0xdead_beef).0;
    assert_eq!(refused(raw_request(&stream, 4, 10, 36, &write).unwrap()), Some(libc::EINVAL));
    // A REGION_WRITE whose count disagrees with its data.
    let write = Body::default().u64(0).u32(0).u32(64).u32(1).0;
    assert_eq!(refused(raw_request(&stream, 5, 10, 36, &write).unwrap()), Some(libc::EINVAL));
    // A body too short for its command.
    assert_eq!(refused(raw_request(&stream, 6, 7, 20, &[0; 4]).unwrap()), Some(libc::EINVAL));
    // Still in step: a good read gets its own reply.
    let (reply, payload) = raw_request(&stream, 7, 9, 32, &Body::default().u64(0).u32(7).u32(4).0).unwrap();
    assert_eq!((reply.id, reply.flags), (7, 1));
    assert_eq!(u32::from_le_bytes(payload[16..20].try_into().unwrap()) >> 16, u32::from(ADI_DEVICE_ID));
    // A size no message can have ends the connection (nothing after it can be parsed).
    assert!(raw_request(&stream, 8, 9, u32::MAX, &[]).is_err());
    drop(stream);
    // The ADI is served again to the next client.
    assert_eq!(session(&socket_path(&dir.0, 0), Ring::RegionWrite), 1);
    drop(device);
}

/// The errno a refused connection attempt reports.
fn refusal(path: &Path) -> Option<i32> {
    use siovmm_vfio::user::Error;
    match UserDevice::connect(path) {
        Err(Error::Refused(_, e)) => e.raw_os_error(),
        Err(e) => panic!("not a refusal: {e}"),
        Ok(_) => None,
    }
}

#[test]
fn exhaustion_and_per_vm_limits_are_clear_refusals_and_leaving_frees_everything() {
    let dir = TempDir::new("limits");
    // 3 IMS entries: one 2-vector ADI fits, a second does not.
    let (_device, pool) = daemon_with(&dir.0, 3, 2, 3, Limits::default());
    let first = UserDevice::connect(&socket_path(&dir.0, 0)).unwrap();
    assert_eq!(refusal(&socket_path(&dir.0, 1)), Some(libc::ENOSPC), "IMS exhausted");
    wait_for("the refused ADI's accounting back", || pool.totals() == (1, 2, 1));
    drop(first);
    wait_for("the first ADI back in the pool", || pool.totals() == (0, 0, 0));
    assert_eq!(refusal(&socket_path(&dir.0, 1)), None, "its IMS entries serve another ADI");

    let dir = TempDir::new("per-vm");
    let (_device, pool) = daemon_with(&dir.0, 3, 2, 64, Limits { adis_per_vm: Some(2), ims_per_vm: None });
    let a = UserDevice::connect(&socket_path(&dir.0, 0)).unwrap();
    let b = UserDevice::connect(&socket_path(&dir.0, 1)).unwrap();
    assert_eq!(refusal(&socket_path(&dir.0, 2)), Some(libc::EDQUOT), "a third ADI for the same VMM");
    assert_eq!(pool.totals(), (2, 4, 1));
    drop((a, b));
    wait_for("both ADIs back", || pool.totals() == (0, 0, 0));
}

/// The `siovmm-devd` binary as run, under its seccomp filters (on by default): every thread
/// has entered one, two whole sessions (each ring kind) and a malformed message are served,
/// and the daemon is still up afterwards; then the same with `--seccomp off`, where no thread
/// has a filter.
#[test]
fn the_daemon_binary_serves_under_its_seccomp_filters() {
    for (mode, filtered) in [(None, true), (Some("off"), false)] {
        let dir = TempDir::new(&format!("seccomp-{}", mode.unwrap_or("on")));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_siovmm-devd"));
        cmd.args(["--socket-dir", dir.0.to_str().unwrap(), "--adis", "2", "--vectors", "2", "--ims-entries", "4"]);
        if let Some(m) = mode {
            cmd.args(["--seccomp", m]);
        }
        // What a daemon killed in this directory leaves: its sockets (no one listening) and its
        // status file, which name nothing about the next daemon.
        for adi in 0..2 {
            drop(std::os::unix::net::UnixListener::bind(socket_path(&dir.0, adi)).unwrap());
        }
        std::fs::write(dir.0.join("status"), "pid 1\nadis_open 0\n").unwrap();
        let mut daemon = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
        let path = socket_path(&dir.0, 0);
        // Every socket bound and listening once the status file names this daemon: a client
        // connecting now waits in the backlog until the server threads accept. (A probe by
        // connecting would take the ADI, and close its socket, for a moment.)
        wait_for("the daemon to serve", || siovmm_devd::serving(&dir.0, daemon.id()));
        assert_eq!(session(&path, Ring::IoEventFd), 1);
        assert_eq!(session(&path, Ring::RegionWrite), 1);
        // The directory is this daemon's: a second one is refused in one line.
        let second = std::process::Command::new(env!("CARGO_BIN_EXE_siovmm-devd")).args(["--socket-dir", dir.0.to_str().unwrap()]).output().unwrap();
        assert_eq!(second.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&second.stderr), format!("siovmm-devd: {}: another siovmm-devd serves this directory\n", dir.0.display()));
        let stream = UnixStream::connect(socket_path(&dir.0, 1)).unwrap();
        assert!(raw_request(&stream, 1, 0x7777, 16, &[]).is_ok_and(|(h, _)| h.flags & FLAG_ERROR != 0), "an unknown command is refused");
        drop(stream);
        // The main thread enters its filter just after the servers start: the census is taken
        // once every thread has settled (or at the deadline, where the assertions say what
        // did not).
        let want = if filtered { "2 1" } else { "0 0" };
        let census = siovmm_seccomp::thread_filters_settled(daemon.id(), Duration::from_secs(10), |c| c.iter().all(|(_, s)| s == want));
        let alive = daemon.try_wait().unwrap().is_none();
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        assert!(alive, "the daemon died: {census:?}");
        let names: Vec<&str> = census.iter().map(|(n, _)| n.as_str()).collect();
        for expected in ["siovmm-devd", "devd-server0", "devd-server1", "siov-worker0", "siov-worker1"] {
            assert!(names.contains(&expected), "no {expected} thread: {census:?}");
        }
        assert!(census.iter().all(|(_, s)| s == want), "seccomp mode and filter count per thread: {census:?}");
    }
}

/// The IMS mailbox (docs/devd.md, "IMS for enlightened guests") end to end, as siovmm uses it
/// for a guest's IMS hypercalls: the client finds the region by its type, takes slots (counted
/// against its VMM's IMS limit), binds a slot's entry to its eventfd, gets the host message; a
/// descriptor naming the slot's interrupt handle (MSI-X vectors + slot) raises nothing while
/// the slot is masked and once on unmask; a freed slot's handle raises nothing; the slots the
/// client held come back when it leaves.
#[test]
fn the_ims_mailbox_gives_a_client_slots_that_deliver() {
    use siovmm_hypercall::Status;
    use siovmm_vfio::user::ims_mailbox::{Offer, Request, SlotState, IRQ_INDEX, REGION_INDEX};
    let dir = TempDir::new("mailbox");
    let (_, pool) = daemon_with(&dir.0, 1, 2, 64, Limits { adis_per_vm: None, ims_per_vm: Some(2 + 8) });
    let c = UserDevice::connect(&socket_path(&dir.0, 0)).unwrap();
    assert_eq!(c.ims_mailbox(), Some(REGION_INDEX));
    let offer = Offer::decode(c.ims_request(Request::Query).unwrap());
    assert_eq!(offer, Offer { slots_per_adi: siovmm_vdcm::adi::MAX_PV_SLOTS, in_queue: false });
    assert_eq!(c.irq_count(IRQ_INDEX), 0, "siovmm's client reads only the PCI interrupt indexes");
    assert_eq!(c.ims_request(Request::Alloc { count: 9 }), Err(Status::Exhausted), "the VMM's IMS limit: 2 vectors + 8");
    assert_eq!(c.ims_request(Request::Alloc { count: 0 }), Err(Status::InvalidArgument));
    assert_eq!(c.ims_request(Request::Alloc { count: 4 }), Ok(0));
    assert_eq!(c.ims_request(Request::Alloc { count: 4 }), Ok(4));
    assert_eq!(pool.totals(), (1, 10, 1));
    assert_eq!(c.ims_request(Request::Alloc { count: 1 }), Err(Status::Exhausted));
    assert_eq!(c.ims_request(Request::Free { first: 4 }), Ok(0));
    assert_eq!(pool.totals(), (1, 6, 1), "the freed group counts no more");
    assert_eq!(c.ims_request(Request::Message { slot: 4 }), Err(Status::NoSuchSlot), "freed");
    let slot_fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert!(c.ims_bind(7, &slot_fd).is_err(), "not a live slot");
    c.ims_bind(3, &slot_fd).unwrap();
    let host = c.ims_request(Request::Message { slot: 3 }).unwrap();
    assert_eq!(host & 0xfff0_0000, 0xfee0_0000, "a host MSI message: {host:#x}");

    let ram = memfd(RAM_SIZE);
    c.dma_map(RAM, RAM_SIZE, ram.as_raw_fd(), 0).unwrap();
    write32(&c, reg::QUEUE_BASE_LO, QUEUE as u32);
    write32(&c, reg::QUEUE_BASE_HI, 0);
    write32(&c, reg::QUEUE_SIZE, 8);
    write32(&c, reg::CONTROL, 1);
    let doorbell = c.io_eventfds(VFIO_PCI_BAR0_REGION_INDEX).unwrap().remove(0).fd;
    let mut tail = 0u32;
    let mut submit = |handle: u32| {
        let d = Descriptor { opcode: opcode::NOOP, flags: flags::CRAV | flags::RCR | flags::RCI, completion_addr: RECORD, int_handle: handle as u16, ..Default::default() };
        ram.write_all_at(&[0u8; COMPLETION_SIZE], RECORD - RAM).unwrap();
        ram.write_all_at(&d.encode(), QUEUE - RAM + RING_OFFSET + u64::from(tail % 8) * 64).unwrap();
        tail += 1;
        ram.write_all_at(&tail.to_le_bytes(), QUEUE - RAM).unwrap();
        doorbell.write(1).unwrap();
        wait_for("the completion record", || {
            let mut b = [0u8; COMPLETION_SIZE];
            ram.read_exact_at(&mut b, RECORD - RAM).unwrap();
            b[0] != 0
        });
        let mut b = [0u8; COMPLETION_SIZE];
        ram.read_exact_at(&mut b, RECORD - RAM).unwrap();
        b[0]
    };
    // Slot 3 is interrupt handle 2 + 3; new slots are masked.
    assert_eq!(submit(5), status::SUCCESS);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(slot_fd.read().ok(), None, "masked: nothing raised");
    let state = |slot| c.ims_request(Request::State { slot }).map(SlotState::decode);
    assert_eq!(state(3), Ok(SlotState { pending: true, handle: 5 }), "what a trapped window's control word reports");
    assert_eq!(state(4), Err(Status::NoSuchSlot), "freed");
    assert_eq!(c.ims_request(Request::Mask { slot: 3, masked: false }), Ok(0));
    wait_for("the pending interrupt, on unmask", || slot_fd.read().is_ok());
    assert_eq!(state(3), Ok(SlotState { pending: false, handle: 5 }), "delivered");
    assert_eq!(submit(5), status::SUCCESS);
    wait_for("the slot's interrupt", || slot_fd.read().is_ok());
    assert_eq!(c.ims_request(Request::Free { first: 0 }), Ok(0));
    assert_ne!(submit(5), status::SUCCESS, "a freed slot's handle is revoked");
    assert_eq!(slot_fd.read().ok(), None);
    assert_eq!(pool.totals(), (1, 2, 1));
    assert_eq!(c.ims_request(Request::Alloc { count: 8 }), Ok(0), "the numbers are reused");
    drop(c);
    wait_for("the ADI and its slots back in the pool", || pool.totals() == (0, 0, 0));
}
