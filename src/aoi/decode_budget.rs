//! A bound on the memory image decodes in flight may claim together. The pixel limit holds per
//! image, but any number of requests may decode at once: twelve 49-megapixel uploads of a few
//! hundred KB each took 3.9 GB. A decode waits here until its worst case fits, and a board's
//! later stages hold their share until it is classified. Claims are served in the order they
//! come, so a stream of small boards cannot keep a large one waiting for ever.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Bytes all decodes in flight may claim together: two images at the default pixel limit.
const DECODE_BUDGET_BYTES: u64 = 2 << 30;

/// The process's budget, shared by every decode.
pub static DECODES: DecodeBudget = DecodeBudget::new(DECODE_BUDGET_BYTES);

#[derive(Debug)]
pub struct DecodeBudget {
    total: u64,
    state: Mutex<State>,
    released: Condvar,
}

#[derive(Debug)]
struct State {
    free: u64,
    /// The ticket the next claim takes, and the one whose turn it is.
    next_ticket: u64,
    serving: u64,
}

/// Bytes claimed from a budget, given back when dropped.
#[derive(Debug)]
pub struct Claim<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl DecodeBudget {
    pub const fn new(total: u64) -> DecodeBudget {
        DecodeBudget {
            total,
            state: Mutex::new(State {
                free: total,
                next_ticket: 0,
                serving: 0,
            }),
            released: Condvar::new(),
        }
    }

    /// Waits until the claims that came before are served and `bytes` are free, and claims
    /// them; a claim above the whole budget claims all of it, so one image of any allowed size
    /// still runs (alone).
    pub fn claim(&self, bytes: u64) -> Claim<'_> {
        let bytes = bytes.min(self.total);
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        while state.serving != ticket || state.free < bytes {
            state = self
                .released
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.free -= bytes;
        state.serving += 1;
        // The next in line may fit already.
        self.released.notify_all();
        Claim {
            budget: self,
            bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The count stays right even if a holder panicked: claims are given back on unwind.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Claim<'_> {
    /// Gives back what the claim holds above `bytes` (a worst case claimed up front, once the
    /// real need is known); never waits.
    pub fn shrink_to(&mut self, bytes: u64) {
        let excess = self.bytes.saturating_sub(bytes);
        if excess > 0 {
            self.bytes -= excess;
            self.budget.lock().free += excess;
            self.budget.released.notify_all();
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.budget.lock().free += self.bytes;
        self.budget.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_claim_waits_until_enough_is_given_back() {
        let budget: &'static DecodeBudget = Box::leak(Box::new(DecodeBudget::new(100)));
        let first = budget.claim(60);
        let (claimed, waiting) = mpsc::channel();
        let second = std::thread::spawn(move || {
            let claim = budget.claim(60);
            claimed.send(()).unwrap();
            drop(claim);
        });
        assert!(
            waiting.recv_timeout(Duration::from_millis(200)).is_err(),
            "60 + 60 of 100 were claimed at once"
        );
        drop(first);
        waiting.recv_timeout(Duration::from_secs(10)).unwrap();
        second.join().unwrap();
        // A claim shrunk to its real need gives the rest back at once.
        let mut worst = budget.claim(90);
        worst.shrink_to(30);
        assert_eq!(budget.lock().free, 70);
        worst.shrink_to(50);
        assert_eq!(budget.lock().free, 70, "a shrink never grows a claim");
        drop(worst);
        assert_eq!(budget.lock().free, 100);
        // More than the whole budget claims all of it rather than waiting forever.
        let all = budget.claim(1_000);
        assert_eq!(budget.lock().free, 0);
        drop(all);
        assert_eq!(budget.lock().free, 100);
    }

    #[test]
    fn claims_are_served_in_the_order_they_come() {
        let budget: &'static DecodeBudget = Box::leak(Box::new(DecodeBudget::new(100)));
        let small = budget.claim(30);
        let (claimed, order) = mpsc::channel();
        let large = {
            let claimed = claimed.clone();
            std::thread::spawn(move || {
                let claim = budget.claim(90);
                claimed.send("large").unwrap();
                drop(claim);
            })
        };
        // The large claim waits for the first small one; a later small one, which would fit
        // beside the first, waits behind the large one.
        while budget.lock().next_ticket < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let later = std::thread::spawn(move || {
            let claim = budget.claim(30);
            claimed.send("later small").unwrap();
            drop(claim);
        });
        assert!(order.recv_timeout(Duration::from_millis(200)).is_err());
        drop(small);
        let served: Vec<&str> = (0..2)
            .map(|_| order.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(served, ["large", "later small"]);
        large.join().unwrap();
        later.join().unwrap();
    }
}
