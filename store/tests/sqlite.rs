//! The conformance suite on the SQLite backend, plus what only SQLite has: a file.

mod conformance;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use arca_store::{SqliteConfig, SqliteStore, Store, StoreError, StoreExt};
use conformance::Fixture;

fn fixture(case: &str) -> Fixture {
    fixture_with_timeout(case, arca_store::limits::MAX_TRANSACTION_DURATION)
}

fn fixture_with_timeout(case: &str, timeout: Duration) -> Fixture {
    let dir = tempfile::Builder::new().prefix(case).tempdir().unwrap();
    let mut config = SqliteConfig::new(dir.path().join("store.db"));
    config.transaction_timeout = timeout;
    Fixture {
        store: Box::new(SqliteStore::open(config).unwrap()),
        root: b"t/".to_vec(),
        keep_alive: Box::new(dir),
    }
}

suite!(fixture, fixture_with_timeout);

#[test]
fn commits_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let version = {
        let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        store.transact(|tx| tx.set(b"k", b"v")).unwrap().commit.version.unwrap()
    };
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    assert_eq!(store.transact(|tx| tx.get(b"k")).unwrap().value, Some(b"v".to_vec()));
    let next = store.transact(|tx| tx.set(b"k", b"w")).unwrap().commit.version.unwrap();
    assert!(next > version, "commit versions keep increasing across restarts");
}

#[test]
fn the_store_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = SqliteStore::open(SqliteConfig::new(&path)).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
}

#[test]
fn a_file_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    std::fs::write(&path, b"this is not a database, just some bytes that are long enough").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(SqliteStore::open(SqliteConfig::new(&path)).is_err());
}

/// The page size recorded in a database file's header (bytes 16–17, big-endian).
fn header_page_size(path: &std::path::Path) -> u16 {
    let header = std::fs::read(path).unwrap();
    u16::from_be_bytes([header[16], header[17]])
}

#[test]
fn a_new_store_has_4_kib_pages_and_an_existing_one_keeps_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.db");
    let store = SqliteStore::open(SqliteConfig::new(&fresh)).unwrap();
    store.transact(|tx| tx.set(b"k", &[7u8; 1024])).unwrap();
    drop(store);
    assert_eq!(header_page_size(&fresh), 4096);

    // A file created with 8 KiB pages (as earlier releases did) opens, works and stays 8 KiB.
    let old = dir.path().join("old.db");
    {
        let conn = rusqlite::Connection::open(&old).unwrap();
        conn.execute_batch("PRAGMA page_size = 8192; CREATE TABLE unrelated (a);").unwrap();
    }
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(header_page_size(&old), 8192);
    let store = SqliteStore::open(SqliteConfig::new(&old)).unwrap();
    store.transact(|tx| tx.set(b"k", &[7u8; 1024])).unwrap();
    assert_eq!(store.transact(|tx| tx.get(b"k")).unwrap().value, Some(vec![7u8; 1024]));
    drop(store);
    assert_eq!(header_page_size(&old), 8192);
}

#[test]
fn read_version_names_the_last_commit_and_a_commit_after_it_makes_writes_conflict() {
    use arca_store::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("store.db"))).unwrap();
    let first = store.transact(|tx| tx.set(b"k", b"1")).unwrap().commit.version.unwrap();
    // A read-only commit bumps nothing; a fresh transaction reads the state `first` left.
    store.transact(|tx| tx.get(b"k").map(drop)).unwrap();
    let mut tx = store.begin().unwrap();
    assert_eq!(tx.read_version().unwrap(), Some(first));
    assert_eq!(tx.get(b"k").unwrap().as_deref(), Some(&b"1"[..]));

    // Another writer commits after that snapshot: the old snapshot still reads its state,
    // and writing from it fails with a retryable conflict.
    let second = store.transact(|other| other.set(b"k", b"2")).unwrap().commit.version.unwrap();
    assert_eq!(second, first + 1);
    assert_eq!(tx.read_version().unwrap(), Some(first));
    assert_eq!(tx.get(b"k").unwrap().as_deref(), Some(&b"1"[..]));
    let err = tx.set(b"k", b"3").unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    drop(tx);

    // Once an attempt has written, it no longer reads a committed state.
    let mut tx = store.begin().unwrap();
    assert_eq!(tx.read_version().unwrap(), Some(second));
    tx.set(b"k", b"4").unwrap();
    assert_eq!(tx.read_version().unwrap(), None);
    assert_eq!(tx.commit().unwrap().version, Some(second + 1));
}

