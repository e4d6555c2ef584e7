//! The Vault-compatible HTTP API (`/v1/…`), so that existing Vault and OpenBao clients —
//! the `vault`/`bao` CLIs, `bao agent`, `hvac`, the Go SDK — work against arca unchanged.
//!
//! Every request goes through the same audit-first path as gRPC (a [`Node`] operation, one
//! audit event each); requests refused before any operation (unknown route, malformed or
//! oversized body) are audited as `api.rejected`. Errors use Vault's shape
//! (`{"errors": [...]}`) and status codes: 400 bad input, 403 missing or invalid token or
//! capability, 404 not found (`{"errors": []}`), 405 wrong method, 413 body too large,
//! 503 sealed or storage unavailable.
//!
//! Supported: KV v2 on any mount (`data`, `metadata`, `delete`, `undelete`, `destroy`,
//! `LIST` and `?list=true`, `options.cas`, `?version=`), `sys/mounts`,
//! `sys/internal/ui/mounts`, token and AppRole auth, ACL policies, and `sys/health`,
//! `seal-status`, `init`, `unseal`, `seal`, `leader`. Secret values are of any JSON type.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};
use zeroize::{Zeroize as _, Zeroizing};

use crate::auth::{AppRole, CreateTokenRequest, NewToken, TokenRecord, WriteRoleRequest};
use crate::error::ApiError;
use crate::grpc::{ProxyConfig, audit_headers};
use crate::kv::{Metadata, MetadataUpdate, SecretData};
use crate::node::{Audited, Node, RequestContext, now_unix_ms};

/// Largest request body accepted, in bytes (as the gRPC API).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The peer address of an HTTP connection, set by the listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub Option<SocketAddr>);

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub node: Arc<Node>,
    pub proxy: Arc<ProxyConfig>,
    /// How long a request's body may take to arrive.
    pub body_timeout: std::time::Duration,
    /// The HTTP listener's counters (a body that took too long is counted there) and its
    /// budget of request-body bytes.
    pub stats: Arc<crate::listen::ListenerStats>,
}

/// `2026-11-26T20:37:14.123000000Z` from milliseconds since the epoch.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let nanos = (unix_ms % 1000) * 1_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Digits by hand: `format!` with seven arguments was ~2% of the workers' samples under
    // a read load (every KV read reply carries a created_time).
    let mut out = String::with_capacity(30);
    if year > 9999 {
        out.push_str(&year.to_string());
    } else {
        push_digits(&mut out, year as u64, 4);
    }
    for (separator, value, width) in [
        ('-', month as u64, 2),
        ('-', day as u64, 2),
        ('T', rem / 3600, 2),
        (':', rem % 3600 / 60, 2),
        (':', rem % 60, 2),
        ('.', nanos, 9),
    ] {
        out.push(separator);
        push_digits(&mut out, value, width);
    }
    out.push('Z');
    out
}

/// `value`'s last `width` decimal digits, zero-padded.
fn push_digits(out: &mut String, value: u64, width: u32) {
    for place in (0..width).rev() {
        out.push(char::from(b'0' + (value / 10u64.pow(place) % 10) as u8));
    }
}

/// Vault durations: a number of seconds, or a string like `90`, `90s`, `15m`, `1h`, `2d`, or
/// Go's form `1h0m0s` (what the CLIs send).
fn duration_secs(value: &Value) -> Result<Option<u64>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => {
            n.as_u64().map(Some).ok_or_else(|| ApiError::invalid("durations are whole seconds"))
        }
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => {
            parse_duration(s).map(Some).ok_or_else(|| ApiError::invalid(format!("invalid duration {s:?}")))
        }
        _ => Err(ApiError::invalid("durations are numbers or strings")),
    }
}

/// Seconds in a duration as Vault's clients write it (see [`duration_secs`]).
pub(crate) fn parse_duration(s: &str) -> Option<u64> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let mut total_ms: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let factor_ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total_ms = total_ms.checked_add(n.checked_mul(factor_ms)?)?;
        rest = &rest[unit_len..];
    }
    Some(total_ms / 1000)
}

fn strings(value: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => {
            Ok(s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect())
        }
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::invalid(format!("{field}: a list of strings")))
            })
            .collect(),
        _ => Err(ApiError::invalid(format!("{field}: a list of strings"))),
    }
}

/// Refuses a field outside `known` (named, with the list), so a Vault field arca does not
/// honour is never silently dropped.
fn only_fields(body: &Value, known: &[&str]) -> Result<(), ApiError> {
    let Value::Object(fields) = body else { return Err(ApiError::invalid("the body: a JSON object")) };
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => {
            Err(ApiError::invalid(format!("{key}: not a field arca takes here ({})", known.join(", "))))
        }
        None => Ok(()),
    }
}

/// A string field, or nothing.
fn opt_string(body: &Value, field: &str) -> Result<Option<String>, ApiError> {
    match &body[field] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(ApiError::invalid(format!("{field}: a string"))),
    }
}

/// A connection as Vault's `database/config/<name>` takes it, with the PostgreSQL plugin's
/// fields: `connection_url` with `{{username}}` and `{{password}}` filled in from `username`
/// and `password` (percent-encoded), `tls_ca`, `tls_certificate` and `private_key`.
/// `allowed_roles` other than `*` is refused (every role may name a connection in arca), and
/// `verify_connection` is taken and not acted on (the first credentials try it).
fn db_config_request(body: &Value) -> Result<(Zeroizing<String>, crate::database::DbTls), ApiError> {
    only_fields(
        body,
        &[
            "plugin_name",
            "connection_url",
            "username",
            "password",
            "allowed_roles",
            "verify_connection",
            "tls_ca",
            "tls_certificate",
            "private_key",
        ],
    )?;
    if opt_string(body, "plugin_name")?.is_some_and(|p| p != "postgresql-database-plugin") {
        return Err(ApiError::invalid(
            "plugin_name: arca's connections are PostgreSQL's (postgresql-database-plugin)",
        ));
    }
    if !strings(&body["allowed_roles"], "allowed_roles")?.iter().all(|r| r == "*") {
        return Err(ApiError::invalid(
            "allowed_roles: arca lets every role name a connection (policies on database/roles/<name> decide who may write one); give \"*\" or leave it out",
        ));
    }
    if !matches!(body["verify_connection"], Value::Null | Value::Bool(_)) {
        return Err(ApiError::invalid("verify_connection: true or false"));
    }
    let template = Zeroizing::new(
        opt_string(body, "connection_url")?.ok_or_else(|| ApiError::invalid("connection_url: required"))?,
    );
    let username = opt_string(body, "username")?.unwrap_or_default();
    let password = Zeroizing::new(opt_string(body, "password")?.unwrap_or_default());
    let url = Zeroizing::new(
        template
            .replace("{{username}}", &crate::database::percent_encode(&username))
            .replace("{{password}}", &crate::database::percent_encode(&password)),
    );
    let tls = crate::database::DbTls {
        ca_pem: opt_string(body, "tls_ca")?,
        client_cert_pem: opt_string(body, "tls_certificate")?,
        client_key_pem: opt_string(body, "private_key")?.map(Zeroizing::new),
    };
    Ok((url, tls))
}

/// SQL as Vault's roles take it: one string, or a list of statements (each ended by a `;`).
fn statements(body: &Value, field: &str) -> Result<Option<String>, ApiError> {
    let parts: Vec<String> = match &body[field] {
        Value::Null => return Ok(None),
        // One string is one piece of SQL, commas and all (`strings` would split it).
        Value::String(s) => vec![s.clone()],
        list @ Value::Array(_) => strings(list, field)?,
        _ => return Err(ApiError::invalid(format!("{field}: a string or a list of strings"))),
    };
    let ended: Vec<String> = parts
        .iter()
        .map(|p| p.trim_end())
        .filter(|p| !p.is_empty())
        .map(|p| if p.ends_with(';') { p.to_owned() } else { format!("{p};") })
        .collect();
    Ok((!ended.is_empty()).then(|| ended.join("\n")))
}

/// A role as Vault's `database/roles/<name>` takes it.
fn db_role_request(name: &str, body: &Value) -> Result<crate::database::RoleRequest, ApiError> {
    only_fields(
        body,
        &[
            "db_name",
            "creation_statements",
            "revocation_statements",
            "renew_statements",
            "default_ttl",
            "max_ttl",
            "credential_type",
            "max_leases_per_identity",
        ],
    )?;
    if opt_string(body, "credential_type")?.is_some_and(|t| t != "password") {
        return Err(ApiError::invalid("credential_type: arca's credentials are passwords"));
    }
    let max_leases = match &body["max_leases_per_identity"] {
        Value::Null => None,
        v => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ApiError::invalid("max_leases_per_identity: a whole number"))?,
        ),
    };
    Ok(crate::database::RoleRequest {
        name: name.to_owned(),
        db: opt_string(body, "db_name")?.ok_or_else(|| ApiError::invalid("db_name: required"))?,
        creation_sql: statements(body, "creation_statements")?
            .ok_or_else(|| ApiError::invalid("creation_statements: required"))?,
        revocation_sql: statements(body, "revocation_statements")?,
        renew_sql: statements(body, "renew_statements")?,
        ttl_secs: duration_secs(&body["default_ttl"])?,
        max_ttl_secs: duration_secs(&body["max_ttl"])?,
        max_leases_per_identity: max_leases,
    })
}

