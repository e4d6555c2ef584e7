//! `arca-client`: the async Rust SDK for arca's gRPC API.
//!
//! Connect with TLS or mutual TLS, authenticate with a token, AppRole or the client
//! certificate, read secrets by path or version, write, list, and follow a secret as new
//! versions appear. Every call is an audited access on the node: each answer carries its
//! [`Receipt`] (the audit position of the request's durable event).
//!
//! A client knows several nodes, possibly in several regions. Reads go to the first node
//! that answers (a standby region serves reads); writes go to the primary, found by following
//! the "send writes to the primary region X" answer of a standby. Calls that were not served
//! (node unreachable, sealed, storage unavailable, or never sent because the connection they
//! were queued on closed first, as when a node recycles its connections at their age) are
//! retried on the next node, then after a backoff ([`Retry`]). A write whose connection broke after it was sent is never retried: its
//! error says [`Error::is_maybe_committed`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), arca_client::Error> {
//! use arca_client::{Auth, Client, Config};
//! let config = Config::new("eu=https://arca-eu:8400,us=https://arca-us:8400")?
//!     .tls(arca_client::Tls::from_files(Some("ca.pem".as_ref()), None, None)?)
//!     .auth(Auth::app_role("2c7f…", "9a1e…"));
//! let client = Client::connect(config).await?;
//! let db = client.read("secret/app/db").await?;
//! println!("user {} (version {})", db.get("user").unwrap_or(""), db.version);
//! client.write("secret/app/db", [("user", "app"), ("password", "n3w")]).await?;
//! let mut follow = client.follow("secret/app/db");
//! while let Ok(secret) = follow.next().await {
//!     println!("version {}", secret.version);
//! }
//! # Ok(()) }
//! ```
//!
//! Secret values are [`SecretValue`]s: zeroized on drop, `*****` in `Debug`.

#![forbid(unsafe_code)]

mod config;
mod error;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

pub use config::{Auth, Config, NodeAddr, Retry, Tls};
pub use error::{
    AUDIT_POSITION_HEADER, Error, ErrorKind, PRIMARY_REGION_HEADER, REQUEST_ID_HEADER, WRAP_ACCESSOR_HEADER,
    WRAP_CREATION_PATH_HEADER, WRAP_TOKEN_HEADER, WRAP_TTL_HEADER, WRAP_TTL_SECS_HEADER,
};

/// The generated protobuf types and gRPC client of arca's API (`node/proto/arca.proto`).
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("arca.v1");
}

/// The generated gRPC client, for calls this SDK has no method for (use [`Client::call`]).
pub type RawClient = proto::arca_client::ArcaClient<Channel>;

/// Where a call may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Any node, starting with the last one that answered a read.
    Read,
    /// The primary region: starting with the last node that took a write, following a
    /// standby's answer to the primary region's nodes.
    Write,
    /// The first configured node only (operator commands aimed at one node: unseal, status,
    /// region promote). Retried there, never sent elsewhere.
    First,
}

/// Where the node recorded a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receipt {
    /// The node that answered.
    pub node: String,
    /// The audit position (hex versionstamp) of the request's durable audit event.
    pub audit_position: Option<String>,
    /// The request id recorded in the audit event.
    pub request_id: Option<String>,
}

impl Receipt {
    fn of<T>(response: &Response<T>, node: &str) -> Receipt {
        let meta = |key: &str| response.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Receipt {
            node: node.to_owned(),
            audit_position: meta(AUDIT_POSITION_HEADER),
            request_id: meta(REQUEST_ID_HEADER),
        }
    }
}

/// A secret value: zeroized when dropped, `*****` in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> Zeroizing<String> {
        self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// One version of a secret.
