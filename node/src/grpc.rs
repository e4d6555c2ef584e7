//! The gRPC API (tonic): maps each RPC onto a [`Node`] operation.
//!
//! Every response carries the request's audit position in `x-arca-audit-position`. The token
//! comes from `authorization: Bearer …` or `x-arca-token`. The client address is the peer
//! address, or — only when the peer is a configured trusted proxy — the first address in the
//! configured proxy header, with the proxy's own address recorded beside it.
//!
//! Requests that tonic refuses before they reach a handler (undecodable protobuf, a message
//! over [`MAX_REQUEST_BYTES`], an unknown method or service, a body that does not arrive within
//! the body timeout: `DEADLINE_EXCEEDED`) are audited too: [`AuditRefusals`] answers
//! them only once their `rejected` event is durable, as the HTTP API does its refusals.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arca_audit::Source;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tonic::codegen::http::{self, HeaderValue};
use tonic::codegen::{BoxFuture, Service as TowerService};
use tonic::metadata::MetadataValue;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status};
use zeroize::{Zeroize as _, Zeroizing};

use crate::auth::{CreateTokenRequest, NewToken, TokenRecord, WriteCertRoleRequest, WriteRoleRequest};
use crate::error::ApiError;
use crate::kv::{self, Metadata, MetadataUpdate, SecretData};
use crate::node::{Audited, Node, RequestContext};
use crate::proto;
use crate::proto::arca_server::{Arca, ArcaServer};
use crate::wrapping::wrap_ttl;

/// Largest request message accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
pub use arca_client::{
    AUDIT_POSITION_HEADER, PRIMARY_REGION_HEADER, REQUEST_ID_HEADER, WRAP_ACCESSOR_HEADER,
    WRAP_CREATION_PATH_HEADER, WRAP_TOKEN_HEADER, WRAP_TTL_HEADER, WRAP_TTL_SECS_HEADER,
};

/// Which proxies may name the client address, and in which header.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    pub header: Option<String>,
    pub trusted: Vec<IpAddr>,
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    node: Arc<Node>,
    proxy: Arc<ProxyConfig>,
}

impl Service {
    /// Refuses a write whose data did not come off the wire (`data_from_wire`), audited.
    async fn refuse_data(
        &self,
        ctx: RequestContext,
        mount_name: String,
        path: &str,
        err: String,
    ) -> Reply<proto::KvWriteResponse> {
        let refused = self.node.reject(ctx, format!("{}/data/{path}", mount(mount_name)), move || {
            ApiError::invalid(err.clone())
        });
        respond(refused.await, |()| proto::KvWriteResponse::default())
    }

    pub fn new(node: Arc<Node>, proxy: ProxyConfig) -> Self {
        Service { node, proxy: Arc::new(proxy) }
    }

    /// The tonic server for this service, with the request size limit applied. Serve it under
    /// [`AuditRefusalsLayer`], so that tonic's own refusals are audited.
    pub fn into_server(self) -> ArcaServer<Self> {
        ArcaServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The layer that audits what tonic refuses before this service's handlers run.
    pub fn refusals_layer(&self) -> AuditRefusalsLayer {
        AuditRefusalsLayer {
            node: self.node.clone(),
            proxy: self.proxy.clone(),
            listener: Listener::Client,
            body: BodyLimits::of(&self.node, Listener::Client),
        }
    }

    /// The request's context. Every handler starts here, and then audits its request through a
    /// [`Node`] operation.
    fn context<T>(&self, request: &Request<T>) -> RequestContext {
        handler_context(&self.proxy, request)
    }
}

/// A request's context, for a handler under [`AuditRefusals`]: this is where a request is
/// marked as having reached a handler, so that [`AuditRefusals`] does not audit it a second
/// time. The handler then audits it through a [`Node`] operation.
pub(crate) fn handler_context<T>(proxy: &ProxyConfig, request: &Request<T>) -> RequestContext {
    if let Some(reached) = request.extensions().get::<Reached>() {
        reached.0.store(true, Ordering::Release);
    }
    let meta = request.metadata();
    let header = |name: &str| meta.get(name).and_then(|v| v.to_str().ok());
    // A certificate here was verified against the listener's client CA by the handshake.
    let mtls = request.peer_certs().is_some_and(|certs| !certs.is_empty());
    request_context(proxy, request.remote_addr(), mtls, header)
}

/// A request's context from its headers (`header` looks one up by its lowercase name).
fn request_context<'a>(
    proxy: &ProxyConfig,
    peer: Option<SocketAddr>,
    mtls: bool,
    header: impl Fn(&str) -> Option<&'a str>,
) -> RequestContext {
    let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::trim));
    let token = bearer.or_else(|| header("x-arca-token").map(str::trim));
    let token = token.filter(|t| !t.is_empty()).map(|t| Zeroizing::new(t.to_owned()));
    let forwarded = proxy.header.as_deref().and_then(&header);
    let mut ctx = RequestContext::new(token, client_source(proxy, peer, forwarded));
    ctx.mtls = mtls;
    ctx
}

/// The audit position (hex) and the request id of a request, as headers of its answer: the
/// gRPC refusals here and every answer of the HTTP API.
pub(crate) fn audit_headers(headers: &mut http::HeaderMap, position: Option<&str>, request_id: &str) {
    if let Some(value) = position.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert(AUDIT_POSITION_HEADER, value);
    }
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
}

/// Set once a request reaches one of [`Service`]'s handlers (see [`Service::context`]).
#[derive(Debug, Clone, Default)]
struct Reached(Arc<AtomicBool>);

/// The gRPC listener's requests as served: tonic's router (and [`ArcaServer`] in it) under an
/// audit event for each request that tonic answers without calling a handler — a message
/// that is not the method's protobuf, one over [`MAX_REQUEST_BYTES`], an unknown method or
/// service, a body that does not arrive within the body timeout or does not fit in the
/// listener's budget of request-body bytes ([`crate::listen::BoundedBody`]). Such a request gets a `rejected` event (its path the gRPC method, its outcome
/// `invalid_argument`, its caller named when the token is valid) that is durable before
/// tonic's answer goes out, with the audit position and request id in its headers. If the
/// event cannot be recorded the answer is `UNAVAILABLE` instead. On the replication
/// listener the event's caller is the connection's certificate
/// ([`crate::region::certificate_actor`]): no token is sent there.
#[derive(Debug, Clone)]
pub struct AuditRefusals<S> {
    inner: S,
    node: Arc<Node>,
    proxy: Arc<ProxyConfig>,
    listener: Listener,
    body: BodyLimits,
}

