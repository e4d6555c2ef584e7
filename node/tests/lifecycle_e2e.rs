//! Secret lifecycle against real `arcad` processes: rotations while readers read
//! continuously (no read fails; every value read was a current value), the scheduler
//! rotating on its own and catching up a schedule missed while the node was down, an
//! external rotator driven through create/set/test/finish and resumed after a crash between
//! steps, revocation; every step in the audit log.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arca_audit::{Operation, Outcome};
use arca_client::{Auth, Client, Config};
use common::{Server, arca, audit_events, start_args, start_at};
use serde_json::Value;

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn root(data: &Path) -> String {
    std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned()
}

fn ok(server: &Server, token: &str, args: &[&str]) -> Value {
    let mut full = vec!["--format", "json"];
    full.extend_from_slice(args);
    let run = arca(server, Some(token), &full);
    assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or(Value::Null)
}

fn metadata(server: &Server, token: &str, path: &str) -> Value {
    ok(server, token, &["kv", "metadata", "get", path])
}

#[tokio::test(flavor = "multi_thread")]
async fn rotations_while_readers_read_never_fail_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start_args(&data, "n1", &[], &[]);
    let root = root(&data);
    ok(&server, &root, &["kv", "put", "secret/app/db", "user=app", "password=initial"]);
    ok(&server, &root, &common::rotation_set("secret/app/db", "3600", "password", &["--length", "24"]));

    let client =
        Client::connect(Config::new(&server.addr).unwrap().auth(Auth::token(root.clone()))).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (client, stop) = (client.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let (mut seen, mut reads) = (BTreeSet::new(), 0u64);
            while !stop.load(Ordering::SeqCst) {
                let s = client.read("secret/app/db").await.expect("a read failed during rotation");
                assert_eq!(s.get("user"), Some("app"), "other fields survive rotation");
                seen.insert((s.version, s.get("password").unwrap().to_owned()));
                reads += 1;
            }
            (seen, reads)
        }));
    }
    let mut versions = Vec::new();
    for _ in 0..5 {
        let v = ok(&server, &root, &["rotate", "secret/app/db"])["version"].as_u64().unwrap();
        versions.push(v);
    }
    stop.store(true, Ordering::SeqCst);
    let mut seen = BTreeSet::new();
    let mut reads = 0;
    for r in readers {
        let (s, n) = r.await.unwrap();
        seen.extend(s);
        reads += n;
    }
    assert_eq!(versions, vec![2, 3, 4, 5, 6]);
    assert!(reads > 20, "the readers kept reading ({reads})");
    eprintln!(
        "{reads} reads during 5 rotations, none failed; {} distinct (version, value) pairs seen",
        seen.len()
    );
    // Every value read was exactly the value of the version it claimed.
    for (version, password) in &seen {
        let at = client.read_version("secret/app/db", *version).await.unwrap();
        assert_eq!(at.get("password"), Some(password.as_str()));
    }
    let current = client.read("secret/app/db").await.unwrap();
    assert_eq!(current.version, 6);
    assert_eq!(current.get("password").unwrap().len(), 24);
    assert_ne!(current.get("password"), Some("initial"));
    let previous = client.read_stage("secret/app/db", "previous").await.unwrap();
    assert_eq!(previous.version, 5);
    let meta = metadata(&server, &root, "secret/app/db");
    assert_eq!(meta["stages"]["current"], 6);
    assert_eq!(meta["rotation_step"], "");

    let events = audit_events(&data.join("arca.db"));
    let count =
        |op: Operation| events.iter().filter(|e| e.operation == op && e.outcome == Outcome::Ok).count();
    assert_eq!(count(Operation::KvRotate), 5, "each asked-for rotation");
    assert_eq!(count(Operation::KvRotateFinish), 5);
    assert!(
        events
            .iter()
            .filter(|e| e.operation == Operation::KvRotateFinish)
            .all(|e| e.actor.entity == "system:rotation")
    );
}

#[test]
fn the_scheduler_rotates_and_catches_up_a_missed_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = arca_testkit::free_port();
    let grpc = format!("127.0.0.1:{port}");
    let mut server = start_at(&data, "n1", &grpc, &[], &[]);
    let root = root(&data);
    ok(&server, &root, &["kv", "put", "secret/app/key", "api_key=first"]);
    ok(&server, &root, &common::rotation_set("secret/app/key", "1", "api-key", &["--field", "api_key"]));
    wait("two scheduled rotations", || {
        metadata(&server, &root, "secret/app/key")["stages"]["current"].as_u64() >= Some(3)
    });

    // Down past a due time: on recovery the missed rotation runs at once (without the
    // catch-up, nothing would ever move the schedule on again).
    ok(&server, &root, &common::rotation_set("secret/app/key", "3", "api-key", &["--field", "api_key"]));
    let meta = metadata(&server, &root, "secret/app/key");
    drop(server);
    let (due, before) =
        (meta["rotation_next_unix_ms"].as_u64().unwrap(), meta["current_version"].as_u64().unwrap());
    let db = data.join("arca.db");
    wait("the next rotation to be due while the node is down", || arca_node::node::now_unix_ms() > due + 500);
    server = start_at(&data, "n1", &grpc, &[], &[]);
    wait("the missed rotation to run", || {
        metadata(&server, &root, "secret/app/key")["current_version"].as_u64() > Some(before)
    });
    let rotated = audit_events(&db).into_iter().filter(|e| e.operation == Operation::KvRotateFinish).count();
    assert!(rotated as u64 >= before, "every rotation finished is audited");
}

