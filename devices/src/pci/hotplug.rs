//! ACPI PCI hotplug: the registers through which the DSDT's AML learns which slots changed and
//! tells siovmm which slots the guest ejected, and the state the device manager drives.
//!
//! The hotplug unit is a slot (a device number on a root bus, with all its functions): Linux's
//! `acpiphp` rescans a slot on a Device Check and ejects a whole slot on an Eject Request
//! (`drivers/pci/hotplug/acpiphp_glue.c`, `hotplug_event`). The platform is hardware-reduced
//! ACPI, so the event reaches the guest through a Generic Event Device (ACPI 6.5 §5.6.9): its
//! interrupt (an IOAPIC pin, edge-triggered, `arch::layout::PCI_HOTPLUG_GSI`) makes the guest
//! run its `_EVT`, which reads this block and notifies each slot whose bit is set
//! (`siovmm_acpi`'s DSDT).
//!
//! Register block (`arch::layout::PCI_HOTPLUG_START`), 16 bytes per root bus `b` at `16 * b`,
//! 32-bit accesses only, bit `d` standing for device number `d`:
//!
//! | offset | name | access |
//! |---|---|---|
//! | 0 | `PCIU` | read: slots to rescan (Device Check), cleared by the read |
//! | 4 | `PCID` | read: slots the guest is asked to eject (Eject Request), cleared by the read |
//! | 8 | `PCEJ` | write: slots the guest has ejected (its `_EJ0`) |
//! | 12 | — | reads 0, writes ignored |
//!
//! Every value is the guest's to choose: unknown offsets, sizes and bits are ignored, never
//! trusted (bits of device numbers siovmm did not ask to eject are recorded but act on nothing
//! until siovmm asks for that slot).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Bytes of registers per root bus.
pub const BUS_STRIDE: u64 = 16;
/// Offset of `PCIU` in a bus's block.
pub const PCIU: u64 = 0;
/// Offset of `PCID` in a bus's block.
pub const PCID: u64 = 4;
/// Offset of `PCEJ` in a bus's block.
pub const PCEJ: u64 = 8;

/// One root bus's slot bits.
#[derive(Debug, Default, Clone, Copy)]
struct BusBits {
    /// Slots to announce (Device Check) at the guest's next read of `PCIU`.
    rescan: u32,
    /// Slots to ask the guest to eject at its next read of `PCID`.
    eject: u32,
    /// Slots siovmm asked to eject and is waiting for.
    awaited: u32,
    /// Slots the guest ejected that siovmm awaited and has not taken yet.
    ejected: u32,
    /// Slots the guest ejected on its own (no request: a user's `echo 0 > power` in its
    /// sysfs), not yet taken by [`HotplugSlots::wait_guest_ejects`].
    unasked: u32,
}

/// The hotplug state of every root bus, shared by the device manager (which announces and
/// asks) and the register block (which the guest's AML reads and writes).
#[derive(Debug)]
pub struct HotplugSlots {
    buses: Mutex<Vec<BusBits>>,
    ejected: Condvar,
    /// The guest runs no more: nobody will answer a request ([`HotplugSlots::stop`]).
    stopped: AtomicBool,
    /// The Generic Event Device's interrupt (a KVM irqfd on its GSI).
    irq: EventFd,
}

fn bit(device: u8) -> u32 {
    1u32 << (device & 31)
}

impl HotplugSlots {
    /// For `root_buses` buses, raising `irq` when the guest has something to read.
    pub fn new(root_buses: u8, irq: EventFd) -> Self {
        Self {
            buses: Mutex::new(vec![BusBits::default(); usize::from(root_buses)]),
            ejected: Condvar::new(),
            stopped: AtomicBool::new(false),
            irq,
        }
    }

    fn update(&self, bus: u8, f: impl FnOnce(&mut BusBits)) -> bool {
        let mut buses = crate::bus::lock(&self.buses);
        match buses.get_mut(usize::from(bus)) {
            Some(b) => {
                f(b);
                true
            }
            None => false,
        }
    }

    fn interrupt(&self) {
        if let Err(e) = self.irq.write(1) {
            log::warn!("pci hotplug: raising the event interrupt: {e}");
        }
    }

    /// Tells the guest that slot `device` of `bus` changed (functions came, or came back):
    /// it rescans the slot and binds drivers to what it finds.
    pub fn announce(&self, bus: u8, device: u8) {
        if self.update(bus, |b| b.rescan |= bit(device)) {
            self.interrupt();
        }
    }