/// How long a request's body may take to arrive, and the listener's counters and budget of
/// request-body bytes ([`crate::listen::BoundedBody`]).
#[derive(Debug, Clone)]
struct BodyLimits {
    timeout: std::time::Duration,
    stats: Arc<crate::listen::ListenerStats>,
}

impl BodyLimits {
    fn of(node: &Node, listener: Listener) -> Self {
        let name = match listener {
            Listener::Client => "grpc",
            Listener::Replication => "replication",
        };
        BodyLimits {
            timeout: crate::listen::Limits::default().body_timeout,
            stats: node.metrics().listener(name),
        }
    }
}

/// Which listener an [`AuditRefusals`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// The client API's: answers may be wrapped (`x-arca-wrap-ttl`); callers send tokens.
    Client,
    /// The replication listener's: no wrapping; callers are named by their certificate.
    Replication,
}

/// Puts [`AuditRefusals`] around the listener's router (`Server::builder().layer(…)`).
#[derive(Debug, Clone)]
pub struct AuditRefusalsLayer {
    node: Arc<Node>,
    proxy: Arc<ProxyConfig>,
    listener: Listener,
    body: BodyLimits,
}

impl AuditRefusalsLayer {
    /// The layer for the replication listener: no proxy, no response wrapping.
    pub fn replication(node: Arc<Node>) -> Self {
        AuditRefusalsLayer {
            body: BodyLimits::of(&node, Listener::Replication),
            node,
            proxy: Arc::new(ProxyConfig::default()),
            listener: Listener::Replication,
        }
    }

    /// A request's body must arrive within `timeout` of its head (default: the listeners'
    /// default body timeout); one that does not is refused with `DEADLINE_EXCEEDED`, audited,
    /// and counted in `stats`.
    pub fn body_timeout(
        self,
        timeout: std::time::Duration,
        stats: Arc<crate::listen::ListenerStats>,
    ) -> Self {
        AuditRefusalsLayer { body: BodyLimits { timeout, stats }, ..self }
    }
}

impl<S> tower_layer::Layer<S> for AuditRefusalsLayer {
    type Service = AuditRefusals<S>;

    fn layer(&self, inner: S) -> AuditRefusals<S> {
        AuditRefusals {
            inner,
            node: self.node.clone(),
            proxy: self.proxy.clone(),
            listener: self.listener,
            body: self.body.clone(),
        }
    }
}

/// What the audit of a refused request needs, taken before the request goes to tonic: cheap
/// clones (reference-counted header values), turned into a context only if it is refused.
struct Refusal {
    uri: http::Uri,
    peer: Option<SocketAddr>,
    mtls: bool,
    authorization: Option<HeaderValue>,
    token: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
    /// The connection's certificates, on the replication listener (the caller's name).
    certificates: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
}

impl Refusal {
    fn of<B>(request: &http::Request<B>, proxy: &ProxyConfig, listener: Listener) -> Refusal {
        let (extensions, headers) = (request.extensions(), request.headers());
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| tls.and_then(|t| t.get_ref().remote_addr()));
        Refusal {
            uri: request.uri().clone(),
            peer,
            mtls: tls.and_then(TlsConnectInfo::peer_certs).is_some_and(|certs| !certs.is_empty()),
            authorization: headers.get("authorization").cloned(),
            token: headers.get("x-arca-token").cloned(),
            forwarded: proxy.header.as_deref().and_then(|h| headers.get(h)).cloned(),
            certificates: match listener {
                Listener::Replication => tls.and_then(TlsConnectInfo::peer_certs),
                Listener::Client => None,
            },
        }
    }

    fn context(&self, proxy: &ProxyConfig) -> RequestContext {
        request_context(proxy, self.peer, self.mtls, |name| {
            let value = match name {
                "authorization" => self.authorization.as_ref(),
                "x-arca-token" => self.token.as_ref(),
                _ if proxy.header.as_deref() == Some(name) => self.forwarded.as_ref(),
                _ => None,
            };
            value.and_then(|v| v.to_str().ok())
        })
    }
}

impl<S> TowerService<http::Request<tonic::body::Body>> for AuditRefusals<S>
where
    S: TowerService<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let BodyLimits { timeout, stats } = self.body.clone();
        // The head is held as long as the body: both are charged to the listener's budget.
        let mut charge = crate::listen::Charge::default();
        let head = crate::listen::head_bytes(request.uri(), request.headers());
        let spent = stats.body().charge(&mut charge, head).err();
        let mut request = request.map(|body| {
            tonic::body::Body::new(crate::listen::BoundedBody::new(body, timeout, stats, charge))
        });
        let reached = Reached::default();
        request.extensions_mut().insert(reached.clone());
        let refusal = Refusal::of(&request, &self.proxy, self.listener);
        let (node, proxy) = (self.node.clone(), self.proxy.clone());
        if let Some(spent) = spent {
            drop(request);
            return Box::pin(async move {
                let status = Status::resource_exhausted(spent.to_string());
                Ok(refusal.audit(&node, &proxy, status.into_http(), tonic::Code::ResourceExhausted).await)
            });
        }
        // Response wrapping: a bad TTL is refused before the call runs.
        let wrapping = self.listener == Listener::Client;
        let header = wrapping.then(|| request.headers().get(WRAP_TTL_HEADER)).flatten();
        let wrap = match header.map(|v| wrap_ttl(WRAP_TTL_HEADER, v.as_bytes())) {
            None => None,
            Some(Ok(ttl)) => Some(ttl),
            Some(Err(message)) => {
                return Box::pin(async move {
                    let status = Status::invalid_argument(message);
                    Ok(refusal.audit(&node, &proxy, status.into_http(), tonic::Code::InvalidArgument).await)
                });
            }
        };
        // The clone that was made ready is the one called (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let response = inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if reached.0.load(Ordering::Acquire) {
                return Ok(match wrap {
                    Some(ttl) => wrapped(&node, &refusal, &proxy, response, ttl).await,
                    None => response,
                });
            }
            let code = response
                .headers()
                .get(Status::GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Unknown, tonic::Code::from_i32);
            if code == tonic::Code::Internal {
                // tonic answers a message cut short (a frame longer than the body) with
                // INTERNAL: the node did not fail, the request was malformed.
                response =
                    Status::invalid_argument("malformed request: the message is cut short").into_http();
            }
            Ok(refusal.audit(&node, &proxy, response, code).await)
        })
    }
}

