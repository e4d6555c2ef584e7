//! Dynamic PostgreSQL credentials against a real PostgreSQL server (Debian's, started
//! privately by `scripts/postgres.sh`) and a real `arcad`: credentials work for their TTL
//! and stop working after revoke, after expiry (the reaper) and after a node restart past
//! their expiry; renewals extend them; per-identity quotas hold; the Vault HTTP routes work;
//! every step is audited and no password reaches the node's log. Over TLS, the server's
//! certificate is verified (chain, and host name with `sslmode=verify-full`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arca_audit::{Operation, Outcome};
use arca_testkit::free_port;
use common::{Server, arca, audit_events, start_at};
use serde_json::{Value, json};

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The private PostgreSQL server; stopped on drop.
struct Postgres {
    dir: PathBuf,
    url: String,
    port: u16,
}

impl Postgres {
    fn start(parent: &Path) -> Postgres {
        Postgres::start_with(parent, &[])
    }

    /// `extra`: more arguments for `scripts/postgres.sh` (`--tls CERT KEY`).
    fn start_with(parent: &Path, extra: &[&Path]) -> Postgres {
        std::fs::set_permissions(parent, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
        let dir = parent.join("pg");
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh");
        let out =
            Command::new("bash").arg(&script).arg(&dir).arg(port.to_string()).args(extra).output().unwrap();
        assert!(out.status.success(), "postgres.sh: {}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Postgres { dir, url, port }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh");
        let _ = Command::new("bash").arg(script).arg(&self.dir).arg("stop").output();
    }
}

/// Whether `user`/`password` can log in and run a query.
fn can_log_in(port: u16, user: &str, password: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let url = format!("host=127.0.0.1 port={port} user={user} password={password} dbname=postgres");
        let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            return false;
        };
        tokio::spawn(conn);
        client
            .query_one("SELECT current_user::text", &[])
            .await
            .is_ok_and(|row| row.get::<_, String>(0) == user)
    })
}

/// The role of the TLS tests: a login with a password, valid until the lease ends.
const CREATION: &str =
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";

/// Writes role `r<case>` on connection `name` and asks for credentials: they must be issued
/// (and log in) or not, as `issued` says. Returns the run.
fn creds_for(
    server: &Server,
    root: &str,
    pg: &Postgres,
    name: &str,
    case: usize,
    issued: bool,
) -> common::Run {
    let role = format!("r{case}");
    ok(server, root, &["db", "role", &role, "--db", name, "--creation-sql", CREATION]);
    let run = arca(server, Some(root), &["--format", "json", "db", "creds", &role]);
    assert_eq!(run.code == 0, issued, "case {case}: {}{}", run.stdout, run.stderr);
    if issued {
        let v: Value = serde_json::from_str(&run.stdout).unwrap();
        let (user, password) = (v["username"].as_str().unwrap(), v["password"].as_str().unwrap());
        assert!(can_log_in(pg.port, user, password), "case {case}: the credentials work");
    }
    run
}

fn ok(server: &Server, token: &str, args: &[&str]) -> Value {
    let mut full = vec!["--format", "json"];
    full.extend_from_slice(args);
    let run = arca(server, Some(token), &full);
    assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

/// The username and password of a Vault-shaped `database/creds` reply.
fn vault_creds(v: &Value) -> (String, String) {
    (v["data"]["username"].as_str().unwrap().to_owned(), v["data"]["password"].as_str().unwrap().to_owned())
}

fn creds(server: &Server, token: &str) -> (String, String, String) {
    let v = ok(server, token, &["db", "creds", "readonly"]);
    (
        v["username"].as_str().unwrap().to_owned(),
        v["password"].as_str().unwrap().to_owned(),
        v["lease"]["lease_id"].as_str().unwrap().to_owned(),
    )
}

/// A CA and a certificate for 127.0.0.1 it signed, as files in `dir`: (ca.pem, cert, key).
fn server_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn dynamic_credentials_over_tls_verify_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = server_pki(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = server_pki(other.path());
    // The admin user may only log in over TLS (scripts/postgres.sh --tls).
    let pg = Postgres::start_with(dir.path(), &[Path::new("--tls"), &cert, &key]);
    let data = dir.path().join("data");
    let grpc = format!("127.0.0.1:{}", free_port());
    let server = start_at(&data, "n1", &grpc, &[], &[]);
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    let url_file = dir.path().join("pg-url");
    let ca_arg = format!("@{}", ca.display());
    let other_ca_arg = format!("@{}", other_ca.display());
    let localhost = pg.url.replace("@127.0.0.1:", "@localhost:");
    // (url, CA, whether credentials are issued)
    let cases = [
        (format!("{}?sslmode=verify-full", pg.url), Some(&ca_arg), true),
        (format!("{localhost}?sslmode=verify-ca"), Some(&ca_arg), true),
        (format!("{}?sslmode=require", pg.url), Some(&ca_arg), true),
        (format!("{localhost}?sslmode=verify-full"), Some(&ca_arg), false), // the name is 127.0.0.1
        (format!("{}?sslmode=verify-full", pg.url), Some(&other_ca_arg), false), // another CA
        (format!("{}?sslmode=verify-full", pg.url), None, false),           // Mozilla's roots do not know it
        (format!("{}?sslmode=disable", pg.url), None, false), // plaintext: refused by the server
        (pg.url.clone(), None, false),
    ];
    for (i, (url, ca, issued)) in cases.iter().enumerate() {
        let name = format!("pg{i}");
        std::fs::write(&url_file, url).unwrap();
        let url_arg = format!("@{}", url_file.display());
        let mut args = vec!["db", "config", &name, "--url", &url_arg];
        if let Some(ca) = ca {
            args.extend(["--db-ca", ca.as_str()]);
        }
        ok(&server, &root, &args);
        let run = creds_for(&server, &root, &pg, &name, i, *issued);
        assert!(*issued || !run.stderr.contains(&pg.url), "case {i}: the url is not echoed");
    }
    // A CA without TLS, or garbage for a CA, is refused when the connection is written.
    std::fs::write(&url_file, &pg.url).unwrap();
    let url_arg = format!("@{}", url_file.display());
    let refused = arca(&server, Some(&root), &["db", "config", "x", "--url", &url_arg, "--db-ca", &ca_arg]);
    assert_eq!(refused.code, 5, "{}", refused.stderr);
    assert!(refused.stderr.contains("sslmode"), "{}", refused.stderr);
    let garbage =
        arca(&server, Some(&root), &["db", "config", "x", "--url", &url_arg, "--db-ca", "not a pem"]);
    assert_eq!(garbage.code, 5, "{}", garbage.stderr);
    assert!(garbage.stderr.contains("ca_pem"), "{}", garbage.stderr);
}

/// A client CA, and client certificates it signs for `names` (PEM certificate and key
/// files): `(ca, [(cert, key)])`.
fn client_pki(dir: &Path, names: &[&str]) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "client CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let ca_path = dir.join("client-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let clients = names
        .iter()
        .map(|name| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, *name);
            let cert = params.signed_by(&key, &ca).unwrap();
            let paths = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
            std::fs::write(&paths.0, cert.pem()).unwrap();
            std::fs::write(&paths.1, key.serialize_pem()).unwrap();
            paths
        })
        .collect();
    (ca_path, clients)
}

