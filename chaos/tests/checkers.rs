//! Each checker is shown to catch a real violation: a cluster whose nodes drop one audit
//! append in 64 (`ARCA_FAULT_INJECT=drop-audit-append`), and then, one by one, an
//! acknowledged write deleted from the primary, a standby key changed behind replication's
//! back, an audit entry rewritten in the store, the exporter stopped with the log growing,
//! and a secret value leaked into a process log.

use std::path::PathBuf;
use std::time::Duration;

use arca_chaos::check;
use arca_chaos::client::Workload;
use arca_chaos::cluster::{Cluster, Shape, Timeline};
use arca_store::{RangeOptions, SqliteConfig, SqliteStore, StoreExt, prefix_end};

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_arca-chaos")).parent().unwrap().to_path_buf()
}

fn tools() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(".tools")
}

#[test]
fn every_checker_fails_when_its_property_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let shape = Shape {
        regions: vec!["eu", "us"],
        nodes_per_region: 1,
        siem: true,
        env: vec![("ARCA_FAULT_INJECT".into(), "drop-audit-append".into())],
        first_region_disk: None,
    };
    let mut cluster = Cluster::start(dir.path(), &bin_dir(), &tools(), &shape, 5).expect("cluster");
    let denied = arca_chaos::scenario::denied_token(&cluster).unwrap();
    let targets = cluster.targets();
    let t = std::sync::Arc::new(Timeline::new(true));
    let workload = Workload::start(targets, cluster.root.clone(), denied, 8, 5, t);
    // Enough operations for batches with company (the injection drops within batches).
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while workload.history.lock().unwrap().len() < 1500 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let history = workload.stop();

    // 1. The nodes answered some requests without their audit entry.
    let audited = check::every_access_audited(&cluster, &history);
    assert!(!audited.pass, "dropped audit appends went unnoticed: {}", audited.evidence);
    assert!(audited.evidence.contains("have no audit entry"), "{}", audited.evidence);

    // The other properties hold before they are broken.
    let none = Default::default();
    for v in [
        check::no_acked_write_lost(&cluster, &history, &none),
        check::standby_converges(&cluster, &history, Duration::from_secs(30)),
        check::siem_complete(&cluster, Duration::from_secs(30)),
        check::no_secret_in_logs(&cluster, &history),
    ] {
        assert!(v.pass, "{}: {}", v.invariant, v.evidence);
    }

    // 2. An acknowledged write vanishes from the primary's store.
    let acked = history.iter().rev().find(|o| o.kind == "write" && o.acked() && o.version.is_some()).unwrap();
    let eu = SqliteStore::open(SqliteConfig::new(&cluster.regions[0].db)).unwrap();
    // Every row of the secret: its versions live in slots its (encrypted) metadata names.
    let rows = arca_node::keys::kv_slots("secret", &acked.path);
    eu.transact(|tx| tx.clear_range(&rows, &prefix_end(&rows).unwrap())).unwrap();
    let lost = check::no_acked_write_lost(&cluster, &history, &none);
    assert!(!lost.pass && lost.evidence.contains(&acked.path), "{}", lost.evidence);

    // 3. The standby's copy of a key is changed behind replication's back.
    let us = SqliteStore::open(SqliteConfig::new(&cluster.regions[1].db)).unwrap();
    let other = history.iter().find(|o| o.kind == "write" && o.acked() && o.path != acked.path).unwrap();
    us.transact(|tx| tx.clear(&arca_node::keys::kv_meta("secret", &other.path))).unwrap();
    let diverged = check::standby_converges(&cluster, &history, Duration::from_secs(30));
    assert!(!diverged.pass && diverged.evidence.contains("differ"), "{}", diverged.evidence);

    // 4. An audit entry is rewritten in the store: the log no longer verifies.
    let prefix = arca_node::keys::audit_events("eu");
    let first = eu
        .transact(|tx| tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::limit(1)))
        .unwrap()
        .value
        .remove(0);
    let mut forged = arca_audit::Event::decode(&first.value).unwrap();
    forged.actor.entity = "someone-else".into();
    eu.transact(|tx| tx.set(&first.key, &forged.encode())).unwrap();
    let logs = check::logs_verify(&cluster, &[]);
    assert!(!logs.pass && logs.evidence.contains("eu"), "{}", logs.evidence);

    // 5. The exporter stops while the log grows: the stream is incomplete.
    cluster.siem.as_mut().unwrap().stop_exporter();
    let node = cluster.regions[0].any().unwrap();
    for _ in 0..5 {
        node.arca(Some(&cluster.root), &["kv", "get", "secret/chaos/none"]).ok();
    }
    let siem = check::siem_complete(&cluster, Duration::from_secs(3));
    assert!(!siem.pass, "{}", siem.evidence);

    // 6. A process leaks a secret value into its log.
    let value = history.iter().find_map(|o| o.value.clone()).unwrap();
    std::fs::write(dir.path().join("leaky.log"), format!("debug: wrote {value}\n")).unwrap();
    let leaked = check::no_secret_in_logs(&cluster, &history);
    assert!(!leaked.pass && leaked.evidence.contains("leaky.log"), "{}", leaked.evidence);
}
