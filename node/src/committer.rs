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
use std::time::{Duration, Instant};

use arca_store::{Store, StoreError, StoreExt, Transaction, Versionstamp};
use tokio::sync::oneshot;

use crate::memo::{Journal, Memo};
use crate::metrics::{COMMIT_BUCKETS_SECONDS, Histogram};
use crate::outage::{Level, Outage};
use crate::pending::{Pending, Write};

/// Most jobs in one transaction.
pub const MAX_BATCH: usize = 256;
/// How long a small batch waits for more jobs before committing.
const LINGER: std::time::Duration = std::time::Duration::from_micros(50);
/// Batches smaller than this linger.
const LINGER_BELOW: usize = 8;

/// A request's work: its reads and writes in `tx`; returns its encoded audit event and
/// whether it succeeded. Errors of the request itself are *not* errors here: they are
/// recorded in the event, and the request's writes are dropped (see [`crate::pending`]).
/// A `StoreError` aborts the attempt (and, if retryable, re-runs the batch).
pub type JobFn = Box<dyn FnMut(&mut dyn Transaction, &Gate) -> Result<Finished, StoreError> + Send>;

/// What a request's job hands back to the committer.
#[derive(Debug)]
pub struct Finished {
    /// The request's encoded audit event, appended whatever its outcome.
    pub event: Vec<u8>,
    /// The request succeeded: its writes are committed with its event. Otherwise they are
    /// dropped, and the request changed nothing.
    pub succeeded: bool,
}

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

    /// [`Gate::read`] through the batch's memo: the region state is read from the store
    /// only when the memo does not hold it (it is exact for this batch, see [`crate::memo`]).
    /// The read is the committer's own, so the memo's request statistics do not count it.
    fn read_memoized(tx: &mut dyn Transaction, memo: &mut Memo) -> Result<Gate, StoreError> {
        let counted = (memo.hits, memo.misses);
        let mut reader =
            Recorder { tx, writable: false, keep: false, ops: Vec::new(), memo: &mut *memo, pending: None };
        let gate = Gate::read(&mut reader);
        (memo.hits, memo.misses) = counted;
        gate
    }
}

/// The transaction a job sees: every call goes to the batch's transaction; writes to the
/// replicated keyspace are recorded for the change feed, and refused when the region does
/// not accept writes (a backstop: operations that write are refused before they start).
/// A request's writes are held in `pending` until its outcome is known ([`Recorder::settle`]).
struct Recorder<'a> {
    tx: &'a mut dyn Transaction,
    writable: bool,
    /// Regions are configured: keep the ops for the change feed.
    keep: bool,
    ops: Vec<arca_replication::Op>,
    /// Point reads already made, by key (see [`crate::memo`]): only conflict-adding reads
    /// (`get`) are remembered, writes update a remembered entry (read-your-writes, as the
    /// transaction itself) and a range clear forgets its range — so a job sees exactly what
    /// it would see reading the transaction.
    memo: &'a mut Memo,
    /// A request's writes, not yet in the transaction (`None`: writes go straight in, as a
    /// sequencer step's).
    pending: Option<Pending>,
}

