//! Group commit: the audit-first request path's engine.
//!
//! Every request becomes a [`Job`]: a closure that performs the request's reads and writes in
//! a store transaction and returns the request's encoded audit event. One committer thread
//! takes whatever jobs are waiting (up to [`MAX_BATCH`]), runs them one after another in
//! **one** transaction, appends each job's event to the region's pending audit queue under a
//! versionstamped key in that same transaction, and commits. Only then is each request told
//! its outcome and its event's durable position. The fsync of one commit is shared by the
//! whole batch, and while it runs the next batch gathers.
//!
//! If the commit fails, every request of the batch fails: no request is answered without its
//! audit event durable (fail closed). On a conflict (another node committed to the same store)
//! the whole batch is re-run from scratch, so jobs must be free of side effects outside the
//! transaction.
//!
//! Jobs in one batch see each other's writes in batch order: the batch is serializable as
//! that order.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arca_store::{Store, StoreError, StoreExt, Transaction, Versionstamp};
use tokio::sync::oneshot;

/// Most jobs in one transaction.
pub const MAX_BATCH: usize = 256;
/// How long a small batch waits for more jobs before committing.
const LINGER: std::time::Duration = std::time::Duration::from_micros(50);
/// Batches smaller than this linger.
const LINGER_BELOW: usize = 8;

/// A request's work: its reads and writes in `tx`; returns its encoded audit event.
/// Errors of the request itself are *not* errors here: they are recorded in the event.
/// A `StoreError` aborts the attempt (and, if retryable, re-runs the batch).
pub type JobFn = Box<dyn FnMut(&mut dyn Transaction, &Gate) -> Result<Vec<u8>, StoreError> + Send>;

/// Whether this region accepts writes, as read in the batch's own transaction (so a
/// promotion or a fencing commits either before or after the whole batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    pub writable: bool,
    /// The primary region, as this region knows it.
    pub primary: String,
    /// Regions are configured: writes are recorded in the change feed for the standbys.
    pub replicating: bool,
}

impl Gate {
    fn read(tx: &mut dyn Transaction) -> Result<Gate, StoreError> {
        match arca_replication::apply::load_state(tx) {
            Ok(None) => Ok(Gate { writable: true, primary: String::new(), replicating: false }),
            Ok(Some(state)) => {
                Ok(Gate { writable: state.writable(), primary: state.primary, replicating: true })
            }
            Err(arca_replication::ApplyError::Store(e)) => Err(e),
            Err(_) => Err(StoreError::Corrupt("the region state is unreadable")),
        }
    }
}

/// The transaction a job sees: every call goes to the batch's transaction; writes to the
/// replicated keyspace are recorded for the change feed, and refused when the region does
/// not accept writes (a backstop: operations that write are refused before they start).
struct Recorder<'a> {
    tx: &'a mut dyn Transaction,
    writable: bool,
    /// Regions are configured: keep the ops for the change feed.
    keep: bool,
    ops: Vec<arca_replication::Op>,
    /// The batch attempt's point reads (see [`Memo`]).
    memo: &'a mut Memo,
}

/// Point reads already made in this batch attempt, by key: requests of one batch mostly
/// share a token, its policies and the mount, so each is read from the store once per batch
/// instead of once per request. Only conflict-adding reads (`get`) are remembered, writes of
/// the batch update the entry (read-your-writes, as the transaction itself), a range clear
/// forgets the entries in its range, and a retried attempt starts with an empty memo — so a
/// job sees exactly what it would see reading the transaction.
#[derive(Default)]
struct Memo {
    values: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Bytes held, bounded by [`MEMO_MAX_BYTES`]: past it, reads go to the store unremembered.
    bytes: usize,
}

const MEMO_MAX_BYTES: usize = 4 << 20;

