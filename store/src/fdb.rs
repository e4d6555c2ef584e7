//! The FoundationDB backend (feature `fdb`): a thin translation of the contract.
//!
//! Reads, writes and clears map one to one; the retry loop's `on_error` is FoundationDB's
//! own (its backoff and its list of retryable errors); versionstamped keys are FoundationDB
//! versionstamps (`SET_VERSIONSTAMPED_KEY`, with the contract's 2-byte user order after the
//! 10-byte stamp, as in the tuple layer); `commit_unknown_result` surfaces as
//! [`StoreError::MaybeCommitted`] and through [`Transaction::maybe_committed`]. The limits are
//! checked before calling FoundationDB, so a breach fails the same way as on SQLite.
//!
//! The contract is blocking: each call waits on its FoundationDB future.
//!
//! FoundationDB's client needs its network thread: call [`FdbNetwork::boot`] once per
//! process, keep the guard alive while any [`FdbStore`] is in use, and drop it before exit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use foundationdb::options::{DatabaseOption, MutationType, StreamingMode};
use foundationdb::{Database, FdbError, KeySelector, RangeOption, TransactionCommitError};
use futures::executor::block_on;

use crate::limits::{Budget, MAX_TRANSACTION_DURATION};
use crate::{CommitInfo, KeyValue, RangeOptions, Store, StoreError, Transaction, Versionstamp};

/// FoundationDB error codes the contract names.
mod code {
    pub(super) const NOT_COMMITTED: i32 = 1020;
    pub(super) const COMMIT_UNKNOWN_RESULT: i32 = 1021;
    pub(super) const TRANSACTION_TIMED_OUT: i32 = 1031;
    pub(super) const KEY_OUTSIDE_LEGAL_RANGE: i32 = 2004;
    pub(super) const INVERTED_RANGE: i32 = 2005;
    pub(super) const TRANSACTION_TOO_LARGE: i32 = 2101;
    pub(super) const KEY_TOO_LARGE: i32 = 2102;
    pub(super) const VALUE_TOO_LARGE: i32 = 2103;
}

static BOOTED: AtomicBool = AtomicBool::new(false);

/// The running FoundationDB network thread. Dropping it stops the network; no
/// [`FdbStore`] may be used afterwards.
pub struct FdbNetwork {
    _network: foundationdb::api::NetworkAutoStop,
}

impl std::fmt::Debug for FdbNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FdbNetwork")
    }
}

impl FdbNetwork {
    /// Selects API version 7.4 and starts the network thread. FoundationDB allows this once
    /// per process; a second call fails instead of corrupting the client.
    pub fn boot() -> Result<Self, StoreError> {
        if BOOTED.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Corrupt("the FoundationDB network can be booted once per process"));
        }
        // SAFETY: guarded above to run once per process; the guard returned owns the network
        // and stops it on drop, which the caller does before exit (documented on `FdbNetwork`).
        #[allow(unsafe_code)]
        let network = unsafe { foundationdb::boot() };
        Ok(FdbNetwork { _network: network })
    }
}

/// Settings of an [`FdbStore`].
#[derive(Debug, Clone)]
pub struct FdbConfig {
    /// The cluster file; `None` means FoundationDB's default (`FDB_CLUSTER_FILE` or
    /// `/etc/foundationdb/fdb.cluster`).
    pub cluster_file: Option<String>,
    /// Time limit of one attempt. Default and maximum: 5 s.
    pub transaction_timeout: Duration,
    /// Attempts before the retry loop gives up. Default 1000.
    pub retry_limit: u32,
}

impl Default for FdbConfig {
    fn default() -> Self {
        FdbConfig { cluster_file: None, transaction_timeout: MAX_TRANSACTION_DURATION, retry_limit: 1000 }
    }
}

