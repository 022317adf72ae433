//! Where one request's time went: its waits at chatshard's queues and its
//! database work, summed over the shard operations made for it, for the
//! per-shard request histograms (`chatshard.shard.request.*`).
//!
//! A request carries its tally in a task-local ([`Spent::scope`]); a shard
//! operation adds to the tally of the task it runs in, if there is one, and
//! costs nothing more when there is none (background work, moves). Work done
//! in another task reaches a tally only when it is handed on on purpose: the
//! group commit runs each batch under a tally of its own and adds it to every
//! write of the batch, with the time each write waited for the batch to
//! start.
//!
//! That wait has two parts. A write queued while its chat's previous batch
//! was still in the database waits for that batch to end: one chat's writes
//! take its row lock in turn, and without the queue the database would hold
//! the write on that lock instead, so this part counts as database time. The
//! rest, from the chat's flusher being free (or the write's arrival, if it
//! was) to its batch starting, is chatshard's own: the flusher's turn to run
//! and the batch's assembly.
//!
//! The database part is timed from chatshard's side of the connection: it
//! holds the network round trips and the time chatshard's task takes to run
//! again once the answer is in, besides the server's own work.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

tokio::task_local! {
    static TALLY: Arc<Spent>;
}

/// The time one request (or one group-commit batch) spent at each stage, in
/// nanoseconds, added to as its shard operations run.
#[derive(Debug, Default)]
pub struct Spent {
    /// Breaker, the chat's share, admission and the pool: until a
    /// connection was in hand (or the operation was refused).
    bulkhead: AtomicU64,
    /// In the chat's group-commit queue, until its batch started, less the
    /// part spent behind the chat's previous batch.
    queue: AtomicU64,
    /// The database work under the operation's deadline, and the wait
    /// behind the chat's previous batch.
    database: AtomicU64,
    /// Whether a write of the request went through the group commit.
    queued: AtomicBool,
}

impl Spent {
    /// Runs `work` with `tally` as the tally of its task.
    pub async fn scope<F: Future>(tally: Arc<Spent>, work: F) -> F::Output {
        TALLY.scope(tally, work).await
    }

    /// The tally of the running task, if it has one.
    pub fn current() -> Option<Arc<Spent>> {
        TALLY.try_with(Arc::clone).ok()
    }

    /// Adds a wait at the protections to the running task's tally.
    pub(crate) fn note_bulkhead(d: Duration) {
        let _ = TALLY.try_with(|t| add(&t.bulkhead, d));
    }

    /// Adds database work to the running task's tally.
    pub(crate) fn note_database(d: Duration) {
        let _ = TALLY.try_with(|t| add(&t.database, d));
    }

    /// Adds a write's wait in its chat's queue (`queued`: its own part;
    /// `behind`: behind the chat's previous batch) and the tally of the
    /// batch that committed it.
    pub fn add_batch(&self, queued: Duration, behind: Duration, batch: &Spent) {
        add(&self.queue, queued);
        add(&self.database, behind);
        self.queued.store(true, Ordering::Relaxed);
        for (mine, theirs) in [
            (&self.bulkhead, &batch.bulkhead),
            (&self.queue, &batch.queue),
            (&self.database, &batch.database),
        ] {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Time at the protections (breaker, share, admission, pool).
    pub fn bulkhead(&self) -> Duration {
        read(&self.bulkhead)
    }

    /// Time in a group-commit queue; `None` when no write of the request
    /// went through one.
    pub fn queue(&self) -> Option<Duration> {
        self.queued
            .load(Ordering::Relaxed)
            .then(|| read(&self.queue))
    }

    /// Time in the database work.
    pub fn database(&self) -> Duration {
        read(&self.database)
    }
}

fn add(counter: &AtomicU64, d: Duration) {
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(nanos, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> Duration {
    Duration::from_nanos(counter.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn operations_add_to_the_tally_of_their_task_only() {
        let tally = Arc::new(Spent::default());
        Spent::scope(tally.clone(), async {
            Spent::note_bulkhead(Duration::from_micros(3));
            Spent::note_database(Duration::from_micros(5));
            Spent::note_database(Duration::from_micros(7));
            // A spawned task does not inherit the tally.
            let _ = tokio::spawn(async { Spent::note_database(Duration::from_secs(1)) }).await;
        })
        .await;
        // Outside any scope: nothing to add to, and no panic.
        Spent::note_database(Duration::from_secs(1));
        assert_eq!(tally.bulkhead(), Duration::from_micros(3));
        assert_eq!(tally.database(), Duration::from_micros(12));
        assert_eq!(tally.queue(), None);
    }

    #[test]
    fn a_batch_is_added_to_each_of_its_writes_with_its_queue_wait() {
        let batch = Spent::default();
        add(&batch.bulkhead, Duration::from_micros(2));
        add(&batch.database, Duration::from_micros(900));
        let write = Spent::default();
        add(&write.database, Duration::from_micros(100));
        write.add_batch(
            Duration::from_micros(40),
            Duration::from_micros(500),
            &batch,
        );
        assert_eq!(write.queue(), Some(Duration::from_micros(40)));
        assert_eq!(write.bulkhead(), Duration::from_micros(2));
        assert_eq!(write.database(), Duration::from_micros(1500));
    }
}
