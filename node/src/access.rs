//! Just-in-time access: a token asks for a policy for a while, with a reason; another
//! identity approves; the token holds the policy until the grant's TTL ends.
//!
//! - `request` needs `create` on `sys/access/request/<policy>`; `approve` needs `update` on
//!   `sys/access/approve/<policy>` and another identity than the requester's; `list` needs
//!   `list` on `sys/access/grants`. The `root` policy cannot be requested.
//! - An approved grant is written onto the requester's token record (so authorization
//!   reads nothing more: it adds the policies of the record's unexpired grants) and indexed
//!   under `("access","active",accessor,id)` for the expiry sweep. The expiry is checked on every request, so access ends on
//!   time even if the sweep is late; the lifecycle scheduler's sweep then records the expiry
//!   (`access.expire`, audited) and drops the index entry.
//! - Requests, approvals and expiries are audited events; every request made with a grant is
//!   audited as usual under the requester's identity.

use std::sync::Arc;

use arca_audit::Operation;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::keys;
use crate::node::{Audited, Env, Node, RequestContext};
use crate::policy::{self, Capability};

/// Longest grant.
pub const MAX_GRANT_TTL_SECS: u64 = 24 * 3600;
/// A pending request older than this can no longer be approved.
pub const REQUEST_VALID_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    Pending,
    Approved,
    Expired,
}

impl GrantState {
    pub fn name(self) -> &'static str {
        match self {
            GrantState::Pending => "pending",
            GrantState::Approved => "approved",
            GrantState::Expired => "expired",
        }
    }
}

/// One request for a policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub policy: String,
    pub reason: String,
    pub ttl_secs: u64,
    pub state: GrantState,
    pub requester_entity: String,
    pub requester_accessor: String,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver_entity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

fn grant_id() -> String {
    let mut raw = [0u8; 8];
    rand::fill(&mut raw);
    hex::encode(raw)
}

fn load(env: &mut Env<'_>, id: &str) -> Result<Grant, ApiError> {
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::invalid("a grant id is 16 hex digits"));
    }
    env.get_json(&keys::access_grant(id))?.ok_or_else(|| ApiError::NotFound("no such access request".into()))
}

/// The policies a token holds through unexpired grants.
pub(crate) fn granted_policies(record: &crate::auth::TokenRecord, now_unix_ms: u64) -> Vec<String> {
    record.grants.iter().filter(|g| g.expires_unix_ms > now_unix_ms).map(|g| g.policy.clone()).collect()
}

/// Writes a token record back (after its grants changed).
fn save_record(env: &mut Env<'_>, record: &crate::auth::TokenRecord) -> Result<(), ApiError> {
    let hash = hex::decode(&record.hash).map_err(|_| ApiError::Internal)?;
    env.put_json(&keys::token(&hash), record)
}

/// The index entry of an approved grant (not secret: names a policy and a time).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Active {
    id: String,
    policy: String,
    expires_unix_ms: u64,
}

impl Node {
    /// Asks for `policy` for `ttl_secs`, with a reason. The grant starts pending.
    pub async fn access_request(
        self: &Arc<Self>,
        ctx: RequestContext,
        policy: String,
        ttl_secs: u64,
        reason: String,
    ) -> Audited<Grant> {
        let path = format!("sys/access/request/{policy}");
        self.execute(ctx, Operation::AccessRequest, path.clone(), move |env| {
            policy::validate_name(&policy).map_err(|e| ApiError::invalid(e.to_string()))?;
            if policy == "root" {
                return Err(ApiError::invalid("the root policy cannot be requested"));
            }
            if !(1..=MAX_GRANT_TTL_SECS).contains(&ttl_secs) {
                return Err(ApiError::invalid(format!("ttl: 1 second to {MAX_GRANT_TTL_SECS} seconds")));
            }
            let reason = reason.trim().to_owned();
            if reason.is_empty() || reason.len() > 1024 || reason.chars().any(char::is_control) {
                return Err(ApiError::invalid("reason: 1 to 1024 printable characters"));
            }
            let record = env.authorize(&path, &[Capability::Create])?;
            if env.tx.get(&keys::policy(&policy))?.is_none() {
                return Err(ApiError::NotFound(format!("no policy named {policy}")));
            }
            let grant = Grant {
                id: grant_id(),
                policy: policy.clone(),
                reason,
                ttl_secs,
                state: GrantState::Pending,
                requester_entity: record.entity.clone(),
                requester_accessor: record.accessor.clone(),
                created_unix_ms: env.now_unix_ms,
                approver_entity: None,
                approved_unix_ms: None,
                expires_unix_ms: None,
            };
            env.put_json(&keys::access_grant(&grant.id), &grant)?;
            Ok(grant)
        })
        .await
    }

