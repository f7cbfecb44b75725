//! A bound on the memory image decodes in flight may claim together. The pixel limit holds per
//! image, but any number of requests may decode at once: twelve 49-megapixel uploads of a few
//! hundred KB each took 3.9 GB. A decode waits here until its worst case fits.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Bytes all decodes in flight may claim together: two images at the default pixel limit.
const DECODE_BUDGET_BYTES: u64 = 2 << 30;

/// The process's budget, shared by every decode.
pub static DECODES: DecodeBudget = DecodeBudget::new(DECODE_BUDGET_BYTES);

#[derive(Debug)]
pub struct DecodeBudget {
    total: u64,
    free: Mutex<u64>,
    released: Condvar,
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
            free: Mutex::new(total),
            released: Condvar::new(),
        }
    }

    /// Waits until `bytes` are free and claims them; a claim above the whole budget claims all
    /// of it, so one image of any allowed size still runs (alone).
    pub fn claim(&self, bytes: u64) -> Claim<'_> {
        let bytes = bytes.min(self.total);
        let mut free = self.lock();
        while *free < bytes {
            free = self
                .released
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= bytes;
        Claim {
            budget: self,
            bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        // The count stays right even if a holder panicked: claims are given back on unwind.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Claim<'_> {
    /// Gives back what the claim holds above `bytes` (a worst case claimed up front, once the
    /// real need is known); never waits.
    pub fn shrink_to(&mut self, bytes: u64) {
        let excess = self.bytes.saturating_sub(bytes);
        if excess > 0 {
            self.bytes -= excess;
            *self.budget.lock() += excess;
            self.budget.released.notify_all();
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        *self.budget.lock() += self.bytes;
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
        assert_eq!(*budget.lock(), 70);
        worst.shrink_to(50);
        assert_eq!(*budget.lock(), 70, "a shrink never grows a claim");
        drop(worst);
        assert_eq!(*budget.lock(), 100);
        // More than the whole budget claims all of it rather than waiting forever.
        let all = budget.claim(1_000);
        assert_eq!(*budget.lock(), 0);
        drop(all);
        assert_eq!(*budget.lock(), 100);
    }
}