#[test]
fn lock_for_write_names_the_state_it_reads_and_holds_the_lock_until_commit() {
    use arca_store::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let other = SqliteStore::open(SqliteConfig {
        transaction_timeout: Duration::from_millis(50),
        ..SqliteConfig::new(&path)
    })
    .unwrap();
    let first = store.transact(|tx| tx.set(b"k", b"1")).unwrap().commit.version.unwrap();
    let mut tx = store.begin().unwrap();
    assert_eq!(tx.lock_for_write().unwrap(), Some(first));
    assert_eq!(tx.get(b"k").unwrap().as_deref(), Some(&b"1"[..]));
    // The lock is held: another connection cannot write until this attempt ends.
    assert!(other.begin().unwrap().set(b"k", b"other").is_err());
    tx.set(b"k", b"2").unwrap();
    assert_eq!(tx.commit().unwrap().version, Some(first + 1));
    // Taken over a snapshot that is no longer the newest, it fails as a write would.
    let mut stale = store.begin().unwrap();
    assert_eq!(stale.read_version().unwrap(), Some(first + 1));
    other.transact(|tx| tx.set(b"k", b"3")).unwrap();
    assert!(matches!(stale.lock_for_write(), Err(StoreError::Conflict)));
}

/// The schema and rows a format-1 store (arca before the rowid layout) wrote.
fn format_1_file(path: &std::path::Path, rows: &[(&[u8], &[u8])], commit_version: i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA page_size = 8192; PRAGMA journal_mode = WAL;
         CREATE TABLE kv (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
         INSERT INTO meta (name, value) VALUES ('format', 1);",
    )
    .unwrap();
    conn.execute("INSERT INTO meta (name, value) VALUES ('commit_version', ?1)", [commit_version]).unwrap();
    for (key, value) in rows {
        conn.execute("INSERT INTO kv (key, value) VALUES (?1, ?2)", [key, value]).unwrap();
    }
    drop(conn);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn stored_format(path: &std::path::Path) -> (i64, String) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let format = conn.query_row("SELECT value FROM meta WHERE name = 'format'", [], |r| r.get(0)).unwrap();
    let sql = conn.query_row("SELECT sql FROM sqlite_schema WHERE name = 'kv'", [], |r| r.get(0)).unwrap();
    (format, sql)
}

#[test]
fn a_new_store_keeps_rows_in_a_rowid_table_under_a_key_index_and_stamped_keys_apart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    store.transact(|tx| tx.set(b"k", b"v")).unwrap();
    // Stamped keys go to their prefix's table, and a prefix overlapping a registered one to kv.
    store.transact(|tx| tx.set_versionstamped_key(b"q/", b"", b"e1").map(drop)).unwrap();
    store.transact(|tx| tx.set_versionstamped_key(b"q/x", b"", b"e2").map(drop)).unwrap();
    store.transact(|tx| tx.set_versionstamped_key(b"r/", b"", b"e3").map(drop)).unwrap();
    drop(store);
    let (format, sql) = stored_format(&path);
    assert_eq!(format, 2);
    assert!(sql.contains("UNIQUE") && !sql.contains("WITHOUT ROWID"), "{sql}");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(count("SELECT count(*) FROM stamped_1 WHERE value = x'6531'"), 1);
    assert_eq!(count("SELECT count(*) FROM kv WHERE value = x'6532'"), 1);
    assert_eq!(count("SELECT count(*) FROM stamped_2 WHERE value = x'6533'"), 1);
    assert_eq!(count("SELECT count(*) FROM stamped_prefix"), 2);
}

