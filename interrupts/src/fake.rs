//! A routing table as KVM would hold it, for tests of anything that routes interrupts (the
//! router itself, the VDCM's ADIs, the VFIO function model): no /dev/kvm. Built for this
//! crate's tests and, with the `test-util` feature, for other crates' tests.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::{MsiMessage, RouteBackend};

/// KVM's side of routing, recorded. It enforces the ordering rule the router promises (an
/// irqfd is bound or unbound only on a GSI that has a route), and refuses every routing-table
/// change while `refuse` is set (as KVM does when out of memory).
#[derive(Debug, Default)]
pub struct FakeRoutes {
    /// The table as last committed: (GSI, message).
    pub routes: Mutex<Vec<(u32, MsiMessage)>>,
    /// Bound irqfds by GSI.
    pub irqfds: Mutex<HashMap<u32, i32>>,
    /// Messages injected with KVM_SIGNAL_MSI.
    pub injected: Mutex<Vec<MsiMessage>>,
    /// One line per commit ("routes N").
    pub log: Mutex<Vec<String>>,
    /// Refuse routing-table changes.
    pub refuse: AtomicBool,
    /// Refuse binding irqfds (as KVM does for an eventfd bound elsewhere, EBUSY).
    pub refuse_irqfd: AtomicBool,
    /// Bound INTx irqfds: (GSI, fd, resample fd).
    pub intx: Mutex<Vec<(u32, i32, i32)>>,
}

impl FakeRoutes {
    /// Forgets the records of past commits and injections (the table itself stays): a fake
    /// kept for a whole fuzzing run would otherwise grow without end.
    pub fn forget_history(&self) {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.injected.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// The messages routed now, in GSI order.
    pub fn messages(&self) -> Vec<MsiMessage> {
        self.routes.lock().unwrap().iter().map(|r| r.1).collect()
    }
}

impl RouteBackend for FakeRoutes {
    fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()> {
        if self.refuse.load(Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        *self.routes.lock().unwrap() = routes.to_vec();
        self.log.lock().unwrap().push(format!("routes {}", routes.len()));
        Ok(())
    }

    fn irqfd(&self, fd: &EventFd, gsi: u32, assign: bool) -> std::io::Result<()> {
        let routed = self.routes.lock().unwrap().iter().any(|r| r.0 == gsi);
        assert!(routed, "irqfd {} on gsi {gsi} without a route", if assign { "bound" } else { "unbound" });
        if assign && self.refuse_irqfd.load(Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        if assign {
            self.irqfds.lock().unwrap().insert(gsi, fd.as_raw_fd());
        } else {
            self.irqfds.lock().unwrap().remove(&gsi);
        }
        Ok(())
    }

    fn signal_msi(&self, msg: MsiMessage) -> std::io::Result<()> {
        self.injected.lock().unwrap().push(msg);
        Ok(())
    }

    fn intx_irqfd(&self, fd: &EventFd, resample: Option<&EventFd>, gsi: u32) -> std::io::Result<()> {
        let mut intx = self.intx.lock().unwrap();
        match resample {
            Some(r) => {
                // KVM refuses the same eventfd twice (EBUSY).
                if intx.iter().any(|b| b.1 == fd.as_raw_fd()) {
                    return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
                }
                intx.push((gsi, fd.as_raw_fd(), r.as_raw_fd()));
            }
            None => {
                let before = intx.len();
                intx.retain(|b| !(b.0 == gsi && b.1 == fd.as_raw_fd()));
                if intx.len() == before {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
                }
            }
        }
        Ok(())
    }
}
