//! Operations a guest access triggered that failed (a route KVM refused, an eventfd that could
//! not be made, a device call refused): counted always, logged for the first few per device so
//! a hostile guest cannot flood the log. Nothing on a guest path is discarded silently.

/// One device's failure record.
#[derive(Debug)]
pub struct GuestFaults {
    /// How the log names the device ("ADI 3 (00:01.0)").
    who: Box<str>,
    count: u64,
}

impl GuestFaults {
    /// Failures logged per device; later ones are only counted.
    pub const LOGGED: u64 = 8;

    /// No failures yet, for the device the log calls `who`.
    pub fn new(who: impl Into<Box<str>>) -> Self {
        Self { who: who.into(), count: 0 }
    }

    /// `result` of doing `what`: its value, or `None` once the failure is recorded.
    pub fn record<T, E: std::fmt::Display>(&mut self, what: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.report(what, e);
                None
            }
        }
    }

    /// Records that doing `what` failed with `error` (for failures that are not a `Result`).
    pub fn report(&mut self, what: &str, error: impl std::fmt::Display) {
        self.count += 1;
        if self.count <= Self::LOGGED {
            log::warn!("{}: {what}: {error}", self.who);
        }
    }

    /// Failures so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_values_passed_through() {
        let mut f = GuestFaults::new("test device");
        assert_eq!(f.record("working", Ok::<u8, String>(7)), Some(7));
        for _ in 0..GuestFaults::LOGGED + 3 {
            assert_eq!(f.record("failing", Err::<u8, _>("no")), None);
        }
        assert_eq!(f.count(), GuestFaults::LOGGED + 3);
        f.report("reported", "no");
        assert_eq!(f.count(), GuestFaults::LOGGED + 4);
    }
}
