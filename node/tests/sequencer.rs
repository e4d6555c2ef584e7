//! The sequencer in process: the signed log it builds verifies end to end, proofs verify,
//! leadership is exclusive, and integration is exact (no gap, no duplicate).

use std::sync::Arc;

use arca_audit::checkpoint;
use arca_audit::merkle::{leaf_hash, verify_consistency, verify_inclusion};
use arca_audit::note::NoteVerifier;
use arca_audit::verify::{LogReader, Seen, verify_log};
use arca_audit::{Event, Source};
use arca_node::kv::SecretData;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_node::sequencer::{self, LeafRef, SequencerConfig};
use arca_store::{SqliteConfig, SqliteStore, Store};
use zeroize::Zeroizing;

fn ctx(token: Option<&str>) -> RequestContext {
    RequestContext::new(
        token.map(|t| Zeroizing::new(t.to_owned())),
        Source { address: "127.0.0.1:1".into(), proxy: None },
    )
}

async fn node() -> (tempfile::TempDir, Arc<Node>, String) {
    let (dir, _store, node, root) = node_and_store().await;
    (dir, node, root)
}

/// A node on its own SQLite file, with the store handle for tests that look beneath the node.
async fn node_and_store() -> (tempfile::TempDir, Arc<dyn Store>, Arc<Node>, String) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("a.db"))).unwrap());
    let node = Node::new(
        store.clone(),
        NodeIdentity { cluster: "test".into(), region: "local".into(), node: "n1".into() },
    );
    let root = node.operator_init(ctx(None), 1, 1).await.result.unwrap().root_token.token.to_string();
    (dir, store, node, root)
}

/// Reads the published log through the node's serving functions.
struct NodeLog<'a>(&'a Node);

impl LogReader for NodeLog<'_> {
    fn checkpoint(&mut self) -> Result<String, String> {
        self.0.audit_checkpoint().map_err(|e| e.to_string())?.ok_or_else(|| "no checkpoint".into())
    }
    fn tile(&mut self, level: u32, index: u64, width: u64) -> Result<Option<Vec<u8>>, String> {
        self.0.audit_tile(level, index, width).map_err(|e| e.to_string())
    }
    fn entries(&mut self, index: u64, width: u64) -> Result<Option<Vec<u8>>, String> {
        self.0.audit_entries(index, width).map_err(|e| e.to_string())
    }
}

fn verify(
    node: &Node,
    seen: Option<Seen>,
) -> Result<arca_audit::verify::Report, arca_audit::verify::VerifyError> {
    let verifier = NoteVerifier::parse(&node.audit_vkey().unwrap().unwrap()).unwrap();
    verify_log(
        &mut NodeLog(node),
        &verifier,
        seen,
        &mut |_, e| Event::decode(e).map(drop).map_err(|e| e.to_string()),
        &mut |_, _| {},
    )
}

fn drain(node: &Arc<Node>, holder: &str, config: &SequencerConfig) -> u64 {
    let mut batches = 0;
    while sequencer::integrate(node, holder, config).unwrap().is_some() {
        batches += 1;
    }
    batches
}

