//! Identities: tokens and AppRole machine login.
//!
//! Tokens are 256-bit random strings (`arca_` + base64url), shown once and stored only as
//! their SHA-256 (the store key), compared again in constant time on use. Each token has a
//! public **accessor** — audit events and revocation name it, never the token — policies, a
//! TTL (renewable up to a maximum), and a parent: revoking a token revokes its children.
//!
//! AppRole: a role binds policies and TTLs; a machine logs in with the role's role id and a
//! secret id (issued per machine, stored hashed, with its own TTL) and receives a token.

use std::collections::BTreeMap;
use std::sync::Arc;

use arca_audit::{Actor, Operation};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::ApiError;
use crate::keys;
use crate::node::{Audited, Env, Node, RequestContext, credential_hash};
use crate::policy::{self, Capability};

/// Default token TTL: 24 hours.
pub const DEFAULT_TTL_SECS: u64 = 24 * 3600;
/// Longest TTL a token may have, and the longest it may be renewed to: 32 days.
pub const MAX_TTL_SECS: u64 = 32 * 24 * 3600;
const MAX_POLICIES: usize = 64;

/// A stored token (under its hash).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub accessor: String,
    pub policies: Vec<String>,
    /// `root`, `token:<display name>` or `approle:<role>`.
    pub entity: String,
    pub display_name: String,
    pub created_unix_ms: u64,
    /// `None`: never expires (the root token).
    pub expire_unix_ms: Option<u64>,
    /// The latest the token can be renewed to.
    pub max_expire_unix_ms: Option<u64>,
    pub ttl_secs: u64,
    pub renewable: bool,
    /// The accessor of the token that created this one.
    pub parent: Option<String>,
    /// Addresses the token may be used from (empty: anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound_cidrs: Vec<String>,
    /// Identity metadata (e.g. `env = prod`), for policy conditions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Policies held for a while through approved just-in-time grants (kept on the record,
    /// so authorization reads nothing more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<TokenGrant>,
}

/// A just-in-time grant held by a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenGrant {
    pub id: String,
    pub policy: String,
    pub expires_unix_ms: u64,
}

impl TokenRecord {
    pub fn is_expired(&self, now_unix_ms: u64) -> bool {
        self.expire_unix_ms.is_some_and(|e| now_unix_ms >= e)
    }
}

/// A newly created token, returned once.
#[derive(Clone)]
pub struct NewToken {
    pub token: Zeroizing<String>,
    pub record: TokenRecord,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken").field("token", &"<redacted>").field("record", &self.record).finish()
    }
}

fn random_token() -> Zeroizing<String> {
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::fill(&mut raw[..]);
    Zeroizing::new(format!("arca_{}", URL_SAFE_NO_PAD.encode(&raw[..])))
}

fn random_id() -> String {
    let mut raw = [0u8; 16];
    rand::fill(&mut raw);
    hex::encode(raw)
}

/// What a new token should be.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub policies: Vec<String>,
    pub ttl_secs: Option<u64>,
    pub display_name: String,
    pub entity: String,
    pub renewable: bool,
    pub parent: Option<String>,
    pub bound_cidrs: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// Checks address ranges (as given to tokens and AppRoles); returns them normalised.
pub fn validate_cidrs(cidrs: &[String]) -> Result<Vec<String>, ApiError> {
    if cidrs.len() > 32 {
        return Err(ApiError::invalid("at most 32 address ranges"));
    }
    cidrs
        .iter()
        .map(|c| policy::Cidr::parse(c.trim()).map(|c| c.to_string()).map_err(ApiError::invalid))
        .collect()
}

/// Checks identity metadata: at most 32 entries, short printable keys and values.
pub fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let printable = |s: &str| !s.chars().any(char::is_control);
    if meta.len() > 32
        || meta
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 512 || !printable(k) || !printable(v))
    {
        return Err(ApiError::invalid(
            "metadata: at most 32 entries, keys 1-64 and values up to 512 printable characters",
        ));
    }
    Ok(())
}

