//! The memory that request bodies take from their first byte until their request is answered,
//! counted over every request at once. Bodies are buffered before they are handled, and
//! `--body-timeout` only bounds the pause between two bytes, so a client can trickle a body for
//! as long as it likes: without a bound shared by all requests, many such clients could each
//! hold up to `--max-body-bytes` (30 connections held 1.8 GB in a review).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::byte_size::readable;
use crate::server::error::ApiError;

/// Where the shared limit comes from, for the 503's message.
const MAX_BODY_MEMORY_FLAG: &str = "--max-body-memory / LINESCAN_MAX_BODY_MEMORY";

#[derive(Debug)]
pub struct BodyMemory {
    limit: usize,
    held: AtomicUsize,
}

impl BodyMemory {
    pub fn new(limit: usize) -> Arc<BodyMemory> {
        Arc::new(BodyMemory {
            limit,
            held: AtomicUsize::new(0),
        })
    }

    /// A claim of one body, at first on nothing; what it grows to is given back when it drops.
    pub fn claim(self: &Arc<Self>) -> BodyClaim {
        BodyClaim {
            memory: self.clone(),
            bytes: 0,
        }
    }
}

/// The bytes one request's body holds in [`BodyMemory`], until it is dropped.
#[derive(Debug)]
pub struct BodyClaim {
    memory: Arc<BodyMemory>,
    bytes: usize,
}

impl BodyClaim {
    /// Makes the claim cover `total` bytes of this body, or refuses (503, retry in a second)
    /// when all bodies together would pass the limit; a refused growth is not counted.
    pub fn cover(&mut self, total: usize) -> Result<(), ApiError> {
        let Some(more) = total.checked_sub(self.bytes).filter(|&more| more > 0) else {
            return Ok(());
        };
        let before = self.memory.held.fetch_add(more, Ordering::AcqRel);
        if before.saturating_add(more) > self.memory.limit {
            self.memory.held.fetch_sub(more, Ordering::AcqRel);
            return Err(ApiError::Unavailable {
                message: format!(
                    "the request bodies in hand hold {} already and this one would pass the \
                     {} they may take together ({MAX_BODY_MEMORY_FLAG}); retry shortly",
                    readable(before as u64),
                    readable(self.memory.limit as u64)
                ),
                retry_after: 1,
            });
        }
        self.bytes += more;
        Ok(())
    }
}

impl Drop for BodyClaim {
    fn drop(&mut self) {
        self.memory.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_share_the_limit_and_give_it_back_when_dropped() {
        let memory = BodyMemory::new(100);
        let mut first = memory.claim();
        first.cover(30).unwrap();
        first.cover(60).unwrap();
        first.cover(10).unwrap();
        let mut second = memory.claim();
        second.cover(40).unwrap();
        let refused = second.cover(41).unwrap_err().to_string();
        assert!(
            refused.contains("hold 100 B already") && refused.contains("the 100 B they may take"),
            "{refused}"
        );
        assert_eq!(memory.held.load(Ordering::Acquire), 100);
        drop(first);
        assert_eq!(memory.held.load(Ordering::Acquire), 40);
        second.cover(100).unwrap();
        drop(second);
        assert_eq!(memory.held.load(Ordering::Acquire), 0);
    }
}
