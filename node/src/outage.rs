//! Logging a loop's failures without flooding the log.
//!
//! When the store cannot commit (its disk full, say) every batch of requests fails, and the
//! sequencer's step with them: at thousands of requests a second, a line per failure would
//! bury the cause and fill the disk the logs share. [`Outage`] logs the first failure of a
//! run at once, then at most one line per [`SUMMARY_EVERY`] with how many failed since, and
//! one line when the loop works again. A loop that flaps (fails, works, fails: a nearly
//! full disk takes a small batch and refuses a large one) is held to the same pace: a
//! failure within [`SUMMARY_EVERY`] of the last line waits for the next summary, and
//! failures no line has counted yet are reported once the loop has worked for that long.

use std::time::{Duration, Instant};

/// How often a run of failures is summarised, at most.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// How loud a loop's failures are.
#[derive(Clone, Copy, Debug)]
pub enum Level {
    Warn,
    Error,
}

/// The failures of one loop (`what`: "audit batch commit", "sequencer step").
#[derive(Debug)]
pub struct Outage {
    what: &'static str,
    level: Level,
    /// The run of failures under way, if the last attempt failed.
    run: Option<Run>,
    /// When the last line was logged.
    last_line: Option<Instant>,
    /// What no line has counted yet.
    held: Counts,
}

#[derive(Debug)]
struct Run {
    since: Instant,
    /// Whether a line has named this run (its first failure, or a summary).
    named: bool,
    failed: u64,
}

#[derive(Debug, Default)]
struct Counts {
    failed: u64,
    /// Requests failed with them, for loops that serve requests.
    requests: Option<u64>,
    /// Times the loop worked again between them.
    recovered: u64,
}

/// What [`Outage`] logged (returned for the tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Said {
    Nothing,
    /// The first failure of a run.
    Began,
    /// A summary of this many failures no line had counted.
    Still(u64),
    /// The loop works again; this many failures no line had counted.
    Ended(u64),
}

impl Outage {
    pub fn new(what: &'static str, level: Level) -> Self {
        Outage { what, level, run: None, last_line: None, held: Counts::default() }
    }

    /// One failure, of an attempt that carried `requests` requests (for loops that serve
    /// them). `code` and `error` are the store's, the API's or the loop's own: they never
    /// name a key or carry a value.
    pub fn failed(&mut self, code: &str, error: &dyn std::fmt::Display, requests: Option<usize>) -> Said {
        self.failed_at(Instant::now(), code, error, requests)
    }

    /// The loop worked. Without a failure to report, this reads no clock (the committer
    /// calls it per batch).
    pub fn succeeded(&mut self) -> Said {
        if self.run.is_none() && self.held.failed == 0 {
            return Said::Nothing;
        }
        self.succeeded_at(Instant::now())
    }

    fn quiet(&self, now: Instant) -> bool {
        self.last_line.is_none_or(|last| now.duration_since(last) >= SUMMARY_EVERY)
    }

    fn failed_at(
        &mut self,
        now: Instant,
        code: &str,
        error: &dyn std::fmt::Display,
        requests: Option<usize>,
    ) -> Said {
        self.held.failed += 1;
        if let Some(n) = requests {
            self.held.requests = Some(self.held.requests.unwrap_or(0) + n as u64);
        }
        let quiet = self.quiet(now);
        let run = self.run.get_or_insert(Run { since: now, named: false, failed: 0 });
        run.failed += 1;
        if !quiet {
            return Said::Nothing;
        }
        let (what, every) = (self.what, SUMMARY_EVERY.as_secs());
        let fresh = !run.named && self.held.failed == 1 && self.held.recovered == 0;
        run.named = true;
        let since_s = now.duration_since(run.since).as_secs();
        let Counts { failed, requests, recovered } = std::mem::take(&mut self.held);
        self.last_line = Some(now);
        if fresh {
            match self.level {
                Level::Warn => {
                    tracing::warn!(code, %error, requests, "{what} failed (further failures summarised every {every}s)")
                }
                Level::Error => {
                    tracing::error!(code, %error, requests, "{what} failed (further failures summarised every {every}s)")
                }
            }
            return Said::Began;
        }
        match self.level {
            Level::Warn => {
                tracing::warn!(code, %error, requests, recovered, since_s, "{what} still failing: {failed} more failures")
            }
            Level::Error => {
                tracing::error!(code, %error, requests, recovered, since_s, "{what} still failing: {failed} more failures")
            }
        }
        Said::Still(failed)
    }

