//! A real node on SQLite for the API fuzz targets (`vault_http`, `grpc_api`): built once,
//! rebuilt every [`REBUILD_EVERY`] inputs or when a fuzzed request sealed it, so that one
//! input that revokes the root token or seals the node does not stop every later one.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arca_audit::Source;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_store::{SqliteConfig, SqliteStore};

/// Inputs between rebuilds of the node.
pub const REBUILD_EVERY: u32 = 512;

/// A node, its root token, and what the target serves it through (`front`).
pub struct Live<F> {
    _dir: tempfile::TempDir,
    pub node: Arc<Node>,
    pub front: F,
    #[allow(dead_code)] // not every target sends the root token
    pub root: String,
    served: u32,
}

pub struct Target<F> {
    pub runtime: tokio::runtime::Runtime,
    live: Mutex<Option<Live<F>>>,
}

impl<F> Target<F> {
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        Target { runtime, live: Mutex::new(None) }
    }

    /// The live node for the next input (built, or rebuilt, with `front` over it; `front`
    /// gets the root token too).
    pub fn live(&self, front: impl FnOnce(&Arc<Node>, &str) -> F) -> MutexGuard<'_, Option<Live<F>>> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let stale = live.as_ref().is_none_or(|l| l.served >= REBUILD_EVERY || l.node.barrier().is_sealed());
        if stale {
            *live = None;
            // On tmpfs when there is one: each request's commit is fsynced.
            let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
            let dir = tempfile::tempdir_in(base).expect("a temporary directory");
            let path = dir.path().join("arca.db");
            let store = Arc::new(SqliteStore::open(SqliteConfig::new(path)).expect("the store"));
            let identity =
                NodeIdentity { cluster: "fuzz".into(), region: "local".into(), node: "node-a".into() };
            let node = Node::new(store, identity);
            let ctx = RequestContext::new(None, Source { address: "127.0.0.1:1".into(), proxy: None });
            let init = self.runtime.block_on(node.operator_init(ctx, 1, 1)).result.expect("init");
            let root = init.root_token.token.to_string();
            let front = front(&node, &root);
            *live = Some(Live { _dir: dir, node, front, root, served: 0 });
        }
        if let Some(l) = live.as_mut() {
            l.served += 1;
        }
        live
    }
}

/// The process's one target (libFuzzer runs inputs one at a time).
pub fn target<F: Send + 'static>(cell: &'static OnceLock<Target<F>>) -> &'static Target<F> {
    cell.get_or_init(Target::new)
}