impl Recorder<'_> {
    /// Where a write goes: into `pending` if the writes are held. A write the region does
    /// not accept is refused now either way.
    fn held(&mut self, replicated: bool) -> Result<Option<&mut Pending>, StoreError> {
        if self.pending.is_some() && replicated && !self.writable {
            return Err(NOT_WRITABLE);
        }
        Ok(self.pending.as_mut())
    }

    /// Ends a request's turn: its held writes go into the transaction (recorded for the
    /// change feed, followed by the memo) if it succeeded, and are dropped if not.
    fn settle(&mut self, succeeded: bool) -> Result<(), StoreError> {
        let Some(pending) = self.pending.take() else { return Ok(()) };
        if !succeeded || pending.is_empty() {
            return Ok(());
        }
        for write in pending.into_writes() {
            match write {
                Write::Set { key, value } => self.set(&key, &value)?,
                Write::Clear { key } => self.clear(&key)?,
                Write::Replace { old, new, value } => self.replace(&old, &new, &value)?,
                Write::ClearRange { begin, end } => self.clear_range(&begin, &end)?,
            }
        }
        Ok(())
    }

    /// A write to `key` updates what the memo remembers of it (read-your-writes).
    fn follow(&mut self, key: &[u8], value: Option<&[u8]>) {
        if self.memo.values.contains_key(key) {
            self.memo.remember(key, value);
        }
    }

    fn record(
        &mut self,
        replicated: bool,
        op: impl FnOnce() -> arca_replication::Op,
    ) -> Result<(), StoreError> {
        if !replicated {
            return Ok(());
        }
        if !self.writable {
            return Err(NOT_WRITABLE);
        }
        if self.keep {
            self.ops.push(op());
        }
        Ok(())
    }
}

const NOT_WRITABLE: StoreError =
    StoreError::Corrupt("a write reached the store of a region that does not accept writes");

impl Transaction for Recorder<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(held) = self.pending.as_ref().and_then(|p| p.get(key)) {
            return Ok(held.map(<[u8]>::to_vec));
        }
        if let Some(value) = self.memo.values.get(key) {
            self.memo.hits += 1;
            return Ok(value.clone());
        }
        let value = self.tx.get(key)?;
        self.memo.misses += 1;
        self.memo.remember(key, value.as_deref());
        Ok(value)
    }

    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(held) = self.pending.as_ref().and_then(|p| p.get(key)) {
            return Ok(held.map(<[u8]>::to_vec));
        }
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
        match &self.pending {
            Some(pending) => pending.get_range(&mut *self.tx, begin, end, options),
            None => self.tx.get_range(begin, end, options),
        }
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if let Some(pending) = self.held(arca_replication::replicated(key))? {
            pending.set(key, value);
            return Ok(());
        }
        self.record(arca_replication::replicated(key), || arca_replication::Op::Set {
            key: key.to_vec(),
            value: value.to_vec(),
        })?;
        self.tx.set(key, value)?;
        self.follow(key, Some(value));
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        if let Some(pending) = self.held(arca_replication::replicated(key))? {
            pending.clear(key);
            return Ok(());
        }
        self.record(arca_replication::replicated(key), || arca_replication::Op::Clear { key: key.to_vec() })?;
        self.tx.clear(key)?;
        self.follow(key, None);
        Ok(())
    }

    fn replace(&mut self, old: &[u8], new: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let replicated = arca_replication::replicated(old) || arca_replication::replicated(new);
        if let Some(pending) = self.held(replicated)? {
            pending.replace(old, new, value);
            return Ok(());
        }
        // Recorded as what it is, a clear and a set: standbys apply the two (the set alone
        // when the keys are one).
        if old != new {
            self.record(arca_replication::replicated(old), || arca_replication::Op::Clear {
                key: old.to_vec(),
            })?;
        }
        self.record(arca_replication::replicated(new), || arca_replication::Op::Set {
            key: new.to_vec(),
            value: value.to_vec(),
        })?;
        self.tx.replace(old, new, value)?;
        self.follow(old, None);
        self.follow(new, Some(value));
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        let replicated = arca_replication::replicated(begin) || arca_replication::replicated(end);
        if begin > end {
            return Err(StoreError::InvertedRange);
        }
        if let Some(pending) = self.held(replicated)? {
            pending.clear_range(begin, end);
            return Ok(());
        }
        self.record(replicated, || arca_replication::Op::ClearRange {
            begin: begin.to_vec(),
            end: end.to_vec(),
        })?;
        self.tx.clear_range(begin, end)?;
        self.memo.forget_range(begin, end);
        Ok(())
    }

    fn set_versionstamped_key(
        &mut self,
        prefix: &[u8],
        suffix: &[u8],
        value: &[u8],
    ) -> Result<u16, StoreError> {
        // Its order is this call's answer: it cannot wait for the request's outcome.
        if self.pending.is_some() {
            return Err(StoreError::Corrupt("a request may not write versionstamped keys"));
        }
        // The key is known only at commit: nothing remembered under the prefix may stand.
        match arca_store::prefix_end(prefix) {
            Some(end) => self.memo.forget_range(prefix, &end),
            None => *self.memo = Memo::default(),
        }
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

/// Writes that join a batch's transaction with no audit event of their own (the sequencer's
/// step): run before the batch's requests, again on every attempt of the transaction. An
/// error fails the whole batch, so a step returns only the store's errors; its own outcome
/// it keeps in what it captured.
pub type StepFn = Box<dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError> + Send>;

struct Step {
    run: StepFn,
    /// Whether the batch committed.
    done: mpsc::Sender<bool>,
}

/// What the committer thread is asked to do: a request's job, writes to join a batch, or a
/// task that must not contend with the request path for the store's write lock.
enum Work {
    Request(Job),
    Step(Step),
    Task(Box<dyn FnOnce() + Send>),
}

/// The batch holding a request could not be committed; the request was not served.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the audit log could not be committed")]
pub struct CommitFailed;

/// Statistics for metrics.
#[derive(Debug, Clone)]
pub struct CommitStats {
    /// Batches by how long their transaction took, commit and fsync included (its count is
    /// the batches committed or attempted).
    pub durations: Histogram,
    /// Transactions that carried a sequencer step's writes (with whatever requests joined
    /// them), by how long they took: set against `durations`, what a step adds to the
    /// requests of its batch.
    pub step_durations: Histogram,
    pub jobs: u64,
    pub failed_batches: u64,
    /// Point reads of committed batches answered from the memo, and from the store.
    pub memo_hits: u64,
    pub memo_misses: u64,
    /// Time spent in the store's upkeep between batches (SQLite: WAL checkpoints).
    pub upkeep_seconds: f64,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            durations: Histogram::new(&COMMIT_BUCKETS_SECONDS),
            step_durations: Histogram::new(&COMMIT_BUCKETS_SECONDS),
            jobs: 0,
            failed_batches: 0,
            memo_hits: 0,
            memo_misses: 0,
            upkeep_seconds: 0.0,
        }
    }
}