fn versions(value: &Value) -> Result<Vec<u64>, ApiError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::Number(n) => n.as_u64().ok_or_else(|| ApiError::invalid("versions: whole numbers")),
                Value::String(s) => s.parse().map_err(|_| ApiError::invalid("versions: whole numbers")),
                _ => Err(ApiError::invalid("versions: whole numbers")),
            })
            .collect(),
        Value::String(s) => s
            .split(',')
            .map(|v| v.trim().parse().map_err(|_| ApiError::invalid("versions: whole numbers")))
            .collect(),
        _ => Err(ApiError::invalid("versions: a list of numbers")),
    }
}

fn string_map(value: &Value, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
    match value {
        Value::Null => Ok(BTreeMap::new()),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(ApiError::invalid(format!("{field}: arca stores string values only (key {k:?})"))),
            })
            .collect(),
        _ => Err(ApiError::invalid(format!("{field}: an object of strings"))),
    }
}

fn errors(status: StatusCode, messages: &[String]) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], json!({ "errors": messages }).to_string())
        .into_response()
}

fn api_error(err: &ApiError) -> Response {
    match err {
        ApiError::InvalidArgument(m) | ApiError::FailedPrecondition(m) => {
            errors(StatusCode::BAD_REQUEST, std::slice::from_ref(m))
        }
        ApiError::Unauthenticated | ApiError::PermissionDenied => {
            errors(StatusCode::FORBIDDEN, &["permission denied".into()])
        }
        ApiError::NotFound(_) => errors(StatusCode::NOT_FOUND, &[]),
        ApiError::Sealed => errors(StatusCode::SERVICE_UNAVAILABLE, &["Vault is sealed".into()]),
        ApiError::NotInitialized => {
            errors(StatusCode::SERVICE_UNAVAILABLE, &["Vault is not initialized".into()])
        }
        ApiError::Unavailable | ApiError::Store(_) => {
            errors(StatusCode::SERVICE_UNAVAILABLE, &[err.to_string()])
        }
        // Vault's answer from a standby that cannot take a write.
        ApiError::ReadOnlyRegion { .. } => errors(StatusCode::SERVICE_UNAVAILABLE, &[err.to_string()]),
        _ => errors(StatusCode::INTERNAL_SERVER_ERROR, &["internal error".into()]),
    }
}

/// Vault's response envelope, serialized as it stands (fields in alphabetical order, as
/// `serde_json::Value` prints them).
#[derive(serde::Serialize)]
struct Envelope<'a, D, A, W = Option<()>> {
    auth: A,
    data: D,
    lease_duration: u64,
    lease_id: &'a str,
    renewable: bool,
    request_id: &'a str,
    warnings: Option<()>,
    wrap_info: W,
}

fn envelope<D: serde::Serialize, A: serde::Serialize>(
    request_id: &str,
    data: D,
    auth: A,
) -> Envelope<'_, D, A> {
    Envelope {
        auth,
        data,
        lease_duration: 0,
        lease_id: "",
        renewable: false,
        request_id,
        warnings: None,
        wrap_info: None,
    }
}

/// A JSON reply serialized straight from `body`.
///
/// Replies carry secrets (a KV read, a token, a password), so the body's buffer is zeroized
/// when it is dropped, once the reply is written (see [`ZeroizingBody`]).
fn json_response<T: serde::Serialize>(status: StatusCode, body: T) -> Response {
    json_response_sized(status, body, 1024)
}

/// [`json_response`] into a buffer of `capacity` bytes to start with (a reply of about known
/// size is written without growing it).
fn json_response_sized<T: serde::Serialize>(status: StatusCode, body: T, capacity: usize) -> Response {
    match to_body_sized(&body, capacity) {
        Ok(buf) => json_bytes(status, buf),
        Err(_) => api_error(&ApiError::Internal),
    }
}

/// `value` as JSON in a [`ZeroizingBody`].
fn to_body<T: serde::Serialize>(value: &T) -> serde_json::Result<ZeroizingBody> {
    to_body_sized(value, 1024)
}

fn to_body_sized<T: serde::Serialize>(value: &T, capacity: usize) -> serde_json::Result<ZeroizingBody> {
    let mut body = ZeroizingBody::with_capacity(capacity);
    serde_json::to_writer(&mut body, value)?;
    Ok(body)
}

/// A JSON body already made, in a buffer zeroized when the reply is done with it.
fn json_bytes(status: StatusCode, body: ZeroizingBody) -> Response {
    let bytes = axum::body::Bytes::from_owner(body.0);
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

/// A reply body's buffer: zeroized when it is dropped, and when it grows (the smaller buffer
/// it leaves is zeroized before it is freed), so serializing a reply leaves no copy of its
/// secrets in freed memory of ours. (hyper's own write buffers and the kernel's are beyond
/// it.)
struct ZeroizingBody(Zeroizing<Vec<u8>>);

impl ZeroizingBody {
    fn with_capacity(capacity: usize) -> Self {
        ZeroizingBody(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    fn from_text(text: &str) -> Self {
        let mut body = ZeroizingBody::with_capacity(text.len());
        body.0.extend_from_slice(text.as_bytes());
        body
    }
}

impl std::io::Write for ZeroizingBody {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let needed = self.0.len() + data.len();
        if needed > self.0.capacity() {
            let mut grown = Zeroizing::new(Vec::with_capacity(needed.max(2 * self.0.capacity())));
            grown.extend_from_slice(&self.0);
            // The old buffer is zeroized as it is dropped here.
            self.0 = grown;
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The KV v2 read reply. The secret's data is copied into the body as the JSON object it
/// was stored as (`serde_json` wrote it, and the barrier authenticated it on the way back;
/// it is still checked to be one JSON value): no parse into strings that are printed again.
/// The response body is the only copy of its values made on the way out.
fn kv_read_reply(s: &crate::kv::PlainVersion, request_id: &str) -> Response {
    #[derive(serde::Serialize)]
    struct KvReadData<'a> {
        data: &'a serde_json::value::RawValue,
        metadata: VersionMetaReply<'a>,
    }
    let Ok(raw) = serde_json::from_slice::<&serde_json::value::RawValue>(&s.json) else {
        return api_error(&ApiError::Internal);
    };
    let data = KvReadData { data: raw, metadata: version_meta(s.version, &s.meta, &s.custom_metadata) };
    // The data, and room for the envelope and the metadata.
    let capacity =
        s.json.len() + 512 + s.custom_metadata.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>();
    json_response_sized(StatusCode::OK, envelope(request_id, data, Value::Null), capacity)
}

/// Turns an audited result into a response, with the audit headers either way.
fn reply<T>(audited: Audited<T>, ok: impl FnOnce(T, &str) -> Response) -> Response {
    let position = audited.position_hex();
    let mut response = match audited.result {
        Ok(value) => ok(value, &audited.request_id),
        Err(err) => api_error(&err),
    };
    audit_headers(response.headers_mut(), position.as_deref(), &audited.request_id);
    response
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// A token as Vault's `auth` block carries it. Serialized from borrowed fields, so the token
/// is never copied into a `Value` (whose text nothing would zeroize); the unwrap of a token
/// wrapped over gRPC fills it from the decoded message (see [`unwrapped_grpc`]).
#[derive(serde::Serialize)]
struct TokenAuthReply<'a> {
    client_token: &'a str,
    accessor: &'a str,
    policies: &'a [String],
    token_policies: &'a [String],
    identity_policies: Option<()>,
    metadata: Option<()>,
    lease_duration: u64,
    renewable: bool,
    entity_id: &'static str,
    token_type: &'static str,
    orphan: bool,
    mfa_requirement: Option<()>,
    num_uses: u64,
}

impl<'a> TokenAuthReply<'a> {
    fn new(
        token: &'a str,
        accessor: &'a str,
        policies: &'a [String],
        ttl_secs: u64,
        renewable: bool,
        orphan: bool,
    ) -> Self {
        TokenAuthReply {
            client_token: token,
            accessor,
            policies,
            token_policies: policies,
            identity_policies: None,
            metadata: None,
            lease_duration: ttl_secs,
            renewable,
            entity_id: "",
            token_type: "service",
            orphan,
            mfa_requirement: None,
            num_uses: 0,
        }
    }
}

fn token_auth(t: &NewToken) -> TokenAuthReply<'_> {
    let r = &t.record;
    TokenAuthReply::new(&t.token, &r.accessor, &r.policies, r.ttl_secs, r.renewable, r.parent.is_none())
}

/// Dynamic database credentials as Vault replies with them: under their lease, renewable,
/// the username and password in `data` (borrowed, as [`TokenAuthReply`]: the password is
/// never copied into a `Value`).
fn db_creds_reply<'a>(
    request_id: &'a str,
    lease: &'a str,
    lease_secs: u64,
    username: &'a str,
    password: &'a str,
) -> Envelope<'a, DbCredsData<'a>, Value> {
    Envelope {
        lease_id: lease,
        lease_duration: lease_secs,
        renewable: true,
        ..envelope(request_id, DbCredsData { username, password }, Value::Null)
    }
}

#[derive(serde::Serialize)]
struct DbCredsData<'a> {
    username: &'a str,
    password: &'a str,
}

/// An AppRole secret id as Vault replies with it (borrowed, as [`TokenAuthReply`]);
/// `expire_unix_ms` 0 is a secret id that does not expire.
#[derive(serde::Serialize)]
struct SecretIdReply<'a> {
    secret_id: &'a str,
    secret_id_accessor: &'a str,
    secret_id_ttl: u64,
    secret_id_num_uses: u64,
}

impl<'a> SecretIdReply<'a> {
    fn new(secret_id: &'a str, accessor: &'a str, expire_unix_ms: u64) -> Self {
        let ttl = if expire_unix_ms == 0 { 0 } else { expire_unix_ms.saturating_sub(now_unix_ms()) / 1000 };
        SecretIdReply { secret_id, secret_id_accessor: accessor, secret_id_ttl: ttl, secret_id_num_uses: 0 }
    }
}