#[test]
fn dynamic_credentials_with_a_client_certificate_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = server_pki(dir.path());
    let (client_ca, clients) = client_pki(&dir.path().join("clients"), &["postgres", "someone"]);
    let (_, strangers) = client_pki(&dir.path().join("strangers"), &["postgres"]);
    // The admin user may only log in over TLS with a certificate for "postgres" from the
    // client CA (scripts/postgres.sh --client-ca: clientcert=verify-full).
    let pg = Postgres::start_with(
        dir.path(),
        &[Path::new("--tls"), &cert, &key, Path::new("--client-ca"), &client_ca],
    );
    let data = dir.path().join("data");
    let grpc = format!("127.0.0.1:{}", free_port());
    let server = start_at(&data, "n1", &grpc, &[], &[]);
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    let url_file = dir.path().join("pg-url");
    std::fs::write(&url_file, format!("{}?sslmode=verify-full", pg.url)).unwrap();
    let url_arg = format!("@{}", url_file.display());
    let ca_arg = format!("@{}", ca.display());
    let at = |p: &PathBuf| format!("@{}", p.display());
    // (client certificate and key, whether credentials are issued)
    let cases = [
        (Some(&clients[0]), true),
        (None, false),                // no certificate
        (Some(&clients[1]), false),   // the certificate names someone else
        (Some(&strangers[0]), false), // another CA's
    ];
    for (i, (client, issued)) in cases.iter().enumerate() {
        let name = format!("pg{i}");
        let mut args = vec!["db".to_owned(), "config".into(), name.clone(), "--url".into(), url_arg.clone()];
        args.extend(["--db-ca".to_owned(), ca_arg.clone()]);
        if let Some((cert, key)) = client {
            args.extend(["--db-client-cert".to_owned(), at(cert), "--db-client-key".into(), at(key)]);
        }
        ok(&server, &root, &args.iter().map(String::as_str).collect::<Vec<_>>());
        creds_for(&server, &root, &pg, &name, i, *issued);
    }
    // Refused when the connection is written, never echoing the key: a key that is not the
    // certificate's; a client certificate without TLS; half of the pair.
    let wrong_key = std::fs::read_to_string(&clients[1].1).unwrap();
    let cert_arg = at(&clients[0].0);
    let config_x = |key: &PathBuf| {
        let args = [
            "db",
            "config",
            "x",
            "--url",
            &url_arg,
            "--db-client-cert",
            &cert_arg,
            "--db-client-key",
            &at(key),
        ];
        arca(&server, Some(&root), &args)
    };
    let mismatched = config_x(&clients[1].1);
    assert_eq!(mismatched.code, 5, "{}", mismatched.stderr);
    assert!(mismatched.stderr.contains("client_cert_pem, client_key_pem"), "{}", mismatched.stderr);
    let key_body = wrong_key.lines().nth(1).unwrap();
    assert!(!mismatched.stderr.contains(key_body), "the key is not echoed");
    std::fs::write(&url_file, &pg.url).unwrap();
    let plain = config_x(&clients[0].1);
    assert_eq!(plain.code, 5, "{}", plain.stderr);
    assert!(plain.stderr.contains("need TLS"), "{}", plain.stderr);
    let half =
        arca(&server, Some(&root), &["db", "config", "x", "--url", &url_arg, "--db-client-cert", &cert_arg]);
    assert_ne!(half.code, 0, "the CLI asks for the key too");
}

