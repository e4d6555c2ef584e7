//! The store contract's conformance suite, generic over [`Store`]: every backend runs every
//! case (see `suite!`). Each case works under its fixture's `root` prefix, so a backend
//! that shares one keyspace between cases (FoundationDB) keeps them apart.

#![allow(dead_code, unreachable_pub)]

use std::sync::Barrier;
use std::time::Duration;

use arca_store::limits::{MAX_KEY_BYTES, MAX_TRANSACTION_BYTES, MAX_VALUE_BYTES};
use arca_store::tuple::{self, Element};
use arca_store::{RangeOptions, Store, StoreError, StoreExt, Transaction, Versionstamp, prefix_end};

/// A store to test and the prefix the case may use.
pub struct Fixture {
    pub store: Box<dyn Store>,
    pub root: Vec<u8>,
    /// Whatever must outlive the store (a temporary directory); dropped after it.
    pub keep_alive: Box<dyn std::any::Any + Send + Sync>,
}

impl Fixture {
    pub fn key(&self, suffix: &[u8]) -> Vec<u8> {
        [self.root.as_slice(), suffix].concat()
    }

    fn set(&self, key: &[u8], value: &[u8]) {
        self.store.transact(|tx| tx.set(&self.key(key), value)).unwrap();
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store.transact(|tx| tx.get(&self.key(key))).unwrap().value
    }

    fn all(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let end = prefix_end(&self.root).unwrap_or_else(|| vec![0xFF]);
        let kvs = self.store.transact(|tx| tx.get_range(&self.root, &end, RangeOptions::default())).unwrap();
        kvs.value.into_iter().map(|kv| (kv.key[self.root.len()..].to_vec(), kv.value)).collect()
    }
}

/// Expands to one `#[test]` per case, each on a fresh fixture from `$make: fn(&str) -> Fixture`
/// (the argument names the case). `$make_short: fn(&str, Duration) -> Fixture` builds a store
/// whose transactions time out after the given duration.
#[macro_export]
macro_rules! suite {
    ($make:path, $make_short:path) => {
        $crate::suite!(@cases $make;
            set_get_clear, read_your_writes, replace_is_a_clear_then_a_set, range_bounds_are_half_open, range_limit_and_reverse,
            empty_and_inverted_ranges, clear_range_removes_exactly_its_range,
            keys_with_special_bytes_keep_their_order, failed_closure_leaves_no_trace,
            snapshot_isolation_within_a_transaction, conflicting_transaction_is_retried,
            conflicting_commit_is_refused, concurrent_increments_are_serializable,
            versionstamps_follow_commit_order, concurrent_versionstamps_are_unique_and_ordered,
            commit_version_increases_and_read_only_has_none, oversized_key_is_refused,
            oversized_value_is_refused, oversized_transaction_is_refused,
            system_keys_are_refused, limits_are_inclusive, ignored_limit_error_still_fails_commit,
            maybe_committed_is_false_without_unknown_results);
        #[test]
        fn transaction_time_limit_is_enforced() {
            $crate::conformance::transaction_time_limit_is_enforced(&$make_short(
                "transaction_time_limit_is_enforced",
                std::time::Duration::from_millis(200),
            ));
        }
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::$case(&$make(stringify!($case)));
            }
        )*
    };
}

pub fn set_get_clear(f: &Fixture) {
    assert_eq!(f.get(b"a"), None);
    f.set(b"a", b"1");
    assert_eq!(f.get(b"a"), Some(b"1".to_vec()));
    f.set(b"a", b"2");
    assert_eq!(f.get(b"a"), Some(b"2".to_vec()));
    f.store.transact(|tx| tx.clear(&f.key(b"a"))).unwrap();
    assert_eq!(f.get(b"a"), None);
    // An empty value is a value, not an absence.
    f.set(b"e", b"");
    assert_eq!(f.get(b"e"), Some(Vec::new()));
}

