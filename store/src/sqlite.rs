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

use std::fs::OpenOptions;
use std::hash::{BuildHasher, RandomState};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
";

/// Format 1 → 2: the same rows, copied in key order into the rowid table, in one
/// transaction (a crash leaves a format-1 file, converted at the next open).
const CONVERT_FROM_1: &str = "
    CREATE TABLE kv_format_2 (key BLOB NOT NULL UNIQUE, value BLOB NOT NULL);
    INSERT INTO kv_format_2 (key, value) SELECT key, value FROM kv ORDER BY key;
    DROP TABLE kv;
    ALTER TABLE kv_format_2 RENAME TO kv;
    UPDATE meta SET value = 2 WHERE name = 'format';
";

/// Page size of a new database file.
const PAGE_SIZE: u32 = 8192;

/// The on-disk format this code writes and reads.
const FORMAT_VERSION: i64 = 2;

/// A [`Store`] on one SQLite database file.
#[derive(Debug)]
pub struct SqliteStore {
    config: SqliteConfig,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `config.path`.
    ///
    /// Refuses a file that group or others may read or write: it holds token hashes and
    /// every secret's ciphertext.
    pub fn open(config: SqliteConfig) -> Result<Self, StoreError> {
        let mut config = config;
        config.transaction_timeout = config.transaction_timeout.min(MAX_TRANSACTION_DURATION);
        create_private_file(&config.path)?;
        let store = SqliteStore { config, idle: Mutex::new(Vec::new()) };
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

    fn connect(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open(&self.config.path).map_err(map_err)?;
        conn.busy_timeout(self.config.transaction_timeout).map_err(map_err)?;
        // A new database gets 8 KiB pages (set before anything writes its header; an existing
        // file keeps the page size it was created with). Chosen for format 1's index b-tree
        // (WITHOUT ROWID), where a row over about a quarter of a page spilled to overflow
        // pages: at 4 KiB that was every 1 KiB secret and most KV metadata. Measured with
        // arca-bench: committer CPU per write ~120 → ~103 µs, per read ~36 → ~33 µs.
        conn.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE};")).map_err(map_err)?;
        // journal_mode returns a row; WAL is persistent in the file once set.
        let mode: String =
            conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(map_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt("sqlite refused WAL mode"));
        }
        // mmap: reads come from the shared mapping instead of a pread per page (SQLite keeps
        // writes on the WAL file; durability is unchanged).
        // temp_store = MEMORY: a write statement inside a transaction keeps its statement
        // journal in 1 KiB chunks instead of one 64 KiB spill buffer. That buffer was malloc'd
        // and freed per statement, and glibc trimmed the committer thread's arena each time
        // (madvise plus a TLB shootdown on every core): ~4% of the committer's samples.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = OFF; PRAGMA mmap_size = 268435456; \
             PRAGMA temp_store = MEMORY;",
        )
        .map_err(map_err)?;
        conn.execute_batch(SCHEMA).map_err(map_err)?;
        Ok(conn)
    }

    fn acquire(&self) -> Result<Connection, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|poison| poison.into_inner()).pop();
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
            idle.push(conn);
        }
    }
}

impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        let conn = self.acquire()?;
        conn.execute_batch("BEGIN DEFERRED").map_err(map_err)?;
        Ok(Box::new(SqliteTxn {
            store: self,
            conn: Some(conn),
            budget: Budget::new(self.config.transaction_timeout),
            version: None,
            stamped: false,
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
        let version: i64 = self
            .conn()?
            .prepare_cached("UPDATE meta SET value = value + 1 WHERE name = 'commit_version' RETURNING value")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .map_err(map_err)?;
        let version = u64::try_from(version).map_err(|_| StoreError::Corrupt("negative commit version"))?;
        self.version = Some(version);
        Ok(version)
    }

    fn read(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.budget.check_read_key(key)?;
        self.conn()?
            .prepare_cached("SELECT value FROM kv WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row([key], |row| row.get(0)).optional())
            .map_err(map_err)
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
        let sql = if opts.reverse {
            "SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key DESC LIMIT ?3"
        } else {
            "SELECT key, value FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key ASC LIMIT ?3"
        };
        let limit = if opts.limit == 0 { -1 } else { i64::try_from(opts.limit).unwrap_or(i64::MAX) };
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(sql).map_err(map_err)?;
        let rows = stmt
            .query_map(params![begin, end, limit], |row| {
                Ok(KeyValue { key: row.get(0)?, value: row.get(1)? })
            })
            .map_err(map_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(map_err)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_set(key, value)?;
        self.write_version()?;
        self.conn()?
            .prepare_cached(
                "INSERT INTO kv (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut stmt| stmt.execute(params![key, value]))
            .map_err(map_err)?;
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_clear(key)?;
        self.write_version()?;
        self.conn()?
            .prepare_cached("DELETE FROM kv WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute([key]))
            .map_err(map_err)?;
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_clear_range(begin, end)?;
        self.write_version()?;
        self.conn()?
            .prepare_cached("DELETE FROM kv WHERE key >= ?1 AND key < ?2")
            .and_then(|mut stmt| stmt.execute([begin, end]))
            .map_err(map_err)?;
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
        self.conn()?
            .prepare_cached(
                "INSERT INTO kv (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut stmt| stmt.execute(params![key, value]))
            .map_err(map_err)?;
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
        let version: i64 = self
            .conn()?
            .prepare_cached("SELECT value FROM meta WHERE name = 'commit_version'")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .map_err(map_err)?;
        u64::try_from(version).map(Some).map_err(|_| StoreError::Corrupt("negative commit version"))
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
        if let Err(err) = self.conn()?.execute_batch("COMMIT") {
            self.rollback();
            return Err(map_err(err));
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
        conn.execute_batch("BEGIN DEFERRED").map_err(map_err)?;
        self.conn = Some(conn);
        self.budget.reset();
        self.version = None;
        self.stamped = false;
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

fn map_err(err: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, _) = &err {
        match failure.code {
            // SQLITE_BUSY_SNAPSHOT: our snapshot is older than the last commit.
            ErrorCode::DatabaseBusy if failure.extended_code == 517 => return StoreError::Conflict,
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => return StoreError::Busy,
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