/// A [`Store`] on a FoundationDB cluster.
pub struct FdbStore {
    db: Database,
    config: FdbConfig,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl FdbStore {
    /// Opens the cluster named by `config.cluster_file`. The network must be running.
    pub fn open(_network: &FdbNetwork, config: FdbConfig) -> Result<Self, StoreError> {
        let mut config = config;
        config.transaction_timeout = config.transaction_timeout.min(MAX_TRANSACTION_DURATION);
        let db = Database::new(config.cluster_file.as_deref()).map_err(map_err)?;
        let timeout_ms = i32::try_from(config.transaction_timeout.as_millis()).unwrap_or(i32::MAX);
        db.set_option(DatabaseOption::TransactionTimeout(timeout_ms)).map_err(map_err)?;
        let retries = i32::try_from(config.retry_limit).unwrap_or(i32::MAX);
        db.set_option(DatabaseOption::TransactionRetryLimit(retries)).map_err(map_err)?;
        Ok(FdbStore { db, config })
    }
}

impl Store for FdbStore {
    fn engine(&self) -> &'static str {
        "fdb"
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        let trx = self.db.create_trx().map_err(map_err)?;
        Ok(Box::new(FdbTxn {
            state: State::Active(trx),
            budget: Budget::new(self.config.transaction_timeout),
            stamp: None,
            maybe_committed: false,
            retry_limit: self.config.retry_limit,
        }))
    }
}

type StampFuture =
    Pin<Box<dyn Future<Output = foundationdb::FdbResult<foundationdb::future::FdbSlice>> + Send>>;

enum State {
    Active(foundationdb::Transaction),
    CommitFailed(TransactionCommitError),
    Ended,
}

struct FdbTxn {
    state: State,
    budget: Budget,
    /// Requested with the first versionstamped key; resolves after commit.
    stamp: Option<StampFuture>,
    maybe_committed: bool,
    retry_limit: u32,
}

impl FdbTxn {
    fn trx(&self) -> Result<&foundationdb::Transaction, StoreError> {
        match &self.state {
            State::Active(trx) => Ok(trx),
            _ => Err(StoreError::Corrupt("transaction used after commit")),
        }
    }

    fn read(&mut self, key: &[u8], snapshot: bool) -> Result<Option<Vec<u8>>, StoreError> {
        self.budget.check_read_key(key)?;
        let value = block_on(self.trx()?.get(key, snapshot)).map_err(map_err)?;
        Ok(value.map(|slice| slice.to_vec()))
    }
}

