//! A request's writes, held back until its outcome is known.
//!
//! The committer runs every request of a batch in one transaction. A request that fails
//! (an error, a denial) must change nothing, whatever it wrote before it failed; its audit
//! event is appended either way. So the committer hands each request a transaction whose
//! writes go to a [`Pending`] instead of the store: the request reads through it (its own
//! writes first, then the transaction), and only when its outcome is success are the writes
//! replayed, in their order, into the batch's transaction. A failed request's writes are
//! dropped with it.
//!
//! Invariant: a request reads exactly what it would read had its writes gone straight into
//! the transaction (point reads and range reads, limits and reverse order included). The
//! property test below holds the overlay to a real transaction.
//!
//! Engine-neutral: SQLite's savepoints have no FoundationDB counterpart, and the replay
//! issues the very calls the request made (so SQLite's in-place `replace` stays in place).

use std::collections::BTreeMap;
use std::ops::Bound;

use arca_store::{KeyValue, RangeOptions, StoreError, Transaction};

/// One write, as the request made it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Write {
    Set { key: Vec<u8>, value: Vec<u8> },
    Clear { key: Vec<u8> },
    Replace { old: Vec<u8>, new: Vec<u8>, value: Vec<u8> },
    ClearRange { begin: Vec<u8>, end: Vec<u8> },
}

/// The writes of one request not yet in the transaction (see the module doc).
#[derive(Default)]
pub(crate) struct Pending {
    /// Every write, in order: what is replayed.
    writes: Vec<Write>,
    /// Each written key's latest state (`None`: cleared).
    latest: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Ranges cleared, `[begin, end)`; a key written after its range was cleared is in
    /// `latest`, which wins.
    cleared: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Rows read past a range read's limit when some rows of the transaction may be hidden by
/// the request's writes (so a small limit does not take one read per hidden row).
const RANGE_CHUNK: usize = 64;

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub(crate) fn set(&mut self, key: &[u8], value: &[u8]) {
        self.latest.insert(key.to_vec(), Some(value.to_vec()));
        self.writes.push(Write::Set { key: key.to_vec(), value: value.to_vec() });
    }

    pub(crate) fn clear(&mut self, key: &[u8]) {
        self.latest.insert(key.to_vec(), None);
        self.writes.push(Write::Clear { key: key.to_vec() });
    }

    pub(crate) fn replace(&mut self, old: &[u8], new: &[u8], value: &[u8]) {
        self.latest.insert(old.to_vec(), None);
        self.latest.insert(new.to_vec(), Some(value.to_vec()));
        self.writes.push(Write::Replace { old: old.to_vec(), new: new.to_vec(), value: value.to_vec() });
    }

