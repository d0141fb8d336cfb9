//! The open-file limit, raised for ADIs: each composed ADI holds a doorbell eventfd (or its
//! share of one) and each vector a guest programs another (the eventfd KVM's irqfd waits on),
//! so thousands of ADIs pass the usual soft limit of 1,024 — in siovmm and in the device daemon.

/// Raises the open-file limit to `wanted`: the hard limit too if `wanted` is beyond it (which
/// needs CAP_SYS_RESOURCE), else the soft limit to the hard one. Returns the soft limit in
/// force afterwards (0 if it cannot be read), which the caller compares with what it needs.
pub fn raise_open_file_limit(wanted: u64) -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if wanted > r.rlim_max {
            let raised = libc::rlimit { rlim_cur: wanted, rlim_max: wanted };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return wanted;
            }
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
            }
        }
        r.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> (u64, u64) {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit on a valid struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
        (r.rlim_cur, r.rlim_max)
    }

    #[test]
    fn the_soft_limit_reaches_the_hard_one_and_the_answer_is_what_is_in_force() {
        let (_, hard) = limits();
        let got = raise_open_file_limit(0);
        assert_eq!(got, limits().0, "what it returns is the limit in force");
        assert_eq!(got, hard, "the soft limit raised to the hard one");
    }
}
