//! `arca`: the arca CLI.
//!
//! Address and token come from `--addr`/`ARCA_ADDR` (default `http://127.0.0.1:8400`; a
//! comma-separated list fails over between nodes and regions) and `--token`/`ARCA_TOKEN`.
//! Every call goes through the `arca-client` SDK (routing, retries, typed errors). Output is
//! human-readable, or JSON with `--format json` (`-format=json` works too, as with Vault's CLI).
//!
//! Exit codes: 0 success; 1 local error (arguments, files, connection); 2 usage error;
//! 3 denied (missing/invalid token or policy); 4 not found; 5 any other server error
//! (invalid argument, failed precondition, sealed, unavailable, internal); 6 the audit log
//! or a proof does not verify.

use std::collections::HashMap;
use std::io::Read as _;
use std::process::ExitCode;

use arca_client::{AUDIT_POSITION_HEADER, Client, REQUEST_ID_HEADER, proto};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::Response;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "arca", version, about = "arca, the audit-first secrets store: command-line client")]
struct Cli {
    /// Server address, or a comma-separated list for failover (items URL or REGION=URL):
    /// reads go to the first node that answers, writes to the primary region.
    #[arg(long, short = 'a', global = true, env = "ARCA_ADDR", default_value = "http://127.0.0.1:8400")]
    addr: String,
    /// Token (prefer ARCA_TOKEN: arguments are visible to other local users).
    #[arg(long, short = 't', global = true, env = "ARCA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify the server with https addresses.
    #[arg(long, global = true, env = "ARCA_CACERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS, and `arca cert login`.
    #[arg(long, global = true, env = "ARCA_CLIENT_CERT")]
    client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "ARCA_CLIENT_KEY")]
    client_key: Option<std::path::PathBuf>,
    /// Mounts of several segments (comma-separated, e.g. team/kv): a path starting with one
    /// names a secret in it (`team/kv/app/db`); otherwise a path's first segment is its mount.
    #[arg(long, global = true, env = "ARCA_MOUNTS", value_delimiter = ',')]
    mounts: Vec<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "human")]
    format: Format,
    /// Wrap the call's answer for this long (90s, 15m, 2h; 1 s to 7 days) and print a
    /// single-use wrapping token instead: `arca unwrap TOKEN` returns the answer once.
    #[arg(long, global = true, env = "ARCA_WRAP_TTL", value_parser = parse_duration_secs)]
    wrap_ttl: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Versioned secrets.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// AppRole machine login.
    #[command(subcommand)]
    Approle(AppRoleCommand),
    /// Client-certificate login over mutual TLS.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The signed audit log: verify it, follow it, prove an entry is in it.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Init, unseal, seal, status, key rotation.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Regions: replication status, promote a standby, demote a deposed primary.
    #[command(subcommand)]
    Region(RegionCommand),
    /// Dynamic database credentials (PostgreSQL).
    #[command(subcommand)]
    Db(DbCommand),
    /// Leases on dynamic credentials: renew, revoke, revoke by prefix, look up.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Just-in-time access: request a policy for a while, approve, list.
    #[command(subcommand)]
    Access(AccessCommand),
    /// Unwrap a wrapped answer (`--wrap-ttl`, or `bao … -wrap-ttl`), once: the wrapping token
    /// alone is enough (TOKEN, `-` for standard input, or else ARCA_TOKEN).
    Unwrap {
        token: Option<String>,
        /// Show what the token wraps, without unwrapping it.
        #[arg(long)]
        lookup: bool,
    },
    /// Rotate a secret now with its rotation policy (create → set → test → finish); prints the
    /// new current version. Readers switch from the old value to the new one atomically.
    Rotate { path: String },
    /// Run a command with secrets in its environment or in files (each fetch audited):
    /// `arca run --env DB_PASSWORD=secret/app/db#password --file tls.pem=secret/app/tls#cert -- ./server`.
    /// Returns the command's exit code.
    Run {
        /// NAME=<mount>/<path>#<field>: an environment variable of the command.
        #[arg(long = "env")]
        env: Vec<String>,
        /// NAME=<mount>/<path>#<field>: a file, mode 0600 — a bare NAME goes in a private
        /// (tmpfs-backed when available) directory named by $ARCA_SECRETS_DIR, an absolute
        /// path where it says; removed when the command exits.
        #[arg(long = "file")]
        file: Vec<String>,
        /// Replace secret values with ***** in the command's stdout and stderr.
        #[arg(long)]
        mask: bool,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// A sidecar: log in (AppRole or the given token), keep the token renewed, render
    /// templates with `{{ secret "<mount>/<path>#<field>" }}` to files (0600, atomically),
    /// re-render when a secret changes, run a command after each render.
    Agent {
        /// SOURCE:DESTINATION (repeatable).
        #[arg(long = "template", required = true)]
        templates: Vec<String>,
        #[arg(long, requires = "secret_id_file")]
        role_id_file: Option<std::path::PathBuf>,
        #[arg(long, requires = "role_id_file")]
        secret_id_file: Option<std::path::PathBuf>,
        /// Log in with the client certificate (--client-cert/--client-key, over https).
        #[arg(long, conflicts_with = "role_id_file")]
        cert_login: bool,
        /// How often to look for new versions.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// A shell command run after each render (e.g. to reload the application).
        #[arg(long)]
        exec: Option<String>,
        /// Serve `/health` (JSON state) here, e.g. 127.0.0.1:8250.
        #[arg(long)]
        health_addr: Option<std::net::SocketAddr>,
        /// Render once and exit.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Store a connection: --url @FILE or - (stdin) keeps the admin password off the command line.
    Config {
        name: String,
        /// postgres://admin:password@host:port/db; add ?sslmode=verify-full for TLS.
        #[arg(long)]
        url: String,
        /// The database server's CA certificates (PEM) for TLS, @FILE (default: Mozilla's roots).
        #[arg(long)]
        db_ca: Option<String>,
        /// A client certificate (PEM, @FILE) to present to the database server over TLS.
        #[arg(long, requires = "db_client_key")]
        db_client_cert: Option<String>,
        /// Its private key (PEM, @FILE or -): stored sealed, never shown again.
        #[arg(long, requires = "db_client_cert")]
        db_client_key: Option<String>,
    },
    /// Store a role: SQL with {{name}}, {{password}}, {{expiration}} (each @FILE, - or text).
    Role {
        name: String,
        #[arg(long)]
        db: String,
        #[arg(long)]
        creation_sql: String,
        #[arg(long)]
        revocation_sql: Option<String>,
        #[arg(long)]
        renew_sql: Option<String>,
        #[arg(long, value_parser = parse_duration_secs)]
        ttl: Option<u64>,
        #[arg(long, value_parser = parse_duration_secs)]
        max_ttl: Option<u64>,
        #[arg(long)]
        max_leases_per_identity: Option<u32>,
    },
    /// Fresh credentials with a lease (the password is shown once).
    Creds { role: String },
    /// Show a connection: its URL without the password, its TLS material's presence, its roles.
    ReadConfig { name: String },
    /// List the connections.
    ListConfigs,
    /// Delete a connection (refused while a role names it).
    DeleteConfig { name: String },
    /// Show a role, its statements included.
    ReadRole { name: String },
    /// List the roles.
    ListRoles,
    /// Delete a role (refused while leases on it remain: revoke-prefix them first).
    DeleteRole { name: String },
    /// Give a connection's admin user a fresh random password, known to arca alone.
    RotateRoot { name: String },
}

#[derive(Subcommand)]
enum LeaseCommand {
    Renew {
        lease_id: String,
        #[arg(long, value_parser = parse_duration_secs)]
        increment: Option<u64>,
    },
    Revoke {
        lease_id: String,
    },
    /// Revoke every lease whose id starts with PREFIX (needs sudo).
    RevokePrefix {
        prefix: String,
    },
    Lookup {
        lease_id: String,
    },
    /// List leases whose id starts with PREFIX (default: all; needs sudo), at most 1000.
    List {
        #[arg(default_value = "")]
        prefix: String,
        /// Only leases past their expiry: revocations not done yet.
        #[arg(long)]
        expired: bool,
    },
}

/// Whether a revoke names one lease or a prefix.
enum LeaseKind {
    One,
    Prefix,
}

fn lease_json(l: &proto::LeaseInfo) -> Value {
    json!({"lease_id": l.lease_id, "role": l.role, "username": l.username, "issued_unix_ms": l.issued_unix_ms,
           "expire_unix_ms": l.expire_unix_ms, "max_expire_unix_ms": l.max_expire_unix_ms, "owner": l.owner})
}

fn lease_rows(l: &proto::LeaseInfo) -> Vec<(String, String)> {
    vec![
        ("lease_id".into(), l.lease_id.clone()),
        ("username".into(), l.username.clone()),
        ("expire_unix_ms".into(), l.expire_unix_ms.to_string()),
        ("max_expire_unix_ms".into(), l.max_expire_unix_ms.to_string()),
    ]
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Ask for POLICY for --ttl (e.g. 15m, 1h, 90s) with a reason; an approver must approve.
    Request {
        policy: String,
        #[arg(long, value_parser = parse_duration_secs)]
        ttl: u64,
        #[arg(long)]
        reason: String,
    },
    /// Approve a pending request: its token holds the policy until the TTL ends.
    Approve { id: String },
    /// Every request, newest first.
    List,
}

/// `90`, `90s`, `15m`, `2h`, `1d` → seconds.
fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: expected e.g. 90s, 15m, 2h"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

fn grant_json(g: &proto::AccessGrant) -> Value {
    json!({"id": g.id, "policy": g.policy, "reason": g.reason, "ttl_secs": g.ttl_secs, "state": g.state,
           "requester": g.requester, "approver": g.approver, "created_unix_ms": g.created_unix_ms,
           "expires_unix_ms": g.expires_unix_ms})
}

fn grant_text(g: &proto::AccessGrant) -> String {
    let until = if g.expires_unix_ms > 0 { format!(" until {}", g.expires_unix_ms) } else { String::new() };
    format!(
        "{}  {}  {} for {}s{until}  by {}  ({})",
        g.id, g.state, g.policy, g.ttl_secs, g.requester, g.reason
    )
}

#[derive(Subcommand)]
enum RotationCommand {
    /// Rotate on an interval or a UTC cron schedule with a rotator.
    Set {
        path: String,
        #[arg(long, conflicts_with = "schedule", required_unless_present = "schedule")]
        interval_secs: Option<u64>,
        /// `minute hour day-of-month month day-of-week`, UTC (e.g. "0 3 * * *").
        #[arg(long)]
        schedule: Option<String>,
        #[arg(long, value_parser = ["password", "api-key", "ed25519", "x25519", "exec", "http"])]
        rotator: String,
        /// The field a password or API key goes in (default: password).
        #[arg(long)]
        field: Option<String>,
        #[arg(long)]
        length: Option<u32>,
        #[arg(long)]
        symbols: bool,
        #[arg(long)]
        bytes: Option<u32>,
        /// exec: the rotator's name in the node's rotators directory.
        #[arg(long)]
        command: Option<String>,
        /// http: the hook's URL (under one of the node's allowed hook prefixes).
        #[arg(long)]
        url: Option<String>,
    },
    /// Stop rotating (a rotation under way is abandoned).
    Clear { path: String },
}

#[derive(Subcommand)]
enum RegionCommand {
    /// This region's role, epoch, primary, replication lag and peer links.
    Status,
    /// Make this standby region the primary (raises the epoch; the old primary is fenced
    /// on first contact).
    Promote,
    /// Turn this (deposed) primary into a standby of PRIMARY; writes it made that PRIMARY
    /// never received are listed in a divergence report.
    Demote { primary: String },
    /// Show a divergence report.
    Divergence { id: u64 },
    /// Write a divergence report's secret versions again, on the primary at --primary-addr
    /// (each becomes a new version there; every read and write is audited).
    Reapply {
        id: u64,
        /// The primary region's gRPC address (same TLS settings and token as --addr).
        #[arg(long)]
        primary_addr: String,
    },
}

#[derive(Args)]
struct LogSource {
    /// The log's URL, e.g. http://127.0.0.1:8200/audit/local
    #[arg(long)]
    url: Option<String>,
    /// A directory holding the log in the tlog-tiles layout (an archive). With --url too:
    /// archived files from the directory, the rest and the latest checkpoint from the node.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct LogKey {
    /// The log's verifier key (`arca/<cluster>/<region>+<id>+<key>`).
    #[arg(long, env = "ARCA_AUDIT_VKEY", conflicts_with = "vkey_file")]
    vkey: Option<String>,
    /// A file holding the verifier key.
    #[arg(long)]
    vkey_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the whole log: every entry against the tiles, the root against the signed
    /// checkpoint, and (with --state) consistency with the checkpoint verified last time.
    Verify {
        #[command(flatten)]
        source: LogSource,
        #[command(flatten)]
        key: LogKey,
        /// Remembers the last verified checkpoint; created if missing.
        #[arg(long)]
        state: Option<std::path::PathBuf>,
    },
    /// Print entries as they are sequenced (from --from; --follow keeps polling).
    Tail {
        #[command(flatten)]
        source: LogSource,
        #[command(flatten)]
        key: LogKey,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long)]
        follow: bool,
    },
    /// Fetch and verify an inclusion proof for one entry.
    Proof {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        key: LogKey,
        #[arg(long, conflicts_with_all = ["index", "position"])]
        request_id: Option<String>,
        #[arg(long, conflicts_with = "position")]
        index: Option<u64>,
        /// The `audit_position` a reply carried.
        #[arg(long)]
        position: Option<String>,
    },
    /// Fetch the log's verifier key (pin it; do not fetch it for every verification).
    Vkey {
        #[arg(long)]
        url: String,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Pin a client certificate to a role with policies.
    Write {
        name: String,
        /// The client certificate (PEM) this role accepts.
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long = "policy")]
        policies: Vec<String>,
        #[arg(long)]
        token_ttl: Option<u64>,
    },
    Read {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Log in with --client-cert/--client-key (over https).
    Login,
}

