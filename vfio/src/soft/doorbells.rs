//! Doorbell eventfds of the software device, each rung by one ADI or shared by a few ADIs of
//! one owner (one VM).
//!
//! Why share: a device process serving thousands of ADIs holds one descriptor per doorbell,
//! beside each ADI's client connection; at 10,000 ADIs one eventfd per ADI doubles the
//! descriptors the process needs (issue 12: 10,000 ADIs per host under a 20,000 open-file
//! limit). KVM lets one eventfd serve ioeventfds at many guest addresses, so the ADIs of one
//! VM can ring the same eventfd; the worker it wakes then runs a pass of every ADI in the
//! group, and a pass of a queue with nothing new reads its tail and stops. Only ADIs of the
//! same owner share: a ring never makes the device look at another VM's queue, so no guest
//! can learn from its own queue's timing when another guest rings. At most `share` ADIs per
//! eventfd bounds the passes one ring costs.

use std::collections::HashMap;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// One doorbell eventfd and the ADIs it rings for.
#[derive(Debug)]
struct Group {
    fd: Arc<EventFd>,
    owner: Option<u64>,
    /// Replaced, not edited, when an ADI joins or leaves: a ring takes a copy of the `Arc`.
    adis: Arc<[u32]>,
}

/// Where an ADI's doorbell is: the eventfd to hand out, the token its worker watches it by,
/// and whether the eventfd is new (the caller must start watching it).
#[derive(Debug)]
pub struct Joined {
    /// The eventfd.
    pub fd: Arc<EventFd>,
    /// Its token (never reused while the device lives).
    pub token: u64,
    /// No other ADI rings it yet.
    pub new: bool,
}

/// Every open ADI's doorbell.
#[derive(Debug)]
pub struct Doorbells {
    share: usize,
    groups: HashMap<u64, Group>,
    /// Per owner, the group new ADIs of that owner join while it has room.
    filling: HashMap<u64, u64>,
    next: u64,
}

impl Doorbells {
    /// Doorbells shared by at most `share` ADIs of an owner (1: one per ADI).
    pub fn new(share: usize) -> Self {
        Self { share: share.max(1), groups: HashMap::new(), filling: HashMap::new(), next: 0 }
    }

    /// ADI `adi`'s doorbell: a group of `owner`'s with room, or a new eventfd (always new
    /// without an owner).
    pub fn join(&mut self, adi: u32, owner: Option<u64>) -> std::io::Result<Joined> {
        if let Some(token) = owner.and_then(|o| self.filling.get(&o)).copied() {
            if let Some(g) = self.groups.get_mut(&token).filter(|g| g.adis.len() < self.share) {
                g.adis = g.adis.iter().copied().chain([adi]).collect();
                return Ok(Joined { fd: g.fd.clone(), token, new: false });
            }
        }
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let token = self.next;
        self.next += 1;
        self.groups.insert(token, Group { fd: fd.clone(), owner, adis: Arc::from([adi]) });
        if let Some(o) = owner {
            self.filling.insert(o, token);
        }
        Ok(Joined { fd, token, new: true })
    }

    /// ADI `adi` leaves group `token`; returns the eventfd when no ADI rings it any more (the
    /// caller stops watching it; it closes with the last `Arc`).
    pub fn leave(&mut self, token: u64, adi: u32) -> Option<Arc<EventFd>> {
        let g = self.groups.get_mut(&token)?;
        g.adis = g.adis.iter().copied().filter(|&a| a != adi).collect();
        if !g.adis.is_empty() {
            return None;
        }
        let g = self.groups.remove(&token)?;
        if let Some(o) = g.owner {
            if self.filling.get(&o) == Some(&token) {
                self.filling.remove(&o);
            }
        }
        Some(g.fd)
    }

    /// Group `token`'s eventfd and the ADIs it rings for.
    pub fn members(&self, token: u64) -> Option<(Arc<EventFd>, Arc<[u32]>)> {
        self.groups.get(&token).map(|g| (g.fd.clone(), g.adis.clone()))
    }

    /// Eventfds open.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_fills_groups_of_share_adis_and_owners_never_mix() {
        let mut d = Doorbells::new(3);
        let a: Vec<Joined> = (0..4).map(|adi| d.join(adi, Some(7)).unwrap()).collect();
        assert!(a[0].new && !a[1].new && !a[2].new && a[3].new, "three to a group, then a new one");
        assert_eq!(a[0].token, a[2].token);
        assert!(Arc::ptr_eq(&a[0].fd, &a[1].fd));
        let other = d.join(10, Some(8)).unwrap();
        assert!(other.new, "another owner never joins owner 7's group");
        let alone = d.join(11, None).unwrap();
        let alone2 = d.join(12, None).unwrap();
        assert!(alone.new && alone2.new, "no owner, no sharing");
        assert_eq!(d.len(), 5);
        assert_eq!(&*d.members(a[0].token).unwrap().1, &[0, 1, 2]);
        assert!(d.leave(a[0].token, 1).is_none(), "two still ring it");
        assert_eq!(&*d.members(a[0].token).unwrap().1, &[0, 2]);
        assert!(d.leave(a[0].token, 0).is_none());
        assert!(d.leave(a[0].token, 2).is_some(), "the last one out gets the fd to unwatch");
        assert!(d.members(a[0].token).is_none());
        // Owner 7 keeps filling its newest group; a new one after it empties.
        assert_eq!(d.join(20, Some(7)).unwrap().token, a[3].token);
        assert!(d.leave(a[3].token, 3).is_none());
        assert!(d.leave(a[3].token, 20).is_some());
        let fresh = d.join(21, Some(7)).unwrap();
        assert!(fresh.new && fresh.token > alone2.token, "tokens are never reused");
    }

    #[test]
    fn a_share_of_one_is_an_eventfd_per_adi() {
        let mut d = Doorbells::new(0);
        assert!(d.join(0, Some(1)).unwrap().new);
        assert!(d.join(1, Some(1)).unwrap().new);
        assert_eq!(d.len(), 2);
    }
}
