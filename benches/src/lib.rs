//! Shared fixtures for the benchmarks in `benches/` and the `arca-bench` load generator.

pub mod http1;

use arca_audit::{Actor, Event, Operation, Outcome, Source};

/// A realistic audit event (a read by an AppRole identity), the `i`-th of a run: its time and
/// request id advance with `i` (time-ordered, like the node's request ids).
pub fn sample_event(i: u64) -> Event {
    Event {
        time_unix_ms: 1_764_000_000_000 + i,
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
}

/// Appends `count` events (`sample_event(from..)`) to region `local`'s audit queue, as the
/// request path does, 1,024 per transaction; `now` stamps them with the current time.
pub fn fill_queue(store: &dyn arca_store::Store, from: u64, count: u64, now: bool) {
    use arca_store::StoreExt;
    let prefix = arca_node::keys::audit_events("local");
    let mut i = from;
    while i < from + count {
        let end = (i + 1024).min(from + count);
        store
            .transact(|tx| {
                for j in i..end {
                    let mut event = sample_event(j);
                    if now {
                        event.time_unix_ms = arca_node::node::now_unix_ms();
                    }
                    tx.set_versionstamped_key(&prefix, b"", &event.encode())?;
                }
                Ok::<_, arca_store::StoreError>(())
            })
            .expect("fill the queue");
        i = end;
    }
}

/// A request context from a loopback client, with `token`.
pub fn context(token: Option<&str>) -> arca_node::node::RequestContext {
    arca_node::node::RequestContext::new(
        token.map(|t| zeroize::Zeroizing::new(t.to_owned())),
        Source { address: "127.0.0.1:1".into(), proxy: None },
    )
}

/// A node on a fresh SQLite store in `dir`, initialised and unsealed, holding a 1 KiB secret
/// at `secret/bench/db`; returns it with its store and root token.
pub fn bench_node(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> BenchNode {
    use arca_node::node::{Node, NodeIdentity};
    let store: std::sync::Arc<dyn arca_store::Store> = std::sync::Arc::new(
        arca_store::SqliteStore::open(arca_store::SqliteConfig::new(dir.join("bench.db"))).expect("store"),
    );
    let node = Node::new(
        store.clone(),
        NodeIdentity { cluster: "bench".into(), region: "local".into(), node: "n".into() },
    );
    let root = rt.block_on(async {
        let init = node.operator_init(context(None), 1, 1).await.result.expect("init");
        let root = init.root_token.token.to_string();
        let data = [("password", "x".repeat(1024))].into_iter().collect::<arca_node::kv::SecretData>();
        node.kv_write(context(Some(&root)), "secret".into(), "bench/db".into(), data, None)
            .await
            .result
            .expect("write");
        root
    });
    BenchNode { node, store, root }
}

/// What [`bench_node`] sets up.
#[derive(Debug)]
pub struct BenchNode {
    pub node: std::sync::Arc<arca_node::node::Node>,
    pub store: std::sync::Arc<dyn arca_store::Store>,
    pub root: String,
}