#[derive(Args)]
struct PathArg {
    /// `<mount>/<path>`, e.g. `secret/app/db`.
    path: String,
}

#[derive(Subcommand)]
enum KvCommand {
    /// Write a new version: `arca kv put secret/app/db user=svc password=@file token=-
    /// ports:='[5432,5433]'`, or `arca kv put secret/app/db @data.json`.
    Put {
        path: String,
        /// key=value (a string) or key:=JSON (any JSON value); a value of @FILE reads a file,
        /// - reads standard input. A lone @FILE or - is a JSON object of fields.
        #[arg(required = true)]
        pairs: Vec<String>,
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Read the current version, or --version N, or --stage previous|pending.
    Get {
        path: String,
        #[arg(long, conflicts_with = "stage")]
        version: Option<u64>,
        /// A rotation stage: current, previous, pending.
        #[arg(long)]
        stage: Option<String>,
        /// Print only this key's value.
        #[arg(long)]
        field: Option<String>,
    },
    /// Write a new version from the current one with the given keys set or removed.
    Patch {
        path: String,
        /// As for put; a JSON object merges into the key's current value (RFC 7396, a null
        /// member removes), and key:=null removes the key.
        pairs: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
        #[arg(long)]
        cas: Option<u64>,
    },
    /// List the names under a folder, e.g. `secret/` or `secret/app/`.
    List { path: String },
    /// Soft-delete the current version, or --versions.
    Delete {
        path: String,
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u64>,
    },
    /// Revoke the current version, --versions, or --all: never served again, on any node of
    /// any region; the ciphertext is destroyed.
    Revoke {
        path: String,
        #[arg(long, value_delimiter = ',', conflicts_with = "all")]
        versions: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
    /// Rotation policies: `arca kv rotation set secret/app/db --interval-secs 86400 --rotator password`.
    #[command(subcommand)]
    Rotation(RotationCommand),
    /// Restore soft-deleted versions.
    Undelete {
        path: String,
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// Remove versions' data for good.
    Destroy {
        path: String,
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// Secret metadata.
    #[command(subcommand)]
    Metadata(MetadataCommand),
}

#[derive(Subcommand)]
enum MetadataCommand {
    Get(PathArg),
    Put {
        path: String,
        #[arg(long)]
        max_versions: Option<u32>,
        #[arg(long)]
        cas_required: Option<bool>,
        /// key=value custom metadata (replaces the stored map).
        #[arg(long)]
        custom: Vec<String>,
    },
    /// Delete the secret entirely: metadata and every version.
    Delete(PathArg),
}

#[derive(Subcommand)]
enum TokenCommand {
    Create {
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Time to live, in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long, default_value = "")]
        display_name: String,
        #[arg(long)]
        renewable: bool,
        #[arg(long)]
        orphan: bool,
        /// Only usable from this address range (repeatable), e.g. 10.0.0.0/8.
        #[arg(long = "bound-cidr")]
        bound_cidrs: Vec<String>,
        /// Identity metadata KEY=VALUE (repeatable), for policy conditions.
        #[arg(long = "meta")]
        meta: Vec<String>,
    },
    /// Look up your own token, or another by --accessor.
    Lookup {
        #[arg(long, default_value = "")]
        accessor: String,
    },
    /// Renew your own token.
    Renew {
        #[arg(long)]
        increment: Option<u64>,
    },
    /// Revoke your own token, or another by --accessor (and its children).
    Revoke {
        #[arg(long, default_value = "")]
        accessor: String,
    },
    /// Your token's capabilities on paths (as policies and grants give them now), or another
    /// token's: by --accessor, or by value with --of-token (@FILE or -).
    Capabilities {
        #[arg(required = true)]
        paths: Vec<String>,
        #[arg(long, default_value = "", conflicts_with = "of_token")]
        accessor: String,
        #[arg(long)]
        of_token: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Write a policy from a file (- for standard input).
    Write {
        name: String,
        file: String,
    },
    Read {
        name: String,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum AppRoleCommand {
    Write {
        name: String,
        #[arg(long = "policy")]
        policies: Vec<String>,
        #[arg(long)]
        token_ttl: Option<u64>,
        #[arg(long)]
        secret_id_ttl: Option<u64>,
        /// Logins only from this address range (repeatable).
        #[arg(long = "secret-id-bound-cidr")]
        secret_id_bound_cidrs: Vec<String>,
        /// The role's tokens only usable from this address range (repeatable).
        #[arg(long = "token-bound-cidr")]
        token_bound_cidrs: Vec<String>,
        /// Identity metadata KEY=VALUE for the role's tokens (repeatable), for policy conditions.
        #[arg(long = "meta")]
        meta: Vec<String>,
    },
    Read {
        name: String,
    },
    Delete {
        name: String,
    },
    List,
    RoleId {
        name: String,
    },
    SecretId {
        name: String,
    },
    /// Log in; the role id and secret id may come from ARCA_ROLE_ID / ARCA_SECRET_ID.
    Login {
        #[arg(long, env = "ARCA_ROLE_ID", hide_env_values = true)]
        role_id: String,
        #[arg(long, env = "ARCA_SECRET_ID", hide_env_values = true)]
        secret_id: String,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    Init {
        #[arg(long, default_value_t = 5)]
        key_shares: u32,
        #[arg(long, default_value_t = 3)]
        key_threshold: u32,
    },
    /// Give one unseal key share (omit it, or pass -, to read it from standard input).
    Unseal {
        share: Option<String>,
    },
    Seal,
    Status,
    Rotate,
    /// Move the seal between Shamir key shares and the HSM configured in the node's [seal]
    /// section. The unseal key stays the same: the shares become recovery keys under the HSM,
    /// and unseal keys again after migrating back.
    MigrateSeal {
        #[arg(long, value_parser = ["hsm", "shamir"])]
        to: String,
    },
}

/// A failure, with the exit code it maps to.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl From<arca_client::Error> for Failure {
    fn from(err: arca_client::Error) -> Self {
        use arca_client::ErrorKind;
        let code = match err.kind() {
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => 3,
            ErrorKind::NotFound => 4,
            ErrorKind::Config | ErrorKind::Connect => 1,
            _ => 5,
        };
        Failure { code, message: err.to_string() }
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Failure { code: 1, message: err.to_string() }
    }
}

fn local(message: impl Into<String>) -> Failure {
    Failure { code: 1, message: message.into() }
}

/// Calls one RPC through the SDK client (routing, retries, failover, token):
/// `rpc!(c, Read, kv_get, message)`. With `--wrap-ttl`, the call's answer is wrapped instead,
/// and the command ends there printing the wrapping token ([`wrapped_answer`]).
macro_rules! rpc {
    ($c:expr, $route:ident, $method:ident, $message:expr) => {
        async {
            match WRAP.get() {
                Some(&(ttl, format)) => Err(wrapped_answer(
                    format,
                    $c.call_wrapped(ttl, $message, |mut raw, r| async move { raw.$method(r).await }).await?,
                )),
                None => {
                    Ok($c
                        .call(arca_client::Route::$route, $message, |mut raw, r| async move {
                            raw.$method(r).await
                        })
                        .await?)
                }
            }
        }
    };
}

/// `--wrap-ttl`, and the output format to print the wrapping token in; set once at start.
static WRAP: std::sync::OnceLock<(std::time::Duration, Format)> = std::sync::OnceLock::new();

/// Ends a command whose answer was wrapped: its output is the wrapping token (exit code 0).
fn wrapped_answer(format: Format, w: arca_client::Wrapped) -> Failure {
    let ttl = w.ttl.as_secs();
    let message = match format {
        Format::Human => table(&[
            ("wrapping_token".into(), w.token.expose().to_owned()),
            ("wrapping_accessor".into(), w.accessor.clone()),
            ("wrapping_token_ttl".into(), format!("{ttl}s")),
            ("wrapping_token_creation_path".into(), w.creation_path.clone()),
        ]),
        Format::Json => serde_json::to_string_pretty(&json!({
            "wrap_info": {"token": w.token.expose(), "accessor": w.accessor, "ttl": ttl, "creation_path": w.creation_path},
            "audit_position": w.receipt.audit_position, "request_id": w.receipt.request_id,
        }))
        .unwrap_or_default(),
    };
    Failure { code: 0, message }
}

/// The SDK configuration for `addr` (a comma-separated list for failover, items `URL` or
/// `REGION=URL`) with the command line's TLS settings and token.
fn config_for(cli: &Cli, addr: &str) -> Result<arca_client::Config, Failure> {
    let tls = arca_client::Tls::from_files(
        cli.ca_cert.as_deref(),
        cli.client_cert.as_deref(),
        cli.client_key.as_deref(),
    )?;
    let mut config = arca_client::Config::new(addr)?.tls(tls);
    for mount in &cli.mounts {
        config = config.mount(mount);
    }
    if let Some(token) = cli.token.as_deref().filter(|t| !t.is_empty()) {
        config = config.auth(arca_client::Auth::token(token));
    }
    Ok(config)
}

async fn connect_to(cli: &Cli, addr: &str) -> Result<Client, Failure> {
    Ok(Client::connect(config_for(cli, addr)?).await?)
}

fn request_id<T>(response: &Response<T>) -> Value {
    response.metadata().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).map_or(Value::Null, |p| json!(p))
}

fn position<T>(response: &Response<T>) -> Value {
    response
        .metadata()
        .get(AUDIT_POSITION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map_or(Value::Null, |p| json!(p))
}

/// Splits `mount/path` into its mount and path.
fn split_mount(full: &str) -> Result<(String, String), Failure> {
    Ok(arca_client::split_path_in(full, MOUNTS.get().map_or(&[], Vec::as_slice))?)
}

/// The command line's `--mounts`, set once at start.
static MOUNTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn read_value(spec: &str) -> Result<String, Failure> {
    if spec == "-" {
        let mut value = String::new();
        std::io::stdin().read_to_string(&mut value)?;
        return Ok(value.trim_end_matches('\n').to_owned());
    }
    if let Some(file) = spec.strip_prefix('@') {
        return std::fs::read_to_string(file).map_err(|e| local(format!("{file}: {e}")));
    }
    Ok(spec.to_owned())
}

fn parse_pairs(pairs: &[String]) -> Result<HashMap<String, String>, Failure> {
    let mut map = HashMap::new();
    for pair in pairs {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            local(format!("expected key=value, got {:?}", pair.split('=').next().unwrap_or("")))
        })?;
        map.insert(key.to_owned(), read_value(value)?);
    }
    Ok(map)
}

/// A secret's fields from the command line: `key=value` is a string, `key:=JSON` any JSON
/// value (either may be `@FILE` or `-`), and a lone `@FILE` or `-` a JSON object of fields.
/// Returns the wire form: each value's text, and the keys whose text is JSON.
fn parse_fields(args: &[String]) -> Result<(HashMap<String, String>, Vec<String>), Failure> {
    let mut data = HashMap::new();
    let mut json_keys = std::collections::BTreeSet::new();
    let mut put = |key: String, value: Value, data: &mut HashMap<String, String>| match value {
        Value::String(text) => {
            json_keys.remove(&key);
            data.insert(key, text);
        }
        other => {
            json_keys.insert(key.clone());
            data.insert(key, other.to_string());
        }
    };
    for arg in args {
        match arg.split_once('=') {
            None if arg == "-" || arg.starts_with('@') => {
                let text = read_value(arg)?;
                let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&text) else {
                    return Err(local(format!("{arg}: expected a JSON object of fields")));
                };
                for (key, value) in fields {
                    put(key, value, &mut data);
                }
            }
            None => {
                return Err(local(format!("expected key=value or key:=JSON, got {:?}", arg)));
            }
            Some((key, spec)) => match key.strip_suffix(':') {
                Some(key) => {
                    let value = serde_json::from_str(&read_value(spec)?)
                        .map_err(|_| local(format!("{key}: the value after := must be JSON")))?;
                    put(key.to_owned(), value, &mut data);
                }
                None => put(key.to_owned(), Value::String(read_value(spec)?), &mut data),
            },
        }
    }
    Ok((data, json_keys.into_iter().collect()))
}

/// A secret's data as JSON, from the wire: the values of `json_keys` parsed, the rest strings.
fn fields_json(data: &HashMap<String, String>, json_keys: &[String]) -> Value {
    let fields = data
        .iter()
        .map(|(k, v)| {
            let value = if json_keys.contains(k) {
                serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()))
            } else {
                Value::String(v.clone())
            };
            (k.clone(), value)
        })
        .collect();
    Value::Object(fields)
}

