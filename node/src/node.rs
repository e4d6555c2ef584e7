//! The node: request context, authentication and authorization inside the request's
//! transaction, and [`Node::execute`], which runs every request through the group committer
//! so that its audit event is durable before it is answered.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arca_audit::{Actor, EventRef, Operation, Outcome, Source};
use arca_store::{Store, StoreError, Transaction, Versionstamp};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::auth::TokenRecord;
use crate::barrier::Barrier;
use crate::committer::{Committer, Finished, Gate};
use crate::error::ApiError;
use crate::policy::{self, Capability, Policy};
use crate::{keys, metrics::Metrics};

/// Names of this node, recorded in every audit event.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub cluster: String,
    pub region: String,
    pub node: String,
}

/// What the transport layer knows about a request.
#[derive(Clone)]
pub struct RequestContext {
    pub request_id: String,
    /// The bearer token, if any. Never logged, never audited.
    pub token: Option<Zeroizing<String>>,
    pub source: Source,
    /// Whether the connection presented a verified client certificate (policy conditions).
    pub mtls: bool,
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("request_id", &self.request_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("source", &self.source)
            .finish()
    }
}

impl RequestContext {
    /// A context with a fresh request id: 48 bits of milliseconds then 80 random bits (like a
    /// ULID), so ids sort by time and the log's request-id index grows at its end instead of
    /// at random places.
    pub fn new(token: Option<Zeroizing<String>>, source: Source) -> Self {
        let mut id = [0u8; 16];
        id[..6].copy_from_slice(&now_unix_ms().to_be_bytes()[2..]);
        rand::fill(&mut id[6..]);
        RequestContext { request_id: hex::encode(id), token, source, mtls: false }
    }
}

/// A request's result with the durable position of its audit event.
#[derive(Debug)]
pub struct Audited<T> {
    pub result: Result<T, ApiError>,
    /// The request id recorded in the event (for an inclusion proof by request id).
    pub request_id: String,
    /// `None` only when the audit event could not be committed (and then `result` is an error).
    pub position: Option<Versionstamp>,
}

impl<T> Audited<T> {
    pub fn position_hex(&self) -> Option<String> {
        self.position.map(|p| hex::encode(p.as_bytes()))
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// SHA-256, the form in which tokens and other bearer credentials are stored.
pub(crate) fn credential_hash(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

/// A presented token as the store knows it: its hash and its record's key. Computed on the
/// request's own thread, so the committer does not hash.
pub(crate) struct Credential {
    hash: [u8; 32],
    key: Vec<u8>,
}

impl Credential {
    /// Longest token accepted.
    const MAX_LEN: usize = 256;

    fn of(token: &str) -> Option<Credential> {
        if token.len() > Self::MAX_LEN {
            return None;
        }
        let hash = credential_hash(token);
        Some(Credential { key: keys::token(&hash), hash })
    }
}

/// Shared state of a node.
pub struct Node {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) barrier: Barrier,
    pub(crate) committer: Committer,
    pub(crate) identity: NodeIdentity,
    pub(crate) metrics: Metrics,
    pub(crate) regions: std::sync::OnceLock<Arc<crate::region::Regions>>,
    /// Where pruned parts of the audit log are read from (when archiving is on).
    pub(crate) archive_dir: std::sync::OnceLock<std::path::PathBuf>,
    /// The HSM seal, when the config names one.
    pub(crate) hsm: std::sync::OnceLock<Arc<crate::hsm::Pkcs11Seal>>,
    /// Why the node is still sealed (the last auto-unseal failure), for `status`.
    pub(crate) sealed_reason: std::sync::Mutex<Option<String>>,
    /// The request clock (milliseconds since the epoch), when injected (tests of time-window
    /// conditions); the system clock otherwise.
    pub(crate) clock: std::sync::OnceLock<Arc<dyn Fn() -> u64 + Send + Sync>>,
    /// Lifecycle settings (the rotation scheduler), once started.
    pub(crate) lifecycle: std::sync::OnceLock<crate::lifecycle::LifecycleConfig>,
    /// Decoded-record caches (see [`CtCache`]).
    pub(crate) caches: Caches,
    /// Secrets this node is rotating right now.
    pub(crate) rotating: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    /// Leases being revoked on this node, one lock each (see `Node::reap`).
    pub(crate) reaping: crate::database::Reaping,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("identity", &self.identity).field("barrier", &self.barrier).finish()
    }
}

/// The environment of a request's work inside the batch transaction.
#[allow(missing_debug_implementations)] // holds a transaction and a token: nothing to show
pub struct Env<'a> {
    pub tx: &'a mut dyn Transaction,
    pub node: &'a Node,
    pub now_unix_ms: u64,
    pub actor: Actor,
    pub secret_version: Option<u64>,
    /// The caller's token, hashed before the request reached the committer (`None`: no
    /// token, or one too long to be any).
    credential: Option<&'a Credential>,
    /// The client address (after the trusted-proxy rules), for policy conditions.
    pub source_ip: Option<std::net::IpAddr>,
    pub mtls: bool,
    /// Set when a denial was caused by a failed condition: recorded in the audit event.
    pub denied_by: Option<String>,
}

