//! Dynamic database credentials (PostgreSQL) and leases.
//!
//! An operator stores a **connection** (`database/config/<name>`: an admin URL, kept sealed
//! and never returned) and **roles** (`database/roles/<name>`: creation, revocation and
//! renewal SQL with `{{name}}`, `{{password}}` and `{{expiration}}` placeholders, a TTL, a
//! maximum TTL and a per-identity lease quota). Each read of `database/creds/<role>` creates
//! a fresh user with a random name and password and a **lease**; the password is returned
//! once and never stored.
//!
//! Leases (`sys/leases/*`): renew (up to the maximum TTL; the renewal SQL moves the user's
//! `VALID UNTIL`), revoke, revoke by prefix. The **reaper** — on the region's scheduler node,
//! by lease — revokes expired leases, at most [`REAP_BATCH`] per round, so a pile-up drains
//! without swamping the database; leases live in the store, so they survive restarts and the
//! loss of any node. A revocation is done only once the database confirmed it: until then
//! the lease stays, due, and the reaper tries again. Every step is an audited event.
//!
//! Order of effects: a lease is recorded (audited) before its user is created, so a crash
//! in between leaves a lease whose revocation (`DROP ROLE IF EXISTS`) is harmless — never a
//! user arca does not know about.

use std::sync::Arc;
use std::time::Duration;

use arca_audit::Operation;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use crate::error::ApiError;
use crate::keys;
use crate::node::{Audited, Env, Node, RequestContext};
use crate::policy::{self, Capability};

/// Expired leases revoked per reaper round.
pub const REAP_BATCH: usize = 100;
/// How long after a rotation of an admin password began the scheduler may finish it: past
/// any wait of its own request on the database.
pub const RESUME_ROTATION_AFTER: Duration = Duration::from_secs(30);
/// Most leases one list returns.
pub const LEASE_LIST_LIMIT: usize = 1000;
const SQL_TIMEOUT: Duration = Duration::from_secs(10);
/// Ends the user's sessions, drops its privileges (also on shared objects such as the
/// database's CONNECT) and the user; does nothing when it was never created.
const DEFAULT_REVOCATION_SQL: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; \
     DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{{name}}') THEN \
     EXECUTE 'DROP OWNED BY \"{{name}}\"'; EXECUTE 'DROP ROLE \"{{name}}\"'; END IF; END $$;";
const DEFAULT_RENEW_SQL: &str = "ALTER ROLE \"{{name}}\" VALID UNTIL '{{expiration}}';";

/// A database connection (sealed; the URL holds the admin password). Its `sslmode` and
/// `ca_pem` choose TLS (see [`crate::pgtls`]).
#[derive(Clone, Serialize, Deserialize)]
pub struct Connection {
    pub name: String,
    pub url: String,
    /// The CA certificates (PEM) the server's certificate must chain to; Mozilla's roots
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// A client certificate (PEM, its chain after it) to present, and its private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_pem: Option<String>,
    /// The URL with a new admin password, while a rotation of it is under way
    /// ([`Node::db_rotate_root`]): stored before the database is told, so a rotation whose
    /// answer was lost can be finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_url: Option<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("name", &self.name)
            .field("url", &"<redacted>")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.url.zeroize();
        if let Some(key) = &mut self.client_key_pem {
            key.zeroize();
        }
        if let Some(url) = &mut self.pending_url {
            url.zeroize();
        }
    }
}

/// A connection's TLS material beside its URL (see [`crate::pgtls`]).
#[derive(Clone, Default)]
pub struct DbTls {
    /// The server's CA certificates (PEM); Mozilla's roots when absent.
    pub ca_pem: Option<String>,
    /// A client certificate (PEM) and its private key (PEM), both or neither.
    pub client_cert_pem: Option<String>,
    pub client_key_pem: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for DbTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbTls")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl DbTls {
    /// The client certificate and its key, when the connection has both.
    pub fn client(&self) -> Option<crate::pgtls::ClientCert<'_>> {
        match (&self.client_cert_pem, &self.client_key_pem) {
            (Some(cert_pem), Some(key_pem)) => Some(crate::pgtls::ClientCert { cert_pem, key_pem }),
            _ => None,
        }
    }
}

/// Where statements go: a connection's URL and TLS material (zeroized when dropped).
struct Target {
    url: Zeroizing<String>,
    tls: DbTls,
}

impl From<Connection> for Target {
    fn from(mut conn: Connection) -> Target {
        Target {
            url: Zeroizing::new(std::mem::take(&mut conn.url)),
            tls: DbTls {
                ca_pem: conn.ca_pem.take(),
                client_cert_pem: conn.client_cert_pem.take(),
                client_key_pem: conn.client_key_pem.take().map(Zeroizing::new),
            },
        }
    }
}

/// A role: what each credential is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub db: String,
    pub creation_sql: String,
    pub revocation_sql: String,
    pub renew_sql: String,
    pub ttl_secs: u64,
    pub max_ttl_secs: u64,
    /// Leases one identity may hold on this role at once.
    pub max_leases_per_identity: u32,
}

/// A lease on dynamic credentials.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub role: String,
    pub db: String,
    pub username: String,
    pub issued_unix_ms: u64,
    pub expire_unix_ms: u64,
    pub max_expire_unix_ms: u64,
    pub owner_entity: String,
}

/// What `db creds` returns, once.
pub struct Credentials {
    pub lease: Lease,
    pub password: Zeroizing<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("lease", &self.lease).field("password", &"<redacted>").finish()
    }
}

/// A role to write.
#[derive(Debug, Clone, Default)]
pub struct RoleRequest {
    pub name: String,
    pub db: String,
    pub creation_sql: String,
    pub revocation_sql: Option<String>,
    pub renew_sql: Option<String>,
    pub ttl_secs: Option<u64>,
    pub max_ttl_secs: Option<u64>,
    pub max_leases_per_identity: Option<u32>,
}

/// Checks a connection as `database/config/<name>` takes it, before anything is stored: the
/// name, the URL (PostgreSQL's, its `sslmode` one arca knows and no file parameter), the CA
/// certificates, and the client certificate with its key. Errors name the field, never the
/// URL (it holds the admin password) or the key.
pub fn check_connection(name: &str, url: &str, tls: &DbTls) -> Result<(), ApiError> {
    validate_name(name)?;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) || url.len() > 2048 {
        return Err(ApiError::invalid("url: postgres://user:password@host:port/database"));
    }
    let (prepared, mode) = crate::pgtls::prepare(url).map_err(ApiError::invalid)?;
    if prepared.parse::<tokio_postgres::Config>().is_err() {
        return Err(ApiError::invalid("url: not a PostgreSQL connection URL"));
    }
    if let Some(pem) = &tls.ca_pem {
        crate::pgtls::parse_ca(pem).map_err(ApiError::invalid)?;
    }
    if tls.client_cert_pem.is_some() != tls.client_key_pem.is_some() {
        return Err(ApiError::invalid("client_cert_pem and client_key_pem: give both or neither"));
    }
    let any = tls.ca_pem.is_some() || tls.client_cert_pem.is_some();
    if any && mode == crate::pgtls::TlsMode::Off {
        return Err(ApiError::invalid(
            "ca_pem and client certificates need TLS: add sslmode=verify-full (or require, verify-ca) to the url",
        ));
    }
    if tls.client().is_some() {
        // Builds the TLS settings once: a key that is not the certificate's is refused here.
        crate::pgtls::connector(mode, tls.ca_pem.as_deref(), tls.client()).map_err(ApiError::invalid)?;
    }
    Ok(())
}

