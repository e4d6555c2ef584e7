//! Response wrapping, as Vault's: a response stored, sealed, under a single-use wrapping
//! token with a TTL, instead of being returned. Whoever holds the token unwraps it once
//! (`sys/wrapping/unwrap`); an intercepted token shows up as an unwrap that already happened.
//!
//! The wrapping token is stored hashed, like every token; the response is stored through the
//! barrier. Wrapping is audited (`wrapping.wrap`, under the wrapped request's id and path),
//! each unwrap and lookup too, and the scheduler drops unread responses at the end of their
//! TTL (`wrapping.expire`).

use std::sync::Arc;

use arca_audit::Operation;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use crate::error::ApiError;
use crate::keys;
use crate::node::{Audited, Env, Node, RequestContext, credential_hash};

/// Longest wrap TTL: 7 days.
pub const MAX_WRAP_TTL_SECS: u64 = 7 * 86_400;
/// Largest response wrapped, in bytes of JSON.
pub const MAX_WRAPPED_BYTES: usize = 1 << 20;
/// Wrapping tokens start with this (regular tokens with `arca_`).
pub const WRAP_TOKEN_PREFIX: &str = "arcaw_";

/// A wrap TTL as a caller sends it (`header` names where: Vault's `X-Vault-Wrap-TTL`, or the
/// gRPC API's `x-arca-wrap-ttl`): a duration of 1 s to 7 days, else the message refusing it.
/// Checked before the wrapped request runs, so a refused wrap changes nothing.
pub(crate) fn wrap_ttl(header: &str, value: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(value)
        .ok()
        .and_then(crate::vault::parse_duration)
        .filter(|ttl| (1..=MAX_WRAP_TTL_SECS).contains(ttl))
        .ok_or_else(|| format!("{header}: a duration from 1s to 7d, such as 60, 60s, 5m or 1h"))
}

/// A wrapped response as stored (sealed).
#[derive(Serialize, Deserialize)]
struct WrapRecord {
    accessor: String,
    creation_path: String,
    created_unix_ms: u64,
    ttl_secs: u64,
    /// The response body (JSON), as the wrapped request would have returned it.
    response: String,
}

impl Drop for WrapRecord {
    fn drop(&mut self) {
        self.response.zeroize();
    }
}

/// A wrapping token and what it wraps.
pub struct WrapInfo {
    /// The token, only when the response was just wrapped.
    pub token: Option<Zeroizing<String>>,
    pub accessor: String,
    pub ttl_secs: u64,
    pub created_unix_ms: u64,
    pub creation_path: String,
}

impl std::fmt::Debug for WrapInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrapInfo")
            .field("accessor", &self.accessor)
            .field("ttl_secs", &self.ttl_secs)
            .field("creation_path", &self.creation_path)
            .finish_non_exhaustive()
    }
}

fn info(record: &WrapRecord, token: Option<Zeroizing<String>>) -> WrapInfo {
    WrapInfo {
        token,
        accessor: record.accessor.clone(),
        ttl_secs: record.ttl_secs,
        created_unix_ms: record.created_unix_ms,
        creation_path: record.creation_path.clone(),
    }
}

/// The record a wrapping token names, if it exists and has not expired. An expired one is
/// left for the sweep: a request that fails changes nothing ([`crate::pending`]).
fn live(env: &mut Env<'_>, token: &str) -> Result<Option<([u8; 32], WrapRecord)>, ApiError> {
    if !token.starts_with(WRAP_TOKEN_PREFIX) || token.len() > 128 {
        return Ok(None);
    }
    let hash = credential_hash(token);
    let Some(record) = env.get_json::<WrapRecord>(&keys::wrap(&hash))? else { return Ok(None) };
    if record.created_unix_ms.saturating_add(record.ttl_secs * 1000) <= env.now_unix_ms {
        return Ok(None);
    }
    Ok(Some((hash, record)))
}

fn invalid_token() -> ApiError {
    ApiError::invalid("wrapping token is not valid or does not exist")
}