    fn succeeded_at(&mut self, now: Instant) -> Said {
        let what = self.what;
        if let Some(run) = self.run.take() {
            if run.named {
                let Counts { failed, requests, recovered } = std::mem::take(&mut self.held);
                let (took_ms, total) = (now.duration_since(run.since).as_millis() as u64, run.failed);
                tracing::info!(
                    failed = total,
                    unsummarised = failed,
                    requests,
                    recovered,
                    took_ms,
                    "{what} works again"
                );
                self.last_line = Some(now);
                return Said::Ended(failed);
            }
            self.held.recovered += 1;
        }
        // Failures of runs no line named (the loop flapped within a summary's wait), once the
        // loop has worked for a whole wait.
        if self.held.failed == 0 || !self.quiet(now) {
            return Said::Nothing;
        }
        let Counts { failed, requests, recovered } = std::mem::take(&mut self.held);
        tracing::info!(unsummarised = failed, requests, recovered, "{what} works again");
        self.last_line = Some(now);
        Said::Ended(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(outage: &mut Outage, at: Instant) -> Said {
        outage.failed_at(at, "storage_full", &"the store's disk is full", Some(2))
    }

    #[test]
    fn a_run_of_failures_is_said_once_then_summarised_then_ended() {
        let mut outage = Outage::new("audit batch commit", Level::Error);
        let t0 = Instant::now();
        assert_eq!(outage.succeeded_at(t0), Said::Nothing);
        assert_eq!(fail(&mut outage, t0), Said::Began);
        for i in 1..=99u32 {
            assert_eq!(fail(&mut outage, t0 + SUMMARY_EVERY * i / 100), Said::Nothing, "failure {i}");
        }
        // A hundred failures in the first wait: one line, then one summary of the rest.
        assert_eq!(fail(&mut outage, t0 + SUMMARY_EVERY), Said::Still(100));
        assert_eq!(fail(&mut outage, t0 + SUMMARY_EVERY * 3 / 2), Said::Nothing);
        assert_eq!(fail(&mut outage, t0 + SUMMARY_EVERY * 2), Said::Still(2));
        // The recovery is said at once, with what no summary counted yet.
        assert_eq!(fail(&mut outage, t0 + SUMMARY_EVERY * 2 + Duration::from_millis(1)), Said::Nothing);
        assert_eq!(outage.succeeded_at(t0 + SUMMARY_EVERY * 2 + Duration::from_millis(2)), Said::Ended(1));
        assert_eq!(outage.succeeded_at(t0 + SUMMARY_EVERY * 5), Said::Nothing);
        // A new run, long after, begins with its own line.
        assert_eq!(fail(&mut outage, t0 + SUMMARY_EVERY * 5), Said::Began);
        assert_eq!(outage.succeeded_at(t0 + SUMMARY_EVERY * 5), Said::Ended(0));
    }

    #[test]
    fn a_flapping_loop_logs_two_lines_a_wait_at_most_and_reports_every_failure() {
        let mut outage = Outage::new("audit batch commit", Level::Error);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // (lines, failures reported)
        let mut said = (0, 0);
        let count = |said: &mut (u64, u64), what: Said| match what {
            Said::Nothing => {}
            Said::Began => *said = (said.0 + 1, said.1 + 1),
            Said::Still(n) | Said::Ended(n) => *said = (said.0 + 1, said.1 + n),
        };
        // Fails and works in turn every millisecond for 25 s: 12,500 failures.
        for i in 0..12_500u64 {
            count(&mut said, fail(&mut outage, t0 + ms(2 * i)));
            count(&mut said, outage.succeeded_at(t0 + ms(2 * i + 1)));
        }
        // The first failure and its recovery, then at most a summary and a recovery per wait
        // (against 25,000 lines for a line per event).
        assert!(said.0 <= 2 + 2 * 2, "{} lines for 25 s of flapping", said.0);
        // Then the loop works: what no line counted is reported once a wait has passed.
        assert_eq!(outage.succeeded_at(t0 + ms(25_000)), Said::Nothing);
        count(&mut said, outage.succeeded_at(t0 + ms(31_000)));
        assert_eq!(said.1, 12_500, "every failure is counted in some line");
        assert!(said.0 <= 2 + 2 * 2 + 1);
        assert_eq!(outage.succeeded_at(t0 + ms(60_000)), Said::Nothing);
    }
}
