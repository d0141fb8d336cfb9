//! How a device or vCPU asks the VMM to stop the VM, and why.
//!
//! The first reason recorded wins; the event fd wakes the VMM's event loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042 pulse).
    Reset,
    /// The user interrupted siovmm (SIGINT/SIGTERM).
    Interrupted(i32),
    /// The VM failed; the text says what happened and where.
    Failed(String),
}

impl ExitReason {
    /// Process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset => 0,
            ExitReason::Interrupted(sig) => 128 + sig,
            ExitReason::Failed(_) => 1,
        }
    }
}

/// Shared between the event loop, vCPUs and devices.
#[derive(Debug)]
pub struct ShutdownSignal {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
    /// Mirrors `reason.is_some()` so vCPUs can check it on every exit without a lock.
    requested: AtomicBool,
}

impl ShutdownSignal {
    /// A signal with nothing requested yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { evt: EventFd::new(libc::EFD_NONBLOCK)?, reason: Mutex::new(None), requested: AtomicBool::new(false) })
    }

    /// Requests the VM to stop; later requests do not override the first.
    pub fn request(&self, reason: ExitReason) {
        let mut r = crate::bus::lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        self.requested.store(true, Ordering::Release);
        // A full eventfd counter still wakes the loop, so the error can be ignored.
        let _ = self.evt.write(1);
    }

    /// Whether a stop has been requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        crate::bus::lock(&self.reason).clone()
    }

    /// The fd that becomes readable once a stop is requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ShutdownSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Failed("x".into()));
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_eq!(ExitReason::Interrupted(2).exit_code(), 130);
        assert_eq!(ExitReason::Failed("triple fault".into()).exit_code(), 1);
    }
}
