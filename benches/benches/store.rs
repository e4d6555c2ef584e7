//! Store throughput on the embedded default (SQLite, WAL, synchronous=FULL):
//! commits with 1 and with 256 records per transaction (the group-commit case), and point
//! reads, one per transaction as on the request path.
//!
//! `cargo bench -p arca-benches --bench store`; criterion prints elements/s per case.

use std::hint::black_box;

use arca_store::tuple;
use arca_store::{SqliteConfig, SqliteStore, StoreError, StoreExt};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// A record the size of an encoded audit event.
const RECORD_BYTES: usize = 300;
const READ_KEYS: u64 = 10_000;

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(SqliteConfig::new(dir.path().join("bench.db"))).expect("open bench store")
}

fn commits(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let record = vec![0xA5u8; RECORD_BYTES];
    let queue = tuple::pack(&["audit".into(), "bench".into()]);
    let mut group = c.benchmark_group("sqlite_commit");
    for records in [1u64, 256] {
        group.throughput(Throughput::Elements(records));
        group.bench_function(format!("{records}_records_per_txn"), |b| {
            b.iter(|| {
                store
                    .transact(|tx| {
                        for _ in 0..records {
                            tx.set_versionstamped_key(&queue, b"", &record)?;
                        }
                        Ok::<_, StoreError>(())
                    })
                    .expect("commit")
            })
        });
    }
    group.finish();
}

fn point_reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir);
    let key = |i: u64| tuple::pack(&["kv".into(), "bench".into(), i.into()]);
    // In chunks: the whole set would break the 10 MB transaction limit.
    for chunk in (0..READ_KEYS).collect::<Vec<_>>().chunks(1000) {
        store
            .transact(|tx| {
                for &i in chunk {
                    tx.set(&key(i), &[0x5Au8; 1024])?;
                }
                Ok::<_, StoreError>(())
            })
            .expect("populate");
    }
    let mut group = c.benchmark_group("sqlite_read");
    group.throughput(Throughput::Elements(1));
    let mut next = 0u64;
    group.bench_function("point_read_per_txn", |b| {
        b.iter_batched(
            || {
                // A cheap scramble so reads do not walk the keys in order.
                next = next.wrapping_add(7919) % READ_KEYS;
                key(next)
            },
            |k| black_box(store.transact(|tx| tx.get(&k)).expect("read").value),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, commits, point_reads);
criterion_main!(benches);
