//! The allow-list of each thread kind (x86-64 system call numbers). Lists were taken from
//! what each thread really calls (strace of a VM with ADIs, VFIO and vfio-user devices, and of
//! the device daemon) and kept to what the code explains; docs/seccomp.md gives the reasons.
//!
//! Argument checks where they narrow a call that would otherwise hand a thread much more:
//! `mmap`/`mprotect` never with `PROT_EXEC` (no thread loads code once it runs), `ioctl` only
//! within the request families a kind uses (the type byte, bits 8..16: KVM, VFIO, terminal),
//! `tgkill` only within siovmm's own process.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule,
};

use crate::ThreadKind;

/// `ioctl` request families by type byte (include/uapi/linux/kvm.h KVMIO 0xAE,
/// include/uapi/linux/vfio.h VFIO_TYPE ';', include/uapi/asm-generic/ioctls.h 'T' for TCGETS,
/// TCSETS, FIONBIO, FIOCLEX).
const IOCTL_KVM: u64 = 0xAE;
const IOCTL_VFIO: u64 = b';' as u64;
const IOCTL_TERMINAL: u64 = b'T' as u64;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A passed-through device's slow path: VFIO region reads and writes, vfio-user requests
/// (file descriptors travel with them), and the eventfds of vectors the guest programs.
const DEVICE_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
];

/// Waiting on an epoll set and changing it.
const EPOLL: &[i64] = &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_ctl];

/// `fstat` as glibc (newfstatat) and Rust's metadata (statx) make it.
const STAT: &[i64] = &[libc::SYS_fstat, libc::SYS_newfstatat, libc::SYS_statx];

/// The daemon's DIR/status: written whole, then renamed into place.
const STATUS_FILE: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// `kind`'s filter: its list allowed, anything else `mismatch`; `pid` is the process's own.
pub(crate) fn program(kind: ThreadKind, mismatch: SeccompAction, pid: i32) -> Result<BpfProgram, BackendError> {
    let rules = rules(kind, pid)?;
    let arch = std::env::consts::ARCH.try_into()?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?.try_into()
}

fn rules(kind: ThreadKind, pid: i32) -> Result<Rules, BackendError> {
    let mut r = Rules::new();
    every_thread(&mut r, pid)?;
    match kind {
        ThreadKind::Vcpu => {
            ioctl(&mut r, &[IOCTL_KVM, IOCTL_VFIO])?;
            allow(&mut r, DEVICE_IO);
            allow(&mut r, STAT);
            // A masked vector's eventfd is watched by the overflow thread's epoll set; a kick
            // left pending after KVM_RUN is taken with rt_sigtimedwait (vmm/src/vcpu.rs); a
            // vfio-user request that fails (its server died) shuts the connection down.
            allow(&mut r, &[libc::SYS_epoll_ctl, libc::SYS_dup, libc::SYS_rt_sigtimedwait, libc::SYS_shutdown]);
        }
        ThreadKind::EventLoop => {
            ioctl(&mut r, &[IOCTL_KVM, IOCTL_VFIO, IOCTL_TERMINAL])?;
            // Releasing the VM: vfio-user devices say goodbye, VFIO regions unmap.
            allow(&mut r, DEVICE_IO);
            allow(&mut r, STAT);
            allow(&mut r, EPOLL);
            allow(
                &mut r,
                &[
                    libc::SYS_shutdown,
                    // vfio-ioctls finds a released device's group through its sysfs
                    // `iommu_group` link (VfioDevice's drop).
                    libc::SYS_readlink,
                    libc::SYS_readlinkat,
                ],
            );
        }
        ThreadKind::DeviceWorker => {
            allow(&mut r, EPOLL);
        }
        ThreadKind::OverflowInjector => {
            // KVM_SIGNAL_MSI on the VM; its deferred commits: KVM_SET_GSI_ROUTING, then
            // KVM_IRQFD for each committed vector, taken off the overflow set (epoll_ctl), and
            // the commit timer.
            ioctl(&mut r, &[IOCTL_KVM])?;
            allow(&mut r, EPOLL);
            allow(&mut r, &[libc::SYS_timerfd_settime]);
        }
        ThreadKind::Console => {
            allow(&mut r, &[libc::SYS_writev]);
        }
        ThreadKind::DaemonServer => {
            // FIONBIO on accepted sockets and listeners.
            ioctl(&mut r, &[IOCTL_TERMINAL])?;
            allow(&mut r, STAT);
            allow(&mut r, EPOLL);
            allow(
                &mut r,
                &[
                    // An ADI's socket is bound again when its client leaves (devd reactor):
                    // the old file removed (STATUS_FILE's unlink), a new UNIX socket (below)
                    // bound and listening.
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_accept4,
                    libc::SYS_sendmsg,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_recvfrom,
                    libc::SYS_shutdown,
                    libc::SYS_getsockopt,
                    libc::SYS_setsockopt,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_lseek,
                    libc::SYS_dup,
                    libc::SYS_eventfd2,
                ],
            );
            allow(&mut r, STATUS_FILE);
            r.insert(libc::SYS_socket, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64)?])?]);
        }
        // Sleeps, and rewrites the status file with the device's counters every second.
        ThreadKind::DaemonMain => allow(&mut r, STATUS_FILE),
        ThreadKind::Api => {
            // Adding and removing ADIs and vfio-user devices: KVM ioctls (ioeventfds, irqfds,
            // memory slots) and the device's eventfds and messages, as the vCPUs and the event
            // loop use them; FIONBIO on the listener and its connections.
            ioctl(&mut r, &[IOCTL_KVM, IOCTL_TERMINAL, IOCTL_VFIO])?;
            allow(&mut r, DEVICE_IO);
            allow(&mut r, EPOLL);
            allow(&mut r, STAT);
            // A kernel VFIO device it adds (vm.add-vfio): its sysfs directory checked (files
            // read, its IOMMU group's devices listed), the group's and the container's
            // character devices opened (as `--vfio` does at start, by the main thread).
            allow(&mut r, &[libc::SYS_openat, libc::SYS_getdents64]);
            allow(
                &mut r,
                &[
                    libc::SYS_accept4,
                    libc::SYS_setsockopt,
                    libc::SYS_dup,
                    // A vfio-user device's socket: resolved (under --vfio-user-dir?), then
                    // connected to (a UNIX socket only, below).
                    libc::SYS_readlink,
                    libc::SYS_readlinkat,
                    libc::SYS_connect,
                    // The socket file, when the thread ends.
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                ],
            );
            r.insert(libc::SYS_socket, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64)?])?]);
        }
    }
    Ok(r)
}

