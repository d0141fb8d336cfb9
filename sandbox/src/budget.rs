//! Time budgets for work done in (or instead of) the sandbox, derived from the work: each
//! is [`MARGIN`] × what that work was measured to take on an idle machine of our kind
//! (2 cores, Debian 12, QEMU-TCG sandbox), so a machine that many times slower still passes
//! and a real hang still ends. The idle figures and how they were measured are in
//! docs/testing.md; update both together.

use std::time::Duration;

/// How many times slower than idle a run may be before its budget runs out.
pub const MARGIN: u32 = 4;

/// QEMU start to the sandbox /init's script: the sandbox kernel boots and unpacks an
/// initramfs of up to ~110 MB (guest kernels, test binaries). Idle: 4-7 s.
const SANDBOX_BOOT_IDLE: Duration = Duration::from_secs(8);

/// One KVM test process in the sandbox, unless the test declares its own figure: tiny
/// payloads, measured 0.2-1 s each. A test that does more says so (`sandbox_idle_secs`).
pub const KVM_TEST_IDLE: Duration = Duration::from_secs(5);

/// One siovmm run of the stock kernel in the sandbox to power-off, no ADIs. Idle: 9-12 s.
const GUEST_BOOT_IDLE: Duration = Duration::from_secs(13);

/// Per ADI in a guest that binds and self-tests each twice (tests/tests/adi.rs: 64 ADIs added
/// 13-17 s to a boot). Idle: 0.25 s.
const GUEST_ADI_IDLE: Duration = Duration::from_millis(250);

/// Budget to boot the sandbox.
pub fn sandbox_boot() -> Duration {
    SANDBOX_BOOT_IDLE * MARGIN
}

/// Budget for one KVM test process in the sandbox that takes `idle` on an idle machine.
pub fn kvm_test(idle: Duration) -> Duration {
    work(idle)
}

/// Budget for any other work that takes `idle` on an idle machine (a sandbox's setup script).
pub fn work(idle: Duration) -> Duration {
    idle * MARGIN
}

/// Budget for one guest run: a boot, `adis` ADIs worked on, and `extra` further idle seconds
/// the case itself declares for work beyond that.
pub fn guest(adis: u32, extra: Duration) -> Duration {
    (GUEST_BOOT_IDLE + GUEST_ADI_IDLE * adis + extra) * MARGIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_grow_with_the_work() {
        assert!(guest(64, Duration::ZERO) > guest(0, Duration::ZERO));
        assert_eq!(guest(0, Duration::from_secs(1)) - guest(0, Duration::ZERO), Duration::from_secs(u64::from(MARGIN)));
        assert!(sandbox_boot() >= Duration::from_secs(3 * 7), "at least 3x the slowest idle boot seen");
    }
}
