//! The node in process, on a real SQLite store: secrets, identities, policies, and the
//! audit-first request path (one durable event per request, fail closed).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arca_audit::{Event, Operation, Outcome, Source};
use arca_node::auth::{CreateTokenRequest, WriteRoleRequest};
use arca_node::error::ApiError;
use arca_node::keys;
use arca_node::kv::{Metadata, MetadataUpdate, SecretData};
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_store::{
    CommitInfo, KeyValue, RangeOptions, SqliteConfig, SqliteStore, Store, StoreError, StoreExt, Transaction,
    prefix_end,
};
use zeroize::Zeroizing;

const SECRET_VALUE: &str = "correct-horse-battery-staple-7f3a";

struct Harness {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    store: Arc<FaultyStore>,
    node: Arc<Node>,
    root: String,
    /// The one unseal share (1 of 1), for a second node on the same store.
    share: Zeroizing<String>,
}

/// A real SQLite store whose commits can be made to fail: the fault injector for the
/// fail-closed test.
#[derive(Debug)]
struct FaultyStore {
    inner: SqliteStore,
    fail_commits: AtomicBool,
}

struct FaultyTxn<'a> {
    inner: Box<dyn Transaction + 'a>,
    fail: &'a AtomicBool,
}

impl Transaction for FaultyTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_snapshot(key)
    }
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.get_range(begin, end, opts)
    }
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(key, value)
    }
    fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.inner.clear(key)
    }
    fn replace(&mut self, old: &[u8], new: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.inner.replace(old, new, value)
    }
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.inner.clear_range(begin, end)
    }
    fn set_versionstamped_key(
        &mut self,
        prefix: &[u8],
        suffix: &[u8],
        value: &[u8],
    ) -> Result<u16, StoreError> {
        self.inner.set_versionstamped_key(prefix, suffix, value)
    }
    fn maybe_committed(&self) -> bool {
        self.inner.maybe_committed()
    }
    fn commit(&mut self) -> Result<CommitInfo, StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                context: "injected: the disk is gone",
                source: std::io::Error::other("injected fault"),
            });
        }
        self.inner.commit()
    }
    fn on_error(&mut self, err: &StoreError) -> Result<(), StoreError> {
        self.inner.on_error(err)
    }
}

impl Store for FaultyStore {
    fn engine(&self) -> &'static str {
        "sqlite-faulty"
    }
    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        Ok(Box::new(FaultyTxn { inner: self.inner.begin()?, fail: &self.fail_commits }))
    }
    fn upkeep(&self) {
        self.inner.upkeep()
    }
}

fn ctx(token: Option<&str>) -> RequestContext {
    RequestContext::new(
        token.map(|t| Zeroizing::new(t.to_owned())),
        Source { address: "127.0.0.1:40000".into(), proxy: None },
    )
}

fn identity() -> NodeIdentity {
    NodeIdentity { cluster: "test".into(), region: "local".into(), node: "node-a".into() }
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("arca.db");
    let store = Arc::new(FaultyStore {
        inner: SqliteStore::open(SqliteConfig::new(&db)).unwrap(),
        fail_commits: AtomicBool::new(false),
    });
    let node = Node::new(store.clone(), identity());
    let init = node.operator_init(ctx(None), 1, 1).await.result.unwrap();
    let root = init.root_token.token.to_string();
    let share = init.shares[0].clone();
    Harness { _dir: dir, db, store, node, root, share }
}

/// The keys of every row under `prefix`.
fn row_keys(store: &dyn Store, prefix: &[u8]) -> Vec<Vec<u8>> {
    let rows = store
        .transact(|tx| tx.get_range(prefix, &prefix_end(prefix).unwrap(), RangeOptions::default()))
        .unwrap()
        .value;
    rows.into_iter().map(|kv| kv.key).collect()
}

/// The prefix of a secret's rows at their versions' own keys (version 0 packs as one byte).
fn version_prefix(mount: &str, path: &str) -> Vec<u8> {
    let key = keys::kv_version(mount, path, 0);
    key[..key.len() - 1].to_vec()
}

fn data(pairs: &[(&str, &str)]) -> SecretData {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Gives the node a clock the test moves (from 2026-11-26 00:00 UTC).
fn injected_clock(h: &Harness) -> Arc<std::sync::atomic::AtomicU64> {
    let clock = Arc::new(std::sync::atomic::AtomicU64::new(1_795_651_200_000));
    let c = clock.clone();
    h.node.set_clock(Arc::new(move || c.load(std::sync::atomic::Ordering::SeqCst)));
    clock
}

fn audit_events(store: &dyn Store) -> Vec<Event> {
    let prefix = keys::audit_events("local");
    let rows = store
        .transact(|tx| tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default()))
        .unwrap()
        .value;
    rows.iter().map(|kv| Event::decode(&kv.value).unwrap()).collect()
}

