//! The committer's memo of point reads, kept from one batch to the next while the store
//! proves it still holds.
//!
//! Requests of one batch mostly share a token, its policies and the mount, and a hot secret
//! is read by batch after batch. The committer remembers the values its jobs read with
//! `get` (a [`Memo`]) and, on an engine whose transactions can name the committed state
//! they read ([`Transaction::read_version`]: SQLite), carries the memo into the next batch.
//!
//! The memo is exact, never stale: it holds the state the committer's own last commit left
//! (version `v`). The next batch keeps it only if its snapshot is `v` itself, or if every
//! commit in between went through this process's [`JournaledStore`] — whose [`Journal`]
//! records the keys and ranges each commit wrote, so the memo forgets exactly those. A
//! commit the journal does not hold (another process, a lost entry, a bulk write) drops the
//! whole memo. FoundationDB names no such state, so there the memo lives for one batch
//! attempt, as it always did.
//!
//! The memo holds what the store holds: ciphertext, hashed tokens — never a decrypted secret.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arca_store::{CommitInfo, KeyValue, RangeOptions, Store, StoreError, Transaction, prefix_end};

/// Most bytes (keys and values) a memo holds. Past it, reads go to the store unremembered,
/// and the committer starts the next batch with an empty memo.
pub(crate) const MEMO_MAX_BYTES: usize = 8 << 20;

/// Point reads by key, as of one state of the store (see the module doc).
#[derive(Default)]
pub(crate) struct Memo {
    pub(crate) values: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Bytes held, bounded by [`MEMO_MAX_BYTES`].
    pub(crate) bytes: usize,
    /// Reads answered from the memo and from the store, since the committer last took them.
    pub(crate) hits: u64,
    pub(crate) misses: u64,
}

impl Memo {
    /// Records `key`'s value (a read, or a write to a key already held).
    pub(crate) fn remember(&mut self, key: &[u8], value: Option<&[u8]>) {
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

    pub(crate) fn forget(&mut self, key: &[u8]) {
        if let Some(value) = self.values.remove(key) {
            self.bytes -= key.len() + value.map_or(0, |v| v.len());
        }
    }

    /// Forgets every key in `[begin, end)`.
    pub(crate) fn forget_range(&mut self, begin: &[u8], end: &[u8]) {
        let mut freed = 0;
        self.values.retain(|key, value| {
            let keep = key.as_slice() < begin || key.as_slice() >= end;
            if !keep {
                freed += key.len() + value.as_ref().map_or(0, Vec::len);
            }
            keep
        });
        self.bytes -= freed;
    }

    fn forget_written(&mut self, written: &Written) {
        for key in &written.keys {
            self.forget(key);
        }
        for (begin, end) in written.ranges.iter().chain(&written.spill) {
            self.forget_range(begin, end);
        }
    }

    /// Nearly full: start the next batch afresh rather than serve only old keys.
    pub(crate) fn is_nearly_full(&self) -> bool {
        self.bytes > MEMO_MAX_BYTES / 8 * 7
    }
}

/// What one commit wrote, as a memo must forget it: its keys and ranges, the first
/// [`WRITTEN_MAX_ITEMS`] of them exactly and the rest as one covering range (forgetting more
/// than was written is always safe), so an entry stays small whatever the commit wrote.
#[derive(Debug, Default)]
struct Written {
    keys: Vec<Vec<u8>>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
    /// `[lo, hi)` covering every write past the first [`WRITTEN_MAX_ITEMS`].
    spill: Option<(Vec<u8>, Vec<u8>)>,
    /// Wrote under a prefix with no end (the whole keyspace): a memo cannot follow.
    everything: bool,
}

/// Keys and ranges a journal entry lists one by one.
const WRITTEN_MAX_ITEMS: usize = 64;
/// Commits the journal keeps; a memo further behind is dropped.
const JOURNAL_LEN: usize = 1024;

impl Written {
    fn add_key(&mut self, key: &[u8]) {
        if self.keys.len() + self.ranges.len() < WRITTEN_MAX_ITEMS {
            self.keys.push(key.to_vec());
        } else {
            let mut end = key.to_vec();
            end.push(0);
            self.widen(key, &end);
        }
    }

    fn add_range(&mut self, begin: &[u8], end: &[u8]) {
        if self.keys.len() + self.ranges.len() < WRITTEN_MAX_ITEMS {
            self.ranges.push((begin.to_vec(), end.to_vec()));
        } else {
            self.widen(begin, end);
        }
    }

    fn widen(&mut self, begin: &[u8], end: &[u8]) {
        match &mut self.spill {
            None => self.spill = Some((begin.to_vec(), end.to_vec())),
            Some((lo, hi)) => {
                if begin < lo.as_slice() {
                    *lo = begin.to_vec();
                }
                if end > hi.as_slice() {
                    *hi = end.to_vec();
                }
            }
        }
    }
}

/// The recent commits made through one [`JournaledStore`]: version → what it wrote.
#[derive(Debug, Default)]
pub struct Journal {
    commits: Mutex<VecDeque<(u64, Written)>>,
}

impl Journal {
    fn record(&self, version: u64, written: Written) {
        let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        if commits.len() == JOURNAL_LEN {
            commits.pop_front();
        }
        commits.push_back((version, written));
    }

