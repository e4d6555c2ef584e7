//! The `arca-client` SDK against real `arcad` processes: the SDK example reads a secret; the
//! SDK follows a secret, logs in with AppRole (again after its token is revoked) and with a
//! client certificate over mutual TLS; `arca agent` logs in with a certificate, renews its
//! token, and survives a node restart. Every access is checked in the node's audit log
//! under the right identity.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arca_audit::{Event, Operation};
use arca_client::{Auth, Client, Config, ErrorKind, Tls};
use common::{Server, arca, audit_events, start, start_at};
use serde_json::Value;

#[allow(dead_code, unreachable_pub)]
#[path = "../../client/examples/read_secret.rs"]
mod example;

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn root_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned()
}

fn json(server: &Server, token: &str, args: &[&str]) -> Value {
    let mut full = vec!["--format", "json"];
    full.extend_from_slice(args);
    let run = arca(server, Some(token), &full);
    assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

/// The audit event a receipt names.
fn event_of(db: &Path, request_id: &str) -> Event {
    audit_events(db).into_iter().find(|e| e.request_id == request_id).expect("the access is in the audit log")
}

/// A policy reading `secret/app/*` (data and metadata) and an AppRole `web` holding it.
fn app_role(server: &Server, root: &str, dir: &Path, token_ttl: &str) -> (String, String) {
    let policy = dir.join("app.hcl");
    std::fs::write(
        &policy,
        "path \"secret/data/app/*\" { capabilities = [\"read\"] }\npath \"secret/metadata/app/*\" { capabilities = [\"read\"] }\n",
    )
    .unwrap();
    json(server, root, &["policy", "write", "app-read", &policy.display().to_string()]);
    json(server, root, &["approle", "write", "web", "--policy", "app-read", "--token-ttl", token_ttl]);
    let role_id = json(server, root, &["approle", "role-id", "web"])["role_id"].as_str().unwrap().to_owned();
    let secret_id =
        json(server, root, &["approle", "secret-id", "web"])["secret_id"].as_str().unwrap().to_owned();
    (role_id, secret_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_reads_follows_and_logs_in_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "n1");
    let db = data.join("arca.db");
    let root = root_token(&data);
    json(&server, &root, &["kv", "put", "secret/app/db", "user=app", "password=one"]);

    // The example, as shipped, reads the secret; the read is audited as the root token.
    let config = Config::new(&server.addr).unwrap().auth(Auth::token(root.clone()));
    let secret = example::read_secret(config.clone(), "secret/app/db").await.unwrap();
    assert_eq!((secret.version, secret.get("password")), (1, Some("one")));
    let event = event_of(&db, secret.receipt.request_id.as_deref().unwrap());
    assert_eq!((event.operation, event.path.as_str()), (Operation::KvRead, "secret/data/app/db"));
    assert_eq!(event.secret_version, Some(1));
    assert!(secret.receipt.audit_position.is_some());

    // Typed errors: a path that does not exist, a token that may not read.
    let client = Client::connect(config).await.unwrap();
    assert_eq!(client.read("secret/app/none").await.unwrap_err().kind(), &ErrorKind::NotFound);
    let nobody =
        Client::connect(Config::new(&server.addr).unwrap().auth(Auth::token("not-a-token"))).await.unwrap();
    let denied = nobody.read("secret/app/db").await.unwrap_err();
    assert_eq!(denied.kind(), &ErrorKind::Unauthenticated);
    assert!(denied.audit_position().is_some(), "denials are audited too");
    assert!(client.read("no-mount").await.unwrap_err().kind() == &ErrorKind::Config);

    // Follow: the current version first, then each new one.
    let mut follow = client.follow("secret/app/db").interval(Duration::from_millis(50));
    assert_eq!(follow.next().await.unwrap().version, 1);
    let written = client.write("secret/app/db", [("user", "app"), ("password", "two")]).await.unwrap();
    assert_eq!(written.version, 2);
    let next = follow.next().await.unwrap();
    assert_eq!((next.version, next.get("password")), (2, Some("two")));
    let names = client.list("secret/app/").await.unwrap();
    assert_eq!(names, vec!["db".to_owned()]);
    let cas = client.write_cas("secret/app/db", [("password", "x")], Some(1)).await.unwrap_err();
    assert_eq!(cas.kind(), &ErrorKind::FailedPrecondition, "{cas}");
    // Values of any JSON type, as Vault's KV v2 holds them.
    let pool = serde_json::json!({"min": 1, "hosts": ["a", "b"]});
    let fields = serde_json::json!({"user": "app", "pool": pool, "port": 5432, "tls": true});
    let written = client.write_json("secret/app/cfg", fields.as_object().unwrap(), Some(0)).await.unwrap();
    assert_eq!(written.version, 1);
    let cfg = client.read("secret/app/cfg").await.unwrap();
    assert_eq!(cfg.json_fields.iter().collect::<Vec<_>>(), ["pool", "port", "tls"]);
    assert_eq!((cfg.get("user"), cfg.get("port")), (Some("app"), Some("5432")));
    assert_eq!(cfg.value("pool"), Some(pool));
    assert_eq!(cfg.value("user"), Some(serde_json::json!("app")));

    // AppRole: the SDK logs in by itself; its reads are the role's.
    let (role_id, secret_id) = app_role(&server, &root, dir.path(), "600");
    let app = Client::connect(Config::new(&server.addr).unwrap().auth(Auth::app_role(role_id, secret_id)))
        .await
        .unwrap();
    let read = app.read("secret/app/db").await.unwrap();
    assert_eq!(event_of(&db, read.receipt.request_id.as_deref().unwrap()).actor.entity, "approle:web");
    assert_eq!(
        app.write("secret/app/db", [("k", "v")]).await.unwrap_err().kind(),
        &ErrorKind::PermissionDenied
    );
    // Its token revoked, the next call logs in again and succeeds.
    let accessor = app.token_info().await.unwrap().accessor;
    json(&server, &root, &["token", "revoke", "--accessor", &accessor]);
    let again = app.read("secret/app/db").await.unwrap();
    assert_eq!(again.get("password"), Some("two"));
    assert_ne!(app.token_info().await.unwrap().accessor, accessor);
    let logins = audit_events(&db)
        .iter()
        .filter(|e| e.operation == Operation::AppRoleLogin && e.outcome == arca_audit::Outcome::Ok)
        .count();
    assert_eq!(logins, 2);
}

struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let ca = common::TestCa::new(dir);
    Pki {
        server: ca.issue("server", "127.0.0.1"),
        client: ca.issue("client", "web-client"),
        ca: ca.ca_file.clone(),
    }
}