#[test]
fn dynamic_postgres_credentials_live_for_their_lease() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path());
    let data = dir.path().join("data");
    let grpc = format!("127.0.0.1:{}", free_port());
    let mut server = start_at(&data, "n1", &grpc, &[], &[]);
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    let url_file = dir.path().join("pg-url");
    std::fs::write(&url_file, &pg.url).unwrap();
    ok(&server, &root, &["db", "config", "pg", "--url", &format!("@{}", url_file.display())]);
    let creation = "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT CONNECT ON DATABASE postgres TO \"{{name}}\";";
    ok(
        &server,
        &root,
        &[
            "db",
            "role",
            "readonly",
            "--db",
            "pg",
            "--creation-sql",
            creation,
            "--ttl",
            "4s",
            "--max-ttl",
            "120s",
            "--max-leases-per-identity",
            "3",
        ],
    );

    // Fresh credentials work; a renewal extends them; a revocation ends them.
    let (user, password, lease) = creds(&server, &root);
    assert!(user.starts_with("arca_readonly_"));
    assert!(can_log_in(pg.port, &user, &password), "the new credentials log in");
    let before = ok(&server, &root, &["lease", "lookup", &lease])["expire_unix_ms"].as_u64().unwrap();
    let renewed = ok(&server, &root, &["lease", "renew", &lease, "--increment", "60s"])["expire_unix_ms"]
        .as_u64()
        .unwrap();
    assert!(renewed > before + 30_000, "renewed: {before} → {renewed}");
    ok(&server, &root, &["lease", "revoke", &lease]);
    assert!(!can_log_in(pg.port, &user, &password), "revoked credentials no longer log in");
    assert_eq!(arca(&server, Some(&root), &["lease", "lookup", &lease]).code, 4);

    // Not renewed: the reaper revokes them when the TTL ends.
    let (user2, password2, lease2) = creds(&server, &root);
    assert!(can_log_in(pg.port, &user2, &password2));
    wait("the reaper to revoke the expired lease", || {
        arca(&server, Some(&root), &["lease", "lookup", &lease2]).code == 4
    });
    assert!(!can_log_in(pg.port, &user2, &password2), "expired credentials no longer log in");

    // The quota: three leases per identity on this role.
    let held: Vec<_> = (0..3).map(|_| creds(&server, &root)).collect();
    let refused = arca(&server, Some(&root), &["db", "creds", "readonly"]);
    assert_eq!(refused.code, 5);
    assert!(refused.stderr.contains("lease quota"), "{}", refused.stderr);
    let n = ok(&server, &root, &["lease", "revoke-prefix", "database/creds/readonly/"])["revoked"]
        .as_u64()
        .unwrap();
    assert_eq!(n, 3);
    assert!(held.iter().all(|(u, p, _)| !can_log_in(pg.port, u, p)));

    // At once: every creation GRANTs on, and every revocation DROPs OWNED from, the same
    // database's ACL row, and PostgreSQL fails one of two such sessions with "tuple
    // concurrently updated" (SQLSTATE XX000), which the node retries.
    for round in 0..2 {
        let held: Vec<_> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..3).map(|_| s.spawn(|| creds(&server, &root))).collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert!(held.iter().all(|(u, p, _)| can_log_in(pg.port, u, p)), "round {round}");
        std::thread::scope(|s| {
            for (_, _, lease) in &held {
                s.spawn(|| ok(&server, &root, &["lease", "revoke", lease]));
            }
        });
        assert!(held.iter().all(|(u, p, _)| !can_log_in(pg.port, u, p)), "round {round}");
    }

    // The Vault HTTP routes.
    let mut response = ureq::get(format!("{}/v1/database/creds/readonly", server.http))
        .header("X-Vault-Token", &root)
        .call()
        .unwrap();
    let v: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    let (user3, password3) = vault_creds(&v);
    assert!(can_log_in(pg.port, &user3, &password3));
    assert_eq!(v["renewable"], true);
    ureq::put(format!("{}/v1/sys/leases/revoke", server.http))
        .header("X-Vault-Token", &root)
        .header("Content-Type", "application/json")
        .send(serde_json::json!({"lease_id": v["lease_id"]}).to_string())
        .unwrap();
    assert!(!can_log_in(pg.port, &user3, &password3));

    // Credentials wrapped over gRPC (`arca --wrap-ttl`), for an application to unwrap with a
    // Vault client over HTTP: in Vault's shape, under their lease.
    let wrapped = ok(&server, &root, &["--wrap-ttl", "60s", "db", "creds", "readonly"]);
    assert!(wrapped["password"].is_null() && wrapped["username"].is_null(), "{wrapped}");
    let wrap_token = wrapped["wrap_info"]["token"].as_str().unwrap().to_owned();
    let mut response = ureq::put(format!("{}/v1/sys/wrapping/unwrap", server.http))
        .header("X-Vault-Token", &wrap_token)
        .send_empty()
        .unwrap();
    let v: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    let (user5, password5) = vault_creds(&v);
    assert!(can_log_in(pg.port, &user5, &password5));
    assert_eq!(
        (&v["renewable"], v["lease_duration"].as_u64().is_some_and(|s| s > 0)),
        (&serde_json::json!(true), true),
        "{v}"
    );
    let lease5 = v["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(ok(&server, &root, &["lease", "lookup", &lease5])["username"], user5.as_str());
    ok(&server, &root, &["lease", "revoke", &lease5]);
    assert!(!can_log_in(pg.port, &user5, &password5));

    // A node down past a lease's expiry: the reaper revokes it on recovery.
    let (user4, password4, lease4) = creds(&server, &root);
    drop(server);
    let expires = Instant::now() + Duration::from_secs(4);
    wait("the lease to expire while the node is down", || Instant::now() > expires);
    server = start_at(&data, "n1", &grpc, &[], &[]);
    wait("the reaper to revoke it after the restart", || {
        arca(&server, Some(&root), &["lease", "lookup", &lease4]).code == 4
    });
    assert!(!can_log_in(pg.port, &user4, &password4));

    // Audited; no password in the node's log.
    let events = audit_events(&data.join("arca.db"));
    let count =
        |op: Operation| events.iter().filter(|e| e.operation == op && e.outcome == Outcome::Ok).count();
    assert_eq!(count(Operation::DbCreds), 14);
    assert_eq!(count(Operation::LeaseRenew), 1);
    assert!(count(Operation::LeaseReap) >= 13 * 2, "two events per reaped lease (look, drop)");
    assert!(
        events
            .iter()
            .any(|e| e.operation == Operation::DbCreds && matches!(e.outcome, Outcome::Error { .. })),
        "the refused quota"
    );
    let log = std::fs::read_to_string(&server.stderr_log).unwrap_or_default();
    for secret in [&password, &password2, &password4] {
        assert!(!log.contains(secret.as_str()), "a password is in the node's log");
    }
}