    fn forget_until(&self, version: u64) {
        self.commits.lock().unwrap_or_else(|p| p.into_inner()).retain(|(v, _)| *v > version);
    }

    /// Brings `memo`, exact at version `from`, to version `to` by forgetting what each commit
    /// in between wrote. `false` when a commit in between is not in the journal (or wrote
    /// the whole keyspace): the memo must then be dropped. Entries up to `to` are then
    /// dropped from the journal: the committer's memo only moves forward.
    pub(crate) fn catch_up(&self, memo: &mut Memo, from: u64, to: u64) -> bool {
        if to < from || to - from > JOURNAL_LEN as u64 {
            return false;
        }
        if to == from {
            return true;
        }
        let commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        // Commits are pushed after they land, so two threads may push out of order.
        let between: Option<Vec<&Written>> = (from + 1..=to)
            .map(|version| {
                commits.iter().rev().find(|(v, _)| *v == version).map(|(_, w)| w).filter(|w| !w.everything)
            })
            .collect();
        match between {
            Some(between) => {
                for written in between {
                    memo.forget_written(written);
                }
                drop(commits);
                self.forget_until(to);
                true
            }
            None => false,
        }
    }
}

/// The node's store as every code path but the committer's batches sees it: the engine,
/// with each commit's writes recorded in a [`Journal`].
#[derive(Debug)]
pub struct JournaledStore {
    inner: Arc<dyn Store>,
    journal: Arc<Journal>,
}

impl JournaledStore {
    pub fn new(inner: Arc<dyn Store>, journal: Arc<Journal>) -> Self {
        JournaledStore { inner, journal }
    }
}

impl Store for JournaledStore {
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        Ok(Box::new(JournaledTxn {
            inner: self.inner.begin()?,
            journal: &self.journal,
            written: Written::default(),
        }))
    }

    fn upkeep(&self) {
        self.inner.upkeep();
    }
}

struct JournaledTxn<'a> {
    inner: Box<dyn Transaction + 'a>,
    journal: &'a Journal,
    /// This attempt's writes.
    written: Written,
}