/// Starts `arcad server` with a mutual-TLS listener; returns the server (its `addr` is https).
fn start_mtls(dir: &Path, pki: &Pki) -> Server {
    let listener = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        pki.server.0.display(),
        pki.server.1.display(),
        pki.ca.display()
    );
    let config = common::server_config(dir, &listener, "");
    let mut server = common::start_server(&config, &[]);
    server.addr = server.addr.replace("http://", "https://");
    server
}

/// `arca` over mutual TLS with the client certificate.
fn arca_tls(server: &Server, pki: &Pki, token: Option<&str>, args: &[&str]) -> common::Run {
    let mut full = vec![
        "--ca-cert".to_owned(),
        pki.ca.display().to_string(),
        "--client-cert".to_owned(),
        pki.client.0.display().to_string(),
        "--client-key".to_owned(),
        pki.client.1.display().to_string(),
    ];
    full.extend(args.iter().map(|a| a.to_string()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    arca(server, token, &full)
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_login_over_mutual_tls_for_the_sdk_and_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_mtls(dir.path(), &pki);
    let init = arca_tls(
        &server,
        &pki,
        None,
        &["--format", "json", "operator", "init", "--key-shares", "1", "--key-threshold", "1"],
    );
    assert_eq!(init.code, 0, "{}", init.stderr);
    let init: Value = serde_json::from_str(&init.stdout).unwrap();
    let root = init["root_token"].as_str().unwrap().to_owned();
    let ok = |args: &[&str]| {
        let run = arca_tls(&server, &pki, Some(&root), args);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    };
    ok(&["kv", "put", "secret/web/tls", "cert=PEM-DATA"]);
    let policy = dir.path().join("web.hcl");
    std::fs::write(&policy, "path \"secret/data/web/*\" { capabilities = [\"read\"] }\npath \"secret/metadata/web/*\" { capabilities = [\"read\"] }\n").unwrap();
    ok(&["policy", "write", "web", &policy.display().to_string()]);
    ok(&["cert", "write", "web", "--cert", &pki.client.0.display().to_string(), "--policy", "web"]);

    // The SDK logs in with the certificate it presents; the read is the certificate role's.
    let tls = Tls::from_files(Some(&pki.ca), Some(&pki.client.0), Some(&pki.client.1)).unwrap();
    let config = Config::new(&server.addr).unwrap().tls(tls.clone()).auth(Auth::Certificate);
    let client = Client::connect(config).await.unwrap();
    let secret = client.read("secret/web/tls").await.unwrap();
    assert_eq!(secret.get("cert"), Some("PEM-DATA"));
    let db = dir.path().join("arca.db");
    assert_eq!(event_of(&db, secret.receipt.request_id.as_deref().unwrap()).actor.entity, "cert:web");
    // Without the client certificate the TLS handshake itself fails: nothing is served.
    let anonymous = Client::connect(
        Config::new(&server.addr).unwrap().tls(Tls::new().ca_pem(std::fs::read(&pki.ca).unwrap())),
    )
    .await
    .unwrap();
    let refused = anonymous.read("secret/web/tls").await.unwrap_err();
    assert!(matches!(refused.kind(), ErrorKind::Connect | ErrorKind::Transport), "{refused:?}");

    // The agent logs in with the certificate too.
    let template = dir.path().join("tls.tmpl");
    std::fs::write(&template, "{{ secret \"secret/web/tls#cert\" }}").unwrap();
    let dest = dir.path().join("tls.pem");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_arca"));
    agent
        .args([
            "agent",
            "--once",
            "--cert-login",
            "--template",
            &format!("{}:{}", template.display(), dest.display()),
        ])
        .args(["--ca-cert", &pki.ca.display().to_string()])
        .args([
            "--client-cert",
            &pki.client.0.display().to_string(),
            "--client-key",
            &pki.client.1.display().to_string(),
        ])
        .env("ARCA_ADDR", &server.addr)
        .env_remove("ARCA_TOKEN");
    let out = agent.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "PEM-DATA");
    let logins = audit_events(&db).into_iter().filter(|e| e.operation == Operation::CertLogin).count();
    assert_eq!(logins, 2, "one login by the SDK, one by the agent");
    let last_read = audit_events(&db).into_iter().rfind(|e| e.operation == Operation::KvRead).unwrap();
    assert_eq!(last_read.actor.entity, "cert:web");
}

#[test]
fn the_agent_renews_its_token_and_survives_a_node_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = arca_testkit::free_port();
    let grpc = format!("127.0.0.1:{port}");
    let mut server = start_at(&data, "n1", &grpc, &[], &[]);
    let db = data.join("arca.db");
    let root = root_token(&data);
    json(&server, &root, &["kv", "put", "secret/app/db", "password=one"]);
    // A 4-second token: the agent must renew it (when half of it is gone) to keep reading.
    let (role_id, secret_id) = app_role(&server, &root, dir.path(), "4");
    let (role_file, secret_file) = (dir.path().join("role-id"), dir.path().join("secret-id"));
    std::fs::write(&role_file, role_id).unwrap();
    std::fs::write(&secret_file, secret_id).unwrap();
    let template = dir.path().join("db.tmpl");
    std::fs::write(&template, "password={{ secret \"secret/app/db#password\" }}\n").unwrap();
    let dest = dir.path().join("db.conf");
    let health_port = arca_testkit::free_port();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_arca"))
        .args(["agent", "--template", &format!("{}:{}", template.display(), dest.display())])
        .args(["--role-id-file", &role_file.display().to_string()])
        .args(["--secret-id-file", &secret_file.display().to_string()])
        .args(["--interval-ms", "100", "--health-addr", &format!("127.0.0.1:{health_port}")])
        .env("ARCA_ADDR", &server.addr)
        .env_remove("ARCA_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let health = || -> Value {
        ureq::get(format!("http://127.0.0.1:{health_port}/health"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    };
    wait("the first render", || read(&dest) == "password=one\n");
    wait("two renewals", || health()["token_renewals"].as_u64().unwrap_or(0) >= 2);
    // Past the token's first TTL: still the first login, renewed (audited as the role).
    let events = audit_events(&db);
    let of_role = |op: Operation| {
        events
            .iter()
            .filter(|e| {
                e.operation == op && e.actor.entity == "approle:web" && e.outcome == arca_audit::Outcome::Ok
            })
            .count()
    };
    assert!(of_role(Operation::TokenRenew) >= 2);
    assert_eq!(events.iter().filter(|e| e.operation == Operation::AppRoleLogin).count(), 1);

    // The node restarts on the same address; the agent keeps going.
    drop(server);
    server = start_at(&data, "n1", &grpc, &[], &[]);
    json(&server, &root, &["kv", "put", "secret/app/db", "password=two"]);
    wait("the re-render after the restart", || read(&dest) == "password=two\n");
    let last_read = audit_events(&db).into_iter().rfind(|e| e.operation == Operation::KvRead).unwrap();
    assert_eq!((last_read.actor.entity.as_str(), last_read.secret_version), ("approle:web", Some(2)));
    assert!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777 == 0o600);
    let _ = agent.kill();
    let _ = agent.wait();
}
