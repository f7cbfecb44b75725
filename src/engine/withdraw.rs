//! A caller's way to give up on inference it asked for. Work run inside [`scope`] whose
//! [`Withdrawal`] is signalled has every request that no session has taken yet withdrawn from
//! its queue (answered `InferError::Cancelled`, never run); requests a session has already taken
//! run to their end and are answered as usual. A task-local carries the signal, so the pipelines
//! between the caller and the batcher need not pass it along.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

tokio::task_local! {
    static WITHDRAWAL: Arc<Withdrawal>;
}

/// The signal: once given, it stays given.
#[derive(Default)]
pub struct Withdrawal {
    given: AtomicBool,
    notify: Notify,
}

impl Withdrawal {
    pub fn give(&self) {
        self.given.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Ends once the signal is given.
    async fn given(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read, so a signal between the two still wakes it.
        notified.as_mut().enable();
        if self.given.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// Runs `work` with `withdrawal` as the signal of the requests it makes.
pub async fn scope<F: Future>(withdrawal: Arc<Withdrawal>, work: F) -> F::Output {
    WITHDRAWAL.scope(withdrawal, work).await
}

/// Ends when the current task's work is withdrawn; never outside a [`scope`].
pub(crate) async fn withdrawn() {
    match WITHDRAWAL.try_with(Arc::clone) {
        Ok(withdrawal) => withdrawal.given().await,
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_signal_reaches_the_work_of_its_scope_only() {
        let withdrawal = Arc::new(Withdrawal::default());
        let waiting = tokio::spawn(scope(withdrawal.clone(), withdrawn()));
        let outside = tokio::spawn(withdrawn());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        withdrawal.give();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("withdrawn")
            .unwrap();
        // Given before the wait began: ends at once.
        tokio::time::timeout(Duration::from_secs(5), scope(withdrawal, withdrawn()))
            .await
            .expect("already given");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!outside.is_finished());
        outside.abort();
    }
}