pub fn read_your_writes(f: &Fixture) {
    f.set(b"b", b"old");
    f.store
        .transact(|tx| {
            tx.set(&f.key(b"a"), b"new")?;
            assert_eq!(tx.get(&f.key(b"a"))?, Some(b"new".to_vec()));
            tx.clear(&f.key(b"b"))?;
            assert_eq!(tx.get(&f.key(b"b"))?, None);
            tx.set(&f.key(b"c"), b"3")?;
            let keys: Vec<_> = tx
                .get_range(&f.key(b""), &f.key(b"z"), RangeOptions::default())?
                .into_iter()
                .map(|kv| kv.key)
                .collect();
            assert_eq!(keys, vec![f.key(b"a"), f.key(b"c")]);
            tx.clear_range(&f.key(b"a"), &f.key(b"b"))?;
            assert_eq!(tx.get(&f.key(b"a"))?, None);
            Ok::<_, StoreError>(())
        })
        .unwrap();
    assert_eq!(f.all(), vec![(b"c".to_vec(), b"3".to_vec())]);
}

pub fn replace_is_a_clear_then_a_set(f: &Fixture) {
    fill(f, &[b"v/1", b"v/2", b"w"]);
    f.store
        .transact(|tx| {
            // The old key goes, the new one holds the value, read back in the transaction.
            tx.replace(&f.key(b"v/1"), &f.key(b"v/3"), b"three")?;
            assert_eq!(tx.get(&f.key(b"v/1"))?, None);
            assert_eq!(tx.get(&f.key(b"v/3"))?, Some(b"three".to_vec()));
            // An absent old key: a plain set.
            tx.replace(&f.key(b"gone"), &f.key(b"v/4"), b"four")?;
            // A new key that already holds a value: overwritten, as `set` would.
            tx.replace(&f.key(b"v/2"), &f.key(b"w"), b"w2")?;
            // The same key: its value changes.
            tx.replace(&f.key(b"v/4"), &f.key(b"v/4"), b"four again")?;
            // The same key, absent: a plain set.
            tx.replace(&f.key(b"v/5"), &f.key(b"v/5"), b"five")?;
            assert_eq!(tx.get(&f.key(b"v/5"))?, Some(b"five".to_vec()));
            let keys: Vec<_> = tx
                .get_range(&f.key(b""), &f.key(b"z"), RangeOptions::default())?
                .into_iter()
                .map(|kv| kv.key)
                .collect();
            assert_eq!(keys, vec![f.key(b"v/3"), f.key(b"v/4"), f.key(b"v/5"), f.key(b"w")]);
            Ok::<_, StoreError>(())
        })
        .unwrap();
    assert_eq!(
        f.all(),
        vec![
            (b"v/3".to_vec(), b"three".to_vec()),
            (b"v/4".to_vec(), b"four again".to_vec()),
            (b"v/5".to_vec(), b"five".to_vec()),
            (b"w".to_vec(), b"w2".to_vec()),
        ]
    );
    // A failed transaction leaves both keys as they were.
    let failed = f.store.transact(|tx| {
        tx.replace(&f.key(b"v/3"), &f.key(b"v/6"), b"six")?;
        tx.replace(&f.key(b"v/4"), &f.key(b"v/4"), b"lost")?;
        Err::<(), _>(StoreError::Corrupt("the caller gave up"))
    });
    assert!(failed.is_err());
    assert_eq!(f.get(b"v/3"), Some(b"three".to_vec()));
    assert_eq!(f.get(b"v/6"), None);
    assert_eq!(f.get(b"v/4"), Some(b"four again".to_vec()));
}

fn fill(f: &Fixture, keys: &[&[u8]]) {
    f.store
        .transact(|tx| {
            for key in keys {
                tx.set(&f.key(key), key)?;
            }
            Ok::<_, StoreError>(())
        })
        .unwrap();
}

fn range_keys(f: &Fixture, begin: &[u8], end: &[u8], opts: RangeOptions) -> Vec<Vec<u8>> {
    let kvs = f.store.transact(|tx| tx.get_range(&f.key(begin), &f.key(end), opts)).unwrap().value;
    kvs.into_iter().map(|kv| kv.key[f.root.len()..].to_vec()).collect()
}

