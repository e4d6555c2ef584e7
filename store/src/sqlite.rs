//! The embedded default: SQLite (bundled) in WAL mode.
//!
//! One database file holds the whole keyspace in one table ordered by a unique index on the
//! key (BLOB comparison is `memcmp`, i.e. the contract's byte order). Several OS processes
//! may open the same file: that is how a region runs active-active nodes on one host.
//!
//! Layout (format 2): the rows live in a rowid table, in the order they were first written,
//! and the key's index maps each key to its row. New keys, and above all the appended ones
//! (audit events, change records, secret versions), go to the table's right edge, where
//! SQLite splits a full leaf by starting a new one (`balance_quick`); the index's entries
//! are small (the key and a rowid). Format 1 kept the rows in a `WITHOUT ROWID` table, an
//! index b-tree, where every append rebalanced the three rightmost leaves: ~7.8 WAL frames
//! of 8 KiB per group commit of audit events. A format-1 file is converted when opened.
//!
//! Versionstamped keys (audit events, change records) have a table per prefix, `stamped_N`,
//! whose rowid is the key's versionstamp (commit version · 2¹⁶ + order): they are appended
//! in rowid order, with no index at all, so a group commit of events writes the table's last
//! leaf and the commit version's page (~2.8 frames instead of ~7). A prefix the caller
//! stamps under is registered in `stamped_prefix` (with its table) the first time;
//! registered prefixes never overlap (a prefix that would overlap one, or the 65th, keeps
//! its keys in `kv`). Within a prefix, rowid order is key order, so a range read is a rowid
//! range of the prefix's table, merged with `kv`'s rows. Every key lives in one table: a
//! plain `set` or `clear` of a key shaped like a stamped key of a registered prefix also
//! removes it from that prefix's table, and stamping a key removes it from `kv`.
//!
//! Concurrency: an attempt begins a deferred SQLite transaction, so its reads see one
//! snapshot. Its first write takes SQLite's single write lock (waiting up to the attempt's
//! time budget) and bumps the commit version under that lock, so commit versions and
//! versionstamps strictly increase across every process sharing the file. If another
//! connection committed after the attempt's snapshot was taken, SQLite refuses the upgrade
//! (`SQLITE_BUSY_SNAPSHOT`): that is the contract's [`StoreError::Conflict`], and the retry
//! loop re-runs the closure on a fresh snapshot. The result is serializable. Conflicts are
//! detected per database, not per key, so SQLite may retry where FoundationDB would not.
//!
//! Durability: `synchronous=FULL`, so the WAL is fsynced at every commit and an acknowledged
//! commit survives `kill -9` and a power cut (SQLite's documented guarantee for WAL + FULL).
//! Callers amortise the fsync by committing many records per transaction (group commit).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::hash::{BuildHasher, RandomState};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use crate::limits::{Budget, MAX_TRANSACTION_DURATION};
use crate::{CommitInfo, KeyValue, RangeOptions, Store, StoreError, Transaction};

/// Settings of a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file; created (mode 0600) when missing.
    pub path: PathBuf,
    /// Time limit of one attempt, also the longest wait for the write lock.
    /// Default and maximum: 5 s ([`MAX_TRANSACTION_DURATION`]).
    pub transaction_timeout: Duration,
    /// How many times [`crate::StoreExt::transact`] re-runs a conflicting transaction
    /// before giving up. Default 1000.
    pub retry_limit: u32,
    /// Idle connections kept for reuse. Default 16.
    pub idle_connections: usize,
}

impl SqliteConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            transaction_timeout: MAX_TRANSACTION_DURATION,
            retry_limit: 1000,
            idle_connections: 16,
        }
    }
}

/// A new file's schema. `meta` comes first: a file that has `meta` but no `format` row is
/// new, and gets today's format. A format-1 file keeps its `kv` table (`IF NOT EXISTS`)
/// until [`SqliteStore::open`] converts it.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
    INSERT OR IGNORE INTO meta (name, value) VALUES ('format', 2), ('commit_version', 0);
    CREATE TABLE IF NOT EXISTS kv (key BLOB NOT NULL UNIQUE, value BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS stamped_prefix (
        prefix BLOB PRIMARY KEY NOT NULL, id INTEGER NOT NULL UNIQUE, kv_clean INTEGER NOT NULL
    ) WITHOUT ROWID;
";

/// A registered stamped prefix: its keys' table and the statements on it.
#[derive(Debug, Clone)]
struct StampedPrefix {
    prefix: Vec<u8>,
    /// `None` for a prefix of 0xFF bytes only.
    end: Option<Vec<u8>>,
    id: i64,
    /// No key shaped like one of this prefix's stamped keys is in `kv`: stamping needs no
    /// `kv` delete. Cleared (for good) by the first such key written to `kv`.
    kv_clean: bool,
    sql: Arc<PrefixSql>,
}

/// The statements on a stamped prefix's table, which depend on its id alone: built once per
/// id and store (see [`SqliteStore::prefix_sql`]), not in every transaction that loads the
/// prefixes.
#[derive(Debug)]
struct PrefixSql {
    get: String,
    insert: String,
    delete: String,
    range: [String; 2],
    clear_range: String,
}

impl PrefixSql {
    fn new(id: i64) -> Self {
        let t = format!("stamped_{id}");
        let range = |order| {
            format!(
                "SELECT key, value FROM {t} WHERE rid >= ?1 AND rid <= ?2 AND key >= ?3 AND key < ?4 \
                 ORDER BY rid {order} LIMIT ?5"
            )
        };
        PrefixSql {
            get: format!("SELECT value FROM {t} WHERE rid = ?1 AND key = ?2"),
            insert: format!("INSERT INTO {t} (rid, key, value) VALUES (?1, ?2, ?3)"),
            delete: format!("DELETE FROM {t} WHERE rid = ?1 AND key = ?2"),
            range: [range("ASC"), range("DESC")],
            clear_range: format!("DELETE FROM {t} WHERE rid >= ?1 AND rid <= ?2 AND key >= ?3 AND key < ?4"),
        }
    }
}

impl StampedPrefix {
    fn new(prefix: Vec<u8>, id: i64, kv_clean: bool, sql: Arc<PrefixSql>) -> Self {
        StampedPrefix { end: crate::prefix_end(&prefix), prefix, id, kv_clean, sql }
    }
}

/// The most prefixes with keys in `stamped`; further prefixes keep their keys in `kv`.
const MAX_STAMPED_PREFIXES: usize = 64;

/// Commit versions from 2⁴⁷ on do not fit a rowid with the order; their keys go to `kv`.
const STAMPED_VERSION_LIMIT: u64 = 1 << 47;

/// The rowid of the stamped key with this commit version and order.
fn stamped_rid(version: u64, order: u16) -> Option<i64> {
    if version >= STAMPED_VERSION_LIMIT {
        return None;
    }
    i64::try_from(version).ok().map(|v| (v << 16) | i64::from(order))
}

/// The rowid `key` has as a stamped key under `prefix` (the prefix, an 8-byte commit
/// version, two zero bytes, a 2-byte order, any suffix); `None` if it has another shape.
fn stamped_rid_of(prefix: &[u8], key: &[u8]) -> Option<i64> {
    let stamp = key.strip_prefix(prefix)?.get(..crate::Versionstamp::LEN)?;
    if stamp[8..10] != [0, 0] {
        return None;
    }
    let version = u64::from_be_bytes(stamp[..8].try_into().ok()?);
    stamped_rid(version, u16::from_be_bytes([stamp[10], stamp[11]]))
}

/// The first 8 bytes of `tail` as a big-endian number, padded with `pad`.
fn leading_version(tail: &[u8], pad: u8) -> u64 {
    let mut bytes = [pad; 8];
    let n = tail.len().min(8);
    bytes[..n].copy_from_slice(&tail[..n]);
    u64::from_be_bytes(bytes)
}

/// The rows of one prefix in `stamped` that a key range can hold: inclusive rowid bounds
/// that hold all of them, and the key range narrowed to the prefix.
#[derive(Debug, PartialEq, Eq)]
struct StampedSpan<'k> {
    first_rid: i64,
    last_rid: i64,
    begin: &'k [u8],
    end: &'k [u8],
}

