//! The node's HTTP listener: the Vault-compatible API (`/v1/…`, see [`crate::vault`]),
//! Prometheus `/metrics`, and the audit log published in the C2SP
//! tlog-tiles layout under `/audit/<region>/` (`checkpoint`, `tile/<L>/<N>[.p/<W>]`,
//! `tile/entries/<N>[.p/<W>]`), with its verifier key and proofs:
//!
//! - `GET /audit/<region>/vkey` — the log's verifier key (fetch it once, then pin it);
//! - `GET /audit/<region>/proof/inclusion?request_id=…|index=…|position=<hex>` — JSON
//!   `{index, size, hashes: [base64], checkpoint, entry: base64}`;
//! - `GET /audit/<region>/proof/consistency?old=N[&new=M]` — JSON `{old, new, hashes}`.
//!
//! The log is public data: these reads are neither authenticated nor audited (auditing
//! them would feed the log from its own readers). They never touch secrets.

use std::collections::HashMap;
use std::sync::Arc;

use arca_audit::tiles::{self, TilePath};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use crate::error::ApiError;
use crate::node::Node;
use crate::sequencer::LeafRef;

/// The HTTP routes of a node: the Vault-compatible API under `/v1/`, metrics, the audit log;
/// any other path is refused with a 404 and audited ([`crate::vault::unknown_path`]).
pub fn router(node: Arc<Node>, proxy: crate::grpc::ProxyConfig, limits: &crate::listen::Limits) -> Router {
    let state = crate::vault::HttpState {
        node: node.clone(),
        proxy: Arc::new(proxy),
        body_timeout: limits.body_timeout,
        stats: node.metrics().listener("http"),
    };
    let vault = Router::new()
        .route("/v1/{*path}", axum::routing::any(crate::vault::handle))
        .fallback(crate::vault::unknown_path)
        .with_state(state);
    Router::new()
        .route("/metrics", get(metrics))
        .route("/audit/{region}/checkpoint", get(checkpoint))
        .route("/audit/{region}/vkey", get(vkey))
        .route("/audit/{region}/tile/{*rest}", get(tile))
        .route("/audit/{region}/proof/inclusion", get(inclusion))
        .route("/audit/{region}/proof/consistency", get(consistency))
        .with_state(node)
        .merge(vault)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

fn error(err: ApiError) -> Response {
    let status = match &err {
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(status, format!("{err}\n"))
}

/// `Some(404)` when `region` is not this node's.
fn wrong_region(node: &Node, region: &str) -> Option<Response> {
    (region != node.identity().region).then(|| text(StatusCode::NOT_FOUND, "no such region on this node\n"))
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let mut body = node.metrics().render(node.barrier().is_sealed(), &node.committer().stats());
    if node.regions().is_some() {
        let n = node.clone();
        if let Ok(Some(state)) = blocking(move || n.region_state()).await {
            body.push_str(&crate::region::render_metrics(&node, &state));
        }
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Runs blocking store reads off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| ApiError::Internal)?
}

async fn checkpoint(State(node): State<Arc<Node>>, Path(region): Path<String>) -> Response {
    if let Some(r) = wrong_region(&node, &region) {
        return r;
    }
    match blocking(move || node.audit_checkpoint()).await {
        Ok(Some(cp)) => text(StatusCode::OK, cp),
        Ok(None) => text(StatusCode::NOT_FOUND, "the log has no checkpoint yet\n"),
        Err(err) => error(err),
    }
}

async fn vkey(State(node): State<Arc<Node>>, Path(region): Path<String>) -> Response {
    if let Some(r) = wrong_region(&node, &region) {
        return r;
    }
    match blocking(move || node.audit_vkey()).await {
        Ok(Some(vkey)) => text(StatusCode::OK, format!("{vkey}\n")),
        Ok(None) => text(StatusCode::NOT_FOUND, "the log has no key yet\n"),
        Err(err) => error(err),
    }
}

async fn tile(State(node): State<Arc<Node>>, Path((region, rest)): Path<(String, String)>) -> Response {
    if let Some(r) = wrong_region(&node, &region) {
        return r;
    }
    let Ok(path) = tiles::parse_path(&format!("tile/{rest}")) else {
        return text(StatusCode::NOT_FOUND, "not a tile path\n");
    };
    let found = blocking(move || match path {
        TilePath::Hashes { level, index, width } => node.audit_tile(level, index, width),
        TilePath::Entries { index, width } => node.audit_entries(index, width),
    })
    .await;
    match found {
        Ok(Some(bytes)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(None) => text(StatusCode::NOT_FOUND, "no such tile (yet)\n"),
        Err(err) => error(err),
    }
}

async fn inclusion(
    State(node): State<Arc<Node>>,
    Path(region): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = wrong_region(&node, &region) {
        return r;
    }
    let leaf = if let Some(id) = q.get("request_id") {
        LeafRef::RequestId(id.clone())
    } else if let Some(index) = q.get("index") {
        match index.parse() {
            Ok(i) => LeafRef::Index(i),
            Err(_) => return text(StatusCode::BAD_REQUEST, "index must be a number\n"),
        }
    } else if let Some(position) = q.get("position") {
        match hex::decode(position).ok().and_then(|b| <[u8; 12]>::try_from(b).ok()) {
            Some(bytes) => LeafRef::Position(arca_store::Versionstamp::from_bytes(bytes)),
            None => return text(StatusCode::BAD_REQUEST, "position must be 24 hex digits\n"),
        }
    } else {
        return text(StatusCode::BAD_REQUEST, "give request_id, index or position\n");
    };
    match blocking(move || node.audit_inclusion_proof(leaf)).await {
        Ok(p) => axum::Json(json!({
            "index": p.index,
            "size": p.size,
            "hashes": p.hashes.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
            "checkpoint": p.checkpoint,
            "entry": B64.encode(&p.entry),
        }))
        .into_response(),
        Err(err) => error(err),
    }
}

async fn consistency(
    State(node): State<Arc<Node>>,
    Path(region): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = wrong_region(&node, &region) {
        return r;
    }
    let Some(Ok(old)) = q.get("old").map(|o| o.parse::<u64>()) else {
        return text(StatusCode::BAD_REQUEST, "old must be a number\n");
    };
    let new = match q.get("new").map(|n| n.parse::<u64>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "new must be a number\n"),
    };
    match blocking(move || node.audit_consistency_proof(old, new)).await {
        Ok(p) => axum::Json(json!({
            "old": p.old_size,
            "new": p.new_size,
            "hashes": p.hashes.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(err) => error(err),
    }
}
