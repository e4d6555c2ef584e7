//! End to end: real `arcad dev` processes on loopback, driven by the real `arca` binary.
//! Readiness is learned from the server's own "listening" line, never from sleeps.

mod common;

use arca_audit::{Operation, Outcome};
use common::{arca, audit_events, fails, ok_json, start, wait_for_log};

const SECRET: &str = "e2e-Secret-Value-91c2";

#[test]
fn the_cli_drives_a_dev_server_through_every_capability() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "node-a");
    let root_token = std::fs::read_to_string(data.join("root-token")).unwrap();
    let root = Some(root_token.trim());
    let mut calls = 0;

    // Versions.
    assert_eq!(
        ok_json(&server, root, &["kv", "put", "secret/app/db", &format!("password={SECRET}")], &mut calls)["version"],
        1
    );
    assert_eq!(
        ok_json(&server, root, &["kv", "put", "secret/app/db", "password=second"], &mut calls)["version"],
        2
    );
    let got = ok_json(&server, root, &["kv", "get", "secret/app/db"], &mut calls);
    assert_eq!((got["version"].as_u64(), got["data"]["password"].as_str()), (Some(2), Some("second")));
    let v1 = ok_json(&server, root, &["kv", "get", "--version", "1", "secret/app/db"], &mut calls);
    assert_eq!(v1["data"]["password"], SECRET);
    let field = arca(&server, root, &["kv", "get", "-field=password", "secret/app/db"]);
    calls += 1;
    assert_eq!(field.stdout.trim(), "second");
    ok_json(&server, root, &["kv", "patch", "secret/app/db", "user=svc"], &mut calls);
    ok_json(&server, root, &["kv", "put", "secret/app/cache", "url=redis://x"], &mut calls);
    let listed = ok_json(&server, root, &["kv", "list", "secret/app/"], &mut calls);
    assert_eq!(listed["keys"], serde_json::json!(["cache", "db"]));
    let meta = ok_json(&server, root, &["kv", "metadata", "get", "secret/app/db"], &mut calls);
    assert_eq!(meta["current_version"], 3);

    // Delete, undelete, destroy.
    ok_json(&server, root, &["kv", "delete", "secret/app/db"], &mut calls);
    fails(&server, root, &["kv", "get", "secret/app/db"], 4, &mut calls);
    ok_json(&server, root, &["kv", "undelete", "--versions", "3", "secret/app/db"], &mut calls);
    assert_eq!(ok_json(&server, root, &["kv", "get", "secret/app/db"], &mut calls)["version"], 3);
    ok_json(&server, root, &["kv", "destroy", "--versions", "1", "secret/app/db"], &mut calls);
    fails(&server, root, &["kv", "get", "--version", "1", "secret/app/db"], 4, &mut calls);

    // A policy that allows one path and not another, on a token made for it.
    let policy_file = dir.path().join("app.hcl");
    std::fs::write(&policy_file, "path \"secret/data/app/*\" {\n  capabilities = [\"read\"]\n}\n").unwrap();
    ok_json(&server, root, &["policy", "write", "app-read", policy_file.to_str().unwrap()], &mut calls);
    ok_json(&server, root, &["kv", "put", "secret/ops/key", "k=v"], &mut calls);
    let created =
        ok_json(&server, root, &["token", "create", "--policy", "app-read", "--ttl", "600"], &mut calls);
    let app_token = created["token"].as_str().unwrap().to_owned();
    let app = Some(app_token.as_str());
    ok_json(&server, app, &["kv", "get", "secret/app/cache"], &mut calls);
    fails(&server, app, &["kv", "get", "secret/ops/key"], 3, &mut calls);
    fails(&server, app, &["kv", "put", "secret/app/cache", "url=evil"], 3, &mut calls);
    let looked = ok_json(&server, app, &["token", "lookup"], &mut calls);
    assert_eq!(looked["info"]["policies"], serde_json::json!(["app-read"]));
    fails(&server, Some("arca_wrong"), &["kv", "get", "secret/app/cache"], 3, &mut calls);
    fails(&server, None, &["kv", "get", "secret/app/cache"], 3, &mut calls);

    // AppRole.
    ok_json(&server, root, &["approle", "write", "billing", "--policy", "app-read"], &mut calls);
    let role_id = ok_json(&server, root, &["approle", "role-id", "billing"], &mut calls)["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = ok_json(&server, root, &["approle", "secret-id", "billing"], &mut calls)["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let login = ok_json(
        &server,
        None,
        &["approle", "login", "--role-id", &role_id, "--secret-id", &secret_id],
        &mut calls,
    );
    let machine = login["token"].as_str().unwrap().to_owned();
    assert_eq!(login["info"]["entity"], "approle:billing");
    ok_json(&server, Some(&machine), &["kv", "get", "secret/app/cache"], &mut calls);
    fails(
        &server,
        None,
        &["approle", "login", "--role-id", &role_id, "--secret-id", "arca_bad"],
        3,
        &mut calls,
    );

    // Token renew and revoke.
    ok_json(&server, Some(&machine), &["token", "renew"], &mut calls);
    ok_json(&server, Some(&machine), &["token", "revoke"], &mut calls);
    fails(&server, Some(&machine), &["kv", "get", "secret/app/cache"], 3, &mut calls);

    // Bad input: a clear error, nothing changed.
    let big = format!("v={}", "x".repeat(70_000));
    let err = fails(&server, root, &["kv", "put", "secret/app/db", &big], 5, &mut calls);
    assert!(err.contains("exceeds"), "{err}");
    let err = fails(&server, root, &["kv", "put", "secret/a//b", "k=v"], 5, &mut calls);
    assert!(err.contains("path"), "{err}");
    let bad_policy = dir.path().join("bad.hcl");
    std::fs::write(&bad_policy, "path \"x\" { capabilities = [\"reed\"] }").unwrap();
    let err = fails(&server, root, &["policy", "write", "bad", bad_policy.to_str().unwrap()], 5, &mut calls);
    assert!(err.contains("line 1"), "{err}");
    assert_eq!(ok_json(&server, root, &["kv", "get", "secret/app/db"], &mut calls)["version"], 3);

    // Operator commands.
    let status = ok_json(&server, None, &["operator", "status"], &mut calls);
    assert_eq!(
        (status["status"]["initialized"].as_bool(), status["status"]["sealed"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(ok_json(&server, root, &["operator", "rotate"], &mut calls)["keyring_term"], 2);
    assert_eq!(
        ok_json(&server, root, &["kv", "get", "--version", "2", "secret/app/db"], &mut calls)["data"]["password"],
        "second"
    );

    // The audit queue holds exactly one event per request: the dev bootstrap's status and
    // init, then one per `arca` invocation above.
    let events = audit_events(&data.join("arca.db"));
    assert_eq!(events.len(), 2 + calls, "one audit event per request");
    assert_eq!((events[0].operation, events[1].operation), (Operation::Status, Operation::Init));
    let denials = events.iter().filter(|e| e.outcome == Outcome::Denied).count();
    assert_eq!(denials, 6, "every denial is audited");
    assert!(events.iter().all(|e| e.node == "node-a" && e.source.address.starts_with("127.0.0.1:")
        || e.source.address == "local:arcad-dev"));

    // The signed log covers every event and verifies; an inclusion proof by request id verifies.
    let get = ok_json(&server, root, &["kv", "get", "secret/app/cache"], &mut calls);
    let request_id = get["request_id"].as_str().unwrap().to_owned();
    wait_for_log(&server, 2 + calls as u64, std::time::Duration::from_secs(30));
    let vkey = common::vkey(&server);
    let state = dir.path().join("audit-state.json");
    let verify = arca(
        &server,
        None,
        &["audit", "verify", "--url", &server.log_url, "--vkey", &vkey, "--state", state.to_str().unwrap()],
    );
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
    assert!(verify.stdout.contains(&format!("{} entries", 2 + calls)), "{}", verify.stdout);
    let proof = arca(
        &server,
        None,
        &["audit", "proof", "--url", &server.log_url, "--vkey", &vkey, "--request-id", &request_id],
    );
    assert_eq!(proof.code, 0, "{}", proof.stderr);
    assert!(proof.stdout.contains("kv.read"), "{}", proof.stdout);
    let tail = arca(
        &server,
        None,
        &["--format", "json", "audit", "tail", "--url", &server.log_url, "--vkey", &vkey],
    );
    assert_eq!(tail.stdout.lines().count(), 2 + calls);

    // Nothing secret in the node's logs (at trace level) or in the events.
    let logs = std::fs::read_to_string(&server.stderr_log).unwrap();
    for secret in [SECRET, root_token.trim(), app_token.as_str(), machine.as_str(), secret_id.as_str()] {
        assert!(!logs.contains(secret), "a secret reached the logs");
        assert!(events.iter().all(|e| !format!("{e:?}").contains(secret)), "a secret reached an audit event");
    }
}

#[test]
fn two_nodes_on_one_store_serve_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let a = start(&data, "node-a");
    let b = start(&data, "node-b");
    let root = std::fs::read_to_string(data.join("root-token")).unwrap();
    let root = Some(root.trim());
    let mut calls = 0;
    for i in 1..=5u64 {
        let (writer, reader) = if i % 2 == 1 { (&a, &b) } else { (&b, &a) };
        let value = format!("value-{i}");
        assert_eq!(
            ok_json(writer, root, &["kv", "put", "secret/shared", &format!("v={value}")], &mut calls)["version"],
            i
        );
        let read = ok_json(reader, root, &["kv", "get", "secret/shared"], &mut calls);
        assert_eq!((read["version"].as_u64(), read["data"]["v"].as_str()), (Some(i), Some(value.as_str())));
    }
    // Rotation on one node; the other reads data encrypted under the new term.
    ok_json(&a, root, &["operator", "rotate"], &mut calls);
    ok_json(&a, root, &["kv", "put", "secret/shared", "v=after-rotation"], &mut calls);
    assert_eq!(ok_json(&b, root, &["kv", "get", "secret/shared"], &mut calls)["data"]["v"], "after-rotation");
    let events = audit_events(&data.join("arca.db"));
    let from_b = events.iter().filter(|e| e.node == "node-b").count();
    assert!(from_b >= 6, "node b audited its own requests in the shared log");
}

#[test]
fn server_mode_over_tls_starts_sealed_and_unseals_with_key_shares() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let ca_params = {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p
    };
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let (cert_file, key_file, ca_file) =
        (write("tls.crt", &cert.pem()), write("tls.key", &key.serialize_pem()), write("ca.crt", &ca.pem()));
    let config = write(
        "arcad.toml",
        &format!(
            "[node]\nid = \"prod-1\"\nregion = \"local\"\ncluster = \"prod\"\n[storage]\nengine = \"sqlite\"\npath = \"{}\"\n[listener]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            dir.path().join("arca.db").display(),
            cert_file.display(),
            key_file.display()
        ),
    );
    let check = Command::new(env!("CARGO_BIN_EXE_arcad")).arg("check-config").arg(&config).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let bad = write(
        "bad.toml",
        "[storage]\nengine = \"sqlite\"\npath = \"x\"\n[listener]\ngrpc_addr = \"0.0.0.0:1\"\ncolour = 1\n",
    );
    let check = Command::new(env!("CARGO_BIN_EXE_arcad")).arg("check-config").arg(&bad).output().unwrap();
    assert!(!check.status.success() && String::from_utf8_lossy(&check.stderr).contains("colour"));

    let mut child = Command::new(env!("CARGO_BIN_EXE_arcad"))
        .args(["server", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("arcad exited").unwrap();
        if let Some(a) = line.strip_prefix("arcad: grpc listening on ") {
            break a.to_owned();
        }
    };
    let url = format!("https://{addr}");
    let run = |token: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arca"));
        cmd.args(["--format", "json", "--ca-cert"])
            .arg(&ca_file)
            .args(args)
            .env("ARCA_ADDR", &url)
            .env_remove("ARCA_TOKEN");
        if let Some(t) = token {
            cmd.env("ARCA_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let status: serde_json::Value =
        serde_json::from_slice(&run(None, &["operator", "status"]).stdout).unwrap();
    assert_eq!(
        (status["status"]["initialized"].as_bool(), status["status"]["node"].as_str()),
        (Some(false), Some("prod-1"))
    );
    let init = run(None, &["operator", "init", "-key-shares", "3", "-key-threshold", "2"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let init: serde_json::Value = serde_json::from_slice(&init.stdout).unwrap();
    let root = init["root_token"].as_str().unwrap().to_owned();
    let shares: Vec<String> =
        init["unseal_keys"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
    assert!(run(Some(&root), &["kv", "put", "secret/tls", "k=v"]).status.success());
    assert!(run(Some(&root), &["operator", "seal"]).status.success());
    assert_eq!(run(Some(&root), &["kv", "get", "secret/tls"]).status.code(), Some(5), "sealed");
    assert!(run(None, &["operator", "unseal", &shares[2]]).status.success());
    assert!(run(None, &["operator", "unseal", &shares[0]]).status.success());
    let got: serde_json::Value =
        serde_json::from_slice(&run(Some(&root), &["kv", "get", "secret/tls"]).stdout).unwrap();
    assert_eq!(got["data"]["k"], "v");
    // Without the CA, the client refuses the server.
    let untrusted = Command::new(env!("CARGO_BIN_EXE_arca"))
        .args(["operator", "status"])
        .env("ARCA_ADDR", &url)
        .output()
        .unwrap();
    assert!(!untrusted.status.success());
    let _ = child.kill();
    let _ = child.wait();
}