impl<'k> StampedSpan<'k> {
    /// `None` when no key of `prefix` lies in `[begin, end)`.
    fn of(prefix: &'k [u8], prefix_end: Option<&'k [u8]>, begin: &'k [u8], end: &'k [u8]) -> Option<Self> {
        let lo = begin.max(prefix);
        let hi = match prefix_end {
            Some(prefix_end) => end.min(prefix_end),
            None => end,
        };
        if lo >= hi {
            return None;
        }
        // Every key in [prefix, prefix_end) starts with the prefix. A key at or after `lo`
        // has a version at or after lo's (its first 8 bytes after the prefix, zero-padded).
        let first = lo.strip_prefix(prefix).map_or(0, |tail| leading_version(tail, 0));
        let first_rid = stamped_rid(first, 0)?;
        // A key before `hi` has a version at most hi's (0xFF-padded), if hi is inside the prefix.
        let inside = prefix_end.is_none_or(|prefix_end| hi < prefix_end);
        let last_rid = match hi.strip_prefix(prefix).filter(|_| inside) {
            Some(tail) => stamped_rid(leading_version(tail, 0xFF), u16::MAX).unwrap_or(i64::MAX),
            None => i64::MAX,
        };
        Some(StampedSpan { first_rid, last_rid, begin: lo, end: hi })
    }
}

/// Format 1 → 2: the same rows, copied in key order into the rowid table, in one
/// transaction (a crash leaves a format-1 file, converted at the next open).
const CONVERT_FROM_1: &str = "
    CREATE TABLE kv_format_2 (key BLOB NOT NULL UNIQUE, value BLOB NOT NULL);
    INSERT INTO kv_format_2 (key, value) SELECT key, value FROM kv ORDER BY key;
    DROP TABLE kv;
    ALTER TABLE kv_format_2 RENAME TO kv;
    UPDATE meta SET value = 2 WHERE name = 'format';
";

/// A range of `kv`, in key order and in reverse.
const KV_RANGE: [&str; 2] = [
    "SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key ASC LIMIT ?3",
    "SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key DESC LIMIT ?3",
];

/// Prepared statements a connection keeps: `kv`'s (~12) and six per stamped prefix in use,
/// so all of them while at most ~19 prefixes are (arca registers two per region).
const STATEMENT_CACHE: usize = 128;

/// Page size of a new database file.
const PAGE_SIZE: u32 = 4096;

/// The on-disk format this code writes and reads.
const FORMAT_VERSION: i64 = 2;

/// A [`Store`] on one SQLite database file.
#[derive(Debug)]
pub struct SqliteStore {
    config: SqliteConfig,
    /// Idle connections, oldest first, each with the thread that last released it.
    idle: Mutex<Vec<(Connection, ThreadId)>>,
    checkpoints: Checkpoints,
    /// The statements of each stamped prefix's table, by id.
    prefix_sql: Mutex<HashMap<i64, Arc<PrefixSql>>>,
}

