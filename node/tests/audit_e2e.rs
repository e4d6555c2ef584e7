//! The signed audit log end to end, on real `arcad` processes: tampering with the store is
//! caught by `arca audit verify`; a sequencer crash at any step forks nothing; killing the
//! sequencer leader under load moves leadership with no gap and no duplicate.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use arca_audit::checkpoint;
use arca_audit::note::NoteVerifier;
use arca_node::keys;
use arca_store::{RangeOptions, SqliteConfig, SqliteStore, Store, StoreExt, prefix_end};
use common::{arca, audit_events, ok_json, start, wait_for_log};

fn verify(server: &common::Server, vkey: &str, state: Option<&Path>) -> common::Run {
    let mut args = vec!["audit", "verify", "--url", server.log_url.as_str(), "--vkey", vkey];
    let state_text;
    if let Some(state) = state {
        state_text = state.to_str().unwrap().to_owned();
        args.extend(["--state", state_text.as_str()]);
    }
    arca(server, None, &args)
}

fn store(data: &Path) -> SqliteStore {
    SqliteStore::open(SqliteConfig::new(data.join("arca.db"))).unwrap()
}

/// The keys of the region's event queue, in log order.
fn event_keys(store: &dyn Store) -> Vec<Vec<u8>> {
    let prefix = keys::audit_events("local");
    let rows = store
        .transact(|tx| tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default()))
        .unwrap()
        .value;
    rows.into_iter().map(|kv| kv.key).collect()
}

#[test]
fn tampering_with_the_stored_log_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "node-a");
    let root = std::fs::read_to_string(data.join("root-token")).unwrap();
    let mut calls = 0;
    for i in 0..20 {
        ok_json(&server, Some(root.trim()), &["kv", "put", "secret/t", &format!("v={i}")], &mut calls);
    }
    wait_for_log(&server, 2 + calls as u64, Duration::from_secs(30));
    let vkey = common::vkey(&server);
    assert_eq!(verify(&server, &vkey, None).code, 0);

    // Change one byte of a sequenced entry, in place.
    let db = store(&data);
    let victim = event_keys(&db)[7].clone();
    let original = db.transact(|tx| tx.get(&victim)).unwrap().value.unwrap();
    let mut altered = original.clone();
    let last = altered.len() - 1;
    altered[last] ^= 0x20;
    db.transact(|tx| tx.set(&victim, &altered)).unwrap();
    let run = verify(&server, &vkey, None);
    assert_eq!(run.code, 6, "{}", run.stdout);
    assert!(run.stderr.contains("entry 7") && run.stderr.contains("altered"), "{}", run.stderr);

    // Restore it, then delete an entry instead.
    db.transact(|tx| tx.set(&victim, &original)).unwrap();
    assert_eq!(verify(&server, &vkey, None).code, 0);
    db.transact(|tx| tx.clear(&victim)).unwrap();
    let run = verify(&server, &vkey, None);
    assert_eq!(run.code, 6);
    assert!(run.stderr.contains("does NOT verify"), "{}", run.stderr);

    // A verifier holding another key refuses the checkpoint.
    let other =
        arca_audit::note::NoteSigner::from_seed("arca/dev/local", &[1; 32]).unwrap().verifier().vkey();
    let run = verify(&server, &other, None);
    assert_eq!(run.code, 6);
    assert!(run.stderr.contains("checkpoint"), "{}", run.stderr);
}

/// The signed checkpoint persisted in the store, opened with the log's key.
fn stored_checkpoint(data: &Path) -> Option<checkpoint::VerifiedCheckpoint> {
    let db = store(data);
    let (state, vkey) = db
        .transact(|tx| {
            Ok::<_, arca_store::StoreError>((
                tx.get(&keys::audit_state("local"))?,
                tx.get(&keys::audit_vkey("local"))?,
            ))
        })
        .unwrap()
        .value;
    let state: serde_json::Value = serde_json::from_slice(&state?).unwrap();
    let verifier = NoteVerifier::parse(std::str::from_utf8(&vkey?).unwrap()).unwrap();
    Some(checkpoint::open(state["checkpoint"].as_str().unwrap(), &verifier).unwrap())
}