impl Memo {
    fn remember(&mut self, key: &[u8], value: Option<&[u8]>) {
        let size = key.len() + value.map_or(0, <[u8]>::len);
        if let Some(slot) = self.values.get_mut(key) {
            self.bytes -= slot.as_deref().map_or(0, <[u8]>::len);
            self.bytes += value.map_or(0, <[u8]>::len);
            *slot = value.map(<[u8]>::to_vec);
        } else if self.bytes + size <= MEMO_MAX_BYTES {
            self.values.insert(key.to_vec(), value.map(<[u8]>::to_vec));
            self.bytes += size;
        }
    }
}

impl Recorder<'_> {
    fn record(
        &mut self,
        replicated: bool,
        op: impl FnOnce() -> arca_replication::Op,
    ) -> Result<(), StoreError> {
        if !replicated {
            return Ok(());
        }
        if !self.writable {
            return Err(StoreError::Corrupt(
                "a write reached the store of a region that does not accept writes",
            ));
        }
        if self.keep {
            self.ops.push(op());
        }
        Ok(())
    }
}

impl Transaction for Recorder<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.memo.values.get(key) {
            return Ok(value.clone());
        }
        let value = self.tx.get(key)?;
        self.memo.remember(key, value.as_deref());
        Ok(value)
    }

    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        // A remembered value was read with its conflict (or written) in this transaction;
        // a snapshot read is never remembered, so a later `get` still adds its conflict.
        if let Some(value) = self.memo.values.get(key) {
            return Ok(value.clone());
        }
        self.tx.get_snapshot(key)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        options: arca_store::RangeOptions,
    ) -> Result<Vec<arca_store::KeyValue>, StoreError> {
        self.tx.get_range(begin, end, options)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.record(arca_replication::replicated(key), || arca_replication::Op::Set {
            key: key.to_vec(),
            value: value.to_vec(),
        })?;
        self.tx.set(key, value)?;
        if self.memo.values.contains_key(key) {
            self.memo.remember(key, Some(value));
        }
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.record(arca_replication::replicated(key), || arca_replication::Op::Clear { key: key.to_vec() })?;
        self.tx.clear(key)?;
        if self.memo.values.contains_key(key) {
            self.memo.remember(key, None);
        }
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        let replicated = arca_replication::replicated(begin) || arca_replication::replicated(end);
        self.record(replicated, || arca_replication::Op::ClearRange {
            begin: begin.to_vec(),
            end: end.to_vec(),
        })?;
        self.tx.clear_range(begin, end)?;
        self.memo.values.retain(|key, _| key.as_slice() < begin || key.as_slice() >= end);
        Ok(())
    }

    fn set_versionstamped_key(
        &mut self,
        prefix: &[u8],
        suffix: &[u8],
        value: &[u8],
    ) -> Result<u16, StoreError> {
        self.tx.set_versionstamped_key(prefix, suffix, value)
    }

    fn maybe_committed(&self) -> bool {
        self.tx.maybe_committed()
    }

    fn commit(&mut self) -> Result<arca_store::CommitInfo, StoreError> {
        Err(StoreError::Corrupt("a job may not commit the batch"))
    }

    fn on_error(&mut self, _err: &StoreError) -> Result<(), StoreError> {
        Err(StoreError::Corrupt("a job may not retry the batch"))
    }
}

struct Job {
    run: JobFn,
    done: oneshot::Sender<Result<Versionstamp, CommitFailed>>,
}

/// What the committer thread is asked to do: a request's job, or a task that must not
/// contend with the request path for the store's write lock (the sequencer's step).
enum Work {
    Request(Job),
    Task(Box<dyn FnOnce() + Send>),
}

/// The batch holding a request could not be committed; the request was not served.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the audit log could not be committed")]
pub struct CommitFailed;

/// Statistics for metrics.
#[derive(Debug, Default, Clone)]
pub struct CommitStats {
    pub batches: u64,
    pub jobs: u64,
    pub failed_batches: u64,
    pub commit_seconds_total: f64,
}

/// Handle to the committer thread. Dropping every handle stops the thread.
#[derive(Debug, Clone)]
pub struct Committer {
    queue: mpsc::Sender<Work>,
    stats: Arc<Mutex<CommitStats>>,
}

