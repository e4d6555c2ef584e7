//! The replication listener, whole: fuzzed protobuf messages (and bytes that are none)
//! framed for its three methods, or for one that does not exist, sent through the listener's
//! own stack in process — `AuditRefusalsLayer::replication` around tonic's
//! `ReplicationServer` — to a real node on SQLite, the primary of its region with one
//! standby configured (no replication loop runs: nothing leaves the process). Never a panic;
//! every answer has a gRPC status and none is `INTERNAL`; every refusal, and every pull that
//! ships change records, commits an audit event before its answer.
//!
//! The input: a method byte, a flags byte (a wrong gRPC frame length), then the message. A
//! pull that decodes is sent without its long poll (`wait_ms` 0), so an idle feed answers
//! at once. A hello may fence the node (a newer epoch); it is rebuilt every 512 inputs.
#![no_main]

use std::sync::OnceLock;

use arca_audit::Source;
use arca_node::config::{PeerSection, ReplicationSection};
use arca_node::grpc::{AuditRefusals, AuditRefusalsLayer};
use arca_node::kv::SecretData;
use arca_node::node::RequestContext;
use arca_node::proto::replication_server::ReplicationServer;
use arca_node::region::{Regions, ReplicationService};
use http_body_util::BodyExt as _;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tower::{Layer as _, ServiceExt as _};

const METHODS: [&str; 4] = ["Pull", "Snapshot", "Hello", "Nope"];

#[path = "shared/grpc_wire.rs"]
mod grpc_wire;
#[path = "shared/live_node.rs"]
mod live_node;

type Stack = AuditRefusals<ReplicationServer<ReplicationService>>;

static TARGET: OnceLock<live_node::Target<Stack>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let [method, flags, message @ ..] = data else { return };
    let name = METHODS[usize::from(*method) % METHODS.len()];
    let mut message = message.to_vec();
    if name == "Pull"
        && let Ok(mut pull) = arca_node::proto::PullRequest::decode(message.as_slice())
    {
        pull.wait_ms = 0;
        message = pull.encode_to_vec();
    }
    // Framed as a client would, its length wrong on purpose with flag 1.
    let frame = grpc_wire::frame(&message, flags & 1 != 0);
    let t = live_node::target(&TARGET);
    let mut live = t.live(|node, root| {
        let section = ReplicationSection {
            listen_addr: "127.0.0.1:1".parse().expect("an address"),
            tls_cert_file: None,
            tls_key_file: None,
            ca_file: None,
            dangerous_plaintext: true,
            initial_primary: "local".into(),
            peers: vec![PeerSection { region: "standby".into(), endpoint: "http://127.0.0.1:1".into() }],
        };
        let _entered = t.runtime.enter();
        let regions = Regions::from_config(&section, "local").expect("the regions");
        node.enable_regions(regions).expect("replication enabled");
        // Change records in the feed, for pulls to ship.
        for i in 0..3 {
            let token = Some(zeroize::Zeroizing::new(root.to_owned()));
            let ctx = RequestContext::new(token, Source { address: "127.0.0.1:1".into(), proxy: None });
            let data = SecretData::from_iter([("k", format!("v{i}"))]);
            let write = node.kv_write(ctx, "secret".into(), format!("fuzz/s{i}"), data, None);
            t.runtime.block_on(write).result.expect("a write");
        }
        AuditRefusalsLayer::replication(node.clone())
            .layer(ReplicationService::new(node.clone()).into_server())
    });
    let Some(l) = live.as_mut() else { return };
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://node/arca.v1.Replication/{name}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    let body = tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(frame)));
    let request = request.body(body).expect("a request");
    let jobs = l.node.committer().stats().jobs;
    let response = t.runtime.block_on(l.front.clone().oneshot(request)).expect("the stack is infallible");
    let audited = l.node.committer().stats().jobs > jobs;
    let (parts, body) = response.into_parts();
    let collected = t.runtime.block_on(body.collect()).expect("the answer's body");
    let code = grpc_wire::status(&parts.headers, collected.trailers());
    assert!(code.is_some(), "{name}: an answer without a gRPC status");
    assert_ne!(code, Some(tonic::Code::Internal as i32), "{name}: INTERNAL");
    if code != Some(0) {
        assert!(audited, "{name}: a refusal without an audit event");
    } else if name == "Pull" {
        let bytes = collected.to_bytes();
        let pulled = bytes.get(5..).and_then(|m| arca_node::proto::PullResponse::decode(m).ok());
        let pulled = pulled.expect("a pull's answer");
        assert!(pulled.changes.is_empty() || audited, "a pull shipped change records unaudited");
    }
});