impl Transaction for JournaledTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_snapshot(key)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.get_range(begin, end, opts)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.written.add_key(key);
        self.inner.set(key, value)
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.written.add_key(key);
        self.inner.clear(key)
    }

    fn replace(&mut self, old: &[u8], new: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.written.add_key(old);
        self.written.add_key(new);
        self.inner.replace(old, new, value)
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.written.add_range(begin, end);
        self.inner.clear_range(begin, end)
    }

    fn set_versionstamped_key(
        &mut self,
        prefix: &[u8],
        suffix: &[u8],
        value: &[u8],
    ) -> Result<u16, StoreError> {
        // The key is known only at commit: forget the whole prefix.
        match prefix_end(prefix) {
            Some(end) => self.written.add_range(prefix, &end),
            None => self.written.everything = true,
        }
        self.inner.set_versionstamped_key(prefix, suffix, value)
    }

    fn read_version(&mut self) -> Result<Option<u64>, StoreError> {
        self.inner.read_version()
    }

    fn lock_for_write(&mut self) -> Result<Option<u64>, StoreError> {
        self.inner.lock_for_write()
    }

    fn maybe_committed(&self) -> bool {
        self.inner.maybe_committed()
    }

    fn commit(&mut self) -> Result<CommitInfo, StoreError> {
        let info = self.inner.commit()?;
        if let Some(version) = info.version {
            self.journal.record(version, std::mem::take(&mut self.written));
        }
        Ok(info)
    }

    fn on_error(&mut self, err: &StoreError) -> Result<(), StoreError> {
        self.written = Written::default();
        self.inner.on_error(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_store::{SqliteConfig, SqliteStore, StoreExt};

    #[test]
    fn the_memo_stops_remembering_past_its_bound() {
        let mut memo = Memo::default();
        let big = vec![7u8; MEMO_MAX_BYTES / 2];
        memo.remember(b"one", Some(&big));
        memo.remember(b"two", Some(&big));
        assert!(memo.values.contains_key(&b"one"[..]) && !memo.values.contains_key(&b"two"[..]));
        assert!(memo.bytes <= MEMO_MAX_BYTES);
        assert!(!memo.is_nearly_full());
        memo.remember(b"one", Some(&vec![7u8; MEMO_MAX_BYTES - 3]));
        assert!(memo.is_nearly_full());
        memo.forget(b"one");
        assert_eq!((memo.values.len(), memo.bytes), (0, 0));
    }

    fn memo_of(pairs: &[(&[u8], Option<&[u8]>)]) -> Memo {
        let mut memo = Memo::default();
        for (key, value) in pairs {
            memo.remember(key, *value);
        }
        memo
    }

    /// A SQLite engine, a journaled store over it, and the version of a first (unjournaled)
    /// commit.
    fn journaled() -> (tempfile::TempDir, Arc<dyn Store>, Arc<Journal>, JournaledStore, u64) {
        let dir = tempfile::tempdir().unwrap();
        let engine: Arc<dyn Store> =
            Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap());
        let journal = Arc::new(Journal::default());
        let store = JournaledStore::new(engine.clone(), journal.clone());
        let at = engine.transact(|tx| tx.set(b"seed", b"")).unwrap().commit.version.unwrap();
        (dir, engine, journal, store, at)
    }

    #[test]
    fn catching_up_forgets_exactly_what_the_journaled_commits_wrote() {
        let (_dir, engine, journal, store, at) = journaled();
        let mut memo = memo_of(&[
            (b"a/1", Some(b"x")),
            (b"a/2", None),
            (b"b/1", Some(b"y")),
            (b"c/1", Some(b"z")),
            (b"d/1", Some(b"w")),
            (b"e/1", Some(b"v")),
        ]);
        // Nothing committed since: the memo holds as it is.
        assert!(journal.catch_up(&mut memo, at, at));
        // Three journaled commits (a read-only one takes no version).
        store.transact(|tx| tx.set(b"a/1", b"new")).unwrap();
        store.transact(|tx| tx.get(b"d/1").map(drop)).unwrap();
        store
            .transact(|tx| {
                tx.clear(b"a/2")?;
                tx.clear_range(b"b/", b"c/")
            })
            .unwrap();
        let now =
            store.transact(|tx| tx.set_versionstamped_key(b"c/", b"", b"stamped")).unwrap().commit.version;
        let now = now.unwrap();
        assert_eq!(now, at + 3);
        assert!(journal.catch_up(&mut memo, at, now));
        let mut kept: Vec<_> = memo.values.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, vec![b"d/1".to_vec(), b"e/1".to_vec()]);
        assert_eq!(memo.bytes, 3 + 1 + 3 + 1);

        // A commit the journal did not see (the engine itself, as another process would):
        // the memo cannot follow it.
        let unseen = engine.transact(|tx| tx.set(b"e/1", b"changed")).unwrap().commit.version.unwrap();
        assert!(!journal.catch_up(&mut memo, now, unseen));
        // A commit of many keys is journaled as its first keys plus one covering range:
        // the memo forgets every key in that range (more than was written: safe), and only
        // those; the journal entry stays small.
        let mut memo = memo_of(&[
            (b"e/9", Some(b"outside")),
            (b"f/0", None),
            (b"f/00000000000000000003", None),
            (b"f/00000000000000000070x", Some(b"inside the range, never written")),
            (b"f/~", None),
            (b"g/1", None),
        ]);
        let big = store
            .transact(|tx| {
                for i in 0..20_000u32 {
                    tx.set(format!("f/{i:020}").as_bytes(), b"")?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap()
            .commit
            .version
            .unwrap();
        {
            let commits = journal.commits.lock().unwrap();
            let (_, written) = commits.iter().find(|(v, _)| *v == big).unwrap();
            assert_eq!(written.keys.len(), WRITTEN_MAX_ITEMS);
            let (lo, hi) = written.spill.as_ref().unwrap();
            assert_eq!(lo.as_slice(), format!("f/{:020}", WRITTEN_MAX_ITEMS).as_bytes());
            assert_eq!(hi.as_slice(), [format!("f/{:020}", 19_999).as_bytes(), &[0]].concat().as_slice());
        }
        assert!(journal.catch_up(&mut memo, big - 1, big));
        let mut kept: Vec<_> = memo.values.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, vec![b"e/9".to_vec(), b"f/0".to_vec(), b"f/~".to_vec(), b"g/1".to_vec()]);
        // What the committer caught up past leaves the journal.
        assert!(journal.commits.lock().unwrap().iter().all(|(v, _)| *v > big));
        // A memo from the future cannot be brought back.
        assert!(!journal.catch_up(&mut memo_of(&[]), big, big - 1));
    }

    #[test]
    fn a_write_under_a_prefix_with_no_end_cannot_be_followed() {
        let journal = Journal::default();
        let mut written = Written::default();
        written.add_key(b"a");
        written.everything = true;
        journal.record(2, written);
        assert!(!journal.catch_up(&mut memo_of(&[(b"a", None)]), 1, 2));
    }

    #[test]
    fn a_retried_attempt_journals_only_what_it_committed() {
        let (_dir, _, journal, store, at) = journaled();
        let mut attempts = 0;
        let now = store
            .transact(|tx| {
                attempts += 1;
                if attempts == 1 {
                    tx.set(b"first/attempt", b"")?;
                    return Err(StoreError::Conflict);
                }
                tx.set(b"second/attempt", b"")
            })
            .unwrap()
            .commit
            .version
            .unwrap();
        let mut memo = memo_of(&[(b"first/attempt", None), (b"second/attempt", None)]);
        assert!(journal.catch_up(&mut memo, at, now));
        assert_eq!(memo.values.keys().collect::<Vec<_>>(), vec![&b"first/attempt".to_vec()]);
    }
}