impl Committer {
    /// Starts the committer thread for `store`, appending events to `region`'s queue.
    pub fn start(store: Arc<dyn Store>, region: String) -> Self {
        let (queue, jobs) = mpsc::channel::<Work>();
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("arca-committer".into())
            .spawn(move || {
                // A committer that died would leave the node up but unable to serve anything:
                // crash instead of limping on, so the supervisor restarts the node.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(store.as_ref(), &region, jobs, &thread_stats)
                }));
                if outcome.is_err() {
                    eprintln!("arcad: the audit committer panicked; aborting");
                    std::process::abort();
                }
            })
            .expect("spawn the committer thread");
        Committer { queue, stats }
    }

    /// Submits a job and waits until its batch committed.
    pub async fn submit(&self, run: JobFn) -> Result<Versionstamp, CommitFailed> {
        let (done, wait) = oneshot::channel();
        self.queue.send(Work::Request(Job { run, done })).map_err(|_| CommitFailed)?;
        wait.await.map_err(|_| CommitFailed)?
    }

    /// Runs `task` on the committer thread between batches and returns its result (blocking
    /// the caller). In one process the committer is then the only writer, so the task never
    /// waits on SQLite's busy handler against the request path. `None` if the committer is
    /// gone.
    pub fn run_task<T: Send + 'static>(&self, task: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, wait) = mpsc::channel();
        let task = Box::new(move || {
            let _ = done.send(task());
        });
        self.queue.send(Work::Task(task)).ok()?;
        wait.recv().ok()
    }

    pub fn stats(&self) -> CommitStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// `ARCA_FAULT_INJECT=drop-audit-append`: drops one audit append in 64 — breaking arca's
/// central promise on purpose, so the chaos harness can show its checker catches it. Never
/// set it anywhere else.
fn drop_audit_append() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static ARMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    if !*ARMED.get_or_init(|| std::env::var("ARCA_FAULT_INJECT").is_ok_and(|v| v == "drop-audit-append")) {
        return false;
    }
    COUNT.fetch_add(1, Ordering::Relaxed) % 64 == 63
}