pub fn range_bounds_are_half_open(f: &Fixture) {
    fill(f, &[b"a", b"b", b"c", b"d"]);
    assert_eq!(range_keys(f, b"b", b"d", RangeOptions::default()), vec![b"b".to_vec(), b"c".to_vec()]);
    // A begin that is not a key starts at the next key; an end past the last key is fine.
    assert_eq!(range_keys(f, b"bb", b"zz", RangeOptions::default()), vec![b"c".to_vec(), b"d".to_vec()]);
    // The prefix range holds exactly the keys with the prefix.
    fill(f, &[b"p", b"p\x00", b"p\xff\xff", b"q"]);
    let end = prefix_end(b"p").unwrap();
    assert_eq!(
        range_keys(f, b"p", &end, RangeOptions::default()),
        vec![b"p".to_vec(), b"p\x00".to_vec(), b"p\xff\xff".to_vec()]
    );
}

pub fn range_limit_and_reverse(f: &Fixture) {
    fill(f, &[b"a", b"b", b"c", b"d", b"e"]);
    assert_eq!(range_keys(f, b"a", b"z", RangeOptions::limit(2)), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(
        range_keys(f, b"a", b"z", RangeOptions::limit(2).reversed()),
        vec![b"e".to_vec(), b"d".to_vec()]
    );
    assert_eq!(
        range_keys(f, b"b", b"e", RangeOptions::default().reversed()),
        vec![b"d".to_vec(), b"c".to_vec(), b"b".to_vec()]
    );
    // A limit larger than the range returns the whole range; 0 means no limit.
    assert_eq!(range_keys(f, b"a", b"z", RangeOptions::limit(100)).len(), 5);
    assert_eq!(range_keys(f, b"a", b"z", RangeOptions::limit(0)).len(), 5);
    assert_eq!(range_keys(f, b"a", b"z", RangeOptions::limit(1).snapshot()), vec![b"a".to_vec()]);
}

pub fn empty_and_inverted_ranges(f: &Fixture) {
    assert!(range_keys(f, b"a", b"z", RangeOptions::default()).is_empty());
    fill(f, &[b"m"]);
    assert!(range_keys(f, b"m", b"m", RangeOptions::default()).is_empty());
    let err =
        f.store.transact(|tx| tx.get_range(&f.key(b"z"), &f.key(b"a"), RangeOptions::default())).unwrap_err();
    assert!(matches!(err, StoreError::InvertedRange), "{err:?}");
    let err = f.store.transact(|tx| tx.clear_range(&f.key(b"z"), &f.key(b"a"))).unwrap_err();
    assert!(matches!(err, StoreError::InvertedRange), "{err:?}");
    // The whole user keyspace is a legal range.
    f.store.transact(|tx| tx.get_range(b"", b"\xff", RangeOptions::limit(1))).unwrap();
}

pub fn clear_range_removes_exactly_its_range(f: &Fixture) {
    fill(f, &[b"a", b"b", b"b\x00", b"c", b"d"]);
    f.store.transact(|tx| tx.clear_range(&f.key(b"b"), &f.key(b"d"))).unwrap();
    let left: Vec<_> = f.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(left, vec![b"a".to_vec(), b"d".to_vec()]);
}

pub fn keys_with_special_bytes_keep_their_order(f: &Fixture) {
    let keys: Vec<Vec<u8>> = vec![
        tuple::pack(&["kv".into(), "a".into(), 1u64.into()]),
        tuple::pack(&["kv".into(), "a".into(), 256u64.into()]),
        tuple::pack(&["kv".into(), "a\u{0}b".into()]),
        tuple::pack(&["kv".into(), "ab".into()]),
        tuple::pack(&["kv".into(), Element::Bytes(vec![0xFE, 0xFF])]),
        vec![0xFE, 0xFF, 0x00],
    ];
    let mut shuffled = keys.clone();
    shuffled.reverse();
    let refs: Vec<&[u8]> = shuffled.iter().map(Vec::as_slice).collect();
    fill(f, &refs);
    let mut expected = keys;
    expected.sort();
    let read: Vec<_> = f.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(read, expected);
}

#[derive(Debug)]
enum CaseError {
    Store(StoreError),
    Refused,
}

impl From<StoreError> for CaseError {
    fn from(err: StoreError) -> Self {
        CaseError::Store(err)
    }
}

impl arca_store::TxnError for CaseError {
    fn as_store_error(&self) -> Option<&StoreError> {
        match self {
            CaseError::Store(err) => Some(err),
            CaseError::Refused => None,
        }
    }
}

pub fn failed_closure_leaves_no_trace(f: &Fixture) {
    f.set(b"kept", b"1");
    let mut attempts = 0;
    let err = f
        .store
        .transact(|tx| {
            attempts += 1;
            tx.set(&f.key(b"new"), b"x")?;
            tx.clear(&f.key(b"kept"))?;
            tx.set_versionstamped_key(&f.key(b"log/"), b"", b"x")?;
            Err::<(), _>(CaseError::Refused)
        })
        .unwrap_err();
    assert!(matches!(err, CaseError::Refused));
    assert_eq!(attempts, 1, "a caller's own error is not retried");
    assert_eq!(f.all(), vec![(b"kept".to_vec(), b"1".to_vec())]);
}

pub fn snapshot_isolation_within_a_transaction(f: &Fixture) {
    f.set(b"k", b"before");
    let mut reader = f.store.begin().unwrap();
    assert_eq!(reader.get(&f.key(b"k")).unwrap(), Some(b"before".to_vec()));
    f.set(b"k", b"after");
    f.set(b"other", b"new");
    // The open transaction keeps reading its snapshot.
    assert_eq!(reader.get(&f.key(b"k")).unwrap(), Some(b"before".to_vec()));
    assert_eq!(reader.get_snapshot(&f.key(b"other")).unwrap(), None);
    // A read-only transaction commits whatever happened meanwhile.
    assert_eq!(reader.commit().unwrap().version, None);
    assert_eq!(f.get(b"k"), Some(b"after".to_vec()));
}

fn read_counter(tx: &mut dyn Transaction, key: &[u8]) -> Result<u64, StoreError> {
    Ok(tx.get(key)?.map(|v| u64::from_be_bytes(v.try_into().unwrap())).unwrap_or(0))
}

pub fn conflicting_transaction_is_retried(f: &Fixture) {
    let counter = f.key(b"counter");
    let mut attempts = 0;
    let committed = f
        .store
        .transact(|tx| {
            attempts += 1;
            let seen = read_counter(tx, &counter)?;
            if attempts == 1 {
                // A concurrent writer commits between our read and our write.
                f.store.transact(|other| other.set(&counter, &10u64.to_be_bytes())).unwrap();
            }
            tx.set(&counter, &(seen + 1).to_be_bytes())?;
            Ok::<_, StoreError>(seen)
        })
        .unwrap();
    assert_eq!(attempts, 2, "the first attempt must conflict and be re-run");
    assert_eq!(committed.value, 10, "the retry reads the concurrent write");
    assert_eq!(f.get(b"counter"), Some(11u64.to_be_bytes().to_vec()));
}

pub fn conflicting_commit_is_refused(f: &Fixture) {
    let counter = f.key(b"counter");
    let mut first = f.store.begin().unwrap();
    let seen = read_counter(first.as_mut(), &counter).unwrap();
    f.store.transact(|tx| tx.set(&counter, &5u64.to_be_bytes())).unwrap();
    let outcome = first.set(&counter, &(seen + 1).to_be_bytes()).and_then(|()| first.commit());
    let err = outcome.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    drop(first);
    assert_eq!(f.get(b"counter"), Some(5u64.to_be_bytes().to_vec()), "the stale write was not applied");
}

pub fn concurrent_increments_are_serializable(f: &Fixture) {
    const THREADS: usize = 4;
    const INCREMENTS: u64 = 25;
    let counter = f.key(b"counter");
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                barrier.wait();
                for _ in 0..INCREMENTS {
                    f.store
                        .transact(|tx| {
                            let seen = read_counter(tx, &counter)?;
                            tx.set(&counter, &(seen + 1).to_be_bytes())
                        })
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(f.get(b"counter"), Some((THREADS as u64 * INCREMENTS).to_be_bytes().to_vec()));
}

fn stamps_under(f: &Fixture, prefix: &[u8]) -> Vec<(Versionstamp, Vec<u8>)> {
    let prefix = f.key(prefix);
    let end = prefix_end(&prefix).unwrap();
    let kvs = f.store.transact(|tx| tx.get_range(&prefix, &end, RangeOptions::default())).unwrap().value;
    kvs.into_iter()
        .map(|kv| {
            let stamp = Versionstamp::from_slice(&kv.key[prefix.len()..]).expect("12-byte stamp");
            (stamp, kv.key[prefix.len() + Versionstamp::LEN..].to_vec())
        })
        .collect()
}

pub fn versionstamps_follow_commit_order(f: &Fixture) {
    let mut expected = Vec::new();
    for round in 0u8..4 {
        let committed = f
            .store
            .transact(|tx| {
                let mut orders = Vec::new();
                for i in 0u8..3 {
                    orders.push(tx.set_versionstamped_key(&f.key(b"log/"), &[round, i], b"v")?);
                }
                Ok::<_, StoreError>(orders)
            })
            .unwrap();
        assert_eq!(committed.value, vec![0, 1, 2], "user order numbers the keys of one transaction");
        assert!(committed.commit.stamp.is_some(), "a stamping commit reports its stamp");
        for (i, order) in committed.value.iter().enumerate() {
            expected.push((committed.commit.versionstamp(*order).unwrap(), vec![round, i as u8]));
        }
    }
    let read = stamps_under(f, b"log/");
    assert_eq!(read, expected, "keys sort in commit order and carry the reported stamps");
    for pair in read.windows(2) {
        assert!(pair[0].0 < pair[1].0);
    }
}

pub fn concurrent_versionstamps_are_unique_and_ordered(f: &Fixture) {
    const THREADS: u8 = 3;
    const APPENDS: u8 = 20;
    let barrier = Barrier::new(THREADS.into());
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                for seq in 0..APPENDS {
                    f.store
                        .transact(|tx| tx.set_versionstamped_key(&f.key(b"q/"), &[thread, seq], b""))
                        .unwrap();
                }
            });
        }
    });
    let read = stamps_under(f, b"q/");
    assert_eq!(read.len(), usize::from(THREADS) * usize::from(APPENDS));
    for pair in read.windows(2) {
        assert!(pair[0].0 < pair[1].0, "stamps strictly increase: {:?}", (pair[0].0, pair[1].0));
    }
    // Each thread's appends appear in the order it made them.
    for thread in 0..THREADS {
        let seqs: Vec<u8> = read.iter().filter(|(_, s)| s[0] == thread).map(|(_, s)| s[1]).collect();
        assert_eq!(seqs, (0..APPENDS).collect::<Vec<_>>());
    }
}

