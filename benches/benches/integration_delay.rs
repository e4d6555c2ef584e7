//! Integration delay under load: concurrent audited writes through a node while its
//! sequencer runs as in production; prints the delay from event to signed checkpoint
//! (per checkpoint, its oldest entry) as p50/p99/max, and the request rate.
//!
//! `cargo bench -p arca-benches --bench integration_delay` (runs ~5 s).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arca_audit::Source;
use arca_node::kv::SecretData;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_node::sequencer::{self, SequencerConfig};
use arca_store::{SqliteConfig, SqliteStore, Store};
use zeroize::Zeroizing;

const CLIENTS: usize = 64;
const RUN: Duration = Duration::from_secs(5);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list themselves.
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("bench.db"))).expect("store"));
    let node =
        Node::new(store, NodeIdentity { cluster: "bench".into(), region: "local".into(), node: "n".into() });
    let ctx = |token: Option<&str>| {
        RequestContext::new(
            token.map(|t| Zeroizing::new(t.to_owned())),
            Source { address: "bench".into(), proxy: None },
        )
    };
    let root = rt.block_on(async {
        node.operator_init(ctx(None), 1, 1).await.result.expect("init").root_token.token.to_string()
    });
    sequencer::start(&node, SequencerConfig::default());
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (node, root, done) = (node.clone(), root.clone(), done.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while started.elapsed() < RUN {
                        let data = [("v", i.to_string())].into_iter().collect::<SecretData>();
                        let path = format!("load/{c}");
                        node.kv_write(ctx(Some(&root)), "secret".into(), path, data, None)
                            .await
                            .result
                            .expect("write");
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client");
        }
    });
    let requests = done.load(Ordering::Relaxed);
    // Let the sequencer catch up with the tail, then read the delays.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node
        .audit_checkpoint()
        .expect("checkpoint")
        .map_or(0, |c| c.lines().nth(1).and_then(|l| l.parse::<u64>().ok()).unwrap_or(0))
        < requests + 1
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let delays = node.metrics().recent_integration_delays_ms();
    let q = |p: f64| delays.get(((delays.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0);
    println!(
        "integration_delay: {requests} audited writes in {:.1} s ({:.0}/s, {CLIENTS} clients); {} checkpoints; delay event→signed checkpoint p50 {} ms, p99 {} ms, max {} ms",
        RUN.as_secs_f64(),
        requests as f64 / RUN.as_secs_f64(),
        delays.len(),
        q(0.5),
        q(0.99),
        delays.last().copied().unwrap_or(0)
    );
}
