//! A node whose disk fills up fails closed, and recovers once space is freed.
//!
//! The disk is a real one: a tmpfs of 24 MiB mounted for the test, holding a real `arcad
//! dev` node's store, filled by a file until the file system has no space left. Mounting
//! needs root: CI runs as root; as another user the test says so on stderr and does nothing.

mod common;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Server, sample};

/// A tmpfs mounted at a directory until dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs at {} failed: {status}", at.display());
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn running_as_root() -> bool {
    // /proc/self/status: "Uid: real effective saved fs".
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Fills the file system holding `path` with one file until a write fails for want of space.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(err) if err.kind() == std::io::ErrorKind::StorageFull => break,
            Err(err) => panic!("filling the disk: {err}"),
        }
    }
    let _ = file.sync_all();
    written
}

struct Reply {
    status: u16,
    request_id: String,
    body: String,
}

fn call(server: &Server, token: &str, method: &str, path: &str, body: Option<String>) -> Reply {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{}/v1/{path}", server.http);
    let mut response = match body {
        Some(body) => agent.post(&url).header("X-Vault-Token", token).send(body),
        None => agent.get(&url).header("X-Vault-Token", token).call(),
    }
    .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    let request_id = response
        .headers()
        .get("x-arca-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Reply {
        status: response.status().as_u16(),
        request_id,
        body: response.body_mut().read_to_string().unwrap(),
    }
}

fn write(server: &Server, token: &str, key: &str, value: &str) -> Reply {
    call(
        server,
        token,
        "POST",
        &format!("secret/data/{key}"),
        Some(format!("{{\"data\":{{\"v\":\"{value}\"}}}}")),
    )
}

fn read(server: &Server, token: &str, key: &str) -> Reply {
    call(server, token, "GET", &format!("secret/data/{key}"), None)
}

#[test]
fn a_full_disk_fails_every_request_closed_and_the_node_serves_again_once_space_is_freed() {
    if !running_as_root() {
        eprintln!("disk_full_e2e: not root, cannot mount a tmpfs: not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let _tmpfs = Tmpfs::mount(&disk, "24m");
    // The node's log goes beside the disk (`<data dir>.stderr`), not on it.
    let mut server = common::start(&disk, "n1");
    let token = std::fs::read_to_string(disk.join("root-token")).unwrap().trim().to_owned();
    assert_eq!(write(&server, &token, "before", "kept").status, 200);

    // The disk filled, then 2 MiB given back: writes are served until the store's files
    // can grow no more.
    let filler = disk.join("filler");
    let full_since = std::time::Instant::now();
    let filled = fill(&filler);
    assert!(filled > 8 << 20, "the filler took only {filled} bytes");
    std::fs::OpenOptions::new().write(true).open(&filler).unwrap().set_len(filled - (2 << 20)).unwrap();

    // Writes until one is refused: served ones are recorded, and the first refusal is a 503
    // that serves nothing.
    let value = "x".repeat(32 * 1024);
    let mut served: Vec<String> = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let mut failed_key = None;
    for i in 0..400 {
        let key = format!("k{i}");
        let reply = write(&server, &token, &key, &value);
        match reply.status {
            200 => served.push(reply.request_id),
            503 => {
                assert!(
                    reply.body.contains("storage unavailable: the request was not served"),
                    "{}",
                    reply.body
                );
                assert!(!reply.request_id.is_empty(), "a refusal carries its request id");
                refused.push(reply.request_id);
                failed_key = Some(key);
                break;
            }
            other => panic!("write {key} with the disk full: {other} {}", reply.body),
        }
    }
    let failed_key = failed_key.expect("no write was refused on a full disk");
    eprintln!(
        "disk_full_e2e: filler {filled} bytes; {} writes served before {failed_key} was refused",
        served.len()
    );

    // While full: nothing the node cannot record is served. A read answers 200 only if its
    // event was committed (a small one may still fit), and never returns the refused write.
    for _ in 0..5 {
        let reply = read(&server, &token, "before");
        match reply.status {
            200 => served.push(reply.request_id),
            503 => refused.push(reply.request_id),
            other => panic!("a read with the disk full: {other} {}", reply.body),
        }
    }
    let reply = read(&server, &token, &failed_key);
    assert_ne!(reply.status, 200, "the refused write was served: {}", reply.body);
    assert!(sample(&server.metrics(), "arca_audit_batch_failures_total") >= 1);
    assert!(server.child.try_wait().unwrap().is_none(), "the node exited with its disk full");

    // Space back: the node serves again by itself, and the refused write changed nothing.
    std::fs::remove_file(&filler).unwrap();
    let after = "y".repeat(1024);
    common::wait_until("a write to succeed once space is freed", Duration::from_secs(30), || {
        let reply = write(&server, &token, "after", &after);
        if reply.status == 200 {
            served.push(reply.request_id);
            return true;
        }
        refused.push(reply.request_id);
        false
    });
    let reply = read(&server, &token, &failed_key);
    assert_eq!(reply.status, 404, "the refused write left something: {}", reply.body);
    served.push(reply.request_id);
    let reply = read(&server, &token, "after");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains(&after));
    served.push(reply.request_id);
    let reply = read(&server, &token, "before");
    assert!(reply.status == 200 && reply.body.contains("kept"), "{} {}", reply.status, reply.body);
    served.push(reply.request_id);
    assert!(server.child.try_wait().unwrap().is_none(), "the node exited");

    // Every served reply's event is in the store, no refused one's is; the log holds them all
    // and verifies.
    let events = common::audit_events(&disk.join("arca.db"));
    let ids: HashSet<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
    for id in &served {
        assert!(ids.contains(id.as_str()), "a served request {id} has no audit event");
    }
    for id in &refused {
        assert!(!ids.contains(id.as_str()), "a refused request {id} has an audit event: it was served");
    }
    common::wait_for_log(&server, events.len() as u64, Duration::from_secs(30));
    let vkey = common::vkey(&server);
    let run = common::arca(&server, None, &["audit", "verify", "--url", &server.log_url, "--vkey", &vkey]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    // The log said why, and how many failed, in a few lines rather than one per failed batch:
    // the committer's first failure at once, then at most two lines per 10 s (a summary
    // and a recovery: the loop may flap, a small batch fitting where a large one did not);
    // its last line says it works again (at the latest 10 s after its line before).
    let committer_lines = || {
        let log = std::fs::read_to_string(&server.stderr_log).unwrap();
        log.lines().filter(|l| l.contains("audit batch commit")).map(str::to_owned).collect::<Vec<_>>()
    };
    common::wait_until("the committer's recovery in the log", Duration::from_secs(25), || {
        committer_lines().last().is_some_and(|l| l.contains("audit batch commit works again"))
    });
    let lines = committer_lines();
    let failed_batches = sample(&server.metrics(), "arca_audit_batch_failures_total");
    eprintln!(
        "disk_full_e2e: {} served, {} refused, {failed_batches} failed batches, {} lines about them:",
        served.len(),
        refused.len(),
        lines.len()
    );
    for line in &lines {
        eprintln!("disk_full_e2e: node log: {line}");
    }
    assert!(
        lines[0].contains("audit batch commit failed") && lines[0].contains("storage_full"),
        "{}",
        lines[0]
    );
    let waits = full_since.elapsed().as_secs() / 10 + 1;
    assert!(lines.len() as u64 <= 1 + 2 * waits, "{} lines in {waits} waits of 10 s", lines.len());
}
