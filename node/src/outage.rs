//! Logging a loop's run of failures without flooding the log.
//!
//! When the store cannot commit (its disk full, say) every batch of requests fails, and the
//! sequencer's step with them: at thousands of requests a second, a line per failure would
//! bury the cause and fill the disk the logs share. [`Outage`] logs the first failure at
//! once, then at most one line per [`SUMMARY_EVERY`] with how many failed since, and one
//! line when the loop works again.

use std::time::{Duration, Instant};

/// How often a run of failures is summarised.
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// How loud a loop's failures are.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Level {
    Warn,
    Error,
}

/// A run of failures of one loop (`what`: "audit batch commit", "sequencer step").
#[derive(Debug)]
pub(crate) struct Outage {
    what: &'static str,
    level: Level,
    run: Option<Run>,
}

#[derive(Debug)]
struct Run {
    since: Instant,
    failed: u64,
    /// Requests failed with it, for loops that serve them.
    requests: Option<u64>,
    /// When the last line was logged, and what failed since it.
    logged: Instant,
    unlogged: u64,
}

/// What [`Outage`] decided to say about a failure or a success (returned for the tests).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Said {
    Nothing,
    /// The first failure of a run.
    Began,
    /// A summary: this many failures since the last line.
    Still(u64),
    /// The loop works again after this many failures.
    Ended(u64),
}

impl Outage {
    pub(crate) fn new(what: &'static str, level: Level) -> Self {
        Outage { what, level, run: None }
    }

    /// One failure, of an attempt that carried `requests` requests (for loops that serve
    /// them). `code` and `error` are the store's, the API's or the loop's own: they never
    /// name a key or carry a value.
    pub(crate) fn failed(
        &mut self,
        code: &str,
        error: &dyn std::fmt::Display,
        requests: Option<usize>,
    ) -> Said {
        self.failed_at(Instant::now(), code, error, requests)
    }

    /// The loop worked.
    pub(crate) fn succeeded(&mut self) -> Said {
        self.succeeded_at(Instant::now())
    }

    fn failed_at(
        &mut self,
        now: Instant,
        code: &str,
        error: &dyn std::fmt::Display,
        requests: Option<usize>,
    ) -> Said {
        let what = self.what;
        let Some(run) = &mut self.run else {
            self.run = Some(Run {
                since: now,
                failed: 1,
                requests: requests.map(|n| n as u64),
                logged: now,
                unlogged: 0,
            });
            match self.level {
                Level::Warn => {
                    tracing::warn!(code, %error, requests, "{what} failed (further failures summarised every {}s)", SUMMARY_EVERY.as_secs())
                }
                Level::Error => {
                    tracing::error!(code, %error, requests, "{what} failed (further failures summarised every {}s)", SUMMARY_EVERY.as_secs())
                }
            }
            return Said::Began;
        };
        run.failed += 1;
        if let Some(n) = requests {
            run.requests = Some(run.requests.unwrap_or(0) + n as u64);
        }
        run.unlogged += 1;
        if now.duration_since(run.logged) < SUMMARY_EVERY {
            return Said::Nothing;
        }
        let (since, failed, count) = (now.duration_since(run.since).as_secs(), run.failed, run.unlogged);
        run.logged = now;
        run.unlogged = 0;
        match self.level {
            Level::Warn => {
                tracing::warn!(code, %error, failed, since_s = since, "{what} still failing: {count} more failures")
            }
            Level::Error => {
                tracing::error!(code, %error, failed, since_s = since, "{what} still failing: {count} more failures")
            }
        }
        Said::Still(count)
    }

    fn succeeded_at(&mut self, now: Instant) -> Said {
        let Some(run) = self.run.take() else { return Said::Nothing };
        let what = self.what;
        let took_ms = now.duration_since(run.since).as_millis() as u64;
        tracing::info!(failed = run.failed, requests = run.requests, took_ms, "{what} works again");
        Said::Ended(run.failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_is_said_once_then_summarised_then_ended() {
        let mut outage = Outage::new("audit batch commit", Level::Error);
        let t0 = Instant::now();
        assert_eq!(outage.succeeded_at(t0), Said::Nothing);
        assert_eq!(outage.failed_at(t0, "storage_full", &"full", Some(3)), Said::Began);
        for i in 1..=99u64 {
            let at = t0 + SUMMARY_EVERY * (i as u32) / 100;
            assert_eq!(outage.failed_at(at, "storage_full", &"full", Some(3)), Said::Nothing, "failure {i}");
        }
        // A hundred failures within the first period: one line, then one summary of the 99.
        assert_eq!(outage.failed_at(t0 + SUMMARY_EVERY, "storage_full", &"full", Some(3)), Said::Still(100));
        assert_eq!(
            outage.failed_at(t0 + SUMMARY_EVERY * 3 / 2, "storage_full", &"full", Some(0)),
            Said::Nothing
        );
        assert_eq!(
            outage.failed_at(t0 + SUMMARY_EVERY * 2, "storage_full", &"full", Some(0)),
            Said::Still(2)
        );
        assert_eq!(outage.succeeded_at(t0 + SUMMARY_EVERY * 2), Said::Ended(103));
        assert_eq!(outage.succeeded_at(t0 + SUMMARY_EVERY * 3), Said::Nothing);
        // A new run begins with its own line.
        assert_eq!(outage.failed_at(t0 + SUMMARY_EVERY * 3, "unavailable", &"x", None), Said::Began);
    }
}
