//! FoundationDB's limits, enforced identically by every backend.
//!
//! Code that stays inside these limits on the embedded default runs unchanged on
//! FoundationDB. A breach fails the operation with a typed error *and* poisons the
//! transaction, so a closure that ignores the error still cannot commit: nothing is written.

use std::time::{Duration, Instant};

use crate::StoreError;

/// Longest key, in bytes (FoundationDB: 10,000).
pub const MAX_KEY_BYTES: usize = 10_000;
/// Longest value, in bytes (FoundationDB: 100,000).
pub const MAX_VALUE_BYTES: usize = 100_000;
/// Most bytes of mutations (keys and values written, keys and ranges cleared) in one
/// transaction (FoundationDB: 10,000,000).
pub const MAX_TRANSACTION_BYTES: usize = 10_000_000;
/// Longest a transaction may run, from its first operation to its commit (FoundationDB: 5 s).
pub const MAX_TRANSACTION_DURATION: Duration = Duration::from_secs(5);
/// Most versionstamped keys in one transaction: the user order is two bytes.
pub const MAX_VERSIONSTAMPS_PER_TRANSACTION: usize = u16::MAX as usize + 1;

/// The end of the user keyspace: every legal key sorts before it.
pub const KEYSPACE_END: &[u8] = &[0xFF];

/// Per-transaction accounting shared by the backends.
#[derive(Debug)]
pub(crate) struct Budget {
    started: Instant,
    timeout: Duration,
    mutation_bytes: usize,
    versionstamps: usize,
    /// The first limit breach; once set, the transaction cannot commit.
    poisoned: Option<StoreError>,
}

impl Budget {
    pub(crate) fn new(timeout: Duration) -> Self {
        Budget { started: Instant::now(), timeout, mutation_bytes: 0, versionstamps: 0, poisoned: None }
    }

    /// Start over for a retry.
    pub(crate) fn reset(&mut self) {
        *self = Budget::new(self.timeout);
    }

    /// Fails once the transaction is older than its time limit, or was poisoned.
    pub(crate) fn check_alive(&mut self) -> Result<(), StoreError> {
        if let Some(err) = &self.poisoned {
            return Err(replay(err));
        }
        if self.started.elapsed() > self.timeout {
            return self.poison(StoreError::TransactionTimedOut { limit: self.timeout });
        }
        Ok(())
    }

    pub(crate) fn check_read_key(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.check_alive()?;
        check_key(key)
    }

    pub(crate) fn check_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.check_alive()?;
        check_range(begin, end)
    }

    pub(crate) fn charge_set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.check_alive()?;
        if let Err(err) = check_key(key).and_then(|()| check_value(value)) {
            return self.poison(err);
        }
        self.charge(key.len() + value.len())
    }

    pub(crate) fn charge_clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.check_alive()?;
        if let Err(err) = check_key(key) {
            return self.poison(err);
        }
        self.charge(key.len())
    }

    pub(crate) fn charge_clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.check_alive()?;
        if let Err(err) = check_range(begin, end) {
            return self.poison(err);
        }
        self.charge(begin.len() + end.len())
    }

    /// Accounts for one versionstamped key of `key_len_bytes` (stamp included) and returns its
    /// user order within the transaction.
    pub(crate) fn charge_versionstamp(
        &mut self,
        prefix: &[u8],
        key_len_bytes: usize,
        value: &[u8],
    ) -> Result<u16, StoreError> {
        self.check_alive()?;
        let checked = check_key(prefix).and_then(|()| {
            if key_len_bytes > MAX_KEY_BYTES {
                return Err(StoreError::KeyTooLarge { len_bytes: key_len_bytes, max_bytes: MAX_KEY_BYTES });
            }
            check_value(value)
        });
        if let Err(err) = checked {
            return self.poison(err);
        }
        let Ok(order) = u16::try_from(self.versionstamps) else {
            return self.poison(StoreError::TooManyVersionstamps { max: MAX_VERSIONSTAMPS_PER_TRANSACTION });
        };
        self.charge(key_len_bytes + value.len())?;
        self.versionstamps += 1;
        Ok(order)
    }

    fn charge(&mut self, bytes: usize) -> Result<(), StoreError> {
        let total = self.mutation_bytes.saturating_add(bytes);
        if total > MAX_TRANSACTION_BYTES {
            return self.poison(StoreError::TransactionTooLarge {
                len_bytes: total,
                max_bytes: MAX_TRANSACTION_BYTES,
            });
        }
        self.mutation_bytes = total;
        Ok(())
    }

    fn poison<T>(&mut self, err: StoreError) -> Result<T, StoreError> {
        let replayed = replay(&err);
        self.poisoned.get_or_insert(err);
        Err(replayed)
    }
}