/// Copying the WAL back into the database file (checkpointing), off the committing thread.
///
/// SQLite's own policy checkpoints inside the commit that takes the WAL past 1,000 frames:
/// that commit copies every page the last ~1,000 frames changed into the database file and
/// fsyncs it before it returns, and every request waiting on it waits too (~15% of the
/// committer's time under writes). Here a helper thread, with its own connection, runs a
/// PASSIVE checkpoint each time the WAL grows by [`HELPER_STEP_FRAMES`], concurrently with
/// the commits. Only the writer itself can complete the copy under a continuous load (no
/// commit may land while it runs), which lets the next write restart the WAL from its
/// start and keeps the file bounded. From [`DEFERRED_CHECKPOINT_FRAMES`] that checkpoint is
/// due, and the writer runs it in [`SqliteStore::upkeep`] when no caller waits on it (the
/// node's committer: after a batch's replies are sent); it copies only the frames the helper
/// has not, but SQLite syncs the database file only when a checkpoint reaches the WAL's end,
/// so its `fdatasync` writes back every page the helper copied since the last one (most of
/// its time; writing them back from the helper instead was measured and lost, see
/// ARCHITECTURE.md, fourteenth round). A writer that never calls `upkeep` still gets it
/// inline, inside the commit that takes the WAL past [`INLINE_CHECKPOINT_FRAMES`], as SQLite
/// would. Checkpoints never change what a transaction sees: SQLite copies only frames no
/// reader still needs, whichever connection runs it.
#[derive(Debug, Clone)]
struct Checkpoints {
    /// Wakes the helper; a full channel means a pass is already due.
    helper: SyncSender<()>,
    /// The WAL's size in frames after this store's last commit.
    frames: Arc<AtomicI64>,
    /// The WAL is past [`DEFERRED_CHECKPOINT_FRAMES`]: [`SqliteStore::upkeep`] checkpoints.
    due: Arc<AtomicBool>,
    /// Checkpoints run, by whom (for tests and diagnostics).
    counts: Arc<CheckpointCounts>,
}

/// WAL growth, in frames, that wakes the helper thread for a pass.
const HELPER_STEP_FRAMES: i64 = 450;

/// WAL size, in frames, from which [`SqliteStore::upkeep`] checkpoints (SQLite's
/// auto-checkpoint threshold).
const DEFERRED_CHECKPOINT_FRAMES: i64 = 1000;

/// WAL size, in frames, at which a commit checkpoints inline: the bound for writers that do
/// not call [`SqliteStore::upkeep`].
const INLINE_CHECKPOINT_FRAMES: i64 = 2000;

#[derive(Debug, Default)]
struct CheckpointCounts {
    helper: AtomicU64,
    inline: AtomicU64,
    deferred: AtomicU64,
}

/// Checkpoints run since the store was opened ([`SqliteStore::checkpoints`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Passes of the helper thread.
    pub helper: u64,
    /// Checkpoints a committing connection ran itself (not counting those it found the
    /// helper running, which it leaves to the next commit).
    pub inline: u64,
    /// Checkpoints [`SqliteStore::upkeep`] ran (the same, not counting busy ones).
    pub deferred: u64,
}