impl Refusal {
    /// Audits a request refused before it reached a handler (tonic's `code`), and returns
    /// `response` with the event's headers — or `UNAVAILABLE` if the event could not be
    /// recorded.
    async fn audit(
        &self,
        node: &Arc<Node>,
        proxy: &ProxyConfig,
        mut response: http::Response<tonic::body::Body>,
        code: tonic::Code,
    ) -> http::Response<tonic::body::Body> {
        let ctx = self.context(proxy);
        let certificate = self.certificates.as_ref().and_then(|certs| certs.first());
        let actor = certificate.map(|leaf| crate::region::certificate_actor(leaf.as_ref()));
        let audited = node
            .reject_as(ctx, self.uri.path().to_owned(), actor, move || {
                ApiError::invalid(format!("request refused before it reached the node ({code:?})"))
            })
            .await;
        let position = audited.position_hex();
        if let Err(err @ (ApiError::Store(_) | ApiError::Unavailable | ApiError::Internal)) = audited.result {
            // The refusal could not be recorded: say so rather than answer unaudited.
            response = Status::from(err).into_http();
        }
        audit_headers(response.headers_mut(), position.as_deref(), &audited.request_id);
        response
    }
}

/// What a gRPC answer wrapped for later holds, as stored (JSON, sealed by the node).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct WrappedAnswer {
    grpc_method: String,
    /// The answer's message, base64.
    message: String,
}

impl WrappedAnswer {
    /// The gRPC method and message of a stored answer, or `None` if `stored` is not one (a
    /// response wrapped over the HTTP API, stored as its JSON body).
    pub(crate) fn open(stored: &str) -> Option<(String, Zeroizing<Vec<u8>>)> {
        let answer = serde_json::from_str::<WrappedAnswer>(stored).ok()?;
        let message = Zeroizing::new(B64.decode(answer.message.as_bytes()).ok()?);
        Some((answer.grpc_method.clone(), message))
    }
}

impl Drop for WrappedAnswer {
    fn drop(&mut self) {
        self.message.zeroize();
    }
}

/// Wraps a handler's successful answer (`Node::wrap`, under the handler's request id): the
/// caller gets its method's empty message and the wrapping token in the headers. An error
/// answer passes unwrapped, as Vault wraps only successes.
async fn wrapped(
    node: &Arc<Node>,
    refusal: &Refusal,
    proxy: &ProxyConfig,
    response: http::Response<tonic::body::Body>,
    ttl: u64,
) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt as _;
    // An error is answered trailers-only, its status in the headers.
    if response.headers().contains_key(Status::GRPC_STATUS) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let request_id = parts.headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(_) => return Status::unavailable("the answer to wrap could not be read").into_http(),
    };
    if let Some(trailers) = collected.trailers()
        && let Some(status) = Status::from_header_map(trailers)
        && status.code() != tonic::Code::Ok
    {
        return status.into_http();
    }
    let bytes = collected.to_bytes();
    // One uncompressed frame: flag 0, the length, the message.
    let message = match bytes.as_ref() {
        [0, l0, l1, l2, l3, message @ ..]
            if u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize == message.len() =>
        {
            message
        }
        _ => return Status::unavailable("the answer to wrap is not one message").into_http(),
    };
    let method = refusal.uri.path().to_owned();
    let answer = WrappedAnswer { grpc_method: method.clone(), message: B64.encode(message) };
    let stored = Zeroizing::new(serde_json::to_string(&answer).unwrap_or_default());
    let mut ctx = refusal.context(proxy);
    if let Some(id) = request_id {
        ctx.request_id = id;
    }
    let audited = node.wrap(ctx, method, stored, ttl, false).await;
    let position = audited.position_hex();
    let mut response = match audited.result {
        Ok(info) => {
            let mut response = http::Response::new(tonic::body::Body::new(UnaryBody::empty_message()));
            let headers = response.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            let token = info.token.as_ref().map(|t| t.as_str()).unwrap_or_default();
            for (name, value) in [
                (WRAP_TOKEN_HEADER, token),
                (WRAP_ACCESSOR_HEADER, info.accessor.as_str()),
                (WRAP_TTL_SECS_HEADER, &info.ttl_secs.to_string()),
                (WRAP_CREATION_PATH_HEADER, info.creation_path.as_str()),
            ] {
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.insert(name, value);
                }
            }
            response
        }
        Err(err) => Status::from(err).into_http(),
    };
    audit_headers(response.headers_mut(), position.as_deref(), &audited.request_id);
    response
}

/// A unary answer's body: one message frame, then `grpc-status: 0` in the trailers.
struct UnaryBody {
    frame: Option<tonic::codegen::Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl UnaryBody {
    /// The frame of a message with no field set (every method's answer decodes it).
    fn empty_message() -> Self {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("0"));
        UnaryBody {
            frame: Some(tonic::codegen::Bytes::from_static(&[0, 0, 0, 0, 0])),
            trailers: Some(trailers),
        }
    }
}

impl http_body::Body for UnaryBody {
    type Data = tonic::codegen::Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frame.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(frame))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(http_body::Frame::trailers(t))))
    }
}

/// The client's address: the peer, or — only when the peer is a trusted proxy — the first
/// address in the proxy's header, with the proxy recorded beside it.
pub fn client_source(proxy: &ProxyConfig, peer: Option<SocketAddr>, forwarded: Option<&str>) -> Source {
    let peer_text = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    if let Some(peer) = peer
        && proxy.trusted.contains(&peer.ip())
        && let Some(first) =
            forwarded.and_then(|f| f.split(',').next()).map(str::trim).filter(|f| f.parse::<IpAddr>().is_ok())
    {
        return Source { address: first.to_owned(), proxy: Some(peer_text) };
    }
    Source { address: peer_text, proxy: None }
}