#[test]
fn a_sequencer_crash_at_any_step_forks_nothing() {
    for point in [
        "sequencer.after-read",
        "sequencer.after-tiles",
        "sequencer.after-sign",
        "sequencer.before-commit",
        "sequencer.after-commit",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // First start: the dev bootstrap writes two events; the sequencer dies at `point`.
        let mut crashing = common::spawn(&data, "node-a", &[("ARCA_FAILPOINT", point)]);
        let status = crashing.wait().unwrap();
        assert!(!status.success(), "{point}: the node must have aborted");
        let before = stored_checkpoint(&data);
        assert_eq!(
            before.is_some(),
            point == "sequencer.after-commit",
            "{point}: a checkpoint is durable only after the commit"
        );

        // Restart without the failpoint and keep going.
        let server = start(&data, "node-a");
        let root = std::fs::read_to_string(data.join("root-token")).unwrap();
        let mut calls = 0;
        for i in 0..5 {
            ok_json(&server, Some(root.trim()), &["kv", "put", "secret/c", &format!("v={i}")], &mut calls);
        }
        // 2 events from the first start, 2 from the second (status, unseal), then ours.
        let expected = 4 + calls as u64;
        wait_for_log(&server, expected, Duration::from_secs(30));
        let vkey = common::vkey(&server);
        let state = dir.path().join("state.json");
        if let Some(cp) = &before {
            let seen = serde_json::json!({"size": cp.size(), "root": base64_root(cp.root())});
            std::fs::write(&state, seen.to_string()).unwrap();
        }
        let run = verify(&server, &vkey, Some(&state));
        assert_eq!(run.code, 0, "{point}: {}{}", run.stdout, run.stderr);
        assert!(run.stdout.contains(&format!("{expected} entries")), "{point}: {}", run.stdout);
        if before.is_some() {
            assert!(
                run.stdout.contains("consistent with the checkpoint of size 2"),
                "{point}: {}",
                run.stdout
            );
        }
    }
}

fn base64_root(root: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(root)
}

#[test]
fn killing_the_sequencer_leader_under_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let a = start(&data, "node-a");
    let b = start(&data, "node-b");
    let root = std::fs::read_to_string(data.join("root-token")).unwrap();
    let root = root.trim().to_owned();

    // Who leads? The lease names the holder's node.
    let leader_is_a = || {
        let lease = store(&data).transact(|tx| tx.get(&keys::audit_lease("local"))).unwrap().value;
        lease.map(|l| String::from_utf8_lossy(&l).contains("\"holder\":\"node-a:"))
    };
    wait_for_log(&a, 4, Duration::from_secs(30));
    let survivor_is_a = leader_is_a() != Some(true);
    let (mut leader, survivor) = if survivor_is_a { (b, a) } else { (a, b) };
    let vkey = common::vkey(&survivor);
    let state = dir.path().join("state.json");

    // Load from four clients against both nodes; kill -9 the leader half way.
    let acknowledged = std::sync::Mutex::new(Vec::new());
    let leader_addr = leader.addr.clone();
    let survivor_addr = survivor.addr.clone();
    std::thread::scope(|scope| {
        for client in 0..4 {
            let (acknowledged, root, leader_addr, survivor_addr) =
                (&acknowledged, &root, &leader_addr, &survivor_addr);
            scope.spawn(move || {
                for i in 0..40 {
                    let addr = if (client + i) % 2 == 0 { leader_addr } else { survivor_addr };
                    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arca"))
                        .args([
                            "--format",
                            "json",
                            "kv",
                            "put",
                            &format!("secret/load/{client}"),
                            &format!("v={i}"),
                        ])
                        .env("ARCA_ADDR", addr)
                        .env("ARCA_TOKEN", root)
                        .output()
                        .unwrap();
                    if out.status.success() {
                        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                        acknowledged.lock().unwrap().push(v["request_id"].as_str().unwrap().to_owned());
                    }
                }
            });
        }
        // Let some load land and be sequenced by the leader, pin that checkpoint, then kill.
        wait_for_log(&survivor, 30, Duration::from_secs(30));
        let run = verify(&survivor, &vkey, Some(&state));
        assert_eq!(run.code, 0, "{}", run.stderr);
        leader.child.kill().unwrap();
        leader.child.wait().unwrap();
    });

    // The survivor takes over once the lease expires and integrates everything.
    let total = audit_events(&data.join("arca.db")).len() as u64;
    wait_for_log(&survivor, total, Duration::from_secs(30));
    let run = verify(&survivor, &vkey, Some(&state));
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains(&format!("{total} entries")), "{}", run.stdout);
    assert!(run.stdout.contains("consistent with the checkpoint"), "{}", run.stdout);
    assert_eq!(leader_is_a(), Some(survivor_is_a), "the survivor holds the lease now");

    // Every acknowledged request is in the log exactly once, and nothing else is duplicated.
    let tail = arca(
        &survivor,
        None,
        &["--format", "json", "audit", "tail", "--url", &survivor.log_url, "--vkey", &vkey],
    );
    let mut in_log = HashSet::new();
    for line in tail.stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = v["event"]["request_id"].as_str().unwrap().to_owned();
        assert!(in_log.insert(id), "a request appears twice in the log");
    }
    assert_eq!(in_log.len() as u64, total);
    let acknowledged = acknowledged.into_inner().unwrap();
    assert!(acknowledged.len() >= 80, "the survivor kept serving: {}", acknowledged.len());
    for id in &acknowledged {
        assert!(in_log.contains(id), "acknowledged request {id} is missing from the log");
    }
}