    /// Clears `[begin, end)`; the caller checked `begin <= end` (the store refuses an
    /// inverted range, and the replay will too).
    pub(crate) fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin < end {
            let mut inside = self.latest.split_off(begin);
            let mut after = inside.split_off(end);
            self.latest.append(&mut after);
        }
        self.cleared.push((begin.to_vec(), end.to_vec()));
        self.writes.push(Write::ClearRange { begin: begin.to_vec(), end: end.to_vec() });
    }

    /// What the request's writes say of `key`: `Some(state)` if they wrote or cleared it,
    /// `None` if the transaction must be asked.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        if let Some(state) = self.latest.get(key) {
            return Some(state.as_deref());
        }
        self.in_cleared(key).then_some(None)
    }

    fn in_cleared(&self, key: &[u8]) -> bool {
        self.cleared.iter().any(|(begin, end)| begin.as_slice() <= key && key < end.as_slice())
    }

    /// Keys written in `[begin, end)` (`begin <= end`), with their latest state.
    fn written_in<'a>(
        &'a self,
        begin: &'a [u8],
        end: &'a [u8],
    ) -> impl DoubleEndedIterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> + 'a {
        self.latest.range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end)))
    }

    /// Whether a range read of `[begin, end)` would see any of these writes.
    fn touches(&self, begin: &[u8], end: &[u8]) -> bool {
        self.written_in(begin, end).next().is_some()
            || self.cleared.iter().any(|(b, e)| b.as_slice() < end && begin < e.as_slice())
    }

    /// A range read through these writes: the transaction's rows, less those the request
    /// wrote or cleared, merged with what it wrote.
    pub(crate) fn get_range(
        &self,
        tx: &mut dyn Transaction,
        begin: &[u8],
        end: &[u8],
        options: RangeOptions,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if begin > end || !self.touches(begin, end) {
            return tx.get_range(begin, end, options);
        }
        let want = options.limit;
        let mut found: Vec<KeyValue> = Vec::new();
        let (mut low, mut high) = (begin.to_vec(), end.to_vec());
        loop {
            // Enough rows for the limit even if none is hidden, or every row (no limit).
            let chunk = if want == 0 { 0 } else { (want - found.len()).max(RANGE_CHUNK) };
            let rows = tx.get_range(&low, &high, RangeOptions { limit: chunk, ..options })?;
            let more = chunk != 0 && rows.len() == chunk;
            match rows.last() {
                Some(last) if options.reverse => high.clone_from(&last.key),
                Some(last) => {
                    low.clone_from(&last.key);
                    low.push(0);
                }
                None => {}
            }
            found.extend(rows.into_iter().filter(|row| self.get(&row.key).is_none()));
            if !more || (want != 0 && found.len() >= want) || low >= high {
                break;
            }
        }
        // The transaction's rows kept are the first `want` of its own beyond this request's
        // writes: merged with every row written in the range, the first `want` are exact.
        let written = self
            .written_in(begin, end)
            .filter_map(|(key, value)| Some(KeyValue { key: key.clone(), value: value.clone()? }));
        found.extend(written);
        if options.reverse {
            found.sort_unstable_by(|a, b| b.key.cmp(&a.key));
        } else {
            found.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        }
        if want != 0 {
            found.truncate(want);
        }
        Ok(found)
    }

    /// The writes, in the order they were made.
    pub(crate) fn into_writes(self) -> Vec<Write> {
        self.writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_store::{SqliteConfig, SqliteStore, StoreExt};
    use proptest::prelude::*;

    /// A step of a request: a write, or a read whose answer is compared.
    #[derive(Debug, Clone)]
    enum Step {
        Set(u8, u8),
        Clear(u8),
        Replace(u8, u8, u8),
        ClearRange(u8, u8),
        Get(u8),
        Range { begin: u8, end: u8, limit: usize, reverse: bool },
    }

    fn key(k: u8) -> Vec<u8> {
        vec![b'k', k]
    }

    fn step() -> impl Strategy<Value = Step> {
        // 24 keys, so writes, clears and reads meet.
        let k = || 0u8..24;
        prop_oneof![
            (k(), any::<u8>()).prop_map(|(k, v)| Step::Set(k, v)),
            k().prop_map(Step::Clear),
            (k(), k(), any::<u8>()).prop_map(|(o, n, v)| Step::Replace(o, n, v)),
            (k(), k()).prop_map(|(b, e)| Step::ClearRange(b.min(e), b.max(e))),
            k().prop_map(Step::Get),
            (k(), k(), 0usize..5, any::<bool>()).prop_map(|(b, e, limit, reverse)| {
                Step::Range { begin: b.min(e), end: b.max(e), limit, reverse }
            }),
        ]
    }

    /// Runs `steps` straight into one transaction and through a `Pending` over another
    /// (both on the same starting rows), and returns what each one's reads saw; then replays
    /// the pending writes and returns both final states too.
    fn both(rows: &[(u8, u8)], steps: &[Step]) -> (Vec<String>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        let seed = |tx: &mut dyn Transaction| {
            for (k, v) in rows {
                tx.set(&key(*k), &[*v])?;
            }
            Ok::<_, StoreError>(())
        };
        let everything = |tx: &mut dyn Transaction| tx.get_range(b"k", b"l", RangeOptions::default());
        let direct = store
            .transact(|tx| {
                seed(tx)?;
                let mut seen = Vec::new();
                for s in steps {
                    match *s {
                        Step::Set(k, v) => tx.set(&key(k), &[v])?,
                        Step::Clear(k) => tx.clear(&key(k))?,
                        Step::Replace(o, n, v) => tx.replace(&key(o), &key(n), &[v])?,
                        Step::ClearRange(b, e) => tx.clear_range(&key(b), &key(e))?,
                        Step::Get(k) => seen.push(format!("{:?}", tx.get(&key(k))?)),
                        Step::Range { begin, end, limit, reverse } => {
                            let options = RangeOptions { limit, reverse, snapshot: false };
                            seen.push(format!("{:?}", tx.get_range(&key(begin), &key(end), options)?));
                        }
                    }
                }
                seen.push(format!("{:?}", everything(tx)?));
                tx.clear_range(b"k", b"l")?;
                Ok::<_, StoreError>(seen)
            })
            .unwrap()
            .value;
        let held = store
            .transact(|tx| {
                seed(tx)?;
                let mut pending = Pending::default();
                let mut seen = Vec::new();
                for s in steps {
                    match *s {
                        Step::Set(k, v) => pending.set(&key(k), &[v]),
                        Step::Clear(k) => pending.clear(&key(k)),
                        Step::Replace(o, n, v) => pending.replace(&key(o), &key(n), &[v]),
                        Step::ClearRange(b, e) => pending.clear_range(&key(b), &key(e)),
                        Step::Get(k) => {
                            let got = match pending.get(&key(k)) {
                                Some(state) => state.map(<[u8]>::to_vec),
                                None => tx.get(&key(k))?,
                            };
                            seen.push(format!("{got:?}"));
                        }
                        Step::Range { begin, end, limit, reverse } => {
                            let options = RangeOptions { limit, reverse, snapshot: false };
                            seen.push(format!(
                                "{:?}",
                                pending.get_range(tx, &key(begin), &key(end), options)?
                            ));
                        }
                    }
                }
                for write in pending.into_writes() {
                    match write {
                        Write::Set { key, value } => tx.set(&key, &value)?,
                        Write::Clear { key } => tx.clear(&key)?,
                        Write::Replace { old, new, value } => tx.replace(&old, &new, &value)?,
                        Write::ClearRange { begin, end } => tx.clear_range(&begin, &end)?,
                    }
                }
                seen.push(format!("{:?}", everything(tx)?));
                tx.clear_range(b"k", b"l")?;
                Ok::<_, StoreError>(seen)
            })
            .unwrap()
            .value;
        (direct, held)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn reads_through_pending_writes_are_the_transactions_own(
            rows in proptest::collection::vec((0u8..24, any::<u8>()), 0..16),
            steps in proptest::collection::vec(step(), 0..24),
        ) {
            let (direct, held) = both(&rows, &steps);
            prop_assert_eq!(direct, held);
        }
    }

    #[test]
    fn a_range_read_past_many_cleared_rows_keeps_its_limit() {
        // 200 rows, the first 150 cleared by the request: a read of 3 goes past them.
        let rows: Vec<(u8, u8)> = (0..200).map(|i| (i, i)).collect();
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        let seen = store
            .transact(|tx| {
                for (k, v) in &rows {
                    tx.set(&[b'r', *k], &[*v])?;
                }
                let mut pending = Pending::default();
                pending.clear_range(&[b'r', 0], &[b'r', 150]);
                pending.set(&[b'r', 10], b"back");
                let forward = pending.get_range(tx, b"r", b"s", RangeOptions::limit(3))?;
                let backward =
                    pending.get_range(tx, b"r", &[b'r', 152], RangeOptions::limit(3).reversed())?;
                Ok::<_, StoreError>((forward, backward))
            })
            .unwrap()
            .value;
        let keys = |rows: &[KeyValue]| rows.iter().map(|r| r.key[1]).collect::<Vec<_>>();
        assert_eq!(keys(&seen.0), vec![10, 150, 151]);
        assert_eq!(keys(&seen.1), vec![151, 150, 10]);
    }

    #[test]
    fn nothing_is_written_until_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap();
        store.transact(|tx| tx.set(b"a", b"1")).unwrap();
        let mut pending = Pending::default();
        assert!(pending.is_empty());
        pending.set(b"a", b"2");
        pending.clear_range(b"a", b"b");
        pending.set(b"c", b"3");
        assert!(!pending.is_empty());
        assert_eq!(pending.get(b"a"), Some(None));
        assert_eq!(pending.get(b"c"), Some(Some(&b"3"[..])));
        assert_eq!(pending.get(b"d"), None);
        drop(pending);
        let after = store.transact(|tx| tx.get_range(b"", b"\xfe", RangeOptions::default())).unwrap().value;
        assert_eq!(after, vec![KeyValue { key: b"a".to_vec(), value: b"1".to_vec() }]);
    }
}