#[derive(Debug, Clone)]
pub struct Secret {
    /// `<mount>/<path>`, as asked for.
    pub path: String,
    pub version: u64,
    pub created_unix_ms: u64,
    /// Each field's value as text: a string as it is, any other JSON value (an object, array,
    /// number, boolean or null, as Vault's KV v2 allows) as its JSON text.
    pub data: BTreeMap<String, SecretValue>,
    /// The fields whose value is not a string: their text in `data` is JSON.
    pub json_fields: BTreeSet<String>,
    pub custom_metadata: HashMap<String, String>,
    pub receipt: Receipt,
}

impl Secret {
    /// A field's value as text (JSON text for a value that is not a string).
    pub fn get(&self, field: &str) -> Option<&str> {
        self.data.get(field).map(SecretValue::expose)
    }

    /// A field's value as JSON: a string field is a JSON string. The returned value is not
    /// zeroized when dropped.
    pub fn value(&self, field: &str) -> Option<serde_json::Value> {
        let text = self.data.get(field)?.expose();
        if self.json_fields.contains(field) {
            serde_json::from_str(text).ok()
        } else {
            Some(serde_json::Value::String(text.to_owned()))
        }
    }
}

/// The outcome of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub version: u64,
    pub receipt: Receipt,
}

/// An answer wrapped for later ([`Client::call_wrapped`]): the single-use token that unwraps
/// it. The answer itself stays on the node, sealed, until unwrapped or its TTL ends.
#[derive(Debug, Clone)]
pub struct Wrapped {
    /// The wrapping token (`arcaw_…`): whoever holds it unwraps the answer, once.
    pub token: SecretValue,
    pub accessor: String,
    pub ttl: Duration,
    /// The gRPC method whose answer it wraps (`/arca.v1.Arca/KvGet`).
    pub creation_path: String,
    /// The wrapped call's receipt: its request id is the call's and the wrap's.
    pub receipt: Receipt,
}

impl Wrapped {
    fn of<T>(response: &Response<T>, node: &str) -> Option<Wrapped> {
        let meta = |key: &str| response.metadata().get(key).and_then(|v| v.to_str().ok());
        Some(Wrapped {
            token: SecretValue(Zeroizing::new(meta(WRAP_TOKEN_HEADER)?.to_owned())),
            accessor: meta(WRAP_ACCESSOR_HEADER).unwrap_or_default().to_owned(),
            ttl: Duration::from_secs(meta(WRAP_TTL_SECS_HEADER).and_then(|t| t.parse().ok()).unwrap_or(0)),
            creation_path: meta(WRAP_CREATION_PATH_HEADER).unwrap_or_default().to_owned(),
            receipt: Receipt::of(response, node),
        })
    }
}

/// The gRPC method of a KV read, as a wrapped answer names it.
pub const KV_GET_METHOD: &str = "/arca.v1.Arca/KvGet";

/// A secret from a read's answer.
fn secret_of(path: String, g: proto::KvGetResponse, receipt: Receipt) -> Secret {
    Secret {
        path,
        version: g.version,
        created_unix_ms: g.created_unix_ms,
        data: g.data.into_iter().map(|(k, v)| (k, SecretValue(Zeroizing::new(v)))).collect(),
        json_fields: g.json_keys.into_iter().collect(),
        custom_metadata: g.custom_metadata,
        receipt,
    }
}

/// The longest of `mounts` that `full` is, or starts with at a segment boundary.
fn declared_mount<'a>(full: &str, mounts: &'a [String]) -> Option<&'a String> {
    mounts
        .iter()
        .filter(|m| full == m.as_str() || full.strip_prefix(m.as_str()).is_some_and(|r| r.starts_with('/')))
        .max_by_key(|m| m.len())
}

/// Splits a list prefix (`<mount>`, `<mount>/` or `<mount>/<folder>/`) into its mount and
/// folder, the mount found as by [`split_path_in`].
pub fn split_prefix_in(full: &str, mounts: &[String]) -> Result<(String, String), Error> {
    let full = full.trim_start_matches('/');
    let (mount, folder) = match declared_mount(full, mounts) {
        Some(m) => (m.as_str(), full[m.len()..].trim_start_matches('/')),
        None => full.split_once('/').unwrap_or((full, "")),
    };
    if mount.is_empty() {
        return Err(Error::config("expected <mount>/ or <mount>/<folder>/"));
    }
    Ok((mount.to_owned(), folder.to_owned()))
}