async fn requests(node: &Arc<Node>, root: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let node = node.clone();
            let root = root.to_owned();
            tokio::spawn(async move {
                let data = [("v", i.to_string())].into_iter().collect::<SecretData>();
                let audited = node
                    .kv_write(ctx(Some(&root)), "secret".into(), format!("s/{}", i % 7), data, None)
                    .await;
                audited.result.unwrap();
                audited.request_id
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids
}

#[tokio::test]
async fn the_signed_log_covers_every_request_and_verifies() {
    let (_dir, node, root) = node().await;
    let config = SequencerConfig { max_batch: 100, ..SequencerConfig::default() };
    let ids = requests(&node, &root, 700).await;
    let batches = drain(&node, "a", &config);
    assert!(batches >= 7, "at most 100 entries per checkpoint: {batches} batches");
    let report = verify(&node, None).unwrap();
    // init + 700 writes.
    assert_eq!(report.entries, 701);
    assert_eq!(report.tiles, 4, "three entry-level tiles and one above");

    // Every request id is in the log, with a proof against the signed checkpoint.
    let verifier = NoteVerifier::parse(&node.audit_vkey().unwrap().unwrap()).unwrap();
    for id in ids.iter().step_by(97) {
        let proof = node.audit_inclusion_proof(LeafRef::RequestId(id.clone())).unwrap();
        let cp = checkpoint::open(&proof.checkpoint, &verifier).unwrap();
        verify_inclusion(proof.index, cp.size(), &leaf_hash(&proof.entry), &proof.hashes, cp.root()).unwrap();
        assert_eq!(&Event::decode(&proof.entry).unwrap().request_id, id);
    }
    let first = node.audit_inclusion_proof(LeafRef::Index(0)).unwrap();
    assert_eq!(Event::decode(&first.entry).unwrap().operation, arca_audit::Operation::Init);

    // Growth is consistent with the earlier checkpoint.
    let old = checkpoint::open(&node.audit_checkpoint().unwrap().unwrap(), &verifier).unwrap();
    requests(&node, &root, 50).await;
    drain(&node, "a", &config);
    let new = checkpoint::open(&node.audit_checkpoint().unwrap().unwrap(), &verifier).unwrap();
    assert_eq!(new.size(), 751);
    let proof = node.audit_consistency_proof(old.size(), None).unwrap();
    verify_consistency(old.size(), new.size(), old.root(), new.root(), &proof.hashes).unwrap();
    verify(&node, Some(Seen { size: old.size(), root: *old.root() })).unwrap();
}

#[tokio::test]
async fn positions_from_replies_resolve_to_their_leaf() {
    let (_dir, node, root) = node().await;
    let mut positions = Vec::new();
    for i in 0..5 {
        let data = [("v", i.to_string())].into_iter().collect::<SecretData>();
        let audited = node.kv_write(ctx(Some(&root)), "secret".into(), "p".into(), data, None).await;
        positions.push(audited.position.unwrap());
    }
    let pending = node.audit_inclusion_proof(LeafRef::Position(positions[0]));
    assert!(pending.is_err(), "not yet sequenced");
    drain(&node, "a", &SequencerConfig { max_batch: 2, ..SequencerConfig::default() });
    for (i, position) in positions.iter().enumerate() {
        let proof = node.audit_inclusion_proof(LeafRef::Position(*position)).unwrap();
        assert_eq!(proof.index, i as u64 + 1, "init is leaf 0");
    }
}

#[tokio::test]
async fn only_the_lease_holder_sequences() {
    let (_dir, node, root) = node().await;
    let config = SequencerConfig::default();
    requests(&node, &root, 10).await;
    assert!(sequencer::integrate(&node, "a", &config).unwrap().is_some());
    requests(&node, &root, 10).await;
    assert!(sequencer::integrate(&node, "b", &config).unwrap().is_none(), "b must wait for a's lease");
    assert_eq!(sequencer::integrate(&node, "a", &config).unwrap().unwrap().count, 10);
    // An expired lease passes to another holder, which continues without gap or duplicate.
    let short = SequencerConfig { lease_ttl: std::time::Duration::ZERO, ..SequencerConfig::default() };
    sequencer::integrate(&node, "a", &short).unwrap();
    requests(&node, &root, 10).await;
    let taken = sequencer::integrate(&node, "b", &config).unwrap().unwrap();
    assert_eq!((taken.first_index, taken.count), (21, 10));
    assert_eq!(verify(&node, None).unwrap().entries, 31);
}

/// A step is computed from a snapshot and committed later: if the log moved on meanwhile (the
/// same holder or another leader committed a step), the stale step must commit nothing, or
/// its older state would rewind the log and its entries would be integrated twice.
#[tokio::test]
async fn a_step_computed_from_a_state_that_moved_on_commits_nothing() {
    let (_dir, node, root) = node().await;
    let config = SequencerConfig::default();
    let ttl_ms = config.lease_ttl.as_millis() as u64;
    requests(&node, &root, 5).await;
    let stale = sequencer::prepare(&node, "a", &config).unwrap().expect("entries to integrate");
    requests(&node, &root, 3).await;
    let done = sequencer::integrate(&node, "a", &config).unwrap().expect("a step");
    assert_eq!((done.first_index, done.size), (0, done.count), "one step took every entry");
    assert_eq!(sequencer::apply(&node, "a", ttl_ms, stale).unwrap(), None, "the stale step committed");
    assert!(sequencer::integrate(&node, "a", &config).unwrap().is_none(), "entries left to integrate twice");
    assert_eq!(verify(&node, None).unwrap().entries, done.size);
    // A fresh step goes on from the committed state.
    requests(&node, &root, 2).await;
    let next = sequencer::integrate(&node, "a", &config).unwrap().expect("a step");
    assert_eq!((next.first_index, next.count), (done.size, 2));
    assert_eq!(verify(&node, None).unwrap().entries, done.size + 2);
}

#[tokio::test]
async fn a_sealed_node_does_not_sequence() {
    let (_dir, node, root) = node().await;
    requests(&node, &root, 3).await;
    node.barrier().seal();
    assert!(sequencer::integrate(&node, "a", &SequencerConfig::default()).unwrap().is_none());
}

#[test]
fn under_load_the_sequencer_steps_eight_times_as_often_and_a_full_step_goes_again_at_once() {
    use std::time::Duration;
    let config =
        SequencerConfig { interval: Duration::from_millis(100), max_batch: 1000, ..Default::default() };
    let step = |count| sequencer::Integrated { first_index: 0, count, size: count, delay_ms: (0, 0) };
    assert_eq!(sequencer::next_pause(None, &config), Some(Duration::from_millis(100)));
    assert_eq!(sequencer::next_pause(Some(&step(1)), &config), Some(Duration::from_micros(12_500)));
    assert_eq!(sequencer::next_pause(Some(&step(999)), &config), Some(Duration::from_micros(12_500)));
    assert_eq!(sequencer::next_pause(Some(&step(1000)), &config), None);
    let fast = SequencerConfig { interval: Duration::from_millis(4), ..config };
    assert_eq!(sequencer::next_pause(Some(&step(1)), &fast), Some(Duration::from_millis(1)));
}

#[tokio::test]
async fn request_ids_resolve_from_their_pages_and_from_the_per_entry_index() {
    use arca_node::keys;
    use arca_store::{RangeOptions, StoreExt, prefix_end};
    let (_dir, store, node, root) = node_and_store().await;
    // An id that is not 16 bytes of hex goes to the per-entry index.
    let mut odd = ctx(Some(&root));
    odd.request_id = "client-chosen-id".into();
    let data = [("v", "1".to_owned())].into_iter().collect::<SecretData>();
    node.kv_write(odd, "secret".into(), "odd".into(), data, None).await.result.unwrap();
    let ids = requests(&node, &root, 40).await;
    drain(&node, "a", &SequencerConfig { max_batch: 16, ..SequencerConfig::default() });

    let read_all = |prefix: Vec<u8>| {
        let end = prefix_end(&prefix).unwrap();
        store.transact(|tx| tx.get_range(&prefix, &end, RangeOptions::default())).unwrap().value
    };
    let pairs: usize = read_all(keys::audit_rid_pages("local"))
        .iter()
        .map(|page| {
            assert_eq!(page.value.len() % sequencer::RID_PAIR, 0);
            page.value.len() / sequencer::RID_PAIR
        })
        .sum();
    assert_eq!(pairs, 41, "init and 40 writes, in pages");
    assert_eq!(read_all(keys::audit_rid_prefix("local")).len(), 1, "only the odd id has its own key");

    let verifier = NoteVerifier::parse(&node.audit_vkey().unwrap().unwrap()).unwrap();
    for id in ids.iter().map(String::as_str).chain(["client-chosen-id"]) {
        let proof = node.audit_inclusion_proof(LeafRef::RequestId(id.to_owned())).unwrap();
        let cp = checkpoint::open(&proof.checkpoint, &verifier).unwrap();
        verify_inclusion(proof.index, cp.size(), &leaf_hash(&proof.entry), &proof.hashes, cp.root()).unwrap();
        assert_eq!(Event::decode(&proof.entry).unwrap().request_id, id);
    }
    // An id indexed the way earlier releases did (a key per entry) still resolves.
    let legacy = "0000000000000000000000000000abcd";
    store.transact(|tx| tx.set(&keys::audit_rid("local", legacy), &3u64.to_be_bytes())).unwrap();
    assert_eq!(node.audit_inclusion_proof(LeafRef::RequestId(legacy.into())).unwrap().index, 3);
    // An id in a bucket with pages, but not among them, is not found.
    let mut near = ids[0].clone();
    near.replace_range(31.., if ids[0].ends_with('0') { "1" } else { "0" });
    assert!(!ids.contains(&near));
    let err = node.audit_inclusion_proof(LeafRef::RequestId(near)).unwrap_err();
    assert!(err.to_string().contains("no sequenced audit event"), "{err}");
}

#[test]
fn a_request_id_is_paged_by_its_leading_milliseconds() {
    let id = "0193a1b2c3d4e5f60718293a4b5c6d7e";
    let rid = sequencer::rid_bytes(id).unwrap();
    assert_eq!(sequencer::rid_bucket(&rid), 0x0193_a1b2_c3d4 / sequencer::RID_BUCKET_MS);
    assert_eq!(sequencer::rid_bytes(&id.to_uppercase()), Some(rid));
    for odd in ["", &id[..30], &format!("{id}00"), "zz93a1b2c3d4e5f60718293a4b5c6d7e", "client-chosen-id"] {
        assert_eq!(sequencer::rid_bytes(odd), None, "{odd}");
    }
}
