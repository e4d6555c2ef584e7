//! Prometheus metrics, rendered in the text exposition format by `/metrics`.
//!
//! Request counts and latency by operation and outcome; the committer's batch sizes and
//! commit latency; seal state. Labels are operation names and outcomes only — never paths,
//! which may be sensitive in aggregate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use arca_audit::Operation;

use crate::committer::{COMMIT_BUCKETS_SECONDS, CommitStats};

const BUCKETS_SECONDS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS_SECONDS.len()],
    count: u64,
    sum_seconds: f64,
}

/// The node's metrics registry.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Per integrated batch: the largest delay from event time to signed checkpoint.
    integration: Mutex<(Histogram, u64)>,
    /// The last delays (ms, per batch, the oldest entry's), for quantiles in benchmarks.
    recent_delays_ms: Mutex<std::collections::VecDeque<u64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn observe_request(&self, op: Operation, outcome: &'static str, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let h = requests.entry((op.name(), outcome)).or_default();
        for (i, bound) in BUCKETS_SECONDS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum_seconds += seconds;
    }

    /// Records an integrated batch of `count` entries with delays `(min, max)` in ms.
    pub fn observe_integration(&self, count: u64, delay_ms: (u64, u64)) {
        let seconds = delay_ms.1 as f64 / 1000.0;
        let mut guard = self.integration.lock().unwrap_or_else(|p| p.into_inner());
        let (h, entries) = &mut *guard;
        for (i, bound) in BUCKETS_SECONDS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum_seconds += seconds;
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
    pub fn render(&self, sealed: bool, commits: &CommitStats) -> String {
        let mut out = String::new();
        out.push_str("# HELP arca_request_duration_seconds Request latency, by operation and outcome.\n");
        out.push_str("# TYPE arca_request_duration_seconds histogram\n");
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for ((op, outcome), h) in requests.iter() {
            let labels = format!("operation=\"{op}\",outcome=\"{outcome}\"");
            for (i, bound) in BUCKETS_SECONDS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "arca_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(out, "arca_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "arca_request_duration_seconds_sum{{{labels}}} {}", h.sum_seconds);
            let _ = writeln!(out, "arca_request_duration_seconds_count{{{labels}}} {}", h.count);
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
            commits.batches
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
            commits.commit_seconds_total
        );
        out.push_str("# HELP arca_audit_commit_seconds Audit group-commit transactions by duration, commit and fsync included (every request of a batch waits for all of it).\n# TYPE arca_audit_commit_seconds histogram\n");
        for (count, bound) in commits.commit_seconds_buckets.iter().zip(COMMIT_BUCKETS_SECONDS) {
            let _ = writeln!(out, "arca_audit_commit_seconds_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "arca_audit_commit_seconds_bucket{{le=\"+Inf\"}} {0}\narca_audit_commit_seconds_sum {1}\narca_audit_commit_seconds_count {0}",
            commits.batches, commits.commit_seconds_total
        );
        let _ = writeln!(
            out,
            "# HELP arca_committer_point_reads_total Point reads of committed audit batches, by where they were answered: the committer's memo or the store.\n# TYPE arca_committer_point_reads_total counter\narca_committer_point_reads_total{{source=\"memo\"}} {}\narca_committer_point_reads_total{{source=\"store\"}} {}",
            commits.memo_hits, commits.memo_misses
        );
        let mean = if commits.batches == 0 { 0.0 } else { commits.jobs as f64 / commits.batches as f64 };
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
            for (i, bound) in BUCKETS_SECONDS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "arca_audit_integration_delay_seconds_bucket{{le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(out, "arca_audit_integration_delay_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(
                out,
                "arca_audit_integration_delay_seconds_sum {}\narca_audit_integration_delay_seconds_count {}",
                h.sum_seconds, h.count
            );
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
        let commits = CommitStats {
            batches: 3,
            commit_seconds_total: 0.0123,
            commit_seconds_buckets: [0, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3],
            ..CommitStats::default()
        };
        let out = Metrics::default().render(false, &commits);
        for line in [
            "# TYPE arca_audit_commit_seconds histogram\n",
            "arca_audit_commit_seconds_bucket{le=\"0.00025\"} 0\n",
            "arca_audit_commit_seconds_bucket{le=\"0.0005\"} 1\n",
            "arca_audit_commit_seconds_bucket{le=\"0.032\"} 3\n",
            "arca_audit_commit_seconds_bucket{le=\"+Inf\"} 3\n",
            "arca_audit_commit_seconds_sum 0.0123\n",
            "arca_audit_commit_seconds_count 3\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from:\n{out}");
        }
    }
}