/// Handle to the committer thread. Dropping every handle stops the thread.
#[derive(Debug, Clone)]
pub struct Committer {
    queue: mpsc::Sender<Work>,
    stats: Arc<Mutex<CommitStats>>,
}

impl Committer {
    /// Starts the committer thread for `store`, appending events to `region`'s queue.
    /// `journal` records the commits every other code path of this process makes to the
    /// same store (through a [`crate::memo::JournaledStore`]), so the committer's memo of
    /// point reads can outlive a batch.
    pub fn start(store: Arc<dyn Store>, journal: Arc<Journal>, region: String) -> Self {
        let (queue, jobs) = mpsc::channel::<Work>();
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("arca-committer".into())
            .spawn(move || {
                // A committer that died would leave the node up but unable to serve anything:
                // crash instead of limping on, so the supervisor restarts the node.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(store.as_ref(), &journal, &region, jobs, &thread_stats)
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

    /// Runs `step` in the next batch's transaction (alone if no request is waiting) and waits
    /// for its commit, blocking the caller: `Some(true)` once committed, `Some(false)` if the
    /// batch failed (nothing of it was written), `None` if the committer is gone. The step's
    /// writes then share the batch's commit and fsync instead of taking one of their own
    /// between batches, and they go through the batch's memo, which stays exact.
    pub fn join_batch(&self, step: StepFn) -> Option<bool> {
        let (done, wait) = mpsc::channel();
        self.queue.send(Work::Step(Step { run: step, done })).ok()?;
        wait.recv().ok()
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

fn run(
    store: &dyn Store,
    journal: &Journal,
    region: &str,
    work: mpsc::Receiver<Work>,
    stats: &Mutex<CommitStats>,
) {
    let events = crate::keys::audit_events(region);
    let changes = arca_replication::changes();
    let mut last_batch_len = 0;
    let mut tasks: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    // The memo and the version of the commit it is exact at: the last batch's.
    let mut carried: Option<(u64, Memo)> = None;
    let mut steps: Vec<Step> = Vec::new();
    // A failed batch fails its requests (the store's disk full, say); the log says so once,
    // then sums up every ten seconds, and says when batches commit again.
    let mut outage = Outage::new("audit batch commit", Level::Error);
    while let Ok(first) = work.recv() {
        let mut batch = Vec::new();
        match first {
            Work::Request(job) => batch.push(job),
            Work::Step(step) => steps.push(step),
            Work::Task(task) => {
                task();
                continue;
            }
        }
        // Gather what is waiting. Under concurrency (the last batch had company), give
        // in-flight requests a few microseconds to arrive so that one fsync serves more of
        // them; a lone client never waits.
        let linger = last_batch_len > 1;
        let linger_until = Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match work.try_recv() {
                Ok(Work::Request(job)) => batch.push(job),
                Ok(Work::Step(step)) => steps.push(step),
                Ok(Work::Task(task)) => tasks.push(task),
                Err(_) if linger && batch.len() < LINGER_BELOW && Instant::now() < linger_until => {
                    std::thread::yield_now()
                }
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            last_batch_len = batch.len();
        }
        let started = Instant::now();
        let mut outcome = store.transact(|tx| {
            // Taken, so that a retried attempt (whose first attempt wrote into the memo)
            // starts afresh.
            let mut memo = match carried.take() {
                // The batch writes (its events) in any case: take the write lock now, and
                // the version of the state it reads with it.
                Some((at, mut memo)) if !memo.is_nearly_full() => match tx.lock_for_write()? {
                    Some(now) if journal.catch_up(&mut memo, at, now) => memo,
                    _ => Memo::default(),
                },
                _ => Memo::default(),
            };
            let gate = Gate::read_memoized(tx, &mut memo)?;
            for step in steps.iter_mut() {
                // The audit log's keys are not in the change feed (standbys get the log by its
                // own stream), and a standby sequences its region's log too: no ops, no gate.
                let mut recorder = Recorder {
                    tx: &mut *tx,
                    writable: true,
                    keep: false,
                    ops: Vec::new(),
                    memo: &mut memo,
                    pending: None,
                };
                (step.run)(&mut recorder)?;
            }
            let mut orders = Vec::with_capacity(batch.len());
            for job in batch.iter_mut() {
                let mut recorder = Recorder {
                    tx: &mut *tx,
                    writable: gate.writable,
                    keep: gate.replicating,
                    ops: Vec::new(),
                    memo: &mut memo,
                    pending: Some(Pending::default()),
                };
                let Finished { event, succeeded } = (job.run)(&mut recorder, &gate)?;
                recorder.settle(succeeded)?;
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
            Ok::<_, StoreError>((orders, memo))
        });
        let elapsed = started.elapsed().as_secs_f64();
        if !steps.is_empty() {
            stats.lock().unwrap_or_else(|p| p.into_inner()).step_durations.observe(elapsed);
        }
        for step in steps.drain(..) {
            let _ = step.done.send(outcome.is_ok());
        }
        // Counted before the replies, so a request's caller sees its batch in the statistics
        // (a batch of a sequencer step alone is not a batch of requests).
        if !batch.is_empty() {
            let mut counted = stats.lock().unwrap_or_else(|p| p.into_inner());
            counted.durations.observe(elapsed);
            counted.jobs += batch.len() as u64;
            counted.failed_batches += u64::from(outcome.is_err());
            if let Ok(committed) = &mut outcome {
                let memo = &mut committed.value.1;
                counted.memo_hits += std::mem::take(&mut memo.hits);
                counted.memo_misses += std::mem::take(&mut memo.misses);
            }
        }
        match outcome {
            Ok(committed) => {
                outage.succeeded();
                let (orders, memo) = committed.value;
                // The memo holds the state this commit left (what the batch read, with its
                // writes applied).
                carried = committed.commit.version.map(|version| (version, memo));
                for (job, order) in batch.into_iter().zip(orders) {
                    let position = committed.commit.versionstamp(order).ok_or(CommitFailed);
                    // The requester may have gone away; its event is durable regardless.
                    let _ = job.done.send(position);
                }
            }
            Err(err) => {
                outage.failed(err.code(), &err, Some(batch.len()));
                for job in batch {
                    let _ = job.done.send(Err(CommitFailed));
                }
            }
        }
        for task in tasks.drain(..) {
            task();
        }
        // The store's deferred upkeep (SQLite: the checkpoint that lets the WAL restart),
        // now that nobody waits on this thread. Counted when it did something (a due-check
        // alone takes nanoseconds).
        let upkeep = Instant::now();
        store.upkeep();
        let spent = upkeep.elapsed();
        if spent >= Duration::from_micros(1) {
            stats.lock().unwrap_or_else(|p| p.into_inner()).upkeep_seconds += spent.as_secs_f64();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_store::{SqliteConfig, SqliteStore};

    fn recorder<'a>(tx: &'a mut dyn Transaction, memo: &'a mut Memo) -> Recorder<'a> {
        Recorder { tx, writable: true, keep: false, ops: Vec::new(), memo, pending: None }
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
    fn a_replace_is_recorded_for_the_standbys_as_a_clear_and_a_set_and_kept_in_the_memo() {
        use arca_replication::Op;
        use arca_store::tuple::pack;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        let old = pack(&["kv".into(), "secret".into(), "v1".into()]);
        let new = pack(&["kv".into(), "secret".into(), "v2".into()]);
        store.transact(|tx| tx.set(&old, b"one")).unwrap();
        store
            .transact(|tx| {
                let mut memo = Memo::default();
                let mut r = Recorder {
                    tx,
                    writable: true,
                    keep: true,
                    ops: Vec::new(),
                    memo: &mut memo,
                    pending: None,
                };
                assert_eq!(r.get(&old)?.as_deref(), Some(&b"one"[..]));
                assert_eq!(r.get(&new)?, None);
                r.replace(&old, &new, b"two")?;
                assert_eq!(
                    r.ops,
                    vec![
                        Op::Clear { key: old.clone() },
                        Op::Set { key: new.clone(), value: b"two".to_vec() }
                    ]
                );
                // Both remembered reads follow the write.
                assert_eq!(r.get(&old)?, None);
                assert_eq!(r.get(&new)?.as_deref(), Some(&b"two"[..]));
                assert_eq!(r.memo.values.len(), 2);
                // A key replaced by itself (a KV write into its pruned version's slot) is
                // recorded as the set alone: a clear before it would be a wasted op.
                r.ops.clear();
                r.replace(&new, &new, b"three")?;
                assert_eq!(r.ops, vec![Op::Set { key: new.clone(), value: b"three".to_vec() }]);
                assert_eq!(r.get(&new)?.as_deref(), Some(&b"three"[..]));
                assert_eq!(r.tx.get(&new)?.as_deref(), Some(&b"three"[..]));
                // A region that takes no writes refuses it, before the store sees it.
                r.writable = false;
                assert!(r.replace(&new, &old, b"back").is_err());
                assert!(r.replace(&new, &new, b"back").is_err());
                assert_eq!(r.tx.get(&old)?, None);
                assert_eq!(r.tx.get(&new)?.as_deref(), Some(&b"three"[..]));
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn a_requests_writes_reach_the_transaction_the_memo_and_the_feed_only_if_it_succeeds() {
        use arca_replication::Op;
        use arca_store::tuple::pack;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        let key = pack(&["kv".into(), "secret".into(), "a".into()]);
        store.transact(|tx| tx.set(&key, b"before")).unwrap();
        store
            .transact(|tx| {
                let mut memo = Memo::default();
                let pending = Some(Pending::default());
                let mut r =
                    Recorder { tx, writable: true, keep: true, ops: Vec::new(), memo: &mut memo, pending };
                assert_eq!(r.get(&key)?.as_deref(), Some(&b"before"[..]));
                r.set(&key, b"failed")?;
                // The request reads its write; nothing else does yet.
                assert_eq!(r.get(&key)?.as_deref(), Some(&b"failed"[..]));
                assert_eq!(r.tx.get(&key)?.as_deref(), Some(&b"before"[..]));
                assert!(r.ops.is_empty());
                r.settle(false)?;
                assert_eq!(r.get(&key)?.as_deref(), Some(&b"before"[..]), "the memo did not follow it");
                assert_eq!(r.tx.get(&key)?.as_deref(), Some(&b"before"[..]));
                assert!(r.ops.is_empty(), "a failed request's writes are not sent to the standbys");
                // The next request succeeds: its writes go in, in order, recorded for the feed.
                r.pending = Some(Pending::default());
                r.set(&key, b"first")?;
                r.clear(&key)?;
                r.set(&key, b"after")?;
                r.settle(true)?;
                assert_eq!(r.get(&key)?.as_deref(), Some(&b"after"[..]));
                assert_eq!(r.tx.get(&key)?.as_deref(), Some(&b"after"[..]));
                assert_eq!(
                    r.ops,
                    vec![
                        Op::Set { key: key.clone(), value: b"first".to_vec() },
                        Op::Clear { key: key.clone() },
                        Op::Set { key: key.clone(), value: b"after".to_vec() },
                    ]
                );
                // A held write is refused at once where the region takes none, and a request
                // may not take a versionstamp it could not give back.
                r.pending = Some(Pending::default());
                r.writable = false;
                assert!(r.set(&key, b"refused").is_err());
                assert!(r.set_versionstamped_key(b"stamped/", b"", b"v").is_err());
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    /// Submits a job that runs `look` in its batch, waits for the commit, and returns what
    /// `look` saw (its last attempt's, if the batch was retried).
    fn seen_in_batch<T: Send + 'static>(
        committer: &Committer,
        mut look: impl FnMut(&mut dyn Transaction, &Gate) -> Result<T, StoreError> + Send + 'static,
    ) -> T {
        let (seen, read) = mpsc::channel();
        let job: JobFn = Box::new(move |tx, gate| {
            let _ = seen.send(look(tx, gate)?);
            Ok(Finished { event: b"event".to_vec(), succeeded: true })
        });
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(committer.submit(job)).unwrap();
        read.try_iter().last().unwrap()
    }

    /// Submits a job that reads `key` and returns what it read.
    fn read_in_batch(committer: &Committer, key: &'static [u8]) -> Option<Vec<u8>> {
        seen_in_batch(committer, move |tx, _gate| tx.get(key))
    }

    /// A committer on a fresh SQLite file, and the journaled store the rest of its process
    /// would write through.
    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        engine: Arc<dyn Store>,
        journaled: crate::memo::JournaledStore,
        committer: Committer,
    }

    fn fixture() -> Fixture {
        let _dir = tempfile::tempdir().unwrap();
        let path = _dir.path().join("s.db");
        let engine: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(&path)).unwrap());
        let journal = Arc::new(Journal::default());
        let journaled = crate::memo::JournaledStore::new(engine.clone(), journal.clone());
        let committer = Committer::start(engine.clone(), journal, "r".into());
        Fixture { _dir, path, engine, journaled, committer }
    }

    /// A store whose upkeep takes `work` of busy CPU time, and counts its calls.
    #[derive(Debug)]
    struct Upkept {
        inner: SqliteStore,
        calls: std::sync::atomic::AtomicU64,
        work: Duration,
    }

    impl Store for Upkept {
        fn engine(&self) -> &'static str {
            "sqlite"
        }
        fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
            self.inner.begin()
        }
        fn upkeep(&self) {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let start = Instant::now();
            while start.elapsed() < self.work {
                std::hint::spin_loop();
            }
        }
    }

    #[test]
    fn the_store_upkeep_runs_after_each_batch_and_its_time_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let work = Duration::from_micros(300);
        let store = Arc::new(Upkept {
            inner: SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap(),
            calls: Default::default(),
            work,
        });
        let committer = Committer::start(store.clone(), Arc::new(Journal::default()), "r".into());
        assert_eq!(committer.stats().upkeep_seconds, 0.0);
        // The committer runs upkeep after a batch's replies, so the first batch's has run
        // by the time the second batch answers (one thread, in order).
        read_in_batch(&committer, b"k");
        read_in_batch(&committer, b"k");
        assert!(store.calls.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        assert!(
            committer.stats().upkeep_seconds >= work.as_secs_f64(),
            "{:?}",
            committer.stats().upkeep_seconds
        );
    }

    #[test]
    fn a_step_commits_in_a_batch_whose_memo_sees_its_writes_or_fails_with_it() {
        let f = fixture();
        let stored = |key: &'static [u8]| f.engine.transact(|tx| tx.get(key)).unwrap().value;
        // A request reads the key first: the memo remembers it absent.
        assert_eq!(read_in_batch(&f.committer, b"audit/x"), None);
        // A step alone (no request waiting) is a batch of its own, and commits.
        assert_eq!(f.committer.join_batch(Box::new(|tx| tx.set(b"audit/x", b"1"))), Some(true));
        assert_eq!(stored(b"audit/x").as_deref(), Some(&b"1"[..]));
        // The memo carried into the next batch has the step's write, not the absence read.
        assert_eq!(read_in_batch(&f.committer, b"audit/x").as_deref(), Some(&b"1"[..]));
        // A step that fails fails its batch: nothing of it is written.
        let failing: StepFn = Box::new(|tx| {
            tx.set(b"audit/y", b"2")?;
            Err(StoreError::Corrupt("a failing step"))
        });
        assert_eq!(f.committer.join_batch(failing), Some(false));
        assert_eq!(stored(b"audit/y"), None);
        assert_eq!(read_in_batch(&f.committer, b"audit/y"), None);
    }

    /// Submits a job that reports the gate its batch read.
    fn gate_in_batch(committer: &Committer) -> Gate {
        seen_in_batch(committer, |_tx, gate| Ok(gate.clone()))
    }

    #[test]
    fn the_gate_read_through_the_memo_follows_every_change_of_the_region_state() {
        use arca_replication::{RegionState, Role};
        let Fixture { _dir, path, journaled, committer, .. } = fixture();
        let state = |role| RegionState::new(role, 1, "eu", 0);
        assert!(!gate_in_batch(&committer).replicating);
        // Written through this process's journal (a promotion, a demotion)…
        journaled.transact(|tx| arca_replication::apply::store_state(tx, &state(Role::Standby))).unwrap();
        let gate = gate_in_batch(&committer);
        assert!(gate.replicating && !gate.writable && gate.primary == "eu");
        journaled.transact(|tx| arca_replication::apply::store_state(tx, &state(Role::Primary))).unwrap();
        assert!(gate_in_batch(&committer).writable);
        // …and by another process, which the journal does not see.
        let other = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        other.transact(|tx| arca_replication::apply::store_state(tx, &state(Role::Fenced))).unwrap();
        assert!(!gate_in_batch(&committer).writable);
        // The committer's own reads are not the requests' memo statistics.
        assert_eq!((committer.stats().memo_hits, committer.stats().memo_misses), (0, 0));
    }

    #[test]
    fn batches_are_counted_by_how_long_their_transaction_took() {
        let Fixture { _dir, committer, .. } = fixture();
        read_in_batch(&committer, b"k");
        // A job that holds its batch for 1.1 s (the duration measured, not a wait): over the
        // last bucket, where a quick batch stays under it even on a loaded machine.
        seen_in_batch(&committer, |_tx, _gate| {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            Ok(())
        });
        let stats = committer.stats();
        let counts: Vec<u64> = stats.durations.buckets().map(|(_, count)| count).collect();
        assert_eq!(stats.durations.count(), 2);
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative: {counts:?}");
        assert_eq!(counts[counts.len() - 1], 1, "only the quick batch took at most 1 s: {counts:?}");
        assert!(stats.durations.sum_seconds() >= 1.1);
    }

    #[test]
    fn transactions_that_carry_a_sequencer_step_are_counted_apart() {
        let Fixture { _dir, committer, .. } = fixture();
        // A step alone (nothing else waiting), holding its transaction for 1.1 s (the duration
        // measured, not a wait): counted as a step's transaction, not as a batch of requests.
        let step: StepFn = Box::new(|tx| {
            tx.set(b"step", b"written")?;
            std::thread::sleep(std::time::Duration::from_millis(1100));
            Ok(())
        });
        assert_eq!(committer.join_batch(step), Some(true));
        let stats = committer.stats();
        assert_eq!((stats.step_durations.count(), stats.durations.count()), (1, 0));
        let counts: Vec<u64> = stats.step_durations.buckets().map(|(_, count)| count).collect();
        assert_eq!(counts[counts.len() - 1], 0, "the step took over 1 s: {counts:?}");
        assert!(stats.step_durations.sum_seconds() >= 1.1);
        // A batch of requests without a step is not a step's.
        assert_eq!(read_in_batch(&committer, b"step").as_deref(), Some(&b"written"[..]));
        let stats = committer.stats();
        assert_eq!((stats.step_durations.count(), stats.durations.count()), (1, 1));
    }

    #[test]
    fn the_memo_outlives_a_batch_only_while_the_store_proves_it_exact() {
        let Fixture { _dir, path, engine, journaled, committer } = fixture();
        let reads = |c: &Committer| (c.stats().memo_hits, c.stats().memo_misses);
        engine.transact(|tx| tx.set(b"k", b"a")).unwrap();

        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"a"[..]));
        assert_eq!(reads(&committer), (0, 1));
        // Nothing committed in between: the next batch is answered from the memo.
        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"a"[..]));
        assert_eq!(reads(&committer), (1, 1));
        // A commit through this process's journaled store: the memo forgets what it wrote.
        journaled.transact(|tx| tx.set(b"k", b"b")).unwrap();
        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"b"[..]));
        assert_eq!(reads(&committer), (1, 2));
        // …and only that.
        journaled.transact(|tx| tx.set(b"other", b"x")).unwrap();
        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"b"[..]));
        assert_eq!(reads(&committer), (2, 2));
        // A commit from another process (its own connection to the file): the memo is dropped.
        let other = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        other.transact(|tx| tx.set(b"k", b"c")).unwrap();
        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"c"[..]));
        assert_eq!(reads(&committer), (2, 3));
        // The engine itself, bypassing the journal, is the same as another process.
        engine.transact(|tx| tx.set(b"k", b"d")).unwrap();
        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"d"[..]));
        // A task on the committer thread writes through the journal like everyone else.
        let task_store = Arc::new(journaled);
        let in_task = task_store.clone();
        committer.run_task(move || in_task.transact(|tx| tx.set(b"k", b"e")).unwrap()).unwrap();
        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"e"[..]));
        // A batch's own writes are part of the state it leaves.
        let job: JobFn = Box::new(|tx, _gate| {
            tx.get(b"k")?;
            tx.set(b"k", b"f")?;
            Ok(Finished { event: b"event".to_vec(), succeeded: true })
        });
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(committer.submit(job)).unwrap();
        let before = reads(&committer);
        assert_eq!(read_in_batch(&committer, b"k").as_deref(), Some(&b"f"[..]));
        assert_eq!(reads(&committer), (before.0 + 1, before.1));
    }
}
