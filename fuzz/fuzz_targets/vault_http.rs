//! The Vault-compatible HTTP API, whole: fuzzed methods, paths, queries, wrap headers and
//! JSON bodies sent through the node's own router (no socket) to a real node on SQLite,
//! with the root token or none. Never a panic; every request under `/v1/` (and every
//! unknown path) has its audit event committed before its reply; no reply is a 500; every
//! JSON reply parses.
//!
//! The input: a method byte, a flags byte (root token, wrap header, route table), a route
//! byte, then the path (or a suffix to the route), the query, the wrap TTL and the body,
//! separated by zero bytes. Every route is fuzzed, `sys/seal` too: the node is rebuilt when
//! an input sealed it, but one: a write to `database/config/…` is skipped (a connection the
//! node took would send `database/creds/…` to the host the input names; the connection's
//! checks are fuzzed by `db_config`), so `database/creds/…` and the lease routes reach
//! nothing outside.
#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt as _;

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "LIST", "PATCH", "HEAD"];

/// Route prefixes the input's path is appended to (flag 4), so every handler's body parsing
/// is reached without the fuzzer having to spell its path first.
const ROUTES: [&str; 37] = [
    "/v1/secret/data/",
    "/v1/secret/metadata/",
    "/v1/secret/subkeys/",
    "/v1/secret/delete/",
    "/v1/secret/undelete/",
    "/v1/secret/destroy/",
    "/v1/secret/config",
    "/v1/team/kv/data/",
    "/v1/sys/mounts/",
    "/v1/sys/internal/ui/mounts/",
    "/v1/auth/token/create",
    "/v1/auth/token/create-orphan",
    "/v1/auth/token/lookup",
    "/v1/auth/token/lookup-self",
    "/v1/auth/token/lookup-accessor",
    "/v1/auth/token/renew-self",
    "/v1/auth/token/revoke-accessor",
    "/v1/sys/capabilities-self",
    "/v1/sys/capabilities",
    "/v1/sys/capabilities-accessor",
    "/v1/sys/leases/lookup",
    "/v1/sys/leases/renew",
    "/v1/sys/leases/revoke",
    "/v1/database/creds/",
    "/v1/auth/approle/role/",
    "/v1/auth/approle/login",
    "/v1/sys/policies/acl/",
    "/v1/sys/policy/",
    "/v1/sys/wrapping/unwrap",
    "/v1/sys/wrapping/lookup",
    "/v1/sys/wrapping/wrap",
    "/v1/sys/unseal",
    "/v1/sys/auth/",
    "/v1/sys/health",
    "/audit/local/",
    "/",
    // Last, so that the committed seeds' route bytes keep naming their routes.
    "/v1/sys/seal",
];

#[path = "shared/live_node.rs"]
mod live_node;

static TARGET: OnceLock<live_node::Target<axum::Router>> = OnceLock::new();

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fuzz_target!(|data: &[u8]| {
    let [method, flags, route, rest @ ..] = data else { return };
    let mut parts = rest.split(|&b| b == 0);
    let (path, query, wrap, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let mut uri = if flags & 4 != 0 {
        format!("{}{}", ROUTES[usize::from(*route) % ROUTES.len()], text(path))
    } else {
        format!("/{}", text(path))
    };
    if !query.is_empty() {
        uri = format!("{uri}?{}", text(query));
    }
    let method =
        Method::from_bytes(METHODS[usize::from(*method) % METHODS.len()].as_bytes()).expect("a method");
    // No database connection may be written (see above); the router matches path segments
    // as written, never decoded, so a route to it holds this text.
    if matches!(method, Method::POST | Method::PUT) && uri.contains("database/config") {
        return;
    }
    let t = live_node::target(&TARGET);
    let mut live =
        t.live(|node, _| arca_node::http::router(node.clone(), Default::default(), &Default::default()));
    let Some(l) = live.as_mut() else { return };
    let mut request = Request::builder().method(method).uri(uri.as_str());
    if flags & 1 != 0 {
        request = request.header("x-vault-token", l.root.as_str());
    }
    if flags & 2 != 0 {
        let Ok(value) = header::HeaderValue::from_bytes(wrap) else { return };
        request = request.header("x-vault-wrap-ttl", value);
    }
    // A URI the HTTP layer itself refuses never reaches the node.
    let Ok(request) = request.body(Body::from(body.to_vec())) else { return };
    let audited = request.uri().path().starts_with("/v1/")
        || !(request.uri().path().starts_with("/audit/") || request.uri().path() == "/metrics");
    let jobs = l.node.committer().stats().jobs;
    let response = t.runtime.block_on(l.front.clone().oneshot(request)).expect("the router is infallible");
    let status = response.status();
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{uri}");
    if audited {
        assert!(l.node.committer().stats().jobs > jobs, "no audit event for {uri}");
    }
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let bytes =
        t.runtime.block_on(axum::body::to_bytes(response.into_body(), 16 << 20)).expect("the reply's body");
    if json && !bytes.is_empty() {
        serde_json::from_slice::<serde_json::Value>(&bytes).expect("a JSON reply parses");
    }
});