/// Splits `<mount>/<path>` into its mount and path: the mount is the first segment.
pub fn split_path(full: &str) -> Result<(String, String), Error> {
    split_path_in(full, &[])
}

/// Splits `<mount>/<path>` into its mount and path: the longest of `mounts` the path starts
/// with (at a segment boundary), else the first segment.
pub fn split_path_in(full: &str, mounts: &[String]) -> Result<(String, String), Error> {
    let full = full.trim_start_matches('/');
    if let Some(mount) = declared_mount(full, mounts) {
        let path = full[mount.len()..].strip_prefix('/').unwrap_or_default();
        if path.is_empty() {
            return Err(Error::config(format!("expected {mount}/<path>; got {full:?}")));
        }
        return Ok((mount.clone(), path.to_owned()));
    }
    match full.split_once('/') {
        Some((mount, path)) if !mount.is_empty() && !path.is_empty() => {
            Ok((mount.to_owned(), path.to_owned()))
        }
        _ => Err(Error::config(format!("expected <mount>/<path>, e.g. secret/app/db; got {full:?}"))),
    }
}

struct Node {
    url: String,
    region: Option<String>,
    raw: RawClient,
}

struct Inner {
    nodes: Vec<Node>,
    auth: Auth,
    token: RwLock<Option<Zeroizing<String>>>,
    retry: Retry,
    read_at: AtomicUsize,
    write_at: AtomicUsize,
    /// One login at a time.
    login: tokio::sync::Mutex<()>,
    /// Mounts of several segments ([`Config::mount`]).
    mounts: Vec<String>,
}

/// A connection to arca's nodes. Cheap to clone; clones share connections and the token.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("nodes", &self.inner.nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>())
            .field("auth", &self.inner.auth)
            .finish()
    }
}