/// A token's lookup as Vault replies with it; `id` is the token itself, only in a lookup of
/// the caller's own token (borrowed, as [`TokenAuthReply`]).
#[derive(serde::Serialize)]
struct TokenDataReply<'a> {
    accessor: &'a str,
    creation_time: u64,
    creation_ttl: u64,
    display_name: &'a str,
    entity_id: &'static str,
    expire_time: Option<String>,
    explicit_max_ttl: u64,
    id: &'a str,
    issue_time: String,
    meta: Option<()>,
    num_uses: u64,
    orphan: bool,
    path: &'static str,
    policies: &'a [String],
    renewable: bool,
    ttl: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

fn token_data<'a>(r: &'a TokenRecord, id: Option<&'a str>) -> TokenDataReply<'a> {
    TokenDataReply {
        accessor: &r.accessor,
        creation_time: r.created_unix_ms / 1000,
        creation_ttl: r.ttl_secs,
        display_name: &r.display_name,
        entity_id: "",
        expire_time: r.expire_unix_ms.map(rfc3339),
        explicit_max_ttl: 0,
        id: id.unwrap_or(""),
        issue_time: rfc3339(r.created_unix_ms),
        meta: None,
        num_uses: 0,
        orphan: r.parent.is_none(),
        path: "auth/token/create",
        policies: &r.policies,
        renewable: r.renewable,
        ttl: r.expire_unix_ms.map_or(0, |e| e.saturating_sub(now_unix_ms()) / 1000),
        kind: "service",
    }
}

/// An answer wrapped over the gRPC API, as the HTTP API unwraps it (`None` when `stored` is
/// a response wrapped over HTTP, returned as it was): in the shape a Vault client expects
/// of the call it stands for — a KV read, an AppRole role id or secret id, a token from a
/// create or a login, dynamic database credentials — under the unwrap's request id; any
/// other answer as its method and message (base64 protobuf) in `data`. Written into a
/// [`ZeroizingBody`], the reply's own buffer.
fn unwrapped_grpc(stored: &str, request_id: &str) -> Option<ZeroizingBody> {
    use prost::Message as _;

    use crate::proto;
    /// A KV value: text, or JSON text the secret holds as a JSON value (`json_keys`).
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Field<'a> {
        Text(&'a str),
        Json(&'a serde_json::value::RawValue),
    }
    #[derive(serde::Serialize)]
    struct KvRead<'a> {
        data: BTreeMap<&'a str, Field<'a>>,
        metadata: VersionMetaReply<'a>,
    }
    // The secrets are serialized from the decoded message, never copied into a `Value`, and
    // the message is zeroized once the text is made.
    let (method, message) = crate::grpc::WrappedAnswer::open(stored)?;
    let message = message.as_slice();
    let text = match method.as_str() {
        "/arca.v1.Arca/KvGet" if let Ok(mut m) = proto::KvGetResponse::decode(message) => {
            let data = m
                .data
                .iter()
                .map(|(k, v)| {
                    let json = m.json_keys.contains(k).then(|| serde_json::from_str(v).ok()).flatten();
                    (k.as_str(), json.map_or(Field::Text(v), Field::Json))
                })
                .collect();
            let custom: BTreeMap<String, String> =
                m.custom_metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let meta = crate::kv::VersionMeta {
                created_unix_ms: m.created_unix_ms,
                deletion_unix_ms: None,
                destroyed: false,
                revoked_unix_ms: None,
                slot: None,
            };
            let metadata = version_meta(m.version, &meta, &custom);
            let text = to_body(&envelope(request_id, KvRead { data, metadata }, Value::Null));
            m.data.values_mut().for_each(|v| v.zeroize());
            text
        }
        "/arca.v1.Arca/AppRoleSecretId" if let Ok(mut m) = proto::SecretIdResponse::decode(message) => {
            let data = SecretIdReply::new(&m.secret_id, &m.accessor, m.expire_unix_ms);
            let text = to_body(&envelope(request_id, data, Value::Null));
            m.secret_id.zeroize();
            text
        }
        "/arca.v1.Arca/DbCreds" if let Ok(mut m) = proto::DbCredsResponse::decode(message) => {
            let lease = m.lease.take().unwrap_or_default();
            let secs = lease.expire_unix_ms.saturating_sub(lease.issued_unix_ms) / 1000;
            let reply = db_creds_reply(request_id, &lease.lease_id, secs, &m.username, &m.password);
            let text = to_body(&reply);
            m.password.zeroize();
            text
        }
        "/arca.v1.Arca/AppRoleRoleId" if let Ok(m) = proto::RoleIdResponse::decode(message) => {
            to_body(&envelope(request_id, json!({"role_id": m.role_id}), Value::Null))
        }
        "/arca.v1.Arca/TokenCreate" | "/arca.v1.Arca/AppRoleLogin" | "/arca.v1.Arca/CertLogin"
            if let Ok(mut m) = proto::TokenAuth::decode(message) =>
        {
            let info = m.info.take().unwrap_or_default();
            let orphan = info.parent_accessor.is_empty();
            let auth = TokenAuthReply::new(
                &m.token,
                &info.accessor,
                &info.policies,
                info.ttl_secs,
                info.renewable,
                orphan,
            );
            let text = to_body(&envelope(request_id, Value::Null, auth));
            m.token.zeroize();
            text
        }
        _ => to_body(&envelope(
            request_id,
            json!({"grpc_method": method, "message": B64.encode(message)}),
            Value::Null,
        )),
    };
    text.ok()
}

/// A version's metadata as KV v2 replies carry it.
#[derive(serde::Serialize)]
struct VersionMetaReply<'a> {
    created_time: String,
    custom_metadata: Option<&'a BTreeMap<String, String>>,
    deletion_time: String,
    destroyed: bool,
    version: u64,
}

fn version_meta<'a>(
    version: u64,
    m: &crate::kv::VersionMeta,
    custom: &'a BTreeMap<String, String>,
) -> VersionMetaReply<'a> {
    VersionMetaReply {
        created_time: rfc3339(m.created_unix_ms),
        custom_metadata: (!custom.is_empty()).then_some(custom),
        deletion_time: m.deletion_unix_ms.map(rfc3339).unwrap_or_default(),
        destroyed: m.destroyed,
        version,
    }
}

/// The reply to a KV write or patch: the new version's metadata.
fn written(version: u64, request_id: &str) -> Response {
    let fresh = crate::kv::VersionMeta {
        created_unix_ms: now_unix_ms(),
        deletion_unix_ms: None,
        destroyed: false,
        revoked_unix_ms: None,
        slot: None,
    };
    json_response(
        StatusCode::OK,
        envelope(request_id, version_meta(version, &fresh, &BTreeMap::new()), Value::Null),
    )
}

fn metadata_json(m: &Metadata) -> Value {
    let versions: Map<String, Value> = m
        .versions
        .iter()
        .map(|(v, s)| {
            (v.to_string(), json!({"created_time": rfc3339(s.created_unix_ms), "deletion_time": s.deletion_unix_ms.map(rfc3339).unwrap_or_default(), "destroyed": s.destroyed}))
        })
        .collect();
    json!({
        "cas_required": m.cas_required, "created_time": rfc3339(m.created_unix_ms), "current_version": m.current_version,
        "custom_metadata": if m.custom_metadata.is_empty() { Value::Null } else { json!(m.custom_metadata) },
        "delete_version_after": go_duration(m.delete_version_after_secs), "max_versions": m.max_versions, "oldest_version": m.oldest_version(),
        "updated_time": rfc3339(m.updated_unix_ms), "versions": versions,
    })
}

/// A whole number given as a number or as text (`bao write key=value` sends text).
fn uint_field(value: &Value, name: &str) -> Result<Option<u64>, ApiError> {
    let invalid = || ApiError::invalid(format!("{name}: a whole number"));
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_u64().map(Some).ok_or_else(invalid),
        Value::String(s) => s.trim().parse().map(Some).map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

/// A boolean given as one or as text.
fn bool_field(value: &Value, name: &str) -> Result<Option<bool>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        Value::String(s) if s == "true" || s == "1" => Ok(Some(true)),
        Value::String(s) if s == "false" || s == "0" => Ok(Some(false)),
        _ => Err(ApiError::invalid(format!("{name}: true or false"))),
    }
}

fn kv_config_json(c: &crate::kv::KvConfig) -> Value {
    json!({
        "max_versions": c.max_versions, "cas_required": c.cas_required,
        "delete_version_after": go_duration(c.delete_version_after_secs),
    })
}

/// Seconds as Go prints a `time.Duration` (what Vault's clients show): `0s`, `45s`,
/// `1m30s`, `1h0m0s`.
fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn role_json(r: &AppRole) -> Value {
    json!({
        "token_policies": r.policies, "policies": r.policies, "token_ttl": r.token_ttl_secs, "token_max_ttl": 0,
        "secret_id_ttl": r.secret_id_ttl_secs, "secret_id_num_uses": 0, "bind_secret_id": true, "token_type": "default",
    })
}

fn mount_json(m: &crate::kv::Mount) -> Value {
    json!({
        "type": "kv", "description": m.description, "options": {"version": "2"}, "local": false, "seal_wrap": false,
        "external_entropy_access": false, "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": false},
        "accessor": format!("kv_{}", m.name), "uuid": "", "plugin_version": "", "running_plugin_version": "", "running_sha256": "",
    })
}