/// The node's decoded-record caches.
#[derive(Default)]
pub(crate) struct Caches {
    pub(crate) tokens: CtCache<TokenRecord>,
    pub(crate) policies: CtCache<crate::policy::Policy>,
    pub(crate) kv_meta: CtCache<crate::kv::Metadata>,
}

impl Caches {
    pub(crate) fn clear(&self) {
        self.tokens.clear();
        self.policies.clear();
        self.kv_meta.clear();
    }
}

/// Decoded records (token records, policies, KV metadata — never secret values) keyed by
/// their store key *and exact ciphertext*: the store is still read in every request's
/// transaction, so a changed record is seen at once; only the decryption and parsing of an
/// unchanged one is skipped. Bounded; cleared when the node seals.
pub(crate) struct CtCache<T> {
    map: std::sync::Mutex<CtMap<T>>,
}

/// Store key → (ciphertext, decoded value).
type CtMap<T> = std::collections::HashMap<Vec<u8>, (Vec<u8>, Arc<T>)>;

impl<T> Default for CtCache<T> {
    fn default() -> Self {
        CtCache { map: std::sync::Mutex::new(std::collections::HashMap::new()) }
    }
}

const CT_CACHE_ENTRIES: usize = 20_000;

impl<T> CtCache<T> {
    fn get(&self, key: &[u8], ct: &[u8]) -> Option<Arc<T>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).filter(|(c, _)| c.as_slice() == ct).map(|(_, v)| v.clone())
    }

    fn put(&self, key: &[u8], ct: Vec<u8>, value: Arc<T>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CT_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(key.to_vec(), (ct, value));
    }

    pub(crate) fn clear(&self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A record's JSON, zeroized when dropped (records may hold credentials).
fn json_record<T: serde::Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    serde_json::to_vec(value).map(Zeroizing::new).map_err(|_| ApiError::Internal)
}