pub fn commit_version_increases_and_read_only_has_none(f: &Fixture) {
    let mut last = 0;
    for i in 0u8..5 {
        let version = f.store.transact(|tx| tx.set(&f.key(b"v"), &[i])).unwrap().commit.version.unwrap();
        assert!(version > last, "{version} after {last}");
        last = version;
    }
    let read_only = f.store.transact(|tx| tx.get(&f.key(b"v"))).unwrap();
    assert_eq!(read_only.commit.version, None);
    assert_eq!(read_only.commit.stamp, None);
}

fn assert_nothing_written(f: &Fixture) {
    assert_eq!(f.all(), Vec::new(), "a refused transaction must write nothing");
}

pub fn oversized_key_is_refused(f: &Fixture) {
    let big = vec![b'k'; MAX_KEY_BYTES + 1];
    let err = f
        .store
        .transact(|tx| {
            tx.set(&f.key(b"before"), b"1")?;
            tx.set(&big, b"v")
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::KeyTooLarge { len_bytes, .. } if len_bytes == MAX_KEY_BYTES + 1),
        "{err:?}"
    );
    assert!(err.is_caller_error() && !err.is_retryable());
    let err = f.store.transact(|tx| tx.get(&big)).unwrap_err();
    assert!(matches!(err, StoreError::KeyTooLarge { .. }), "{err:?}");
    let err = f.store.transact(|tx| tx.set_versionstamped_key(&f.key(b"q/"), &big, b"")).unwrap_err();
    assert!(matches!(err, StoreError::KeyTooLarge { .. }), "{err:?}");
    assert_nothing_written(f);
}