#[test]
fn a_format_1_store_is_converted_when_opened_with_its_rows_order_and_versions() {
    use arca_store::RangeOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    // Inserted out of order, with bytes that sort differently as text.
    let rows: [(&[u8], &[u8]); 5] =
        [(b"b\x00", b"2"), (b"a", b"1"), (b"b\xfe", b"4"), (b"b\x01", b"3"), (b"c", &[9; 2048])];
    format_1_file(&path, &rows, 41);

    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let (format, sql) = stored_format(&path);
    assert_eq!(format, 2);
    assert!(!sql.contains("WITHOUT ROWID"), "{sql}");
    let all = store.transact(|tx| tx.get_range(b"", b"\xff", RangeOptions::default())).unwrap().value;
    let keys: Vec<&[u8]> = all.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [&b"a"[..], b"b\x00", b"b\x01", b"b\xfe", b"c"]);
    assert_eq!(all[4].value, vec![9; 2048]);
    assert_eq!(store.transact(|tx| tx.get(b"b\x01")).unwrap().value.as_deref(), Some(&b"3"[..]));
    // Commit versions continue where format 1 left them; upserts and clears work.
    let version = store.transact(|tx| tx.set(b"a", b"one")).unwrap().commit.version.unwrap();
    assert_eq!(version, 42);
    store.transact(|tx| tx.clear(b"b\x00")).unwrap();
    drop(store);

    // A second open finds format 2 and changes nothing.
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let all = store.transact(|tx| tx.get_range(b"", b"\xff", RangeOptions::default())).unwrap().value;
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].value, b"one");
}

#[test]
fn a_store_of_an_unknown_format_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    format_1_file(&path, &[(b"k", b"v")], 7);
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE meta SET value = 3 WHERE name = 'format'", [])
        .unwrap();
    let err = SqliteStore::open(SqliteConfig::new(&path)).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    let (format, sql) = stored_format(&path);
    assert_eq!(format, 3);
    assert!(sql.contains("WITHOUT ROWID"), "{sql}");
}

mod stamped_table {
    //! Versionstamped keys live in their own table, merged with the plain keys on every read:
    //! a model (an ordered map) and the store must agree after any sequence of stamps, sets,
    //! clears, replaces and range clears, including plain writes of keys shaped like stamped ones and
    //! prefixes that overlap a registered one (those stay in the plain table).

    use std::collections::BTreeMap;

    use arca_store::{RangeOptions, SqliteConfig, SqliteStore, StoreExt};
    use proptest::prelude::*;

    // "q" overlaps "q/"; "s/" and "s/\0" overlap too, and a key stamped under "s/" can have
    // the shape of one stamped under "s/\0".
    const PREFIXES: [&[u8]; 5] = [b"q/", b"r/", b"q", b"s/\x00", b"s/"];
    const PLAIN: [&[u8]; 8] = [b"a", b"q/", b"q/\x00", b"q0", b"r/", b"r/\xfe", b"s/", b"z"];

    #[derive(Debug, Clone)]
    enum Op {
        Stamp { prefix: usize, suffix: u8, count: u8 },
        Set { key: Key, value: u8 },
        Clear { key: Key },
        Replace { old: Key, new: Key, value: u8 },
        ClearRange { begin: Key, end: Key },
        Range { begin: Key, end: Key, limit: usize, reverse: bool },
    }

    /// A plain key, or the n-th stamped key written so far (wrapping).
    #[derive(Debug, Clone)]
    enum Key {
        Plain(usize),
        Stamped(usize),
    }