impl Env<'_> {
    /// Decrypts `ct` read at `key`; when another node rotated the keyring, loads the stored
    /// one and tries again.
    pub(crate) fn decrypt_at(&mut self, key: &[u8], ct: &[u8]) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        match self.node.barrier.decrypt(ct, key) {
            Err(crate::barrier::BarrierError::UnknownTerm(_)) => {
                let wrapped = self.tx.get(&keys::keyring())?.ok_or(ApiError::Internal)?;
                self.node.barrier.reload_keyring(&wrapped)?;
                Ok(self.node.barrier.decrypt(ct, key)?)
            }
            other => Ok(other?),
        }
    }

    /// Reads a sealed record and decodes it with `decode`, through `cache`.
    pub(crate) fn get_cached<T>(
        &mut self,
        key: &[u8],
        cache: &CtCache<T>,
        decode: impl FnOnce(&[u8]) -> Result<T, ApiError>,
    ) -> Result<Option<Arc<T>>, ApiError> {
        let Some(ct) = self.tx.get(key)? else {
            return Ok(None);
        };
        if let Some(hit) = cache.get(key, &ct) {
            return Ok(Some(hit));
        }
        let plain = self.decrypt_at(key, &ct)?;
        let value = Arc::new(decode(&plain)?);
        cache.put(key, ct, value.clone());
        Ok(Some(value))
    }

    /// A sealed JSON record through `cache`.
    pub(crate) fn get_json_cached<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &[u8],
        cache: &CtCache<T>,
    ) -> Result<Option<Arc<T>>, ApiError> {
        self.get_cached(key, cache, |plain| {
            serde_json::from_slice(plain).map_err(|_| {
                tracing::error!("stored record failed to parse");
                ApiError::Internal
            })
        })
    }

    /// Reads and decrypts a barrier value.
    pub fn get_sealed(&mut self, key: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ApiError> {
        self.get_sealed_as(key, key)
    }

    /// Reads and decrypts a barrier value bound to `aad` rather than to its own key (a
    /// secret version's row under a slot).
    pub fn get_sealed_as(&mut self, key: &[u8], aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ApiError> {
        let Some(ct) = self.tx.get(key)? else {
            return Ok(None);
        };
        self.decrypt_at(aad, &ct).map(Some)
    }

    /// The names stored under `prefix` (see [`names_under`]).
    pub fn names_under(&mut self, prefix: &[u8]) -> Result<Vec<String>, ApiError> {
        names_under(self.tx, prefix)
    }

    /// Reads and decrypts a JSON barrier value.
    pub fn get_json<T: serde::de::DeserializeOwned>(&mut self, key: &[u8]) -> Result<Option<T>, ApiError> {
        match self.get_sealed(key)? {
            None => Ok(None),
            Some(plain) => serde_json::from_slice(&plain).map(Some).map_err(|_| {
                tracing::error!("stored record failed to parse");
                ApiError::Internal
            }),
        }
    }

    /// Encrypts and writes a barrier value.
    pub fn put_sealed(&mut self, key: &[u8], plaintext: &[u8]) -> Result<(), ApiError> {
        self.seal_and_set(key, plaintext).map(drop)
    }

    /// Encrypts `plaintext` for `key`, writes it, and returns the ciphertext written.
    fn seal_and_set(&mut self, key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ApiError> {
        self.seal_and_set_as(key, key, plaintext)
    }

    /// [`Env::seal_and_set`], encrypted for `aad` rather than for `key`.
    fn seal_and_set_as(&mut self, key: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ApiError> {
        let ct = self.node.barrier.encrypt(plaintext, aad)?;
        self.tx.set(key, &ct)?;
        Ok(ct)
    }

    /// Encrypts and writes a JSON record, and remembers it in `cache` under its new
    /// ciphertext: the next read of the record (often the next write of the same secret)
    /// finds it decoded. Sound whether or not this transaction commits: a fresh nonce makes
    /// the ciphertext unique, so only a committed write of this very value can be read back
    /// with it.
    pub(crate) fn put_json_cached<T: serde::Serialize>(
        &mut self,
        key: &[u8],
        value: T,
        cache: &CtCache<T>,
    ) -> Result<(), ApiError> {
        let ct = self.seal_and_set(key, &json_record(&value)?)?;
        cache.put(key, ct, Arc::new(value));
        Ok(())
    }

    pub fn put_json<T: serde::Serialize>(&mut self, key: &[u8], value: &T) -> Result<(), ApiError> {
        self.seal_and_set(key, &json_record(value)?).map(drop)
    }

    /// Writes a JSON record at `key`, encrypted for `aad` (a secret version's row under a
    /// slot is bound to the version, not to the slot).
    pub fn put_json_as<T: serde::Serialize>(
        &mut self,
        key: &[u8],
        aad: &[u8],
        value: &T,
    ) -> Result<(), ApiError> {
        self.seal_and_set_as(key, aad, &json_record(value)?).map(drop)
    }

    /// Clears `old` and writes `value` at `new`, encrypted for `aad`
    /// ([`Transaction::replace`]: the store may reuse `old`'s row; when `old` is `new`, its
    /// value alone changes).
    pub fn replace_json<T: serde::Serialize>(
        &mut self,
        old: &[u8],
        new: &[u8],
        aad: &[u8],
        value: &T,
    ) -> Result<(), ApiError> {
        let ct = self.node.barrier.encrypt(&json_record(value)?, aad)?;
        self.tx.replace(old, new, &ct)?;
        Ok(())
    }

    /// The caller's token record, verified: present, known, unexpired. Records the actor.
    pub fn authenticate(&mut self) -> Result<Arc<TokenRecord>, ApiError> {
        if self.node.barrier.is_sealed() {
            return Err(ApiError::Sealed);
        }
        let credential = self.credential.ok_or(ApiError::Unauthenticated)?;
        let cache = &self.node.caches.tokens;
        let record = self.get_json_cached(&credential.key, cache)?.ok_or(ApiError::Unauthenticated)?;
        // The lookup was by hash; compare again in constant time against the stored hash.
        let mut stored = [0u8; 32];
        if hex::decode_to_slice(&record.hash, &mut stored).is_err()
            || !bool::from(stored.ct_eq(&credential.hash))
        {
            return Err(ApiError::Unauthenticated);
        }
        self.actor = Actor { entity: record.entity.clone(), token_accessor: Some(record.accessor.clone()) };
        if record.is_expired(self.now_unix_ms) {
            return Err(ApiError::Unauthenticated);
        }
        if !record.bound_cidrs.is_empty() {
            let cidrs: Vec<policy::Cidr> =
                record.bound_cidrs.iter().filter_map(|c| policy::Cidr::parse(c).ok()).collect();
            if !policy::in_any(&cidrs, self.source_ip) {
                self.denied_by = Some("token: bound_cidrs".into());
                return Err(ApiError::PermissionDenied);
            }
        }
        Ok(record)
    }

    /// Names the caller in the event when its token is valid; any other token (none, unknown,
    /// expired) changes nothing. Only a store error fails.
    pub fn identify(&mut self) -> Result<(), ApiError> {
        if self.credential.is_some()
            && let Err(ApiError::Store(err)) = self.authenticate()
        {
            return Err(ApiError::Store(err));
        }
        Ok(())
    }

    /// Authenticates, then checks that the token's policies grant one of `capabilities` on
    /// `path`. Deny by default.
    pub fn authorize(
        &mut self,
        path: &str,
        capabilities: &[Capability],
    ) -> Result<Arc<TokenRecord>, ApiError> {
        let record = self.authenticate()?;
        if self.allowed(&record, path, capabilities)? { Ok(record) } else { Err(ApiError::PermissionDenied) }
    }

    /// Whether `record`'s policies grant one of `capabilities` on `path`.
    pub fn allowed(
        &mut self,
        record: &TokenRecord,
        path: &str,
        capabilities: &[Capability],
    ) -> Result<bool, ApiError> {
        if record.policies.iter().any(|p| p == "root") {
            return Ok(true);
        }
        let decision = self.decide(record, path)?;
        let allowed = capabilities.iter().any(|c| decision.capabilities.contains(c));
        if !allowed && decision.failed_condition.is_some() {
            self.denied_by = decision.failed_condition;
        }
        Ok(allowed)
    }

    /// What `record`'s policies (and its approved just-in-time grants) grant on `path`, with
    /// their conditions evaluated against this request. A root token is not special here.
    pub fn decide(&mut self, record: &TokenRecord, path: &str) -> Result<policy::Decision, ApiError> {
        // Policies held for a while through approved just-in-time grants.
        let granted = crate::access::granted_policies(record, self.now_unix_ms);
        let mut policies = Vec::with_capacity(record.policies.len() + granted.len());
        for name in record.policies.iter().chain(granted.iter()) {
            let cache = &self.node.caches.policies;
            let parsed = self.get_cached(&keys::policy(name), cache, |plain| {
                let text = std::str::from_utf8(plain).map_err(|_| ApiError::Internal)?;
                policy::parse(text).map_err(|_| ApiError::Internal)
            })?;
            if let Some(parsed) = parsed {
                policies.push((name.as_str(), parsed));
            }
        }
        let ctx = policy::Context {
            source: self.source_ip,
            now_unix_ms: self.now_unix_ms,
            mtls: self.mtls,
            metadata: &record.meta,
        };
        Ok(policy::decide(policies.iter().map(|(n, p)| (*n, p.as_ref())), path, &ctx))
    }

    /// The policies of a token, parsed (for callers that check several paths).
    pub fn load_policies(&mut self, names: &[String]) -> Result<Vec<Policy>, ApiError> {
        let mut out = Vec::new();
        for name in names {
            if let Some(text) = self.get_sealed(&keys::policy(name))? {
                let text = std::str::from_utf8(&text).map_err(|_| ApiError::Internal)?;
                out.push(policy::parse(text).map_err(|_| ApiError::Internal)?);
            }
        }
        Ok(out)
    }
}

impl Node {
    pub fn new(store: Arc<dyn Store>, identity: NodeIdentity) -> Arc<Self> {
        // The committer's batches use the engine itself; every other path goes through the
        // journal, so the committer knows what they wrote (see `memo`).
        let journal = Arc::new(crate::memo::Journal::default());
        let committer = Committer::start(store.clone(), journal.clone(), identity.region.clone());
        let store: Arc<dyn Store> = Arc::new(crate::memo::JournaledStore::new(store, journal));
        Arc::new(Node {
            store,
            barrier: Barrier::default(),
            committer,
            identity,
            metrics: Metrics::default(),
            regions: std::sync::OnceLock::new(),
            archive_dir: std::sync::OnceLock::new(),
            hsm: std::sync::OnceLock::new(),
            sealed_reason: std::sync::Mutex::new(None),
            clock: std::sync::OnceLock::new(),
            lifecycle: std::sync::OnceLock::new(),
            rotating: std::sync::Mutex::new(std::collections::HashSet::new()),
            reaping: crate::database::Reaping::default(),
            caches: Caches::default(),
        })
    }

    /// Runs `work` as the system (audited with actor `system:rotation`, no token): the
    /// lifecycle's own steps.
    pub(crate) async fn execute_system<T, F>(
        self: &Arc<Self>,
        op: Operation,
        path: String,
        mut work: F,
    ) -> Audited<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Env<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let ctx = RequestContext::new(None, Source { address: "local".into(), proxy: None });
        self.execute(ctx, op, path, move |env| {
            if env.node.barrier.is_sealed() {
                return Err(ApiError::Sealed);
            }
            env.actor.entity = "system:rotation".into();
            work(env)
        })
        .await
    }

    /// The time requests see (the injected clock, or the system's).
    pub fn now(&self) -> u64 {
        self.clock.get().map_or_else(now_unix_ms, |clock| clock())
    }

    /// Injects the clock requests see (`Env::now_unix_ms`: expiry, time conditions). Once,
    /// before serving; in-process use only (tests).
    pub fn set_clock(&self, clock: Arc<dyn Fn() -> u64 + Send + Sync>) {
        let _ = self.clock.set(clock);
    }

    /// Configures the HSM seal (once, before serving).
    pub fn set_hsm_seal(&self, seal: crate::hsm::Pkcs11Seal) {
        let _ = self.hsm.set(Arc::new(seal));
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    pub fn barrier(&self) -> &Barrier {
        &self.barrier
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn committer(&self) -> &Committer {
        &self.committer
    }

    /// Decrypts `ciphertext` read at `aad`, reloading the keyring from the store once if
    /// another node rotated it since this node loaded it.
    pub(crate) fn decrypt(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        use arca_store::StoreExt as _;
        match self.barrier.decrypt(ciphertext, aad) {
            Err(crate::barrier::BarrierError::UnknownTerm(_)) => {
                let wrapped =
                    self.store.transact(|tx| tx.get(&keys::keyring()))?.value.ok_or(ApiError::Internal)?;
                self.barrier.reload_keyring(&wrapped)?;
                Ok(self.barrier.decrypt(ciphertext, aad)?)
            }
            other => Ok(other?),
        }
    }

    /// Records a request refused before it reached any operation (unknown route, malformed or
    /// oversized body), so that it too has its audit event, and returns the error.
    pub async fn reject(
        self: &Arc<Self>,
        ctx: RequestContext,
        path: String,
        error: impl Fn() -> ApiError + Send + 'static,
    ) -> Audited<()> {
        self.reject_as(ctx, path, None, error).await
    }

    /// [`Node::reject`], with the caller named by `actor` when it is `Some` (a caller that
    /// sends no token: a replication peer, named by its certificate) instead of its token.
    pub async fn reject_as(
        self: &Arc<Self>,
        ctx: RequestContext,
        path: String,
        actor: Option<String>,
        error: impl Fn() -> ApiError + Send + 'static,
    ) -> Audited<()> {
        self.execute(ctx, Operation::Rejected, path, move |env| {
            match &actor {
                Some(actor) => env.actor.entity.clone_from(actor),
                // Name the caller when the token is valid; a bad token changes nothing here.
                None if !env.node.barrier.is_sealed() => env.identify()?,
                None => {}
            }
            Err(error())
        })
        .await
    }

    /// Runs `work` inside the next batch transaction with an audit event for it, and answers
    /// only once that event is durable. `work` may run more than once (conflict retries) and
    /// must only touch the store through `Env`.
    #[allow(clippy::too_many_lines)]
    pub async fn execute<T, F>(
        self: &Arc<Self>,
        ctx: RequestContext,
        op: Operation,
        path: String,
        work: F,
    ) -> Audited<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Env<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let slot: Arc<std::sync::Mutex<Option<Result<T, ApiError>>>> = Arc::default();
        let job_slot = slot.clone();
        let node = self.clone();
        let mut work = work;
        let RequestContext { request_id, token, source, mtls } = ctx;
        let source_ip = source
            .address
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| source.address.parse::<std::net::IpAddr>())
            .ok();
        let reply_id = request_id.clone();
        let credential = token.as_deref().and_then(|t| Credential::of(t));
        drop(token);
        // Debug level: the span only wraps the wait for the committer, where nothing logs at
        // info, and an enabled span costs the workers ~1 µs per request (the fmt layer
        // formats its fields when it is created: ~5% of worker samples under load).
        let span = tracing::debug_span!("request", op = op.name(), request_id = %request_id);
        let job = Box::new(move |tx: &mut dyn Transaction, gate: &Gate| -> Result<Finished, StoreError> {
            let now = node.now();
            let mut env = Env {
                tx,
                node: &node,
                now_unix_ms: now,
                actor: Actor { entity: "anonymous".into(), token_accessor: None },
                secret_version: None,
                credential: credential.as_ref(),
                source_ip,
                mtls,
                denied_by: None,
            };
            // A standby (or a fenced primary) refuses writes before they start, naming
            // the region that takes them; the refusal is audited like any error.
            let outcome = if mutates(op) && !gate.writable {
                Err(ApiError::ReadOnlyRegion { primary: gate.primary.clone() })
            } else {
                work(&mut env)
            };
            let result = match outcome {
                // A store error aborts the batch attempt: retried with it when retryable,
                // otherwise the whole batch fails closed. It never ends up in an event.
                Err(ApiError::Store(err)) => return Err(err),
                other => other,
            };
            let outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(ApiError::PermissionDenied) if env.denied_by.is_some() => {
                    Outcome::DeniedBy { condition: env.denied_by.clone().unwrap_or_default() }
                }
                Err(err) if err.is_denial() => Outcome::Denied,
                Err(err) => Outcome::Error { code: err.code().into() },
            };
            let event = EventRef {
                time_unix_ms: now,
                request_id: &request_id,
                cluster: &node.identity.cluster,
                region: &node.identity.region,
                node: &node.identity.node,
                actor: &env.actor,
                source: &source,
                operation: op,
                path: &path,
                secret_version: env.secret_version,
                outcome: &outcome,
            }
            .encode();
            let succeeded = result.is_ok();
            *job_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            Ok(Finished { event, succeeded })
        });
        // `instrument`, never `enter()` across an await: the future may resume on another thread.
        let committed = tracing::Instrument::instrument(self.committer.submit(job), span).await;
        let audited = match committed {
            Ok(position) => {
                let result =
                    slot.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or(Err(ApiError::Internal));
                Audited { result, request_id: reply_id, position: Some(position) }
            }
            Err(_) => Audited { result: Err(ApiError::Unavailable), request_id: reply_id, position: None },
        };
        let outcome = match &audited.result {
            Ok(_) => "ok",
            Err(err) if err.is_denial() => "denied",
            Err(_) => "error",
        };
        self.metrics.observe_request(op, outcome, started.elapsed());
        audited
    }
}

/// The names stored under `prefix`: the last element of each key below it, in key order.
pub fn names_under(tx: &mut dyn Transaction, prefix: &[u8]) -> Result<Vec<String>, ApiError> {
    let (begin, end) = keys::children_range(prefix);
    let mut names = Vec::new();
    for kv in tx.get_range(&begin, &end, Default::default())? {
        let tuple = arca_store::tuple::unpack(&kv.key).map_err(|_| ApiError::Internal)?;
        names.extend(tuple.last().and_then(|e| e.as_str().map(str::to_owned)));
    }
    Ok(names)
}

/// Whether an operation may write to the replicated keyspace (and so needs the primary).
pub fn mutates(op: Operation) -> bool {
    use Operation::*;
    !matches!(
        op,
        KvRead
            | KvList
            | KvReadMetadata
            | TokenLookup
            | AppRoleRead
            | AppRoleList
            | PolicyRead
            | PolicyList
            | CertRoleRead
            | MountRead
            | MountList
            | Status
            | Health
            | Unseal
            | Seal
            | Rejected
            | RegionStatus
            | AccessList
            | LeaseLookup
            | LeaseList
            | DbConfigRead
            | DbConfigList
            | DbRoleRead
            | DbRoleList
            | RegionPromote
            | RegionDemote
            | RegionDivergence
            | RegionDivergentSecrets
            | RegionPull
            | RegionSnapshot
            | RegionHello
            | TokenCapabilities
            | WrapLookup
            | KvSubkeys
    )
}