/// The `/v1/*` handler.
pub async fn handle(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerAddr>>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let peer = peer.and_then(|Extension(p)| p.0);
    let ctx = context(&state.proxy, peer, &parts.headers);
    let node = state.node.clone();
    let path = parts.uri.path().strip_prefix("/v1/").unwrap_or_default().trim_end_matches('/').to_owned();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let list = parts.method.as_str() == "LIST"
        || (parts.method == Method::GET && query.get("list").is_some_and(|v| v == "true"));
    // Response wrapping: the same request id and caller for the wrap's own event.
    let wrap = parts
        .headers
        .get("x-vault-wrap-ttl")
        .map(|v| (crate::wrapping::wrap_ttl("X-Vault-Wrap-TTL", v.as_bytes()), ctx.clone()));
    // The head's and body's bytes stay charged to the listener's budget until the request is
    // answered.
    let mut charge = crate::listen::Charge::default();
    let head = crate::listen::head_bytes(&parts.uri, &parts.headers);
    let read = match state.stats.body().charge(&mut charge, head) {
        Ok(()) => read_body(body, state.body_timeout, &state.stats, &mut charge).await,
        Err(spent) => Err((StatusCode::SERVICE_UNAVAILABLE, spent.to_string())),
    };
    let body = match read {
        Ok(body) => body,
        Err((status, message)) => {
            drop(charge);
            let busy = status == StatusCode::SERVICE_UNAVAILABLE;
            let mut response = refuse(&node, ctx, path, status, message).await;
            if busy {
                response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            return response;
        }
    };
    let (wrap_ttl, wrap_ctx) = match wrap {
        None => (None, None),
        Some((Err(message), _)) => return refuse(&node, ctx, path, StatusCode::BAD_REQUEST, message).await,
        Some((Ok(ttl), wrap_ctx)) => (Some(ttl), Some(wrap_ctx)),
    };
    if wrap_ttl.is_none() && path == "sys/wrapping/wrap" {
        let message = "sys/wrapping/wrap needs a wrap TTL: send X-Vault-Wrap-TTL".to_owned();
        return refuse(&node, ctx, path, StatusCode::BAD_REQUEST, message).await;
    }
    let dispatched = if path == "sys/wrapping/wrap" && matches!(parts.method.as_str(), "POST" | "PUT") {
        // What the caller sends is the response to wrap; the wrap's event is its audit.
        Ok(json_response(StatusCode::OK, envelope(&ctx.request_id, body, Value::Null)))
    } else {
        dispatch(&node, ctx, &parts.method, list, &path, &query, body).await
    };
    match dispatched {
        Ok(response) => match (wrap_ttl, wrap_ctx) {
            (Some(ttl), Some(wrap_ctx))
                if response.status() == StatusCode::OK
                    && path != "sys/wrapping/unwrap"
                    && path != "sys/wrapping/lookup" =>
            {
                wrap_response(&node, wrap_ctx, &path, response, ttl).await
            }
            _ => response,
        },
        Err((ctx, err)) => {
            let route = path.clone();
            let status = match &err {
                Reject::NoRoute => StatusCode::NOT_FOUND,
                Reject::Method => StatusCode::METHOD_NOT_ALLOWED,
                Reject::Bad(_) => StatusCode::BAD_REQUEST,
            };
            let message = match err {
                Reject::NoRoute => format!("no handler for route \"{route}\". route entry not found."),
                Reject::Method => "unsupported operation".to_owned(),
                Reject::Bad(m) => m,
            };
            refuse(&node, ctx, route, status, message).await
        }
    }
}

/// Refuses a request: its `api.rejected` event (durable first), then `status` with
/// `message` in Vault's error shape, carrying the event's audit headers.
async fn refuse(
    node: &Arc<Node>,
    ctx: RequestContext,
    path: String,
    status: StatusCode,
    message: String,
) -> Response {
    let rejected = node
        .reject(ctx, path, {
            let message = message.clone();
            move || ApiError::invalid(message.clone())
        })
        .await;
    let mut response = errors(status, &[message]);
    audit_headers(response.headers_mut(), rejected.position_hex().as_deref(), &rejected.request_id);
    response
}

/// Replaces a response by its wrapping: stored under a single-use wrapping token, which goes
/// back in `wrap_info` ([`crate::wrapping`]).
async fn wrap_response(
    node: &Arc<Node>,
    ctx: RequestContext,
    path: &str,
    response: Response,
    ttl: u64,
) -> Response {
    let body = match to_bytes(response.into_body(), crate::wrapping::MAX_WRAPPED_BYTES + 1).await {
        Ok(bytes) => Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned()),
        Err(_) => {
            let message = "the response is too large to wrap".to_owned();
            return refuse(node, ctx, path.to_owned(), StatusCode::BAD_REQUEST, message).await;
        }
    };
    let authenticated = path == "sys/wrapping/wrap";
    /// Vault's reply to a wrapped request is the envelope with `wrap_info` and nothing else.
    /// The wrapping token is borrowed, never copied into a `Value`.
    #[derive(serde::Serialize)]
    struct WrapInfo<'a> {
        token: &'a str,
        accessor: &'a str,
        ttl: u64,
        creation_time: String,
        creation_path: &'a str,
        wrapped_accessor: &'static str,
    }
    reply(node.wrap(ctx, path.to_owned(), body, ttl, authenticated).await, |w, rid| {
        let body = Envelope {
            auth: Value::Null,
            data: Value::Null,
            lease_duration: 0,
            lease_id: "",
            renewable: false,
            request_id: rid,
            warnings: None,
            wrap_info: WrapInfo {
                token: w.token.as_ref().map(|t| t.as_str()).unwrap_or_default(),
                accessor: &w.accessor,
                ttl: w.ttl_secs,
                creation_time: rfc3339(w.created_unix_ms),
                creation_path: &w.creation_path,
                wrapped_accessor: "",
            },
        };
        json_response(StatusCode::OK, body)
    })
}

/// Any path of the HTTP listener outside `/v1/`, the metrics and the audit log: a 404 in
/// Vault's error shape, audited like an unknown route under `/v1/` (`api.rejected`, the
/// path as requested), durable before the answer goes out.
pub async fn unknown_path(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerAddr>>,
    request: Request,
) -> Response {
    let (parts, _) = request.into_parts();
    let peer = peer.and_then(|Extension(p)| p.0);
    let ctx = context(&state.proxy, peer, &parts.headers);
    let path = parts.uri.path().to_owned();
    let message = "no handler for this path: the Vault-compatible API is under /v1/".to_owned();
    let rejected =
        state.node.reject(ctx, path, move || ApiError::NotFound("no handler for this path".into())).await;
    let mut response = errors(StatusCode::NOT_FOUND, &[message]);
    audit_headers(response.headers_mut(), rejected.position_hex().as_deref(), &rejected.request_id);
    response
}

fn context(proxy: &ProxyConfig, peer: Option<SocketAddr>, headers: &HeaderMap) -> RequestContext {
    let token = headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| Zeroizing::new(t.to_owned()));
    let forwarded = proxy.header.as_deref().and_then(|h| headers.get(h)).and_then(|v| v.to_str().ok());
    RequestContext::new(token, crate::grpc::client_source(proxy, peer, forwarded))
}

async fn read_body(
    body: Body,
    timeout: std::time::Duration,
    stats: &crate::listen::ListenerStats,
    charge: &mut crate::listen::Charge,
) -> Result<Value, (StatusCode, String)> {
    // An empty body is ready at once: the timer is armed only for a body still arriving.
    let bytes = match tokio::time::timeout(timeout, collect(body, stats.body(), charge)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(refused)) => return Err(refused),
        Err(_) => {
            stats.timed_out(crate::listen::Timeout::Body);
            let secs = timeout.as_secs_f64();
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {secs} s"),
            ));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        // `bao write -f` sends `null`.
        Ok(Value::Null) => Ok(Value::Object(Map::new())),
        Ok(_) => Err((StatusCode::BAD_REQUEST, "failed to parse JSON input: expected an object".into())),
        Err(e) => Err((StatusCode::BAD_REQUEST, format!("failed to parse JSON input: {e}"))),
    }
}

/// A request body of at most [`MAX_BODY_BYTES`], its memory charged to the listener's budget of
/// request-body bytes as it is taken: a declared length at once (the buffer is allocated for
/// it), chunks of an undeclared one as they arrive. Refused: a body over the size (413), one
/// that does not fit in the budget (503), one that cannot be read (400).
async fn collect(
    mut body: Body,
    budget: &crate::listen::BodyBudget,
    charge: &mut crate::listen::Charge,
) -> Result<Zeroizing<Vec<u8>>, (StatusCode, String)> {
    use http_body_util::BodyExt as _;
    let too_large =
        || (StatusCode::PAYLOAD_TOO_LARGE, format!("request body larger than {MAX_BODY_BYTES} bytes"));
    let spent = |spent: crate::listen::BudgetSpent| (StatusCode::SERVICE_UNAVAILABLE, spent.to_string());
    let declared = http_body::Body::size_hint(&body).exact();
    let mut bytes = Zeroizing::new(Vec::new());
    let mut charged = 0;
    if let Some(length) = declared {
        let length = usize::try_from(length).ok().filter(|n| *n <= MAX_BODY_BYTES).ok_or_else(too_large)?;
        budget.charge(charge, length).map_err(spent)?;
        charged = length;
        bytes.reserve_exact(length);
    }
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| (StatusCode::BAD_REQUEST, "the request body could not be read".to_owned()))?;
        let Ok(data) = frame.into_data() else { continue };
        let len = bytes.len() + data.len();
        if len > MAX_BODY_BYTES {
            return Err(too_large());
        }
        if len > charged {
            budget.charge(charge, len - charged).map_err(spent)?;
            charged = len;
        }
        bytes.extend_from_slice(&data);
    }
    Ok(bytes)
}