    /// Asks the guest to eject slot `device` of `bus`; [`HotplugSlots::wait_ejected`] waits
    /// for its answer.
    pub fn request_eject(&self, bus: u8, device: u8) {
        let asked = self.update(bus, |b| {
            b.eject |= bit(device);
            b.awaited |= bit(device);
            b.ejected &= !bit(device);
        });
        if asked {
            self.interrupt();
        }
    }

    /// Waits up to `timeout` for the guest to eject slot `device` of `bus` (asked with
    /// [`HotplugSlots::request_eject`]); true when it did. Either way the request is over: a
    /// late eject of that slot is ignored. Ends at once when the guest has stopped.
    pub fn wait_ejected(&self, bus: u8, device: u8, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buses = crate::bus::lock(&self.buses);
        loop {
            let Some(b) = buses.get_mut(usize::from(bus)) else { return false };
            let now = Instant::now();
            if b.ejected & bit(device) != 0 || now >= deadline || self.stopped.load(Ordering::Acquire) {
                let done = b.ejected & bit(device) != 0;
                b.ejected &= !bit(device);
                b.awaited &= !bit(device);
                b.eject &= !bit(device);
                return done;
            }
            buses = match self.ejected.wait_timeout(buses, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The guest runs no more (its VM is stopping): every wait ends now, unanswered, so that a
    /// removal in progress does not hold up the VM's end.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        // Under the lock: a waiter has either seen the flag or is waiting for this.
        let _buses = crate::bus::lock(&self.buses);
        self.ejected.notify_all();
    }

    /// The guest's `_EJ0` wrote `slots` for `bus`: what siovmm awaited ends its wait; the rest
    /// the guest ejected on its own, for [`HotplugSlots::wait_guest_ejects`].
    fn guest_ejected(&self, bus: u8, slots: u32) {
        let mut buses = crate::bus::lock(&self.buses);
        if let Some(b) = buses.get_mut(usize::from(bus)) {
            let awaited = slots & b.awaited;
            if awaited != slots {
                log::info!("pci hotplug: the guest ejected slots {:#x} of bus {bus} on its own", slots & !b.awaited);
            }
            b.ejected |= awaited;
            b.unasked |= slots & !b.awaited;
            self.ejected.notify_all();
        }
    }

    /// Waits until the guest ejects slots nobody asked it to (each returned once, as (bus,
    /// device)), so that the VMM removes what it gave up, as a device pulled from its slot is
    /// gone; `None` once the guest has stopped ([`HotplugSlots::stop`]).
    pub fn wait_guest_ejects(&self) -> Option<Vec<(u8, u8)>> {
        let mut buses = crate::bus::lock(&self.buses);
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return None;
            }
            let mut slots = Vec::new();
            for (bus, b) in buses.iter_mut().enumerate() {
                let unasked = std::mem::take(&mut b.unasked);
                slots.extend((0..32u8).filter(|d| unasked & bit(*d) != 0).map(|d| (bus as u8, d)));
            }
            if !slots.is_empty() {
                return Some(slots);
            }
            buses = self.ejected.wait(buses).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// What the guest reads at `offset` (a read of `PCIU` or `PCID` clears what it returns).
    fn read_register(&self, offset: u64) -> u32 {
        let (bus, register) = (offset / BUS_STRIDE, offset % BUS_STRIDE);
        let Ok(bus) = u8::try_from(bus) else { return 0 };
        let mut value = 0;
        self.update(bus, |b| match register {
            PCIU => value = std::mem::take(&mut b.rescan),
            PCID => value = std::mem::take(&mut b.eject),
            _ => {}
        });
        value
    }
}

/// The register block on the MMIO bus.
#[derive(Debug)]
pub struct HotplugRegisters(pub std::sync::Arc<HotplugSlots>);

impl HotplugRegisters {
    /// Its length for `root_buses` buses.
    pub fn size(root_buses: u8) -> u64 {
        u64::from(root_buses) * BUS_STRIDE
    }
}

impl BusDevice for HotplugRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.0.read_register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return };
        if offset % BUS_STRIDE == PCEJ {
            if let Ok(bus) = u8::try_from(offset / BUS_STRIDE) {
                self.0.guest_ejected(bus, u32::from_le_bytes(bytes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn slots(buses: u8) -> (Arc<HotplugSlots>, HotplugRegisters) {
        let s = Arc::new(HotplugSlots::new(buses, EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (s.clone(), HotplugRegisters(s))
    }

    fn read(r: &mut HotplugRegisters, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn interrupts(s: &HotplugSlots) -> u64 {
        s.irq.read().unwrap_or(0)
    }

    #[test]
    fn an_announced_slot_is_read_once_on_its_bus_with_an_interrupt() {
        let (s, mut r) = slots(3);
        s.announce(2, 5);
        s.announce(2, 31);
        assert_eq!(interrupts(&s), 2);
        assert_eq!(read(&mut r, 0), 0, "bus 0 has nothing");
        assert_eq!(read(&mut r, 2 * BUS_STRIDE + PCIU), 1 << 5 | 1 << 31);
        assert_eq!(read(&mut r, 2 * BUS_STRIDE + PCIU), 0, "cleared by the read");
        // A bus that does not exist: no interrupt, nothing to read.
        s.announce(3, 1);
        assert_eq!(interrupts(&s), 0);
        assert_eq!(read(&mut r, 3 * BUS_STRIDE), 0);
    }

    #[test]
    fn an_eject_is_awaited_until_the_guest_writes_its_slot() {
        let (s, mut r) = slots(2);
        s.request_eject(1, 7);
        assert_eq!(read(&mut r, BUS_STRIDE + PCID), 1 << 7);
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_ejected(1, 7, Duration::from_secs(20)))
        };
        // Another slot's eject (not asked for) and another bus's do not end the wait.
        r.write(BUS_STRIDE + PCEJ, &(1u32 << 8).to_le_bytes());
        r.write(PCEJ, &(1u32 << 7).to_le_bytes());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        r.write(BUS_STRIDE + PCEJ, &(1u32 << 7).to_le_bytes());
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn an_eject_not_answered_in_time_is_over_and_a_late_answer_is_ignored() {
        let (s, mut r) = slots(1);
        s.request_eject(0, 3);
        assert!(!s.wait_ejected(0, 3, Duration::from_millis(10)));
        assert_eq!(read(&mut r, PCID), 0, "the request was withdrawn");
        r.write(PCEJ, &(1u32 << 3).to_le_bytes());
        s.request_eject(0, 3);
        assert!(!s.wait_ejected(0, 3, Duration::from_millis(10)), "the late eject did not count for the next request");
    }

    #[test]
    fn slots_the_guest_ejects_on_its_own_are_handed_over_once() {
        let (s, mut r) = slots(3);
        s.request_eject(1, 7);
        let watcher = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_guest_ejects())
        };
        // The awaited one is the removal's, not the watcher's.
        r.write(BUS_STRIDE + PCEJ, &(1u32 << 7).to_le_bytes());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!watcher.is_finished());
        assert!(s.wait_ejected(1, 7, Duration::from_secs(1)));
        r.write(2 * BUS_STRIDE + PCEJ, &(1u32 << 4 | 1 << 31).to_le_bytes());
        assert_eq!(watcher.join().unwrap(), Some(vec![(2, 4), (2, 31)]));
        // Taken: a second wait sees only what comes next; a bus that does not exist, nothing.
        r.write(9 * BUS_STRIDE + PCEJ, &1u32.to_le_bytes());
        r.write(PCEJ, &1u32.to_le_bytes());
        assert_eq!(s.wait_guest_ejects(), Some(vec![(0, 0)]));
        let watcher = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_guest_ejects())
        };
        s.stop();
        assert_eq!(watcher.join().unwrap(), None, "the guest stopped: nothing more to wait for");
    }

    #[test]
    fn a_stopped_guest_ends_every_wait_at_once() {
        let (s, _) = slots(1);
        s.request_eject(0, 2);
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || (s.wait_ejected(0, 2, Duration::from_secs(600)), Instant::now()))
        };
        std::thread::sleep(Duration::from_millis(20));
        let stopped_at = Instant::now();
        s.stop();
        let (ejected, ended_at) = waiter.join().unwrap();
        assert!(!ejected);
        assert!(ended_at.duration_since(stopped_at) < Duration::from_secs(5));
        assert!(!s.wait_ejected(0, 2, Duration::from_secs(600)), "and later waits do not wait");
    }

    #[test]
    fn odd_accesses_do_nothing() {
        let (s, mut r) = slots(1);
        s.announce(0, 1);
        let mut two = [0xffu8; 2];
        r.read(PCIU, &mut two);
        assert_eq!(two, [0, 0]);
        let mut b = [0xffu8; 4];
        r.read(PCIU + 1, &mut b);
        assert_eq!(b, [0; 4]);
        r.read(u64::MAX - 3, &mut b);
        assert_eq!(b, [0; 4]);
        r.write(u64::MAX - 7, &[1, 0, 0, 0]);
        r.write(PCEJ, &[1, 0]);
        assert_eq!(read(&mut r, PCIU), 1 << 1, "still pending after the odd reads");
    }
}