impl Transaction for FdbTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(key, false)
    }

    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(key, true)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.budget.check_range(begin, end)?;
        let trx = self.trx()?;
        let mut range = Some(RangeOption {
            begin: KeySelector::first_greater_or_equal(begin),
            end: KeySelector::first_greater_or_equal(end),
            limit: (opts.limit > 0).then_some(opts.limit),
            reverse: opts.reverse,
            mode: StreamingMode::WantAll,
            ..RangeOption::default()
        });
        let mut out = Vec::new();
        let mut iteration = 1;
        while let Some(current) = range {
            let batch = block_on(trx.get_range(&current, iteration, opts.snapshot)).map_err(map_err)?;
            out.extend(
                batch.iter().map(|kv| KeyValue { key: kv.key().to_vec(), value: kv.value().to_vec() }),
            );
            range = current.next_range(&batch);
            iteration += 1;
        }
        Ok(out)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_set(key, value)?;
        self.trx()?.set(key, value);
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_clear(key)?;
        self.trx()?.clear(key);
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.budget.charge_clear_range(begin, end)?;
        self.trx()?.clear_range(begin, end);
        Ok(())
    }

    fn set_versionstamped_key(
        &mut self,
        prefix: &[u8],
        suffix: &[u8],
        value: &[u8],
    ) -> Result<u16, StoreError> {
        let key_len = prefix.len() + Versionstamp::LEN + suffix.len();
        let order = self.budget.charge_versionstamp(prefix, key_len, value)?;
        let offset =
            u32::try_from(prefix.len()).map_err(|_| StoreError::Corrupt("prefix length checked above"))?;
        // Key layout for SET_VERSIONSTAMPED_KEY: the key with 10 placeholder bytes, then the
        // placeholder's offset as a little-endian u32 (API version >= 520).
        let mut param = Vec::with_capacity(key_len + 4);
        param.extend_from_slice(prefix);
        param.extend_from_slice(&[0; 10]);
        param.extend_from_slice(&order.to_be_bytes());
        param.extend_from_slice(suffix);
        param.extend_from_slice(&offset.to_le_bytes());
        let trx = self.trx()?;
        trx.atomic_op(&param, value, MutationType::SetVersionstampedKey);
        if self.stamp.is_none() {
            self.stamp = Some(Box::pin(trx.get_versionstamp()));
        }
        Ok(order)
    }

    fn maybe_committed(&self) -> bool {
        self.maybe_committed
    }

    fn commit(&mut self) -> Result<CommitInfo, StoreError> {
        self.budget.check_alive()?;
        let State::Active(trx) = std::mem::replace(&mut self.state, State::Ended) else {
            return Err(StoreError::Corrupt("commit on a transaction that is not active"));
        };
        match block_on(trx.commit()) {
            Ok(committed) => {
                let version = committed.committed_version().map_err(map_err)?;
                let stamp = match self.stamp.take() {
                    Some(future) => {
                        let slice = block_on(future).map_err(map_err)?;
                        let stamp: [u8; 10] = slice[..]
                            .try_into()
                            .map_err(|_| StoreError::Corrupt("FoundationDB versionstamp is not 10 bytes"))?;
                        Some(stamp)
                    }
                    None => None,
                };
                Ok(CommitInfo { version: u64::try_from(version).ok(), stamp })
            }
            Err(failed) => {
                let err = map_err(*failed);
                self.state = State::CommitFailed(failed);
                Err(err)
            }
        }
    }

    fn on_error(&mut self, err: &StoreError) -> Result<(), StoreError> {
        let fdb_err = FdbError::from_code(fdb_code(err));
        let retried = match std::mem::replace(&mut self.state, State::Ended) {
            State::Active(trx) => block_on(trx.on_error(fdb_err)),
            State::CommitFailed(failed) => block_on(failed.on_error()),
            State::Ended => return Err(StoreError::Corrupt("on_error on an ended transaction")),
        };
        let trx = retried.map_err(|e| {
            if e.is_retryable() {
                // With TRANSACTION_RETRY_LIMIT set, on_error hands a retryable error back
                // once the limit is reached.
                StoreError::RetryLimitReached { attempts: self.retry_limit }
            } else {
                map_err(e)
            }
        })?;
        self.maybe_committed |= err.is_maybe_committed();
        self.state = State::Active(trx);
        self.budget.reset();
        self.stamp = None;
        Ok(())
    }
}

/// The FoundationDB code behind a contract error, for `on_error`.
fn fdb_code(err: &StoreError) -> i32 {
    match err {
        StoreError::Conflict => code::NOT_COMMITTED,
        StoreError::MaybeCommitted => code::COMMIT_UNKNOWN_RESULT,
        StoreError::Fdb { code, .. } => *code,
        // Not FoundationDB's: on_error treats an unknown code as fatal and returns it.
        _ => code::INVERTED_RANGE,
    }
}

fn map_err(err: FdbError) -> StoreError {
    match err.code() {
        code::NOT_COMMITTED => StoreError::Conflict,
        code::COMMIT_UNKNOWN_RESULT => StoreError::MaybeCommitted,
        code::TRANSACTION_TIMED_OUT => StoreError::TransactionTimedOut { limit: MAX_TRANSACTION_DURATION },
        code::KEY_OUTSIDE_LEGAL_RANGE => StoreError::KeyOutsideLegalRange,
        code::INVERTED_RANGE => StoreError::InvertedRange,
        code::TRANSACTION_TOO_LARGE => {
            StoreError::TransactionTooLarge { len_bytes: 0, max_bytes: crate::limits::MAX_TRANSACTION_BYTES }
        }
        code::KEY_TOO_LARGE => {
            StoreError::KeyTooLarge { len_bytes: 0, max_bytes: crate::limits::MAX_KEY_BYTES }
        }
        code::VALUE_TOO_LARGE => {
            StoreError::ValueTooLarge { len_bytes: 0, max_bytes: crate::limits::MAX_VALUE_BYTES }
        }
        code => StoreError::Fdb { code, message: err.message() },
    }
}