impl Client {
    /// Sets up connections to every configured node (inside a tokio runtime). Connections are
    /// made on first use, so an unreachable node is not an error here.
    pub async fn connect(config: Config) -> Result<Client, Error> {
        if config.nodes.is_empty() {
            return Err(Error::config("no node address given"));
        }
        let mut nodes = Vec::with_capacity(config.nodes.len());
        for addr in &config.nodes {
            let mut endpoint = Endpoint::from_shared(addr.url.clone())
                .map_err(|_| Error::config(format!("invalid address {}", addr.url)))?
                .connect_timeout(config.connect_timeout)
                .timeout(config.request_timeout);
            if addr.url.starts_with("https://") {
                let ca = config.tls.ca_pem.as_ref().ok_or_else(|| {
                    Error::config(format!("{}: https needs a CA certificate to verify the server", addr.url))
                })?;
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key)) = &config.tls.identity {
                    tls = tls.identity(Identity::from_pem(cert, key.as_slice()));
                }
                if let Some(domain) = &config.tls.domain {
                    tls = tls.domain_name(domain.clone());
                }
                endpoint = endpoint.tls_config(tls).map_err(|e| Error::config(format!("tls: {e}")))?;
            } else if matches!(config.auth, Auth::Certificate) {
                return Err(Error::config(format!("{}: certificate login needs an https address", addr.url)));
            }
            nodes.push(Node {
                url: addr.url.clone(),
                region: addr.region.clone(),
                raw: RawClient::new(endpoint.connect_lazy()),
            });
        }
        if matches!(config.auth, Auth::Certificate) && config.tls.identity.is_none() {
            return Err(Error::config("certificate login needs a client certificate and key"));
        }
        let token = match &config.auth {
            Auth::Token(t) => Some(t.clone()),
            _ => None,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                nodes,
                auth: config.auth,
                token: RwLock::new(token),
                retry: Retry { rounds: config.retry.rounds.max(1), ..config.retry },
                read_at: AtomicUsize::new(0),
                write_at: AtomicUsize::new(0),
                login: tokio::sync::Mutex::new(()),
                mounts: config.mounts,
            }),
        })
    }

    /// `<mount>/<path>` split by the declared mounts ([`split_path_in`]).
    fn split(&self, full: &str) -> Result<(String, String), Error> {
        split_path_in(full, &self.inner.mounts)
    }

    fn request<M>(&self, message: M) -> Request<M> {
        let mut request = Request::new(message);
        let token = self.inner.token.read().unwrap_or_else(|p| p.into_inner());
        if let Some(token) = token.as_ref()
            && let Ok(value) = format!("Bearer {}", token.as_str()).parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Makes any call of the API through this client's routing, retries, token and re-login:
    /// `client.call(Route::Read, msg, |mut c, r| async move { c.kv_get(r).await })`.
    pub async fn call<M, R, F, Fut>(&self, route: Route, message: M, f: F) -> Result<Response<R>, Error>
    where
        M: Clone,
        F: Fn(RawClient, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        self.call_routed(route, message, f).await.map(|(r, _)| r)
    }

    /// [`Client::call`] without logging in first; returns the answering node's URL too.
    async fn call_as_is<M, R, F, Fut>(
        &self,
        route: Route,
        message: M,
        f: F,
        may_login: bool,
    ) -> Result<(Response<R>, String), Error>
    where
        M: Clone,
        F: Fn(RawClient, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let inner = &self.inner;
        let n = inner.nodes.len();
        let mut at = match route {
            Route::Read => inner.read_at.load(Ordering::Relaxed) % n,
            Route::Write => inner.write_at.load(Ordering::Relaxed) % n,
            Route::First => 0,
        };
        let (mut tries, mut round, mut backoff) = (0, 1, inner.retry.initial_backoff);
        let mut logged_in = !may_login;
        loop {
            let node = &inner.nodes[at];
            let sent_with = self.inner.token.read().unwrap_or_else(|p| p.into_inner()).clone();
            let err = match f(node.raw.clone(), self.request(message.clone())).await {
                Ok(response) => {
                    match route {
                        Route::Read => inner.read_at.store(at, Ordering::Relaxed),
                        Route::Write => inner.write_at.store(at, Ordering::Relaxed),
                        Route::First => {}
                    }
                    return Ok((response, node.url.clone()));
                }
                Err(status) => Error::from_status(&status, &node.url),
            };
            let next = match err.kind() {
                ErrorKind::Unauthenticated if inner.auth.logs_in() && !logged_in => {
                    // An expired or revoked token: log in again (once), then retry here.
                    logged_in = true;
                    self.login_if_token(sent_with).await?;
                    continue;
                }
                ErrorKind::ReadOnlyRegion { primary } if route == Route::Write => {
                    tracing::debug!(node = %node.url, %primary, "write refused by a read-only region");
                    (1..n)
                        .map(|i| (at + i) % n)
                        .find(|&i| inner.nodes[i].region.as_deref() == Some(primary.as_str()))
                        .unwrap_or((at + 1) % n)
                }
                ErrorKind::Transport if route == Route::Write => return Err(err),
                _ if err.is_retryable() => {
                    tracing::debug!(node = %node.url, error = %err, "not served; trying again");
                    if route == Route::First { at } else { (at + 1) % n }
                }
                _ => return Err(err),
            };
            tries += 1;
            if tries >= if route == Route::First { 1 } else { n } {
                if round >= inner.retry.rounds {
                    return Err(err);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(inner.retry.max_backoff);
                (tries, round) = (0, round + 1);
            }
            at = next;
        }
    }

    /// Logs in (AppRole or certificate), unless another task already replaced `stale`.
    async fn login_if_token(&self, stale: Option<Zeroizing<String>>) -> Result<(), Error> {
        let _one = self.inner.login.lock().await;
        let current = self.inner.token.read().unwrap_or_else(|p| p.into_inner()).clone();
        if current.is_some() && current != stale {
            return Ok(());
        }
        // Boxed: login calls through call_as_is, which may call back here.
        Box::pin(self.login()).await.map(|_| ())
    }

    /// Logs in with the configured AppRole or client certificate and keeps the new token.
    pub async fn login(&self) -> Result<proto::TokenInfo, Error> {
        let response = match &self.inner.auth {
            Auth::AppRole { role_id, secret_id } => {
                let message =
                    proto::AppRoleLoginRequest { role_id: role_id.clone(), secret_id: secret_id.to_string() };
                self.call_as_is(
                    Route::Write,
                    message,
                    |mut c, r| async move { c.app_role_login(r).await },
                    false,
                )
                .await?
            }
            Auth::Certificate => {
                self.call_as_is(
                    Route::Write,
                    proto::Empty {},
                    |mut c, r| async move { c.cert_login(r).await },
                    false,
                )
                .await?
            }
            Auth::None | Auth::Token(_) => {
                return Err(Error::config("login needs AppRole or certificate auth"));
            }
        };
        let auth = response.0.into_inner();
        *self.inner.token.write().unwrap_or_else(|p| p.into_inner()) = Some(Zeroizing::new(auth.token));
        tracing::debug!(accessor = %auth.info.as_ref().map(|i| i.accessor.as_str()).unwrap_or(""), "logged in");
        Ok(auth.info.unwrap_or_default())
    }

    /// The current token's own record (policies, expiry).
    pub async fn token_info(&self) -> Result<proto::TokenInfo, Error> {
        let message = proto::TokenAccessorRequest { accessor: String::new() };
        Ok(self
            .call(Route::Read, message, |mut c, r| async move { c.token_lookup(r).await })
            .await?
            .into_inner())
    }

    /// Renews the current token (by its TTL, or `increment`).
    pub async fn renew_token(&self, increment: Option<Duration>) -> Result<proto::TokenInfo, Error> {
        let message = proto::TokenRenewRequest { increment_secs: increment.map(|d| d.as_secs()) };
        Ok(self
            .call(Route::Write, message, |mut c, r| async move { c.token_renew(r).await })
            .await?
            .into_inner())
    }

    /// Reads the current version of `<mount>/<path>`.
    pub async fn read(&self, path: &str) -> Result<Secret, Error> {
        self.read_at(path, None, String::new()).await
    }

    /// Reads one version of `<mount>/<path>`.
    pub async fn read_version(&self, path: &str, version: u64) -> Result<Secret, Error> {
        self.read_at(path, Some(version), String::new()).await
    }

    /// Reads the version in a rotation stage: `current`, `previous` (the credential a
    /// rotation just replaced, still valid while clients move over) or `pending` (the one
    /// a rotation under way is about to make current).
    pub async fn read_stage(&self, path: &str, stage: &str) -> Result<Secret, Error> {
        self.read_at(path, None, stage.to_owned()).await
    }

    async fn read_at(&self, full: &str, version: Option<u64>, stage: String) -> Result<Secret, Error> {
        let (mount, path) = self.split(full)?;
        let message = proto::KvGetRequest { mount, path, version, stage };
        let (response, node) =
            self.call_routed(Route::Read, message, |mut c, r| async move { c.kv_get(r).await }).await?;
        let receipt = Receipt::of(&response, &node);
        Ok(secret_of(full.trim_start_matches('/').to_owned(), response.into_inner(), receipt))
    }

    /// Makes a call whose answer is wrapped for `ttl` (1 s to 7 days) instead of returned:
    /// `client.call_wrapped(ttl, msg, |mut c, r| async move { c.app_role_secret_id(r).await })`.
    /// Hand the token to whoever needs the answer; [`Client::unwrap`] returns it once. The
    /// call goes to the primary region (wrapping writes).
    pub async fn call_wrapped<M, R, F, Fut>(&self, ttl: Duration, message: M, f: F) -> Result<Wrapped, Error>
    where
        M: Clone,
        F: Fn(RawClient, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("{}s", ttl.as_secs())
            .parse()
            .map_err(|_| Error::config("the wrap TTL is not a duration"))?;
        let (response, node) = self
            .call_routed(Route::Write, message, |raw, mut request| {
                request.metadata_mut().insert(WRAP_TTL_HEADER, value.clone());
                f(raw, request)
            })
            .await?;
        Wrapped::of(&response, &node)
            .ok_or_else(|| Error::config(format!("{node} answered unwrapped: it predates response wrapping")))
    }

    /// Reads the current version of `<mount>/<path>`, wrapped for `ttl`
    /// ([`Client::unwrap_secret`] unwraps it).
    pub async fn read_wrapped(&self, full: &str, ttl: Duration) -> Result<Wrapped, Error> {
        let (mount, path) = self.split(full)?;
        let message = proto::KvGetRequest { mount, path, ..Default::default() };
        self.call_wrapped(ttl, message, |mut c, r| async move { c.kv_get(r).await }).await
    }

    /// Unwraps a wrapped answer, once: the wrapping token alone is enough (no login first).
    /// A gRPC answer comes back as its method and message, one wrapped over the HTTP API as
    /// its JSON.
    /// The receipt is the unwrap's own (it is audited as `wrapping.unwrap`).
    pub async fn unwrap(&self, token: &str) -> Result<(proto::Unwrapped, Receipt), Error> {
        let message = proto::WrapToken { token: token.to_owned() };
        let (response, node) = self
            .call_as_is(Route::Write, message, |mut c, r| async move { c.unwrap(r).await }, false)
            .await?;
        let receipt = Receipt::of(&response, &node);
        Ok((response.into_inner(), receipt))
    }

    /// Unwraps a wrapped read ([`Client::read_wrapped`]). The secret's path is not part of
    /// what was wrapped: `path` is empty; its receipt is the unwrap's.
    pub async fn unwrap_secret(&self, token: &str) -> Result<Secret, Error> {
        let (unwrapped, receipt) = self.unwrap(token).await?;
        if unwrapped.grpc_method != KV_GET_METHOD {
            return Err(Error::config(format!("the token wraps {:?}, not a read", unwrapped.grpc_method)));
        }
        let read = <proto::KvGetResponse as prost::Message>::decode(unwrapped.message.as_slice())
            .map_err(|_| Error::config("the wrapped read does not decode"))?;
        Ok(secret_of(String::new(), read, receipt))
    }

    /// What a wrapping token wraps (method, TTL, creation time), without unwrapping it.
    pub async fn wrap_lookup(&self, token: &str) -> Result<proto::WrapLookupResponse, Error> {
        let message = proto::WrapToken { token: token.to_owned() };
        let (response, _) = self
            .call_as_is(Route::Read, message, |mut c, r| async move { c.wrap_lookup(r).await }, false)
            .await?;
        Ok(response.into_inner())
    }

    async fn call_routed<M, R, F, Fut>(
        &self,
        route: Route,
        message: M,
        f: F,
    ) -> Result<(Response<R>, String), Error>
    where
        M: Clone,
        F: Fn(RawClient, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        if self.inner.auth.logs_in() && self.inner.token.read().unwrap_or_else(|p| p.into_inner()).is_none() {
            self.login_if_token(None).await?;
        }
        self.call_as_is(route, message, f, true).await
    }

    /// Writes a new version of `<mount>/<path>`.
    pub async fn write<K, V>(
        &self,
        path: &str,
        data: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Written, Error>
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.write_cas(path, data, None).await
    }

    /// Writes a new version only if the current version is `cas` (0: only if none exists).
    pub async fn write_cas<K, V>(
        &self,
        full: &str,
        data: impl IntoIterator<Item = (K, V)>,
        cas: Option<u64>,
    ) -> Result<Written, Error>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let data = data.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        self.put(full, data, Vec::new(), cas).await
    }

    /// Writes a new version whose fields may hold any JSON value (objects, arrays, numbers,
    /// booleans, null), as Vault's KV v2 allows; only if the current version is `cas`, when
    /// given.
    pub async fn write_json(
        &self,
        full: &str,
        data: &serde_json::Map<String, serde_json::Value>,
        cas: Option<u64>,
    ) -> Result<Written, Error> {
        let mut json_keys = Vec::new();
        let wire = data
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k.clone(), s.clone()),
                other => {
                    json_keys.push(k.clone());
                    (k.clone(), other.to_string())
                }
            })
            .collect();
        self.put(full, wire, json_keys, cas).await
    }

    async fn put(
        &self,
        full: &str,
        data: HashMap<String, String>,
        json_keys: Vec<String>,
        cas: Option<u64>,
    ) -> Result<Written, Error> {
        let (mount, path) = self.split(full)?;
        let message = proto::KvPutRequest { mount, path, data, cas, json_keys };
        let (response, node) =
            self.call_routed(Route::Write, message, |mut c, r| async move { c.kv_put(r).await }).await?;
        Ok(Written { receipt: Receipt::of(&response, &node), version: response.into_inner().version })
    }

    /// The names under `<mount>/<prefix>` (folders end in `/`).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let (mount, prefix) = split_prefix_in(prefix, &self.inner.mounts)?;
        let message = proto::KvListRequest { mount, prefix };
        Ok(self
            .call(Route::Read, message, |mut c, r| async move { c.kv_list(r).await })
            .await?
            .into_inner()
            .names)
    }

    /// The metadata of `<mount>/<path>`: current version, every version's state.
    pub async fn metadata(&self, full: &str) -> Result<proto::KvMetadata, Error> {
        let (mount, path) = self.split(full)?;
        let message = proto::KvPathRequest { mount, path };
        Ok(self
            .call(Route::Read, message, |mut c, r| async move { c.kv_read_metadata(r).await })
            .await?
            .into_inner())
    }

    /// Rotates now with the secret's rotation policy; returns the new current version.
    pub async fn rotate(&self, full: &str) -> Result<u64, Error> {
        let (mount, path) = self.split(full)?;
        let message = proto::KvPathRequest { mount, path };
        Ok(self
            .call(Route::Write, message, |mut c, r| async move { c.kv_rotate(r).await })
            .await?
            .into_inner()
            .version)
    }

    /// Soft-deletes versions (none given: the current one). Returns the versions deleted.
    pub async fn delete(&self, full: &str, versions: &[u64]) -> Result<Vec<u64>, Error> {
        let (mount, path) = self.split(full)?;
        let message = proto::KvVersionsRequest { mount, path, versions: versions.to_vec() };
        Ok(self
            .call(Route::Write, message, |mut c, r| async move { c.kv_delete(r).await })
            .await?
            .into_inner()
            .versions)
    }

    /// Follows `<mount>/<path>`: [`Follow::next`] yields the current version, then each new
    /// one. It reads metadata every `interval` (1 s by default) and the secret only when its
    /// version changed, so an unchanged secret costs one audited metadata read per interval.
    pub fn follow(&self, path: &str) -> Follow {
        Follow { client: self.clone(), path: path.to_owned(), interval: Duration::from_secs(1), seen: None }
    }
}