fn print(format: Format, human: impl FnOnce() -> String, value: Value) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default()),
        Format::Human => {
            let text = human();
            if !text.is_empty() {
                println!("{text}");
            }
        }
    }
}

fn table(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}    {v}")).collect::<Vec<_>>().join("\n")
}

fn token_json(info: &proto::TokenInfo) -> Value {
    json!({
        "accessor": info.accessor, "policies": info.policies, "entity": info.entity,
        "display_name": info.display_name, "created_unix_ms": info.created_unix_ms,
        "expire_unix_ms": info.expire_unix_ms, "ttl_secs": info.ttl_secs,
        "renewable": info.renewable, "parent_accessor": info.parent_accessor,
        "bound_cidrs": info.bound_cidrs, "meta": info.meta,
    })
}

/// Prints a new token: a table, or JSON with the audit position.
fn print_token_auth(format: Format, r: Response<proto::TokenAuth>) {
    let (pos, rid) = (position(&r), request_id(&r));
    let auth = r.into_inner();
    let info = auth.info.unwrap_or_default();
    let mut rows = vec![("token".to_owned(), auth.token.clone())];
    rows.extend(token_rows(&info));
    print(
        format,
        || table(&rows),
        json!({"token": auth.token, "info": token_json(&info), "audit_position": pos, "request_id": rid}),
    );
}