/// Turns an audited result into a response, attaching the audit position either way.
/// A secret's data for the wire, moved out of `data`: strings as they are; any other value
/// as its JSON text, its key named in the second list.
pub fn data_to_wire(data: &mut SecretData) -> (std::collections::HashMap<String, String>, Vec<String>) {
    let mut json_keys = Vec::new();
    let wire = std::mem::take(&mut data.0)
        .into_iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(text) => (key, text),
            mut other => {
                let text = other.to_string();
                kv::scrub(&mut other);
                json_keys.push(key.clone());
                (key, text)
            }
        })
        .collect();
    (wire, json_keys)
}

/// A secret's data from the wire: the values of `json_keys` are parsed as JSON, the others
/// are strings. The error (for an invalid argument) names the key, never the value.
pub fn data_from_wire(
    wire: std::collections::HashMap<String, String>,
    json_keys: &[String],
) -> Result<SecretData, String> {
    if let Some(key) = json_keys.iter().find(|k| !wire.contains_key(k.as_str())) {
        return Err(format!("json_keys: {key:?} is not a key of the data"));
    }
    let mut data = SecretData::default();
    for (key, mut text) in wire {
        let value = if json_keys.contains(&key) {
            let parsed = serde_json::from_str(&text);
            text.zeroize();
            parsed.map_err(|_| format!("data: the value of {key:?} is not valid JSON"))?
        } else {
            serde_json::Value::String(text)
        };
        data.0.insert(key, value);
    }
    Ok(data)
}

fn respond<T, R>(audited: Audited<T>, build: impl FnOnce(T) -> R) -> Result<Response<R>, Status> {
    let position = audited.position_hex();
    let request_id = audited.request_id.clone();
    let attach = |meta: &mut tonic::metadata::MetadataMap| {
        if let Some(p) = &position
            && let Ok(value) = MetadataValue::try_from(p.as_str())
        {
            meta.insert(AUDIT_POSITION_HEADER, value);
        }
        if let Ok(value) = MetadataValue::try_from(request_id.as_str()) {
            meta.insert(REQUEST_ID_HEADER, value);
        }
    };
    match audited.result {
        Ok(value) => {
            let mut response = Response::new(build(value));
            attach(response.metadata_mut());
            Ok(response)
        }
        Err(err) => {
            let primary = match &err {
                ApiError::ReadOnlyRegion { primary } => MetadataValue::try_from(primary.as_str()).ok(),
                _ => None,
            };
            let mut status = Status::from(err);
            attach(status.metadata_mut());
            if let Some(primary) = primary {
                status.metadata_mut().insert(PRIMARY_REGION_HEADER, primary);
            }
            Err(status)
        }
    }
}

fn mount(m: String) -> String {
    if m.is_empty() { kv::DEFAULT_MOUNT.to_owned() } else { m }
}

/// Values past 255 become 255, which `init` refuses (at most 32 shares) — audited like any
/// other bad input.
fn narrow(value: u32) -> u8 {
    u8::try_from(value).unwrap_or(u8::MAX)
}

fn token_info(r: TokenRecord) -> proto::TokenInfo {
    proto::TokenInfo {
        accessor: r.accessor,
        policies: r.policies,
        entity: r.entity,
        display_name: r.display_name,
        created_unix_ms: r.created_unix_ms,
        expire_unix_ms: r.expire_unix_ms.unwrap_or(0),
        ttl_secs: r.ttl_secs,
        renewable: r.renewable,
        parent_accessor: r.parent.unwrap_or_default(),
        bound_cidrs: r.bound_cidrs,
        meta: r.meta.into_iter().collect(),
    }
}

fn db_role_info(role: crate::database::Role) -> proto::DbRoleInfo {
    proto::DbRoleInfo {
        name: role.name,
        db: role.db,
        ttl_secs: role.ttl_secs,
        max_ttl_secs: role.max_ttl_secs,
        max_leases_per_identity: role.max_leases_per_identity,
        creation_sql: role.creation_sql,
        revocation_sql: role.revocation_sql,
        renew_sql: role.renew_sql,
    }
}

fn lease_info(l: crate::database::Lease) -> proto::LeaseInfo {
    proto::LeaseInfo {
        lease_id: l.id,
        role: l.role,
        username: l.username,
        issued_unix_ms: l.issued_unix_ms,
        expire_unix_ms: l.expire_unix_ms,
        max_expire_unix_ms: l.max_expire_unix_ms,
        owner: l.owner_entity,
    }
}

fn grant(g: crate::access::Grant) -> proto::AccessGrant {
    proto::AccessGrant {
        id: g.id,
        policy: g.policy,
        reason: g.reason,
        ttl_secs: g.ttl_secs,
        state: g.state.name().to_owned(),
        requester: g.requester_entity,
        approver: g.approver_entity.unwrap_or_default(),
        created_unix_ms: g.created_unix_ms,
        expires_unix_ms: g.expires_unix_ms.unwrap_or(0),
    }
}

fn token_auth(t: NewToken) -> proto::TokenAuth {
    proto::TokenAuth { token: t.token.to_string(), info: Some(token_info(t.record)) }
}

fn metadata(m: Metadata) -> proto::KvMetadata {
    proto::KvMetadata {
        created_unix_ms: m.created_unix_ms,
        updated_unix_ms: m.updated_unix_ms,
        current_version: m.current_version,
        oldest_version: m.oldest_version(),
        max_versions: m.max_versions,
        cas_required: m.cas_required,
        versions: m
            .versions
            .iter()
            .map(|(v, s)| proto::KvVersionMeta {
                version: *v,
                created_unix_ms: s.created_unix_ms,
                deletion_unix_ms: s.deletion_unix_ms.unwrap_or(0),
                destroyed: s.destroyed,
                revoked: s.revoked_unix_ms.is_some(),
            })
            .collect(),
        stages: m.stages.clone().into_iter().collect(),
        rotation: m.rotation.as_ref().and_then(|r| serde_json::to_string(r).ok()).unwrap_or_default(),
        rotation_step: m.rotation_state.as_ref().map(|s| s.step.name().to_owned()).unwrap_or_default(),
        rotation_next_unix_ms: m.rotation.as_ref().map_or(0, |r| r.next_unix_ms),
        custom_metadata: m.custom_metadata.into_iter().collect(),
    }
}