impl Checkpoints {
    /// Starts the helper thread on its own connection to `path`. It ends when the store
    /// and all its connections are gone (the last sender dropped).
    fn start(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(map_err)?;
        let (helper, wake) = sync_channel::<()>(1);
        let counts = Arc::new(CheckpointCounts::default());
        let done = counts.clone();
        std::thread::Builder::new()
            .name("arca-sqlite-ckpt".into())
            .spawn(move || {
                while wake.recv().is_ok() {
                    if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(error = %err, "sqlite checkpoint helper: pass failed");
                    }
                    done.helper.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|_| StoreError::Corrupt("could not start the sqlite checkpoint thread"))?;
        Ok(Checkpoints { helper, frames: Arc::new(AtomicI64::new(0)), due: Arc::default(), counts })
    }

    /// The WAL hook of every connection: runs after each commit, with the WAL's size.
    fn after_commit(&self, wal: &mut rusqlite::hooks::Wal, frames: i64) {
        let last = self.frames.swap(frames, Ordering::Relaxed);
        if frames >= INLINE_CHECKPOINT_FRAMES {
            // As SQLite's auto-checkpoint: its result is not the commit's (BUSY when the
            // helper is mid-pass; the next commit tries again).
            if wal.checkpoint_v2(rusqlite::wal::CheckpointMode::PASSIVE).is_ok() {
                self.counts.inline.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        if frames >= DEFERRED_CHECKPOINT_FRAMES {
            self.due.store(true, Ordering::Relaxed);
        }
        // A smaller WAL than last time: it restarted from its first frame.
        let last = if frames < last { 0 } else { last };
        if frames / HELPER_STEP_FRAMES > last / HELPER_STEP_FRAMES {
            let _ = self.helper.try_send(());
        }
    }
}

impl SqliteStore {
    /// The statements on stamped table `id` (built on first use).
    fn prefix_sql(&self, id: i64) -> Arc<PrefixSql> {
        let mut known = self.prefix_sql.lock().unwrap_or_else(|p| p.into_inner());
        known.entry(id).or_insert_with(|| Arc::new(PrefixSql::new(id))).clone()
    }

    /// Opens (creating if needed) the database at `config.path`.
    ///
    /// Refuses a file that group or others may read or write: it holds token hashes and
    /// every secret's ciphertext.
    pub fn open(config: SqliteConfig) -> Result<Self, StoreError> {
        let mut config = config;
        config.transaction_timeout = config.transaction_timeout.min(MAX_TRANSACTION_DURATION);
        create_private_file(&config.path)?;
        let checkpoints = Checkpoints::start(&config.path)?;
        let store =
            SqliteStore { config, idle: Mutex::new(Vec::new()), checkpoints, prefix_sql: Mutex::default() };
        let conn = store.connect()?;
        if format(&conn)? == 1 {
            convert_from_1(&conn, &store.config.path)?;
        }
        if format(&conn)? != FORMAT_VERSION {
            return Err(StoreError::Corrupt("unsupported store format version"));
        }
        store.release(conn);
        tracing::info!(path = %store.config.path.display(), "sqlite store opened");
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.config.path
    }

    /// Checkpoints run since the store was opened: by the helper thread, and inline by a
    /// committing connection.
    pub fn checkpoints(&self) -> CheckpointStats {
        let counts = &self.checkpoints.counts;
        CheckpointStats {
            helper: counts.helper.load(Ordering::Relaxed),
            inline: counts.inline.load(Ordering::Relaxed),
            deferred: counts.deferred.load(Ordering::Relaxed),
        }
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let mut conn = Connection::open(&self.config.path).map_err(map_err)?;
        // Replaces SQLite's auto-checkpoint (see `Checkpoints`).
        let policy = self.checkpoints.clone();
        conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
            policy.after_commit(wal, i64::from(frames));
            Ok(())
        }))
        .map_err(map_err)?;
        conn.busy_timeout(self.config.transaction_timeout).map_err(map_err)?;
        // The query planner stability guarantee: a statement's plan never depends on the
        // values bound to it. Without it SQLite plans `LIMIT ?` with the bound value as a
        // constant and marks the statement to be prepared again whenever that parameter is
        // bound, so every cached range read was parsed and planned afresh (~2% of the
        // committer's samples, mostly the sequencer's reads).
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(map_err)?;
        // The statements this store runs stay prepared: `kv`'s dozen and six per stamped
        // prefix in use (rusqlite's default cache holds 16, and evicting one means parsing
        // it again).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // A new database gets 4 KiB pages (set before anything writes its header; an existing
        // file keeps the page size it was created with). Format 2 keeps a secret's value in a
        // rowid table, where a row stays on its leaf up to nearly a whole page, and its key
        // index holds keys only, so a 1 KiB secret fits a 4 KiB page; every page a commit
        // dirties costs a WAL frame of the page's size, and a write dirties a few pages far
        // apart (its version's index entry, the metadata row, the pruned version). Measured
        // with `arca-bench` A/B runs: writes at 16 connections +6–9% against 8 KiB pages
        // (committer CPU per write ~77 → ~73 µs), reads unchanged. (8 KiB pages were chosen
        // for format 1's index b-tree, where a row over about a quarter of a page spilled to
        // overflow pages.)
        conn.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE};")).map_err(map_err)?;
        // journal_mode returns a row; WAL is persistent in the file once set.
        let mode: String =
            conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(map_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt("sqlite refused WAL mode"));
        }
        // No mmap (mmap_size = 0): SQLite drops a connection's mapping (munmap, a TLB
        // shootdown on every core) whenever it begins a read after another connection
        // committed, so under load every read off the committer's connection — the
        // sequencer's steps, the audit log's readers — unmapped and faulted the file in
        // again: ~34% of the sequencer thread's samples under writes. The committing
        // connection keeps its page cache across its own commits either way, and its point
        // reads mostly come from the node's memo. (Reads went through a 256 MiB mapping from
        // the first performance round to the eleventh; ARCHITECTURE.md.)
        // temp_store = MEMORY: a write statement inside a transaction keeps its statement
        // journal in 1 KiB chunks instead of one 64 KiB spill buffer. That buffer was malloc'd
        // and freed per statement, and glibc trimmed the committer thread's arena each time
        // (madvise plus a TLB shootdown on every core): ~4% of the committer's samples.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = OFF; PRAGMA mmap_size = 0; \
             PRAGMA temp_store = MEMORY;",
        )
        .map_err(map_err)?;
        conn.execute_batch(SCHEMA).map_err(map_err)?;
        Ok(conn)
    }

    /// An idle connection: the one this thread released last if it is idle, else the one
    /// idle longest (else a new one).
    ///
    /// A connection keeps its page cache only while no other connection commits between its
    /// transactions: SQLite drops a connection's whole cache when it begins a read after
    /// another connection committed. The committer commits batch after batch from one thread;
    /// taking the last connection released, as a plain stack does, let any other reader (a
    /// sequencer step, every ~12 ms under load) take the committer's warm connection, so that
    /// the committer went on with another one, and then back, each time reading its pages from
    /// the file again (`pread`: ~8% of the committer's samples under writes).
    fn acquire(&self) -> Result<Connection, StoreError> {
        let me = std::thread::current().id();
        let pooled = {
            let mut idle = self.idle.lock().unwrap_or_else(|poison| poison.into_inner());
            match idle.iter().rposition(|(_, thread)| *thread == me) {
                Some(mine) => Some(idle.remove(mine).0),
                None if idle.is_empty() => None,
                None => Some(idle.remove(0).0),
            }
        };
        match pooled {
            Some(conn) => Ok(conn),
            None => self.connect(),
        }
    }

    fn release(&self, conn: Connection) {
        if !conn.is_autocommit() {
            // A transaction is still open on it (a failed rollback): do not reuse.
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|poison| poison.into_inner());
        if idle.len() < self.config.idle_connections {
            idle.push((conn, std::thread::current().id()));
        }
    }
}

impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    /// Runs the checkpoint that is due (see `Checkpoints`), if one is. When the helper is
    /// mid-pass it is busy and copies nothing; the next commit makes it due again.
    fn upkeep(&self) {
        if !self.checkpoints.due.swap(false, Ordering::Relaxed) {
            return;
        }
        let conn = match self.acquire() {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "sqlite checkpoint: no connection");
                return;
            }
        };
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get::<_, i64>(0)) {
            Ok(0) => {
                self.checkpoints.counts.deferred.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "sqlite checkpoint failed"),
        }
        self.release(conn);
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        let conn = self.acquire()?;
        exec(&conn, "BEGIN DEFERRED", [])?;
        Ok(Box::new(SqliteTxn {
            store: self,
            conn: Some(conn),
            budget: Budget::new(self.config.transaction_timeout),
            version: None,
            stamped: false,
            prefixes: None,
            attempts: 1,
        }))
    }
}

/// One attempt on one connection. Dropping it rolls back.
struct SqliteTxn<'a> {
    store: &'a SqliteStore,
    conn: Option<Connection>,
    budget: Budget,
    /// The commit version, allocated with the write lock on the first write.
    version: Option<u64>,
    /// Whether a versionstamped key was set.
    stamped: bool,
    /// The registered stamped prefixes and their ends, as this attempt's snapshot has them
    /// (read at first use).
    prefixes: Option<Vec<StampedPrefix>>,
    attempts: u32,
}