/// Limit errors carry only plain data, so the poisoned error can be handed out again.
fn replay(err: &StoreError) -> StoreError {
    match err {
        StoreError::KeyTooLarge { len_bytes, max_bytes } => {
            StoreError::KeyTooLarge { len_bytes: *len_bytes, max_bytes: *max_bytes }
        }
        StoreError::ValueTooLarge { len_bytes, max_bytes } => {
            StoreError::ValueTooLarge { len_bytes: *len_bytes, max_bytes: *max_bytes }
        }
        StoreError::TransactionTooLarge { len_bytes, max_bytes } => {
            StoreError::TransactionTooLarge { len_bytes: *len_bytes, max_bytes: *max_bytes }
        }
        StoreError::TooManyVersionstamps { max } => StoreError::TooManyVersionstamps { max: *max },
        StoreError::TransactionTimedOut { limit } => StoreError::TransactionTimedOut { limit: *limit },
        StoreError::KeyOutsideLegalRange => StoreError::KeyOutsideLegalRange,
        StoreError::InvertedRange => StoreError::InvertedRange,
        _ => StoreError::Corrupt("only limit errors poison a transaction"),
    }
}

pub(crate) fn check_key(key: &[u8]) -> Result<(), StoreError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::KeyTooLarge { len_bytes: key.len(), max_bytes: MAX_KEY_BYTES });
    }
    if key.first() == Some(&0xFF) {
        return Err(StoreError::KeyOutsideLegalRange);
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::ValueTooLarge { len_bytes: value.len(), max_bytes: MAX_VALUE_BYTES });
    }
    Ok(())
}

/// A range `[begin, end)` is legal when both ends are at most [`KEYSPACE_END`] (FoundationDB
/// accepts `\xFF` as a range end) and begin does not sort after end.
fn check_range(begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
    for bound in [begin, end] {
        if bound.len() > MAX_KEY_BYTES {
            return Err(StoreError::KeyTooLarge { len_bytes: bound.len(), max_bytes: MAX_KEY_BYTES });
        }
        if bound > KEYSPACE_END {
            return Err(StoreError::KeyOutsideLegalRange);
        }
    }
    if begin > end {
        return Err(StoreError::InvertedRange);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breach_poisons_the_transaction() {
        let mut budget = Budget::new(MAX_TRANSACTION_DURATION);
        let err = budget.charge_set(b"k", &vec![0; MAX_VALUE_BYTES + 1]).unwrap_err();
        assert!(matches!(err, StoreError::ValueTooLarge { .. }));
        // A later, legal operation still fails: the transaction can no longer commit.
        let again = budget.charge_set(b"k", b"v").unwrap_err();
        assert!(matches!(again, StoreError::ValueTooLarge { .. }));
    }

    #[test]
    fn ranges_may_end_at_the_keyspace_end_but_not_beyond() {
        assert!(check_range(b"", KEYSPACE_END).is_ok());
        assert!(matches!(check_range(b"", &[0xFF, 0]), Err(StoreError::KeyOutsideLegalRange)));
        assert!(matches!(check_range(b"b", b"a"), Err(StoreError::InvertedRange)));
        assert!(check_range(b"a", b"a").is_ok());
    }

    #[test]
    fn exact_limits_are_allowed() {
        let mut budget = Budget::new(MAX_TRANSACTION_DURATION);
        budget.charge_set(&vec![1; MAX_KEY_BYTES], &vec![0; MAX_VALUE_BYTES]).unwrap();
        assert!(budget.charge_set(&vec![1; MAX_KEY_BYTES + 1], b"").is_err());
    }
}
