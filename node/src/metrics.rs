//! Prometheus metrics, rendered in the text exposition format by `/metrics`.
//!
//! Request counts and latency by operation and outcome; the committer's batch sizes and
//! commit latency; seal state. Labels are operation names and outcomes only — never paths,
//! which may be sensitive in aggregate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_audit::Operation;

use crate::committer::CommitStats;
use crate::listen::ListenerStats;

const BUCKETS_SECONDS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Upper bounds for the committer's batch durations, in seconds: a read batch takes
/// ~0.2–0.4 ms and every request of a batch waits for all of it, so the tail is resolved
/// below 1 ms.
pub const COMMIT_BUCKETS_SECONDS: [f64; 11] =
    [0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.25, 1.0];

/// A Prometheus histogram of durations in seconds: cumulative counts per upper bound.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum_seconds: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&BUCKETS_SECONDS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], count: 0, sum_seconds: 0.0 }
    }

    pub fn observe(&mut self, seconds: f64) {
        for (count, bound) in self.counts.iter_mut().zip(self.bounds) {
            *count += u64::from(seconds <= *bound);
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_seconds
    }

    /// `(upper bound, observations at most that)`, bound by bound.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds.iter().copied().zip(self.counts.iter().copied())
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name` with `labels`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.buckets() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}\n{name}_count{braces} {}", self.sum_seconds, self.count);
    }
}

/// The node's metrics registry.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Per integrated batch: the largest delay from event time to signed checkpoint.
    integration: Mutex<(Histogram, u64)>,
    /// The last delays (ms, per batch, the oldest entry's), for quantiles in benchmarks.
    recent_delays_ms: Mutex<std::collections::VecDeque<u64>>,
    /// Each listener's connections and timeouts, by the listener's name.
    listeners: Mutex<BTreeMap<&'static str, Arc<ListenerStats>>>,
    /// The scheduler's failed tries and what waits to be tried again, by [`Retried`].
    scheduler_failures: [AtomicU64; 3],
    scheduler_waiting: [AtomicU64; 3],
}

/// What the scheduler tries again after a failure (see `backoff.rs`).
#[derive(Debug, Clone, Copy)]
pub enum Retried {
    /// A secret's rotation.
    Rotation,
    /// An expired lease's revocation.
    Revocation,
    /// A database connection the reaper could not reach.
    Database,
}

impl Retried {
    const ALL: [Retried; 3] = [Retried::Rotation, Retried::Revocation, Retried::Database];

    fn name(self) -> &'static str {
        match self {
            Retried::Rotation => "rotation",
            Retried::Revocation => "revocation",
            Retried::Database => "database",
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    fn render_listeners(&self, out: &mut String) {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if listeners.is_empty() {
            return;
        }
        let rendered: Vec<_> = listeners.iter().map(|(name, stats)| stats.render(name)).collect();
        let families = [
            "# HELP arca_listener_connections Connections open, by listener.\n# TYPE arca_listener_connections gauge\n",
            "# HELP arca_listener_max_connections Connections a listener holds open at once; past it, new ones wait in the kernel's backlog.\n# TYPE arca_listener_max_connections gauge\n",
            "# HELP arca_listener_accepted_total Connections accepted, by listener.\n# TYPE arca_listener_accepted_total counter\n",
            "# HELP arca_listener_timeouts_total Connections closed (HTTP body: requests refused) for taking too long, or for outliving their age and its grace, by listener and reason.\n# TYPE arca_listener_timeouts_total counter\n",
            "# HELP arca_listener_body_bytes Bytes of request bodies being received, by listener.\n# TYPE arca_listener_body_bytes gauge\n",
            "# HELP arca_listener_max_body_bytes Bytes of request bodies a listener holds at once (listener.max_body_bytes_in_flight).\n# TYPE arca_listener_max_body_bytes gauge\n",
            "# HELP arca_listener_body_refused_total Requests refused because their listener held its limit of request-body bytes.\n# TYPE arca_listener_body_refused_total counter\n",
        ];
        for (i, family) in families.iter().enumerate() {
            out.push_str(family);
            for samples in &rendered {
                out.push_str(&samples[i]);
            }
        }
    }

    pub fn observe_request(&self, op: Operation, outcome: &'static str, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        requests.entry((op.name(), outcome)).or_default().observe(seconds);
    }

    /// A failed try of the scheduler's (a rotation, a revocation, a session with a database).
    pub fn scheduler_failed(&self, what: Retried) {
        self.scheduler_failures[what as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many of `what` wait to be tried again after a failure, as of the scheduler's
    /// last round on this node.
    pub fn scheduler_waiting(&self, what: Retried, count: usize) {
        self.scheduler_waiting[what as usize].store(count as u64, Ordering::Relaxed);
    }

    fn render_scheduler(&self, out: &mut String) {
        out.push_str("# HELP arca_scheduler_waiting Rotations, lease revocations and database connections that failed and wait to be tried again (a wait that doubles from 1 s to 5 min), on the region's scheduler node.\n# TYPE arca_scheduler_waiting gauge\n");
        for what in Retried::ALL {
            let count = self.scheduler_waiting[what as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "arca_scheduler_waiting{{task=\"{}\"}} {count}", what.name());
        }
        out.push_str("# HELP arca_scheduler_failures_total The scheduler's failed tries: rotations, lease revocations, and sessions with a database that could not be reached.\n# TYPE arca_scheduler_failures_total counter\n");
        for what in Retried::ALL {
            let count = self.scheduler_failures[what as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "arca_scheduler_failures_total{{task=\"{}\"}} {count}", what.name());
        }
    }

    /// Records an integrated batch of `count` entries with delays `(min, max)` in ms.
    pub fn observe_integration(&self, count: u64, delay_ms: (u64, u64)) {
        let seconds = delay_ms.1 as f64 / 1000.0;
        let mut guard = self.integration.lock().unwrap_or_else(|p| p.into_inner());
        let (h, entries) = &mut *guard;
        h.observe(seconds);
        *entries += count;
        drop(guard);
        let mut recent = self.recent_delays_ms.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == 10_000 {
            recent.pop_front();
        }
        recent.push_back(delay_ms.1);
    }

    /// The recent per-batch integration delays (ms), sorted.
    pub fn recent_integration_delays_ms(&self) -> Vec<u64> {
        let mut delays: Vec<u64> =
            self.recent_delays_ms.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        delays.sort_unstable();
        delays
    }

    /// Renders every metric.
    /// The counters of the listener called `name` (`grpc`, `http`, `replication`).
    pub fn listener(&self, name: &'static str) -> Arc<ListenerStats> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).entry(name).or_default().clone()
    }

    pub fn render(&self, sealed: bool, commits: &CommitStats) -> String {
        let mut out = String::new();
        self.render_listeners(&mut out);
        self.render_scheduler(&mut out);
        out.push_str("# HELP arca_request_duration_seconds Request latency, by operation and outcome.\n");
        out.push_str("# TYPE arca_request_duration_seconds histogram\n");
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for ((op, outcome), h) in requests.iter() {
            h.render(
                &mut out,
                "arca_request_duration_seconds",
                &format!("operation=\"{op}\",outcome=\"{outcome}\""),
            );
        }
        out.push_str("# HELP arca_requests_total Requests served, by operation and outcome.\n");
        out.push_str("# TYPE arca_requests_total counter\n");
        for ((op, outcome), h) in requests.iter() {
            let _ =
                writeln!(out, "arca_requests_total{{operation=\"{op}\",outcome=\"{outcome}\"}} {}", h.count);
        }
        let _ = writeln!(
            out,
            "# HELP arca_audit_batches_total Audit group-commit transactions.\n# TYPE arca_audit_batches_total counter\narca_audit_batches_total {}",
            commits.durations.count()
        );
        let _ = writeln!(
            out,
            "# TYPE arca_audit_batch_failures_total counter\narca_audit_batch_failures_total {}",
            commits.failed_batches
        );
        let _ = writeln!(
            out,
            "# HELP arca_audit_events_total Audit events committed or attempted.\n# TYPE arca_audit_events_total counter\narca_audit_events_total {}",
            commits.jobs
        );
        let _ = writeln!(
            out,
            "# HELP arca_audit_commit_seconds_total Time spent committing audit batches.\n# TYPE arca_audit_commit_seconds_total counter\narca_audit_commit_seconds_total {}",
            commits.durations.sum_seconds()
        );
        out.push_str("# HELP arca_audit_commit_seconds Audit group-commit transactions by duration, commit and fsync included (every request of a batch waits for all of it).\n# TYPE arca_audit_commit_seconds histogram\n");
        commits.durations.render(&mut out, "arca_audit_commit_seconds", "");
        out.push_str("# HELP arca_audit_step_commit_seconds Committer transactions that carried a sequencer step's writes (with the requests that joined them), by duration: set against arca_audit_commit_seconds, what a step adds to its batch.\n# TYPE arca_audit_step_commit_seconds histogram\n");
        commits.step_durations.render(&mut out, "arca_audit_step_commit_seconds", "");
        let _ = writeln!(
            out,
            "# HELP arca_committer_point_reads_total Point reads of committed audit batches, by where they were answered: the committer's memo or the store.\n# TYPE arca_committer_point_reads_total counter\narca_committer_point_reads_total{{source=\"memo\"}} {}\narca_committer_point_reads_total{{source=\"store\"}} {}",
            commits.memo_hits, commits.memo_misses
        );
        let _ = writeln!(
            out,
            "# HELP arca_store_upkeep_seconds_total Time the committer spent on the store's upkeep between batches (SQLite: the WAL checkpoint that lets the log restart); no request waits on it in its own batch.\n# TYPE arca_store_upkeep_seconds_total counter\narca_store_upkeep_seconds_total {}",
            commits.upkeep_seconds
        );
        let batches = commits.durations.count();
        let mean = if batches == 0 { 0.0 } else { commits.jobs as f64 / batches as f64 };
        let _ = writeln!(
            out,
            "# HELP arca_audit_batch_size_mean Mean requests per audit commit.\n# TYPE arca_audit_batch_size_mean gauge\narca_audit_batch_size_mean {mean}"
        );
        {
            let guard = self.integration.lock().unwrap_or_else(|p| p.into_inner());
            let (h, entries) = &*guard;
            let _ = writeln!(
                out,
                "# HELP arca_audit_integrated_entries_total Entries this node integrated into the signed log.\n# TYPE arca_audit_integrated_entries_total counter\narca_audit_integrated_entries_total {entries}"
            );
            out.push_str("# HELP arca_audit_integration_delay_seconds Per checkpoint, the oldest entry's delay from event to signed checkpoint.\n# TYPE arca_audit_integration_delay_seconds histogram\n");
            h.render(&mut out, "arca_audit_integration_delay_seconds", "");
        }
        let _ = writeln!(
            out,
            "# HELP arca_sealed Whether this node is sealed.\n# TYPE arca_sealed gauge\narca_sealed {}",
            u8::from(sealed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_durations_render_as_a_prometheus_histogram() {
        let mut commits = CommitStats::default();
        for seconds in [0.00048828125, 0.0009765625, 0.015625] {
            commits.durations.observe(seconds);
        }
        commits.step_durations.observe(0.0009765625);
        commits.upkeep_seconds = 0.25;
        let out = Metrics::default().render(false, &commits);
        for line in [
            "# TYPE arca_audit_commit_seconds histogram\n",
            "arca_audit_commit_seconds_bucket{le=\"0.00025\"} 0\n",
            "arca_audit_commit_seconds_bucket{le=\"0.0005\"} 1\n",
            "arca_audit_commit_seconds_bucket{le=\"0.032\"} 3\n",
            "arca_audit_commit_seconds_bucket{le=\"+Inf\"} 3\n",
            "arca_audit_commit_seconds_sum 0.01708984375\n",
            "arca_audit_batches_total 3\n",
            "arca_audit_commit_seconds_count 3\n",
            "arca_store_upkeep_seconds_total 0.25\n",
            "# TYPE arca_audit_step_commit_seconds histogram\n",
            "arca_audit_step_commit_seconds_bucket{le=\"0.0005\"} 0\n",
            "arca_audit_step_commit_seconds_bucket{le=\"0.001\"} 1\n",
            "arca_audit_step_commit_seconds_count 1\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from:\n{out}");
        }
    }
}