#[test]
fn an_external_rotator_resumes_after_a_crash_between_steps() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rotators = dir.path().join("rotators");
    std::fs::create_dir(&rotators).unwrap();
    let log = dir.path().join("steps.log");
    let script = rotators.join("db-password");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ninput=$(cat)\necho \"$1\" >> {log}\ncase \"$1\" in\n  create) echo '{{\"user\":\"app\",\"password\":\"rotated-'$$'\"}}' ;;\n  test) echo \"$input\" | grep -q '\"password\":\"rotated-' || exit 1 ;;\nesac\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let rotators_arg = rotators.display().to_string();
    let port = arca_testkit::free_port();
    let grpc = format!("127.0.0.1:{port}");
    // The first run aborts right after the create step is recorded.
    let mut server = start_at(
        &data,
        "n1",
        &grpc,
        &[("ARCA_FAILPOINT", "rotation.after-create")],
        &["--rotators-dir", &rotators_arg],
    );
    let root = root(&data);
    ok(&server, &root, &["kv", "put", "secret/app/db", "user=app", "password=old"]);
    ok(&server, &root, &common::rotation_set("secret/app/db", "3600", "exec", &["--command", "db-password"]));
    let crashed = arca(&server, Some(&root), &["rotate", "secret/app/db"]);
    assert_ne!(crashed.code, 0, "the node died mid-rotation");
    assert!(server.child.wait().unwrap().code().is_none(), "aborted by the failpoint");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "create\n");

    // Restarted: readers get the old value until the rotation resumes and finishes.
    server = start_at(&data, "n1", &grpc, &[], &["--rotators-dir", &rotators_arg]);
    wait("the rotation to resume and finish", || {
        metadata(&server, &root, "secret/app/db")["stages"]["current"] == 2
    });
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "create\nset\ntest\n",
        "each step once, from where it stopped"
    );
    let meta = metadata(&server, &root, "secret/app/db");
    assert_eq!((meta["current_version"].as_u64(), meta["stages"]["previous"].as_u64()), (Some(2), Some(1)));
    let value = ok(&server, &root, &["kv", "get", "secret/app/db"]);
    assert!(value["data"]["password"].as_str().unwrap().starts_with("rotated-"));
    let steps: Vec<Operation> = audit_events(&data.join("arca.db"))
        .into_iter()
        .filter(|e| e.actor.entity == "system:rotation" && e.outcome == Outcome::Ok)
        .map(|e| e.operation)
        .collect();
    for op in [Operation::KvRotateSet, Operation::KvRotateTest, Operation::KvRotateFinish] {
        assert!(steps.contains(&op), "{op:?} audited");
    }

    // Revocation: the current version is refused as revoked (and audited so); the previous
    // one still reads.
    ok(&server, &root, &["kv", "revoke", "secret/app/db"]);
    let refused = arca(&server, Some(&root), &["kv", "get", "secret/app/db"]);
    assert_eq!(refused.code, 5);
    assert!(refused.stderr.contains("revoked"), "{}", refused.stderr);
    assert_eq!(
        ok(&server, &root, &["kv", "get", "--stage", "previous", "secret/app/db"])["data"]["password"],
        "old"
    );
    assert!(
        audit_events(&data.join("arca.db"))
            .iter()
            .any(|e| e.operation == Operation::KvRead
                && e.outcome == Outcome::Error { code: "revoked".into() }),
        "the refused read is audited as revoked"
    );
    assert!(
        audit_events(&data.join("arca.db"))
            .iter()
            .any(|e| e.operation == Operation::KvRevoke && e.outcome == Outcome::Ok)
    );
}

