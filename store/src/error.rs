//! Errors of the store contract, in the store's own words.
//!
//! Callers ask questions (`is_retryable`, `is_maybe_committed`, `code`) instead of matching
//! on engine details; the retry loop in [`crate::StoreExt::transact`] uses the same questions.

use std::time::Duration;

/// Everything a store operation can fail with.
///
/// The variants separate caller misuse (limits, illegal keys), transient contention
/// (conflicts, busy locks: retried by [`crate::StoreExt::transact`]) and engine failures.
/// Messages never contain keys or values: keys may embed paths and values ciphertext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A key is longer than [`crate::limits::MAX_KEY_BYTES`].
    #[error("key of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    KeyTooLarge { len_bytes: usize, max_bytes: usize },
    /// A value is longer than [`crate::limits::MAX_VALUE_BYTES`].
    #[error("value of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    ValueTooLarge { len_bytes: usize, max_bytes: usize },
    /// The transaction's mutations add up to more than [`crate::limits::MAX_TRANSACTION_BYTES`].
    #[error("transaction of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TransactionTooLarge { len_bytes: usize, max_bytes: usize },
    /// More versionstamped keys in one transaction than the 2-byte user order can number.
    #[error("more than {max} versionstamped keys in one transaction")]
    TooManyVersionstamps { max: usize },
    /// The transaction ran longer than its time limit (at most 5 s, FoundationDB's limit).
    #[error("transaction exceeded its time limit of {limit:?}")]
    TransactionTimedOut { limit: Duration },
    /// A key in the system range (first byte `0xFF`), which no caller may touch.
    #[error("key outside the legal range: keys must not start with 0xFF")]
    KeyOutsideLegalRange,
    /// A range whose begin sorts after its end.
    #[error("range begin sorts after range end")]
    InvertedRange,
    /// Another transaction committed a conflicting change; the transaction was not committed.
    #[error("transaction conflicted with a concurrent commit and was not committed")]
    Conflict,
    /// The engine's lock could not be had in time; the transaction was not committed.
    #[error("the store is busy: the write lock could not be acquired in time")]
    Busy,
    /// The commit may or may not have been applied (FoundationDB's `commit_unknown_result`).
    #[error("the commit result is unknown: the transaction may have been committed")]
    MaybeCommitted,
    /// The retry loop gave up.
    #[error("transaction still conflicting after {attempts} attempts")]
    RetryLimitReached { attempts: u32 },
    /// A stored key did not decode (see [`crate::tuple`]).
    #[error("malformed key: {0}")]
    MalformedKey(#[from] crate::tuple::TupleError),
    /// The database file or its directory is unusable.
    #[error("store file error: {context}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The engine could not write: its disk is full (SQLite's `SQLITE_FULL`). Nothing of the
    /// transaction was committed; it may succeed once space is freed.
    #[error("the store's disk is full: the transaction was not committed")]
    Full,
    /// An error from SQLite that is neither contention nor a limit.
    #[error("sqlite error: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// An error from FoundationDB that is neither contention nor a limit.
    #[error("foundationdb error {code}: {message}")]
    Fdb { code: i32, message: &'static str },
    /// The store's own bookkeeping is inconsistent: a bug or a damaged file.
    #[error("store invariant violated: {0}")]
    Corrupt(&'static str),
}

impl StoreError {
    /// Whether re-running the whole transaction may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Conflict | StoreError::Busy | StoreError::MaybeCommitted => true,
            #[cfg(feature = "fdb")]
            StoreError::Fdb { code, .. } => foundationdb::FdbError::from_code(*code).is_retryable(),
            _ => false,
        }
    }

    /// Whether the failed commit may nevertheless have been applied. A retried transaction
    /// sees this through [`crate::Transaction::maybe_committed`] and must be idempotent.
    pub fn is_maybe_committed(&self) -> bool {
        matches!(self, StoreError::MaybeCommitted)
    }

    /// Whether the caller broke a documented limit or rule (as opposed to contention or an
    /// engine failure). Retrying such a transaction unchanged fails the same way.
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            StoreError::KeyTooLarge { .. }
                | StoreError::ValueTooLarge { .. }
                | StoreError::TransactionTooLarge { .. }
                | StoreError::TooManyVersionstamps { .. }
                | StoreError::TransactionTimedOut { .. }
                | StoreError::KeyOutsideLegalRange
                | StoreError::InvertedRange
        )
    }

    /// A stable, machine-readable code for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::KeyTooLarge { .. } => "key_too_large",
            StoreError::ValueTooLarge { .. } => "value_too_large",
            StoreError::TransactionTooLarge { .. } => "transaction_too_large",
            StoreError::TooManyVersionstamps { .. } => "too_many_versionstamps",
            StoreError::TransactionTimedOut { .. } => "transaction_timed_out",
            StoreError::KeyOutsideLegalRange => "key_outside_legal_range",
            StoreError::InvertedRange => "inverted_range",
            StoreError::Conflict => "not_committed",
            StoreError::Busy => "busy",
            StoreError::MaybeCommitted => "commit_unknown_result",
            StoreError::RetryLimitReached { .. } => "retry_limit_reached",
            StoreError::MalformedKey(_) => "malformed_key",
            StoreError::Io { .. } => "io",
            StoreError::Full => "storage_full",
            StoreError::Sqlite(_) => "sqlite",
            StoreError::Fdb { .. } => "fdb",
            StoreError::Corrupt(_) => "corrupt",
        }
    }
}

/// An error type a transaction closure may return: it can carry a [`StoreError`], and the
/// retry loop asks it whether it does, to decide whether to retry.
///
/// Closures that only fail with store errors use [`StoreError`] itself; a caller with its own
/// error enum (say, "check-and-set failed") implements this to abort with its own error.
pub trait TxnError: From<StoreError> {
    /// The store error inside, if this error is one.
    fn as_store_error(&self) -> Option<&StoreError>;
}

impl TxnError for StoreError {
    fn as_store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}
