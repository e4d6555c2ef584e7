//! The gRPC API, whole: fuzzed protobuf messages (and bytes that are none) framed for any
//! of the `Arca` service's methods, or for a method that does not exist, sent through the
//! listener's own stack in process — the refusals audit layer around tonic's server — to a
//! real node on SQLite, with the root token or none. Never a panic; every request commits
//! an audit event before its answer (a handler's, or the refusal layer's); no answer is
//! `INTERNAL`.
//!
//! The input: a method byte, a flags byte (root token; a wrong gRPC frame length; a wrap
//! TTL header, good or bad), then the message. `Seal` and `MigrateSeal` are fuzzed: the node
//! is rebuilt when an input sealed it, and it has no HSM to migrate to. So is
//! `KvRotationSet`: the fuzzed node has no rotators directory and no hook prefixes, so every
//! exec or HTTP rotator is refused, and no scheduler runs. Left out: `DbConfigWrite`, whose
//! connection `DbCreds` would then open to the host named in the input (its parsers are
//! fuzzed by `db_config`). Without it `DbRoleWrite`, `DbCreds` and the lease methods reach
//! nothing outside, and are fuzzed.
#![no_main]

use std::sync::OnceLock;

use arca_node::grpc::Service;
use http_body_util::BodyExt as _;
use libfuzzer_sys::fuzz_target;
use tower::{Layer as _, ServiceExt as _};

const METHODS: [&str; 63] = [
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
    // Reach no server and run no command here: no database connection can exist (its
    // setter is left out) and no rotator can be set, so these are refused or find nothing.
    "KvRotate",
    "DbRoleWrite",
    "DbCreds",
    "LeaseRenew",
    "LeaseRevoke",
    "LeaseLookup",
    // Not methods of the service: tonic answers UNIMPLEMENTED, the layer audits it.
    "NoSuchMethod",
    "../Replication/Pull",
    // Last, so that the committed seeds' method bytes keep naming their methods.
    "Seal",
    "MigrateSeal",
    "KvRotationSet",
    // No connection exists here (see above): read, listed and deleted as nothing found.
    "DbConfigRead",
    "DbConfigList",
    "DbConfigDelete",
    "DbRoleRead",
    "DbRoleList",
    "DbRoleDelete",
    "DbRotateRoot",
    "LeaseList",
];

#[path = "shared/grpc_wire.rs"]
mod grpc_wire;
#[path = "shared/live_node.rs"]
mod live_node;

type Stack = arca_node::grpc::AuditRefusals<arca_node::proto::arca_server::ArcaServer<Service>>;

static TARGET: OnceLock<live_node::Target<Stack>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let [method, flags, message @ ..] = data else { return };
    let name = METHODS[usize::from(*method) % METHODS.len()];
    // Framed as a client would, its length wrong on purpose with flag 2.
    let frame = grpc_wire::frame(message, flags & 2 != 0);
    let t = live_node::target(&TARGET);
    let mut live = t.live(|node, _| {
        let service = Service::new(node.clone(), Default::default());
        service.refusals_layer().layer(service.into_server())
    });
    let Some(l) = live.as_mut() else { return };
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
    let response = t.runtime.block_on(l.front.clone().oneshot(request)).expect("the stack is infallible");
    assert!(l.node.committer().stats().jobs > jobs, "no audit event for {name}");
    let (parts, body) = response.into_parts();
    let collected = t.runtime.block_on(body.collect()).expect("the answer's body");
    let code = grpc_wire::status(&parts.headers, collected.trailers());
    assert!(code.is_some(), "{name}: an answer without a gRPC status");
    assert_ne!(code, Some(tonic::Code::Internal as i32), "{name}: INTERNAL");
});