/// A rotator that keeps failing is tried again after a wait that doubles (1 s, 2 s, 4 s, …),
/// not every scheduler round (twice a second: each try an audit event, a log line and a call
/// to the target system), and the scheduler finishes the rotation once the rotator works.
#[test]
fn a_failing_rotator_is_tried_again_after_growing_waits_and_finished_once_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rotators = dir.path().join("rotators");
    std::fs::create_dir(&rotators).unwrap();
    let tries = dir.path().join("tries.log");
    let broken = dir.path().join("broken");
    std::fs::write(&broken, "").unwrap();
    let script = rotators.join("flaky");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ninput=$(cat)\necho \"$1 $(date +%s.%N)\" >> {tries}\n[ -e {broken} ] && exit 3\n\
             [ \"$1\" = create ] && echo '{{\"password\":\"rotated\"}}'\nexit 0\n",
            tries = tries.display(),
            broken = broken.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let rotators_arg = rotators.display().to_string();
    let server = start_args(&data, "n1", &[], &["--rotators-dir", &rotators_arg]);
    let root = root(&data);
    ok(&server, &root, &["kv", "put", "secret/app/pg", "password=old"]);
    ok(&server, &root, &common::rotation_set("secret/app/pg", "3600", "exec", &["--command", "flaky"]));
    // An operator's rotation fails and stays under way: the scheduler takes it from there.
    let failed = arca(&server, Some(&root), &["rotate", "secret/app/pg"]);
    assert_ne!(failed.code, 0, "the rotator is broken: {}", failed.stdout);
    let times = || -> Vec<f64> {
        std::fs::read_to_string(&tries)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect()
    };
    let first = times()[0];
    // Watch the 6.5 s after the first try (the point is what does not happen in it): tries at
    // about 0 (the operator's), 0.5 (the scheduler's first), +1 s, +2 s, then +4 s falls
    // outside. Every round would be ~14.
    wait("6.5 s to pass after the first try", || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
            > first + 6.5
    });
    let within: Vec<f64> = times().into_iter().filter(|t| *t <= first + 6.5).collect();
    assert!(
        (2..=5).contains(&within.len()),
        "{} tries in the 6.5 s after the first: {:?}",
        within.len(),
        within.iter().map(|t| format!("{:.2}", t - first)).collect::<Vec<_>>()
    );
    for pair in within.windows(2).skip(1) {
        assert!(pair[1] - pair[0] >= 0.9, "tries {:.2} s apart: {within:?}", pair[1] - pair[0]);
    }
    // An operator sees it waiting, and the scheduler's failed tries (the operator's is not one).
    let metrics = server.metrics();
    assert_eq!(common::sample(&metrics, "arca_scheduler_waiting{task=\"rotation\"}"), 1);
    let failures = common::sample(&metrics, "arca_scheduler_failures_total{task=\"rotation\"}");
    assert!(
        (1..=within.len() as u64).contains(&failures),
        "{failures} failures counted, {} tries",
        within.len()
    );

    // Fixed: the scheduler's next try finishes the rotation, with no one asking.
    std::fs::remove_file(&broken).unwrap();
    wait("the scheduler to finish the rotation", || {
        metadata(&server, &root, "secret/app/pg")["stages"]["current"] == 2
    });
    assert_eq!(ok(&server, &root, &["kv", "get", "secret/app/pg"])["data"]["password"], "rotated");
    wait("the rotation to wait no longer in /metrics", || {
        common::sample(&server.metrics(), "arca_scheduler_waiting{task=\"rotation\"}") == 0
    });
}

/// A one-route HTTP rotator hook: records each step; `create` answers new data.
fn hook_server() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let steps: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let seen = steps.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let request: Value = serde_json::from_slice(&body).unwrap();
            let step = request["step"].as_str().unwrap().to_owned();
            let answer = if step == "create" {
                assert_eq!(request["current"]["password"], "before-hook", "the hook sees the current data");
                r#"{"password":"from-the-hook"}"#.to_owned()
            } else {
                assert_eq!(
                    request["pending"]["password"], "from-the-hook",
                    "set and test see the pending data"
                );
                "{}".to_owned()
            };
            seen.lock().unwrap().push(step);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (port, steps)
}

#[test]
fn an_http_rotator_hook_under_an_allowed_prefix_drives_the_steps() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (port, steps) = hook_server();
    let prefix = format!("http://127.0.0.1:{port}/rotators/");
    let server = start_args(&data, "n1", &[], &["--rotator-hook-prefix", &prefix]);
    let root = root(&data);
    ok(&server, &root, &["kv", "put", "secret/app/db", "password=before-hook"]);
    // A URL outside the allowed prefixes is refused: metadata writers cannot send secrets anywhere.
    let elsewhere = arca(
        &server,
        Some(&root),
        &common::rotation_set("secret/app/db", "3600", "http", &["--url", "http://attacker.example/collect"]),
    );
    assert_eq!(elsewhere.code, 5, "{}", elsewhere.stderr);
    ok(
        &server,
        &root,
        &common::rotation_set("secret/app/db", "3600", "http", &["--url", &format!("{prefix}db")]),
    );
    assert_eq!(ok(&server, &root, &["rotate", "secret/app/db"])["version"], 2);
    assert_eq!(*steps.lock().unwrap(), vec!["create", "set", "test"]);
    assert_eq!(ok(&server, &root, &["kv", "get", "secret/app/db"])["data"]["password"], "from-the-hook");
    assert_eq!(
        ok(&server, &root, &["kv", "get", "--stage", "previous", "secret/app/db"])["data"]["password"],
        "before-hook"
    );
}