/// A followed secret; see [`Client::follow`].
#[derive(Debug)]
pub struct Follow {
    client: Client,
    path: String,
    interval: Duration,
    seen: Option<u64>,
}

impl Follow {
    /// How often to look for a new version.
    pub fn interval(mut self, interval: Duration) -> Follow {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Waits for the next version (the current one on the first call). A deleted or
    /// destroyed current version is skipped. Errors are returned as they come (after the
    /// client's retries); calling again resumes.
    pub async fn next(&mut self) -> Result<Secret, Error> {
        loop {
            match self.client.metadata(&self.path).await {
                Ok(meta) if meta.current_version != 0 && self.seen != Some(meta.current_version) => {
                    match self.client.read_version(&self.path, meta.current_version).await {
                        Ok(secret) => {
                            self.seen = Some(secret.version);
                            return Ok(secret);
                        }
                        Err(e) if e.kind() == &ErrorKind::NotFound => self.seen = Some(meta.current_version),
                        Err(e) => return Err(e),
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == &ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_redacted() {
        let secret = Secret {
            path: "secret/a".into(),
            version: 1,
            created_unix_ms: 0,
            data: BTreeMap::from([
                ("pw".to_owned(), SecretValue(Zeroizing::new("hunter2".into()))),
                ("hosts".to_owned(), SecretValue(Zeroizing::new(r#"["a",1]"#.into()))),
            ]),
            json_fields: BTreeSet::from(["hosts".to_owned()]),
            custom_metadata: HashMap::new(),
            receipt: Receipt::default(),
        };
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(secret.get("pw"), Some("hunter2"));
        assert_eq!(secret.value("pw"), Some(serde_json::json!("hunter2")));
        assert_eq!(secret.get("hosts"), Some(r#"["a",1]"#));
        assert_eq!(secret.value("hosts"), Some(serde_json::json!(["a", 1])));
        assert_eq!(secret.value("none"), None);
    }

    #[test]
    fn paths_split_strictly() {
        assert_eq!(split_path("/secret/app/db").unwrap(), ("secret".into(), "app/db".into()));
        for bad in ["", "secret", "secret/", "/x", "//a"] {
            assert!(split_path(bad).is_err(), "{bad:?}");
        }
        // Declared mounts of several segments: the longest that ends at a segment boundary.
        let mounts = ["team/kv".to_owned(), "team/kv/deep".to_owned(), "t".to_owned()];
        let split = |p: &str| split_path_in(p, &mounts).unwrap();
        assert_eq!(split("team/kv/app/db"), ("team/kv".into(), "app/db".into()));
        assert_eq!(split("/team/kv/deep/x"), ("team/kv/deep".into(), "x".into()));
        assert_eq!(split("team/kvx/a"), ("team".into(), "kvx/a".into()), "not at a boundary");
        assert_eq!(split("secret/a"), ("secret".into(), "a".into()));
        assert!(split_path_in("team/kv/", &mounts).is_err());
        assert!(split_path_in("team/kv", &mounts).is_err(), "a declared mount alone is no path");
        let prefix = |p: &str| split_prefix_in(p, &mounts).unwrap();
        assert_eq!(prefix("team/kv"), ("team/kv".into(), String::new()));
        assert_eq!(prefix("team/kv/"), ("team/kv".into(), String::new()));
        assert_eq!(prefix("team/kv/app/"), ("team/kv".into(), "app/".into()));
        assert_eq!(prefix("secret/app/"), ("secret".into(), "app/".into()));
        assert_eq!(prefix("secret"), ("secret".into(), String::new()));
        assert!(split_prefix_in("/", &mounts).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_after_every_round() {
        // Nothing listens on port 1: every node refuses, every round, then the error says so.
        let config = Config::new("http://127.0.0.1:1,http://127.0.0.1:1")
            .unwrap()
            .auth(Auth::token("t"))
            .retry(Retry {
                rounds: 2,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
            });
        let client = Client::connect(config).await.unwrap();
        let err = client.read("secret/a").await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Connect, "{err}");
        assert!(!err.is_maybe_committed());
        let err = client.write("secret/a", [("k", "v")]).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Connect, "{err}");
    }

    #[tokio::test]
    async fn bad_configs_are_refused() {
        let https = Config::new("https://127.0.0.1:8400").unwrap();
        assert!(Client::connect(https.clone()).await.is_err(), "https without a CA");
        let cert = Config::new("http://127.0.0.1:8400").unwrap().auth(Auth::Certificate);
        assert!(Client::connect(cert).await.is_err(), "certificate login over plaintext");
        let no_identity = https.tls(Tls::new().ca_pem("x")).auth(Auth::Certificate);
        assert!(Client::connect(no_identity).await.is_err(), "certificate login without a certificate");
    }
}