/// What reading a connection shows: never its password or its client key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub name: String,
    /// The URL rebuilt from its user, hosts, ports, database and `sslmode` alone
    /// ([`url_summary`]): no password, no other parameter.
    pub url: String,
    pub has_ca: bool,
    pub has_client_cert: bool,
    /// The roles that name this connection.
    pub roles: Vec<String>,
    /// A rotation of the admin password was interrupted: `rotate-root` again finishes it.
    pub root_rotation_pending: bool,
}

/// A connection URL as it may be shown: rebuilt from what tokio-postgres parsed out of it,
/// so a password — in the user part, in a `password` parameter, percent-encoded or not —
/// cannot be in it.
pub fn url_summary(url: &str) -> String {
    let Ok((prepared, _)) = crate::pgtls::prepare(url) else { return "(unreadable)".into() };
    let Ok(config) = prepared.parse::<tokio_postgres::Config>() else { return "(unreadable)".into() };
    // Each part percent-encoded, so that none can read as another (a database named
    // `x?password=y` stays a database name).
    let encode = percent_encode;
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(h) if h.parse::<std::net::Ipv6Addr>().is_ok() => {
                    format!("[{h}]")
                }
                tokio_postgres::config::Host::Tcp(h) => encode(h),
                tokio_postgres::config::Host::Unix(path) => encode(&path.to_string_lossy()),
            };
            match ports.get(i).or(if ports.len() == 1 { ports.first() } else { None }) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let sslmode = url
        .split_once('?')
        .and_then(|(_, query)| query.split('&').rev().find_map(|p| p.strip_prefix("sslmode=")))
        .unwrap_or("disable");
    format!(
        "postgres://{}@{}/{}?sslmode={sslmode}",
        encode(config.get_user().unwrap_or_default()),
        hosts.join(","),
        encode(config.get_dbname().unwrap_or_default())
    )
}