impl SqliteTxn<'_> {
    fn conn(&self) -> Result<&Connection, StoreError> {
        self.conn.as_ref().ok_or(StoreError::Corrupt("transaction used after it ended"))
    }

    /// Takes the write lock (if not yet held) and returns the commit version this attempt
    /// will commit at. Holding the lock until commit makes the version ours alone.
    fn write_version(&mut self) -> Result<u64, StoreError> {
        if let Some(version) = self.version {
            return Ok(version);
        }
        // Two statements rather than `UPDATE … RETURNING`: SQLite runs a RETURNING clause
        // through an ephemeral table, a b-tree of its own opened and closed on every
        // execution, once per batch on the committer.
        let conn = self.conn()?;
        exec(conn, "UPDATE meta SET value = value + 1 WHERE name = 'commit_version'", [])?;
        let version: i64 = query_one(conn, "SELECT value FROM meta WHERE name = 'commit_version'", [])?
            .ok_or(StoreError::Corrupt("no commit version"))?;
        let version = u64::try_from(version).map_err(|_| StoreError::Corrupt("negative commit version"))?;
        self.version = Some(version);
        Ok(version)
    }

    fn read(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.budget.check_read_key(key)?;
        if let Some((sql, rid)) = self.stamped_home(key)? {
            let stamped = query_one(self.conn()?, &sql.get, params![rid, key])?;
            if stamped.is_some() {
                return Ok(stamped);
            }
        }
        query_one(self.conn()?, "SELECT value FROM kv WHERE key = ?1", [key])
    }

    /// The registered stamped prefixes in this attempt's snapshot.
    fn prefixes(&mut self) -> Result<&[StampedPrefix], StoreError> {
        if self.prefixes.is_none() {
            let conn = self.conn()?;
            let mut stmt =
                conn.prepare_cached("SELECT prefix, id, kv_clean FROM stamped_prefix").map_err(map_err)?;
            let rows =
                stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?))).map_err(map_err)?;
            let rows = rows.collect::<Result<Vec<(Vec<u8>, i64, bool)>, _>>().map_err(map_err)?;
            drop(stmt);
            let prefixes = rows
                .into_iter()
                .map(|(prefix, id, kv_clean)| {
                    StampedPrefix::new(prefix, id, kv_clean, self.store.prefix_sql(id))
                })
                .collect();
            self.prefixes = Some(prefixes);
        }
        Ok(self.prefixes.as_deref().unwrap_or_default())
    }

    /// If `key` has the shape of a stamped key of a registered prefix: that prefix's
    /// statements and the key's rowid in its table.
    fn stamped_home(&mut self, key: &[u8]) -> Result<Option<(Arc<PrefixSql>, i64)>, StoreError> {
        Ok(self
            .prefixes()?
            .iter()
            .find_map(|p| stamped_rid_of(&p.prefix, key).map(|rid| (p.sql.clone(), rid))))
    }

    /// The statements of `prefix`'s table and its `kv_clean`, if keys stamped under
    /// it go there, registering the prefix and creating its table if it is new and overlaps
    /// no registered prefix (the caller holds the write lock).
    fn stamped_insert(&mut self, prefix: &[u8]) -> Result<Option<(Arc<PrefixSql>, bool)>, StoreError> {
        let prefixes = self.prefixes()?;
        if let Some(known) = prefixes.iter().find(|p| p.prefix == prefix) {
            return Ok(Some((known.sql.clone(), known.kv_clean)));
        }
        let overlaps = prefixes.iter().any(|p| p.prefix.starts_with(prefix) || prefix.starts_with(&p.prefix));
        if prefix.is_empty() || overlaps || prefixes.len() >= MAX_STAMPED_PREFIXES {
            return Ok(None);
        }
        let conn = self.conn()?;
        let id: i64 = conn
            .query_row("SELECT coalesce(max(id), 0) + 1 FROM stamped_prefix", [], |row| row.get(0))
            .map_err(map_err)?;
        conn.execute_batch(&format!(
            "CREATE TABLE stamped_{id} (rid INTEGER PRIMARY KEY, key BLOB NOT NULL, value BLOB NOT NULL)"
        ))
        .map_err(map_err)?;
        // Keys of the prefix already in `kv` (set plainly, or by format 1) may collide.
        let end = crate::prefix_end(prefix).unwrap_or_else(|| vec![0xFF; prefix.len() + 1]);
        let kv_clean: bool = conn
            .query_row(
                "SELECT NOT EXISTS (SELECT 1 FROM kv WHERE key >= ?1 AND key < ?2)",
                [prefix, &end],
                |row| row.get(0),
            )
            .map_err(map_err)?;
        conn.execute(
            "INSERT INTO stamped_prefix (prefix, id, kv_clean) VALUES (?1, ?2, ?3)",
            params![prefix, id, kv_clean],
        )
        .map_err(map_err)?;
        let sql = self.store.prefix_sql(id);
        if let Some(prefixes) = &mut self.prefixes {
            prefixes.push(StampedPrefix::new(prefix.to_vec(), id, kv_clean, sql.clone()));
        }
        Ok(Some((sql, kv_clean)))
    }

    /// Removes `key` from its prefix's table if it can be there. `to_kv`: the key is about
    /// to be written to `kv`, so its prefix is no longer `kv_clean`.
    fn unstamp(&mut self, key: &[u8], to_kv: bool) -> Result<(), StoreError> {
        let Some((sql, rid)) = self.stamped_home(key)? else { return Ok(()) };
        exec(self.conn()?, &sql.delete, params![rid, key])?;
        if !to_kv {
            return Ok(());
        }
        let prefixes = self.prefixes.as_mut().ok_or(StoreError::Corrupt("stamped prefixes not loaded"))?;
        let Some(home) = prefixes.iter_mut().find(|p| key.starts_with(&p.prefix)) else { return Ok(()) };
        if home.kv_clean {
            home.kv_clean = false;
            let id = home.id;
            exec(self.conn()?, "UPDATE stamped_prefix SET kv_clean = 0 WHERE id = ?1", [id])?;
        }
        Ok(())
    }

    /// Upserts `key` into `kv`, taking it out of its prefix's stamped table first (a key
    /// lives in one table). The caller holds the write lock.
    fn put_plain(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.unstamp(key, true)?;
        self.upsert(key, value)
    }

    /// Upserts `key` into `kv` (the caller took it out of its stamped table).
    fn upsert(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        exec(
            self.conn()?,
            "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn rollback(&mut self) {
        if let Some(conn) = &self.conn
            && !conn.is_autocommit()
            && let Err(err) = conn.execute_batch("ROLLBACK")
        {
            tracing::warn!(error = %err, "sqlite rollback failed; dropping the connection");
            self.conn = None;
        }
    }
}