#[tokio::test]
async fn versions_round_trip_with_kv_v2_semantics() {
    let h = harness().await;
    let n = &h.node;
    let put = |v: &str| {
        n.kv_write(ctx(Some(&h.root)), "secret".into(), "app/db".into(), data(&[("password", v)]), None)
    };
    assert_eq!(put("one").await.result.unwrap(), 1);
    assert_eq!(put("two").await.result.unwrap(), 2);

    let latest = n.kv_read(ctx(Some(&h.root)), "secret".into(), "app/db".into(), None).await;
    assert!(latest.position.is_some(), "the reply carries the audit position");
    let latest = latest.result.unwrap();
    assert_eq!((latest.version, latest.data.text("password").unwrap()), (2, "two"));
    let first =
        n.kv_read(ctx(Some(&h.root)), "secret".into(), "app/db".into(), Some(1)).await.result.unwrap();
    assert_eq!(first.data.0["password"], "one");

    // Check-and-set.
    let stale = n
        .kv_write(ctx(Some(&h.root)), "secret".into(), "app/db".into(), data(&[("password", "x")]), Some(1))
        .await;
    assert!(matches!(stale.result, Err(ApiError::FailedPrecondition(_))));
    let fresh =
        n.kv_write(ctx(Some(&h.root)), "secret".into(), "app/new".into(), data(&[("a", "b")]), Some(0)).await;
    assert_eq!(fresh.result.unwrap(), 1);

    // Patch keeps other keys.
    let patched = n
        .kv_patch(
            ctx(Some(&h.root)),
            "secret".into(),
            "app/db".into(),
            data(&[("user", "svc")]),
            vec![],
            None,
        )
        .await
        .result
        .unwrap();
    assert_eq!(patched, 3);
    let v3 = n.kv_read(ctx(Some(&h.root)), "secret".into(), "app/db".into(), None).await.result.unwrap();
    assert_eq!(v3.data.0, BTreeMap::from([("password".into(), "two".into()), ("user".into(), "svc".into())]));

    // List.
    n.kv_write(ctx(Some(&h.root)), "secret".into(), "app/nested/deep".into(), data(&[("k", "v")]), None)
        .await
        .result
        .unwrap();
    let top = n.kv_list(ctx(Some(&h.root)), "secret".into(), "".into()).await.result.unwrap();
    assert_eq!(top, vec!["app/".to_string()]);
    let app = n.kv_list(ctx(Some(&h.root)), "secret".into(), "app/".into()).await.result.unwrap();
    assert_eq!(app, vec!["db".to_string(), "nested/".into(), "new".into()]);

    // Soft delete, undelete, destroy.
    let deleted =
        n.kv_delete(ctx(Some(&h.root)), "secret".into(), "app/db".into(), vec![]).await.result.unwrap();
    assert_eq!(deleted, vec![3]);
    let gone = n.kv_read(ctx(Some(&h.root)), "secret".into(), "app/db".into(), None).await.result;
    assert!(matches!(gone, Err(ApiError::NotFound(_))));
    n.kv_undelete(ctx(Some(&h.root)), "secret".into(), "app/db".into(), vec![3]).await.result.unwrap();
    assert!(n.kv_read(ctx(Some(&h.root)), "secret".into(), "app/db".into(), None).await.result.is_ok());
    n.kv_destroy(ctx(Some(&h.root)), "secret".into(), "app/db".into(), vec![1]).await.result.unwrap();
    let destroyed = n.kv_read(ctx(Some(&h.root)), "secret".into(), "app/db".into(), Some(1)).await.result;
    assert!(matches!(destroyed, Err(ApiError::NotFound(_))));
    let undestroy =
        n.kv_undelete(ctx(Some(&h.root)), "secret".into(), "app/db".into(), vec![1]).await.result.unwrap();
    assert!(undestroy.is_empty(), "a destroyed version cannot be undeleted");

    // Metadata: max versions prunes, custom metadata is kept.
    let meta = n
        .kv_write_metadata(
            ctx(Some(&h.root)),
            "secret".into(),
            "app/db".into(),
            MetadataUpdate {
                max_versions: Some(2),
                cas_required: None,
                custom_metadata: Some(BTreeMap::from([("owner".into(), "team-a".into())])),
                delete_version_after_secs: None,
            },
        )
        .await
        .result
        .unwrap();
    assert_eq!(meta.versions.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(meta.custom_metadata["owner"], "team-a");
    n.kv_delete_metadata(ctx(Some(&h.root)), "secret".into(), "app/db".into()).await.result.unwrap();
    assert!(matches!(
        n.kv_read_metadata(ctx(Some(&h.root)), "secret".into(), "app/db".into()).await.result,
        Err(ApiError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_write_past_max_versions_takes_the_oldest_versions_place_and_each_version_keeps_its_own_data() {
    let h = harness().await;
    let n = &h.node;
    let (mount, path) = ("secret", "app/pruned");
    let put = |v: String| n.kv_write(ctx(Some(&h.root)), mount.into(), path.into(), data(&[("v", &v)]), None);
    put("1".into()).await.result.unwrap();
    let update = MetadataUpdate { max_versions: Some(3), ..Default::default() };
    n.kv_write_metadata(ctx(Some(&h.root)), mount.into(), path.into(), update).await.result.unwrap();
    let rows = || row_keys(&*h.store, &keys::kv_slots(mount, path));
    let mut first_three = Vec::new();
    for v in 2..=7 {
        assert_eq!(put(v.to_string()).await.result.unwrap(), v);
        if v == 3 {
            first_three = rows();
        }
        // Past the maximum, each write takes the pruned version's row, under its key: the
        // secret's rows keep their keys.
        if v > 3 {
            assert_eq!(rows(), first_three, "version {v} moved a row");
        }
    }
    // In the store: three rows, none at a version's own key (the layout before slots), each
    // readable as its own version (each is encrypted for its version's own key, so a row
    // holding another version's value would not decrypt).
    assert_eq!(first_three.len(), 3, "{} version rows stored", first_three.len());
    assert_eq!(row_keys(&*h.store, &version_prefix(mount, path)), Vec::<Vec<u8>>::new());
    for v in 1..=7u64 {
        let read = n.kv_read(ctx(Some(&h.root)), mount.into(), path.into(), Some(v)).await.result;
        match read {
            Ok(s) if v >= 5 => assert_eq!(s.data.0["v"], v.to_string()),
            Err(ApiError::NotFound(_)) if v < 5 => {}
            other => panic!("version {v}: {other:?}"),
        }
    }
    let meta = n.kv_read_metadata(ctx(Some(&h.root)), mount.into(), path.into()).await.result.unwrap();
    assert_eq!(meta.versions.keys().copied().collect::<Vec<_>>(), vec![5, 6, 7]);
}

#[tokio::test]
async fn policies_deny_by_default_and_tokens_carry_them() {
    let h = harness().await;
    let n = &h.node;
    n.kv_write(ctx(Some(&h.root)), "secret".into(), "app/db".into(), data(&[("p", "1")]), None)
        .await
        .result
        .unwrap();
    n.kv_write(ctx(Some(&h.root)), "secret".into(), "ops/key".into(), data(&[("p", "2")]), None)
        .await
        .result
        .unwrap();
    n.policy_write(
        ctx(Some(&h.root)),
        "app-read".into(),
        r#"path "secret/data/app/*" { capabilities = ["read"] }"#.into(),
    )
    .await
    .result
    .unwrap();
    let app = n
        .token_create(
            ctx(Some(&h.root)),
            CreateTokenRequest { policies: vec!["app-read".into()], ..Default::default() },
        )
        .await
        .result
        .unwrap();
    let token = app.token.to_string();
    assert!(n.kv_read(ctx(Some(&token)), "secret".into(), "app/db".into(), None).await.result.is_ok());
    let denied = n.kv_read(ctx(Some(&token)), "secret".into(), "ops/key".into(), None).await;
    assert!(matches!(denied.result, Err(ApiError::PermissionDenied)));
    assert!(denied.position.is_some(), "denials are audited too");
    let write =
        n.kv_write(ctx(Some(&token)), "secret".into(), "app/db".into(), data(&[("p", "x")]), None).await;
    assert!(matches!(write.result, Err(ApiError::PermissionDenied)));
    // A child cannot have policies its parent lacks.
    let escalate = n
        .token_create(
            ctx(Some(&token)),
            CreateTokenRequest { policies: vec!["root".into()], ..Default::default() },
        )
        .await;
    assert!(matches!(escalate.result, Err(ApiError::PermissionDenied)));
    // Garbage tokens are denials.
    let bad = n.kv_read(ctx(Some("arca_not-a-token")), "secret".into(), "app/db".into(), None).await;
    assert!(matches!(bad.result, Err(ApiError::Unauthenticated)));

    // Revoking the parent revokes the child.
    let parent = n.token_create(ctx(Some(&h.root)), CreateTokenRequest::default()).await.result.unwrap();
    let child = n.token_create(ctx(Some(&parent.token)), CreateTokenRequest::default()).await.result.unwrap();
    assert!(n.token_lookup(ctx(Some(&child.token)), None).await.result.is_ok());
    assert_eq!(n.token_revoke(ctx(Some(&parent.token)), None).await.result.unwrap(), 2);
    assert!(matches!(
        n.token_lookup(ctx(Some(&child.token)), None).await.result,
        Err(ApiError::Unauthenticated)
    ));
}

#[tokio::test]
async fn approle_login_issues_a_token_with_the_role_policies() {
    let h = harness().await;
    let n = &h.node;
    n.policy_write(
        ctx(Some(&h.root)),
        "billing".into(),
        r#"path "secret/data/billing/*" { capabilities = ["read", "create", "update"] }"#.into(),
    )
    .await
    .result
    .unwrap();
    let role = n
        .approle_write(
            ctx(Some(&h.root)),
            WriteRoleRequest {
                name: "billing".into(),
                policies: vec!["billing".into()],
                ..Default::default()
            },
        )
        .await
        .result
        .unwrap();
    let secret_id = n.approle_secret_id(ctx(Some(&h.root)), "billing".into()).await.result.unwrap();
    let login = n
        .approle_login(ctx(None), Zeroizing::new(role.role_id.clone()), secret_id.secret_id.clone())
        .await
        .result
        .unwrap();
    assert_eq!(login.record.entity, "approle:billing");
    let token = login.token.to_string();
    assert!(
        n.kv_write(ctx(Some(&token)), "secret".into(), "billing/api".into(), data(&[("k", "v")]), None)
            .await
            .result
            .is_ok()
    );
    assert!(matches!(
        n.kv_write(ctx(Some(&token)), "secret".into(), "other".into(), data(&[("k", "v")]), None)
            .await
            .result,
        Err(ApiError::PermissionDenied)
    ));
    let wrong =
        n.approle_login(ctx(None), Zeroizing::new(role.role_id), Zeroizing::new("arca_wrong".into())).await;
    assert!(matches!(wrong.result, Err(ApiError::Unauthenticated)));
}

#[tokio::test]
async fn every_request_has_exactly_one_durable_event_without_secrets() {
    let h = harness().await;
    let n = &h.node;
    let mut positions = Vec::new();
    let put =
        n.kv_write(ctx(Some(&h.root)), "secret".into(), "a".into(), data(&[("v", SECRET_VALUE)]), None).await;
    positions.push(put.position.unwrap());
    let read = n.kv_read(ctx(Some(&h.root)), "secret".into(), "a".into(), None).await;
    assert_eq!(read.result.as_ref().unwrap().data.0["v"], SECRET_VALUE);
    positions.push(read.position.unwrap());
    let denied = n.kv_read(ctx(None), "secret".into(), "a".into(), None).await;
    positions.push(denied.position.unwrap());
    let invalid = n.kv_read(ctx(Some(&h.root)), "secret".into(), "../etc".into(), None).await;
    assert!(matches!(invalid.result, Err(ApiError::InvalidArgument(_))));
    positions.push(invalid.position.unwrap());

    let events = audit_events(h.store.as_ref());
    // init + the four requests above.
    assert_eq!(events.len(), 5);
    assert_eq!(events[0].operation, Operation::Init);
    let outcomes: Vec<_> = events[1..].iter().map(|e| (e.operation, e.outcome.clone())).collect();
    assert_eq!(
        outcomes,
        vec![
            (Operation::KvWrite, Outcome::Ok),
            (Operation::KvRead, Outcome::Ok),
            (Operation::KvRead, Outcome::Denied),
            (Operation::KvRead, Outcome::Error { code: "invalid_argument".into() }),
        ]
    );
    assert_eq!(events[2].secret_version, Some(1));
    assert_eq!(events[2].actor.entity, "root");
    assert_eq!(events[3].actor.entity, "anonymous");
    for pair in positions.windows(2) {
        assert!(pair[0] < pair[1], "positions follow request order");
    }
    // No event carries the value or the token.
    let prefix = keys::audit_events("local");
    let raw = h
        .store
        .transact(|tx| tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default()))
        .unwrap()
        .value;
    for kv in raw {
        let text = String::from_utf8_lossy(&kv.value);
        assert!(!text.contains(SECRET_VALUE) && !text.contains(&h.root), "an event leaked a secret");
    }
    // The database file holds ciphertext only.
    drop(h.node);
    let bytes = std::fs::read(&h.db).unwrap();
    let wal = std::fs::read(h.db.with_extension("db-wal")).unwrap_or_default();
    for file in [&bytes, &wal] {
        assert!(
            !file.windows(SECRET_VALUE.len()).any(|w| w == SECRET_VALUE.as_bytes()),
            "plaintext in the store file"
        );
        assert!(!file.windows(h.root.len()).any(|w| w == h.root.as_bytes()), "a token in the store file");
    }
}

#[tokio::test]
async fn a_failing_store_fails_requests_closed() {
    let h = harness().await;
    let n = &h.node;
    n.kv_write(ctx(Some(&h.root)), "secret".into(), "a".into(), data(&[("v", SECRET_VALUE)]), None)
        .await
        .result
        .unwrap();
    let before = audit_events(h.store.as_ref()).len();
    h.store.fail_commits.store(true, Ordering::SeqCst);
    let read = n.kv_read(ctx(Some(&h.root)), "secret".into(), "a".into(), None).await;
    assert!(matches!(read.result, Err(ApiError::Unavailable)), "{:?}", read.result.map(|_| ()));
    assert!(read.position.is_none());
    let write =
        n.kv_write(ctx(Some(&h.root)), "secret".into(), "a".into(), data(&[("v", "new")]), None).await;
    assert!(write.result.is_err());
    h.store.fail_commits.store(false, Ordering::SeqCst);
    assert_eq!(audit_events(h.store.as_ref()).len(), before, "nothing was committed while failing");
    let after = n.kv_read(ctx(Some(&h.root)), "secret".into(), "a".into(), None).await.result.unwrap();
    assert_eq!(
        (after.version, after.data.text("v").unwrap()),
        (1, SECRET_VALUE),
        "the failed write changed nothing"
    );
}

#[tokio::test]
async fn ciphertexts_cannot_be_moved_between_versions() {
    let h = harness().await;
    let n = &h.node;
    n.kv_write(ctx(Some(&h.root)), "secret".into(), "a".into(), data(&[("v", "one")]), None)
        .await
        .result
        .unwrap();
    n.kv_write(ctx(Some(&h.root)), "secret".into(), "a".into(), data(&[("v", "two")]), None)
        .await
        .result
        .unwrap();
    // Each version's row is where its metadata says (its slot).
    let meta = n.kv_read_metadata(ctx(Some(&h.root)), "secret".into(), "a".into()).await.result.unwrap();
    let row = |v: u64| meta.versions[&v].data_key("secret", "a", v);
    assert_ne!(row(1), row(2));
    h.store
        .transact(|tx| {
            let v1 = tx.get(&row(1))?.unwrap();
            tx.set(&row(2), &v1)
        })
        .unwrap();
    let swapped = n.kv_read(ctx(Some(&h.root)), "secret".into(), "a".into(), Some(2)).await.result;
    assert!(matches!(swapped, Err(ApiError::Internal)), "a moved ciphertext must not decrypt");
    // The row version 1 still holds is its own, and reads.
    let one = n.kv_read(ctx(Some(&h.root)), "secret".into(), "a".into(), Some(1)).await.result.unwrap();
    assert_eq!(one.data.0["v"], "one");
}

#[tokio::test]
async fn rows_written_before_slots_stay_readable_and_move_into_slots_as_they_are_pruned() {
    let h = harness().await;
    let n = &h.node;
    let (mount, path) = ("secret", "app/legacy");
    let update = MetadataUpdate { max_versions: Some(3), ..Default::default() };
    n.kv_write_metadata(ctx(Some(&h.root)), mount.into(), path.into(), update).await.result.unwrap();
    for v in 1..=3 {
        n.kv_write(ctx(Some(&h.root)), mount.into(), path.into(), data(&[("v", &v.to_string())]), None)
            .await
            .result
            .unwrap();
    }
    // Put the secret back in the layout before slots: each version's row at its own key,
    // bound to it, and no slot in its metadata.
    n.execute(ctx(Some(&h.root)), Operation::KvWrite, "test/legacy".into(), move |env| {
        let mut meta: Metadata = env.get_json(&keys::kv_meta(mount, path))?.unwrap();
        for (v, state) in &mut meta.versions {
            let own = keys::kv_version(mount, path, *v);
            let plain = env.get_sealed_as(&state.data_key(mount, path, *v), &own)?.unwrap();
            env.tx.clear(&state.data_key(mount, path, *v))?;
            env.put_sealed(&own, &plain)?;
            state.slot = None;
        }
        env.put_json(&keys::kv_meta(mount, path), &meta)
    })
    .await
    .result
    .unwrap();
    assert_eq!(row_keys(&*h.store, &version_prefix(mount, path)).len(), 3);
    assert_eq!(row_keys(&*h.store, &keys::kv_slots(mount, path)).len(), 0);

    let read = |v: u64| n.kv_read(ctx(Some(&h.root)), mount.into(), path.into(), Some(v));
    for v in 1..=3u64 {
        assert_eq!(read(v).await.result.unwrap().data.0["v"], v.to_string());
    }
    // A patch reads the current version from its old row; each new version prunes the
    // oldest old row and takes a slot.
    let patched = n
        .kv_patch(ctx(Some(&h.root)), mount.into(), path.into(), data(&[("w", "4")]), vec![], None)
        .await
        .result
        .unwrap();
    assert_eq!(patched, 4);
    let four = read(4).await.result.unwrap();
    assert_eq!((four.data.text("v").unwrap(), four.data.text("w").unwrap()), ("3", "4"));
    assert_eq!(row_keys(&*h.store, &version_prefix(mount, path)).len(), 2);
    assert_eq!(row_keys(&*h.store, &keys::kv_slots(mount, path)).len(), 1);
    for v in 5..=6 {
        n.kv_write(ctx(Some(&h.root)), mount.into(), path.into(), data(&[("v", &v.to_string())]), None)
            .await
            .result
            .unwrap();
    }
    assert_eq!(row_keys(&*h.store, &version_prefix(mount, path)), Vec::<Vec<u8>>::new());
    let slots = row_keys(&*h.store, &keys::kv_slots(mount, path));
    assert_eq!(slots.len(), 3);
    let meta = n.kv_read_metadata(ctx(Some(&h.root)), mount.into(), path.into()).await.result.unwrap();
    let taken: Vec<_> = meta.versions.iter().map(|(v, s)| (*v, s.slot)).collect();
    assert_eq!(taken, vec![(4, Some(0)), (5, Some(1)), (6, Some(2))]);
    assert!(matches!(read(3).await.result, Err(ApiError::NotFound(_))));
    for v in 5..=6u64 {
        assert_eq!(read(v).await.result.unwrap().data.0["v"], v.to_string());
    }
    // Destroying a version clears its slot's row; the next write takes the pruned slot.
    n.kv_destroy(ctx(Some(&h.root)), mount.into(), path.into(), vec![5]).await.result.unwrap();
    assert_eq!(row_keys(&*h.store, &keys::kv_slots(mount, path)).len(), 2);
    n.kv_write(ctx(Some(&h.root)), mount.into(), path.into(), data(&[("v", "7")]), None)
        .await
        .result
        .unwrap();
    let meta = n.kv_read_metadata(ctx(Some(&h.root)), mount.into(), path.into()).await.result.unwrap();
    let taken: Vec<_> = meta.versions.iter().map(|(v, s)| (*v, s.slot)).collect();
    assert_eq!(taken, vec![(5, Some(1)), (6, Some(2)), (7, Some(0))]);
    assert_eq!(read(7).await.result.unwrap().data.0["v"], "7");
    // Deleting the secret clears every row.
    n.kv_delete_metadata(ctx(Some(&h.root)), mount.into(), path.into()).await.result.unwrap();
    assert_eq!(row_keys(&*h.store, &keys::kv_slots(mount, path)), Vec::<Vec<u8>>::new());
}

#[tokio::test]
async fn kv_metadata_kept_decoded_after_a_write_is_never_served_stale() {
    // A write keeps its secret's decoded metadata for the next request, keyed by the new
    // ciphertext. A write whose commit failed, and a write by another node on the same
    // store, must both be seen as the store has them.
    let h = harness().await;
    let write = |node: Arc<Node>, cas: Option<u64>| {
        let root = h.root.clone();
        async move {
            node.kv_write(ctx(Some(&root)), "secret".into(), "a".into(), data(&[("v", "x")]), cas)
                .await
                .result
        }
    };
    let current = |node: Arc<Node>| {
        let root = h.root.clone();
        async move {
            let meta =
                node.kv_read_metadata(ctx(Some(&root)), "secret".into(), "a".into()).await.result.unwrap();
            (meta.current_version, meta.versions.keys().copied().collect::<Vec<_>>())
        }
    };
    assert_eq!(write(h.node.clone(), None).await.unwrap(), 1);
    h.store.fail_commits.store(true, Ordering::SeqCst);
    assert!(matches!(write(h.node.clone(), None).await, Err(ApiError::Unavailable)));
    h.store.fail_commits.store(false, Ordering::SeqCst);
    assert_eq!(current(h.node.clone()).await, (1, vec![1]));
    assert!(matches!(write(h.node.clone(), Some(2)).await, Err(ApiError::FailedPrecondition(_))));
    assert_eq!(write(h.node.clone(), Some(1)).await.unwrap(), 2);

    // A second node (its own connections to the same file) writes version 3.
    let other_store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(&h.db)).unwrap());
    let other = Node::new(other_store, identity());
    assert!(!other.operator_unseal(ctx(None), h.share.clone()).await.result.unwrap().sealed);
    assert_eq!(current(other.clone()).await, (2, vec![1, 2]));
    assert_eq!(write(other.clone(), Some(2)).await.unwrap(), 3);
    assert_eq!(current(h.node.clone()).await, (3, vec![1, 2, 3]));
    assert!(matches!(write(h.node.clone(), Some(2)).await, Err(ApiError::FailedPrecondition(_))));
    assert_eq!(write(h.node.clone(), Some(3)).await.unwrap(), 4);
    assert_eq!(current(other).await, (4, vec![1, 2, 3, 4]));
}

#[tokio::test]
async fn seal_unseal_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("s.db"))).unwrap());
    let node = Node::new(store.clone(), identity());
    let init = node.operator_init(ctx(None), 3, 2).await.result.unwrap();
    let root = init.root_token.token.to_string();
    node.kv_write(ctx(Some(&root)), "secret".into(), "a".into(), data(&[("v", "before")]), None)
        .await
        .result
        .unwrap();
    assert_eq!(node.operator_rotate(ctx(Some(&root))).await.result.unwrap(), 2);
    node.kv_write(ctx(Some(&root)), "secret".into(), "a".into(), data(&[("v", "after")]), None)
        .await
        .result
        .unwrap();

    // A second node on the same store starts sealed.
    let other = Node::new(store, identity());
    let status = other.operator_status(ctx(None)).await.result.unwrap();
    assert!(status.initialized && status.sealed);
    assert!(matches!(
        other.kv_read(ctx(Some(&root)), "secret".into(), "a".into(), None).await.result,
        Err(ApiError::Sealed)
    ));
    let progress = other.operator_unseal(ctx(None), init.shares[2].clone()).await.result.unwrap();
    assert!(progress.sealed && progress.progress == 1);
    let progress = other.operator_unseal(ctx(None), init.shares[0].clone()).await.result.unwrap();
    assert!(!progress.sealed);
    let v1 = other.kv_read(ctx(Some(&root)), "secret".into(), "a".into(), Some(1)).await.result.unwrap();
    let v2 = other.kv_read(ctx(Some(&root)), "secret".into(), "a".into(), Some(2)).await.result.unwrap();
    assert_eq!((v1.data.text("v").unwrap(), v2.data.text("v").unwrap()), ("before", "after"));

    node.operator_seal(ctx(Some(&root))).await.result.unwrap();
    assert!(node.barrier().is_sealed());
    assert!(matches!(
        node.kv_read(ctx(Some(&root)), "secret".into(), "a".into(), None).await.result,
        Err(ApiError::Sealed)
    ));
    assert!(matches!(node.operator_init(ctx(None), 1, 1).await.result, Err(ApiError::FailedPrecondition(_))));
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let h = harness().await;
    let n = &h.node;
    let big = "x".repeat(arca_node::kv::MAX_DATA_BYTES + 1);
    for (path, payload) in [
        ("a", data(&[("v", big.as_str())])),
        ("", data(&[("v", "1")])),
        ("/lead", data(&[("v", "1")])),
        ("a//b", data(&[("v", "1")])),
        ("a/../b", data(&[("v", "1")])),
        ("ctl\u{7}", data(&[("v", "1")])),
        ("a", data(&[("", "1")])),
    ] {
        let res = n.kv_write(ctx(Some(&h.root)), "secret".into(), path.into(), payload, None).await;
        assert!(matches!(res.result, Err(ApiError::InvalidArgument(_))), "{path:?}");
    }
    assert!(matches!(
        n.kv_write(ctx(Some(&h.root)), "nope".into(), "a".into(), data(&[("v", "1")]), None).await.result,
        Err(ApiError::NotFound(_))
    ));
    let bad_policy = n
        .policy_write(ctx(Some(&h.root)), "p".into(), "path \"a\" { capabilities = [\"reed\"] }".into())
        .await;
    match bad_policy.result {
        Err(ApiError::InvalidArgument(msg)) => assert!(msg.contains("line 1"), "{msg}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let listed = n.kv_list(ctx(Some(&h.root)), "secret".into(), "".into()).await.result.unwrap();
    assert!(listed.is_empty(), "nothing was written: {listed:?}");
    assert_eq!(n.policy_list(ctx(Some(&h.root))).await.result.unwrap(), vec!["root".to_string()]);
}

#[tokio::test]
async fn a_request_that_fails_after_writing_changes_nothing_and_is_still_audited() {
    let h = harness().await;
    let n = &h.node;
    n.kv_write(ctx(Some(&h.root)), "secret".into(), "keep".into(), data(&[("v", SECRET_VALUE)]), None)
        .await
        .result
        .unwrap();
    let rows = keys::kv_slots("secret", "keep");
    let end = prefix_end(&rows).unwrap();
    let before = row_keys(h.store.as_ref(), &rows);
    assert!(!before.is_empty());
    let events = audit_events(h.store.as_ref()).len();
    // An operation that writes, reads its writes back, then fails: whatever it wrote goes.
    let (first, last) = (rows.clone(), end.clone());
    let failed = n
        .execute(ctx(Some(&h.root)), Operation::KvDestroy, "secret/destroy/keep".into(), move |env| {
            env.tx.clear_range(&first, &last)?;
            env.tx.set(b"kv/stray", b"written, then the request failed")?;
            // It reads its own writes (else `Internal`, which the test tells apart).
            let seen = env.tx.get_range(&first, &last, RangeOptions::default())?;
            if !seen.is_empty() || env.tx.get(b"kv/stray")?.is_none() {
                return Err(ApiError::Internal);
            }
            Err::<(), _>(ApiError::invalid("failed after writing"))
        })
        .await;
    assert!(matches!(failed.result, Err(ApiError::InvalidArgument(_))), "{:?}", failed.result);
    assert!(failed.position.is_some(), "the failure's event is durable");
    assert_eq!(row_keys(h.store.as_ref(), &rows), before, "the secret's rows are untouched");
    assert!(row_keys(h.store.as_ref(), b"kv/stray").is_empty());
    let read = n.kv_read(ctx(Some(&h.root)), "secret".into(), "keep".into(), None).await.result.unwrap();
    assert_eq!(read.data.text("v"), Some(SECRET_VALUE));
    let all = audit_events(h.store.as_ref());
    assert_eq!(all.len(), events + 2, "the failure and the read");
    assert!(matches!(all[events].outcome, Outcome::Error { .. }), "{:?}", all[events].outcome);
    // The same writes from a request that succeeds are committed with its event.
    let (first, last) = (rows.clone(), end);
    let done = n
        .execute(ctx(Some(&h.root)), Operation::KvDestroy, "secret/destroy/keep".into(), move |env| {
            env.tx.clear_range(&first, &last)?;
            Ok(())
        })
        .await;
    assert!(done.result.is_ok());
    assert!(row_keys(h.store.as_ref(), &rows).is_empty());
}

#[tokio::test]
async fn a_wrapped_response_is_unwrapped_once_within_its_ttl_and_swept_after_it() {
    let h = harness().await;
    let clock = injected_clock(&h);
    let n = &h.node;
    let response = Zeroizing::new(r#"{"data":{"password":"wrapped-s3cr3t"}}"#.to_owned());
    let wrap = |ttl: u64| n.wrap(ctx(Some(&h.root)), "secret/data/app".into(), response.clone(), ttl, false);
    let first = wrap(60).await;
    let info = first.result.unwrap();
    let token = info.token.clone().unwrap();
    assert!(token.starts_with("arcaw_") && info.ttl_secs == 60);
    // Stored hashed and sealed: neither the token nor the response is in the store's bytes.
    let raw = std::fs::read(&h.db).unwrap();
    let find = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(!find(token.as_bytes()) && !find(b"wrapped-s3cr3t"));
    // A lookup does not use it up; an unwrap does, once.
    let looked = n.wrap_lookup(ctx(None), token.clone()).await.result.unwrap();
    assert_eq!((looked.creation_path.as_str(), looked.token.is_none()), ("secret/data/app", true));
    let unwrapped = n.unwrap(ctx(Some(&token)), token.clone()).await.result.unwrap();
    assert_eq!(unwrapped.as_str(), response.as_str());
    let again = n.unwrap(ctx(None), token.clone()).await.result;
    assert!(matches!(again, Err(ApiError::InvalidArgument(_))), "single use: {again:?}");
    // Past its TTL it is gone, and the sweep removes it.
    let expiring = wrap(1).await.result.unwrap().token.unwrap();
    let unread = wrap(3600).await.result.unwrap().token.unwrap();
    clock.fetch_add(2_000, std::sync::atomic::Ordering::SeqCst);
    assert!(n.unwrap(ctx(None), expiring.clone()).await.result.is_err());
    // A failed request changes nothing: the expired one stays for the sweep.
    assert_eq!(row_keys(h.store.as_ref(), &keys::wrap_expiry_all()).len(), 2);
    let late = wrap(1).await.result.unwrap().token.unwrap();
    clock.fetch_add(2_000, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(n.wrap_expire_sweep().await.unwrap(), 2, "the expired ones, asked for or not");
    assert!(n.wrap_lookup(ctx(None), late).await.result.is_err());
    assert_eq!(row_keys(h.store.as_ref(), &keys::wrap_expiry_all()).len(), 1, "the hour-long one stays");
    assert!(n.unwrap(ctx(None), unread).await.result.is_ok());
    // Bad TTLs and tokens are refused; every step was audited under its operation.
    assert!(wrap(0).await.result.is_err() && wrap(8 * 86_400).await.result.is_err());
    assert!(
        n.unwrap(ctx(None), Zeroizing::new(h.root.clone())).await.result.is_err(),
        "not a wrapping token"
    );
    let events = audit_events(h.store.as_ref());
    let ops = |op: Operation| events.iter().filter(|e| e.operation == op).count();
    assert_eq!(
        (
            ops(Operation::WrapCreate),
            ops(Operation::WrapUnwrap),
            ops(Operation::WrapLookup),
            ops(Operation::WrapExpire)
        ),
        (6, 5, 2, 2)
    );
    let created = events.iter().find(|e| e.operation == Operation::WrapCreate).unwrap();
    assert_eq!(
        (created.path.as_str(), created.request_id.as_str()),
        ("secret/data/app", first.request_id.as_str())
    );
    assert_eq!(created.actor.entity, "root");
    assert!(events.iter().all(|e| !e.path.contains("arcaw_")));
}

#[tokio::test]
async fn versions_are_deleted_when_their_delete_version_after_has_passed() {
    let h = harness().await;
    let clock = injected_clock(&h);
    let n = &h.node;
    let tick = |secs: u64| clock.fetch_add(secs * 1000, std::sync::atomic::Ordering::SeqCst);
    let update = arca_node::kv::KvConfigUpdate { delete_version_after_secs: Some(60), ..Default::default() };
    n.kv_config_write(ctx(Some(&h.root)), "secret".into(), update).await.result.unwrap();
    let write =
        |v: &str| n.kv_write(ctx(Some(&h.root)), "secret".into(), "a".into(), data(&[("v", v)]), None);
    let read = || n.kv_read(ctx(Some(&h.root)), "secret".into(), "a".into(), None);
    write("one").await.result.unwrap();
    tick(59);
    assert_eq!(read().await.result.unwrap().data.text("v"), Some("one"));
    tick(2);
    assert!(matches!(read().await.result, Err(ApiError::NotFound(_))), "deleted after 60 s");
    // Undeleting clears the deletion time; a secret's own setting wins over the mount's.
    n.kv_undelete(ctx(Some(&h.root)), "secret".into(), "a".into(), vec![1]).await.result.unwrap();
    tick(3600);
    assert_eq!(read().await.result.unwrap().version, 1);
    let own = MetadataUpdate { delete_version_after_secs: Some(3600), ..Default::default() };
    n.kv_write_metadata(ctx(Some(&h.root)), "secret".into(), "a".into(), own).await.result.unwrap();
    write("two").await.result.unwrap();
    tick(61);
    assert_eq!(read().await.result.unwrap().data.text("v"), Some("two"), "an hour, not a minute");
    tick(3600);
    assert!(read().await.result.is_err());
    let config = n.kv_config_read(ctx(Some(&h.root)), "secret".into()).await.result.unwrap();
    assert_eq!(config.delete_version_after_secs, 60);
    let too_long =
        arca_node::kv::KvConfigUpdate { delete_version_after_secs: Some(u64::MAX), ..Default::default() };
    assert!(n.kv_config_write(ctx(Some(&h.root)), "secret".into(), too_long).await.result.is_err());
}
