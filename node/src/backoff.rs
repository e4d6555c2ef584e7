//! Waits before trying again a background task that failed: the scheduler's rotations and
//! the lease reaper's revocations. Each try is an audit event, a log line and a call to
//! another system (a rotator, a database), so something that keeps failing is not tried
//! every scheduler round (twice a second) but after a wait that doubles, [`FIRST`] up to
//! [`MAX`]. Kept in memory: a new scheduler (after a restart or a lease change) tries once
//! at once, then backs off.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The first wait after a failure; it doubles with each failure after it.
pub const FIRST: Duration = Duration::from_secs(1);
/// The longest wait between tries of something that keeps failing.
pub const MAX: Duration = Duration::from_secs(300);

/// What failed, and when each may be tried again.
#[derive(Debug)]
pub struct Backoff<K> {
    failing: HashMap<K, Retry>,
}

#[derive(Debug)]
struct Retry {
    failures: u32,
    wait: Duration,
    not_before: Instant,
}

impl<K> Default for Backoff<K> {
    fn default() -> Backoff<K> {
        Backoff { failing: HashMap::new() }
    }
}

impl<K: Eq + Hash> Backoff<K> {
    /// Whether `key` may be tried at `now`: it never failed, or its wait is over.
    pub fn due(&self, key: &K, now: Instant) -> bool {
        self.failing.get(key).is_none_or(|r| now >= r.not_before)
    }

    /// Records a failure; answers how many in a row and the wait before the next try.
    pub fn failed(&mut self, key: K, now: Instant) -> (u32, Duration) {
        let retry =
            self.failing.entry(key).or_insert(Retry { failures: 0, wait: Duration::ZERO, not_before: now });
        retry.failures = retry.failures.saturating_add(1);
        retry.wait = if retry.wait.is_zero() { FIRST } else { (retry.wait * 2).min(MAX) };
        retry.not_before = now + retry.wait;
        (retry.failures, retry.wait)
    }

    /// A success: the next failure starts the waits over.
    pub fn succeeded(&mut self, key: &K) {
        self.failing.remove(key);
    }

    /// How many are waiting after a failure.
    pub fn len(&self) -> usize {
        self.failing.len()
    }

    pub fn is_empty(&self) -> bool {
        self.failing.is_empty()
    }

    /// Forgets every key not in `seen` (a whole scan's keys): it is no longer there to try.
    pub fn keep_only(&mut self, seen: &HashSet<K>) {
        self.failing.retain(|key, _| seen.contains(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_waits_longer_each_time_and_not_at_all_once_it_works() {
        let mut retries = Backoff::default();
        let key = ("secret".to_owned(), "app/pg".to_owned());
        let other = ("secret".to_owned(), "app/redis".to_owned());
        let t0 = Instant::now();
        assert!(retries.due(&key, t0), "what never failed is due at once");
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let (failures, wait) = retries.failed(key.clone(), now);
            assert_eq!(failures as usize, waits.len() + 1);
            assert!(!retries.due(&key, now + wait - Duration::from_millis(1)));
            assert!(retries.due(&other, now), "one key's failures hold back no other");
            now += wait;
            assert!(retries.due(&key, now));
            waits.push(wait.as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        retries.succeeded(&key);
        assert!(retries.due(&key, now));
        assert_eq!(retries.failed(key.clone(), now).1, FIRST, "a success starts the waits over");
        retries.failed(other.clone(), now);
        retries.keep_only(&HashSet::from([other.clone()]));
        assert_eq!((retries.len(), retries.due(&key, now), retries.due(&other, now)), (1, true, false));
    }
}