fn validate_policies(policies: &[String]) -> Result<(), ApiError> {
    if policies.len() > MAX_POLICIES {
        return Err(ApiError::invalid(format!("at most {MAX_POLICIES} policies")));
    }
    for name in policies {
        policy::validate_name(name).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    Ok(())
}

fn validate_ttl(ttl_secs: Option<u64>) -> Result<u64, ApiError> {
    match ttl_secs {
        None => Ok(DEFAULT_TTL_SECS),
        Some(0) => Err(ApiError::invalid("ttl must be positive")),
        Some(t) if t > MAX_TTL_SECS => {
            Err(ApiError::invalid(format!("ttl exceeds the maximum of {MAX_TTL_SECS} seconds")))
        }
        Some(t) => Ok(t),
    }
}

fn validate_display_name(name: &str) -> Result<(), ApiError> {
    if name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid("display name: at most 128 printable characters"));
    }
    Ok(())
}

/// Creates and stores a token (inside the caller's transaction).
pub(crate) fn mint(env: &mut Env<'_>, spec: TokenSpec) -> Result<NewToken, ApiError> {
    let ttl = validate_ttl(spec.ttl_secs)?;
    let token = random_token();
    let hash = credential_hash(&token);
    let now = env.now_unix_ms;
    let never_expires = spec.policies.iter().any(|p| p == "root") && spec.ttl_secs.is_none();
    let record = TokenRecord {
        hash: hex::encode(hash),
        accessor: random_id(),
        policies: spec.policies,
        entity: spec.entity,
        display_name: spec.display_name,
        created_unix_ms: now,
        expire_unix_ms: (!never_expires).then(|| now + ttl * 1000),
        max_expire_unix_ms: (!never_expires).then(|| now + MAX_TTL_SECS * 1000),
        ttl_secs: if never_expires { 0 } else { ttl },
        renewable: spec.renewable && !never_expires,
        parent: spec.parent,
        bound_cidrs: spec.bound_cidrs,
        meta: spec.meta,
        grants: Vec::new(),
    };
    env.put_json(&keys::token(&hash), &record)?;
    env.put_sealed(&keys::accessor(&record.accessor), record.hash.as_bytes())?;
    if let Some(parent) = &record.parent {
        env.tx.set(&keys::child(parent, &record.accessor), b"")?;
    }
    Ok(NewToken { token, record })
}

/// A machine login's token: entity `<method>:<role>`, no parent, renewable; the audit actor
/// becomes that token.
fn login(
    env: &mut Env<'_>,
    method: &str,
    role: &str,
    policies: &[String],
    ttl_secs: u64,
    bound_cidrs: &[String],
    meta: &BTreeMap<String, String>,
) -> Result<NewToken, ApiError> {
    let token = mint(
        env,
        TokenSpec {
            policies: policies.to_vec(),
            ttl_secs: Some(ttl_secs),
            display_name: format!("{method}-{role}"),
            entity: format!("{method}:{role}"),
            renewable: true,
            parent: None,
            bound_cidrs: bound_cidrs.to_vec(),
            meta: meta.clone(),
        },
    )?;
    env.actor.token_accessor = Some(token.record.accessor.clone());
    Ok(token)
}

/// Whose capabilities [`Node::token_capabilities`] reports.
pub enum CapabilitiesOf {
    /// The caller's token.
    Caller,
    /// Another token, by value.
    Token(Zeroizing<String>),
    /// Another token, by accessor.
    Accessor(String),
}

impl std::fmt::Debug for CapabilitiesOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CapabilitiesOf::Caller => "Caller",
            CapabilitiesOf::Token(_) => "Token(<redacted>)",
            CapabilitiesOf::Accessor(_) => "Accessor",
        })
    }
}

/// Most paths one capabilities request may ask about.
pub const MAX_CAPABILITY_PATHS: usize = 64;