    fn key() -> impl Strategy<Value = Key> {
        prop_oneof![(0..PLAIN.len()).prop_map(Key::Plain), (0usize..64).prop_map(Key::Stamped)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..PREFIXES.len(), any::<u8>(), 1u8..4).prop_map(|(prefix, suffix, count)| Op::Stamp { prefix, suffix, count }),
            2 => (key(), any::<u8>()).prop_map(|(key, value)| Op::Set { key, value }),
            1 => key().prop_map(|key| Op::Clear { key }),
            2 => (key(), key(), any::<u8>()).prop_map(|(old, new, value)| Op::Replace { old, new, value }),
            1 => (key(), key()).prop_map(|(begin, end)| Op::ClearRange { begin, end }),
            3 => (key(), key(), 0usize..5, any::<bool>()).prop_map(|(begin, end, limit, reverse)| Op::Range { begin, end, limit, reverse }),
        ]
    }

    fn resolve(key: &Key, stamped: &[Vec<u8>]) -> Vec<u8> {
        match key {
            Key::Plain(i) => PLAIN[*i].to_vec(),
            Key::Stamped(i) if stamped.is_empty() => PLAIN[i % PLAIN.len()].to_vec(),
            Key::Stamped(i) => stamped[i % stamped.len()].clone(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        #[test]
        fn the_store_agrees_with_an_ordered_map(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(SqliteConfig::new(dir.path().join("store.db"))).unwrap();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut stamped: Vec<Vec<u8>> = Vec::new();
            for op in ops {
                match op {
                    Op::Stamp { prefix, suffix, count } => {
                        let prefix = PREFIXES[prefix];
                        let committed = store
                            .transact(|tx| {
                                (0..count)
                                    .map(|i| tx.set_versionstamped_key(prefix, &[suffix, i], &[i]))
                                    .collect::<Result<Vec<u16>, _>>()
                            })
                            .unwrap();
                        for (i, order) in committed.value.iter().enumerate() {
                            let stamp = committed.commit.versionstamp(*order).unwrap();
                            let key = [prefix, stamp.as_bytes(), &[suffix, i as u8]].concat();
                            model.insert(key.clone(), vec![i as u8]);
                            stamped.push(key);
                        }
                    }
                    Op::Set { key, value } => {
                        let key = resolve(&key, &stamped);
                        store.transact(|tx| tx.set(&key, &[value, 1])).unwrap();
                        model.insert(key, vec![value, 1]);
                    }
                    Op::Clear { key } => {
                        let key = resolve(&key, &stamped);
                        store.transact(|tx| tx.clear(&key)).unwrap();
                        model.remove(&key);
                    }
                    Op::Replace { old, new, value } => {
                        let (old, new) = (resolve(&old, &stamped), resolve(&new, &stamped));
                        store.transact(|tx| tx.replace(&old, &new, &[value, 2])).unwrap();
                        model.remove(&old);
                        model.insert(new, vec![value, 2]);
                    }
                    Op::ClearRange { begin, end } => {
                        let (begin, end) = (resolve(&begin, &stamped), resolve(&end, &stamped));
                        if begin < end {
                            store.transact(|tx| tx.clear_range(&begin, &end)).unwrap();
                            model.retain(|k, _| !(k >= &begin && k < &end));
                        }
                    }
                    Op::Range { begin, end, limit, reverse } => {
                        let (begin, end) = (resolve(&begin, &stamped), resolve(&end, &stamped));
                        if begin >= end {
                            continue;
                        }
                        let opts = RangeOptions { limit, reverse, ..RangeOptions::default() };
                        let got = store.transact(|tx| tx.get_range(&begin, &end, opts)).unwrap().value;
                        let got: Vec<(Vec<u8>, Vec<u8>)> = got.into_iter().map(|kv| (kv.key, kv.value)).collect();
                        let mut want: Vec<(Vec<u8>, Vec<u8>)> =
                            model.range(begin.clone()..end.clone()).map(|(k, v)| (k.clone(), v.clone())).collect();
                        if reverse {
                            want.reverse();
                        }
                        if limit != 0 {
                            want.truncate(limit);
                        }
                        prop_assert_eq!(got, want);
                    }
                }
            }
            // Every key reads back alone, and the whole keyspace matches.
            for (key, value) in &model {
                let got = store.transact(|tx| tx.get(key)).unwrap().value;
                prop_assert_eq!(got.as_ref(), Some(value));
            }
            let all = store.transact(|tx| tx.get_range(b"", b"\xff", RangeOptions::default())).unwrap().value;
            prop_assert_eq!(all.len(), model.len());
        }
    }
}

/// The key the next commit's `order`-th versionstamped key under `prefix` will have, if the
/// commit after `last` is the next one.
fn next_stamped_key(prefix: &[u8], last: u64, ahead: u64, suffix: &[u8]) -> Vec<u8> {
    [prefix, &(last + ahead).to_be_bytes(), &[0, 0, 0, 0], suffix].concat()
}

#[test]
fn a_stamped_key_already_in_the_plain_table_is_moved_not_doubled() {
    use arca_store::RangeOptions;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("store.db"))).unwrap();
    let all = |store: &SqliteStore| {
        store.transact(|tx| tx.get_range(b"", b"\xff", RangeOptions::default())).unwrap().value
    };

    // Before the prefix is registered: a plain key with the shape of the next stamp.
    let last = store.transact(|tx| tx.set(b"a", b"1")).unwrap().commit.version.unwrap();
    let key = next_stamped_key(b"q/", last, 2, b"s");
    store.transact(|tx| tx.set(&key, b"plain")).unwrap();
    let stamped = store.transact(|tx| tx.set_versionstamped_key(b"q/", b"s", b"stamped")).unwrap();
    assert_eq!(stamped.commit.version, Some(last + 2), "the test predicted the version");
    assert_eq!(store.transact(|tx| tx.get(&key)).unwrap().value.as_deref(), Some(&b"stamped"[..]));
    assert_eq!(all(&store).len(), 2, "{:?}", all(&store));

    // After a prefix is registered with no such key in the plain table: a plain write of the
    // next stamp's key.
    let last = store.transact(|tx| tx.set_versionstamped_key(b"r/", b"x", b"e").map(drop)).unwrap();
    let key = next_stamped_key(b"r/", last.commit.version.unwrap(), 2, b"t");
    store.transact(|tx| tx.set(&key, b"plain")).unwrap();
    store.transact(|tx| tx.set_versionstamped_key(b"r/", b"t", b"stamped").map(drop)).unwrap();
    assert_eq!(store.transact(|tx| tx.get(&key)).unwrap().value.as_deref(), Some(&b"stamped"[..]));
    assert_eq!(all(&store).len(), 4, "{:?}", all(&store));
}

