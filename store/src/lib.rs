//! arca's storage contract: a strictly serializable, ordered key-value store shaped after
//! FoundationDB, and its backends.
//!
//! Every piece of arca's state — secrets, the audit queue, the replication change feed,
//! cursors — lives in one [`Store`]. The contract is FoundationDB's, so the FoundationDB
//! backend ([`fdb`], feature `fdb`) is a thin translation and the embedded default
//! ([`SqliteStore`]) is held to the same semantics by one conformance suite
//! (`tests/conformance`):
//!
//! - transactions over an ordered byte keyspace, run by a closure-based retry loop
//!   ([`StoreExt::transact`]) that re-runs the closure on conflict;
//! - point and range reads (begin inclusive, end exclusive, limit, reverse), snapshot reads,
//!   `set`, `clear`, `clear_range`, with read-your-writes inside a transaction;
//! - versionstamped keys ([`Versionstamp`]) for append-only queues without hot keys;
//! - the commit version returned to the caller ([`Committed`]);
//! - FoundationDB's [`limits`], enforced by every backend: a breach is a typed error and
//!   nothing is written.
//!
//! Keys are usually built with the order-preserving [`tuple`] encoding, so prefixes and
//! ranges behave the same on every backend.
//!
//! The API is blocking: SQLite is a blocking library and the FoundationDB backend waits on
//! its futures. Async callers run transactions on a blocking thread (`spawn_blocking`) or a
//! dedicated committer thread.
//!
//! ```
//! use arca_store::{SqliteConfig, SqliteStore, StoreError, StoreExt, tuple};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = SqliteStore::open(SqliteConfig::new(dir.path().join("store.db")))?;
//! let key = tuple::pack(&["kv".into(), "secret/app/db".into()]);
//! let committed = store.transact(|tx| {
//!     let seen = tx.get(&key)?;
//!     tx.set(&key, b"ciphertext")?;
//!     Ok::<_, StoreError>(seen.is_none())
//! })?;
//! assert!(committed.value, "the key was new");
//! assert!(committed.commit.version.is_some());
//! # Ok::<(), StoreError>(())
//! ```
//!
//! Invariants: a transaction that returns an error, or whose closure fails, leaves no trace;
//! commit versions and versionstamps strictly increase across commits; no error message
//! contains a key or a value.

#![cfg_attr(not(feature = "fdb"), forbid(unsafe_code))]

mod error;
pub mod limits;
mod sqlite;
pub mod tuple;

#[cfg(feature = "fdb")]
pub mod fdb;

use std::fmt;

pub use error::{StoreError, TxnError};
pub use sqlite::{CheckpointStats, SqliteConfig, SqliteStore};

/// A key and its value, as returned by range reads.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl fmt::Debug for KeyValue {
    /// Keys are shown (they are paths and indexes); values are not (they may be ciphertext,
    /// token hashes or key material).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &tuple::Printable(&self.key))
            .field("value_len", &self.value.len())
            .finish()
    }
}

/// How a range read walks its range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeOptions {
    /// The most pairs to return; 0 means no limit.
    pub limit: usize,
    /// Walk from the end of the range towards its beginning.
    pub reverse: bool,
    /// A snapshot read: adds no read conflict (see [`Transaction::get_snapshot`]).
    pub snapshot: bool,
}

impl RangeOptions {
    /// At most `limit` pairs, in key order.
    pub fn limit(limit: usize) -> Self {
        RangeOptions { limit, ..RangeOptions::default() }
    }

    /// Walk backwards.
    pub fn reversed(self) -> Self {
        RangeOptions { reverse: true, ..self }
    }

    /// Read without adding a read conflict.
    pub fn snapshot(self) -> Self {
        RangeOptions { snapshot: true, ..self }
    }
}

/// The position of a versionstamped key: 12 bytes that sort in commit order.
///
/// The first 10 bytes are the transaction's stamp, assigned at commit: an 8-byte big-endian
/// commit version and a 2-byte order within the commit (FoundationDB's batch order; 0 on
/// SQLite, where every commit holds one transaction). FoundationDB gives every key of one
/// transaction the same 10 bytes, so the contract adds a 2-byte user order, numbering the
/// versionstamped keys of one transaction in the order they were set. This is the layout of
/// FoundationDB's tuple-layer versionstamp, so the two agree byte for byte.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Versionstamp([u8; 12]);

impl Versionstamp {
    /// Length of a versionstamp inside a key.
    pub const LEN: usize = 12;

