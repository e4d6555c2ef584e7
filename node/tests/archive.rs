//! Audit log retention in process: the archive is a static tlog-tiles log that verifies on
//! its own; pruned entries stay provable (served from the archive); the store keeps only
//! the retained tail; pruning waits for the SIEM exporter's cursor and a standby's
//! confirmed position.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arca_audit::checkpoint;
use arca_audit::merkle::{leaf_hash, verify_inclusion};
use arca_audit::note::NoteVerifier;
use arca_audit::tiles::TILE_WIDTH;
use arca_audit::verify::{LogReader, verify_log};
use arca_audit::{Event, Source};
use arca_node::archive::{self, ArchiveConfig};
use arca_node::keys;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_node::sequencer::{self, LeafRef, SequencerConfig};
use arca_store::{RangeOptions, SqliteConfig, SqliteStore, Store, StoreExt, prefix_end};
use zeroize::Zeroizing;

fn ctx(token: Option<&str>) -> RequestContext {
    RequestContext::new(
        token.map(|t| Zeroizing::new(t.to_owned())),
        Source { address: "127.0.0.1:1".into(), proxy: None },
    )
}

/// Reads a static log from a directory (what any tlog-tiles client would do).
struct DirLog<'a>(&'a Path);

impl LogReader for DirLog<'_> {
    fn checkpoint(&mut self) -> Result<String, String> {
        std::fs::read_to_string(self.0.join("checkpoint")).map_err(|e| e.to_string())
    }
    fn tile(&mut self, level: u32, index: u64, width: u64) -> Result<Option<Vec<u8>>, String> {
        Ok(archive::archived_tile(self.0, level, index, width))
    }
    fn entries(&mut self, index: u64, width: u64) -> Result<Option<Vec<u8>>, String> {
        Ok(archive::read_archived(self.0, &arca_audit::tiles::entries_path(index, width)))
    }
}

fn event_count(store: &dyn Store) -> usize {
    let prefix = keys::audit_events("local");
    let end = prefix_end(&prefix).unwrap();
    store.transact(|tx| tx.get_range(&prefix, &end, RangeOptions::default())).unwrap().value.len()
}

struct Setup {
    _dir: tempfile::TempDir,
    archive: std::path::PathBuf,
    store: Arc<dyn Store>,
    node: Arc<Node>,
    root: String,
    config: ArchiveConfig,
}

async fn setup(retain: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("a.db"))).unwrap());
    let node = Node::new(
        store.clone(),
        NodeIdentity { cluster: "test".into(), region: "local".into(), node: "n1".into() },
    );
    let root = node.operator_init(ctx(None), 1, 1).await.result.unwrap().root_token.token.to_string();
    let archive = dir.path().join("archive");
    let config = ArchiveConfig {
        dir: archive.clone(),
        retain_entries: retain,
        retain_for: None,
        interval: Duration::from_millis(50),
    };
    Setup { _dir: dir, archive, store, node, root, config }
}

async fn reads(s: &Setup, n: usize) {
    for _ in 0..n {
        let _ = s.node.kv_read(ctx(Some(&s.root)), "secret".into(), "none".into(), None).await;
    }
    while sequencer::integrate(&s.node, "t", &SequencerConfig::default()).unwrap().is_some() {}
}

