//! The gRPC API, whole: fuzzed protobuf messages (and bytes that are none) framed for any
//! of the `Arca` service's methods, or for a method that does not exist, sent through the
//! listener's own stack in process — the refusals audit layer around tonic's server — to a
//! real node on SQLite, with the root token or none. Never a panic; every request commits
//! an audit event before its answer (a handler's, or the refusal layer's); no answer is
//! `INTERNAL`.
//!
//! The input: a method byte, a flags byte (root token; a wrong gRPC frame length; a wrap
//! TTL header, good or bad), then the message. Left out: `Seal` and `MigrateSeal` (they would stop every later input; the node
//! is rebuilt if it is sealed anyway), the rotation methods (an exec rotator runs the
//! command it is given) and the database and lease methods (they reach out to a PostgreSQL
//! server named in the input).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use arca_audit::Source;
use arca_node::grpc::Service;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_store::{SqliteConfig, SqliteStore};
use http_body_util::BodyExt as _;
use libfuzzer_sys::fuzz_target;
use tower::{Layer as _, ServiceExt as _};

const METHODS: [&str; 46] = [
    "Init",
    "Unseal",
    "Status",
    "Rotate",
    "KvPut",
    "KvGet",
    "KvPatch",
    "KvList",
    "KvDelete",
    "KvUndelete",
    "KvDestroy",
    "KvReadMetadata",
    "KvWriteMetadata",
    "KvDeleteMetadata",
    "KvRotationClear",
    "KvRevoke",
    "TokenCreate",
    "TokenLookup",
    "TokenRenew",
    "TokenRevoke",
    "TokenCapabilities",
    "AppRoleWrite",
    "AppRoleRead",
    "AppRoleDelete",
    "AppRoleList",
    "AppRoleRoleId",
    "AppRoleSecretId",
    "AppRoleLogin",
    "CertRoleWrite",
    "CertRoleRead",
    "CertRoleDelete",
    "CertLogin",
    "PolicyWrite",
    "PolicyRead",
    "PolicyList",
    "PolicyDelete",
    "AccessRequest",
    "AccessApprove",
    "AccessList",
    "RegionStatus",
    "RegionDivergence",
    "RegionDivergentSecrets",
    "Unwrap",
    "WrapLookup",
    // Not methods of the service: tonic answers UNIMPLEMENTED, the layer audits it.
    "NoSuchMethod",
    "../Replication/Pull",
];

/// Inputs between rebuilds of the node (a fuzzed request may revoke the root token).
const REBUILD_EVERY: u32 = 512;

type Stack = arca_node::grpc::AuditRefusals<arca_node::proto::arca_server::ArcaServer<Service>>;

struct Live {
    _dir: tempfile::TempDir,
    node: Arc<Node>,
    stack: Stack,
    root: String,
    served: u32,
}

fn build(runtime: &tokio::runtime::Runtime) -> Live {
    // On tmpfs when there is one: each request's commit is fsynced.
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    let dir = tempfile::tempdir_in(base).expect("a temporary directory");
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("arca.db"))).expect("the store"));
    let identity = NodeIdentity { cluster: "fuzz".into(), region: "local".into(), node: "node-a".into() };
    let node = Node::new(store, identity);
    let ctx = RequestContext::new(None, Source { address: "127.0.0.1:1".into(), proxy: None });
    let init = runtime.block_on(node.operator_init(ctx, 1, 1)).result.expect("init");
    let root = init.root_token.token.to_string();
    let service = Service::new(node.clone(), Default::default());
    let stack = service.refusals_layer().layer(service.into_server());
    Live { _dir: dir, node, stack, root, served: 0 }
}

struct Target {
    runtime: tokio::runtime::Runtime,
    live: Mutex<Option<Live>>,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        Target { runtime, live: Mutex::new(None) }
    })
}

/// The answer's gRPC status code: in the headers (an answer with no message) or the trailers.
fn grpc_status(headers: &http::HeaderMap, trailers: Option<&http::HeaderMap>) -> Option<i32> {
    let code = |map: &http::HeaderMap| map.get("grpc-status")?.to_str().ok()?.parse().ok();
    code(headers).or_else(|| trailers.and_then(code))
}

fuzz_target!(|data: &[u8]| {
    let [method, flags, message @ ..] = data else { return };
    let name = METHODS[usize::from(*method) % METHODS.len()];
    // A gRPC frame: uncompressed, its length (wrong on purpose with flag 2), the message.
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX).wrapping_add(u32::from(flags & 2 != 0));
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    let t = target();
    let mut live = t.live.lock().unwrap_or_else(|p| p.into_inner());
    let stale = live.as_ref().is_none_or(|l| l.served >= REBUILD_EVERY || l.node.barrier().is_sealed());
    if stale {
        *live = None;
        *live = Some(build(&t.runtime));
    }
    let Some(l) = live.as_mut() else { return };
    l.served += 1;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://node/arca.v1.Arca/{name}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if flags & 1 != 0 {
        request = request.header("authorization", format!("Bearer {}", l.root));
    }
    if flags & 4 != 0 {
        request = request.header("x-arca-wrap-ttl", if flags & 8 != 0 { "soon" } else { "60s" });
    }
    let body = tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(frame)));
    let request = request.body(body).expect("a request");
    let jobs = l.node.committer().stats().jobs;
    let response = t.runtime.block_on(l.stack.clone().oneshot(request)).expect("the stack is infallible");
    assert!(l.node.committer().stats().jobs > jobs, "no audit event for {name}");
    let (parts, body) = response.into_parts();
    let collected = t.runtime.block_on(body.collect()).expect("the answer's body");
    let code = grpc_status(&parts.headers, collected.trailers());
    assert!(code.is_some(), "{name}: an answer without a gRPC status");
    assert_ne!(code, Some(tonic::Code::Internal as i32), "{name}: INTERNAL");
});