fn role_info(r: crate::auth::AppRole) -> proto::AppRoleInfo {
    proto::AppRoleInfo {
        name: r.name,
        policies: r.policies,
        token_ttl_secs: r.token_ttl_secs,
        secret_id_ttl_secs: r.secret_id_ttl_secs,
        secret_id_bound_cidrs: r.secret_id_bound_cidrs,
        token_bound_cidrs: r.token_bound_cidrs,
        metadata: r.metadata.into_iter().collect(),
    }
}

fn cert_role_info(r: crate::auth::CertRole) -> proto::CertRoleInfo {
    proto::CertRoleInfo {
        name: r.name,
        certificate_sha256: r.certificate_sha256,
        policies: r.policies,
        token_ttl_secs: r.token_ttl_secs,
    }
}

fn accessor(a: String) -> Option<String> {
    (!a.is_empty()).then_some(a)
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Arca for Service {
    async fn init(&self, request: Request<proto::InitRequest>) -> Reply<proto::InitResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let (shares, threshold) = (narrow(r.key_shares), narrow(r.key_threshold));
        respond(self.node.operator_init(ctx, shares, threshold).await, |i| proto::InitResponse {
            key_shares: i.shares.iter().map(|s| s.to_string()).collect(),
            key_threshold: i.threshold.into(),
            root_token: i.root_token.token.to_string(),
        })
    }

    async fn unseal(&self, request: Request<proto::UnsealRequest>) -> Reply<proto::SealStatus> {
        let ctx = self.context(&request);
        let share = Zeroizing::new(request.into_inner().key_share);
        let id = self.node.identity().clone();
        let term = self.node.barrier().active_term();
        respond(self.node.operator_unseal(ctx, share).await, |p| proto::SealStatus {
            initialized: true,
            sealed: p.sealed,
            key_threshold: p.threshold.into(),
            progress: p.progress.into(),
            keyring_term: term.unwrap_or(0),
            cluster: id.cluster,
            region: id.region,
            node: id.node,
            ..Default::default()
        })
    }

    async fn seal(&self, request: Request<proto::Empty>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        respond(self.node.operator_seal(ctx).await, |()| proto::Empty {})
    }

    async fn status(&self, request: Request<proto::Empty>) -> Reply<proto::SealStatus> {
        let ctx = self.context(&request);
        let id = self.node.identity().clone();
        respond(self.node.operator_status(ctx).await, |s| proto::SealStatus {
            initialized: s.initialized,
            sealed: s.sealed,
            key_shares: s.shares.into(),
            key_threshold: s.threshold.into(),
            progress: s.progress.into(),
            keyring_term: s.keyring_term.unwrap_or(0),
            cluster: id.cluster,
            region: id.region,
            node: id.node,
            seal_type: s.seal_type,
            sealed_reason: s.sealed_reason.unwrap_or_default(),
        })
    }

    async fn migrate_seal(&self, request: Request<proto::MigrateSealRequest>) -> Reply<proto::SealStatus> {
        let ctx = self.context(&request);
        let to = match request.get_ref().to.as_str() {
            "hsm" | "pkcs11" => crate::sys::SealTarget::Hsm,
            "shamir" => crate::sys::SealTarget::Shamir,
            _ => {
                let refused = self
                    .node
                    .reject(ctx, "sys/seal/migrate".into(), || {
                        ApiError::invalid("migrate the seal to \"hsm\" or \"shamir\"")
                    })
                    .await;
                return respond(refused, |()| proto::SealStatus::default());
            }
        };
        let id = self.node.identity().clone();
        let term = self.node.barrier().active_term();
        respond(self.node.operator_migrate_seal(ctx, to).await, |kind| proto::SealStatus {
            initialized: true,
            sealed: false,
            keyring_term: term.unwrap_or(0),
            cluster: id.cluster,
            region: id.region,
            node: id.node,
            seal_type: kind,
            ..Default::default()
        })
    }

    async fn rotate(&self, request: Request<proto::Empty>) -> Reply<proto::RotateResponse> {
        let ctx = self.context(&request);
        respond(self.node.operator_rotate(ctx).await, |term| proto::RotateResponse { keyring_term: term })
    }

    async fn kv_put(&self, request: Request<proto::KvPutRequest>) -> Reply<proto::KvWriteResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let data = match data_from_wire(r.data, &r.json_keys) {
            Ok(data) => data,
            Err(err) => return self.refuse_data(ctx, r.mount, &r.path, err).await,
        };
        respond(self.node.kv_write(ctx, mount(r.mount), r.path, data, r.cas).await, |version| {
            proto::KvWriteResponse { version }
        })
    }

    async fn kv_get(&self, request: Request<proto::KvGetRequest>) -> Reply<proto::KvGetResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let selector = match (r.version, r.stage.as_str()) {
            (Some(v), "") if v > 0 => kv::Selector::Version(v),
            (None | Some(0), "") => kv::Selector::Current,
            (None | Some(0), stage) => kv::Selector::Stage(stage.to_owned()),
            (Some(_), _) => {
                let refused = self.node.reject(ctx, format!("{}/data/{}", mount(r.mount), r.path), || {
                    ApiError::invalid("give a version or a stage, not both")
                });
                return respond(refused.await, |()| proto::KvGetResponse::default());
            }
        };
        // The values move into the reply: no further copy of the secret is left behind.
        respond(self.node.kv_read_at(ctx, mount(r.mount), r.path, selector).await, |mut s| {
            let (data, json_keys) = data_to_wire(&mut s.data);
            proto::KvGetResponse {
                data,
                version: s.version,
                created_unix_ms: s.meta.created_unix_ms,
                custom_metadata: std::mem::take(&mut s.custom_metadata).into_iter().collect(),
                json_keys,
            }
        })
    }

    async fn kv_patch(&self, request: Request<proto::KvPatchRequest>) -> Reply<proto::KvWriteResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let set = match data_from_wire(r.set, &r.json_keys) {
            Ok(set) => set,
            Err(err) => return self.refuse_data(ctx, r.mount, &r.path, err).await,
        };
        respond(self.node.kv_patch(ctx, mount(r.mount), r.path, set, r.remove, r.cas).await, |version| {
            proto::KvWriteResponse { version }
        })
    }

    async fn kv_list(&self, request: Request<proto::KvListRequest>) -> Reply<proto::NameList> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_list(ctx, mount(r.mount), r.prefix).await, |names| proto::NameList { names })
    }

    async fn kv_delete(
        &self,
        request: Request<proto::KvVersionsRequest>,
    ) -> Reply<proto::KvVersionsResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_delete(ctx, mount(r.mount), r.path, r.versions).await, |versions| {
            proto::KvVersionsResponse { versions }
        })
    }

    async fn kv_undelete(
        &self,
        request: Request<proto::KvVersionsRequest>,
    ) -> Reply<proto::KvVersionsResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_undelete(ctx, mount(r.mount), r.path, r.versions).await, |versions| {
            proto::KvVersionsResponse { versions }
        })
    }

    async fn kv_destroy(
        &self,
        request: Request<proto::KvVersionsRequest>,
    ) -> Reply<proto::KvVersionsResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_destroy(ctx, mount(r.mount), r.path, r.versions).await, |versions| {
            proto::KvVersionsResponse { versions }
        })
    }

    async fn kv_read_metadata(&self, request: Request<proto::KvPathRequest>) -> Reply<proto::KvMetadata> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_read_metadata(ctx, mount(r.mount), r.path).await, metadata)
    }

    async fn kv_write_metadata(
        &self,
        request: Request<proto::KvWriteMetadataRequest>,
    ) -> Reply<proto::KvMetadata> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let custom: BTreeMap<String, String> = r.custom_metadata.into_iter().collect();
        let update = MetadataUpdate {
            max_versions: r.max_versions,
            cas_required: r.cas_required,
            custom_metadata: (r.replace_custom_metadata || !custom.is_empty()).then_some(custom),
            delete_version_after_secs: None,
        };
        respond(self.node.kv_write_metadata(ctx, mount(r.mount), r.path, update).await, metadata)
    }

    async fn kv_rotation_set(&self, request: Request<proto::KvRotationRequest>) -> Reply<proto::KvMetadata> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let req = crate::lifecycle::RotationRequest {
            interval_secs: r.interval_secs,
            schedule: (!r.schedule.is_empty()).then_some(r.schedule),
            rotator: r.rotator,
            field: (!r.field.is_empty()).then_some(r.field),
            length: r.length,
            symbols: r.symbols,
            bytes: r.bytes,
            command: (!r.command.is_empty()).then_some(r.command),
            url: (!r.url.is_empty()).then_some(r.url),
        };
        respond(self.node.kv_rotation_set(ctx, mount(r.mount), r.path, req).await, metadata)
    }

    async fn kv_rotation_clear(&self, request: Request<proto::KvPathRequest>) -> Reply<proto::KvMetadata> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_rotation_clear(ctx, mount(r.mount), r.path).await, metadata)
    }

    async fn kv_rotate(&self, request: Request<proto::KvPathRequest>) -> Reply<proto::KvWriteResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_rotate_now(ctx, mount(r.mount), r.path).await, |version| {
            proto::KvWriteResponse { version }
        })
    }

    async fn kv_revoke(&self, request: Request<proto::KvRevokeRequest>) -> Reply<proto::KvVersionsResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_revoke(ctx, mount(r.mount), r.path, r.versions, r.all).await, |versions| {
            proto::KvVersionsResponse { versions }
        })
    }

    async fn db_config_write(&self, request: Request<proto::DbConfigRequest>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let tls = crate::database::DbTls {
            ca_pem: r.ca_pem,
            client_cert_pem: r.client_cert_pem,
            client_key_pem: r.client_key_pem.map(Zeroizing::new),
        };
        respond(
            self.node.db_config_write(ctx, r.name, Zeroizing::new(r.url), tls).await,
            |()| proto::Empty {},
        )
    }

    async fn db_role_write(&self, request: Request<proto::DbRoleRequest>) -> Reply<proto::DbRoleInfo> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let some = |s: String| (!s.is_empty()).then_some(s);
        let req = crate::database::RoleRequest {
            name: r.name,
            db: r.db,
            creation_sql: r.creation_sql,
            revocation_sql: some(r.revocation_sql),
            renew_sql: some(r.renew_sql),
            ttl_secs: r.ttl_secs,
            max_ttl_secs: r.max_ttl_secs,
            max_leases_per_identity: r.max_leases_per_identity,
        };
        respond(self.node.db_role_write(ctx, req).await, db_role_info)
    }

    async fn db_config_read(&self, request: Request<proto::DbName>) -> Reply<proto::DbConfigInfo> {
        let ctx = self.context(&request);
        respond(self.node.db_config_read(ctx, request.into_inner().name).await, |c| proto::DbConfigInfo {
            name: c.name,
            url: c.url,
            has_ca: c.has_ca,
            has_client_cert: c.has_client_cert,
            roles: c.roles,
            root_rotation_pending: c.root_rotation_pending,
        })
    }

    async fn db_rotate_root(&self, request: Request<proto::DbName>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        respond(self.node.db_rotate_root(ctx, request.into_inner().name).await, |()| proto::Empty {})
    }

    async fn db_config_list(&self, request: Request<proto::Empty>) -> Reply<proto::NameList> {
        let ctx = self.context(&request);
        respond(self.node.db_config_list(ctx).await, |names| proto::NameList { names })
    }

    async fn db_config_delete(&self, request: Request<proto::DbName>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        respond(self.node.db_config_delete(ctx, request.into_inner().name).await, |()| proto::Empty {})
    }

    async fn db_role_read(&self, request: Request<proto::DbName>) -> Reply<proto::DbRoleInfo> {
        let ctx = self.context(&request);
        respond(self.node.db_role_read(ctx, request.into_inner().name).await, db_role_info)
    }

    async fn db_role_list(&self, request: Request<proto::Empty>) -> Reply<proto::NameList> {
        let ctx = self.context(&request);
        respond(self.node.db_role_list(ctx).await, |names| proto::NameList { names })
    }

    async fn db_role_delete(&self, request: Request<proto::DbName>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        respond(self.node.db_role_delete(ctx, request.into_inner().name).await, |()| proto::Empty {})
    }

    async fn db_creds(&self, request: Request<proto::DbCredsRequest>) -> Reply<proto::DbCredsResponse> {
        let ctx = self.context(&request);
        respond(self.node.db_creds(ctx, request.into_inner().role).await, |c| proto::DbCredsResponse {
            username: c.lease.username.clone(),
            password: c.password.to_string(),
            lease: Some(lease_info(c.lease)),
        })
    }

    async fn lease_renew(&self, request: Request<proto::LeaseRenewRequest>) -> Reply<proto::LeaseInfo> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.lease_renew(ctx, r.lease_id, r.increment_secs).await, lease_info)
    }

    async fn lease_revoke(
        &self,
        request: Request<proto::LeaseRevokeRequest>,
    ) -> Reply<proto::LeaseRevokeResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.lease_revoke(ctx, r.lease_id, r.prefix).await, |n| proto::LeaseRevokeResponse {
            revoked: n as u64,
        })
    }

    async fn lease_lookup(&self, request: Request<proto::LeaseId>) -> Reply<proto::LeaseInfo> {
        let ctx = self.context(&request);
        respond(self.node.lease_lookup(ctx, request.into_inner().lease_id).await, lease_info)
    }

    async fn lease_list(&self, request: Request<proto::LeaseListRequest>) -> Reply<proto::LeaseListResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.lease_list(ctx, r.prefix, r.expired).await, |(leases, truncated)| {
            proto::LeaseListResponse { leases: leases.into_iter().map(lease_info).collect(), truncated }
        })
    }

    async fn access_request(
        &self,
        request: Request<proto::AccessRequestRequest>,
    ) -> Reply<proto::AccessGrant> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.access_request(ctx, r.policy, r.ttl_secs, r.reason).await, grant)
    }

    async fn access_approve(&self, request: Request<proto::AccessGrantId>) -> Reply<proto::AccessGrant> {
        let ctx = self.context(&request);
        respond(self.node.access_approve(ctx, request.into_inner().id).await, grant)
    }

    async fn access_list(&self, request: Request<proto::Empty>) -> Reply<proto::AccessGrants> {
        let ctx = self.context(&request);
        respond(self.node.access_list(ctx).await, |grants| proto::AccessGrants {
            grants: grants.into_iter().map(grant).collect(),
        })
    }

    async fn kv_delete_metadata(&self, request: Request<proto::KvPathRequest>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.kv_delete_metadata(ctx, mount(r.mount), r.path).await, |()| proto::Empty {})
    }

    async fn token_create(&self, request: Request<proto::TokenCreateRequest>) -> Reply<proto::TokenAuth> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let req = CreateTokenRequest {
            policies: r.policies,
            ttl_secs: r.ttl_secs,
            display_name: r.display_name,
            renewable: r.renewable,
            orphan: r.orphan,
            bound_cidrs: r.bound_cidrs,
            meta: r.meta.into_iter().collect(),
        };
        respond(self.node.token_create(ctx, req).await, token_auth)
    }

    async fn token_lookup(&self, request: Request<proto::TokenAccessorRequest>) -> Reply<proto::TokenInfo> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.token_lookup(ctx, accessor(r.accessor)).await, token_info)
    }

    async fn token_renew(&self, request: Request<proto::TokenRenewRequest>) -> Reply<proto::TokenInfo> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.token_renew(ctx, r.increment_secs).await, token_info)
    }

    async fn token_revoke(
        &self,
        request: Request<proto::TokenAccessorRequest>,
    ) -> Reply<proto::TokenRevokeResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.token_revoke(ctx, accessor(r.accessor)).await, |n| proto::TokenRevokeResponse {
            revoked: n as u64,
        })
    }

    async fn token_capabilities(
        &self,
        request: Request<proto::TokenCapabilitiesRequest>,
    ) -> Reply<proto::TokenCapabilitiesResponse> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let of = match (r.token.is_empty(), r.accessor.is_empty()) {
            (true, true) => crate::auth::CapabilitiesOf::Caller,
            (false, true) => crate::auth::CapabilitiesOf::Token(Zeroizing::new(r.token)),
            (true, false) => crate::auth::CapabilitiesOf::Accessor(r.accessor),
            (false, false) => {
                let refused = self.node.reject(ctx, "sys/capabilities".into(), || {
                    ApiError::invalid("give a token or an accessor, not both")
                });
                return respond(refused.await, |()| proto::TokenCapabilitiesResponse::default());
            }
        };
        respond(self.node.token_capabilities(ctx, of, r.paths).await, |found| {
            proto::TokenCapabilitiesResponse {
                paths: found
                    .into_iter()
                    .map(|(path, capabilities)| proto::PathCapabilities { path, capabilities })
                    .collect(),
            }
        })
    }

    async fn app_role_write(
        &self,
        request: Request<proto::AppRoleWriteRequest>,
    ) -> Reply<proto::AppRoleInfo> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let req = WriteRoleRequest {
            name: r.name,
            policies: r.policies,
            token_ttl_secs: r.token_ttl_secs,
            secret_id_ttl_secs: r.secret_id_ttl_secs,
            secret_id_bound_cidrs: r.secret_id_bound_cidrs,
            token_bound_cidrs: r.token_bound_cidrs,
            metadata: r.metadata.into_iter().collect(),
        };
        respond(self.node.approle_write(ctx, req).await, role_info)
    }

    async fn app_role_read(&self, request: Request<proto::AppRoleName>) -> Reply<proto::AppRoleInfo> {
        let ctx = self.context(&request);
        respond(self.node.approle_read(ctx, request.into_inner().name).await, role_info)
    }

    async fn app_role_delete(&self, request: Request<proto::AppRoleName>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        respond(self.node.approle_delete(ctx, request.into_inner().name).await, |()| proto::Empty {})
    }

    async fn app_role_list(&self, request: Request<proto::Empty>) -> Reply<proto::NameList> {
        let ctx = self.context(&request);
        respond(self.node.approle_list(ctx).await, |names| proto::NameList { names })
    }

    async fn app_role_role_id(&self, request: Request<proto::AppRoleName>) -> Reply<proto::RoleIdResponse> {
        let ctx = self.context(&request);
        respond(self.node.approle_role_id(ctx, request.into_inner().name).await, |role_id| {
            proto::RoleIdResponse { role_id }
        })
    }

    async fn app_role_secret_id(
        &self,
        request: Request<proto::AppRoleName>,
    ) -> Reply<proto::SecretIdResponse> {
        let ctx = self.context(&request);
        respond(self.node.approle_secret_id(ctx, request.into_inner().name).await, |s| {
            proto::SecretIdResponse {
                secret_id: s.secret_id.to_string(),
                accessor: s.accessor.clone(),
                expire_unix_ms: s.expire_unix_ms.unwrap_or(0),
            }
        })
    }

    async fn app_role_login(&self, request: Request<proto::AppRoleLoginRequest>) -> Reply<proto::TokenAuth> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(
            self.node.approle_login(ctx, Zeroizing::new(r.role_id), Zeroizing::new(r.secret_id)).await,
            token_auth,
        )
    }

    async fn cert_role_write(
        &self,
        request: Request<proto::CertRoleWriteRequest>,
    ) -> Reply<proto::CertRoleInfo> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        let req = WriteCertRoleRequest {
            name: r.name,
            certificate_pem: r.certificate_pem,
            policies: r.policies,
            token_ttl_secs: r.token_ttl_secs,
        };
        respond(self.node.cert_role_write(ctx, req).await, cert_role_info)
    }

    async fn cert_role_read(&self, request: Request<proto::CertRoleName>) -> Reply<proto::CertRoleInfo> {
        let ctx = self.context(&request);
        respond(self.node.cert_role_read(ctx, request.into_inner().name).await, cert_role_info)
    }

    async fn cert_role_delete(&self, request: Request<proto::CertRoleName>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        respond(self.node.cert_role_delete(ctx, request.into_inner().name).await, |()| proto::Empty {})
    }

    async fn cert_login(&self, request: Request<proto::Empty>) -> Reply<proto::TokenAuth> {
        let ctx = self.context(&request);
        // The TLS layer has verified the chain against the configured client CA.
        let leaf = request.peer_certs().and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        respond(self.node.cert_login(ctx, leaf).await, token_auth)
    }

    async fn policy_write(&self, request: Request<proto::PolicyWriteRequest>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        let r = request.into_inner();
        respond(self.node.policy_write(ctx, r.name, r.policy).await, |()| proto::Empty {})
    }

    async fn policy_read(&self, request: Request<proto::PolicyName>) -> Reply<proto::PolicyText> {
        let ctx = self.context(&request);
        let name = request.into_inner().name;
        let echo = name.clone();
        respond(self.node.policy_read(ctx, name).await, |policy| proto::PolicyText { name: echo, policy })
    }

    async fn policy_list(&self, request: Request<proto::Empty>) -> Reply<proto::NameList> {
        let ctx = self.context(&request);
        respond(self.node.policy_list(ctx).await, |names| proto::NameList { names })
    }

    async fn policy_delete(&self, request: Request<proto::PolicyName>) -> Reply<proto::Empty> {
        let ctx = self.context(&request);
        respond(self.node.policy_delete(ctx, request.into_inner().name).await, |()| proto::Empty {})
    }

    async fn unwrap(&self, request: Request<proto::WrapToken>) -> Reply<proto::Unwrapped> {
        let ctx = self.context(&request);
        let token = Zeroizing::new(request.into_inner().token);
        respond(self.node.unwrap(ctx, token).await, |answer| {
            // A gRPC answer, or the JSON body of one wrapped over the HTTP API.
            match WrappedAnswer::open(&answer) {
                Some((grpc_method, message)) => {
                    proto::Unwrapped { grpc_method, message: message.to_vec(), json: String::new() }
                }
                None => proto::Unwrapped { json: answer.to_string(), ..Default::default() },
            }
        })
    }

    async fn wrap_lookup(&self, request: Request<proto::WrapToken>) -> Reply<proto::WrapLookupResponse> {
        let ctx = self.context(&request);
        let token = Zeroizing::new(request.into_inner().token);
        respond(self.node.wrap_lookup(ctx, token).await, |info| proto::WrapLookupResponse {
            accessor: info.accessor,
            creation_path: info.creation_path,
            created_unix_ms: info.created_unix_ms,
            ttl_secs: info.ttl_secs,
        })
    }

    async fn region_status(&self, request: Request<proto::Empty>) -> Reply<proto::RegionStatusResponse> {
        let ctx = self.context(&request);
        respond(self.node.region_status(ctx).await, |s| s)
    }

    async fn region_promote(&self, request: Request<proto::Empty>) -> Reply<proto::RegionStatusResponse> {
        let ctx = self.context(&request);
        respond(self.node.region_promote(ctx).await, |s| s)
    }

    async fn region_demote(
        &self,
        request: Request<proto::RegionDemoteRequest>,
    ) -> Reply<proto::DivergenceReport> {
        let ctx = self.context(&request);
        let primary = request.into_inner().primary;
        respond(self.node.region_demote(ctx, primary).await, |r| r)
    }

    async fn region_divergent_secrets(
        &self,
        request: Request<proto::DivergenceRequest>,
    ) -> Reply<proto::DivergentSecrets> {
        let ctx = self.context(&request);
        respond(self.node.region_divergent_secrets(ctx, request.into_inner().id).await, |r| r)
    }

    async fn region_divergence(
        &self,
        request: Request<proto::DivergenceRequest>,
    ) -> Reply<proto::DivergenceReport> {
        let ctx = self.context(&request);
        respond(self.node.region_divergence(ctx, request.into_inner().id).await, |r| r)
    }
}
