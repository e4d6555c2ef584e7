//! `arca agent` against a real node: renders a template to a 0600 file, re-renders when the
//! secret changes (and runs its command), reads a secret only when its version changed
//! (every read audited), and reports its state on `/health`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arca_audit::Operation;
use common::{arca, audit_events, start};

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn agent_renders_and_follows_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "n1");
    let root = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    assert_eq!(arca(&server, Some(&root), &["kv", "put", "secret/app/db", "password=one"]).code, 0);
    let template = dir.path().join("db.tmpl");
    std::fs::write(&template, "password={{ secret \"secret/app/db#password\" }}\n").unwrap();
    let dest = dir.path().join("db.conf");
    let log = dir.path().join("exec.log");
    let port = arca_testkit::free_port();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_arca"))
        .args(["agent", "--template", &format!("{}:{}", template.display(), dest.display())])
        .args(["--interval-ms", "100", "--exec", &format!("echo rendered >> {}", log.display())])
        .args(["--health-addr", &format!("127.0.0.1:{port}")])
        .env("ARCA_ADDR", &server.addr)
        .env("ARCA_TOKEN", &root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait("the first render", || read(&dest) == "password=one\n");
    assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o600);
    wait("the command after the render", || read(&log).lines().count() == 1);

    assert_eq!(arca(&server, Some(&root), &["kv", "put", "secret/app/db", "password=two"]).code, 0);
    wait("the re-render", || read(&dest) == "password=two\n");
    wait("the second command", || read(&log).lines().count() == 2);
    let health: serde_json::Value = serde_json::from_str(
        &ureq::get(format!("http://127.0.0.1:{port}/health"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(health["renders"], 2, "{health}");
    // Quiet: no new version, no read (the agent looks at metadata only).
    let reads = || {
        audit_events(&data.join("arca.db"))
            .iter()
            .filter(|e| e.operation == Operation::KvRead && e.path == "secret/data/app/db")
            .count()
    };
    let before = reads();
    let metadata_reads = || {
        audit_events(&data.join("arca.db"))
            .iter()
            .filter(|e| e.operation == Operation::KvReadMetadata)
            .count()
    };
    let seen = metadata_reads();
    wait("a few more rounds", || metadata_reads() >= seen + 3);
    assert_eq!(reads(), before, "the agent read an unchanged secret");
    assert_eq!(before, 2, "one read per version");
    let _ = agent.kill();
    let _ = agent.wait();

    // --once renders and exits.
    std::fs::remove_file(&dest).unwrap();
    let once = Command::new(env!("CARGO_BIN_EXE_arca"))
        .args(["agent", "--once", "--template", &format!("{}:{}", template.display(), dest.display())])
        .env("ARCA_ADDR", &server.addr)
        .env("ARCA_TOKEN", &root)
        .output()
        .unwrap();
    assert_eq!(once.status.code(), Some(0), "{}", String::from_utf8_lossy(&once.stderr));
    assert_eq!(read(&dest), "password=two\n");

    // As an AppRole: it logs in itself, and its reads are audited as the role.
    let policy = dir.path().join("app.hcl");
    std::fs::write(
        &policy,
        "path \"secret/data/app/*\" { capabilities = [\"read\"] }\npath \"secret/metadata/app/*\" { capabilities = [\"read\"] }\n",
    )
    .unwrap();
    assert_eq!(
        arca(&server, Some(&root), &["policy", "write", "app-read", &policy.display().to_string()]).code,
        0
    );
    assert_eq!(arca(&server, Some(&root), &["approle", "write", "web", "--policy", "app-read"]).code, 0);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut full = vec!["--format", "json"];
        full.extend_from_slice(args);
        serde_json::from_str(&arca(&server, Some(&root), &full).stdout).unwrap()
    };
    let role_id = json(&["approle", "role-id", "web"])["role_id"].as_str().unwrap().to_owned();
    let secret_id = json(&["approle", "secret-id", "web"])["secret_id"].as_str().unwrap().to_owned();
    let (role_file, secret_file) = (dir.path().join("role-id"), dir.path().join("secret-id"));
    std::fs::write(&role_file, role_id).unwrap();
    std::fs::write(&secret_file, secret_id).unwrap();
    std::fs::remove_file(&dest).unwrap();
    let approle = Command::new(env!("CARGO_BIN_EXE_arca"))
        .args(["agent", "--once", "--template", &format!("{}:{}", template.display(), dest.display())])
        .args([
            "--role-id-file",
            &role_file.display().to_string(),
            "--secret-id-file",
            &secret_file.display().to_string(),
        ])
        .env("ARCA_ADDR", &server.addr)
        .env_remove("ARCA_TOKEN")
        .output()
        .unwrap();
    assert_eq!(approle.status.code(), Some(0), "{}", String::from_utf8_lossy(&approle.stderr));
    assert_eq!(read(&dest), "password=two\n");
    let last_read = audit_events(&data.join("arca.db"))
        .into_iter()
        .rfind(|e| e.operation == Operation::KvRead && e.path == "secret/data/app/db")
        .unwrap();
    assert_eq!(last_read.actor.entity, "approle:web");
}