pub fn oversized_value_is_refused(f: &Fixture) {
    let err = f
        .store
        .transact(|tx| {
            tx.set(&f.key(b"before"), b"1")?;
            tx.set(&f.key(b"big"), &vec![0; MAX_VALUE_BYTES + 1])
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::ValueTooLarge { .. }), "{err:?}");
    assert_nothing_written(f);
}

pub fn oversized_transaction_is_refused(f: &Fixture) {
    let value = vec![7u8; MAX_VALUE_BYTES];
    let err = f
        .store
        .transact(|tx| {
            for i in 0..=(MAX_TRANSACTION_BYTES / MAX_VALUE_BYTES) as u32 {
                tx.set(&f.key(&i.to_be_bytes()), &value)?;
            }
            Ok::<_, StoreError>(())
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::TransactionTooLarge { .. }), "{err:?}");
    assert_nothing_written(f);
}

pub fn system_keys_are_refused(f: &Fixture) {
    for result in [
        f.store.transact(|tx| tx.set(b"\xffsystem", b"v")),
        f.store.transact(|tx| tx.clear(b"\xff")),
        f.store.transact(|tx| tx.get(b"\xff/x").map(drop)),
        f.store.transact(|tx| tx.clear_range(b"", b"\xff\x00")),
    ] {
        assert!(matches!(result, Err(StoreError::KeyOutsideLegalRange)), "{result:?}");
    }
    assert_nothing_written(f);
}

