//! Sequencer integration throughput: a queue of audit events (the size of real ones) turned
//! into tiles, bundle indexes and a signed checkpoint, on the embedded store.
//!
//! `cargo bench -p arca-benches --bench sequencer` — criterion reports entries/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arca_audit::{Actor, Event, Operation, Outcome, Source};
use arca_node::keys;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_node::sequencer::{self, SequencerConfig};
use arca_store::{SqliteConfig, SqliteStore, Store, StoreError, StoreExt};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const QUEUE: u64 = 50_000;

fn event(i: u64) -> Vec<u8> {
    Event {
        time_unix_ms: 1_764_000_000_000 + i,
        // Time-ordered like the node's request ids.
        request_id: format!("{:012x}{i:020x}", 1_764_000_000_000u64 + i / 100),
        cluster: "bench".into(),
        region: "local".into(),
        node: "node-a".into(),
        actor: Actor {
            entity: "approle:payments".into(),
            token_accessor: Some("9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d".into()),
        },
        source: Source { address: "10.1.2.3:51234".into(), proxy: None },
        operation: Operation::KvRead,
        path: format!("secret/data/payments/{}", i % 1000),
        secret_version: Some(7),
        outcome: Outcome::Ok,
    }
    .encode()
}

fn fill(store: &dyn Store, from: u64, count: u64) {
    let prefix = keys::audit_events("local");
    let mut i = from;
    while i < from + count {
        let end = (i + 1024).min(from + count);
        store
            .transact(|tx| {
                for j in i..end {
                    tx.set_versionstamped_key(&prefix, b"", &event(j))?;
                }
                Ok::<_, StoreError>(())
            })
            .expect("fill the queue");
        i = end;
    }
}

fn integration(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("bench.db"))).expect("store"));
    let node = Node::new(
        store.clone(),
        NodeIdentity { cluster: "bench".into(), region: "local".into(), node: "n".into() },
    );
    rt.block_on(async {
        let ctx = RequestContext::new(None, Source { address: "bench".into(), proxy: None });
        node.operator_init(ctx, 1, 1).await.result.expect("init");
    });
    let config = SequencerConfig { max_batch: 16_384, ..SequencerConfig::default() };
    let mut next = 0;
    let mut group = c.benchmark_group("sequencer");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(QUEUE));
    group.bench_function("integrate_50k_entries", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fill(store.as_ref(), next, QUEUE);
                next += QUEUE;
                let started = Instant::now();
                while sequencer::integrate(&node, "bench", &config).expect("integrate").is_some() {}
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, integration);
criterion_main!(benches);