pub(crate) fn record_by_accessor(env: &mut Env<'_>, accessor: &str) -> Result<Option<TokenRecord>, ApiError> {
    if accessor.len() > 64 {
        return Err(ApiError::invalid("accessor too long"));
    }
    let Some(hash_hex) = env.get_sealed(&keys::accessor(accessor))? else {
        return Ok(None);
    };
    let hash = hex::decode(&*hash_hex).map_err(|_| ApiError::Internal)?;
    env.get_json(&keys::token(&hash))
}

fn record_by_token(env: &mut Env<'_>, token: &str) -> Result<Option<TokenRecord>, ApiError> {
    if token.len() > 256 {
        return Ok(None);
    }
    let record: Option<TokenRecord> = env.get_json(&keys::token(&credential_hash(token)))?;
    Ok(record.filter(|r| !r.is_expired(env.now_unix_ms)))
}

/// Revokes a token and, recursively, every token it created.
fn revoke_tree(env: &mut Env<'_>, record: &TokenRecord) -> Result<usize, ApiError> {
    let mut revoked = 0;
    let mut pending = vec![record.clone()];
    while let Some(token) = pending.pop() {
        let (begin, end) = keys::children_range(&keys::children(&token.accessor));
        for kv in env.tx.get_range(&begin, &end, Default::default())? {
            let child = arca_store::tuple::unpack(&kv.key)
                .ok()
                .and_then(|t| t.last().and_then(|e| e.as_str().map(str::to_owned)))
                .ok_or(ApiError::Internal)?;
            if let Some(child_record) = record_by_accessor(env, &child)? {
                pending.push(child_record);
            }
        }
        env.tx.clear_range(&begin, &end)?;
        let hash = hex::decode(&token.hash).map_err(|_| ApiError::Internal)?;
        env.tx.clear(&keys::token(&hash))?;
        env.tx.clear(&keys::accessor(&token.accessor))?;
        if let Some(parent) = &token.parent {
            env.tx.clear(&keys::child(parent, &token.accessor))?;
        }
        revoked += 1;
    }
    Ok(revoked)
}

/// A token creation request.
#[derive(Debug, Clone, Default)]
pub struct CreateTokenRequest {
    pub policies: Vec<String>,
    pub ttl_secs: Option<u64>,
    pub display_name: String,
    pub renewable: bool,
    /// No parent: not revoked with its creator (needs `sudo` on `auth/token/create-orphan`).
    pub orphan: bool,
    pub bound_cidrs: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// An AppRole role as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppRole {
    pub name: String,
    pub role_id: String,
    pub policies: Vec<String>,
    pub token_ttl_secs: u64,
    pub secret_id_ttl_secs: u64,
    /// Addresses logins must come from (empty: anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_id_bound_cidrs: Vec<String>,
    /// Addresses the role's tokens may be used from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_bound_cidrs: Vec<String>,
    /// Identity metadata given to the role's tokens (policy conditions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SecretIdRecord {
    accessor: String,
    created_unix_ms: u64,
    expire_unix_ms: Option<u64>,
}

/// AppRole role settings to write.
#[derive(Debug, Clone, Default)]
pub struct WriteRoleRequest {
    pub name: String,
    pub policies: Vec<String>,
    pub token_ttl_secs: Option<u64>,
    /// 0: secret ids never expire.
    pub secret_id_ttl_secs: Option<u64>,
    pub secret_id_bound_cidrs: Vec<String>,
    pub token_bound_cidrs: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// An issued secret id, returned once.
pub struct NewSecretId {
    pub secret_id: Zeroizing<String>,
    pub accessor: String,
    pub expire_unix_ms: Option<u64>,
}

impl std::fmt::Debug for NewSecretId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecretId")
            .field("secret_id", &"<redacted>")
            .field("accessor", &self.accessor)
            .finish()
    }
}

fn validate_role_name(name: &str) -> Result<(), ApiError> {
    policy::validate_name(name)
        .map_err(|_| ApiError::invalid("role name: 1 to 128 characters from a-z, 0-9, '-', '_', '.'"))
}