enum Reject {
    NoRoute,
    Method,
    Bad(String),
}

type Dispatched = Result<Response, (RequestContext, Reject)>;

async fn dispatch(
    node: &Arc<Node>,
    ctx: RequestContext,
    method: &Method,
    list: bool,
    path: &str,
    query: &BTreeMap<String, String>,
    mut body: Value,
) -> Dispatched {
    let mut segments: Vec<&str> = path.split('/').collect();
    // A mount of several segments (`team/kv/data/app/db`) ends at the first KV verb, which
    // no mount name holds: its segments become one, and the routes below see `[mount, …]`.
    let joined;
    if let Some(i) = segments.iter().position(|s| crate::kv::KV_VERBS.contains(s))
        && i > 1
        && !crate::kv::RESERVED_MOUNTS.contains(&segments[0])
    {
        joined = segments[..i].join("/");
        segments.splice(..i, [joined.as_str()]);
    }
    let m = method.as_str();
    let write = matches!(m, "POST" | "PUT");
    macro_rules! bad {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(err) => return Err((ctx, Reject::Bad(err.to_string()))),
            }
        };
    }
    let response = match (segments.as_slice(), m) {
        (["sys", "health"], "GET" | "HEAD") => {
            let audited = node.operator_status(ctx).await;
            reply(audited, |s, _| {
                let status = if !s.initialized {
                    StatusCode::NOT_IMPLEMENTED
                } else if s.sealed {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                let id = node.identity();
                json_response(
                    status,
                    json!({
                        "initialized": s.initialized, "sealed": s.sealed, "standby": false, "performance_standby": false,
                        "replication_performance_mode": "disabled", "replication_dr_mode": "disabled",
                        "server_time_utc": now_unix_ms() / 1000, "version": concat!("arca-", env!("CARGO_PKG_VERSION")),
                        "cluster_name": id.cluster, "cluster_id": "",
                    }),
                )
            })
        }
        (["sys", "seal-status"], "GET") => {
            let audited = node.operator_status(ctx).await;
            reply(audited, |s, _| {
                json_response(
                    StatusCode::OK,
                    seal_status(
                        node,
                        &s.seal_type,
                        s.initialized,
                        s.sealed,
                        s.shares,
                        s.threshold,
                        s.progress,
                    ),
                )
            })
        }
        (["sys", "leader"], "GET") => {
            let audited = node.operator_status(ctx).await;
            reply(audited, |_, _| {
                json_response(
                    StatusCode::OK,
                    json!({"ha_enabled": false, "is_self": true, "active_time": "0001-01-01T00:00:00Z", "leader_address": "", "leader_cluster_address": "", "performance_standby": false, "raft_committed_index": 0, "raft_applied_index": 0}),
                )
            })
        }
        (["sys", "init"], "GET") => {
            let audited = node.operator_status(ctx).await;
            reply(audited, |s, _| json_response(StatusCode::OK, json!({"initialized": s.initialized})))
        }
        (["sys", "init"], "PUT" | "POST") => {
            let shares = body["secret_shares"].as_u64().unwrap_or(5).min(255) as u8;
            let threshold = body["secret_threshold"].as_u64().unwrap_or(3).min(255) as u8;
            let audited = node.operator_init(ctx, shares, threshold).await;
            reply(audited, |i, _| {
                // The key shares and the root token go into the body from borrowed or zeroized
                // copies, never into a `Value`.
                #[derive(serde::Serialize)]
                struct InitReply<'a> {
                    keys: Vec<&'a str>,
                    keys_base64: Vec<&'a str>,
                    root_token: &'a str,
                }
                let b64_keys: Vec<Zeroizing<String>> = i
                    .shares
                    .iter()
                    .map(|s| {
                        let raw = Zeroizing::new(hex::decode(s.as_str()).unwrap_or_default());
                        Zeroizing::new(B64.encode(&*raw))
                    })
                    .collect();
                let body = InitReply {
                    keys: i.shares.iter().map(|s| s.as_str()).collect(),
                    keys_base64: b64_keys.iter().map(|s| s.as_str()).collect(),
                    root_token: &i.root_token.token,
                };
                json_response(StatusCode::OK, body)
            })
        }
        (["sys", "unseal"], "PUT" | "POST") => {
            let key = body["key"].as_str().unwrap_or_default().trim().to_owned();
            // Vault accepts hex or base64 key shares.
            let key = if hex::decode(&key).is_ok() {
                key
            } else {
                B64.decode(&key).map(hex::encode).unwrap_or(key)
            };
            let audited = node.operator_unseal(ctx, Zeroizing::new(key)).await;
            let status = node.barrier().is_sealed();
            // Unsealing by key shares: a Shamir seal (an HSM-sealed node unseals itself).
            reply(audited, |p, _| {
                json_response(
                    StatusCode::OK,
                    seal_status(node, "shamir", true, status && p.sealed, 0, p.threshold, p.progress),
                )
            })
        }
        (["sys", "seal"], "PUT" | "POST") => reply(node.operator_seal(ctx).await, |(), _| no_content()),
        (["sys", "mounts"], "GET") => reply(node.mount_list(ctx).await, |mounts, rid| {
            let mut map = Map::new();
            for mount in &mounts {
                map.insert(format!("{}/", mount.name), mount_json(mount));
            }
            // Vault also lists the mounts at the top level, beside the envelope's fields.
            let mut body = serde_json::to_value(envelope(rid, Value::Object(map.clone()), Value::Null))
                .unwrap_or_default();
            if let Value::Object(top) = &mut body {
                top.extend(map);
            }
            json_response(StatusCode::OK, body)
        }),
        (["sys", "mounts", name @ ..], "POST" | "PUT") if !name.is_empty() => {
            let kind = body["type"].as_str().unwrap_or_default();
            let version = body["options"]["version"].as_str().unwrap_or("");
            if !(kind == "kv-v2" || (kind == "kv" && version == "2")) {
                return Err((
                    ctx,
                    Reject::Bad(format!(
                        "arca mounts KV version 2 only (type \"kv-v2\", or \"kv\" with options.version \"2\"); got {kind:?}"
                    )),
                ));
            }
            let description = body["description"].as_str().unwrap_or_default().to_owned();
            reply(node.mount_enable(ctx, name.join("/"), description).await, |_, _| no_content())
        }
        (["sys", "mounts", name @ ..], "DELETE") if !name.is_empty() => {
            reply(node.mount_disable(ctx, name.join("/")).await, |(), _| no_content())
        }
        (["sys", "internal", "ui", "mounts", rest @ ..], "GET") => {
            reply(node.mount_for_path(ctx, rest.join("/")).await, |mount, rid| {
                let mut data = mount_json(&mount);
                data["path"] = json!(format!("{}/", mount.name));
                json_response(StatusCode::OK, envelope(rid, data, Value::Null))
            })
        }
        (["sys", "auth"], "GET") => reply(node.operator_status(ctx).await, |_, rid| {
            let methods = json!({
                "token/": {"type": "token", "description": "token based credentials", "accessor": "auth_token", "options": null, "config": {}},
                "approle/": {"type": "approle", "description": "machine login", "accessor": "auth_approle", "options": null, "config": {}},
            });
            json_response(StatusCode::OK, envelope(rid, methods, Value::Null))
        }),
        (["sys", "auth", "approle" | "token"], "POST" | "PUT") => {
            // Both methods are always enabled: enabling them again is a no-op.
            reply(node.operator_status(ctx).await, |_, _| no_content())
        }
        (["sys", "policies", "acl"] | ["sys", "policy"], _) if list || m == "GET" => {
            reply(node.policy_list(ctx).await, |names, rid| {
                json_response(
                    StatusCode::OK,
                    envelope(rid, json!({"keys": names, "policies": names}), Value::Null),
                )
            })
        }
        (["sys", "policies", "acl", name] | ["sys", "policy", name], "GET") => {
            let name = (*name).to_owned();
            reply(node.policy_read(ctx, name.clone()).await, |text, rid| {
                json_response(
                    StatusCode::OK,
                    envelope(rid, json!({"name": name, "policy": text, "rules": text}), Value::Null),
                )
            })
        }
        (["sys", "policies", "acl", name] | ["sys", "policy", name], "PUT" | "POST") => {
            let text = body["policy"].as_str().or(body["rules"].as_str()).unwrap_or_default().to_owned();
            reply(node.policy_write(ctx, (*name).to_owned(), text).await, |(), _| no_content())
        }
        (["sys", "policies", "acl", name] | ["sys", "policy", name], "DELETE") => {
            reply(node.policy_delete(ctx, (*name).to_owned()).await, |(), _| no_content())
        }
        (["auth", "token", kind @ ("create" | "create-orphan")], "POST" | "PUT") => {
            let req = CreateTokenRequest {
                policies: bad!(strings(&body["policies"], "policies")),
                // Vault's 0 (what `bao token create` sends without -ttl) is the default TTL.
                ttl_secs: bad!(duration_secs(&body["ttl"])).filter(|t| *t > 0),
                display_name: body["display_name"].as_str().unwrap_or_default().to_owned(),
                renewable: body["renewable"].as_bool().unwrap_or(true),
                orphan: *kind == "create-orphan" || body["no_parent"].as_bool().unwrap_or(false),
                bound_cidrs: Vec::new(),
                meta: bad!(string_map(&body["meta"], "meta")),
            };
            reply(node.token_create(ctx, req).await, |t, rid| {
                json_response(StatusCode::OK, envelope(rid, Value::Null, token_auth(&t)))
            })
        }
        (["auth", "token", "lookup-self"], "GET" | "POST") => {
            let own = ctx.token.as_ref().map(|t| t.to_string());
            reply(node.token_lookup(ctx, None).await, |r, rid| {
                json_response(StatusCode::OK, envelope(rid, token_data(&r, own.as_deref()), Value::Null))
            })
        }
        (["auth", "token", "lookup"], "POST" | "PUT") => {
            let token = Zeroizing::new(body["token"].as_str().unwrap_or_default().to_owned());
            reply(node.token_lookup_by_token(ctx, token).await, |r, rid| {
                json_response(StatusCode::OK, envelope(rid, token_data(&r, None), Value::Null))
            })
        }
        (["auth", "token", "lookup-accessor"], "POST" | "PUT") => {
            let accessor = body["accessor"].as_str().unwrap_or_default().to_owned();
            if accessor.is_empty() {
                return Err((ctx, Reject::Bad("missing accessor".into())));
            }
            reply(node.token_lookup(ctx, Some(accessor)).await, |r, rid| {
                json_response(StatusCode::OK, envelope(rid, token_data(&r, None), Value::Null))
            })
        }
        (
            ["sys", kind @ ("capabilities-self" | "capabilities" | "capabilities-accessor")],
            "POST" | "PUT",
        ) => {
            let paths: Vec<String> = match body.get("paths").or_else(|| body.get("path")) {
                Some(Value::String(p)) => vec![p.clone()],
                Some(Value::Array(items)) => {
                    let texts: Option<Vec<String>> =
                        items.iter().map(|v| v.as_str().map(str::to_owned)).collect();
                    bad!(texts.ok_or_else(|| ApiError::invalid("paths: a list of strings")))
                }
                _ => return Err((ctx, Reject::Bad("missing paths".into()))),
            };
            let of = match *kind {
                "capabilities" => crate::auth::CapabilitiesOf::Token(Zeroizing::new(
                    body["token"].as_str().unwrap_or_default().to_owned(),
                )),
                "capabilities-accessor" => crate::auth::CapabilitiesOf::Accessor(
                    body["accessor"].as_str().unwrap_or_default().to_owned(),
                ),
                _ => crate::auth::CapabilitiesOf::Caller,
            };
            reply(node.token_capabilities(ctx, of, paths).await, |found, rid| {
                let mut map = Map::new();
                if let [(_, only)] = found.as_slice() {
                    map.insert("capabilities".into(), json!(only));
                }
                for (path, caps) in &found {
                    map.insert(path.clone(), json!(caps));
                }
                // Vault's clients read either the envelope's data or the top level (where a
                // path never replaces one of the envelope's own fields).
                let mut body = serde_json::to_value(envelope(rid, Value::Object(map.clone()), Value::Null))
                    .unwrap_or_default();
                if let Value::Object(top) = &mut body {
                    for (path, caps) in map {
                        top.entry(path).or_insert(caps);
                    }
                }
                json_response(StatusCode::OK, body)
            })
        }
        (["sys", "wrapping", op @ ("unwrap" | "lookup")], "POST" | "PUT") => {
            // The wrapping token: in the body, else the request's token.
            let token = match body["token"].as_str().filter(|t| !t.is_empty()) {
                Some(t) => Zeroizing::new(t.to_owned()),
                None => match &ctx.token {
                    Some(t) => t.clone(),
                    None => return Err((ctx, Reject::Bad("missing wrapping token".into()))),
                },
            };
            if *op == "lookup" {
                reply(node.wrap_lookup(ctx, token).await, |w, rid| {
                    let data = json!({
                        "creation_path": w.creation_path, "creation_time": rfc3339(w.created_unix_ms),
                        "creation_ttl": w.ttl_secs,
                    });
                    json_response(StatusCode::OK, envelope(rid, data, Value::Null))
                })
            } else {
                // The response as the wrapped request would have returned it; an answer
                // wrapped over the gRPC API in Vault's shape.
                reply(node.unwrap(ctx, token).await, |text, rid| {
                    let body = unwrapped_grpc(&text, rid).unwrap_or_else(|| ZeroizingBody::from_text(&text));
                    json_bytes(StatusCode::OK, body)
                })
            }
        }
        (["database", "config"], _) if list => reply(node.db_config_list(ctx).await, |names, rid| {
            json_response(StatusCode::OK, envelope(rid, json!({"keys": names}), Value::Null))
        }),
        (["database", "config", name], "GET") => {
            reply(node.db_config_read(ctx, (*name).to_owned()).await, |c, rid| {
                // Vault's shape; the URL is rebuilt without its password, as Vault shows it.
                let data = json!({
                    "plugin_name": "postgresql-database-plugin",
                    "connection_details": {"connection_url": c.url},
                    "allowed_roles": c.roles,
                    "has_ca": c.has_ca,
                    "has_client_cert": c.has_client_cert,
                    "root_rotation_pending": c.root_rotation_pending,
                });
                json_response(StatusCode::OK, envelope(rid, data, Value::Null))
            })
        }
        (["database", "config", name], "POST" | "PUT") => {
            let (url, tls) = bad!(db_config_request(&body));
            reply(node.db_config_write(ctx, (*name).to_owned(), url, tls).await, |(), _| no_content())
        }
        (["database", "roles", name], "POST" | "PUT") => {
            let req = bad!(db_role_request(name, &body));
            reply(node.db_role_write(ctx, req).await, |_, _| no_content())
        }
        (["database", "rotate-root", name], "POST" | "PUT") => {
            reply(node.db_rotate_root(ctx, (*name).to_owned()).await, |(), _| no_content())
        }
        (["database", "config", name], "DELETE") => {
            reply(node.db_config_delete(ctx, (*name).to_owned()).await, |(), _| no_content())
        }
        (["database", "roles"], _) if list => reply(node.db_role_list(ctx).await, |names, rid| {
            json_response(StatusCode::OK, envelope(rid, json!({"keys": names}), Value::Null))
        }),
        (["database", "roles", name], "GET") => {
            reply(node.db_role_read(ctx, (*name).to_owned()).await, |r, rid| {
                let data = json!({
                    "db_name": r.db,
                    "creation_statements": [r.creation_sql],
                    "revocation_statements": [r.revocation_sql],
                    "renew_statements": [r.renew_sql],
                    "default_ttl": r.ttl_secs,
                    "max_ttl": r.max_ttl_secs,
                    "max_leases_per_identity": r.max_leases_per_identity,
                });
                json_response(StatusCode::OK, envelope(rid, data, Value::Null))
            })
        }
        (["database", "roles", name], "DELETE") => {
            reply(node.db_role_delete(ctx, (*name).to_owned()).await, |(), _| no_content())
        }
        (["database", "creds", role], "GET") => {
            reply(node.db_creds(ctx, (*role).to_owned()).await, |c, rid| {
                let secs = c.lease.expire_unix_ms.saturating_sub(c.lease.issued_unix_ms) / 1000;
                json_response(
                    StatusCode::OK,
                    db_creds_reply(rid, &c.lease.id, secs, &c.lease.username, &c.password),
                )
            })
        }
        (["sys", "leases", "renew"] | ["sys", "renew"], "POST" | "PUT") => {
            let id = body["lease_id"].as_str().unwrap_or_default().to_owned();
            let increment = bad!(duration_secs(&body["increment"]));
            reply(node.lease_renew(ctx, id, increment).await, |l, rid| {
                let secs = l.expire_unix_ms.saturating_sub(now_unix_ms()) / 1000;
                json_response(
                    StatusCode::OK,
                    json!({"request_id": rid, "lease_id": l.id, "renewable": true, "lease_duration": secs,
                           "data": null, "wrap_info": null, "warnings": null, "auth": null}),
                )
            })
        }
        (["sys", "leases", "revoke"] | ["sys", "revoke"], "POST" | "PUT") => {
            let id = body["lease_id"].as_str().unwrap_or_default().to_owned();
            reply(node.lease_revoke(ctx, id, false).await, |_, _| no_content())
        }
        (["sys", "leases", "lookup", rest @ ..], _) if list => {
            // Vault lists a lease prefix as a directory: the next segment of each id under it.
            let mut prefix = rest.join("/");
            if !prefix.is_empty() && !prefix.ends_with('/') {
                prefix.push('/');
            }
            let cut = prefix.len();
            reply(node.lease_list(ctx, prefix, false).await, |(leases, _), rid| {
                let mut keys: Vec<String> = Vec::new();
                for lease in &leases {
                    let under = &lease.id[cut.min(lease.id.len())..];
                    let key = match under.find('/') {
                        Some(i) => &under[..=i],
                        None => under,
                    };
                    if keys.last().is_none_or(|k| k != key) {
                        keys.push(key.to_owned());
                    }
                }
                json_response(StatusCode::OK, envelope(rid, json!({"keys": keys}), Value::Null))
            })
        }
        (["sys", "leases", "revoke-prefix", rest @ ..], "POST" | "PUT") if !rest.is_empty() => {
            reply(node.lease_revoke(ctx, rest.join("/"), true).await, |_, _| no_content())
        }
        (["sys", "leases", "lookup"], "POST" | "PUT") => {
            let id = body["lease_id"].as_str().unwrap_or_default().to_owned();
            reply(node.lease_lookup(ctx, id).await, |l, rid| {
                let ttl = l.expire_unix_ms.saturating_sub(now_unix_ms()) / 1000;
                json_response(
                    StatusCode::OK,
                    envelope(
                        rid,
                        json!({"id": l.id, "issue_time": rfc3339(l.issued_unix_ms),
                        "expire_time": rfc3339(l.expire_unix_ms), "renewable": true, "ttl": ttl}),
                        Value::Null,
                    ),
                )
            })
        }
        (["auth", "token", "renew-self"], "POST" | "PUT") => {
            let increment = bad!(duration_secs(&body["increment"]));
            let own = ctx.token.clone();
            reply(node.token_renew(ctx, increment).await, |r, rid| {
                let token = NewToken { token: own.unwrap_or_default(), record: r };
                json_response(StatusCode::OK, envelope(rid, Value::Null, token_auth(&token)))
            })
        }
        (["auth", "token", "revoke-self"], "POST" | "PUT") => {
            reply(node.token_revoke(ctx, None).await, |_, _| no_content())
        }
        (["auth", "token", "revoke"], "POST" | "PUT") => {
            let token = Zeroizing::new(body["token"].as_str().unwrap_or_default().to_owned());
            reply(node.token_revoke_by_token(ctx, token).await, |_, _| no_content())
        }
        (["auth", "token", "revoke-accessor"], "POST" | "PUT") => {
            let accessor = body["accessor"].as_str().unwrap_or_default().to_owned();
            reply(node.token_revoke(ctx, Some(accessor)).await, |_, _| no_content())
        }
        (["auth", "approle", "login"], "POST" | "PUT") => {
            let role_id = Zeroizing::new(body["role_id"].as_str().unwrap_or_default().to_owned());
            let secret_id = Zeroizing::new(body["secret_id"].as_str().unwrap_or_default().to_owned());
            reply(node.approle_login(ctx, role_id, secret_id).await, |t, rid| {
                json_response(StatusCode::OK, envelope(rid, Value::Null, token_auth(&t)))
            })
        }
        (["auth", "approle", "role"], _) if list => reply(node.approle_list(ctx).await, |names, rid| {
            json_response(StatusCode::OK, envelope(rid, json!({"keys": names}), Value::Null))
        }),
        (["auth", "approle", "role", name], "POST" | "PUT") => {
            let policies =
                if body["token_policies"].is_null() { &body["policies"] } else { &body["token_policies"] };
            let req = WriteRoleRequest {
                name: (*name).to_owned(),
                policies: bad!(strings(policies, "token_policies")),
                token_ttl_secs: bad!(duration_secs(&body["token_ttl"])),
                secret_id_ttl_secs: bad!(duration_secs(&body["secret_id_ttl"])),
                secret_id_bound_cidrs: bad!(strings(&body["secret_id_bound_cidrs"], "secret_id_bound_cidrs")),
                token_bound_cidrs: bad!(strings(&body["token_bound_cidrs"], "token_bound_cidrs")),
                metadata: Default::default(),
            };
            reply(node.approle_write(ctx, req).await, |_, _| no_content())
        }
        (["auth", "approle", "role", name], "GET") => {
            reply(node.approle_read(ctx, (*name).to_owned()).await, |r, rid| {
                json_response(StatusCode::OK, envelope(rid, role_json(&r), Value::Null))
            })
        }
        (["auth", "approle", "role", name], "DELETE") => {
            reply(node.approle_delete(ctx, (*name).to_owned()).await, |(), _| no_content())
        }
        (["auth", "approle", "role", name, "role-id"], "GET") => {
            reply(node.approle_role_id(ctx, (*name).to_owned()).await, |id, rid| {
                json_response(StatusCode::OK, envelope(rid, json!({"role_id": id}), Value::Null))
            })
        }
        (["auth", "approle", "role", name, "secret-id"], "POST" | "PUT") => {
            reply(node.approle_secret_id(ctx, (*name).to_owned()).await, |s, rid| {
                let data = SecretIdReply::new(&s.secret_id, &s.accessor, s.expire_unix_ms.unwrap_or(0));
                json_response(StatusCode::OK, envelope(rid, data, Value::Null))
            })
        }
        ([mount, "config"], "GET") => reply(node.kv_config_read(ctx, (*mount).to_owned()).await, |c, rid| {
            json_response(StatusCode::OK, envelope(rid, kv_config_json(&c), Value::Null))
        }),
        ([mount, "config"], "POST" | "PUT") => {
            let update = crate::kv::KvConfigUpdate {
                max_versions: bad!(uint_field(&body["max_versions"], "max_versions"))
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
                cas_required: bad!(bool_field(&body["cas_required"], "cas_required")),
                delete_version_after_secs: bad!(duration_secs(&body["delete_version_after"])),
            };
            reply(node.kv_config_write(ctx, (*mount).to_owned(), update).await, |_, _| no_content())
        }
        ([mount, "subkeys", rest @ ..], "GET") if !rest.is_empty() => {
            let (mount, secret) = ((*mount).to_owned(), rest.join("/"));
            let number = |name: &str| match query.get(name) {
                None => Ok(None),
                Some(v) => v
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| ApiError::invalid(format!("{name} must be a number"))),
            };
            let version = bad!(number("version"));
            let depth =
                bad!(number("depth")).unwrap_or(0).min(crate::kv::MAX_VALUE_DEPTH as u64 + 1) as usize;
            let selector = crate::kv::Selector::version(version);
            reply(node.kv_subkeys(ctx, mount, secret, selector, depth).await, |(keys, s), rid| {
                let data = json!({"subkeys": keys, "metadata": version_meta(s.version, &s.meta, &s.custom_metadata)});
                json_response(StatusCode::OK, envelope(rid, data, Value::Null))
            })
        }
        ([mount, "data", rest @ ..], _) if !rest.is_empty() => {
            let (mount, secret) = ((*mount).to_owned(), rest.join("/"));
            match m {
                "GET" => {
                    let version = match query.get("version") {
                        None => None,
                        Some(v) => Some(bad!(
                            v.parse::<u64>().map_err(|_| ApiError::invalid("version must be a number"))
                        )),
                    };
                    reply(
                        node.kv_read_plain_at(ctx, mount, secret, crate::kv::Selector::version(version))
                            .await,
                        |s, rid| kv_read_reply(&s, rid),
                    )
                }
                "POST" | "PUT" => {
                    let data = match body.get_mut("data").map(Value::take) {
                        Some(Value::Object(fields)) => SecretData(fields.into_iter().collect()),
                        None | Some(Value::Null) => SecretData::default(),
                        Some(_) => return Err((ctx, Reject::Bad("data: must be an object".into()))),
                    };
                    let cas = body["options"]["cas"].as_u64();
                    reply(node.kv_write(ctx, mount, secret, data, cas).await, written)
                }
                "PATCH" => {
                    // A JSON merge patch (RFC 7396), as Vault's: null members remove.
                    let Some(Value::Object(fields)) = body.get_mut("data").map(Value::take) else {
                        return Err((ctx, Reject::Bad("patch: data must be an object".into())));
                    };
                    let mut set = BTreeMap::new();
                    let mut remove = Vec::new();
                    for (k, v) in fields {
                        if v.is_null() {
                            remove.push(k);
                        } else {
                            set.insert(k, v);
                        }
                    }
                    let cas = body["options"]["cas"].as_u64();
                    reply(node.kv_patch(ctx, mount, secret, SecretData(set), remove, cas).await, written)
                }
                "DELETE" => reply(node.kv_delete(ctx, mount, secret, Vec::new()).await, |_, _| no_content()),
                _ => return Err((ctx, Reject::Method)),
            }
        }
        ([mount, verb @ ("delete" | "undelete" | "destroy"), rest @ ..], "POST" | "PUT")
            if !rest.is_empty() =>
        {
            let (mount, secret) = ((*mount).to_owned(), rest.join("/"));
            let versions = bad!(versions(&body["versions"]));
            let audited = match *verb {
                "delete" => {
                    if versions.is_empty() {
                        return Err((ctx, Reject::Bad("no version number provided".into())));
                    }
                    node.kv_delete(ctx, mount, secret, versions).await
                }
                "undelete" => node.kv_undelete(ctx, mount, secret, versions).await,
                _ => node.kv_destroy(ctx, mount, secret, versions).await,
            };
            reply(audited, |_, _| no_content())
        }
        ([_, "delete" | "undelete" | "destroy", rest @ ..], _) if !rest.is_empty() => {
            return Err((ctx, Reject::Method));
        }
        ([mount, "metadata", rest @ ..], _) => {
            let (mount, secret) = ((*mount).to_owned(), rest.join("/"));
            if list {
                return Ok(reply(node.kv_list(ctx, mount, secret).await, |keys, rid| {
                    if keys.is_empty() {
                        errors(StatusCode::NOT_FOUND, &[])
                    } else {
                        json_response(StatusCode::OK, envelope(rid, json!({"keys": keys}), Value::Null))
                    }
                }));
            }
            match m {
                "GET" => reply(node.kv_read_metadata(ctx, mount, secret).await, |meta, rid| {
                    json_response(StatusCode::OK, envelope(rid, metadata_json(&meta), Value::Null))
                }),
                "POST" | "PUT" | "PATCH" => {
                    let update = MetadataUpdate {
                        max_versions: bad!(uint_field(&body["max_versions"], "max_versions"))
                            .map(|v| v.min(u64::from(u32::MAX)) as u32),
                        cas_required: bad!(bool_field(&body["cas_required"], "cas_required")),
                        custom_metadata: if body["custom_metadata"].is_null() {
                            None
                        } else {
                            Some(bad!(string_map(&body["custom_metadata"], "custom_metadata")))
                        },
                        delete_version_after_secs: bad!(duration_secs(&body["delete_version_after"])),
                    };
                    reply(node.kv_write_metadata(ctx, mount, secret, update).await, |_, _| no_content())
                }
                "DELETE" => reply(node.kv_delete_metadata(ctx, mount, secret).await, |(), _| no_content()),
                _ => return Err((ctx, Reject::Method)),
            }
        }
        _ if write || matches!(m, "GET" | "DELETE" | "LIST" | "PATCH" | "HEAD") => {
            return Err((ctx, Reject::NoRoute));
        }
        _ => return Err((ctx, Reject::Method)),
    };
    Ok(response)
}