/// What every thread needs: memory (never executable), its own exit, futexes, time and sleep,
/// signal return (the vCPU kick, the SIGSYS report), logging to stderr, closing what it owns,
/// and `abort` on its own process.
fn every_thread(r: &mut Rules, pid: i32) -> Result<(), BackendError> {
    allow(
        r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_close,
            // Rust's OwnedFd checks the descriptor before closing it in debug builds.
            libc::SYS_fcntl,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    let no_exec = || Cond::new(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0);
    r.insert(libc::SYS_mmap, vec![SeccompRule::new(vec![no_exec()?])?]);
    r.insert(libc::SYS_mprotect, vec![SeccompRule::new(vec![no_exec()?])?]);
    r.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, pid as u64)?])?]);
    Ok(())
}

fn allow(r: &mut Rules, calls: &[i64]) {
    for &call in calls {
        r.insert(call, Vec::new());
    }
}

/// `ioctl` with a request of one of `families` (type byte).
fn ioctl(r: &mut Rules, families: &[u64]) -> Result<(), BackendError> {
    let rules = families
        .iter()
        .map(|&t| SeccompRule::new(vec![Cond::new(1, Len::Dword, Op::MaskedEq(0xff00), t << 8)?]))
        .collect::<Result<Vec<_>, _>>()?;
    r.insert(libc::SYS_ioctl, rules);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_kind_may_start_programs_or_threads_or_open_other_sockets() {
        for kind in ThreadKind::ALL {
            let r = rules(kind, 1).unwrap();
            for call in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_clone, libc::SYS_clone3, libc::SYS_fork, libc::SYS_ptrace, libc::SYS_personality] {
                assert!(!r.contains_key(&call), "{kind} allows syscall {call}");
            }
            // The API thread connects to vfio-user devices, the daemon's server threads bind
            // ADI sockets again: UNIX sockets only, one rule.
            let sockets = r.get(&libc::SYS_socket).map(Vec::len);
            assert_eq!(sockets, matches!(kind, ThreadKind::Api | ThreadKind::DaemonServer).then_some(1), "{kind}");
        }
    }

    #[test]
    fn only_the_daemons_threads_and_the_api_open_files_and_only_they_touch_vfio() {
        for kind in ThreadKind::ALL {
            let r = rules(kind, 1).unwrap();
            let opens = matches!(kind, ThreadKind::DaemonServer | ThreadKind::DaemonMain | ThreadKind::Api);
            assert_eq!(r.contains_key(&libc::SYS_openat), opens, "{kind}");
            let ioctl_rules = r.get(&libc::SYS_ioctl).map_or(0, Vec::len);
            let expected = match kind {
                ThreadKind::Vcpu => 2,
                ThreadKind::EventLoop => 3,
                ThreadKind::Api => 3,
                ThreadKind::OverflowInjector | ThreadKind::DaemonServer => 1,
                _ => 0,
            };
            assert_eq!(ioctl_rules, expected, "{kind}");
        }
    }
}
