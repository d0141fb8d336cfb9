//! Interrupts, free of KVM: what an interrupt message is ([`msi`]), and how a guest vector
//! backed by an eventfd reaches the guest ([`router`]). The KVM side implements
//! [`router::RouteBackend`] and [`IoEvents`] in the `vmm` crate (`kvm_irq`); tests use fakes.

pub mod epoll_thread;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod msi;
pub mod router;

pub use epoll_thread::{EpollThread, Watcher};
pub use msi::{MsiEntry, MsiMessage};
pub use router::{FunctionId, MsiRouter, RouteBackend, VectorKey, VectorSource};

use vmm_sys_util::eventfd::EventFd;

/// Locks `m` even if a thread panicked while holding it: the state stays usable and the VM
/// keeps running (or shuts down cleanly) instead of cascading panics. The workspace's one
/// lock helper: it lives here, in the lowest crate that devices, the device models and the
/// VMM all depend on (`devices::bus::lock` re-exports it).
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`lock`] for the readers of an `RwLock`.
pub fn read_lock<T: ?Sized>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`lock`] for the writer of an `RwLock`.
pub fn write_lock<T: ?Sized>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Guest writes that signal an eventfd without an exit (KVM ioeventfd): doorbells.
pub trait IoEvents: Send + Sync {
    /// `fd` is signalled by every guest write to the MMIO address `addr` (`assign`), or no
    /// longer (`!assign`).
    fn ioeventfd(&self, fd: &EventFd, addr: u64, assign: bool) -> std::io::Result<()>;
}
