//! A model's request queue in two lanes: live requests (HTTP callers, a line waiting on a board)
//! are always taken before bulk ones (fleet jobs), so a batch job queueing full batches never
//! stands between a live request and the next free session. Each lane is a bounded crossbeam
//! channel (lock-free array queue); a full lane refuses at once.

use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender, TryRecvError, TrySendError};

/// Which lane a request waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Someone is waiting for this answer now: taken first.
    Live,
    /// Throughput work (fleet jobs): taken when no live request waits.
    Bulk,
}

impl Priority {
    pub const ALL: [Priority; 2] = [Priority::Live, Priority::Bulk];

    /// The `lane` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Priority::Live => "live",
            Priority::Bulk => "bulk",
        }
    }
}

/// The sending side, held by the batcher.
pub struct LaneSenders<T> {
    live: Sender<T>,
    bulk: Sender<T>,
}

/// The receiving side, one clone per session worker.
pub struct LaneReceivers<T> {
    live: Receiver<T>,
    bulk: Receiver<T>,
}

// Not derived: that would ask `T: Clone`, and requests are not cloned, only their receivers.
impl<T> Clone for LaneReceivers<T> {
    fn clone(&self) -> Self {
        LaneReceivers {
            live: self.live.clone(),
            bulk: self.bulk.clone(),
        }
    }
}

/// Two lanes of `capacity` requests each.
pub fn lanes<T>(capacity: usize) -> (LaneSenders<T>, LaneReceivers<T>) {
    let (live_tx, live_rx) = crossbeam_channel::bounded(capacity);
    let (bulk_tx, bulk_rx) = crossbeam_channel::bounded(capacity);
    (
        LaneSenders {
            live: live_tx,
            bulk: bulk_tx,
        },
        LaneReceivers {
            live: live_rx,
            bulk: bulk_rx,
        },
    )
}

/// The one of a pair of channel ends that serves `lane`.
fn pick<'a, C>(live: &'a C, bulk: &'a C, lane: Priority) -> &'a C {
    match lane {
        Priority::Live => live,
        Priority::Bulk => bulk,
    }
}

impl<T> LaneSenders<T> {
    pub fn try_send(&self, item: T, priority: Priority) -> Result<(), TrySendError<T>> {
        pick(&self.live, &self.bulk, priority).try_send(item)
    }

    /// Requests waiting in one lane.
    pub fn waiting(&self, lane: Priority) -> usize {
        pick(&self.live, &self.bulk, lane).len()
    }
}

impl<T> LaneReceivers<T> {
    /// Requests waiting in one lane.
    pub fn waiting(&self, lane: Priority) -> usize {
        pick(&self.live, &self.bulk, lane).len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.bulk.is_empty()
    }

    /// A live request waiting now, if any.
    pub fn try_live(&self) -> Option<T> {
        self.live.try_recv().ok()
    }

    /// The next request, live before bulk, waiting until `deadline` for one to arrive.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        loop {
            match self.try_recv() {
                Ok(item) => return Ok(item),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            let mut select = Select::new();
            select.recv(&self.live);
            select.recv(&self.bulk);
            // Readiness only wakes us: the loop takes from the live lane first either way.
            if select.ready_deadline(deadline).is_err() {
                return Err(RecvTimeoutError::Timeout);
            }
        }
    }

    /// The next request waiting now, live before bulk.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        match self.live.try_recv() {
            Ok(item) => Ok(item),
            Err(live) => match (self.bulk.try_recv(), live) {
                (Ok(item), _) => Ok(item),
                (Err(TryRecvError::Disconnected), TryRecvError::Disconnected) => {
                    Err(TryRecvError::Disconnected)
                }
                _ => Err(TryRecvError::Empty),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn live_requests_are_taken_before_bulk_ones_that_came_first() {
        let (senders, receivers) = lanes(4);
        senders.try_send("bulk 1", Priority::Bulk).unwrap();
        senders.try_send("bulk 2", Priority::Bulk).unwrap();
        senders.try_send("live 1", Priority::Live).unwrap();
        senders.try_send("live 2", Priority::Live).unwrap();
        assert_eq!(senders.waiting(Priority::Live), 2);
        assert_eq!(senders.waiting(Priority::Bulk), 2);
        let soon = || Instant::now() + Duration::from_millis(10);
        let order: Vec<_> = (0..4)
            .map(|_| receivers.recv_deadline(soon()).unwrap())
            .collect();
        assert_eq!(order, ["live 1", "live 2", "bulk 1", "bulk 2"]);
        assert!(receivers.is_empty());
        assert_eq!(receivers.waiting(Priority::Live), 0);
        assert_eq!(
            receivers.recv_deadline(soon()),
            Err(RecvTimeoutError::Timeout)
        );
    }

    #[test]
    fn each_lane_is_bounded_on_its_own() {
        let (senders, receivers) = lanes(1);
        senders.try_send(1, Priority::Bulk).unwrap();
        assert!(matches!(
            senders.try_send(2, Priority::Bulk),
            Err(TrySendError::Full(2))
        ));
        // A full bulk lane does not keep a live request out.
        senders.try_send(3, Priority::Live).unwrap();
        assert_eq!(receivers.try_live(), Some(3));
        assert_eq!(receivers.try_live(), None);
    }

    #[test]
    fn a_waiting_receiver_wakes_for_a_request_sent_later() {
        let (senders, receivers) = lanes(2);
        let waiter = std::thread::spawn(move || {
            receivers.recv_deadline(Instant::now() + Duration::from_secs(10))
        });
        std::thread::sleep(Duration::from_millis(20));
        senders.try_send(7, Priority::Bulk).unwrap();
        assert_eq!(waiter.join().unwrap(), Ok(7));
    }

    #[test]
    fn dropped_senders_end_the_wait() {
        let (senders, receivers) = lanes::<u8>(2);
        drop(senders);
        assert_eq!(
            receivers.recv_deadline(Instant::now() + Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected)
        );
    }
}