fn prove(node: &Node, index: u64, verifier: &NoteVerifier) {
    let proof = node.audit_inclusion_proof(LeafRef::Index(index)).unwrap();
    let cp = checkpoint::open(&proof.checkpoint, verifier).unwrap();
    verify_inclusion(index, cp.size(), &leaf_hash(&proof.entry), &proof.hashes, cp.root())
        .unwrap_or_else(|e| panic!("inclusion proof for {index}: {e:?}"));
    Event::decode(&proof.entry).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn archive_prune_and_every_entry_stays_provable() {
    let s = setup(300).await;
    reads(&s, 1500).await;
    let holder = "n1:test";
    let state = archive::step(&s.node, holder, &s.config).unwrap().unwrap();
    let size = s
        .node
        .audit_checkpoint()
        .unwrap()
        .map(|c| c.lines().nth(1).unwrap().parse::<u64>().unwrap())
        .unwrap();
    assert_eq!(state.archived_bundles, size / TILE_WIDTH);
    // Kept: the retained tail rounded to whole bundles, plus what is not yet in a full bundle.
    assert_eq!(state.pruned_bundles, (size - 300) / TILE_WIDTH);
    assert!(state.pruned_bundles >= 4, "{state:?}");
    let kept = event_count(s.store.as_ref()) as u64;
    assert_eq!(kept, size - state.pruned_bundles * TILE_WIDTH, "exactly the pruned bundles left the store");
    assert!(kept < 300 + 2 * TILE_WIDTH, "the store still holds {kept} events");
    // The request-id index and the checkpoint history shrink with the entries.
    let count = |prefix: Vec<u8>| {
        let end = prefix_end(&prefix).unwrap();
        s.store.transact(|tx| tx.get_range(&prefix, &end, RangeOptions::default())).unwrap().value.len()
            as u64
    };
    let pairs = {
        let prefix = keys::audit_rid_pages("local");
        let end = prefix_end(&prefix).unwrap();
        let pages =
            s.store.transact(|tx| tx.get_range(&prefix, &end, RangeOptions::default())).unwrap().value;
        pages.iter().map(|page| (page.value.len() / arca_node::sequencer::RID_PAIR) as u64).sum::<u64>()
    };
    // Every kept entry has its request id indexed (the test's ids are the node's own).
    assert!(pairs >= kept, "{pairs} request ids indexed for {kept} kept entries");
    assert!(pairs <= kept + TILE_WIDTH, "request ids of pruned entries stayed: {pairs} for {kept}");
    assert!(count(keys::audit_rid_prefix("local")) <= kept + TILE_WIDTH, "per-entry request ids stayed");
    assert!(count(keys::audit_checkpoints("local")) <= kept, "checkpoints of pruned ranges stayed");

    // The archive is a static log that verifies on its own, from entry 0.
    let verifier = NoteVerifier::parse(&s.node.audit_vkey().unwrap().unwrap()).unwrap();
    let report = verify_log(
        &mut DirLog(&s.archive),
        &verifier,
        None,
        &mut |_, e| Event::decode(e).map(drop).map_err(|e| e.to_string()),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(report.checkpoint.size(), size);
    // No temporary file is visible under a tile name.
    let mut stack = vec![s.archive.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                assert!(!p.file_name().unwrap().to_string_lossy().starts_with(".tmp-"), "{p:?}")
            }
        }
    }

    // Pruned and live entries are provable; pruned bundles are served from the archive.
    for index in [0, 255, 256, size / 2, size - 1] {
        prove(&s.node, index, &verifier);
    }
    assert!(s.node.audit_entries(0, TILE_WIDTH).unwrap().is_some());
    assert!(s.node.audit_tile(0, 0, TILE_WIDTH).unwrap().is_some());

    // More traffic: the store's size levels off, the archive grows.
    reads(&s, 1000).await;
    let later = archive::step(&s.node, holder, &s.config).unwrap().unwrap();
    assert!(later.pruned_bundles > state.pruned_bundles);
    assert!((event_count(s.store.as_ref()) as u64) < 300 + 2 * TILE_WIDTH);
}

#[tokio::test(flavor = "multi_thread")]
async fn pruning_waits_for_the_exporter_and_the_standbys() {
    let s = setup(0).await;
    // A stopped SIEM exporter that delivered 300 entries: nothing past its cursor goes.
    s.store
        .transact(|tx| {
            tx.set(&keys::siem_cursor("local"), br#"{"next_index":300,"stamp":null,"checkpoint_size":0}"#)
        })
        .unwrap();
    // A standby that confirmed 600.
    let section = arca_node::config::ReplicationSection {
        listen_addr: "127.0.0.1:1".parse().unwrap(),
        tls_cert_file: None,
        tls_key_file: None,
        ca_file: None,
        dangerous_plaintext: true,
        initial_primary: "local".into(),
        peers: vec![arca_node::config::PeerSection {
            region: "us".into(),
            endpoint: "http://127.0.0.1:1".into(),
        }],
    };
    s.node.enable_regions(arca_node::region::Regions::from_config(&section, "local").unwrap()).unwrap();
    reads(&s, 1300).await;
    let state = archive::step(&s.node, "n1:test", &s.config).unwrap().unwrap();
    assert!(state.archived_bundles >= 5);
    assert_eq!(state.pruned_bundles, 0, "the standby confirmed nothing yet: nothing may go");
    s.store
        .transact(|tx| tx.set(&arca_node::region::shipped_audit_key("us"), &600u64.to_be_bytes()))
        .unwrap();
    let state = archive::step(&s.node, "n1:test", &s.config).unwrap().unwrap();
    assert_eq!(state.pruned_bundles, 1, "the exporter's cursor (300) bounds it");
    s.store
        .transact(|tx| {
            tx.set(&keys::siem_cursor("local"), br#"{"next_index":5000,"stamp":null,"checkpoint_size":0}"#)
        })
        .unwrap();
    let state = archive::step(&s.node, "n1:test", &s.config).unwrap().unwrap();
    assert_eq!(state.pruned_bundles, 2, "now the standby's position (600) bounds it");
}

#[tokio::test(flavor = "multi_thread")]
async fn age_retention_keeps_young_entries() {
    let mut s = setup(0).await;
    reads(&s, 800).await;
    s.config.retain_for = Some(Duration::from_secs(3600));
    let state = archive::step(&s.node, "n1:test", &s.config).unwrap().unwrap();
    assert!(state.archived_bundles >= 3);
    assert_eq!(state.pruned_bundles, 0, "every entry is younger than an hour");
    s.config.retain_for = Some(Duration::ZERO);
    let state = archive::step(&s.node, "n1:test", &s.config).unwrap().unwrap();
    assert_eq!(state.pruned_bundles, state.archived_bundles);
}