    /// Approves a pending grant: the requester's token holds the policy for the grant's TTL.
    pub async fn access_approve(self: &Arc<Self>, ctx: RequestContext, id: String) -> Audited<Grant> {
        self.execute(ctx, Operation::AccessApprove, format!("sys/access/approve/{id}"), move |env| {
            let mut grant = load(env, &id)?;
            let record =
                env.authorize(&format!("sys/access/approve/{}", grant.policy), &[Capability::Update])?;
            if record.accessor == grant.requester_accessor || record.entity == grant.requester_entity {
                return Err(ApiError::FailedPrecondition(
                    "a request cannot be approved by its requester".into(),
                ));
            }
            if grant.state != GrantState::Pending {
                return Err(ApiError::FailedPrecondition(format!("this request is {}", grant.state.name())));
            }
            let now = env.now_unix_ms;
            if now > grant.created_unix_ms + REQUEST_VALID_MS {
                return Err(ApiError::FailedPrecondition("this request is too old to approve".into()));
            }
            let expires = now + grant.ttl_secs * 1000;
            grant.state = GrantState::Approved;
            grant.approver_entity = Some(record.entity.clone());
            grant.approved_unix_ms = Some(now);
            grant.expires_unix_ms = Some(expires);
            env.put_json(&keys::access_grant(&grant.id), &grant)?;
            let mut requester =
                crate::auth::record_by_accessor(env, &grant.requester_accessor)?.ok_or_else(|| {
                    ApiError::FailedPrecondition("the requesting token no longer exists".into())
                })?;
            requester.grants.retain(|g| g.expires_unix_ms > now);
            requester.grants.push(crate::auth::TokenGrant {
                id: grant.id.clone(),
                policy: grant.policy.clone(),
                expires_unix_ms: expires,
            });
            save_record(env, &requester)?;
            let active =
                Active { id: grant.id.clone(), policy: grant.policy.clone(), expires_unix_ms: expires };
            env.tx.set(
                &keys::access_active(&grant.requester_accessor, &grant.id),
                &serde_json::to_vec(&active).map_err(|_| ApiError::Internal)?,
            )?;
            Ok(grant)
        })
        .await
    }

    /// Every grant, newest first (at most 1000).
    pub async fn access_list(self: &Arc<Self>, ctx: RequestContext) -> Audited<Vec<Grant>> {
        self.execute(ctx, Operation::AccessList, "sys/access/grants".into(), move |env| {
            env.authorize("sys/access/grants", &[Capability::List, Capability::Read])?;
            let prefix = keys::access_grant_prefix();
            let end = arca_store::prefix_end(&prefix).ok_or(ApiError::Internal)?;
            let mut grants = Vec::new();
            for kv in env.tx.get_range(&prefix, &end, arca_store::RangeOptions::limit(1000))? {
                if let Some(grant) = env.get_json::<Grant>(&kv.key)? {
                    grants.push(grant);
                }
            }
            grants.sort_by_key(|g| std::cmp::Reverse(g.created_unix_ms));
            Ok(grants)
        })
        .await
    }

    /// Records the expiry of every approved grant whose TTL has ended (the scheduler's sweep).
    pub(crate) async fn access_expire_sweep(self: &Arc<Self>) -> Result<usize, ApiError> {
        use arca_store::StoreExt as _;
        let prefix = keys::access_active_all();
        let end = arca_store::prefix_end(&prefix).ok_or(ApiError::Internal)?;
        let now = self.now();
        let rows = self
            .store
            .transact(|tx| -> Result<_, ApiError> {
                Ok(tx.get_range(&prefix, &end, arca_store::RangeOptions::default())?)
            })?
            .value;
        let mut expired = 0;
        for row in rows {
            let Ok(active) = serde_json::from_slice::<Active>(&row.value) else { continue };
            if active.expires_unix_ms > now {
                continue;
            }
            let key = row.key.clone();
            let id = active.id.clone();
            let audited = self
                .execute_system(Operation::AccessExpire, format!("sys/access/grant/{id}"), move |env| {
                    env.actor.entity = "system:access".into();
                    if env.tx.get(&key)?.is_none() {
                        return Ok(false);
                    }
                    env.tx.clear(&key)?;
                    let mut grant = load(env, &id)?;
                    if let Some(mut requester) =
                        crate::auth::record_by_accessor(env, &grant.requester_accessor)?
                    {
                        requester.grants.retain(|g| g.id != id);
                        save_record(env, &requester)?;
                    }
                    grant.state = GrantState::Expired;
                    env.put_json(&keys::access_grant(&id), &grant)?;
                    Ok(true)
                })
                .await;
            if audited.result? {
                expired += 1;
            }
        }
        Ok(expired)
    }
}