fn token_rows(info: &proto::TokenInfo) -> Vec<(String, String)> {
    vec![
        ("accessor".into(), info.accessor.clone()),
        ("policies".into(), info.policies.join(",")),
        ("entity".into(), info.entity.clone()),
        (
            "expire_unix_ms".into(),
            if info.expire_unix_ms == 0 { "never".into() } else { info.expire_unix_ms.to_string() },
        ),
        ("renewable".into(), info.renewable.to_string()),
    ]
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let format = cli.format;
    if let Some(ttl) = cli.wrap_ttl {
        let one_call = !matches!(
            cli.command,
            Command::Audit(_)
                | Command::Agent { .. }
                | Command::Run { .. }
                | Command::Unwrap { .. }
                | Command::Region(RegionCommand::Reapply { .. })
        );
        if !one_call {
            return Err(local("--wrap-ttl wraps the answer of one call; this command is not one"));
        }
        let _ = WRAP.set((std::time::Duration::from_secs(ttl), format));
    }
    if let Command::Audit(cmd) = cli.command {
        return audit::run(format == Format::Json, cmd);
    }
    if let Command::Agent {
        templates,
        role_id_file,
        secret_id_file,
        cert_login,
        interval_ms,
        exec,
        health_addr,
        once,
    } = &cli.command
    {
        let mut config = config_for(&cli, &cli.addr)?;
        if let (Some(r), Some(s)) = (role_id_file, secret_id_file) {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| local(format!("{}: {e}", p.display())))
            };
            config = config.auth(arca_client::Auth::app_role(read(r)?, read(s)?));
        } else if *cert_login {
            config = config.auth(arca_client::Auth::Certificate);
        }
        let c = Client::connect(config).await?;
        return agent::run(
            &c,
            templates,
            std::time::Duration::from_millis((*interval_ms).max(50)),
            exec.as_deref(),
            *health_addr,
            *once,
        )
        .await;
    }
    let c = connect_to(&cli, &cli.addr).await?;
    if let Command::Run { env, file, mask, command } = &cli.command {
        let code = run::run(&c, env, file, *mask, command).await?;
        return Err(Failure { code, message: String::new() });
    }
    if let Command::Region(RegionCommand::Reapply { id, primary_addr }) = &cli.command {
        let primary = connect_to(&cli, primary_addr).await?;
        return reapply(&c, &primary, format, *id).await;
    }
    match cli.command {
        Command::Kv(cmd) => kv(&c, format, cmd).await,
        Command::Token(cmd) => token(&c, format, cmd).await,
        Command::Policy(cmd) => policy(&c, format, cmd).await,
        Command::Approle(cmd) => approle(&c, format, cmd).await,
        Command::Cert(cmd) => cert(&c, format, cmd).await,
        Command::Audit(_) => unreachable!("handled above without a gRPC connection"),
        Command::Operator(cmd) => operator(&c, format, cmd).await,
        Command::Region(cmd) => region(&c, format, cmd).await,
        Command::Run { .. } | Command::Agent { .. } => unreachable!("handled above"),
        Command::Unwrap { token, lookup } => {
            let token = match token.as_deref() {
                Some(spec) => Zeroizing::new(read_value(spec)?),
                None => Zeroizing::new(cli.token.clone().ok_or_else(|| local("give the wrapping token"))?),
            };
            unwrap(&c, format, &token, lookup).await
        }
        Command::Db(cmd) => {
            match cmd {
                DbCommand::Config { name, url, db_ca, db_client_cert, db_client_key } => {
                    let url = read_value(&url)?;
                    let ca_pem = db_ca.as_deref().map(read_value).transpose()?;
                    let client_cert_pem = db_client_cert.as_deref().map(read_value).transpose()?;
                    let client_key_pem = db_client_key.as_deref().map(read_value).transpose()?;
                    let request = proto::DbConfigRequest {
                        name: name.clone(),
                        url,
                        ca_pem,
                        client_cert_pem,
                        client_key_pem,
                    };
                    let r = rpc!(c, Write, db_config_write, request).await?;
                    print(
                        format,
                        || format!("Success! stored connection {name}"),
                        json!({"name": name, "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::Role {
                    name,
                    db,
                    creation_sql,
                    revocation_sql,
                    renew_sql,
                    ttl,
                    max_ttl,
                    max_leases_per_identity,
                } => {
                    let req = proto::DbRoleRequest {
                        name,
                        db,
                        creation_sql: read_value(&creation_sql)?,
                        revocation_sql: revocation_sql
                            .map(|s| read_value(&s))
                            .transpose()?
                            .unwrap_or_default(),
                        renew_sql: renew_sql.map(|s| read_value(&s)).transpose()?.unwrap_or_default(),
                        ttl_secs: ttl,
                        max_ttl_secs: max_ttl,
                        max_leases_per_identity,
                    };
                    let r = rpc!(c, Write, db_role_write, req).await?;
                    let role = r.get_ref();
                    print(
                        format,
                        || {
                            format!(
                                "Success! role {} on {} (ttl {}s, max {}s)",
                                role.name, role.db, role.ttl_secs, role.max_ttl_secs
                            )
                        },
                        json!({"name": role.name, "db": role.db, "ttl_secs": role.ttl_secs, "max_ttl_secs": role.max_ttl_secs,
                               "max_leases_per_identity": role.max_leases_per_identity, "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::ReadConfig { name } => {
                    let r = rpc!(c, Read, db_config_read, proto::DbName { name }).await?;
                    let conn = r.get_ref();
                    let rows = vec![
                        ("name".to_owned(), conn.name.clone()),
                        ("url".into(), conn.url.clone()),
                        ("ca".into(), conn.has_ca.to_string()),
                        ("client_cert".into(), conn.has_client_cert.to_string()),
                        ("roles".into(), conn.roles.join(", ")),
                        ("root_rotation_pending".into(), conn.root_rotation_pending.to_string()),
                    ];
                    print(
                        format,
                        || table(&rows),
                        json!({"name": conn.name, "url": conn.url, "has_ca": conn.has_ca, "has_client_cert": conn.has_client_cert,
                               "roles": conn.roles, "root_rotation_pending": conn.root_rotation_pending,
                               "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::ReadRole { name } => {
                    let r = rpc!(c, Read, db_role_read, proto::DbName { name }).await?;
                    let role = r.get_ref();
                    let rows = vec![
                        ("name".to_owned(), role.name.clone()),
                        ("db".into(), role.db.clone()),
                        ("ttl".into(), format!("{}s", role.ttl_secs)),
                        ("max_ttl".into(), format!("{}s", role.max_ttl_secs)),
                        ("max_leases_per_identity".into(), role.max_leases_per_identity.to_string()),
                        ("creation_sql".into(), role.creation_sql.clone()),
                        ("revocation_sql".into(), role.revocation_sql.clone()),
                        ("renew_sql".into(), role.renew_sql.clone()),
                    ];
                    print(
                        format,
                        || table(&rows),
                        json!({"name": role.name, "db": role.db, "ttl_secs": role.ttl_secs, "max_ttl_secs": role.max_ttl_secs,
                               "max_leases_per_identity": role.max_leases_per_identity, "creation_sql": role.creation_sql,
                               "revocation_sql": role.revocation_sql, "renew_sql": role.renew_sql,
                               "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::ListConfigs | DbCommand::ListRoles => {
                    let configs = matches!(cmd, DbCommand::ListConfigs);
                    let r = if configs {
                        rpc!(c, Read, db_config_list, proto::Empty {}).await?
                    } else {
                        rpc!(c, Read, db_role_list, proto::Empty {}).await?
                    };
                    let names = r.get_ref().names.clone();
                    let key = if configs { "connections" } else { "roles" };
                    print(
                        format,
                        || names.join("\n"),
                        json!({key: names, "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::DeleteConfig { name } => {
                    let r = rpc!(c, Write, db_config_delete, proto::DbName { name: name.clone() }).await?;
                    print(
                        format,
                        || format!("Success! deleted connection {name}"),
                        json!({"audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::RotateRoot { name } => {
                    let r = rpc!(c, Write, db_rotate_root, proto::DbName { name: name.clone() }).await?;
                    print(
                        format,
                        || format!("Success! rotated the admin password of connection {name}"),
                        json!({"audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::DeleteRole { name } => {
                    let r = rpc!(c, Write, db_role_delete, proto::DbName { name: name.clone() }).await?;
                    print(
                        format,
                        || format!("Success! deleted role {name}"),
                        json!({"audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                DbCommand::Creds { role } => {
                    let r = rpc!(c, Write, db_creds, proto::DbCredsRequest { role }).await?;
                    let creds = r.get_ref();
                    let lease = creds.lease.clone().unwrap_or_default();
                    let mut rows = vec![
                        ("username".to_owned(), creds.username.clone()),
                        ("password".into(), creds.password.clone()),
                    ];
                    rows.extend(lease_rows(&lease));
                    print(
                        format,
                        || table(&rows),
                        json!({"username": creds.username, "password": creds.password, "lease": lease_json(&lease),
                               "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
            }
            Ok(())
        }
        Command::Lease(cmd) => {
            let cmd_kind = if matches!(cmd, LeaseCommand::RevokePrefix { .. }) {
                LeaseKind::Prefix
            } else {
                LeaseKind::One
            };
            match cmd {
                LeaseCommand::Renew { lease_id, increment } => {
                    let r = rpc!(
                        c,
                        Write,
                        lease_renew,
                        proto::LeaseRenewRequest { lease_id, increment_secs: increment }
                    )
                    .await?;
                    let mut out = lease_json(r.get_ref());
                    out["audit_position"] = position(&r);
                    print(format, || table(&lease_rows(r.get_ref())), out);
                }
                LeaseCommand::List { prefix, expired } => {
                    let r = rpc!(c, Read, lease_list, proto::LeaseListRequest { prefix, expired }).await?;
                    let list = r.get_ref();
                    let rows: Vec<(String, String)> = list
                        .leases
                        .iter()
                        .map(|l| (l.lease_id.clone(), format!("expires {}", l.expire_unix_ms)))
                        .collect();
                    let truncated = list.truncated;
                    print(
                        format,
                        || {
                            let mut text = table(&rows);
                            if truncated {
                                text.push_str("\n(more leases match: give a longer prefix)");
                            }
                            text
                        },
                        json!({"leases": list.leases.iter().map(lease_json).collect::<Vec<_>>(), "truncated": truncated,
                               "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
                LeaseCommand::Lookup { lease_id } => {
                    let r = rpc!(c, Read, lease_lookup, proto::LeaseId { lease_id }).await?;
                    let mut out = lease_json(r.get_ref());
                    out["audit_position"] = position(&r);
                    print(format, || table(&lease_rows(r.get_ref())), out);
                }
                LeaseCommand::Revoke { lease_id } | LeaseCommand::RevokePrefix { prefix: lease_id } => {
                    let prefix = matches!(cmd_kind, LeaseKind::Prefix);
                    let r =
                        rpc!(c, Write, lease_revoke, proto::LeaseRevokeRequest { lease_id, prefix }).await?;
                    let n = r.get_ref().revoked;
                    print(
                        format,
                        || format!("Success! revoked {n} lease(s)"),
                        json!({"revoked": n, "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                }
            }
            Ok(())
        }
        Command::Access(cmd) => {
            let r = match cmd {
                AccessCommand::Request { policy, ttl, reason } => {
                    rpc!(
                        c,
                        Write,
                        access_request,
                        proto::AccessRequestRequest { policy, ttl_secs: ttl, reason }
                    )
                    .await?
                }
                AccessCommand::Approve { id } => {
                    rpc!(c, Write, access_approve, proto::AccessGrantId { id }).await?
                }
                AccessCommand::List => {
                    let r = rpc!(c, Read, access_list, proto::Empty {}).await?;
                    let grants = &r.get_ref().grants;
                    print(
                        format,
                        || grants.iter().map(grant_text).collect::<Vec<_>>().join("\n"),
                        json!({"grants": grants.iter().map(grant_json).collect::<Vec<_>>(), "audit_position": position(&r), "request_id": request_id(&r)}),
                    );
                    return Ok(());
                }
            };
            let g = r.get_ref();
            let mut out = grant_json(g);
            out["audit_position"] = position(&r);
            out["request_id"] = request_id(&r);
            print(format, || grant_text(g), out);
            Ok(())
        }
        Command::Rotate { path } => {
            let (mount, path) = split_mount(&path)?;
            let r = rpc!(c, Write, kv_rotate, proto::KvPathRequest { mount, path }).await?;
            let version = r.get_ref().version;
            print(
                format,
                || format!("Success! version {version} is current"),
                json!({"version": version, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
            Ok(())
        }
    }
}

fn region_rows(s: &proto::RegionStatusResponse) -> String {
    let mut rows = vec![
        ("region".into(), s.region.clone()),
        ("role".into(), s.role.clone()),
        ("epoch".into(), s.epoch.to_string()),
        ("primary".into(), s.primary.clone()),
    ];
    if s.role == "standby" {
        rows.push(("seeded".into(), s.seeded.to_string()));
        rows.push(("link".into(), s.link.clone()));
        rows.push(("lag (versions)".into(), s.lag_changes.to_string()));
        rows.push(("lag (audit entries)".into(), s.lag_entries.to_string()));
        rows.push(("lag (seconds)".into(), format!("{:.3}", s.lag_seconds)));
        rows.push(("last applied (unix ms)".into(), s.last_applied_unix_ms.to_string()));
    }
    for p in &s.peers {
        rows.push((format!("peer {}", p.region), format!("{} epoch {} link {}", p.role, p.epoch, p.link)));
    }
    table(&rows)
}

fn region_json(s: &proto::RegionStatusResponse) -> serde_json::Value {
    json!({
        "region": s.region, "role": s.role, "epoch": s.epoch, "primary": s.primary, "seeded": s.seeded,
        "link": s.link, "lag_versions": s.lag_changes, "lag_entries": s.lag_entries,
        "lag_seconds": s.lag_seconds, "last_applied_unix_ms": s.last_applied_unix_ms,
        "peers": s.peers.iter().map(|p| json!({"region": p.region, "role": p.role, "epoch": p.epoch, "link": p.link})).collect::<Vec<_>>(),
    })
}

fn divergence_json(r: &proto::DivergenceReport) -> serde_json::Value {
    json!({
        "id": r.id, "region": r.region, "new_primary": r.new_primary, "epoch": r.epoch,
        "created_unix_ms": r.created_unix_ms,
        "writes": r.writes.iter().map(|w| json!({
            "position": w.position, "time_unix_ms": w.time_unix_ms, "kind": w.kind, "path": w.path,
            "version": w.version, "op": w.op,
        })).collect::<Vec<_>>(),
    })
}

fn divergence_text(r: &proto::DivergenceReport) -> String {
    let mut out = format!(
        "divergence report {} — region {} (now a standby of {}, epoch {}): {} write(s) never replicated\n",
        r.id,
        r.region,
        r.new_primary,
        r.epoch,
        r.writes.len()
    );
    for w in &r.writes {
        let version = w.version.map(|v| format!(" v{v}")).unwrap_or_default();
        out += &format!(
            "  {} {} {}{} at {} (audit position {})\n",
            w.op, w.kind, w.path, version, w.time_unix_ms, w.position
        );
    }
    out
}

async fn reapply(from: &Client, primary: &Client, format: Format, id: u64) -> Result<(), Failure> {
    let secrets =
        rpc!(from, First, region_divergent_secrets, proto::DivergenceRequest { id }).await?.into_inner();
    let mut done = Vec::new();
    for s in secrets.secrets {
        let r = rpc!(
            primary,
            Write,
            kv_put,
            proto::KvPutRequest {
                mount: s.mount.clone(),
                path: s.path.clone(),
                data: s.data,
                cas: None,
                json_keys: s.json_keys,
            }
        )
        .await?;
        done.push(json!({
            "path": format!("{}/{}", s.mount, s.path), "diverged_version": s.version,
            "original_position": s.position, "new_version": r.get_ref().version, "audit_position": position(&r),
        }));
    }
    print(
        format,
        || {
            let mut out =
                format!("re-applied {} secret version(s) from divergence report {id}\n", done.len());
            for d in &done {
                out += &format!(
                    "  {} (v{} there) → v{} on the primary\n",
                    d["path"].as_str().unwrap_or(""),
                    d["diverged_version"],
                    d["new_version"]
                );
            }
            out
        },
        json!({"reapplied": done}),
    );
    Ok(())
}

async fn region(c: &Client, format: Format, cmd: RegionCommand) -> Result<(), Failure> {
    match cmd {
        RegionCommand::Status => {
            let r = rpc!(c, First, region_status, proto::Empty {}).await?;
            print(format, || region_rows(r.get_ref()), region_json(r.get_ref()));
        }
        RegionCommand::Promote => {
            let r = rpc!(c, First, region_promote, proto::Empty {}).await?;
            let s = r.get_ref();
            print(
                format,
                || format!("Success! region {} is the primary at epoch {}", s.region, s.epoch),
                region_json(s),
            );
        }
        RegionCommand::Demote { primary } => {
            let r = rpc!(c, First, region_demote, proto::RegionDemoteRequest { primary }).await?;
            print(format, || divergence_text(r.get_ref()), divergence_json(r.get_ref()));
        }
        RegionCommand::Divergence { id } => {
            let r = rpc!(c, First, region_divergence, proto::DivergenceRequest { id }).await?;
            print(format, || divergence_text(r.get_ref()), divergence_json(r.get_ref()));
        }
        RegionCommand::Reapply { .. } => unreachable!("handled above with two connections"),
    }
    Ok(())
}

async fn kv(c: &Client, format: Format, cmd: KvCommand) -> Result<(), Failure> {
    match cmd {
        KvCommand::Put { path, pairs, cas } => {
            let (mount, path) = split_mount(&path)?;
            let (data, json_keys) = parse_fields(&pairs)?;
            let r = rpc!(c, Write, kv_put, proto::KvPutRequest { mount, path, data, cas, json_keys }).await?;
            let version = r.get_ref().version;
            print(
                format,
                || format!("Success! version {version}"),
                json!({"version": version, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        KvCommand::Get { path, version, stage, field } => {
            let (mount, path) = split_mount(&path)?;
            let stage = stage.unwrap_or_default();
            let r = rpc!(c, Read, kv_get, proto::KvGetRequest { mount, path, version, stage }).await?;
            print_secret(format, r, field)?;
        }
        KvCommand::Patch { path, pairs, remove, cas } => {
            let (mount, path) = split_mount(&path)?;
            let (set, json_keys) = parse_fields(&pairs)?;
            let r =
                rpc!(c, Write, kv_patch, proto::KvPatchRequest { mount, path, set, remove, cas, json_keys })
                    .await?;
            let version = r.get_ref().version;
            print(
                format,
                || format!("Success! version {version}"),
                json!({"version": version, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        KvCommand::List { path } => {
            let (mount, prefix) =
                arca_client::split_prefix_in(&path, MOUNTS.get().map_or(&[], Vec::as_slice))?;
            let r = rpc!(c, Read, kv_list, proto::KvListRequest { mount, prefix }).await?;
            let names = r.get_ref().names.clone();
            print(
                format,
                || names.join("\n"),
                json!({"keys": names, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        KvCommand::Delete { path, versions } => versions_op(c, format, "deleted", path, versions, 0).await?,
        KvCommand::Undelete { path, versions } => {
            versions_op(c, format, "undeleted", path, versions, 1).await?
        }
        KvCommand::Destroy { path, versions } => {
            versions_op(c, format, "destroyed", path, versions, 2).await?
        }
        KvCommand::Revoke { path, versions, all } => {
            let (mount, path) = split_mount(&path)?;
            let r = rpc!(c, Write, kv_revoke, proto::KvRevokeRequest { mount, path, versions, all }).await?;
            let revoked = r.get_ref().versions.clone();
            let list = revoked.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            print(
                format,
                || format!("Success! revoked versions: {list}"),
                json!({"versions": revoked, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        KvCommand::Rotation(cmd) => {
            let r = match cmd {
                RotationCommand::Set {
                    path,
                    interval_secs,
                    schedule,
                    rotator,
                    field,
                    length,
                    symbols,
                    bytes,
                    command,
                    url,
                } => {
                    let (mount, path) = split_mount(&path)?;
                    let req = proto::KvRotationRequest {
                        mount,
                        path,
                        interval_secs,
                        schedule: schedule.unwrap_or_default(),
                        rotator,
                        field: field.unwrap_or_default(),
                        length,
                        symbols,
                        bytes,
                        command: command.unwrap_or_default(),
                        url: url.unwrap_or_default(),
                    };
                    rpc!(c, Write, kv_rotation_set, req).await?
                }
                RotationCommand::Clear { path } => {
                    let (mount, path) = split_mount(&path)?;
                    rpc!(c, Write, kv_rotation_clear, proto::KvPathRequest { mount, path }).await?
                }
            };
            print_metadata(format, r);
        }
        KvCommand::Metadata(cmd) => match cmd {
            MetadataCommand::Get(PathArg { path }) => {
                let (mount, path) = split_mount(&path)?;
                let r = rpc!(c, Read, kv_read_metadata, proto::KvPathRequest { mount, path }).await?;
                print_metadata(format, r);
            }
            MetadataCommand::Put { path, max_versions, cas_required, custom } => {
                let (mount, path) = split_mount(&path)?;
                let replace = !custom.is_empty();
                let custom_metadata = parse_pairs(&custom)?;
                let r = rpc!(
                    c,
                    Write,
                    kv_write_metadata,
                    proto::KvWriteMetadataRequest {
                        mount,
                        path,
                        max_versions,
                        cas_required,
                        custom_metadata,
                        replace_custom_metadata: replace,
                    }
                )
                .await?;
                print_metadata(format, r);
            }
            MetadataCommand::Delete(PathArg { path }) => {
                let (mount, path) = split_mount(&path)?;
                let r = rpc!(c, Write, kv_delete_metadata, proto::KvPathRequest { mount, path }).await?;
                print(
                    format,
                    || "Success! deleted every version and the metadata".into(),
                    json!({"audit_position": position(&r), "request_id": request_id(&r)}),
                );
            }
        },
    }
    Ok(())
}

fn print_metadata(format: Format, r: Response<proto::KvMetadata>) {
    let (pos, rid) = (position(&r), request_id(&r));
    let m = r.into_inner();
    let versions: Vec<Value> = m
        .versions
        .iter()
        .map(|v| json!({"version": v.version, "created_unix_ms": v.created_unix_ms, "deletion_unix_ms": v.deletion_unix_ms, "destroyed": v.destroyed, "revoked": v.revoked}))
        .collect();
    let human = || {
        let mut rows = vec![
            ("current_version".to_owned(), m.current_version.to_string()),
            ("oldest_version".into(), m.oldest_version.to_string()),
            ("max_versions".into(), m.max_versions.to_string()),
            ("cas_required".into(), m.cas_required.to_string()),
        ];
        for (k, v) in &m.custom_metadata {
            rows.push((format!("custom.{k}"), v.clone()));
        }
        let mut stages: Vec<_> = m.stages.iter().collect();
        stages.sort();
        for (stage, v) in stages {
            rows.push((format!("stage {stage}"), v.to_string()));
        }
        if !m.rotation.is_empty() {
            rows.push(("rotation".into(), m.rotation.clone()));
            rows.push(("next rotation (unix ms)".into(), m.rotation_next_unix_ms.to_string()));
        }
        if !m.rotation_step.is_empty() {
            rows.push(("rotation under way, next step".into(), m.rotation_step.clone()));
        }
        for v in &m.versions {
            let state = if v.revoked {
                "revoked"
            } else if v.destroyed {
                "destroyed"
            } else if v.deletion_unix_ms > 0 {
                "deleted"
            } else {
                "live"
            };
            rows.push((format!("version {}", v.version), state.into()));
        }
        table(&rows)
    };
    print(
        format,
        human,
        json!({"current_version": m.current_version, "oldest_version": m.oldest_version, "max_versions": m.max_versions,
               "cas_required": m.cas_required, "custom_metadata": m.custom_metadata, "versions": versions,
               "stages": m.stages, "rotation": serde_json::from_str::<Value>(&m.rotation).unwrap_or(Value::Null),
               "rotation_step": m.rotation_step, "rotation_next_unix_ms": m.rotation_next_unix_ms,
               "created_unix_ms": m.created_unix_ms, "updated_unix_ms": m.updated_unix_ms, "audit_position": pos, "request_id": rid}),
    );
}

async fn versions_op(
    c: &Client,
    format: Format,
    verb: &str,
    path: String,
    versions: Vec<u64>,
    which: u8,
) -> Result<(), Failure> {
    let (mount, path) = split_mount(&path)?;
    let req = proto::KvVersionsRequest { mount, path, versions };
    let r = match which {
        0 => rpc!(c, Write, kv_delete, req).await?,
        1 => rpc!(c, Write, kv_undelete, req).await?,
        _ => rpc!(c, Write, kv_destroy, req).await?,
    };
    let changed = r.get_ref().versions.clone();
    let list = changed.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    print(
        format,
        || format!("Success! {verb} versions: {list}"),
        json!({"versions": changed, "audit_position": position(&r), "request_id": request_id(&r)}),
    );
    Ok(())
}

async fn token(c: &Client, format: Format, cmd: TokenCommand) -> Result<(), Failure> {
    match cmd {
        TokenCommand::Create { policies, ttl, display_name, renewable, orphan, bound_cidrs, meta } => {
            let meta = parse_pairs(&meta)?;
            let r = rpc!(
                c,
                Write,
                token_create,
                proto::TokenCreateRequest {
                    policies,
                    ttl_secs: ttl,
                    display_name,
                    renewable,
                    orphan,
                    bound_cidrs,
                    meta
                }
            )
            .await?;
            print_token_auth(format, r);
        }
        TokenCommand::Lookup { accessor } => {
            let r = rpc!(c, Read, token_lookup, proto::TokenAccessorRequest { accessor }).await?;
            let (pos, rid) = (position(&r), request_id(&r));
            let info = r.into_inner();
            print(
                format,
                || table(&token_rows(&info)),
                json!({"info": token_json(&info), "audit_position": pos, "request_id": rid}),
            );
        }
        TokenCommand::Renew { increment } => {
            let r =
                rpc!(c, Write, token_renew, proto::TokenRenewRequest { increment_secs: increment }).await?;
            let (pos, rid) = (position(&r), request_id(&r));
            let info = r.into_inner();
            print(
                format,
                || table(&token_rows(&info)),
                json!({"info": token_json(&info), "audit_position": pos, "request_id": rid}),
            );
        }
        TokenCommand::Capabilities { paths, accessor, of_token } => {
            let token = of_token.as_deref().map(read_value).transpose()?.unwrap_or_default();
            let request = proto::TokenCapabilitiesRequest { paths, token, accessor };
            let r = rpc!(c, Read, token_capabilities, request).await?;
            let found: Vec<(String, Vec<String>)> =
                r.get_ref().paths.iter().map(|p| (p.path.clone(), p.capabilities.clone())).collect();
            let rows: Vec<(String, String)> = found.iter().map(|(p, c)| (p.clone(), c.join(", "))).collect();
            let map: serde_json::Map<String, Value> =
                found.iter().map(|(p, c)| (p.clone(), json!(c))).collect();
            print(
                format,
                || if rows.len() == 1 { rows[0].1.clone() } else { table(&rows) },
                json!({"capabilities": map, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        TokenCommand::Revoke { accessor } => {
            let r = rpc!(c, Write, token_revoke, proto::TokenAccessorRequest { accessor }).await?;
            let n = r.get_ref().revoked;
            print(
                format,
                || format!("Success! revoked {n} token(s)"),
                json!({"revoked": n, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
    }
    Ok(())
}

async fn policy(c: &Client, format: Format, cmd: PolicyCommand) -> Result<(), Failure> {
    match cmd {
        PolicyCommand::Write { name, file } => {
            let text = read_value(&if file == "-" { file } else { format!("@{file}") })?;
            let r =
                rpc!(c, Write, policy_write, proto::PolicyWriteRequest { name: name.clone(), policy: text })
                    .await?;
            print(
                format,
                || format!("Success! wrote policy {name}"),
                json!({"name": name, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        PolicyCommand::Read { name } => {
            let r = rpc!(c, Read, policy_read, proto::PolicyName { name }).await?;
            let (pos, rid) = (position(&r), request_id(&r));
            let p = r.into_inner();
            print(
                format,
                || p.policy.clone(),
                json!({"name": p.name, "policy": p.policy, "audit_position": pos, "request_id": rid}),
            );
        }
        PolicyCommand::List => {
            let r = rpc!(c, Read, policy_list, proto::Empty {}).await?;
            let names = r.get_ref().names.clone();
            print(
                format,
                || names.join("\n"),
                json!({"policies": names, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        PolicyCommand::Delete { name } => {
            let r = rpc!(c, Write, policy_delete, proto::PolicyName { name: name.clone() }).await?;
            print(
                format,
                || format!("Success! deleted policy {name}"),
                json!({"name": name, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
    }
    Ok(())
}

async fn approle(c: &Client, format: Format, cmd: AppRoleCommand) -> Result<(), Failure> {
    let role_json = |r: &proto::AppRoleInfo| json!({"name": r.name, "policies": r.policies, "token_ttl_secs": r.token_ttl_secs, "secret_id_ttl_secs": r.secret_id_ttl_secs});
    let role_rows = |r: &proto::AppRoleInfo| {
        table(&[
            ("name".into(), r.name.clone()),
            ("policies".into(), r.policies.join(",")),
            ("token_ttl_secs".into(), r.token_ttl_secs.to_string()),
            ("secret_id_ttl_secs".into(), r.secret_id_ttl_secs.to_string()),
        ])
    };
    match cmd {
        AppRoleCommand::Write {
            name,
            policies,
            token_ttl,
            secret_id_ttl,
            secret_id_bound_cidrs,
            token_bound_cidrs,
            meta,
        } => {
            let metadata = parse_pairs(&meta)?;
            let r = rpc!(
                c,
                Write,
                app_role_write,
                proto::AppRoleWriteRequest {
                    name,
                    policies,
                    token_ttl_secs: token_ttl,
                    secret_id_ttl_secs: secret_id_ttl,
                    secret_id_bound_cidrs,
                    token_bound_cidrs,
                    metadata,
                }
            )
            .await?;
            let role = r.get_ref().clone();
            print(
                format,
                || role_rows(&role),
                json!({"role": role_json(&role), "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        AppRoleCommand::Read { name } => {
            let r = rpc!(c, Read, app_role_read, proto::AppRoleName { name }).await?;
            let role = r.get_ref().clone();
            print(
                format,
                || role_rows(&role),
                json!({"role": role_json(&role), "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        AppRoleCommand::Delete { name } => {
            let r = rpc!(c, Write, app_role_delete, proto::AppRoleName { name: name.clone() }).await?;
            print(
                format,
                || format!("Success! deleted role {name}"),
                json!({"audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        AppRoleCommand::List => {
            let r = rpc!(c, Read, app_role_list, proto::Empty {}).await?;
            let names = r.get_ref().names.clone();
            print(
                format,
                || names.join("\n"),
                json!({"roles": names, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        AppRoleCommand::RoleId { name } => {
            let r = rpc!(c, Read, app_role_role_id, proto::AppRoleName { name }).await?;
            let id = r.get_ref().role_id.clone();
            print(
                format,
                || id.clone(),
                json!({"role_id": id, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        AppRoleCommand::SecretId { name } => {
            let r = rpc!(c, Write, app_role_secret_id, proto::AppRoleName { name }).await?;
            print_secret_id(format, r);
        }
        AppRoleCommand::Login { role_id, secret_id } => {
            let r = rpc!(c, Write, app_role_login, proto::AppRoleLoginRequest { role_id, secret_id }).await?;
            print_token_auth(format, r);
        }
    }
    Ok(())
}

/// Prints a read's answer (`kv get`, or an unwrapped read): one field, or the version and
/// every field.
fn print_secret(
    format: Format,
    r: Response<proto::KvGetResponse>,
    field: Option<String>,
) -> Result<(), Failure> {
    let (pos, rid) = (position(&r), request_id(&r));
    let g = r.into_inner();
    if let Some(field) = field {
        let value = g
            .data
            .get(&field)
            .ok_or(Failure { code: 4, message: format!("no key {field:?} in this secret") })?;
        match format {
            Format::Human => println!("{value}"),
            Format::Json => {
                let one = HashMap::from([(field.clone(), value.clone())]);
                println!("{}", fields_json(&one, &g.json_keys));
            }
        }
        return Ok(());
    }
    let mut data: Vec<_> = g.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    data.sort();
    print(
        format,
        || format!("version    {}\n\n{}", g.version, table(&data)),
        json!({"data": fields_json(&g.data, &g.json_keys), "version": g.version, "created_unix_ms": g.created_unix_ms,
               "custom_metadata": g.custom_metadata, "audit_position": pos, "request_id": rid}),
    );
    Ok(())
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Prints an AppRole secret id's answer (`approle secret-id`, or unwrapped).
fn print_secret_id(format: Format, r: Response<proto::SecretIdResponse>) {
    let s = r.get_ref();
    print(
        format,
        || table(&[("secret_id".into(), s.secret_id.clone()), ("accessor".into(), s.accessor.clone())]),
        json!({"secret_id": s.secret_id, "accessor": s.accessor, "expire_unix_ms": s.expire_unix_ms, "audit_position": position(&r), "request_id": request_id(&r)}),
    );
}

/// `message` as an answer carrying `receipt`'s audit position and request id (an unwrapped
/// answer is printed with the unwrap's own).
fn with_receipt<T>(message: T, receipt: &arca_client::Receipt) -> Response<T> {
    let mut response = Response::new(message);
    for (key, value) in
        [(AUDIT_POSITION_HEADER, &receipt.audit_position), (REQUEST_ID_HEADER, &receipt.request_id)]
    {
        if let Some(value) = value.as_deref().and_then(|v| v.parse().ok()) {
            response.metadata_mut().insert(key, value);
        }
    }
    response
}

/// `arca unwrap`: the wrapped answer, printed as the command that made it would print it
/// (a read, a secret id, a token; any other gRPC answer as its message; an answer wrapped
/// over the HTTP API as its JSON), or with `--lookup` what the token wraps.
async fn unwrap(c: &Client, format: Format, token: &str, lookup: bool) -> Result<(), Failure> {
    use prost::Message as _;
    if lookup {
        let l = c.wrap_lookup(token).await?;
        print(
            format,
            || {
                table(&[
                    ("creation_path".into(), l.creation_path.clone()),
                    ("creation_unix_ms".into(), l.created_unix_ms.to_string()),
                    ("ttl".into(), format!("{}s", l.ttl_secs)),
                    ("accessor".into(), l.accessor.clone()),
                ])
            },
            json!({"creation_path": l.creation_path, "created_unix_ms": l.created_unix_ms, "ttl": l.ttl_secs, "accessor": l.accessor}),
        );
        return Ok(());
    }
    let (u, receipt) = c.unwrap(token).await?;
    let undecodable = |_| local(format!("the wrapped answer of {} does not decode", u.grpc_method));
    match u.grpc_method.rsplit('/').next().unwrap_or_default() {
        _ if u.grpc_method.is_empty() => match format {
            Format::Json => println!("{}", u.json),
            Format::Human => {
                let body: Value = serde_json::from_str(&u.json).unwrap_or(Value::String(u.json.clone()));
                println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
            }
        },
        "KvGet" => {
            let read = proto::KvGetResponse::decode(u.message.as_slice()).map_err(undecodable)?;
            print_secret(format, with_receipt(read, &receipt), None)?;
        }
        "AppRoleSecretId" => {
            let secret = proto::SecretIdResponse::decode(u.message.as_slice()).map_err(undecodable)?;
            print_secret_id(format, with_receipt(secret, &receipt));
        }
        "TokenCreate" | "AppRoleLogin" | "CertLogin" => {
            let auth = proto::TokenAuth::decode(u.message.as_slice()).map_err(undecodable)?;
            print_token_auth(format, with_receipt(auth, &receipt));
        }
        _ => print(
            format,
            || {
                format!(
                    "{}: {} bytes of protobuf (decode it as that method's answer)",
                    u.grpc_method,
                    u.message.len()
                )
            },
            json!({"grpc_method": u.grpc_method, "message_base64": base64_of(&u.message)}),
        ),
    }
    Ok(())
}

async fn cert(c: &Client, format: Format, cmd: CertCommand) -> Result<(), Failure> {
    let info_json = |r: &proto::CertRoleInfo| json!({"name": r.name, "certificate_sha256": r.certificate_sha256, "policies": r.policies, "token_ttl_secs": r.token_ttl_secs});
    let info_rows = |r: &proto::CertRoleInfo| {
        table(&[
            ("name".into(), r.name.clone()),
            ("certificate_sha256".into(), r.certificate_sha256.clone()),
            ("policies".into(), r.policies.join(",")),
            ("token_ttl_secs".into(), r.token_ttl_secs.to_string()),
        ])
    };
    match cmd {
        CertCommand::Write { name, cert, policies, token_ttl } => {
            let certificate_pem =
                std::fs::read_to_string(&cert).map_err(|e| local(format!("{}: {e}", cert.display())))?;
            let r = rpc!(
                c,
                Write,
                cert_role_write,
                proto::CertRoleWriteRequest { name, certificate_pem, policies, token_ttl_secs: token_ttl }
            )
            .await?;
            let role = r.get_ref().clone();
            print(
                format,
                || info_rows(&role),
                json!({"role": info_json(&role), "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        CertCommand::Read { name } => {
            let r = rpc!(c, Read, cert_role_read, proto::CertRoleName { name }).await?;
            let role = r.get_ref().clone();
            print(
                format,
                || info_rows(&role),
                json!({"role": info_json(&role), "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        CertCommand::Delete { name } => {
            let r = rpc!(c, Write, cert_role_delete, proto::CertRoleName { name: name.clone() }).await?;
            print(
                format,
                || format!("Success! deleted certificate role {name}"),
                json!({"audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        CertCommand::Login => {
            let r = rpc!(c, Write, cert_login, proto::Empty {}).await?;
            print_token_auth(format, r);
        }
    }
    Ok(())
}

fn status_json(s: &proto::SealStatus) -> Value {
    json!({"initialized": s.initialized, "sealed": s.sealed, "key_shares": s.key_shares, "key_threshold": s.key_threshold,
           "progress": s.progress, "keyring_term": s.keyring_term, "cluster": s.cluster, "region": s.region, "node": s.node,
           "seal_type": s.seal_type, "sealed_reason": s.sealed_reason})
}

fn status_rows(s: &proto::SealStatus) -> String {
    let mut rows = vec![
        ("initialized".into(), s.initialized.to_string()),
        ("sealed".into(), s.sealed.to_string()),
        ("seal type".into(), s.seal_type.clone()),
        ("key shares".into(), s.key_shares.to_string()),
        ("key threshold".into(), s.key_threshold.to_string()),
        ("unseal progress".into(), format!("{}/{}", s.progress, s.key_threshold)),
        ("keyring term".into(), s.keyring_term.to_string()),
        ("node".into(), format!("{}/{}/{}", s.cluster, s.region, s.node)),
    ];
    if !s.sealed_reason.is_empty() {
        rows.push(("sealed because".into(), s.sealed_reason.clone()));
    }
    table(&rows)
}

async fn operator(c: &Client, format: Format, cmd: OperatorCommand) -> Result<(), Failure> {
    match cmd {
        OperatorCommand::Init { key_shares, key_threshold } => {
            let r = rpc!(c, First, init, proto::InitRequest { key_shares, key_threshold }).await?;
            let (pos, rid) = (position(&r), request_id(&r));
            let i = r.into_inner();
            let human = || {
                let mut out: Vec<String> = i
                    .key_shares
                    .iter()
                    .enumerate()
                    .map(|(n, s)| format!("Unseal Key {}: {s}", n + 1))
                    .collect();
                out.push(format!("\nInitial Root Token: {}", i.root_token));
                out.push(format!(
                    "\nThe node is unsealed. Other nodes need {} of these {} key shares to unseal.\nStore them apart; they are shown only once.",
                    i.key_threshold,
                    i.key_shares.len()
                ));
                out.join("\n")
            };
            print(
                format,
                human,
                json!({"unseal_keys": i.key_shares, "unseal_threshold": i.key_threshold, "root_token": i.root_token, "audit_position": pos, "request_id": rid}),
            );
        }
        OperatorCommand::Unseal { share } => {
            let key_share = match share.as_deref() {
                None | Some("-") => read_value("-")?,
                Some(s) => s.to_owned(),
            };
            let r = rpc!(c, First, unseal, proto::UnsealRequest { key_share }).await?;
            let s = r.get_ref().clone();
            print(
                format,
                || status_rows(&s),
                json!({"status": status_json(&s), "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        OperatorCommand::Seal => {
            let r = rpc!(c, First, seal, proto::Empty {}).await?;
            print(
                format,
                || "Success! the node is sealed".into(),
                json!({"audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        OperatorCommand::Status => {
            let r = rpc!(c, First, status, proto::Empty {}).await?;
            let s = r.get_ref().clone();
            print(
                format,
                || status_rows(&s),
                json!({"status": status_json(&s), "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        OperatorCommand::MigrateSeal { to } => {
            let r = rpc!(c, First, migrate_seal, proto::MigrateSealRequest { to }).await?;
            let kind = r.get_ref().seal_type.clone();
            print(
                format,
                || format!("Success! the seal is now {kind}"),
                json!({"seal_type": kind, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
        OperatorCommand::Rotate => {
            let r = rpc!(c, Write, rotate, proto::Empty {}).await?;
            let term = r.get_ref().keyring_term;
            print(
                format,
                || format!("Success! keyring term {term} now encrypts new data"),
                json!({"keyring_term": term, "audit_position": position(&r), "request_id": request_id(&r)}),
            );
        }
    }
    Ok(())
}

#[path = "arca/agent.rs"]
mod agent;
#[path = "arca/run.rs"]
mod run;

mod audit {
    //! `arca audit …`: reading and verifying the published log over HTTP or from a directory.

    use std::io::{IsTerminal as _, Write as _};
    use std::path::PathBuf;

    use arca_audit::Event;
    use arca_audit::checkpoint;
    use arca_audit::merkle::{leaf_hash, verify_inclusion};
    use arca_audit::note::NoteVerifier;
    use arca_audit::tiles;
    use arca_audit::verify::{LogReader, Seen, verify_log};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use serde_json::{Value, json};

    use super::{AuditCommand, Failure, LogKey, LogSource, local};

    const MAX_FILE_BYTES: u64 = 16 << 20;

    enum Source {
        Http {
            base: String,
            agent: ureq::Agent,
        },
        Dir(PathBuf),
        /// An archive with the live log beside it: immutable files from the archive, the
        /// rest (and the latest checkpoint) from the node.
        Both {
            dir: PathBuf,
            base: String,
            agent: ureq::Agent,
        },
    }

    impl Source {
        fn new(source: &LogSource) -> Result<Self, Failure> {
            match (&source.url, &source.dir) {
                (Some(url), None) => {
                    Ok(Source::Http { base: url.trim_end_matches('/').to_owned(), agent: agent() })
                }
                (None, Some(dir)) => Ok(Source::Dir(dir.clone())),
                (Some(url), Some(dir)) => Ok(Source::Both {
                    dir: dir.clone(),
                    base: url.trim_end_matches('/').to_owned(),
                    agent: agent(),
                }),
                _ => Err(local("give --url, --dir, or both")),
            }
        }

        fn get(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
            match self {
                Source::Http { base, agent } => http_get(agent, &format!("{base}/{path}")),
                Source::Dir(dir) => file_get(dir, path),
                Source::Both { dir, base, agent } => match path {
                    "checkpoint" => http_get(agent, &format!("{base}/{path}")),
                    _ => match file_get(dir, path)? {
                        Some(data) => Ok(Some(data)),
                        None => http_get(agent, &format!("{base}/{path}")),
                    },
                },
            }
        }
    }

    fn file_get(dir: &std::path::Path, path: &str) -> Result<Option<Vec<u8>>, String> {
        match std::fs::metadata(dir.join(path)) {
            Ok(meta) if meta.len() > MAX_FILE_BYTES => Err(format!("{path} is larger than 16 MiB")),
            Ok(_) => std::fs::read(dir.join(path)).map(Some).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder().http_status_as_error(false).build().into()
    }

    fn http_get(agent: &ureq::Agent, url: &str) -> Result<Option<Vec<u8>>, String> {
        let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
        match response.status().as_u16() {
            200 => response
                .body_mut()
                .with_config()
                .limit(MAX_FILE_BYTES)
                .read_to_vec()
                .map(Some)
                .map_err(|e| e.to_string()),
            404 => Ok(None),
            code => Err(format!("HTTP {code}")),
        }
    }

    impl LogReader for Source {
        fn checkpoint(&mut self) -> Result<String, String> {
            let raw = self.get("checkpoint")?.ok_or("the log has no checkpoint")?;
            String::from_utf8(raw).map_err(|_| "the checkpoint is not UTF-8".to_owned())
        }

        fn tile(&mut self, level: u32, index: u64, width: u64) -> Result<Option<Vec<u8>>, String> {
            if let Some(tile) = self.get(&tiles::tile_path(level, index, width))? {
                return Ok(Some(tile));
            }
            // A wider (or full) tile holds the narrower one as its prefix.
            let full = self.get(&tiles::tile_path(level, index, tiles::TILE_WIDTH))?;
            Ok(full.filter(|t| t.len() as u64 >= width * 32).map(|mut t| {
                t.truncate((width * 32) as usize);
                t
            }))
        }

        fn entries(&mut self, index: u64, width: u64) -> Result<Option<Vec<u8>>, String> {
            self.get(&tiles::entries_path(index, width))
        }
    }

    fn verifier(key: &LogKey) -> Result<NoteVerifier, Failure> {
        let text = match (&key.vkey, &key.vkey_file) {
            (Some(v), None) => v.clone(),
            (None, Some(f)) => {
                std::fs::read_to_string(f).map_err(|e| local(format!("{}: {e}", f.display())))?
            }
            _ => return Err(local("give the log's verifier key: --vkey or --vkey-file")),
        };
        NoteVerifier::parse(text.trim()).map_err(|e| local(format!("verifier key: {e}")))
    }

    /// A verification failure: the log is not what it claims (exit code 6).
    fn invalid(message: String) -> Failure {
        Failure { code: 6, message }
    }

    fn load_seen(state: &Option<PathBuf>) -> Result<Option<Seen>, Failure> {
        let Some(path) = state else { return Ok(None) };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(local(format!("{}: {e}", path.display()))),
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|_| local(format!("{}: not a state file", path.display())))?;
        let size = value["size"].as_u64().ok_or_else(|| local("state file: size"))?;
        let root = value["root"]
            .as_str()
            .and_then(|r| B64.decode(r).ok())
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .ok_or_else(|| local("state file: root"))?;
        Ok(Some(Seen { size, root }))
    }

    pub(super) fn run(json_out: bool, cmd: AuditCommand) -> Result<(), Failure> {
        match cmd {
            AuditCommand::Verify { source, key, state } => {
                let verifier = verifier(&key)?;
                let mut reader = Source::new(&source)?;
                let seen = load_seen(&state)?;
                let show_progress = std::io::stderr().is_terminal();
                let mut progress = |done: u64, total: u64| {
                    if show_progress && (done.is_multiple_of(16) || done == total) {
                        eprint!("\rverifying: {done}/{total} entry bundles ({}%)", done * 100 / total.max(1));
                        let _ = std::io::stderr().flush();
                    }
                };
                let mut check =
                    |_: u64, entry: &[u8]| Event::decode(entry).map(drop).map_err(|e| e.to_string());
                // A log that cannot be read is not a log that fails to verify: exit 1, not 6.
                let report = verify_log(&mut reader, &verifier, seen, &mut check, &mut progress).map_err(
                    |e| match e {
                        arca_audit::verify::VerifyError::Read { .. } => {
                            local(format!("cannot read the log: {e}"))
                        }
                        other => invalid(format!("the log does NOT verify: {other}")),
                    },
                )?;
                if show_progress {
                    eprintln!();
                }
                if let Some(path) = &state {
                    let saved = json!({"size": report.checkpoint.size(), "root": B64.encode(report.checkpoint.root()), "checkpoint": report.checkpoint.note()});
                    std::fs::write(path, serde_json::to_vec_pretty(&saved).unwrap_or_default())?;
                }
                let origin = report.checkpoint.checkpoint().origin.clone();
                if json_out {
                    println!(
                        "{}",
                        json!({"verified": true, "origin": origin, "size": report.entries, "tiles": report.tiles,
                        "root": B64.encode(report.checkpoint.root()), "consistent_with_size": seen.map(|s| s.size)})
                    );
                } else {
                    println!(
                        "OK: log {origin} verifies: {} entries, {} tiles, signed checkpoint root {}",
                        report.entries,
                        report.tiles,
                        B64.encode(report.checkpoint.root())
                    );
                    if let Some(seen) = seen {
                        println!("OK: consistent with the checkpoint of size {} verified before", seen.size);
                    }
                }
                Ok(())
            }
            AuditCommand::Tail { source, key, from, follow } => {
                let verifier = verifier(&key)?;
                let mut reader = Source::new(&source)?;
                let mut next = from;
                loop {
                    let note = reader.checkpoint().map_err(local)?;
                    let cp = checkpoint::open(&note, &verifier)
                        .map_err(|e| invalid(format!("checkpoint: {e}")))?;
                    while next < cp.size() {
                        let bundle_index = next / tiles::TILE_WIDTH;
                        let width = tiles::tile_width(0, bundle_index, cp.size());
                        let bundle =
                            reader.entries(bundle_index, width).map_err(local)?.ok_or_else(|| {
                                invalid(format!("{} is missing", tiles::entries_path(bundle_index, width)))
                            })?;
                        let entries = tiles::bundle_entries(&bundle).map_err(|e| invalid(e.to_string()))?;
                        for (i, entry) in entries.iter().enumerate().skip((next % tiles::TILE_WIDTH) as usize)
                        {
                            let index = bundle_index * tiles::TILE_WIDTH + i as u64;
                            print_event(json_out, index, entry);
                            next = index + 1;
                        }
                    }
                    if !follow {
                        return Ok(());
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            AuditCommand::Proof { url, key, request_id, index, position } => {
                let verifier = verifier(&key)?;
                let query = match (request_id, index, position) {
                    (Some(r), None, None) => format!("request_id={r}"),
                    (None, Some(i), None) => format!("index={i}"),
                    (None, None, Some(p)) => format!("position={p}"),
                    _ => return Err(local("give one of --request-id, --index, --position")),
                };
                let base = url.trim_end_matches('/');
                let body = http_get(&agent(), &format!("{base}/proof/inclusion?{query}"))
                    .map_err(local)?
                    .ok_or(Failure {
                        code: 4,
                        message: "no such entry in the log (or not yet sequenced)".into(),
                    })?;
                let proof: Value =
                    serde_json::from_slice(&body).map_err(|_| invalid("the proof is not JSON".into()))?;
                let cp = checkpoint::open(proof["checkpoint"].as_str().unwrap_or_default(), &verifier)
                    .map_err(|e| invalid(format!("checkpoint: {e}")))?;
                let entry = proof["entry"]
                    .as_str()
                    .and_then(|e| B64.decode(e).ok())
                    .ok_or_else(|| invalid("entry".into()))?;
                let hashes: Vec<[u8; 32]> = proof["hashes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|h| {
                                h.as_str().and_then(|h| B64.decode(h).ok()).and_then(|h| h.try_into().ok())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let index = proof["index"].as_u64().ok_or_else(|| invalid("index".into()))?;
                verify_inclusion(index, cp.size(), &leaf_hash(&entry), &hashes, cp.root())
                    .map_err(|e| invalid(format!("the inclusion proof does NOT verify: {e}")))?;
                if json_out {
                    println!(
                        "{}",
                        json!({"verified": true, "index": index, "size": cp.size(), "event": event_json(&entry)})
                    );
                } else {
                    println!(
                        "OK: entry {index} is in the log of size {} (signed checkpoint verified)",
                        cp.size()
                    );
                    print_event(false, index, &entry);
                }
                Ok(())
            }
            AuditCommand::Vkey { url } => {
                let body = http_get(&agent(), &format!("{}/vkey", url.trim_end_matches('/')))
                    .map_err(local)?
                    .ok_or(Failure { code: 4, message: "the log has no key yet".into() })?;
                print!("{}", String::from_utf8_lossy(&body));
                Ok(())
            }
        }
    }

    fn event_json(entry: &[u8]) -> Value {
        match Event::decode(entry) {
            Ok(e) => json!({
                "time_unix_ms": e.time_unix_ms, "request_id": e.request_id, "cluster": e.cluster, "region": e.region,
                "node": e.node, "entity": e.actor.entity, "token_accessor": e.actor.token_accessor,
                "source": e.source.address, "proxy": e.source.proxy, "operation": e.operation.name(), "path": e.path,
                "secret_version": e.secret_version,
                "outcome": match &e.outcome { arca_audit::Outcome::Ok => "ok".to_owned(), arca_audit::Outcome::Denied => "denied".into(), arca_audit::Outcome::DeniedBy { condition } => format!("denied:{condition}"), arca_audit::Outcome::Error { code } => format!("error:{code}") },
            }),
            Err(err) => json!({"undecodable": err.to_string()}),
        }
    }

    fn print_event(json_out: bool, index: u64, entry: &[u8]) {
        let e = event_json(entry);
        if json_out {
            println!("{}", json!({"index": index, "event": e}));
        } else {
            println!(
                "{index:>8}  {}  {:<20} {:<8} {} {}  from {}",
                e["time_unix_ms"],
                e["operation"].as_str().unwrap_or("?"),
                e["outcome"].as_str().unwrap_or("?"),
                e["entity"].as_str().unwrap_or("?"),
                e["path"].as_str().unwrap_or(""),
                e["source"].as_str().unwrap_or("")
            );
        }
    }
}

/// Accepts Vault-style single-dash long options (`-format=json`, `-key-shares 5`).
fn normalize_args() -> Vec<String> {
    const LONG: &[&str] = &[
        "format",
        "key-shares",
        "key-threshold",
        "addr",
        "token",
        "ca-cert",
        "version",
        "field",
        "cas",
        "versions",
    ];
    // Nothing after `--` is ours (`arca run -- cmd -version` keeps its `-version`).
    let mut passthrough = false;
    std::env::args()
        .enumerate()
        .map(|(i, arg)| {
            if passthrough || arg == "--" {
                passthrough = true;
                return arg;
            }
            let name = arg
                .strip_prefix('-')
                .filter(|r| !r.starts_with('-'))
                .map(|r| r.split('=').next().unwrap_or(r));
            match name {
                Some(name) if i > 0 && LONG.contains(&name) => format!("-{arg}"),
                _ => arg,
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args());
    let _ = MOUNTS
        .set(cli.mounts.iter().map(|m| m.trim_matches('/').to_owned()).filter(|m| !m.is_empty()).collect());
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("arca: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // A wrapped answer: the wrapping token is the command's output.
        Err(Failure { code: 0, message }) if !message.is_empty() => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            // `arca run` hands back its command's exit code with no message.
            if !failure.message.is_empty() {
                eprintln!("Error: {}", failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}