impl Node {
    pub async fn token_create(
        self: &Arc<Self>,
        ctx: RequestContext,
        req: CreateTokenRequest,
    ) -> Audited<NewToken> {
        self.execute(ctx, Operation::TokenCreate, "auth/token/create".into(), move |env| {
            validate_policies(&req.policies)?;
            validate_display_name(&req.display_name)?;
            validate_ttl(req.ttl_secs)?;
            let bound_cidrs = validate_cidrs(&req.bound_cidrs)?;
            validate_meta(&req.meta)?;
            let parent = env.authorize("auth/token/create", &[Capability::Create, Capability::Update])?;
            let parent_is_root = parent.policies.iter().any(|p| p == "root");
            if req.orphan && !env.allowed(&parent, "auth/token/create-orphan", &[Capability::Sudo])? {
                return Err(ApiError::PermissionDenied);
            }
            let policies =
                if req.policies.is_empty() { parent.policies.clone() } else { req.policies.clone() };
            if !parent_is_root && policies.iter().any(|p| !parent.policies.contains(p)) {
                // A child token gets at most its parent's policies.
                return Err(ApiError::PermissionDenied);
            }
            let display =
                if req.display_name.is_empty() { "token".to_owned() } else { req.display_name.clone() };
            mint(
                env,
                TokenSpec {
                    policies,
                    ttl_secs: Some(req.ttl_secs.unwrap_or(DEFAULT_TTL_SECS)),
                    entity: format!("token:{display}"),
                    display_name: display,
                    renewable: req.renewable,
                    parent: (!req.orphan).then(|| parent.accessor.clone()),
                    bound_cidrs: bound_cidrs.clone(),
                    meta: req.meta.clone(),
                },
            )
        })
        .await
    }

    /// Looks up the caller's own token, or (with `update` on `auth/token/lookup-accessor`)
    /// another token by accessor.
    pub async fn token_lookup(
        self: &Arc<Self>,
        ctx: RequestContext,
        accessor: Option<String>,
    ) -> Audited<TokenRecord> {
        let path = if accessor.is_some() { "auth/token/lookup-accessor" } else { "auth/token/lookup-self" };
        self.execute(ctx, Operation::TokenLookup, path.into(), move |env| match &accessor {
            None => env.authenticate().map(Arc::unwrap_or_clone),
            Some(accessor) => {
                env.authorize("auth/token/lookup-accessor", &[Capability::Update])?;
                record_by_accessor(env, accessor)?
                    .ok_or_else(|| ApiError::NotFound("no token with that accessor".into()))
            }
        })
        .await
    }

    /// Looks up another token by its value (with `update` on `auth/token/lookup`).
    pub async fn token_lookup_by_token(
        self: &Arc<Self>,
        ctx: RequestContext,
        token: Zeroizing<String>,
    ) -> Audited<TokenRecord> {
        self.execute(ctx, Operation::TokenLookup, "auth/token/lookup".into(), move |env| {
            env.authorize("auth/token/lookup", &[Capability::Update, Capability::Read])?;
            record_by_token(env, &token)?.ok_or_else(|| ApiError::NotFound("no such token".into()))
        })
        .await
    }

    /// Revokes another token by its value (with `update` on `auth/token/revoke`), and its children.
    pub async fn token_revoke_by_token(
        self: &Arc<Self>,
        ctx: RequestContext,
        token: Zeroizing<String>,
    ) -> Audited<usize> {
        self.execute(ctx, Operation::TokenRevoke, "auth/token/revoke".into(), move |env| {
            env.authorize("auth/token/revoke", &[Capability::Update])?;
            match record_by_token(env, &token)? {
                Some(record) => revoke_tree(env, &record),
                // Vault answers 204 for an unknown token too.
                None => Ok(0),
            }
        })
        .await
    }

