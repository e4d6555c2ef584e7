//! The PKCS#11 seal against a real module — SoftHSM2, its token initialised by the project's
//! `scripts/softhsm.sh` — with real `arcad server` processes: unattended restarts, a missing
//! token keeping the node sealed with a clear reason (and unsealing once it is back), and
//! seal migration Shamir → HSM → Shamir keeping every secret readable with the same shares.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arca_audit::{Operation, Outcome};
use common::{Server, arca, audit_events, start_server};
use serde_json::Value;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh SoftHSM2 token labelled `arca` under `dir/hsm`: (SOFTHSM2_CONF, pin file).
fn token(dir: &Path) -> (String, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/softhsm.sh");
    let hsm = dir.join("hsm");
    let out =
        std::process::Command::new("bash").arg(&script).arg(&hsm).args(["arca", "8642"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let conf =
        stdout.trim().strip_prefix("export SOFTHSM2_CONF=").expect("the script prints the export").to_owned();
    (conf, hsm.join("pin"))
}

/// Writes the node's config, with a pkcs11 `[seal]` when `pin` is given.
fn config(dir: &Path, pin: Option<&Path>) -> PathBuf {
    let seal = pin.map_or(String::new(), |pin| {
        format!(
            "\n[seal]\ntype = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"arca\"\nkey_label = \"arca-seal\"\npin_file = \"{}\"\n",
            pin.display()
        )
    });
    common::server_config(dir, "dangerous_plaintext = true\n", &seal)
}

fn status(server: &Server) -> Value {
    let run = arca(server, None, &["--format", "json", "operator", "status"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str::<Value>(&run.stdout).unwrap()["status"].clone()
}

fn init(server: &Server) -> (String, Vec<String>) {
    let run = arca(
        server,
        None,
        &["--format", "json", "operator", "init", "--key-shares", "3", "--key-threshold", "2"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    let shares =
        v["unseal_keys"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
    (v["root_token"].as_str().unwrap().to_owned(), shares)
}

fn get(server: &Server, token: &str, path: &str) -> Option<String> {
    let run = arca(server, Some(token), &["kv", "get", "-field", "v", path]);
    (run.code == 0).then(|| run.stdout.trim().to_owned())
}

#[test]
fn an_hsm_sealed_node_restarts_unattended_and_stays_sealed_without_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, pin) = token(dir.path());
    let env = [("SOFTHSM2_CONF", conf.as_str())];
    let config = config(dir.path(), Some(&pin));
    let mut server = start_server(&config, &env);
    let (root, _recovery) = init(&server);
    let s = status(&server);
    assert_eq!((s["sealed"].as_bool(), s["seal_type"].as_str()), (Some(false), Some("pkcs11")));
    // Vault clients see the auto-unseal too: type pkcs11, the shares as recovery keys.
    let mut response = ureq::get(format!("{}/v1/sys/seal-status", server.http)).call().unwrap();
    let vault: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(
        (vault["type"].as_str(), vault["recovery_seal"].as_bool(), vault["sealed"].as_bool()),
        (Some("pkcs11"), Some(true), Some(false))
    );
    assert_eq!(arca(&server, Some(&root), &["kv", "put", "secret/app/db", "v=hsm-1"]).code, 0);

    // Restart: nobody types a key; the HSM unseals, audited as the seal.
    drop(server);
    server = start_server(&config, &env);
    wait("the HSM to unseal the node", || status(&server)["sealed"] == false);
    assert_eq!(get(&server, &root, "secret/app/db").as_deref(), Some("hsm-1"));
    let unseals: Vec<_> = audit_events(&dir.path().join("arca.db"))
        .into_iter()
        .filter(|e| e.operation == Operation::Unseal && e.outcome == Outcome::Ok)
        .collect();
    assert_eq!(unseals.len(), 1);
    assert_eq!(unseals[0].actor.entity, "system:hsm-seal");

    // The token is gone: the node stays sealed and says why; nothing is served.
    drop(server);
    let tokens = dir.path().join("hsm/tokens");
    std::fs::rename(&tokens, dir.path().join("hsm/away")).unwrap();
    std::fs::create_dir(&tokens).unwrap();
    server = start_server(&config, &env);
    wait("the reason to be reported", || {
        status(&server)["sealed_reason"].as_str().is_some_and(|r| !r.is_empty())
    });
    let s = status(&server);
    assert_eq!(s["sealed"], true);
    assert!(s["sealed_reason"].as_str().unwrap().contains("no HSM token labelled \"arca\""), "{s}");
    let refused = arca(&server, Some(&root), &["kv", "get", "secret/app/db"]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("sealed"), "{}", refused.stderr);
    // It comes back: the node unseals itself on its next attempt.
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(dir.path().join("hsm/away"), &tokens).unwrap();
    wait("the node to unseal once the token is back", || status(&server)["sealed"] == false);
    assert_eq!(get(&server, &root, "secret/app/db").as_deref(), Some("hsm-1"));
    // The PIN never reaches the node's log.
    let log = std::fs::read_to_string(&server.stderr_log).unwrap();
    assert!(!log.contains("8642"), "the PIN is in the log");
}

#[test]
fn seal_migration_shamir_to_hsm_and_back_keeps_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, pin) = token(dir.path());
    let env = [("SOFTHSM2_CONF", conf.as_str())];
    // Shamir: init, write.
    let shamir = config(dir.path(), None);
    let mut server = start_server(&shamir, &env);
    let (root, shares) = init(&server);
    assert_eq!(status(&server)["seal_type"], "shamir");
    assert_eq!(arca(&server, Some(&root), &["kv", "put", "secret/a", "v=before"]).code, 0);

    // Configured for the HSM, the node cannot unseal itself yet and says what to do.
    drop(server);
    let hsm = config(dir.path(), Some(&pin));
    server = start_server(&hsm, &env);
    wait("the reason to be reported", || {
        status(&server)["sealed_reason"].as_str().is_some_and(|r| r.contains("migrate-seal"))
    });
    for share in &shares[..2] {
        assert_eq!(arca(&server, None, &["operator", "unseal", share]).code, 0);
    }
    let denied = arca(&server, None, &["operator", "migrate-seal", "--to", "hsm"]);
    assert_eq!(denied.code, 3, "migration needs sudo: {}", denied.stderr);
    let migrated = arca(&server, Some(&root), &["operator", "migrate-seal", "--to", "hsm"]);
    assert_eq!(migrated.code, 0, "{}", migrated.stderr);
    drop(server);
    server = start_server(&hsm, &env);
    wait("the HSM to unseal the node", || status(&server)["sealed"] == false);
    assert_eq!(status(&server)["seal_type"], "pkcs11");
    assert_eq!(get(&server, &root, "secret/a").as_deref(), Some("before"));
    assert_eq!(arca(&server, Some(&root), &["kv", "put", "secret/b", "v=under-hsm"]).code, 0);

    // Back to Shamir: the original shares unseal again, every secret is readable.
    let back = arca(&server, Some(&root), &["operator", "migrate-seal", "--to", "shamir"]);
    assert_eq!(back.code, 0, "{}", back.stderr);
    drop(server);
    server = start_server(&shamir, &env);
    assert_eq!(status(&server)["sealed"], true);
    for share in &shares[1..] {
        assert_eq!(arca(&server, None, &["operator", "unseal", share]).code, 0);
    }
    assert_eq!(status(&server)["seal_type"], "shamir");
    assert_eq!(get(&server, &root, "secret/a").as_deref(), Some("before"));
    assert_eq!(get(&server, &root, "secret/b").as_deref(), Some("under-hsm"));
    let migrations: Vec<_> = audit_events(&dir.path().join("arca.db"))
        .into_iter()
        .filter(|e| e.operation == Operation::SealMigrate)
        .map(|e| e.outcome)
        .collect();
    assert_eq!(migrations, vec![Outcome::Denied, Outcome::Ok, Outcome::Ok]);
}