    /// Builds a stamp from a transaction stamp and a user order.
    pub fn new(transaction: [u8; 10], user_order: u16) -> Self {
        let mut bytes = [0; 12];
        bytes[..10].copy_from_slice(&transaction);
        bytes[10..].copy_from_slice(&user_order.to_be_bytes());
        Versionstamp(bytes)
    }

    /// Reads a stamp from its 12 bytes.
    pub fn from_bytes(bytes: [u8; 12]) -> Self {
        Versionstamp(bytes)
    }

    /// Reads a stamp from the front of `bytes`, if it is long enough.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let head: [u8; 12] = bytes.get(..Self::LEN)?.try_into().ok()?;
        Some(Versionstamp(head))
    }

    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }

    /// The commit version of the transaction that wrote the key.
    pub fn commit_version(&self) -> u64 {
        let mut version = [0; 8];
        version.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(version)
    }

    /// The order of the transaction within its commit batch.
    pub fn batch_order(&self) -> u16 {
        u16::from_be_bytes([self.0[8], self.0[9]])
    }

    /// The order of the key among the transaction's versionstamped keys.
    pub fn user_order(&self) -> u16 {
        u16::from_be_bytes([self.0[10], self.0[11]])
    }
}

impl fmt::Debug for Versionstamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Versionstamp({}.{}.{})", self.commit_version(), self.batch_order(), self.user_order())
    }
}

/// What a successful commit tells the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// The commit version; `None` for a transaction that wrote nothing.
    pub version: Option<u64>,
    /// The transaction's 10-byte stamp, when it set versionstamped keys.
    pub stamp: Option<[u8; 10]>,
}

impl CommitInfo {
    /// The full position of the `user_order`-th versionstamped key the transaction set.
    pub fn versionstamp(&self, user_order: u16) -> Option<Versionstamp> {
        self.stamp.map(|stamp| Versionstamp::new(stamp, user_order))
    }
}

/// The value a transaction closure returned, with its commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    pub value: T,
    pub commit: CommitInfo,
}

/// One attempt at a transaction. Obtained from [`Store::begin`]; most code uses
/// [`StoreExt::transact`], which begins, retries and commits.
///
/// Reads see the transaction's own writes. Every method checks the [`limits`]; a breach
/// returns a typed error and poisons the transaction so it cannot commit.
pub trait Transaction {
    /// The value at `key`, adding a read conflict on it.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The value at `key` without adding a read conflict: a concurrent write to it does not
    /// make this transaction conflict. A backend may still detect conflicts more coarsely
    /// than FoundationDB (SQLite conflicts on any concurrent write commit); that costs a
    /// retry, never correctness.
    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The pairs with `begin <= key < end`, in key order (or reverse), at most `opts.limit`.
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<Vec<KeyValue>, StoreError>;

    /// Writes `value` at `key`.
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;

    /// Removes `key`, if present.
    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError>;

    /// Removes `old` and sets `new` to `value`: exactly `clear(old)` then `set(new, value)`
    /// (so `set(new, value)` when the two are one key), but the engine may reuse `old`'s
    /// storage for `new`. SQLite rewrites `old`'s row in place (a KV write that prunes a
    /// secret's oldest version: the new version takes the pruned one's row, so the row's page
    /// is the only one the two touch), and when `old` is `new` it rewrites the value alone,
    /// leaving the key index as it was; the default is the two calls.
    fn replace(&mut self, old: &[u8], new: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.clear(old)?;
        self.set(new, value)
    }

    /// Removes every key in `[begin, end)`.
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError>;

    /// Writes `value` at `prefix ‖ versionstamp ‖ suffix`, where the 12-byte
    /// [`Versionstamp`] is filled in at commit. Returns the key's user order, which with
    /// [`CommitInfo::versionstamp`] gives its final position.
    ///
    /// The key is not readable in the transaction that sets it (FoundationDB forbids it;
    /// the contract does too, so code does not come to depend on it).
    fn set_versionstamped_key(
        &mut self,
        prefix: &[u8],
        suffix: &[u8],
        value: &[u8],
    ) -> Result<u16, StoreError>;