    /// A token's capabilities on each of `paths`, as Vault's `sys/capabilities*` report them:
    /// `["root"]` for a root token, `["deny"]` for none. The caller's own token needs nothing
    /// more; another's, `update` on `sys/capabilities` (by value) or
    /// `sys/capabilities-accessor`. Policy conditions are evaluated against this request.
    pub async fn token_capabilities(
        self: &Arc<Self>,
        ctx: RequestContext,
        of: CapabilitiesOf,
        paths: Vec<String>,
    ) -> Audited<Vec<(String, Vec<String>)>> {
        let audit_path = match of {
            CapabilitiesOf::Caller => "sys/capabilities-self",
            CapabilitiesOf::Token(_) => "sys/capabilities",
            CapabilitiesOf::Accessor(_) => "sys/capabilities-accessor",
        };
        self.execute(ctx, Operation::TokenCapabilities, audit_path.into(), move |env| {
            if paths.is_empty() || paths.len() > MAX_CAPABILITY_PATHS {
                return Err(ApiError::invalid(format!("paths: 1 to {MAX_CAPABILITY_PATHS}")));
            }
            if paths.iter().any(|p| p.len() > 1024 || p.chars().any(char::is_control)) {
                return Err(ApiError::invalid("paths: at most 1024 bytes each, no control characters"));
            }
            let record = match &of {
                CapabilitiesOf::Caller => env.authenticate()?,
                CapabilitiesOf::Token(token) => {
                    env.authorize(audit_path, &[Capability::Update])?;
                    Arc::new(
                        record_by_token(env, token)?
                            .ok_or_else(|| ApiError::NotFound("no such token".into()))?,
                    )
                }
                CapabilitiesOf::Accessor(accessor) => {
                    env.authorize(audit_path, &[Capability::Update])?;
                    Arc::new(
                        record_by_accessor(env, accessor)?
                            .ok_or_else(|| ApiError::NotFound("no token with that accessor".into()))?,
                    )
                }
            };
            let root = record.policies.iter().any(|p| p == "root");
            let mut out = Vec::with_capacity(paths.len());
            for path in &paths {
                let path = path.trim_start_matches('/');
                let names: Vec<String> = if root {
                    vec!["root".into()]
                } else {
                    let caps = env.decide(&record, path)?.capabilities;
                    if caps.is_empty() {
                        vec!["deny".into()]
                    } else {
                        // Sorted by name, as Vault lists them.
                        let mut names: Vec<String> = caps.iter().map(|c| c.name().to_owned()).collect();
                        names.sort();
                        names
                    }
                };
                out.push((path.to_owned(), names));
            }
            Ok(out)
        })
        .await
    }

    /// Renews the caller's own token by `increment_secs` (default: its TTL), up to its maximum.
    pub async fn token_renew(
        self: &Arc<Self>,
        ctx: RequestContext,
        increment_secs: Option<u64>,
    ) -> Audited<TokenRecord> {
        self.execute(ctx, Operation::TokenRenew, "auth/token/renew-self".into(), move |env| {
            let mut record = Arc::unwrap_or_clone(env.authenticate()?);
            if !record.renewable {
                return Err(ApiError::FailedPrecondition("this token is not renewable".into()));
            }
            let increment = validate_ttl(increment_secs.or(Some(record.ttl_secs)))?;
            let wanted = env.now_unix_ms + increment * 1000;
            record.expire_unix_ms = Some(record.max_expire_unix_ms.map_or(wanted, |max| wanted.min(max)));
            let hash = hex::decode(&record.hash).map_err(|_| ApiError::Internal)?;
            env.put_json(&keys::token(&hash), &record)?;
            Ok(record)
        })
        .await
    }

    /// Revokes the caller's own token, or another by accessor (with `update` on
    /// `auth/token/revoke-accessor`), and every token descended from it.
    pub async fn token_revoke(
        self: &Arc<Self>,
        ctx: RequestContext,
        accessor: Option<String>,
    ) -> Audited<usize> {
        let path = if accessor.is_some() { "auth/token/revoke-accessor" } else { "auth/token/revoke-self" };
        self.execute(ctx, Operation::TokenRevoke, path.into(), move |env| {
            let target = match &accessor {
                None => Arc::unwrap_or_clone(env.authenticate()?),
                Some(accessor) => {
                    env.authorize("auth/token/revoke-accessor", &[Capability::Update])?;
                    record_by_accessor(env, accessor)?
                        .ok_or_else(|| ApiError::NotFound("no token with that accessor".into()))?
                }
            };
            revoke_tree(env, &target)
        })
        .await
    }