/// A request to Vault's API (`LIST` too): its status and JSON body (`Null` when none).
fn vault_call(server: &Server, token: &str, method: &str, path: &str) -> (u16, Value) {
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}/v1/{path}", server.http))
        .header("X-Vault-Token", token)
        .body(())
        .unwrap();
    let mut response = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .allow_non_standard_methods(true)
        .build()
        .new_agent()
        .run(request)
        .unwrap();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (response.status().as_u16(), serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A private PostgreSQL, a node and its root token, with connection `pg` to the one.
fn node_with_postgres(dir: &Path) -> (Postgres, Server, String) {
    let pg = Postgres::start(dir);
    let data = dir.join("data");
    let server = start_at(&data, "n1", &format!("127.0.0.1:{}", free_port()), &[], &[]);
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    configure(&server, &root, dir, "pg", &pg.url);
    (pg, server, root)
}

/// Writes connection `name` to `url`, passed in a file as an operator would (`@FILE`).
fn configure(server: &Server, root: &str, dir: &Path, name: &str, url: &str) {
    let file = dir.join("pg-url");
    std::fs::write(&file, url).unwrap();
    ok(server, root, &["db", "config", name, "--url", &format!("@{}", file.display())]);
}

/// Seconds since midnight UTC of a log line in the node's text format
/// (`2026-12-08T01:23:45.123456Z  WARN …`).
fn logged_at(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Expired leases whose revocation keeps failing (here a revocation statement that divides
/// by zero until the test fills a table) are tried again after a wait that doubles (1 s,
/// 2 s, 4 s, …), not every scheduler round (each try an audit event, a log line and a
/// database session), and more of them than the reaper takes in a round
/// ([`arca_node::database::REAP_BATCH`]) hold back no other lease: before, the same
/// hundred failed every round and a lease expiring after them was never revoked.
#[test]
fn leases_whose_revocation_fails_wait_longer_each_time_and_hold_back_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, server, root) = node_with_postgres(dir.path());
    let admin = |sql: &str| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client.batch_execute(sql).await.unwrap();
        })
    };
    admin("CREATE TABLE gate (open int)");
    let gated = "SELECT 1 / (SELECT count(*)::int FROM gate); DROP ROLE \"{{name}}\";";
    let role = |name: &str, ttl: &str, revocation: Option<&str>| {
        let mut args = vec!["db", "role", name, "--db", "pg", "--creation-sql", CREATION, "--ttl", ttl];
        args.extend(["--max-ttl", "60s", "--max-leases-per-identity", "1000"]);
        if let Some(sql) = revocation {
            args.extend(["--revocation-sql", sql]);
        }
        ok(&server, &root, &args);
    };
    role("gated", "1s", Some(gated));
    // Long enough to log in with before it expires, on a busy machine too.
    role("plain", "4s", None);
    let issue = |role: &str| {
        let mut response = ureq::get(format!("{}/v1/database/creds/{role}", server.http))
            .header("X-Vault-Token", &root)
            .call()
            .unwrap();
        let v: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        let (user, password) = vault_creds(&v);
        (user, password, v["lease_id"].as_str().unwrap().to_owned())
    };
    let batch = arca_node::database::REAP_BATCH;
    let stuck: Vec<String> = (0..=batch).map(|_| issue("gated").2).collect();
    let (user, password, lease) = issue("plain");
    assert!(can_log_in(pg.port, &user, &password));

    // The plain lease expires after more than a round's worth of failing ones: revoked.
    wait("the reaper to revoke the lease behind the failing ones", || {
        arca(&server, Some(&root), &["lease", "lookup", &lease]).code == 4
    });
    assert!(!can_log_in(pg.port, &user, &password), "expired credentials no longer log in");

    // One failing lease's tries, from the node's log: each at least its wait after the one
    // before (1 s, 2 s, 4 s; later still when a round is slow: the first rounds try a
    // hundred leases each). Tried every round, a lease's tries would be evenly spaced.
    let marker = format!("lease={} ", stuck[0]);
    let tries = || -> Vec<f64> {
        std::fs::read_to_string(&server.stderr_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("lease revocation failed") && l.contains(&marker))
            .filter_map(logged_at)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while tries().len() < 4 {
        assert!(Instant::now() < deadline, "four tries of a failing lease: {:?}", tries());
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = tries();
    let gaps: Vec<f64> = seen.windows(2).map(|p| (p[1] - p[0]).rem_euclid(86_400.0)).collect();
    for (n, gap) in gaps.iter().take(3).enumerate() {
        let wait = f64::from(1u32 << n);
        assert!(
            *gap >= 0.9 * wait,
            "try {} came {gap:.2} s after the one before (wait {wait} s): {gaps:?}",
            n + 2
        );
    }

    // An operator sees them waiting in /metrics.
    let waiting = || common::sample(&server.metrics(), "arca_scheduler_waiting{task=\"revocation\"}");
    wait("every failing lease to be counted as waiting", || waiting() == stuck.len() as u64);
    let failures = common::sample(&server.metrics(), "arca_scheduler_failures_total{task=\"revocation\"}");
    assert!(failures >= stuck.len() as u64 + 3, "{failures} failed revocations counted");
    // And lists them: the expired leases on the role, every one of them failing.
    let overdue = ok(&server, &root, &["lease", "list", "--expired", "database/creds/gated/"]);
    let ids: Vec<&str> =
        overdue["leases"].as_array().unwrap().iter().map(|l| l["lease_id"].as_str().unwrap()).collect();
    let mut expected: Vec<&str> = stuck.iter().map(String::as_str).collect();
    expected.sort_unstable();
    let mut listed = ids.clone();
    listed.sort_unstable();
    assert_eq!((listed, &overdue["truncated"]), (expected, &json!(false)));
    assert_eq!(
        ok(&server, &root, &["lease", "list", "--expired", "database/creds/plain/"])["leases"],
        json!([])
    );
    // Vault's directory-style listing of the same.
    let (status, listing) = vault_call(&server, &root, "LIST", "sys/leases/lookup/database/creds/");
    assert_eq!((status, &listing["data"]["keys"]), (200, &json!(["gated/"])));
    let (_, under) = vault_call(&server, &root, "LIST", "sys/leases/lookup/database/creds/gated/");
    assert_eq!(under["data"]["keys"].as_array().unwrap().len(), stuck.len());
    // Listing leases needs sudo, as in Vault: list alone is refused.
    for (name, caps, allowed) in
        [("lister", r#"["list"]"#, false), ("sudo-lister", r#"["list", "sudo"]"#, true)]
    {
        let policy = dir.path().join(format!("{name}.hcl"));
        std::fs::write(&policy, format!("path \"sys/leases/lookup/*\" {{ capabilities = {caps} }}")).unwrap();
        ok(&server, &root, &["policy", "write", name, &policy.display().to_string()]);
        let token =
            ok(&server, &root, &["token", "create", "--policy", name])["token"].as_str().unwrap().to_owned();
        let run = arca(&server, Some(&token), &["lease", "list", "database/creds/gated/"]);
        assert_eq!(run.code == 0, allowed, "{name}: {}", run.stderr);
    }

    // Fixed: the reaper's next tries revoke them, with no one asking.
    admin("INSERT INTO gate VALUES (1)");
    for id in [&stuck[0], &stuck[batch]] {
        wait("the reaper to revoke a lease once its revocation works", || {
            arca(&server, Some(&root), &["lease", "lookup", id]).code == 4
        });
    }
    wait("no lease to wait any longer", || waiting() == 0);
}

/// A database that takes connections and never answers (a firewall that drops the replies,
/// a hung server) costs the reaper a session timeout (10 s) per lease tried. Once one of
/// its sessions times out, the reaper leaves the database's other leases waiting instead
/// of spending a timeout on each, so a lease on a healthy database that expired after them
/// is revoked within about one timeout: before, it waited one timeout per lease ahead of it.
#[test]
fn a_database_that_never_answers_holds_back_no_lease_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, server, root) = node_with_postgres(dir.path());
    let configure = |name: &str, url: &str| configure(&server, &root, dir.path(), name, url);
    configure("hung", &pg.url);
    for (role, db, ttl) in [("on_hung", "hung", "3s"), ("plain", "pg", "6s")] {
        ok(&server, &root, &["db", "role", role, "--db", db, "--creation-sql", CREATION, "--ttl", ttl]);
    }
    let hung_leases: Vec<String> = (0..3)
        .map(|_| {
            ok(&server, &root, &["db", "creds", "on_hung"])["lease"]["lease_id"].as_str().unwrap().to_owned()
        })
        .collect();
    // The connection now leads to a socket that completes TCP handshakes (the kernel does,
    // into the backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    configure("hung", &pg.url.replace(&format!(":{}/", pg.port), &format!(":{silent_port}/")));
    let v = ok(&server, &root, &["db", "creds", "plain"]);
    let (user, password) =
        (v["username"].as_str().unwrap().to_owned(), v["password"].as_str().unwrap().to_owned());
    let expires_ms = v["lease"]["expire_unix_ms"].as_u64().unwrap();
    assert!(can_log_in(pg.port, &user, &password));
    let by_hand = ok(&server, &root, &["db", "creds", "plain"]);
    let (hand_user, hand_password) =
        (by_hand["username"].as_str().unwrap().to_owned(), by_hand["password"].as_str().unwrap().to_owned());

    // A revocation by hand waits for no session on another database: the test takes the
    // reaper's first session with the silent database (once the hung leases expire), revokes
    // a healthy lease meanwhile, and finds the reaper's session still open after. Before, one
    // lock held every revocation through the reaper's session, up to its 10 s timeout.
    silent.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut session = loop {
        match silent.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the reaper never tried the silent database");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    ok(&server, &root, &["lease", "revoke", by_hand["lease"]["lease_id"].as_str().unwrap()]);
    assert!(!can_log_in(pg.port, &hand_user, &hand_password), "revoked credentials no longer log in");
    assert!(
        open(&mut session),
        "the revocation by hand waited out the reaper's session with another database"
    );

    // Before: three timeouts (30 s) ahead of it. Now: one, then the healthy lease.
    let deadline = Instant::now() + Duration::from_secs(60);
    while arca(&server, Some(&root), &["lease", "lookup", v["lease"]["lease_id"].as_str().unwrap()]).code != 4
    {
        assert!(Instant::now() < deadline, "the healthy lease was never revoked");
        std::thread::sleep(Duration::from_millis(100));
    }
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let late_ms = now_ms.saturating_sub(expires_ms);
    assert!(late_ms < 20_000, "the healthy lease was revoked {late_ms} ms after it expired");
    assert!(!can_log_in(pg.port, &user, &password), "expired credentials no longer log in");
    // The hung database's leases are still there, waiting; none was dropped unrevoked.
    for id in &hung_leases {
        assert_eq!(arca(&server, Some(&root), &["lease", "lookup", id]).code, 0, "{id} is kept");
    }
    let log = std::fs::read_to_string(&server.stderr_log).unwrap_or_default();
    assert!(log.contains("database connection unreachable"), "the reaper says why it waits");
    // So does /metrics: the database waits, and its leases.
    let waiting =
        |task: &str| common::sample(&server.metrics(), &format!("arca_scheduler_waiting{{task=\"{task}\"}}"));
    wait("the hung database and its leases to be counted as waiting", || {
        waiting("database") == 1 && waiting("revocation") >= 1
    });

    // New credentials on the hung database: refused after one timeout. The cleanup's
    // revocation (the user may half-exist) would wait out a second one: it runs on without
    // the caller, and the lease stays for the reaper if it fails.
    let asked = Instant::now();
    let refused = arca(&server, Some(&root), &["db", "creds", "on_hung"]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("did not answer within 10 s"), "{}", refused.stderr);
    assert!(asked.elapsed() < Duration::from_secs(15), "answered after {:?}", asked.elapsed());
    drop(silent);
}

/// Whether the peer still holds `stream` open (what it sent is read and dropped).
fn open(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read as _;
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Connections and roles are read, listed and deleted (over the CLI's gRPC and Vault's HTTP
/// routes), a connection never shown with its password; a delete that would strand leases
/// — a connection a role names, a role with leases — is refused and changes nothing.
#[test]
fn connections_and_roles_are_read_listed_and_deleted_with_no_password_shown() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, server, root) = node_with_postgres(dir.path());
    let password = pg.url.split_once("://").unwrap().1.split_once('@').unwrap().0.split_once(':').unwrap().1;
    ok(&server, &root, &["db", "role", "ro", "--db", "pg", "--creation-sql", CREATION, "--ttl", "1h"]);

    let conn = ok(&server, &root, &["db", "read-config", "pg"]);
    let shown = conn["url"].as_str().unwrap();
    assert_eq!(shown, format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", pg.port));
    assert!(!shown.contains(password));
    assert_eq!(
        (&conn["roles"], &conn["has_ca"], &conn["has_client_cert"]),
        (&json!(["ro"]), &json!(false), &json!(false))
    );
    assert_eq!(ok(&server, &root, &["db", "list-configs"])["connections"], json!(["pg"]));
    assert_eq!(ok(&server, &root, &["db", "list-roles"])["roles"], json!(["ro"]));
    let role = ok(&server, &root, &["db", "read-role", "ro"]);
    assert_eq!(
        (role["db"].as_str(), role["creation_sql"].as_str(), role["ttl_secs"].as_u64()),
        (Some("pg"), Some(CREATION), Some(3600))
    );
    assert!(
        role["revocation_sql"].as_str().unwrap().contains("DROP ROLE"),
        "the default revocation is shown"
    );

    // The admin password rotated, twice (once over Vault's route): the one the operator
    // gave stops working, credentials keep coming, and nothing shows the new one.
    assert!(can_log_in(pg.port, "postgres", password), "the operator's admin password works");
    ok(&server, &root, &["db", "rotate-root", "pg"]);
    assert!(!can_log_in(pg.port, "postgres", password), "the old admin password still logs in");
    let fresh = ok(&server, &root, &["db", "creds", "ro"]);
    let (user, user_password) = (fresh["username"].as_str().unwrap(), fresh["password"].as_str().unwrap());
    assert!(can_log_in(pg.port, user, user_password), "credentials after the rotation log in");
    let after = ok(&server, &root, &["db", "read-config", "pg"]);
    assert_eq!((&after["url"], &after["root_rotation_pending"]), (&conn["url"], &json!(false)));
    ok(&server, &root, &["lease", "revoke-prefix", "database/creds/ro/"]);

    // Vault's routes: the same, in Vault's shapes.
    let vault = |method: &str, path: &str| vault_call(&server, &root, method, path);
    assert_eq!(vault("POST", "database/rotate-root/pg").0, 204);
    let (status, config) = vault("GET", "database/config/pg");
    assert_eq!(status, 200);
    assert_eq!(config["data"]["connection_details"]["connection_url"].as_str(), Some(shown));
    assert_eq!(config["data"]["allowed_roles"], json!(["ro"]));
    assert_eq!(vault("LIST", "database/roles").1["data"]["keys"], json!(["ro"]));
    assert_eq!(vault("GET", "database/config?list=true").1["data"]["keys"], json!(["pg"]));
    let (status, role) = vault("GET", "database/roles/ro");
    assert_eq!(
        (status, role["data"]["db_name"].as_str(), role["data"]["default_ttl"].as_u64()),
        (200, Some("pg"), Some(3600))
    );
    assert_eq!(role["data"]["creation_statements"], json!([CREATION]));

    // Deletes that would strand leases are refused, and change nothing.
    let lease = ok(&server, &root, &["db", "creds", "ro"])["lease"]["lease_id"].as_str().unwrap().to_owned();
    let refused = arca(&server, Some(&root), &["db", "delete-role", "ro"]);
    assert_eq!(refused.code, 5, "{}", refused.stderr);
    assert!(refused.stderr.contains("revoke them first"), "{}", refused.stderr);
    let refused = arca(&server, Some(&root), &["db", "delete-config", "pg"]);
    assert_eq!(refused.code, 5, "{}", refused.stderr);
    assert!(refused.stderr.contains("roles ro use connection pg"), "{}", refused.stderr);
    assert_eq!(vault("DELETE", "database/config/pg").0, 400, "Vault's status for a failed precondition");
    // Nor may the role move to another connection while its leases need this one.
    configure(&server, &root, dir.path(), "pg2", &pg.url);
    let moved = arca(&server, Some(&root), &["db", "role", "ro", "--db", "pg2", "--creation-sql", CREATION]);
    assert_eq!(moved.code, 5, "{}", moved.stderr);
    assert!(moved.stderr.contains("revoke them before moving the role"), "{}", moved.stderr);
    ok(&server, &root, &["db", "delete-config", "pg2"]);
    assert_eq!(
        ok(&server, &root, &["db", "read-role", "ro"])["db"],
        "pg",
        "the refused delete kept the role"
    );
    assert_eq!(ok(&server, &root, &["lease", "lookup", &lease])["lease_id"], lease.as_str());

    // Once the leases are revoked, the role goes; then the connection.
    ok(&server, &root, &["lease", "revoke-prefix", "database/creds/ro/"]);
    ok(&server, &root, &["db", "delete-role", "ro"]);
    assert_eq!(arca(&server, Some(&root), &["db", "read-role", "ro"]).code, 4, "the role is gone");
    assert_eq!(ok(&server, &root, &["db", "read-config", "pg"])["roles"], json!([]));
    assert_eq!(vault("DELETE", "database/config/pg").0, 204);
    assert_eq!(arca(&server, Some(&root), &["db", "read-config", "pg"]).code, 4, "the connection is gone");
    assert_eq!(ok(&server, &root, &["db", "list-configs"])["connections"], json!([]));

    // Each was audited, the refusals too; no password in the log or the node's output.
    let events = audit_events(&dir.path().join("data").join("arca.db"));
    let count = |op: Operation, ok: bool| {
        events.iter().filter(|e| e.operation == op && (e.outcome == Outcome::Ok) == ok).count()
    };
    assert_eq!(count(Operation::DbConfigRead, true), 4);
    // Each rotation: the request's event, and the system's once the database confirmed it.
    assert_eq!(count(Operation::DbRotateRoot, true), 4);
    assert_eq!((count(Operation::DbRoleDelete, true), count(Operation::DbRoleDelete, false)), (1, 1));
    assert_eq!((count(Operation::DbConfigDelete, true), count(Operation::DbConfigDelete, false)), (2, 2));
    assert!(count(Operation::DbConfigList, true) >= 2 && count(Operation::DbRoleList, true) >= 2);
    let log = std::fs::read_to_string(&server.stderr_log).unwrap_or_default();
    assert!(!log.contains(password), "the admin password is in the node's log");
}

/// The real `bao` CLI drives the database engine over Vault's routes, as with Vault: a
/// connection written with `{{username}}`/`{{password}}` templating, a role with a list of
/// statements, credentials that log in, reads that show no password; fields arca would not
/// honour are refused and store nothing.
#[test]
fn the_bao_cli_configures_connections_and_roles_and_gets_credentials() {
    let bao_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bao");
    assert!(bao_bin.exists(), "the bao CLI is missing: run scripts/setup.sh (the test command does)");
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path());
    let data = dir.path().join("data");
    let server = start_at(&data, "n1", &format!("127.0.0.1:{}", free_port()), &[], &[]);
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    let bao = |args: &[&str]| {
        let out = Command::new(&bao_bin)
            .args(args)
            .env("BAO_ADDR", &server.http)
            .env("BAO_TOKEN", &root)
            .env("HOME", dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let bao_ok = |args: &[&str]| {
        let (ok, stdout, stderr) = bao(args);
        assert!(ok, "bao {args:?}: {stderr}");
        stdout
    };
    let password =
        pg.url.split_once("://").unwrap().1.split_once('@').unwrap().0.split_once(':').unwrap().1.to_owned();
    let template = format!(
        "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres",
        pg.port
    );
    let password_arg = format!("password={password}");
    let config = [
        "write",
        "database/config/pg",
        "plugin_name=postgresql-database-plugin",
        &template,
        "username=postgres",
        &password_arg,
    ];

    // Fields arca would not honour are refused, naming the field; nothing is stored.
    for (extra, field) in [("allowed_roles=ro", "allowed_roles"), ("rotation_period=24h", "rotation_period")]
    {
        let mut args = config.to_vec();
        args.push(extra);
        let (ok, _, stderr) = bao(&args);
        assert!(!ok && stderr.contains(field), "{extra}: {stderr}");
    }
    let mut mysql = config.to_vec();
    mysql[2] = "plugin_name=mysql-database-plugin";
    let (ok, _, stderr) = bao(&mysql);
    assert!(!ok && stderr.contains("plugin_name"), "{stderr}");
    let (_, listed, _) = bao(&["list", "-format=json", "database/config"]);
    assert_eq!(
        serde_json::from_str::<Value>(&listed).unwrap_or(json!([])),
        json!([]),
        "no connection was stored"
    );

    let mut taken = config.to_vec();
    taken.push("allowed_roles=*");
    bao_ok(&taken);
    bao_ok(&[
        "write",
        "database/roles/ro",
        "db_name=pg",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'",
        "creation_statements=GRANT pg_read_all_data TO \"{{name}}\";",
        "default_ttl=1h",
        "max_ttl=24h",
    ]);
    let role: Value = serde_json::from_str(&bao_ok(&["read", "-format=json", "database/roles/ro"])).unwrap();
    assert_eq!(role["data"]["default_ttl"], 3600);
    let creation = role["data"]["creation_statements"][0].as_str().unwrap();
    assert!(
        creation.ends_with("';\nGRANT pg_read_all_data TO \"{{name}}\";"),
        "the statements, each ended: {creation}"
    );

    let creds: Value = serde_json::from_str(&bao_ok(&["read", "-format=json", "database/creds/ro"])).unwrap();
    let (user, user_password) = vault_creds(&creds);
    assert!(can_log_in(pg.port, &user, &user_password), "the credentials log in");
    assert_eq!(creds["lease_duration"], 3600);

    let shown = bao_ok(&["read", "-format=json", "database/config/pg"]);
    assert!(!shown.contains(&password), "the admin password is shown: {shown}");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["data"]["connection_details"]["connection_url"],
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", pg.port)
    );

    bao_ok(&["lease", "revoke", "-prefix", "database/creds/ro/"]);
    assert!(!can_log_in(pg.port, &user, &user_password), "revoked credentials no longer log in");
    bao_ok(&["delete", "database/roles/ro"]);
    bao_ok(&["delete", "database/config/pg"]);
    let (ok, _, _) = bao(&["read", "database/config/pg"]);
    assert!(!ok, "the connection is gone");
}

/// A TCP proxy to PostgreSQL that, once armed, passes on the next `ALTER ROLE` and then
/// drops every reply on that connection: the database applies the statement, its answer is
/// lost.
struct MutingProxy {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MutingProxy {
    fn start(target: u16) -> MutingProxy {
        use std::io::{Read as _, Write as _};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = std::sync::Arc::new(AtomicBool::new(false));
        let armed2 = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else { continue };
                let muted = std::sync::Arc::new(AtomicBool::new(false));
                let (mut up_from, mut up_to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut down_from, mut down_to) = (server, client);
                let (armed, muted_up, muted_down) = (armed2.clone(), muted.clone(), muted);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = up_from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if armed.load(Ordering::SeqCst) && buf[..n].windows(10).any(|w| w == b"ALTER ROLE") {
                            muted_up.store(true, Ordering::SeqCst);
                        }
                        if up_to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = up_to.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = down_from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if !muted_down.load(Ordering::SeqCst) && down_to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = down_to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        MutingProxy { port, armed }
    }
}

/// A rotation of the admin password whose answer is lost (the database applied it) keeps the
/// new URL pending, and the next `rotate-root` finds it in use and finishes, rather than
/// locking arca out with a third password; left alone, the scheduler finishes it.
#[test]
fn an_interrupted_admin_password_rotation_is_finished_by_the_next_or_by_the_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path());
    let proxy = MutingProxy::start(pg.port);
    let data = dir.path().join("data");
    let server = start_at(&data, "n1", &format!("127.0.0.1:{}", free_port()), &[], &[]);
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    let password = pg.url.split_once("://").unwrap().1.split_once('@').unwrap().0.split_once(':').unwrap().1;
    configure(
        &server,
        &root,
        dir.path(),
        "pg",
        &pg.url.replace(&format!(":{}/", pg.port), &format!(":{}/", proxy.port)),
    );
    ok(&server, &root, &["db", "role", "ro", "--db", "pg", "--creation-sql", CREATION]);
    let creds_log_in = || {
        let run = arca(&server, Some(&root), &["--format", "json", "db", "creds", "ro"]);
        run.code == 0 && {
            let v: Value = serde_json::from_str(&run.stdout).unwrap();
            can_log_in(pg.port, v["username"].as_str().unwrap(), v["password"].as_str().unwrap())
        }
    };
    assert!(creds_log_in());

    proxy.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let lost = arca(&server, Some(&root), &["db", "rotate-root", "pg"]);
    assert_eq!(lost.code, 5, "{}", lost.stderr);
    assert!(lost.stderr.contains("the scheduler finishes the rotation"), "{}", lost.stderr);
    assert!(!can_log_in(pg.port, "postgres", password), "the database took the new password");
    assert_eq!(ok(&server, &root, &["db", "read-config", "pg"])["root_rotation_pending"], true);
    assert!(!creds_log_in(), "the stored URL's password is the old one until the rotation ends");

    proxy.armed.store(false, std::sync::atomic::Ordering::SeqCst);
    ok(&server, &root, &["db", "rotate-root", "pg"]);
    assert_eq!(ok(&server, &root, &["db", "read-config", "pg"])["root_rotation_pending"], false);
    assert!(creds_log_in(), "the pending password was the database's: credentials work again");

    // Lost again, and left alone: the scheduler finishes it, once the rotation's own request
    // is surely over (`RESUME_ROTATION_AFTER` after it began).
    proxy.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let began = Instant::now();
    assert_eq!(arca(&server, Some(&root), &["db", "rotate-root", "pg"]).code, 5);
    proxy.armed.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = began + arca_node::database::RESUME_ROTATION_AFTER + Duration::from_secs(30);
    while ok(&server, &root, &["db", "read-config", "pg"])["root_rotation_pending"] == true {
        assert!(Instant::now() < deadline, "the scheduler never finished the rotation");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        began.elapsed() >= arca_node::database::RESUME_ROTATION_AFTER,
        "the scheduler took over a rotation whose request may still have been waiting"
    );
    assert!(creds_log_in(), "credentials work after the scheduler's finish");
}