/// Frames in a WAL file (a 32-byte header, then 24 bytes and a page a frame).
fn wal_frames(db: &std::path::Path) -> u64 {
    let page = u64::from(header_page_size(db));
    let wal = db.with_file_name(format!("{}-wal", db.file_name().unwrap().to_str().unwrap()));
    std::fs::metadata(wal).map_or(0, |m| m.len().saturating_sub(32) / (24 + page))
}

/// A value that fills most of a leaf page of a new store (4 KiB pages): one per page.
const BIG: usize = 3000;

/// Commits `n` transactions of four `BIG` values (one leaf page each), keys from `from`.
fn write_pages(store: &SqliteStore, from: u32, n: u32) {
    for i in from..from + n {
        store
            .transact(|tx| {
                for j in 0..4u8 {
                    tx.set(format!("big/{i:06}/{j}").as_bytes(), &[j; BIG])?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }
}

/// Reopens the store at `path` and checks every `step`th of the first `n` transactions of
/// [`write_pages`] is there, whole.
fn reopen_with_pages(path: &std::path::Path, n: usize, step: usize) -> SqliteStore {
    let store = SqliteStore::open(SqliteConfig::new(path)).unwrap();
    for i in (0..n).step_by(step) {
        for j in 0..4u8 {
            let key = format!("big/{i:06}/{j}");
            let value = store.transact(|tx| tx.get(key.as_bytes())).unwrap().value;
            assert_eq!(value, Some(vec![j; BIG]), "{key}");
        }
    }
    store
}

#[test]
fn a_helper_thread_copies_the_wal_into_the_database_file_and_commits_keep_the_wal_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();

    // Past the helper's step (450 frames), short of the checkpoint that completes the copy
    // (due from 1,000; this test never calls upkeep, so a commit runs it at 2,000).
    write_pages(&store, 0, 90);
    let frames = wal_frames(&path);
    assert!((450..1000).contains(&frames), "{frames} frames");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.checkpoints().helper == 0 {
        assert!(std::time::Instant::now() < deadline, "the helper never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(store.checkpoints().inline, 0);
    // The database file alone (no WAL beside it) now holds what was committed before the
    // helper's pass.
    let copy = dir.path().join("copy.db");
    std::fs::copy(&path, &copy).unwrap();
    let alone = rusqlite::Connection::open(&copy).unwrap();
    let rows: i64 = alone
        .query_row(
            "SELECT count(*) FROM kv WHERE key >= CAST('big/' AS BLOB) AND key < CAST('big0' AS BLOB)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // (Nothing would be there without the helper: SQLite's own policy first checkpoints at
    // 1,000 frames. A checkpoint copies whole transactions.)
    assert!(rows >= 4 * 40 && rows % 4 == 0, "{rows} rows in the database file");

    // A sustained load: ~4 times the inline threshold in frames. Inline checkpoints let the
    // WAL restart, so it never holds much more than the threshold.
    write_pages(&store, 90, 1200);
    let stats = store.checkpoints();
    assert!(stats.inline >= 1, "{stats:?}");
    let frames = wal_frames(&path);
    assert!(frames < 2500, "the WAL grew to {frames} frames");

    // Everything committed is there after reopening, page by page.
    drop(store);
    let store = reopen_with_pages(&path, 1290, 97);
    let options = arca_store::RangeOptions { limit: 0, reverse: false, snapshot: true };
    let mut keys = 0;
    for i in (0..1290).step_by(100) {
        let (b, e) = (format!("big/{i:06}/"), format!("big/{:06}/", i + 100));
        keys += store.transact(|tx| tx.get_range(b.as_bytes(), e.as_bytes(), options)).unwrap().value.len();
    }
    assert_eq!(keys, 4 * 1290);
}

#[test]
fn replace_rewrites_the_old_row_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    write_pages(&store, 0, 3);
    let rowid = |key: &str| -> Option<i64> {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.query_row("SELECT rowid FROM kv WHERE key = ?1", [key.as_bytes()], |r| r.get(0)).ok()
    };
    let old = rowid("big/000000/0").unwrap();
    store.transact(|tx| tx.replace(b"big/000000/0", b"big/000009/0", &[9; BIG])).unwrap();
    // The new key took the old one's row (and so its page); nothing was appended.
    assert_eq!(rowid("big/000000/0"), None);
    assert_eq!(rowid("big/000009/0"), Some(old));
    let max: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT max(rowid) FROM kv", [], |r| r.get(0))
        .unwrap();
    assert_eq!(max, rowid("big/000002/3").unwrap(), "no row past the last one written before");
    let value = store.transact(|tx| tx.get(b"big/000009/0")).unwrap().value;
    assert_eq!(value, Some(vec![9; BIG]));
}

#[test]
fn upkeep_after_each_commit_checkpoints_out_of_the_commits_and_keeps_the_wal_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();

    // Nothing is due before the WAL reaches 1,000 frames: upkeep does nothing.
    write_pages(&store, 0, 90);
    store.upkeep();
    assert_eq!(store.checkpoints().deferred, 0);

    // A sustained load with upkeep after every commit, as the node's committer runs it:
    // ~5 times the threshold in frames.
    for i in 90..1000 {
        write_pages(&store, i, 1);
        store.upkeep();
    }
    let stats = store.checkpoints();
    // The checkpoints that let the WAL restart ran in upkeep (a few may find the helper
    // mid-pass: busy, and due again after the next commit), never inside a commit.
    assert!(stats.deferred >= 2, "{stats:?}");
    assert_eq!(stats.inline, 0, "{stats:?}");
    // The WAL restarted each time: it never came near the inline threshold (2,000 frames).
    let frames = wal_frames(&path);
    assert!(frames < 1300, "the WAL grew to {frames} frames");

    drop(store);
    reopen_with_pages(&path, 1000, 37);
}
