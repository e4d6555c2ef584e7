//! Sequencer integration throughput: a queue of audit events (the size of real ones) turned
//! into tiles, bundle indexes and a signed checkpoint, on the embedded store.
//!
//! `cargo bench -p arca-benches --bench sequencer` — criterion reports entries/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arca_audit::Source;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_node::sequencer::{self, SequencerConfig};
use arca_store::{SqliteConfig, SqliteStore, Store};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const QUEUE: u64 = 50_000;

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
                arca_benches::fill_queue(store.as_ref(), next, QUEUE, false);
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
