//! Source-address conditions against a real `arcad` over loopback: the same token reads from
//! 127.0.0.2 and is denied from 127.0.0.1 (each denial audited with its condition), over the
//! Vault HTTP API and gRPC alike; an AppRole bound to 127.0.0.2 logs in only from there.

mod common;

use arca_audit::Outcome;
use common::{arca, audit_events, start};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A raw HTTP/1.1 request to the node's Vault API from `local` (a loopback address).
async fn http_from(
    local: &str,
    http: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let addr: std::net::SocketAddr = http.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let auth = token.map(|t| format!("X-Vault-Token: {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_bound_to_127_0_0_2_allows_it_and_denies_127_0_0_1() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "n1");
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    let ok = |args: &[&str]| {
        let run = arca(&server, Some(&root), args);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        run.stdout
    };
    ok(&["kv", "put", "secret/prod/db", "password=s3cr3t"]);
    let policy = dir.path().join("local2.hcl");
    std::fs::write(
        &policy,
        r#"path "secret/data/prod/*" {
             capabilities = ["read"]
             conditions { source_cidrs = ["127.0.0.2/32"] }
           }"#,
    )
    .unwrap();
    ok(&["policy", "write", "local2", &policy.display().to_string()]);
    let created: serde_json::Value =
        serde_json::from_str(&ok(&["--format", "json", "token", "create", "--policy", "local2"])).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();

    let path = "/v1/secret/data/prod/db";
    let (status, body) = http_from("127.0.0.2", &server.http, "GET", path, Some(&token), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("s3cr3t"));
    let (status, body) = http_from("127.0.0.1", &server.http, "GET", path, Some(&token), "").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        !body.contains("127.0.0.2") && !body.contains("source_cidrs"),
        "the policy stays private: {body}"
    );
    // gRPC (the CLI connects from 127.0.0.1): denied too.
    let denied = arca(&server, Some(&token), &["kv", "get", "secret/prod/db"]);
    assert_eq!(denied.code, 3, "{}", denied.stderr);

    let events = audit_events(&data.join("arca.db"));
    let reads: Vec<_> = events
        .iter()
        .filter(|e| e.path == "secret/data/prod/db" && e.actor.entity.starts_with("token:"))
        .collect();
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert_eq!(reads[0].outcome, Outcome::Ok);
    assert!(reads[0].source.address.starts_with("127.0.0.2:"));
    for denial in &reads[1..] {
        assert!(denial.source.address.starts_with("127.0.0.1:"));
        assert_eq!(denial.outcome, Outcome::DeniedBy { condition: "local2: source_cidrs".into() });
    }

    // An AppRole whose secret ids work only from 127.0.0.2.
    ok(&["approle", "write", "edge", "--policy", "local2", "--secret-id-bound-cidr", "127.0.0.2/32"]);
    let role_id: serde_json::Value =
        serde_json::from_str(&ok(&["--format", "json", "approle", "role-id", "edge"])).unwrap();
    let secret_id: serde_json::Value =
        serde_json::from_str(&ok(&["--format", "json", "approle", "secret-id", "edge"])).unwrap();
    let login = format!(
        r#"{{"role_id":"{}","secret_id":"{}"}}"#,
        role_id["role_id"].as_str().unwrap(),
        secret_id["secret_id"].as_str().unwrap()
    );
    let (status, _) =
        http_from("127.0.0.1", &server.http, "POST", "/v1/auth/approle/login", None, &login).await;
    assert_eq!(status, 403);
    let (status, body) =
        http_from("127.0.0.2", &server.http, "POST", "/v1/auth/approle/login", None, &login).await;
    assert_eq!(status, 200, "{body}");
    let last_denial =
        audit_events(&data.join("arca.db")).into_iter().rfind(|e| e.outcome.is_denied()).unwrap();
    assert_eq!(
        last_denial.outcome,
        Outcome::DeniedBy { condition: "approle edge: secret_id_bound_cidrs".into() }
    );
}