impl Node {
    /// Wraps `response` (the JSON body of a request that succeeded, at `creation_path`) for
    /// `ttl_secs`: audited as `wrapping.wrap` at `creation_path` under the context's request
    /// id, so the wrap and the request it wraps share one.
    /// With `authenticated`, the caller must hold a valid token (`sys/wrapping/wrap`, which
    /// wraps what the caller sends).
    pub async fn wrap(
        self: &Arc<Self>,
        ctx: RequestContext,
        creation_path: String,
        response: Zeroizing<String>,
        ttl_secs: u64,
        authenticated: bool,
    ) -> Audited<WrapInfo> {
        self.execute(ctx, Operation::WrapCreate, creation_path.clone(), move |env| {
            if authenticated {
                env.authenticate()?;
            }
            if ttl_secs == 0 || ttl_secs > MAX_WRAP_TTL_SECS {
                return Err(ApiError::invalid(format!("wrap TTL: 1 s to {MAX_WRAP_TTL_SECS} s")));
            }
            if response.len() > MAX_WRAPPED_BYTES {
                return Err(ApiError::invalid(format!(
                    "a wrapped response holds at most {MAX_WRAPPED_BYTES} bytes"
                )));
            }
            // The caller's identity, when it has one (a login's response may be wrapped too).
            env.identify()?;
            let mut raw = Zeroizing::new([0u8; 32]);
            rand::fill(&mut raw[..]);
            let token = Zeroizing::new(format!("{WRAP_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw[..])));
            let mut id = [0u8; 12];
            rand::fill(&mut id[..]);
            let record = WrapRecord {
                accessor: hex::encode(id),
                creation_path: creation_path.clone(),
                created_unix_ms: env.now_unix_ms,
                ttl_secs,
                response: response.to_string(),
            };
            let hash = credential_hash(&token);
            env.put_json(&keys::wrap(&hash), &record)?;
            let expires = record.created_unix_ms.saturating_add(ttl_secs * 1000);
            env.tx.set(&keys::wrap_expiry(expires, &hash), &[])?;
            Ok(info(&record, Some(token)))
        })
        .await
    }

    /// Unwraps: returns the wrapped response once, and removes it. Possession of the wrapping
    /// token is what counts; a regular token the caller also presents names it in the event.
    pub async fn unwrap(
        self: &Arc<Self>,
        ctx: RequestContext,
        token: Zeroizing<String>,
    ) -> Audited<Zeroizing<String>> {
        self.execute(ctx, Operation::WrapUnwrap, "sys/wrapping/unwrap".into(), move |env| {
            env.identify()?;
            let (hash, record) = live(env, &token)?.ok_or_else(invalid_token)?;
            env.tx.clear(&keys::wrap(&hash))?;
            let expires = record.created_unix_ms.saturating_add(record.ttl_secs * 1000);
            env.tx.clear(&keys::wrap_expiry(expires, &hash))?;
            Ok(Zeroizing::new(record.response.clone()))
        })
        .await
    }

    /// What a wrapping token wraps (path, TTL, creation time), without unwrapping it.
    pub async fn wrap_lookup(
        self: &Arc<Self>,
        ctx: RequestContext,
        token: Zeroizing<String>,
    ) -> Audited<WrapInfo> {
        self.execute(ctx, Operation::WrapLookup, "sys/wrapping/lookup".into(), move |env| {
            env.identify()?;
            let (_, record) = live(env, &token)?.ok_or_else(invalid_token)?;
            Ok(info(&record, None))
        })
        .await
    }

    /// Drops every wrapped response whose TTL has ended, unread (the scheduler's sweep).
    pub async fn wrap_expire_sweep(self: &Arc<Self>) -> Result<usize, ApiError> {
        use arca_store::StoreExt as _;
        let begin = keys::wrap_expiry_all();
        let end = keys::wrap_expiry(self.now(), &[]);
        let rows = self
            .store
            .transact(|tx| -> Result<_, ApiError> {
                Ok(tx.get_range(&begin, &end, arca_store::RangeOptions::limit(1000))?)
            })?
            .value;
        let mut expired = 0;
        for row in rows {
            let Ok(parts) = arca_store::tuple::unpack(&row.key) else { continue };
            let Some(hash) = parts.last().and_then(|e| match e {
                arca_store::tuple::Element::Bytes(b) => Some(b.clone()),
                _ => None,
            }) else {
                continue;
            };
            let index = row.key.clone();
            let audited = self
                .execute_system(Operation::WrapExpire, "sys/wrapping/expire".into(), move |env| {
                    env.actor.entity = "system:wrapping".into();
                    if env.tx.get(&index)?.is_none() {
                        return Ok(false);
                    }
                    env.tx.clear(&index)?;
                    env.tx.clear(&keys::wrap(&hash))?;
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
