//! The one bounded poll of the test suites: check a condition every few
//! milliseconds until it holds, or fail after a deadline with a message that
//! says what was awaited and what was seen last.
//!
//! A poll interval is not synchronisation: nothing here sleeps for the
//! condition to become true, it only looks again. A test that has to let time
//! pass waits for something that measures it (a counter, a state) instead.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is checked unless [`Wait::every`] says otherwise.
const EVERY: Duration = Duration::from_millis(20);

/// A bounded wait for a condition: `within` a time, described by `what`.
#[derive(Debug, Clone)]
pub struct Wait {
    within: Duration,
    every: Duration,
    what: String,
}

impl Wait {
    pub fn new(within: Duration, what: impl Into<String>) -> Self {
        Self {
            within,
            every: EVERY,
            what: what.into(),
        }
    }

    /// Checks every `every` instead (for costly checks).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Polls `check` until it gives `Ok`; its `Err` says what it saw instead,
    /// and the last one is in the failure's message.
    pub async fn until<T, E, F, Fut>(self, mut check: F) -> T
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = Deadline::start(&self);
        loop {
            match check().await {
                Ok(value) => return value,
                Err(seen) => deadline.check(&seen),
            }
            tokio::time::sleep(self.every).await;
        }
    }

    /// Polls `check` until it is true.
    pub async fn until_true<F, Fut>(self, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        self.until(|| {
            let holds = check();
            async move { if holds.await { Ok(()) } else { Err("") } }
        })
        .await
    }

    /// [`Self::until`] for code without a runtime: sleeps the thread between
    /// checks.
    pub fn until_blocking<T, E: Display>(self, mut check: impl FnMut() -> Result<T, E>) -> T {
        let deadline = Deadline::start(&self);
        loop {
            match check() {
                Ok(value) => return value,
                Err(seen) => deadline.check(&seen),
            }
            std::thread::sleep(self.every);
        }
    }
}

/// The deadline of one [`Wait`], and its failure.
struct Deadline<'a> {
    wait: &'a Wait,
    at: Instant,
}

impl<'a> Deadline<'a> {
    fn start(wait: &'a Wait) -> Self {
        Self {
            wait,
            at: Instant::now() + wait.within,
        }
    }

    /// Fails, with what was seen last, once the deadline has passed.
    fn check(&self, seen: &dyn Display) {
        if Instant::now() < self.at {
            return;
        }
        let seen = seen.to_string();
        let (what, within) = (&self.wait.what, self.wait.within);
        if seen.is_empty() {
            panic!("{what}: not within {within:?}");
        }
        panic!("{what}: not within {within:?}; last seen: {seen}");
    }
}

/// Polls `check` every 20 ms until it holds, or fails after `within` saying
/// `what` was awaited.
pub async fn eventually<F, Fut>(within: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    Wait::new(within, what).until_true(check).await
}