    pub async fn approle_write(
        self: &Arc<Self>,
        ctx: RequestContext,
        req: WriteRoleRequest,
    ) -> Audited<AppRole> {
        let path = format!("auth/approle/role/{}", req.name);
        self.execute(ctx, Operation::AppRoleWrite, path.clone(), move |env| {
            validate_role_name(&req.name)?;
            validate_policies(&req.policies)?;
            let token_ttl = validate_ttl(req.token_ttl_secs)?;
            let secret_id_ttl = match req.secret_id_ttl_secs {
                None => 0,
                Some(t) if t > MAX_TTL_SECS * 12 => return Err(ApiError::invalid("secret id ttl too long")),
                Some(t) => t,
            };
            let secret_id_bound_cidrs = validate_cidrs(&req.secret_id_bound_cidrs)?;
            let token_bound_cidrs = validate_cidrs(&req.token_bound_cidrs)?;
            validate_meta(&req.metadata)?;
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            let existing: Option<AppRole> = env.get_json(&keys::approle(&req.name))?;
            let role_id = existing.map_or_else(random_id, |r| r.role_id);
            let role = AppRole {
                name: req.name.clone(),
                role_id,
                policies: req.policies.clone(),
                token_ttl_secs: token_ttl,
                secret_id_ttl_secs: secret_id_ttl,
                secret_id_bound_cidrs: secret_id_bound_cidrs.clone(),
                token_bound_cidrs: token_bound_cidrs.clone(),
                metadata: req.metadata.clone(),
            };
            env.put_json(&keys::approle(&role.name), &role)?;
            env.put_sealed(&keys::approle_id(&credential_hash(&role.role_id)), role.name.as_bytes())?;
            Ok(role)
        })
        .await
    }