impl Transaction for SqliteTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(key)
    }

    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        // SQLite has no per-key read conflicts to leave out: the same read.
        self.read(key)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.budget.check_range(begin, end)?;
        let sql = KV_RANGE[usize::from(opts.reverse)];
        let limit = if opts.limit == 0 { -1 } else { i64::try_from(opts.limit).unwrap_or(i64::MAX) };
        let row = |row: &rusqlite::Row<'_>| Ok(KeyValue { key: row.get(0)?, value: row.get(1)? });
        let mut found = {
            let conn = self.conn()?;
            let mut stmt = conn.prepare_cached(sql).map_err(map_err)?;
            let rows = stmt.query_map(params![begin, end, limit], row).map_err(map_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(map_err)?
        };
        // Each registered prefix's rows in the range, in key order (= rowid order).
        let mut streams = usize::from(!found.is_empty());
        self.prefixes()?;
        let (Some(conn), Some(prefixes)) = (&self.conn, &self.prefixes) else {
            return Err(StoreError::Corrupt("transaction used after it ended"));
        };
        for p in prefixes {
            let Some(span) = StampedSpan::of(&p.prefix, p.end.as_deref(), begin, end) else { continue };
            let mut stmt = conn.prepare_cached(&p.sql.range[usize::from(opts.reverse)]).map_err(map_err)?;
            let params = params![span.first_rid, span.last_rid, span.begin, span.end, limit];
            let rows = stmt.query_map(params, row).map_err(map_err)?;
            let before = found.len();
            for kv in rows {
                found.push(kv.map_err(map_err)?);
            }
            streams += usize::from(found.len() > before);
        }
        if streams > 1 {
            // Every key lives in one table, so the streams hold no key twice.
            found.sort_unstable_by(|a, b| if opts.reverse { b.key.cmp(&a.key) } else { a.key.cmp(&b.key) });
            if opts.limit != 0 {
                found.truncate(opts.limit);
            }
        }
        Ok(found)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_set(key, value)?;
        self.write_version()?;
        self.put_plain(key, value)
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_clear(key)?;
        self.write_version()?;
        self.unstamp(key, false)?;
        exec(self.conn()?, "DELETE FROM kv WHERE key = ?1", [key])?;
        Ok(())
    }

    fn replace(&mut self, old: &[u8], new: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_clear(old)?;
        self.budget.charge_set(new, value)?;
        self.write_version()?;
        if old == new {
            // A set: the upsert's conflict path rewrites the value alone, and the key index is
            // not touched (a KV write into the slot of the version it prunes).
            return self.put_plain(new, value);
        }
        self.unstamp(old, false)?;
        self.unstamp(new, true)?;
        // `old`'s row takes the new key and value (its rowid, hence its page, stays); OR
        // REPLACE drops another row already holding `new`, as `set` would overwrite it.
        let moved = exec(
            self.conn()?,
            "UPDATE OR REPLACE kv SET key = ?2, value = ?3 WHERE key = ?1",
            params![old, new, value],
        )?;
        if moved == 0 {
            self.upsert(new, value)?;
        }
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_clear_range(begin, end)?;
        self.write_version()?;
        exec(self.conn()?, "DELETE FROM kv WHERE key >= ?1 AND key < ?2", [begin, end])?;
        self.prefixes()?;
        let (Some(conn), Some(prefixes)) = (&self.conn, &self.prefixes) else {
            return Err(StoreError::Corrupt("transaction used after it ended"));
        };
        for p in prefixes {
            let Some(span) = StampedSpan::of(&p.prefix, p.end.as_deref(), begin, end) else { continue };
            exec(conn, &p.sql.clear_range, params![span.first_rid, span.last_rid, span.begin, span.end])?;
        }
        Ok(())
    }

    fn set_versionstamped_key(
        &mut self,
        prefix: &[u8],
        suffix: &[u8],
        value: &[u8],
    ) -> Result<u16, StoreError> {
        let key_len = prefix.len() + crate::Versionstamp::LEN + suffix.len();
        let order = self.budget.charge_versionstamp(prefix, key_len, value)?;
        let version = self.write_version()?;
        let mut key = Vec::with_capacity(key_len);
        key.extend_from_slice(prefix);
        key.extend_from_slice(&version.to_be_bytes());
        key.extend_from_slice(&0u16.to_be_bytes());
        key.extend_from_slice(&order.to_be_bytes());
        key.extend_from_slice(suffix);
        let home = match stamped_rid(version, order) {
            Some(rid) => self.stamped_insert(prefix)?.map(|(sql, kv_clean)| (sql, kv_clean, rid)),
            None => None,
        };
        match home {
            Some((sql, kv_clean, rid)) => {
                let conn = self.conn()?;
                // The rowid is this commit's alone; `kv` may hold the key only if a key of
                // this shape was written there (plainly, or by format 1).
                if !kv_clean {
                    exec(conn, "DELETE FROM kv WHERE key = ?1", [&key])?;
                }
                exec(conn, &sql.insert, params![rid, key, value])?;
            }
            // Written like a plain set: the key may be shaped like a registered prefix's.
            None => self.put_plain(&key, value)?,
        }
        self.stamped = true;
        Ok(order)
    }

    fn read_version(&mut self) -> Result<Option<u64>, StoreError> {
        if self.version.is_some() {
            return Ok(None);
        }
        // In WAL mode the first read pins the snapshot; a write after another connection's
        // commit fails with SQLITE_BUSY_SNAPSHOT (a retryable conflict), and every commit
        // that wrote bumped `commit_version`.
        let version: i64 =
            query_one(self.conn()?, "SELECT value FROM meta WHERE name = 'commit_version'", [])?
                .ok_or(StoreError::Corrupt("no commit version"))?;
        u64::try_from(version).map(Some).map_err(|_| StoreError::Corrupt("negative commit version"))
    }

    fn lock_for_write(&mut self) -> Result<Option<u64>, StoreError> {
        if self.version.is_some() {
            return Ok(None);
        }
        // Bumping `commit_version` takes the write lock, which SQLite grants only to a
        // snapshot of the newest state (an older one fails with a conflict): the state the
        // commit before this one left.
        Ok(Some(self.write_version()? - 1))
    }

    fn maybe_committed(&self) -> bool {
        // A failed SQLite commit is rolled back atomically: the result is never unknown.
        false
    }

    fn commit(&mut self) -> Result<CommitInfo, StoreError> {
        if let Err(err) = self.budget.check_alive() {
            self.rollback();
            return Err(err);
        }
        // Cached like every other statement (`execute_batch` would parse it each time).
        if let Err(err) = exec(self.conn()?, "COMMIT", []) {
            self.rollback();
            return Err(err);
        }
        let stamp = match (self.stamped, self.version) {
            (true, Some(version)) => {
                let mut stamp = [0; 10];
                stamp[..8].copy_from_slice(&version.to_be_bytes());
                Some(stamp)
            }
            _ => None,
        };
        let info = CommitInfo { version: self.version, stamp };
        if let Some(conn) = self.conn.take() {
            self.store.release(conn);
        }
        Ok(info)
    }

    fn on_error(&mut self, err: &StoreError) -> Result<(), StoreError> {
        self.rollback();
        if !err.is_retryable() {
            return Err(StoreError::Corrupt("on_error called with an error that is not retryable"));
        }
        if self.attempts > self.store.config.retry_limit {
            return Err(StoreError::RetryLimitReached { attempts: self.attempts });
        }
        std::thread::sleep(backoff(self.attempts));
        self.attempts += 1;
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.store.acquire()?,
        };
        exec(&conn, "BEGIN DEFERRED", [])?;
        self.conn = Some(conn);
        self.budget.reset();
        self.version = None;
        self.stamped = false;
        self.prefixes = None;
        Ok(())
    }
}

