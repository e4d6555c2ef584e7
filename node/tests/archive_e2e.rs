//! Audit log retention with real `arcad` processes: archive and prune under load, crashes
//! in the middle of archiving and of pruning (failpoints), and verification of the archive
//! alone, the live log alone (pruned parts served from the archive), and both together.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Server, arca, start_args, vkey};

fn reads(server: &Server, token: &str, n: usize) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    for i in 0..n {
        let _ = agent
            .get(format!("{}/v1/secret/data/load/{}", server.http, i % 7))
            .header("X-Vault-Token", token)
            .call();
    }
}

fn stored_events(db: &Path) -> usize {
    common::audit_events(db).len()
}

/// Every file under a tile name is whole: tiles hold 32 bytes per hash of their width,
/// bundles exactly their width in entries. (Temporary files have hidden names no client
/// asks for.) Returns how many files were checked.
fn every_visible_file_is_whole(dir: &Path) -> usize {
    use arca_audit::tiles::{TilePath, bundle_entries, parse_path};
    let mut checked = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if rel == "checkpoint" || p.file_name().unwrap().to_string_lossy().starts_with(".tmp-") {
                continue;
            }
            let data = std::fs::read(&p).unwrap();
            match parse_path(&rel).unwrap_or_else(|e| panic!("{rel}: not a tile path: {e}")) {
                TilePath::Hashes { width, .. } => assert_eq!(data.len() as u64, 32 * width, "{rel}"),
                TilePath::Entries { width, .. } => {
                    assert_eq!(bundle_entries(&data).unwrap().len() as u64, width, "{rel}")
                }
            }
            checked += 1;
        }
    }
    checked
}

fn wait_exit(server: &mut Server, what: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "{what}: the node did not reach the failpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn verify(server: &Server, key: &str, args: &[&str]) -> common::Run {
    let mut full = vec!["audit", "verify", "--vkey", key];
    full.extend_from_slice(args);
    arca(server, None, &full)
}

#[test]
fn archive_and_prune_survive_crashes_and_the_whole_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let archive = dir.path().join("archive");
    let archive_arg = archive.display().to_string();
    let flags = ["--audit-archive-dir", archive_arg.as_str(), "--audit-retain-entries", "256"];
    let db = data.join("arca.db");

    let mut node = start_args(&data, "n1", &[], &flags);
    let token = std::fs::read_to_string(data.join("root-token")).unwrap().trim().to_owned();
    reads(&node, &token, 1200);
    let end = Instant::now() + Duration::from_secs(30);
    while stored_events(&db) > 256 + 2 * 256 {
        assert!(Instant::now() < end, "pruning did not bring the store down: {} events", stored_events(&db));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(archive.join("tile/entries/000").exists());
    let key = vkey(&node);

    // A crash after the archive's files are written, before they are confirmed.
    let _ = node.child.kill();
    let _ = node.child.wait();
    let mut node = start_args(&data, "n1", &[("ARCA_FAILPOINT", "archive.after-files")], &flags);
    reads(&node, &token, 300);
    wait_exit(&mut node, "archive.after-files");
    // A crash inside a pruning transaction.
    let mut node = start_args(&data, "n1", &[("ARCA_FAILPOINT", "archive.mid-prune")], &flags);
    reads(&node, &token, 600);
    wait_exit(&mut node, "archive.mid-prune");

    // Back to normal: the archiver catches up, nothing is lost.
    let node = start_args(&data, "n1", &[], &flags);
    reads(&node, &token, 300);
    let size = common::wait_for_log(&node, 2000, Duration::from_secs(30));
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let archived = std::fs::read_to_string(archive.join("checkpoint")).unwrap_or_default();
        let archived: u64 = archived.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0);
        if archived >= size {
            break;
        }
        assert!(Instant::now() < end, "the archive did not catch up ({archived} of {size})");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(every_visible_file_is_whole(&archive) > 10);
    let end = Instant::now() + Duration::from_secs(30);
    while stored_events(&db) > 256 + 2 * 256 {
        assert!(Instant::now() < end, "the store keeps {} events", stored_events(&db));
        std::thread::sleep(Duration::from_millis(50));
    }

    // The archive alone is a static log; the live log serves pruned parts from the
    // archive; both together verify continuity from entry 0.
    let url = node.log_url.clone();
    let alone = verify(&node, &key, &["--dir", &archive_arg]);
    assert_eq!(alone.code, 0, "{}", alone.stderr);
    let live = verify(&node, &key, &["--url", &url]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    let both = verify(&node, &key, &["--dir", &archive_arg, "--url", &url]);
    assert_eq!(both.code, 0, "{}", both.stderr);
    // Entry 0 — long pruned from the store — is provable.
    let proof = arca(&node, None, &["audit", "proof", "--url", &url, "--vkey", &key, "--index", "0"]);
    assert_eq!(proof.code, 0, "{}", proof.stderr);
}