    /// The version of the committed state this transaction reads, when the engine can name
    /// it: `Some(v)` means the transaction reads exactly the state the commit with
    /// [`CommitInfo::version`] `v` left, and that if any other commit lands before this
    /// transaction commits, its commit fails with a retryable error (the engine serializes
    /// writers by a lock, not by read conflicts). A reader may then answer reads from a copy
    /// taken at `v` without reading them again. `None` when the engine cannot promise that
    /// (FoundationDB: versions advance without commits and reads register conflicts) or
    /// once this attempt has written. The first call may begin the attempt's snapshot.
    fn read_version(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// [`Transaction::read_version`] for an attempt that is about to write anyway (the
    /// committer's batches): an engine that serializes writers by a lock may take it now and
    /// answer from the same statement. Afterwards `read_version` may answer `None`, as after
    /// any write.
    fn lock_for_write(&mut self) -> Result<Option<u64>, StoreError> {
        self.read_version()
    }

    /// Whether an earlier attempt of this transaction failed with an unknown commit result,
    /// so that its effects may already be in the store.
    fn maybe_committed(&self) -> bool;

    /// Commits the attempt.
    fn commit(&mut self) -> Result<CommitInfo, StoreError>;

    /// Prepares a retry after the retryable error `err`: rolls back, waits a backoff and
    /// starts a fresh attempt. Fails when the retry limit is reached.
    fn on_error(&mut self, err: &StoreError) -> Result<(), StoreError>;
}

/// A transactional ordered key-value store.
pub trait Store: Send + Sync + fmt::Debug {
    /// The engine's name, for logs and metrics: `"sqlite"` or `"fdb"`.
    fn engine(&self) -> &'static str;

    /// Starts a transaction attempt. Dropping it without commit rolls it back.
    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError>;

    /// Upkeep the engine keeps out of its commits, for the store's main writer to run when
    /// no caller waits on it: the node's committer calls it after a batch's replies are
    /// sent. SQLite: the WAL checkpoint that lets the log restart (see
    /// [`SqliteStore::upkeep`]). Default: nothing.
    fn upkeep(&self) {}
}

/// The retry loop, available on every [`Store`] (including `dyn Store`).
pub trait StoreExt: Store {
    /// Runs `f` in a transaction and commits it, re-running `f` from scratch whenever the
    /// attempt fails with a retryable error (a conflict, a busy lock, an unknown commit
    /// result) — FoundationDB's `run` loop. `f` must therefore be free of side effects
    /// outside the transaction, or idempotent.
    ///
    /// When `f` returns an error, the attempt is rolled back and the error returned (unless
    /// it is a retryable store error): nothing `f` wrote remains.
    fn transact<T, E, F>(&self, mut f: F) -> Result<Committed<T>, E>
    where
        F: FnMut(&mut dyn Transaction) -> Result<T, E>,
        E: TxnError,
    {
        let mut txn = self.begin()?;
        loop {
            let outcome = match f(txn.as_mut()) {
                Ok(value) => match txn.commit() {
                    Ok(commit) => return Ok(Committed { value, commit }),
                    Err(err) => E::from(err),
                },
                Err(err) => err,
            };
            match outcome.as_store_error() {
                Some(store_err) if store_err.is_retryable() => {
                    tracing::debug!(engine = self.engine(), code = store_err.code(), "retrying transaction");
                    txn.on_error(store_err)?;
                }
                _ => return Err(outcome),
            }
        }
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// The first key after every key that starts with `prefix` (FoundationDB's `strinc`):
/// `[prefix, prefix_end(prefix))` is the range of all keys with that prefix.
/// `None` when no such key exists (the prefix is empty or all `0xFF`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let keep = prefix.iter().rposition(|&byte| byte != 0xFF)?;
    let mut end = prefix[..=keep].to_vec();
    end[keep] += 1;
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xFF, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF]), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn versionstamp_fields_round_trip_and_sort_by_commit() {
        let mut tx = [0; 10];
        tx[..8].copy_from_slice(&7u64.to_be_bytes());
        tx[8..].copy_from_slice(&3u16.to_be_bytes());
        let stamp = Versionstamp::new(tx, 9);
        assert_eq!((stamp.commit_version(), stamp.batch_order(), stamp.user_order()), (7, 3, 9));
        let mut later = [0; 10];
        later[..8].copy_from_slice(&8u64.to_be_bytes());
        assert!(Versionstamp::new(later, 0) > stamp);
        assert_eq!(Versionstamp::from_slice(stamp.as_bytes()), Some(stamp));
    }

    #[test]
    fn key_value_debug_hides_the_value() {
        let kv = KeyValue { key: b"kv/a".to_vec(), value: b"hunter2".to_vec() };
        let shown = format!("{kv:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("value_len: 7"), "{shown}");
    }
}