impl Drop for SqliteTxn<'_> {
    fn drop(&mut self) {
        self.rollback();
        if let Some(conn) = self.conn.take() {
            self.store.release(conn);
        }
    }
}

/// Exponential backoff with full jitter, 1 ms doubling to a 64 ms ceiling, so that competing
/// processes spread out instead of colliding again.
fn backoff(attempt: u32) -> Duration {
    let ceiling_us = 1_000u64 << attempt.min(6);
    let jitter = RandomState::new().hash_one(attempt) % ceiling_us;
    Duration::from_micros(jitter.max(100))
}

fn format(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE name = 'format'", [], |row| row.get(0)).map_err(map_err)
}

/// Converts a format-1 file under the write lock; another process may have converted it
/// first, so the format is read again under the lock.
fn convert_from_1(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(map_err)?;
    let converted: Result<bool, StoreError> = (|| {
        if format(conn)? != 1 {
            return Ok(false);
        }
        conn.execute_batch(CONVERT_FROM_1).map_err(map_err)?;
        Ok(true)
    })();
    let end = if converted.is_ok() { "COMMIT" } else { "ROLLBACK" };
    if let Err(err) = conn.execute_batch(end) {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(map_err(err));
    }
    if converted? {
        tracing::info!(path = %path.display(), "sqlite store converted from format 1 to format 2");
    }
    Ok(())
}

/// Runs one statement (cached on the connection); returns the rows it changed.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
    conn.prepare_cached(sql).and_then(|mut stmt| stmt.execute(params)).map_err(map_err)
}

/// The first column of a statement's first row, if it returns one (cached on the connection).
fn query_one<T: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Option<T>, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, |row| row.get(0)).optional())
        .map_err(map_err)
}

fn map_err(err: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, _) = &err {
        match failure.code {
            // SQLITE_BUSY_SNAPSHOT: our snapshot is older than the last commit.
            ErrorCode::DatabaseBusy if failure.extended_code == 517 => return StoreError::Conflict,
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => return StoreError::Busy,
            ErrorCode::DiskFull => return StoreError::Full,
            _ => {}
        }
    }
    StoreError::Sqlite(err)
}