/// `text` with every byte but URL-unreserved ones (`A-Z a-z 0-9 - . _ ~`) as `%XX`: safe in
/// any part of a URL.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `url` with the admin password in its user part replaced by `password` (alphanumeric),
/// and the user it is for. Refused unless the URL is `postgres://user:password@…` and the
/// driver reads the new password back out of the result (a `password` parameter would win).
fn with_password(url: &str, password: &str) -> Result<(Zeroizing<String>, String), ApiError> {
    let unfit = || {
        ApiError::FailedPrecondition(
            "rotate-root needs the admin password in the URL's user part: postgres://user:password@host/db"
                .into(),
        )
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(unfit)?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (userinfo, hosts) = rest[..authority_end].rsplit_once('@').ok_or_else(unfit)?;
    let (user, _) = userinfo.split_once(':').ok_or_else(unfit)?;
    if user.is_empty() {
        return Err(unfit());
    }
    let rotated = Zeroizing::new(format!("{scheme}://{user}:{password}@{hosts}{}", &rest[authority_end..]));
    let (prepared, _) = crate::pgtls::prepare(&rotated).map_err(|_| unfit())?;
    let prepared = Zeroizing::new(prepared);
    let config: tokio_postgres::Config = prepared.parse().map_err(|_| unfit())?;
    if config.get_password() != Some(password.as_bytes()) {
        return Err(unfit());
    }
    let user = config.get_user().ok_or_else(unfit)?.to_owned();
    Ok((rotated, user))
}

/// The password in a URL [`with_password`] made.
fn password_of(url: &str) -> Option<Zeroizing<String>> {
    let (prepared, _) = crate::pgtls::prepare(url).ok()?;
    let prepared = Zeroizing::new(prepared);
    let config: tokio_postgres::Config = prepared.parse().ok()?;
    Some(Zeroizing::new(String::from_utf8(config.get_password()?.to_vec()).ok()?))
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    policy::validate_name(name)
        .map_err(|_| ApiError::invalid("name: 1 to 128 characters from a-z, 0-9, '-', '_', '.'"))
}

fn validate_sql(what: &str, sql: &str) -> Result<(), ApiError> {
    if sql.trim().is_empty() || sql.len() > 16 * 1024 {
        return Err(ApiError::invalid(format!("{what}: 1 byte to 16 KiB of SQL")));
    }
    Ok(())
}

fn random_alnum(n: usize) -> String {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut out = String::with_capacity(n);
    while out.len() < n {
        let mut buf = [0u8; 32];
        rand::fill(&mut buf);
        for b in buf {
            if (b as usize) < 248 && out.len() < n {
                out.push(ALNUM[b as usize % 62] as char);
            }
        }
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS+00`, for `VALID UNTIL`.
fn timestamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (y, m, d) = crate::lifecycle::civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}+00", s / 3600, s / 60 % 60, s % 60)
}

/// The SQL with placeholders filled in. Names are `[a-z0-9_]`, passwords alphanumeric: no
/// quoting can be broken by them.
fn render(sql: &str, name: &str, password: &str, expire_unix_ms: u64) -> Zeroizing<String> {
    Zeroizing::new(
        sql.replace("{{name}}", name)
            .replace("{{password}}", password)
            .replace("{{expiration}}", &timestamp(expire_unix_ms)),
    )
}

/// Attempts at a statement batch that failed with a transient SQLSTATE (see [`transient`]).
const SQL_ATTEMPTS: u32 = 5;

/// Whether a SQLSTATE names a failure that the same statements may not meet again: a
/// serialization failure or deadlock (class 40), a lock not available (55P03), or an internal
/// error (XX000) — PostgreSQL's "tuple concurrently updated", raised when two sessions change
/// the same catalog row at once: two `GRANT`s or `DROP OWNED`s on one database's ACL, say.
/// A batch runs as one implicit transaction, so a failed attempt left nothing behind.
fn transient(code: &str) -> bool {
    code.starts_with("40") || code == "55P03" || code == "XX000"
}

/// Leases being revoked on this node, each behind its own lock, so two reaps of one lease
/// never run at once and reaps of different leases never wait for each other.
#[derive(Default)]
pub(crate) struct Reaping {
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Reaping {
    /// Waits until no other reap of lease `id` runs on this node; holds it off until dropped.
    async fn lock(&self, id: &str) -> ReapGuard<'_> {
        let lock = self.map().entry(id.to_owned()).or_default().clone();
        let mut held = ReapGuard { reaping: self, id: id.to_owned(), lock: Some(lock.clone()), guard: None };
        held.guard = Some(lock.lock_owned().await);
        held
    }

    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leases with a reap running or waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

/// A lease's reap; the last one out removes the lease's lock (also when cancelled while
/// waiting for it).
struct ReapGuard<'a> {
    reaping: &'a Reaping,
    id: String,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ReapGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.reaping.map();
        drop(self.lock.take());
        // No one else holds or waits for the lock (every holder took it from the map, under
        // the map's lock): it goes.
        if map.get(&self.id).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            map.remove(&self.id);
        }
    }
}

/// Why statements failed on a connection's database.
#[derive(Debug)]
enum SqlError {
    /// The database was not reached, or did not answer in time: no session, a dropped one,
    /// or no reply within [`SQL_TIMEOUT`]. The database's failure, not the statements'.
    Unreachable(&'static str),
    /// The database answered and refused the statements, with this SQLSTATE.
    Refused(String),
    /// The connection's settings could not be used (TLS material).
    Settings(String),
}

impl From<SqlError> for ApiError {
    fn from(err: SqlError) -> ApiError {
        ApiError::FailedPrecondition(match err {
            SqlError::Unreachable(why) => format!("the database {why}"),
            SqlError::Refused(code) => format!("the database refused the statements (SQLSTATE {code})"),
            SqlError::Settings(why) => why,
        })
    }
}

/// Runs statements on the connection's database, retrying a transient failure
/// ([`SQL_ATTEMPTS`] attempts, with jittered backoff from 25 ms). Errors carry the SQLSTATE
/// only (a message might quote a statement, and a statement may hold a password).
async fn run_sql(target: &Target, sql: &str) -> Result<(), SqlError> {
    let (url, mode) = crate::pgtls::prepare(&target.url).map_err(SqlError::Settings)?;
    let url = Zeroizing::new(url);
    let tls = match mode {
        crate::pgtls::TlsMode::Off => None,
        mode => Some(
            crate::pgtls::connector(mode, target.tls.ca_pem.as_deref(), target.tls.client())
                .map_err(SqlError::Settings)?,
        ),
    };
    let mut attempt = 1;
    loop {
        let work = async {
            match &tls {
                None => batch(&url, tokio_postgres::NoTls, sql).await,
                Some(tls) => batch(&url, tls.clone(), sql).await,
            }
        };
        let err = match tokio::time::timeout(SQL_TIMEOUT, work).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => err,
            Err(_) => {
                tracing::debug!("the database did not answer in time");
                return Err(SqlError::Unreachable("did not answer within 10 s"));
            }
        };
        let code = err.code().map_or("connection", |c| c.code());
        if attempt < SQL_ATTEMPTS && transient(code) {
            tracing::debug!(sqlstate = code, attempt, "a transient database failure; retrying");
            let base = 25u64 << (attempt - 1);
            let jitter = u64::from(rand::random::<u8>()) * base / 255;
            tokio::time::sleep(Duration::from_millis(base + jitter)).await;
            attempt += 1;
            continue;
        }
        if err.code().is_none() {
            tracing::debug!("the database could not be reached, or dropped the session");
            return Err(SqlError::Unreachable("could not be reached, or dropped the session"));
        }
        tracing::debug!(sqlstate = code, "the database refused a statement");
        return Err(SqlError::Refused(code.to_owned()));
    }
}

/// One session: connect (over `tls`), run `sql` as one batch, disconnect.
async fn batch<T>(url: &str, tls: T, sql: &str) -> Result<(), tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = tokio_postgres::connect(url, tls).await?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(sql).await;
    drop(client);
    let _ = driver.await;
    result
}

fn lease_key(id: &str) -> Result<Vec<u8>, ApiError> {
    if id.is_empty() || id.len() > 256 || id.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid("lease id: 1 to 256 printable characters"));
    }
    Ok(keys::lease(id))
}

fn put_lease(env: &mut Env<'_>, lease: &Lease, old_expire: Option<u64>) -> Result<(), ApiError> {
    if let Some(old) = old_expire {
        env.tx.clear(&keys::lease_expiry(old, &lease.id))?;
    }
    env.put_json(&lease_key(&lease.id)?, lease)?;
    env.tx.set(&keys::lease_expiry(lease.expire_unix_ms, &lease.id), b"")?;
    env.tx.set(&keys::lease_owner(&lease.owner_entity, &lease.role, &lease.id), b"")?;
    Ok(())
}

fn load_lease(env: &mut Env<'_>, id: &str) -> Result<Lease, ApiError> {
    env.get_json(&lease_key(id)?)?.ok_or_else(|| ApiError::NotFound("no such lease".into()))
}

/// What a rotation of connection `name`'s admin password needs: the connection as it is,
/// the connection with the new password, its user, the password, and whether it resumes
/// an interrupted rotation (whose pending password it reuses). A new rotation (`start`)
/// draws a password and stores the pending URL (and its plaintext index) first; without
/// `start`, nothing is pending: `None`.
type Rotation = (Target, Target, String, Zeroizing<String>, bool);

fn plan_rotation(env: &mut Env<'_>, name: &str, start: bool) -> Result<Option<Rotation>, ApiError> {
    let mut conn = load_conn(env, name)?;
    let resumed = conn.pending_url.is_some();
    if !resumed && !start {
        env.tx.clear(&keys::db_rotation_pending(name))?;
        return Ok(None);
    }
    let password = match conn.pending_url.as_deref().and_then(password_of) {
        Some(password) => password,
        None => Zeroizing::new(random_alnum(32)),
    };
    let (rotated, user) = with_password(&conn.url, &password)?;
    if !resumed {
        conn.pending_url = Some(rotated.to_string());
        env.put_json(&keys::db_connection(name), &conn)?;
        env.tx.set(&keys::db_rotation_pending(name), &env.now_unix_ms.to_be_bytes())?;
    }
    let pending = Target {
        url: rotated,
        tls: DbTls {
            ca_pem: conn.ca_pem.clone(),
            client_cert_pem: conn.client_cert_pem.clone(),
            client_key_pem: conn.client_key_pem.clone().map(Zeroizing::new),
        },
    };
    conn.pending_url = None;
    Ok(Some((Target::from(conn.clone()), pending, user, password, resumed)))
}

fn load_role(env: &mut Env<'_>, name: &str) -> Result<Role, ApiError> {
    env.get_json(&keys::db_role(name))?.ok_or_else(|| ApiError::NotFound(format!("no database role {name}")))
}

/// Whether any lease on `role` remains.
fn has_leases(env: &mut Env<'_>, role: &str) -> Result<bool, ApiError> {
    let begin = keys::lease_id_prefix(&format!("database/creds/{role}/"));
    let end = arca_store::prefix_end(&begin).ok_or(ApiError::Internal)?;
    Ok(!env.tx.get_range(&begin, &end, arca_store::RangeOptions::limit(1))?.is_empty())
}

/// The roles that name connection `db`.
fn roles_on(env: &mut Env<'_>, db: &str) -> Result<Vec<String>, ApiError> {
    let mut roles = Vec::new();
    for name in env.names_under(&keys::db_roles())? {
        let role = load_role(env, &name)?;
        if role.db == db {
            roles.push(name);
        }
    }
    Ok(roles)
}

fn load_conn(env: &mut Env<'_>, name: &str) -> Result<Connection, ApiError> {
    env.get_json(&keys::db_connection(name))?
        .ok_or_else(|| ApiError::NotFound(format!("no database connection {name}")))
}

impl Node {
    /// Stores a connection (needs `update` on `database/config/<name>`).
    pub async fn db_config_write(
        self: &Arc<Self>,
        ctx: RequestContext,
        name: String,
        url: Zeroizing<String>,
        tls: DbTls,
    ) -> Audited<()> {
        let path = format!("database/config/{name}");
        self.execute(ctx, Operation::DbConfigWrite, path.clone(), move |env| {
            check_connection(&name, &url, &tls)?;
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            env.put_json(
                &keys::db_connection(&name),
                &Connection {
                    name: name.clone(),
                    url: url.to_string(),
                    ca_pem: tls.ca_pem.clone(),
                    client_cert_pem: tls.client_cert_pem.clone(),
                    client_key_pem: tls.client_key_pem.as_ref().map(|k| k.to_string()),
                    pending_url: None,
                },
            )?;
            // A new URL ends any rotation of the old one.
            env.tx.clear(&keys::db_rotation_pending(&name))?;
            Ok(())
        })
        .await
    }

    /// Stores a role (needs `update` on `database/roles/<name>`).
    pub async fn db_role_write(self: &Arc<Self>, ctx: RequestContext, req: RoleRequest) -> Audited<Role> {
        let path = format!("database/roles/{}", req.name);
        self.execute(ctx, Operation::DbRoleWrite, path.clone(), move |env| {
            validate_name(&req.name)?;
            validate_name(&req.db)?;
            validate_sql("creation_sql", &req.creation_sql)?;
            let ttl = req.ttl_secs.unwrap_or(3600);
            let max_ttl = req.max_ttl_secs.unwrap_or(86_400);
            if ttl == 0 || ttl > max_ttl || max_ttl > 32 * 86_400 {
                return Err(ApiError::invalid("ttl: 1 second up to max_ttl; max_ttl: up to 32 days"));
            }
            let role = Role {
                name: req.name.clone(),
                db: req.db.clone(),
                creation_sql: req.creation_sql.clone(),
                revocation_sql: req.revocation_sql.clone().unwrap_or_else(|| DEFAULT_REVOCATION_SQL.into()),
                renew_sql: req.renew_sql.clone().unwrap_or_else(|| DEFAULT_RENEW_SQL.into()),
                ttl_secs: ttl,
                max_ttl_secs: max_ttl,
                max_leases_per_identity: req.max_leases_per_identity.unwrap_or(100).clamp(1, 100_000),
            };
            validate_sql("revocation_sql", &role.revocation_sql)?;
            validate_sql("renew_sql", &role.renew_sql)?;
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            load_conn(env, &role.db)?;
            // A lease is revoked on its own connection: a role keeps its connection while
            // leases on it remain, so no connection a lease needs can be deleted.
            if let Some(old) = env.get_json::<Role>(&keys::db_role(&role.name))?
                && old.db != role.db
                && has_leases(env, &role.name)?
            {
                return Err(ApiError::FailedPrecondition(format!(
                    "leases on role {} remain on connection {}: revoke them before moving the role",
                    role.name, old.db
                )));
            }
            env.put_json(&keys::db_role(&role.name), &role)?;
            Ok(role)
        })
        .await
    }

    /// A connection, without its password or client key (needs `read` on
    /// `database/config/<name>`).
    pub async fn db_config_read(
        self: &Arc<Self>,
        ctx: RequestContext,
        name: String,
    ) -> Audited<ConnectionInfo> {
        let path = format!("database/config/{name}");
        self.execute(ctx, Operation::DbConfigRead, path.clone(), move |env| {
            validate_name(&name)?;
            env.authorize(&path, &[Capability::Read])?;
            let conn = load_conn(env, &name)?;
            let roles = roles_on(env, &name)?;
            Ok(ConnectionInfo {
                name: name.clone(),
                url: url_summary(&conn.url),
                has_ca: conn.ca_pem.is_some(),
                has_client_cert: conn.client_cert_pem.is_some(),
                roles,
                root_rotation_pending: conn.pending_url.is_some(),
            })
        })
        .await
    }

    /// The connections' names (needs `list` on `database/config`).
    pub async fn db_config_list(self: &Arc<Self>, ctx: RequestContext) -> Audited<Vec<String>> {
        self.execute(ctx, Operation::DbConfigList, "database/config".into(), move |env| {
            env.authorize("database/config", &[Capability::List])?;
            env.names_under(&keys::db_connections())
        })
        .await
    }

    /// Deletes a connection (needs `delete` on `database/config/<name>`). Refused while a
    /// role names it: its leases could no longer be revoked (a role with leases keeps its
    /// connection, so no lease outlives its connection).
    pub async fn db_config_delete(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<()> {
        let path = format!("database/config/{name}");
        self.execute(ctx, Operation::DbConfigDelete, path.clone(), move |env| {
            validate_name(&name)?;
            env.authorize(&path, &[Capability::Delete])?;
            load_conn(env, &name)?;
            let roles = roles_on(env, &name)?;
            if !roles.is_empty() {
                return Err(ApiError::FailedPrecondition(format!(
                    "roles {} use connection {name}: delete them first",
                    roles.join(", ")
                )));
            }
            env.tx.clear(&keys::db_connection(&name))?;
            env.tx.clear(&keys::db_rotation_pending(&name))?;
            Ok(())
        })
        .await
    }

    /// A role, its statements included (needs `read` on `database/roles/<name>`).
    pub async fn db_role_read(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<Role> {
        let path = format!("database/roles/{name}");
        self.execute(ctx, Operation::DbRoleRead, path.clone(), move |env| {
            validate_name(&name)?;
            env.authorize(&path, &[Capability::Read])?;
            load_role(env, &name)
        })
        .await
    }

    /// The roles' names (needs `list` on `database/roles`).
    pub async fn db_role_list(self: &Arc<Self>, ctx: RequestContext) -> Audited<Vec<String>> {
        self.execute(ctx, Operation::DbRoleList, "database/roles".into(), move |env| {
            env.authorize("database/roles", &[Capability::List])?;
            env.names_under(&keys::db_roles())
        })
        .await
    }

    /// Deletes a role (needs `delete` on `database/roles/<name>`). Refused while leases on it
    /// remain: their revocation runs the role's statements.
    pub async fn db_role_delete(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<()> {
        let path = format!("database/roles/{name}");
        self.execute(ctx, Operation::DbRoleDelete, path.clone(), move |env| {
            validate_name(&name)?;
            env.authorize(&path, &[Capability::Delete])?;
            load_role(env, &name)?;
            if has_leases(env, &name)? {
                return Err(ApiError::FailedPrecondition(format!(
                    "leases on role {name} remain: revoke them first (lease revoke-prefix database/creds/{name}/)"
                )));
            }
            env.tx.clear(&keys::db_role(&name))?;
            Ok(())
        })
        .await
    }

    /// Rotates a connection's admin password (needs `update` on `database/rotate-root/<name>`):
    /// a fresh random one is set in the database over the connection, then stored, so that
    /// afterwards only arca knows it. The URL with the new password is stored (pending)
    /// before the database is told, and replaces the old once the database confirmed it. If
    /// the database's answer is lost, the pending URL stays and the next `rotate-root` tries
    /// it first; a database that refused the change leaves the old URL alone.
    pub async fn db_rotate_root(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<()> {
        let path = format!("database/rotate-root/{name}");
        let name_owned = name.clone();
        let planned = self
            .execute(ctx, Operation::DbRotateRoot, path.clone(), move |env| {
                validate_name(&name)?;
                env.authorize(&path, &[Capability::Update])?;
                plan_rotation(env, &name, true)?.ok_or(ApiError::Internal)
            })
            .await;
        let Audited { result, request_id, position } = planned;
        let result = match result {
            Err(e) => Err(e),
            Ok((current, pending, user, password, resumed)) => {
                self.finish_rotation(name_owned, current, pending, &user, &password, resumed).await
            }
        };
        Audited { result, request_id, position }
    }

    /// The scheduler's part in rotations: finishes those whose database answer was lost
    /// (a pending URL left), each after a wait that doubles while it fails (`retries`).
    pub(crate) async fn finish_interrupted_rotations(
        self: &Arc<Self>,
        retries: &mut crate::backoff::Backoff<String>,
    ) {
        use arca_store::StoreExt as _;
        let (begin, end) = keys::children_range(&keys::db_rotations_pending());
        let rows = self
            .store
            .transact(|tx| -> Result<_, ApiError> { Ok(tx.get_range(&begin, &end, Default::default())?) });
        let rows = match rows {
            Ok(rows) => rows.value,
            Err(err) => {
                tracing::debug!(error = %err, "interrupted rotations");
                return;
            }
        };
        // (name, when its rotation started)
        let pending: Vec<(String, u64)> = rows
            .iter()
            .filter_map(|row| {
                let name = arca_store::tuple::unpack(&row.key).ok()?.last()?.as_str()?.to_owned();
                let started =
                    row.value.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
                Some((name, started))
            })
            .collect();
        retries.keep_only(&pending.iter().map(|(name, _)| name.clone()).collect());
        let now = self.now();
        for (name, started) in pending {
            // A rotation still under way (its request waiting on the database, here or on
            // another node) is left to it.
            if now.saturating_sub(started) < RESUME_ROTATION_AFTER.as_millis() as u64
                || !retries.due(&name, std::time::Instant::now())
            {
                continue;
            }
            let path = format!("database/rotate-root/{name}");
            let owned = name.clone();
            let planned = self
                .execute_system(Operation::DbRotateRoot, path, move |env| {
                    env.actor.entity = "system:rotation".into();
                    plan_rotation(env, &owned, false)
                })
                .await;
            let finished = match planned.result {
                Ok(None) => Ok(()),
                Ok(Some((current, pending, user, password, _))) => {
                    self.finish_rotation(name.clone(), current, pending, &user, &password, true).await
                }
                Err(err) => Err(err),
            };
            match finished {
                Ok(()) => retries.succeeded(&name),
                Err(err) => {
                    let (failures, wait) = retries.failed(name.clone(), std::time::Instant::now());
                    tracing::warn!(db = %name, error = %err, failures, retry_in_s = wait.as_secs(), "an interrupted admin password rotation is not finished yet; tried again after a wait");
                }
            }
        }
    }

    /// [`Node::db_rotate_root`]'s second half: the database told, the pending URL settled.
    async fn finish_rotation(
        self: &Arc<Self>,
        name: String,
        current: Target,
        pending: Target,
        user: &str,
        password: &str,
        resumed: bool,
    ) -> Result<(), ApiError> {
        // A rotation whose answer was lost may have reached the database.
        let done = resumed && run_sql(&pending, "SELECT 1").await.is_ok();
        let sql = Zeroizing::new(format!(
            "ALTER ROLE \"{}\" WITH PASSWORD '{password}';",
            user.replace('"', "\"\"")
        ));
        let ran = if done { Ok(()) } else { run_sql(&current, &sql).await };
        // Settle the pending URL: in use (confirmed) or dropped (refused); a lost answer
        // keeps it for the next try (it may be in use).
        let refused = match ran {
            Ok(()) => None,
            Err(lost @ SqlError::Unreachable(_)) => {
                let err = ApiError::from(lost);
                tracing::warn!(db = %name, error = %err, "rotating a connection's admin password: no answer");
                return Err(ApiError::FailedPrecondition(format!(
                    "{err}: the new password may or may not be in use; the scheduler finishes the rotation (or rotate-root again)"
                )));
            }
            Err(other) => Some(ApiError::from(other)),
        };
        let confirmed = refused.is_none();
        let path = format!("database/rotate-root/{name}");
        self.execute_system(Operation::DbRotateRoot, path, move |env| {
            let mut conn = load_conn(env, &name)?;
            if let Some(url) = conn.pending_url.take()
                && confirmed
            {
                conn.url = url;
            }
            env.tx.clear(&keys::db_rotation_pending(&name))?;
            env.put_json(&keys::db_connection(&name), &conn)
        })
        .await
        .result?;
        match refused {
            None => Ok(()),
            Some(err) => {
                tracing::warn!(error = %err, "rotating a connection's admin password: refused");
                Err(err)
            }
        }
    }

    /// Creates fresh credentials for `role` (needs `read` on `database/creds/<role>`).
    pub async fn db_creds(self: &Arc<Self>, ctx: RequestContext, role: String) -> Audited<Credentials> {
        let path = format!("database/creds/{role}");
        let planned = self
            .execute(ctx, Operation::DbCreds, path.clone(), move |env| {
                validate_name(&role)?;
                let record = env.authorize(&path, &[Capability::Read])?;
                let r = load_role(env, &role)?;
                let conn = load_conn(env, &r.db)?;
                // The quota, counted in the same transaction as the new lease.
                let prefix = keys::lease_owner_prefix(&record.entity, &role);
                let end = arca_store::prefix_end(&prefix).ok_or(ApiError::Internal)?;
                let limit = r.max_leases_per_identity as usize;
                let on_role = env.tx.get_range(&prefix, &end, arca_store::RangeOptions::limit(limit))?.len();
                if on_role >= r.max_leases_per_identity as usize {
                    return Err(ApiError::FailedPrecondition(format!(
                        "lease quota reached: {} leases on database/creds/{role} for this identity; revoke some first",
                        r.max_leases_per_identity
                    )));
                }
                let now = env.now_unix_ms;
                let suffix = random_alnum(20);
                let username = format!("arca_{}_{}", role.replace(['-', '.'], "_"), suffix.to_lowercase());
                let username: String = username.chars().take(63).collect();
                let lease = Lease {
                    id: format!("database/creds/{role}/{suffix}"),
                    role: role.clone(),
                    db: r.db.clone(),
                    username,
                    issued_unix_ms: now,
                    expire_unix_ms: now + r.ttl_secs * 1000,
                    max_expire_unix_ms: now + r.max_ttl_secs * 1000,
                    owner_entity: record.entity.clone(),
                };
                put_lease(env, &lease, None)?;
                Ok((lease, Target::from(conn), r.creation_sql))
            })
            .await;
        let Audited { result, request_id, position } = planned;
        let result = match result {
            Err(e) => Err(e),
            Ok((lease, target, creation_sql)) => {
                let password = Zeroizing::new(random_alnum(32));
                let sql = render(&creation_sql, &lease.username, &password, lease.expire_unix_ms);
                match run_sql(&target, &sql).await {
                    Ok(()) => Ok(Credentials { lease, password }),
                    Err(err) => {
                        let unreachable = matches!(err, SqlError::Unreachable(_));
                        let err = ApiError::from(err);
                        tracing::warn!(db = %lease.db, role = %lease.role, error = %err, "creating a database user failed; its lease is revoked");
                        // Nothing to keep: drop the lease now (the user may half-exist: revoke).
                        // A database that did not answer would likely make the cleanup wait
                        // out a second timeout: it runs on, the caller does not wait for it,
                        // and what it leaves the reaper finishes.
                        if unreachable {
                            let node = self.clone();
                            tokio::spawn(async move { node.reap(&lease.id).await });
                        } else {
                            let _ = self.reap(&lease.id).await;
                        }
                        Err(err)
                    }
                }
            }
        };
        Audited { result, request_id, position }
    }

    /// Extends a lease by `increment` (default: the role's TTL), up to its maximum.
    pub async fn lease_renew(
        self: &Arc<Self>,
        ctx: RequestContext,
        id: String,
        increment_secs: Option<u64>,
    ) -> Audited<Lease> {
        let renewed = self
            .execute(ctx, Operation::LeaseRenew, "sys/leases/renew".into(), move |env| {
                env.authorize("sys/leases/renew", &[Capability::Update])?;
                let mut lease = load_lease(env, &id)?;
                let now = env.now_unix_ms;
                if lease.expire_unix_ms <= now {
                    return Err(ApiError::NotFound("this lease has expired".into()));
                }
                let role: Role = env
                    .get_json(&keys::db_role(&lease.role))?
                    .ok_or_else(|| ApiError::NotFound("the lease's role is gone".into()))?;
                let increment = increment_secs.unwrap_or(role.ttl_secs).clamp(1, role.max_ttl_secs);
                let old = lease.expire_unix_ms;
                lease.expire_unix_ms = (now + increment * 1000).min(lease.max_expire_unix_ms);
                put_lease(env, &lease, Some(old))?;
                let conn = load_conn(env, &lease.db)?;
                Ok((lease, Target::from(conn), role.renew_sql))
            })
            .await;
        let Audited { result, request_id, position } = renewed;
        let result = match result {
            Err(e) => Err(e),
            Ok((lease, target, sql)) => {
                let sql = render(&sql, &lease.username, "", lease.expire_unix_ms);
                match run_sql(&target, &sql).await {
                    Ok(()) => Ok(lease),
                    Err(err) => {
                        let err = ApiError::from(err);
                        tracing::warn!(lease = %lease.id, db = %lease.db, error = %err, "renewing a lease in its database failed");
                        Err(err)
                    }
                }
            }
        };
        Audited { result, request_id, position }
    }

    /// Revokes a lease (or, with `prefix`, every lease whose id starts with it — needs
    /// `sudo`): due now, then revoked in the database and dropped. Returns how many.
    pub async fn lease_revoke(
        self: &Arc<Self>,
        ctx: RequestContext,
        id: String,
        prefix: bool,
    ) -> Audited<usize> {
        let path = if prefix { format!("sys/leases/revoke-prefix/{id}") } else { "sys/leases/revoke".into() };
        let marked = self
            .execute(ctx, Operation::LeaseRevoke, path.clone(), move |env| {
                let record = env.authorize(&path, &[Capability::Update])?;
                let ids = if prefix {
                    if !env.allowed(&record, &path, &[Capability::Sudo])? {
                        return Err(ApiError::PermissionDenied);
                    }
                    lease_key(&id)?;
                    let base = keys::lease_prefix();
                    let end = arca_store::prefix_end(&base).ok_or(ApiError::Internal)?;
                    let mut ids = Vec::new();
                    for kv in env.tx.get_range(&base, &end, arca_store::RangeOptions::default())? {
                        if let Some(lease_id) = arca_store::tuple::unpack(&kv.key)
                            .ok()
                            .and_then(|t| t.last().and_then(|e| e.as_str().map(str::to_owned)))
                            && lease_id.starts_with(&id)
                        {
                            ids.push(lease_id);
                        }
                    }
                    ids
                } else {
                    vec![load_lease(env, &id)?.id]
                };
                let now = env.now_unix_ms;
                for lease_id in &ids {
                    let mut lease = load_lease(env, lease_id)?;
                    let old = lease.expire_unix_ms;
                    lease.expire_unix_ms = now.min(old);
                    put_lease(env, &lease, Some(old))?;
                }
                Ok(ids)
            })
            .await;
        let Audited { result, request_id, position } = marked;
        let result = match result {
            Err(e) => Err(e),
            Ok(ids) => {
                let mut done = 0;
                let mut failed = None;
                for id in &ids {
                    match self.reap(id).await {
                        Ok(()) => done += 1,
                        Err(e) => failed = Some(e),
                    }
                }
                match failed {
                    Some(e) if done < ids.len() => Err(ApiError::FailedPrecondition(format!(
                        "{done} of {} revoked; the rest stay due and the reaper retries: {e}",
                        ids.len()
                    ))),
                    _ => Ok(done),
                }
            }
        };
        Audited { result, request_id, position }
    }

    /// The leases whose id starts with `prefix`, in id order, at most [`LEASE_LIST_LIMIT`]
    /// (and whether more matched). With `expired`, only those past their expiry, in expiry
    /// order: revocations the reaper has not managed yet (their database down, a statement
    /// it refuses). Needs `list` and `sudo` on `sys/leases/lookup/<prefix>`, as Vault.
    pub async fn lease_list(
        self: &Arc<Self>,
        ctx: RequestContext,
        prefix: String,
        expired: bool,
    ) -> Audited<(Vec<Lease>, bool)> {
        let path = format!("sys/leases/lookup/{prefix}");
        self.execute(ctx, Operation::LeaseList, path.clone(), move |env| {
            if prefix.len() > 256 || prefix.chars().any(char::is_control) {
                return Err(ApiError::invalid("prefix: up to 256 printable characters"));
            }
            let record = env.authorize(&path, &[Capability::List])?;
            if !env.allowed(&record, &path, &[Capability::Sudo])? {
                return Err(ApiError::PermissionDenied);
            }
            let mut leases = Vec::new();
            if !expired {
                let begin = keys::lease_id_prefix(&prefix);
                let end = arca_store::prefix_end(&begin).ok_or(ApiError::Internal)?;
                let rows =
                    env.tx.get_range(&begin, &end, arca_store::RangeOptions::limit(LEASE_LIST_LIMIT + 1))?;
                let truncated = rows.len() > LEASE_LIST_LIMIT;
                for row in rows.iter().take(LEASE_LIST_LIMIT) {
                    leases.extend(env.get_json::<Lease>(&row.key)?);
                }
                return Ok((leases, truncated));
            }
            // The reaper's index, oldest expiry first, read up to a bound (ids of other
            // prefixes may come between).
            let scan = 10 * LEASE_LIST_LIMIT;
            let begin = keys::lease_expiry_prefix();
            let end = keys::lease_expiry(env.now_unix_ms + 1, "");
            let rows = env.tx.get_range(&begin, &end, arca_store::RangeOptions::limit(scan))?;
            let mut truncated = rows.len() == scan;
            for row in &rows {
                let Some(id) = arca_store::tuple::unpack(&row.key)
                    .ok()
                    .and_then(|t| t.last().and_then(|e| e.as_str().map(str::to_owned)))
                else {
                    continue;
                };
                if !id.starts_with(&prefix) {
                    continue;
                }
                if leases.len() == LEASE_LIST_LIMIT {
                    truncated = true;
                    break;
                }
                leases.extend(env.get_json::<Lease>(&lease_key(&id)?)?);
            }
            Ok((leases, truncated))
        })
        .await
    }

    /// A lease's record (needs `update` on `sys/leases/lookup`, as Vault).
    pub async fn lease_lookup(self: &Arc<Self>, ctx: RequestContext, id: String) -> Audited<Lease> {
        self.execute(ctx, Operation::LeaseLookup, "sys/leases/lookup".into(), move |env| {
            env.authorize("sys/leases/lookup", &[Capability::Update, Capability::Read])?;
            load_lease(env, &id)
        })
        .await
    }

    /// Revokes one lease in its database, then drops it (audited as `lease.reap`, by the
    /// system). A database error leaves the lease due for the next round.
    ///
    /// One reap of a lease at a time per node ([`Reaping`]): the reaper, a revocation and a
    /// failed creation's cleanup may name the same lease, and the second then finds it gone
    /// instead of dropping the same user at the same time. Reaps of other leases go on
    /// meanwhile: a session hung on one database holds back no revocation on another.
    pub(crate) async fn reap(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        let reaped = self.reap_unless_waiting(id, None).await;
        if let Err(err) = &reaped {
            tracing::warn!(lease = %id, error = %err, "lease revocation failed; the lease stays due and the reaper tries again");
        }
        reaped
    }

    /// [`Node::reap`], for the reaper: a lease whose database is waiting after it could not
    /// be reached (`databases`) fails at once instead of waiting out another session's
    /// timeout, and the session's outcome says whether the database is reachable.
    async fn reap_unless_waiting(
        self: &Arc<Self>,
        id: &str,
        databases: Option<&mut crate::backoff::Backoff<String>>,
    ) -> Result<(), ApiError> {
        let _this_lease = self.reaping.lock(id).await;
        let lid = id.to_owned();
        let look = self
            .execute_system(Operation::LeaseReap, "sys/leases/reap".into(), move |env| {
                env.actor.entity = "system:leases".into();
                let Some(lease) = env.get_json::<Lease>(&lease_key(&lid)?)? else { return Ok(None) };
                let conn = load_conn(env, &lease.db)?;
                let role: Option<Role> = env.get_json(&keys::db_role(&lease.role))?;
                let sql = role.map_or_else(|| DEFAULT_REVOCATION_SQL.to_owned(), |r| r.revocation_sql);
                Ok(Some((lease, Target::from(conn), sql)))
            })
            .await;
        let Some((lease, target, sql)) = look.result? else { return Ok(()) };
        if let Some(databases) = databases.as_deref()
            && !databases.due(&lease.db, std::time::Instant::now())
        {
            return Err(ApiError::FailedPrecondition(format!(
                "database connection {:?} could not be reached lately: waiting before trying it again",
                lease.db
            )));
        }
        let ran = run_sql(&target, &render(&sql, &lease.username, "", lease.expire_unix_ms)).await;
        if let Some(databases) = databases {
            match &ran {
                Err(SqlError::Unreachable(_)) => {
                    let (failures, wait) = databases.failed(lease.db.clone(), std::time::Instant::now());
                    self.metrics().scheduler_failed(crate::metrics::Retried::Database);
                    tracing::warn!(
                        db = %lease.db,
                        failures,
                        retry_in_s = wait.as_secs(),
                        "database connection unreachable: its leases wait before the next session"
                    );
                }
                Ok(()) | Err(SqlError::Refused(_)) => databases.succeeded(&lease.db),
                Err(SqlError::Settings(_)) => {}
            }
        }
        ran?;
        let dropped = self
            .execute_system(Operation::LeaseReap, format!("sys/leases/reap/{}", lease.id), move |env| {
                env.actor.entity = "system:leases".into();
                env.tx.clear(&lease_key(&lease.id)?)?;
                env.tx.clear(&keys::lease_expiry(lease.expire_unix_ms, &lease.id))?;
                env.tx.clear(&keys::lease_owner(&lease.owner_entity, &lease.role, &lease.id))?;
                Ok(())
            })
            .await;
        dropped.result
    }

    /// The reaper's round: tries to revoke up to [`REAP_BATCH`] expired leases, oldest first,
    /// passing over those still waiting after a failure (`retries`), so leases whose
    /// revocation keeps failing (their database down, say) hold back no others.
    pub(crate) async fn reap_expired(
        self: &Arc<Self>,
        retries: &mut crate::backoff::Backoff<String>,
        databases: &mut crate::backoff::Backoff<String>,
    ) -> Result<usize, ApiError> {
        use arca_store::StoreExt as _;
        let mut begin = keys::lease_expiry_prefix();
        let end = keys::lease_expiry(self.now() + 1, "");
        let (mut tried, mut reaped) = (0, 0);
        let mut seen = std::collections::HashSet::new();
        loop {
            let rows = self
                .store
                .transact(|tx| -> Result<_, ApiError> {
                    Ok(tx.get_range(&begin, &end, arca_store::RangeOptions::limit(REAP_BATCH))?)
                })?
                .value;
            let more = rows.len() == REAP_BATCH;
            if let Some(last) = rows.last() {
                begin = last.key.clone();
                begin.push(0);
            }
            for row in rows {
                let Some(id) = arca_store::tuple::unpack(&row.key)
                    .ok()
                    .and_then(|t| t.last().and_then(|e| e.as_str().map(str::to_owned)))
                else {
                    continue;
                };
                if !retries.due(&id, std::time::Instant::now()) {
                    seen.insert(id);
                    continue;
                }
                if tried == REAP_BATCH {
                    // The rest next round; what waits is kept, scanned or not.
                    return Ok(reaped);
                }
                tried += 1;
                match self.reap_unless_waiting(&id, Some(databases)).await {
                    Ok(()) => {
                        reaped += 1;
                        retries.succeeded(&id);
                    }
                    Err(err) => {
                        let (failures, wait) = retries.failed(id.clone(), std::time::Instant::now());
                        self.metrics().scheduler_failed(crate::metrics::Retried::Revocation);
                        tracing::warn!(
                            lease = %id,
                            error = %err,
                            failures,
                            retry_in_s = wait.as_secs(),
                            "lease revocation failed; tried again after a wait that doubles with each failure"
                        );
                        seen.insert(id);
                    }
                }
            }
            if !more {
                break;
            }
        }
        // Every expired lease was scanned: one waiting that is gone (revoked by hand, renewed
        // past now) is forgotten.
        retries.keep_only(&seen);
        Ok(reaped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_in_names_passwords_and_times() {
        let sql = render(
            "CREATE ROLE \"{{name}}\" PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            "arca_x_1",
            "pw",
            1_795_651_200_000,
        );
        assert_eq!(&*sql, "CREATE ROLE \"arca_x_1\" PASSWORD 'pw' VALID UNTIL '2026-11-26 00:00:00+00';");
        let name = random_alnum(20);
        assert!(name.len() == 20 && name.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(
            format!(
                "{:?}",
                Connection {
                    name: "pg".into(),
                    url: "postgres://a:SECRET@h/db".into(),
                    ca_pem: None,
                    client_cert_pem: Some("CERT".into()),
                    client_key_pem: Some("KEY-SECRET".into()),
                    pending_url: Some("postgres://a:NEW-SECRET@h/db".into()),
                }
            )
            .find("SECRET")
            .is_none()
        );
    }

    /// Polls once: whether `future` is still waiting.
    fn pending<F: Future>(future: std::pin::Pin<&mut F>) -> bool {
        future.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())).is_pending()
    }

    #[tokio::test]
    async fn one_reap_of_a_lease_at_a_time_and_none_held_back_by_another() {
        let reaping = Reaping::default();
        let first = reaping.lock("database/creds/app/a").await;
        // Another lease's reap goes on meanwhile.
        let other = tokio::time::timeout(Duration::from_secs(5), reaping.lock("database/creds/app/b")).await;
        assert!(other.is_ok(), "a reap of another lease waited");
        drop(other);
        // The same lease's second reap waits for the first.
        let mut second = Box::pin(reaping.lock("database/creds/app/a"));
        assert!(pending(second.as_mut()), "two reaps of one lease at once");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second reap runs once the first ends");
        assert_eq!(reaping.len(), 1);
        drop(second);
        assert_eq!(reaping.len(), 0, "the last one out removes the lease's lock");
        // A reap given up while it waits leaves nothing behind either.
        let held = reaping.lock("database/creds/app/c").await;
        let mut waiting = Box::pin(reaping.lock("database/creds/app/c"));
        assert!(pending(waiting.as_mut()));
        drop(waiting);
        drop(held);
        assert_eq!(reaping.len(), 0);
    }

    #[test]
    fn a_connection_is_shown_without_its_password_wherever_the_url_held_it() {
        for (url, shown) in [
            (
                "postgres://admin:s3cret@db.internal:5433/app",
                "postgres://admin@db.internal:5433/app?sslmode=disable",
            ),
            (
                "postgresql://admin:s3cret@db.internal/app?sslmode=verify-full&connect_timeout=5",
                "postgres://admin@db.internal:5432/app?sslmode=verify-full",
            ),
            (
                "postgres://admin@db.internal/app?password=s3cret",
                "postgres://admin@db.internal:5432/app?sslmode=disable",
            ),
            (
                "postgres://admin@db.internal/app?pass%77ord=s3cret",
                "postgres://admin@db.internal:5432/app?sslmode=disable",
            ),
            (
                "postgres://admin:s3%63ret@a:1,b:2/app?sslmode=require",
                "postgres://admin@a:1,b:2/app?sslmode=require",
            ),
            ("postgres://admin:s3cret@[::1]:5432/app", "postgres://admin@[::1]:5432/app?sslmode=disable"),
            // A database whose name reads as a parameter stays a name.
            (
                "postgres://admin:s3cret@h:1/x%3Fpassword%3Dy",
                "postgres://admin@h:1/x%3Fpassword%3Dy?sslmode=disable",
            ),
        ] {
            assert!(check_connection("pg", url, &DbTls::default()).is_ok(), "{url}");
            assert_eq!(url_summary(url), shown, "{url}");
        }
    }

    #[test]
    fn a_rotated_url_differs_in_its_password_alone() {
        let (url, user) =
            with_password("postgres://ad%6Din:old@db:5432/app?sslmode=require", "NEWpw123").unwrap();
        assert_eq!(url.as_str(), "postgres://ad%6Din:NEWpw123@db:5432/app?sslmode=require");
        assert_eq!(user, "admin");
        assert_eq!(password_of(&url).unwrap().as_str(), "NEWpw123");
        assert_eq!(
            with_password("postgres://admin:old@db", "x1").unwrap().0.as_str(),
            "postgres://admin:x1@db"
        );
        for unfit in [
            "postgres://admin@db/app",                    // no password in the user part
            "postgres://admin:old@db/app?password=other", // a parameter the driver prefers
            "postgres://:old@db/app",                     // no user
            "postgres://admin:o/ld@db/app",               // a password the URL cannot hold as written
        ] {
            assert!(with_password(unfit, "NEWpw123").is_err(), "{unfit}");
        }
    }

    #[test]
    fn only_failures_that_may_pass_on_a_second_attempt_are_retried() {
        for code in ["40001", "40P01", "55P03", "XX000"] {
            assert!(transient(code), "{code}");
        }
        for code in ["42704", "42601", "28P01", "3D000", "55006", "connection"] {
            assert!(!transient(code), "{code}");
        }
    }
}