/// Vault's seal-status body. `seal_type` is the store's seal (`"shamir"`, `"pkcs11"`, or
/// empty before init, shown as Shamir); an HSM seal reports its Shamir shares as recovery
/// keys (`recovery_seal`), as Vault does for auto-unseal.
fn seal_status(
    node: &Node,
    seal_type: &str,
    initialized: bool,
    sealed: bool,
    shares: u8,
    threshold: u8,
    progress: u8,
) -> Value {
    let id = node.identity();
    let hsm = seal_type == "pkcs11";
    json!({
        "type": if hsm { "pkcs11" } else { "shamir" }, "initialized": initialized, "sealed": sealed,
        "t": threshold, "n": shares, "progress": progress,
        "nonce": "", "version": concat!("arca-", env!("CARGO_PKG_VERSION")), "build_date": "", "migration": false,
        "cluster_name": id.cluster, "cluster_id": "", "recovery_seal": hsm, "storage_type": "arca",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_answer_unwraps_over_http_in_vaults_shape_or_as_its_method_and_message() {
        use prost::Message as _;
        let stored = |method: &str, message: Vec<u8>| {
            json!({"grpc_method": method, "message": B64.encode(message)}).to_string()
        };
        // A response wrapped over HTTP is returned as it was.
        assert!(unwrapped_grpc(r#"{"data": {"a": "b"}}"#, "rid").is_none());
        // A KV read: values typed as the secret holds them; a JSON key whose text is not
        // JSON stays text.
        let read = crate::proto::KvGetResponse {
            data: [("pw", "s3"), ("n", "7"), ("bad", "{")].map(|(k, v)| (k.into(), v.into())).into(),
            version: 3,
            json_keys: vec!["n".into(), "bad".into()],
            ..Default::default()
        };
        let text = unwrapped_grpc(&stored("/arca.v1.Arca/KvGet", read.encode_to_vec()), "rid").unwrap();
        let body: Value = serde_json::from_slice(&text.0).unwrap();
        assert_eq!(body["data"]["data"], json!({"pw": "s3", "n": 7, "bad": "{"}));
        assert_eq!(
            (body["request_id"].as_str(), &body["data"]["metadata"]["version"]),
            (Some("rid"), &json!(3))
        );
        // Dynamic database credentials: under their lease, the password in `data`.
        let creds = crate::proto::DbCredsResponse {
            lease: Some(crate::proto::LeaseInfo {
                lease_id: "database/creds/ro/abc".into(),
                username: "v-ro-1".into(),
                issued_unix_ms: 1_000,
                expire_unix_ms: 3_601_000,
                ..Default::default()
            }),
            username: "v-ro-1".into(),
            password: "pg-pw".into(),
        };
        let text = unwrapped_grpc(&stored("/arca.v1.Arca/DbCreds", creds.encode_to_vec()), "rid").unwrap();
        let body: Value = serde_json::from_slice(&text.0).unwrap();
        assert_eq!(
            (&body["lease_id"], &body["lease_duration"], &body["renewable"]),
            (&json!("database/creds/ro/abc"), &json!(3600), &json!(true))
        );
        assert_eq!(body["data"], json!({"username": "v-ro-1", "password": "pg-pw"}));
        // Any other answer: its method and message, in `data`.
        let other = crate::proto::PolicyText { name: "p".into(), ..Default::default() }.encode_to_vec();
        let text = unwrapped_grpc(&stored("/arca.v1.Arca/PolicyRead", other.clone()), "rid").unwrap();
        let body: Value = serde_json::from_slice(&text.0).unwrap();
        assert_eq!(
            body["data"],
            json!({"grpc_method": "/arca.v1.Arca/PolicyRead", "message": B64.encode(&other)})
        );
        // A message that does not decode as its method's falls back the same way.
        let text = unwrapped_grpc(&stored("/arca.v1.Arca/KvGet", vec![0xff]), "rid").unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&text.0).unwrap()["data"]["grpc_method"],
            "/arca.v1.Arca/KvGet"
        );
    }

    #[test]
    fn a_reply_body_grows_and_keeps_every_byte() {
        use std::io::Write as _;
        let value = json!({"a": "x".repeat(10_000), "b": [1, 2, 3]});
        let mut body = ZeroizingBody::with_capacity(4);
        serde_json::to_writer(&mut body, &value).unwrap();
        assert_eq!(body.0.as_slice(), serde_json::to_vec(&value).unwrap().as_slice());
        body.write_all(b" ").unwrap();
        assert_eq!(body.0.last(), Some(&b' '));
        assert_eq!(ZeroizingBody::from_text("{}").0.as_slice(), b"{}");
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123000000Z");
        assert_eq!(rfc3339(1_795_727_994_955), "2026-11-26T21:19:54.955000000Z");
        assert_eq!(rfc3339(253_402_300_799_999), "9999-12-31T23:59:59.999000000Z");
        assert_eq!(rfc3339(253_402_300_800_000), "10000-01-01T00:00:00.000000000Z");
    }

    proptest::proptest! {
        /// The hand-written digits match `format!` over the civil date from the same fields.
        #[test]
        fn rfc3339_matches_the_formatted_fields(unix_ms in 0u64..400_000_000_000_000) {
            let text = rfc3339(unix_ms);
            let (date, time) = text.split_once('T').unwrap();
            let fields: Vec<u64> = date.split('-').chain(time.trim_end_matches('Z').split([':', '.']))
                .map(|f| f.parse().unwrap()).collect();
            let [year, month, day, hour, minute, second, nanos] = fields[..] else { panic!("{text}") };
            let expected = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{nanos:09}Z"
            );
            proptest::prop_assert_eq!(&text, &expected);
            // Days since the epoch from the civil date (Howard Hinnant's days_from_civil).
            let (y, m) = if month <= 2 { (year as i64 - 1, month + 9) } else { (year as i64, month - 3) };
            let era = y.div_euclid(400);
            let yoe = y - era * 400;
            let doy = (153 * m as i64 + 2) / 5 + day as i64 - 1;
            let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
            let days = era * 146_097 + doe - 719_468;
            let back = ((days as u64 * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + nanos / 1_000_000;
            proptest::prop_assert_eq!(back, unix_ms);
        }
    }

    #[tokio::test]
    async fn the_typed_kv_read_reply_is_the_vault_envelope() {
        let custom = BTreeMap::from([("owner".to_owned(), "team \"a\"".to_owned())]);
        for (deleted, custom) in [(None, BTreeMap::new()), (Some(1_795_727_994_955), custom)] {
            let data: SecretData = [
                ("password", json!("p\u{e9}\n\"x\"\u{1}")),
                ("user", json!("u")),
                ("pool", json!({"hosts": ["a", "b"], "size": 4, "tls": true, "note": null})),
            ]
            .into_iter()
            .collect();
            // As `kv_write` stores it (`Env::put_json`).
            let s = crate::kv::PlainVersion {
                json: Zeroizing::new(serde_json::to_vec(&data).unwrap()),
                version: 7,
                meta: crate::kv::VersionMeta {
                    created_unix_ms: 951_782_400_123,
                    deletion_unix_ms: deleted,
                    destroyed: false,
                    revoked_unix_ms: None,
                    slot: None,
                },
                custom_metadata: custom,
            };
            let custom_json =
                if s.custom_metadata.is_empty() { Value::Null } else { json!(s.custom_metadata) };
            let meta = json!({
                "created_time": "2000-02-29T00:00:00.123000000Z", "custom_metadata": custom_json,
                "deletion_time": deleted.map(rfc3339).unwrap_or_default(), "destroyed": false, "version": 7,
            });
            let expected = json!({
                "request_id": "rid-1", "lease_id": "", "renewable": false, "lease_duration": 0,
                "data": {"data": data.0.clone(), "metadata": meta}, "wrap_info": null, "warnings": null, "auth": null,
            });
            let response = kv_read_reply(&s, "rid-1");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), expected);
            assert_eq!(body, expected.to_string().as_bytes(), "same bytes, same field order");
        }
    }

    #[tokio::test]
    async fn a_stored_value_that_is_not_one_json_value_is_an_internal_error_not_a_broken_body() {
        let meta = crate::kv::VersionMeta {
            created_unix_ms: 1,
            deletion_unix_ms: None,
            destroyed: false,
            revoked_unix_ms: None,
            slot: None,
        };
        for bad in [&b"{\"a\":"[..], b"{}{}", b"", b"{\"a\":\"\xff\"}"] {
            let s = crate::kv::PlainVersion {
                json: Zeroizing::new(bad.to_vec()),
                version: 1,
                meta: meta.clone(),
                custom_metadata: BTreeMap::new(),
            };
            let response = kv_read_reply(&s, "rid-1");
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR, "{bad:?}");
            let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            assert_eq!(
                serde_json::from_slice::<Value>(&body).unwrap(),
                json!({"errors": ["internal error"]})
            );
        }
    }

    #[test]
    fn durations_parse_like_vault() {
        assert_eq!(duration_secs(&json!("1h")).unwrap(), Some(3600));
        assert_eq!(duration_secs(&json!("90")).unwrap(), Some(90));
        assert_eq!(duration_secs(&json!(45)).unwrap(), Some(45));
        assert_eq!(duration_secs(&json!(null)).unwrap(), None);
        assert_eq!(duration_secs(&json!("1h0m0s")).unwrap(), Some(3600));
        assert_eq!(duration_secs(&json!("2m30s")).unwrap(), Some(150));
        assert!(duration_secs(&json!("1y")).is_err());
        assert!(duration_secs(&json!("-5s")).is_err());
    }
}