/// Creates the database file with mode 0600 if missing; refuses an existing one that group
/// or others can access.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let io = |context| move |source| StoreError::Io { context, source };
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode =
                std::fs::metadata(path).map_err(io("reading the store file's mode"))?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(StoreError::Io {
                    context: "the store file is accessible to group or others; chmod 600 it",
                    source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                });
            }
            Ok(())
        }
        Err(err) => Err(io("creating the store file")(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreExt as _;

    #[test]
    fn a_thread_gets_back_the_connection_it_released_and_others_the_one_idle_longest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        // A temporary table lives on its connection only: it names the connection.
        let marked = |conn: &Connection, name: &str| -> bool {
            conn.query_row("SELECT count(*) FROM temp.sqlite_master WHERE name = ?1", [name], |row| {
                row.get::<_, i64>(0)
            })
            .unwrap()
                == 1
        };
        let take_and_mark = |name: &str| {
            let conn = store.acquire().unwrap();
            conn.execute_batch(&format!("CREATE TEMP TABLE {name} (x)")).unwrap();
            conn
        };
        // Two connections in use at once (by this thread), then released: "older" first.
        let (older, newer) = (take_and_mark("older"), take_and_mark("newer"));
        store.release(older);
        store.release(newer);
        // Another thread, with no connection of its own idle, takes the one idle longest...
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let conn = store.acquire().unwrap();
                assert!(marked(&conn, "older") && !marked(&conn, "newer"));
                store.release(conn);
            });
        });
        // ...and this thread gets back the connection it released last, not the one the
        // other thread has just released.
        let conn = store.acquire().unwrap();
        assert!(marked(&conn, "newer"));
        store.release(conn);
    }

    #[test]
    fn statements_stay_prepared_across_transactions_whatever_their_bound_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        // Four stamped prefixes: with theirs and `kv`'s, more distinct statements than
        // rusqlite's default cache holds (16).
        let prefixes: [&[u8]; 4] = [b"s/", b"t/", b"u/", b"v/"];
        let range = |tx: &mut dyn Transaction, prefix: &[u8], opts| {
            tx.get_range(prefix, &crate::prefix_end(prefix).unwrap(), opts)
        };
        // Registering a prefix creates its table, and a schema change makes SQLite prepare
        // every statement again once: register them first.
        store
            .transact(|tx| {
                tx.set(b"k/\xff", b"v")?;
                prefixes.iter().try_for_each(|prefix| tx.set_versionstamped_key(prefix, b"", b"e").map(drop))
            })
            .unwrap();
        let mut ascending: i32 = 0;
        for (i, (limit, reverse)) in
            [(1, false), (3, false), (0, false), (2, true), (7, false), (0, true)].into_iter().enumerate()
        {
            let opts = RangeOptions { limit, reverse, snapshot: false };
            let want = if limit == 0 { i + 1 } else { limit.min(i + 1) };
            store
                .transact(|tx| {
                    for (at, prefix) in std::iter::once(&b"k/"[..]).chain(prefixes).enumerate() {
                        let found = range(tx, prefix, opts)?;
                        assert_eq!(found.len(), want, "prefix {at}, limit {limit}, reverse {reverse}");
                    }
                    tx.set(&[b'k', b'/', i as u8], b"v")?;
                    tx.clear(b"k/none")?;
                    assert_eq!(tx.get(b"k/none")?, None);
                    for prefix in prefixes {
                        tx.set_versionstamped_key(prefix, b"", b"e")?;
                    }
                    Ok::<_, StoreError>(())
                })
                .unwrap();
            ascending += i32::from(!reverse);
        }
        // One connection served every transaction above (the pool hands back the last one).
        let conn = store.acquire().unwrap();
        let stamped: Vec<_> = (1..=4).map(PrefixSql::new).collect();
        // Every range read runs `kv`'s statement; a prefix's own runs for its prefix only.
        let runs = std::iter::once((KV_RANGE[0], 5 * ascending))
            .chain(stamped.iter().map(|p| (p.range[0].as_str(), ascending)));
        for (sql, ran) in runs {
            let stmt = conn.prepare_cached(sql).unwrap();
            // Never parsed again for new bound values (the LIMIT's above all)...
            assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0, "{sql}");
            // ...and never evicted from the cache: this statement ran every time.
            assert_eq!(stmt.get_status(rusqlite::StatementStatus::Run), ran, "{sql}");
        }
    }

    fn stamped_key(prefix: &[u8], version: u64, order: u16, suffix: &[u8]) -> Vec<u8> {
        [prefix, &version.to_be_bytes(), &[0, 0], &order.to_be_bytes(), suffix].concat()
    }

    #[test]
    fn a_stamped_key_maps_to_its_version_and_order_and_no_other_shape_does() {
        let key = stamped_key(b"q/", 7, 3, b"s");
        assert_eq!(stamped_rid_of(b"q/", &key), Some((7 << 16) | 3));
        assert_eq!(stamped_rid_of(b"q", &key), None, "the bytes after another prefix are no stamp");
        assert_eq!(stamped_rid_of(b"q/", &key[..key.len() - 2]), None, "too short");
        let mut batch_order = key.clone();
        batch_order[2 + 9] = 1;
        assert_eq!(stamped_rid_of(b"q/", &batch_order), None, "a non-zero batch order");
        assert_eq!(stamped_rid_of(b"q/", &stamped_key(b"q/", 1 << 47, 0, b"")), None);
        assert_eq!(stamped_rid(STAMPED_VERSION_LIMIT - 1, u16::MAX), Some(i64::MAX));
    }

    #[test]
    fn a_span_holds_every_stamped_key_of_its_range_and_no_span_is_made_for_other_ranges() {
        let end = crate::prefix_end(b"q/").unwrap();
        let span = |begin: &[u8], stop: &[u8]| {
            StampedSpan::of(b"q/", Some(&end), begin, stop).map(|s| (s.first_rid, s.last_rid))
        };
        assert_eq!(span(b"", b"\xff"), Some((0, i64::MAX)));
        assert_eq!(span(b"a", b"q/"), None);
        assert_eq!(span(b"q0", b"\xff"), None);
        assert_eq!(span(&stamped_key(b"q/", 5, 2, b""), b"\xff"), Some((5 << 16, i64::MAX)));
        assert_eq!(span(b"q/", &stamped_key(b"q/", 9, 0, b"")), Some((0, (9 << 16) | 0xFFFF)));
        // A bound shorter than a version pads down at the start and up at the end.
        assert_eq!(
            span(b"q/\x00\x00\x01", b"q/\x00\x00\x02"),
            Some((1 << 56, (0x0000_02FF_FFFF_FFFF << 16) | 0xFFFF))
        );
        // A range whose versions all reach 2^47 holds no stamped row.
        assert_eq!(span(b"q/\x00\x01", b"q/\x00\x02"), None);
        // Brute force: for keys around the edges, a key in the range is inside the span.
        let versions = [0u64, 1, 255, 256, 1 << 40, (1 << 47) - 1];
        let keys: Vec<Vec<u8>> = versions
            .iter()
            .flat_map(|&v| [0u16, 1, u16::MAX].map(|o| stamped_key(b"q/", v, o, b"x")))
            .collect();
        let bounds: Vec<Vec<u8>> = keys
            .iter()
            .flat_map(|k| [k.clone(), k[..k.len() - 3].to_vec(), k[..5].to_vec(), k[..3].to_vec()])
            .chain([b"q/".to_vec(), end.clone(), b"".to_vec(), b"\xff".to_vec()])
            .collect();
        for begin in &bounds {
            for stop in &bounds {
                let span = StampedSpan::of(b"q/", Some(&end), begin, stop);
                for key in &keys {
                    if key >= begin && key < stop {
                        let span = span.as_ref().expect("a span for a range holding a key");
                        let rid = stamped_rid_of(b"q/", key).unwrap();
                        assert!(span.first_rid <= rid && rid <= span.last_rid, "{begin:?}..{stop:?} {key:?}");
                        assert!(span.begin <= key.as_slice() && key.as_slice() < span.end);
                    }
                }
            }
        }
    }
}