pub fn limits_are_inclusive(f: &Fixture) {
    let key = f.key(&vec![b'k'; MAX_KEY_BYTES - f.root.len()]);
    f.store.transact(|tx| tx.set(&key, &vec![1; MAX_VALUE_BYTES])).unwrap();
    let stored = f.store.transact(|tx| tx.get(&key)).unwrap().value.unwrap();
    assert_eq!(stored.len(), MAX_VALUE_BYTES);
}

pub fn ignored_limit_error_still_fails_commit(f: &Fixture) {
    let err = f
        .store
        .transact(|tx| {
            tx.set(&f.key(b"small"), b"1")?;
            // The closure swallows the error and asks to commit anyway.
            let _ = tx.set(&f.key(b"big"), &vec![0; MAX_VALUE_BYTES + 1]);
            Ok::<_, StoreError>(())
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::ValueTooLarge { .. }), "{err:?}");
    assert_nothing_written(f);
}

pub fn transaction_time_limit_is_enforced(f: &Fixture) {
    let limit = Duration::from_millis(200);
    let err = f
        .store
        .transact(|tx| {
            tx.set(&f.key(b"slow"), b"1")?;
            // Outlive the limit; this is the condition under test, not synchronisation.
            std::thread::sleep(limit + Duration::from_millis(100));
            Ok::<_, StoreError>(())
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::TransactionTimedOut { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert_nothing_written(f);
}

pub fn maybe_committed_is_false_without_unknown_results(f: &Fixture) {
    let flags = f
        .store
        .transact(|tx| {
            tx.set(&f.key(b"k"), b"v")?;
            Ok::<_, StoreError>(tx.maybe_committed())
        })
        .unwrap();
    assert!(!flags.value);
}