fn run(store: &dyn Store, region: &str, work: mpsc::Receiver<Work>, stats: &Mutex<CommitStats>) {
    let events = crate::keys::audit_events(region);
    let changes = arca_replication::changes();
    let mut last_batch_len = 0;
    let mut tasks: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    while let Ok(first) = work.recv() {
        let first = match first {
            Work::Request(job) => job,
            Work::Task(task) => {
                task();
                continue;
            }
        };
        let mut batch = vec![first];
        // Gather what is waiting. Under concurrency (the last batch had company), give
        // in-flight requests a few microseconds to arrive so that one fsync serves more of
        // them; a lone client never waits.
        let linger = last_batch_len > 1;
        let linger_until = Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match work.try_recv() {
                Ok(Work::Request(job)) => batch.push(job),
                Ok(Work::Task(task)) => tasks.push(task),
                Err(_) if linger && batch.len() < LINGER_BELOW && Instant::now() < linger_until => {
                    std::thread::yield_now()
                }
                Err(_) => break,
            }
        }
        last_batch_len = batch.len();
        let started = Instant::now();
        let outcome = store.transact(|tx| {
            let gate = Gate::read(tx)?;
            let mut orders = Vec::with_capacity(batch.len());
            let mut memo = Memo::default();
            for job in batch.iter_mut() {
                let mut recorder = Recorder {
                    tx: &mut *tx,
                    writable: gate.writable,
                    keep: gate.replicating,
                    ops: Vec::new(),
                    memo: &mut memo,
                };
                let event = (job.run)(&mut recorder, &gate)?;
                let ops = std::mem::take(&mut recorder.ops);
                let order = match orders.last() {
                    // Fault injection for the chaos checkers' self-test: answer a request
                    // without its audit event (it borrows its neighbour's position).
                    Some(previous) if drop_audit_append() => *previous,
                    _ => tx.set_versionstamped_key(&events, b"", &event)?,
                };
                if !ops.is_empty() {
                    // The request's writes, for the standbys: stamped in this batch, with
                    // the order of the request's audit event (the write's audit position).
                    let record = arca_replication::ChangeRecord {
                        event_order: order,
                        time_unix_ms: crate::node::now_unix_ms(),
                        ops,
                    };
                    tx.set_versionstamped_key(&changes, b"", &record.encode())?;
                }
                orders.push(order);
            }
            Ok::<_, StoreError>(orders)
        });
        let elapsed = started.elapsed().as_secs_f64();
        let size = batch.len();
        let failed = outcome.is_err();
        match outcome {
            Ok(committed) => {
                for (job, order) in batch.into_iter().zip(committed.value) {
                    let position = committed.commit.versionstamp(order).ok_or(CommitFailed);
                    // The requester may have gone away; its event is durable regardless.
                    let _ = job.done.send(position);
                }
            }
            Err(err) => {
                tracing::error!(code = err.code(), error = %err, jobs = size, "audit batch failed to commit; failing its requests");
                for job in batch {
                    let _ = job.done.send(Err(CommitFailed));
                }
            }
        }
        let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.batches += 1;
        stats.jobs += size as u64;
        stats.commit_seconds_total += elapsed;
        stats.failed_batches += u64::from(failed);
        drop(stats);
        for task in tasks.drain(..) {
            task();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_store::{SqliteConfig, SqliteStore};

    fn recorder<'a>(tx: &'a mut dyn Transaction, memo: &'a mut Memo) -> Recorder<'a> {
        Recorder { tx, writable: true, keep: false, ops: Vec::new(), memo }
    }

    #[test]
    fn the_batch_memo_sees_exactly_what_the_transaction_sees() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        store.transact(|tx| tx.set(b"b/token", b"t1")).unwrap();
        store
            .transact(|tx| {
                let mut memo = Memo::default();
                let mut r = recorder(tx, &mut memo);
                // A snapshot read is not remembered; a conflicting read is.
                assert_eq!(r.get_snapshot(b"b/token")?.as_deref(), Some(&b"t1"[..]));
                assert!(r.memo.values.is_empty());
                assert_eq!(r.get(b"b/token")?.as_deref(), Some(&b"t1"[..]));
                assert_eq!(r.get(b"b/missing")?, None);
                assert_eq!(r.memo.values.len(), 2);
                // Remembered values are served from the memo…
                r.tx.set(b"b/token", b"behind the memo's back")?;
                assert_eq!(r.get(b"b/token")?.as_deref(), Some(&b"t1"[..]));
                // …and writes through the recorder update it, as read-your-writes would.
                r.set(b"b/token", b"t2")?;
                r.set(b"b/missing", b"now here")?;
                assert_eq!(r.get(b"b/token")?.as_deref(), Some(&b"t2"[..]));
                assert_eq!(r.get_snapshot(b"b/missing")?.as_deref(), Some(&b"now here"[..]));
                r.clear(b"b/token")?;
                assert_eq!(r.get(b"b/token")?, None);
                // A range clear forgets what it covers, and only that.
                r.set(b"c/kept", b"k")?;
                assert_eq!(r.get(b"c/kept")?.as_deref(), Some(&b"k"[..]));
                r.clear_range(b"b/", b"b0")?;
                assert!(!r.memo.values.contains_key(&b"b/missing"[..]));
                assert_eq!(r.get(b"b/missing")?, None);
                assert!(r.memo.values.contains_key(&b"c/kept"[..]));
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn the_batch_memo_stops_remembering_past_its_bound() {
        let mut memo = Memo::default();
        let big = vec![7u8; MEMO_MAX_BYTES / 2];
        memo.remember(b"one", Some(&big));
        memo.remember(b"two", Some(&big));
        assert!(memo.values.contains_key(&b"one"[..]) && !memo.values.contains_key(&b"two"[..]));
        assert!(memo.bytes <= MEMO_MAX_BYTES);
    }
}