    pub async fn approle_read(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<AppRole> {
        let path = format!("auth/approle/role/{name}");
        self.execute(ctx, Operation::AppRoleRead, path.clone(), move |env| {
            validate_role_name(&name)?;
            env.authorize(&path, &[Capability::Read])?;
            env.get_json(&keys::approle(&name))?.ok_or_else(|| ApiError::NotFound("no such role".into()))
        })
        .await
    }

    pub async fn approle_delete(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<()> {
        let path = format!("auth/approle/role/{name}");
        self.execute(ctx, Operation::AppRoleDelete, path.clone(), move |env| {
            validate_role_name(&name)?;
            env.authorize(&path, &[Capability::Delete])?;
            let role: AppRole = env
                .get_json(&keys::approle(&name))?
                .ok_or_else(|| ApiError::NotFound("no such role".into()))?;
            env.tx.clear(&keys::approle(&name))?;
            env.tx.clear(&keys::approle_id(&credential_hash(&role.role_id)))?;
            let (begin, end) = keys::children_range(&keys::secret_ids(&name));
            env.tx.clear_range(&begin, &end)?;
            Ok(())
        })
        .await
    }

    pub async fn approle_list(self: &Arc<Self>, ctx: RequestContext) -> Audited<Vec<String>> {
        self.execute(ctx, Operation::AppRoleList, "auth/approle/role".into(), move |env| {
            env.authorize("auth/approle/role", &[Capability::List])?;
            env.names_under(&keys::approles())
        })
        .await
    }

    /// Issues a secret id for a role.
    pub async fn approle_secret_id(
        self: &Arc<Self>,
        ctx: RequestContext,
        name: String,
    ) -> Audited<NewSecretId> {
        let path = format!("auth/approle/role/{name}/secret-id");
        self.execute(ctx, Operation::AppRoleSecretId, path.clone(), move |env| {
            validate_role_name(&name)?;
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            let role: AppRole = env
                .get_json(&keys::approle(&name))?
                .ok_or_else(|| ApiError::NotFound("no such role".into()))?;
            let secret_id = random_token();
            let record = SecretIdRecord {
                accessor: random_id(),
                created_unix_ms: env.now_unix_ms,
                expire_unix_ms: (role.secret_id_ttl_secs > 0)
                    .then(|| env.now_unix_ms + role.secret_id_ttl_secs * 1000),
            };
            env.put_json(&keys::secret_id(&name, &credential_hash(&secret_id)), &record)?;
            Ok(NewSecretId { secret_id, accessor: record.accessor, expire_unix_ms: record.expire_unix_ms })
        })
        .await
    }

    /// Exchanges a role id and secret id for a token. Wrong credentials are a denial.
    pub async fn approle_login(
        self: &Arc<Self>,
        ctx: RequestContext,
        role_id: Zeroizing<String>,
        secret_id: Zeroizing<String>,
    ) -> Audited<NewToken> {
        self.execute(ctx, Operation::AppRoleLogin, "auth/approle/login".into(), move |env| {
            if env.node.barrier.is_sealed() {
                return Err(ApiError::Sealed);
            }
            if role_id.len() > 256 || secret_id.len() > 256 {
                return Err(ApiError::Unauthenticated);
            }
            let name = env
                .get_sealed(&keys::approle_id(&credential_hash(&role_id)))?
                .ok_or(ApiError::Unauthenticated)?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| ApiError::Internal)?;
            env.actor = Actor { entity: format!("approle:{name}"), token_accessor: None };
            let role: AppRole = env.get_json(&keys::approle(&name))?.ok_or(ApiError::Unauthenticated)?;
            let secret_key = keys::secret_id(&name, &credential_hash(&secret_id));
            let record: SecretIdRecord = env.get_json(&secret_key)?.ok_or(ApiError::Unauthenticated)?;
            if record.expire_unix_ms.is_some_and(|e| env.now_unix_ms >= e) {
                return Err(ApiError::Unauthenticated);
            }
            let cidrs: Vec<policy::Cidr> =
                role.secret_id_bound_cidrs.iter().filter_map(|c| policy::Cidr::parse(c).ok()).collect();
            if !policy::in_any(&cidrs, env.source_ip) {
                env.denied_by = Some(format!("approle {name}: secret_id_bound_cidrs"));
                return Err(ApiError::PermissionDenied);
            }
            login(
                env,
                "approle",
                &name,
                &role.policies,
                role.token_ttl_secs,
                &role.token_bound_cidrs,
                &role.metadata,
            )
        })
        .await
    }

    /// Reads a role's role id.
    pub async fn approle_role_id(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<String> {
        let path = format!("auth/approle/role/{name}/role-id");
        self.execute(ctx, Operation::AppRoleRead, path.clone(), move |env| {
            validate_role_name(&name)?;
            env.authorize(&path, &[Capability::Read])?;
            let role: AppRole = env
                .get_json(&keys::approle(&name))?
                .ok_or_else(|| ApiError::NotFound("no such role".into()))?;
            Ok(role.role_id)
        })
        .await
    }
}

/// A certificate role: a client certificate (pinned by its SHA-256 fingerprint) that may log
/// in over mutual TLS and receive a token with the role's policies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRole {
    pub name: String,
    /// Hex SHA-256 of the certificate's DER encoding.
    pub certificate_sha256: String,
    pub policies: Vec<String>,
    pub token_ttl_secs: u64,
}

/// The DER bytes of the first certificate in a PEM text.
pub fn pem_certificate_der(pem: &str) -> Result<Vec<u8>, ApiError> {
    use base64::engine::general_purpose::STANDARD;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let bad = || ApiError::invalid("certificate: expected a PEM certificate");
    if pem.len() > 64 * 1024 {
        return Err(ApiError::invalid("certificate: larger than 64 KiB"));
    }
    let start = pem.find(BEGIN).ok_or_else(bad)? + BEGIN.len();
    let end = pem[start..].find(END).ok_or_else(bad)? + start;
    let body: String = pem[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    let der = STANDARD.decode(body).map_err(|_| bad())?;
    // A DER certificate is a SEQUENCE.
    if der.first() != Some(&0x30) {
        return Err(bad());
    }
    Ok(der)
}

/// A certificate role to write.
#[derive(Debug, Clone, Default)]
pub struct WriteCertRoleRequest {
    pub name: String,
    pub certificate_pem: String,
    pub policies: Vec<String>,
    pub token_ttl_secs: Option<u64>,
}

impl Node {
    pub async fn cert_role_write(
        self: &Arc<Self>,
        ctx: RequestContext,
        req: WriteCertRoleRequest,
    ) -> Audited<CertRole> {
        let path = format!("auth/cert/role/{}", req.name);
        self.execute(ctx, Operation::CertRoleWrite, path.clone(), move |env| {
            validate_role_name(&req.name)?;
            validate_policies(&req.policies)?;
            let ttl = validate_ttl(req.token_ttl_secs)?;
            let fingerprint = credential_hash_bytes(&pem_certificate_der(&req.certificate_pem)?);
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            if let Some(old) = env.get_json::<CertRole>(&keys::cert_role(&req.name))? {
                let old_fp = hex::decode(&old.certificate_sha256).map_err(|_| ApiError::Internal)?;
                env.tx.clear(&keys::cert_fingerprint(&old_fp))?;
            }
            let role = CertRole {
                name: req.name.clone(),
                certificate_sha256: hex::encode(fingerprint),
                policies: req.policies.clone(),
                token_ttl_secs: ttl,
            };
            env.put_json(&keys::cert_role(&role.name), &role)?;
            env.put_sealed(&keys::cert_fingerprint(&fingerprint), role.name.as_bytes())?;
            Ok(role)
        })
        .await
    }

    pub async fn cert_role_read(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<CertRole> {
        let path = format!("auth/cert/role/{name}");
        self.execute(ctx, Operation::CertRoleRead, path.clone(), move |env| {
            validate_role_name(&name)?;
            env.authorize(&path, &[Capability::Read])?;
            env.get_json(&keys::cert_role(&name))?
                .ok_or_else(|| ApiError::NotFound("no such certificate role".into()))
        })
        .await
    }

    pub async fn cert_role_delete(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<()> {
        let path = format!("auth/cert/role/{name}");
        self.execute(ctx, Operation::CertRoleDelete, path.clone(), move |env| {
            validate_role_name(&name)?;
            env.authorize(&path, &[Capability::Delete])?;
            let role: CertRole = env
                .get_json(&keys::cert_role(&name))?
                .ok_or_else(|| ApiError::NotFound("no such certificate role".into()))?;
            let fp = hex::decode(&role.certificate_sha256).map_err(|_| ApiError::Internal)?;
            env.tx.clear(&keys::cert_fingerprint(&fp))?;
            env.tx.clear(&keys::cert_role(&name))?;
            Ok(())
        })
        .await
    }

    /// Logs in with the client certificate the TLS layer verified (`peer_certificate_der`:
    /// the leaf, DER). No certificate, or one no role pins, is a denial.
    pub async fn cert_login(
        self: &Arc<Self>,
        ctx: RequestContext,
        peer_certificate_der: Option<Vec<u8>>,
    ) -> Audited<NewToken> {
        self.execute(ctx, Operation::CertLogin, "auth/cert/login".into(), move |env| {
            if env.node.barrier.is_sealed() {
                return Err(ApiError::Sealed);
            }
            let der = peer_certificate_der.as_ref().ok_or(ApiError::Unauthenticated)?;
            let fingerprint = credential_hash_bytes(der);
            let name =
                env.get_sealed(&keys::cert_fingerprint(&fingerprint))?.ok_or(ApiError::Unauthenticated)?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| ApiError::Internal)?;
            env.actor = Actor { entity: format!("cert:{name}"), token_accessor: None };
            let role: CertRole = env.get_json(&keys::cert_role(&name))?.ok_or(ApiError::Unauthenticated)?;
            login(env, "cert", &name, &role.policies, role.token_ttl_secs, &[], &BTreeMap::new())
        })
        .await
    }
}

fn credential_hash_bytes(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}
