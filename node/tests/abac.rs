//! Context-aware access (policy conditions) on a node in process with an injected clock:
//! time windows, identity metadata from an AppRole, required mTLS, token bound CIDRs; each
//! condition denial audited with the condition that failed, and the caller told only
//! "permission denied".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arca_audit::{Event, Outcome, Source};
use arca_node::auth::{CreateTokenRequest, WriteRoleRequest};
use arca_node::error::ApiError;
use arca_node::keys;
use arca_node::kv::SecretData;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_store::{RangeOptions, SqliteConfig, SqliteStore, StoreExt, prefix_end};
use zeroize::Zeroizing;

const HOUR_MS: u64 = 3_600_000;
/// 2026-11-26 (a Thursday) 00:00 UTC.
const THURSDAY: u64 = 1_795_651_200_000;

fn ctx(token: Option<&str>, address: &str) -> RequestContext {
    RequestContext::new(
        token.map(|t| Zeroizing::new(t.to_owned())),
        Source { address: address.into(), proxy: None },
    )
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    node: Arc<Node>,
    root: String,
    clock: Arc<AtomicU64>,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("arca.db"))).unwrap());
    let node = Node::new(
        store.clone(),
        NodeIdentity { cluster: "t".into(), region: "local".into(), node: "n".into() },
    );
    let clock = Arc::new(AtomicU64::new(THURSDAY + 9 * HOUR_MS));
    let c = clock.clone();
    node.set_clock(Arc::new(move || c.load(Ordering::SeqCst)));
    let root =
        node.operator_init(ctx(None, "127.0.0.1:1"), 1, 1).await.result.unwrap().root_token.token.to_string();
    let data: SecretData = [("password", "s3cr3t")].into_iter().collect();
    node.kv_write(ctx(Some(&root), "127.0.0.1:1"), "secret".into(), "prod/db".into(), data, None)
        .await
        .result
        .unwrap();
    Harness { _dir: dir, store, node, root, clock }
}

fn events(h: &Harness) -> Vec<Event> {
    let prefix = keys::audit_events("local");
    let rows = h
        .store
        .transact(|tx| tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default()))
        .unwrap()
        .value;
    rows.iter().map(|kv| Event::decode(&kv.value).unwrap()).collect()
}

fn last_outcome(h: &Harness) -> Outcome {
    events(h).pop().unwrap().outcome
}

async fn read(h: &Harness, token: &str, address: &str, mtls: bool) -> Result<String, ApiError> {
    let mut c = ctx(Some(token), address);
    c.mtls = mtls;
    h.node
        .kv_read(c, "secret".into(), "prod/db".into(), None)
        .await
        .result
        .map(|s| s.data.text("password").unwrap_or_default().to_owned())
}

async fn token(h: &Harness, policy: &str, bound_cidrs: &[&str], meta: &[(&str, &str)]) -> String {
    let req = CreateTokenRequest {
        policies: vec![policy.into()],
        // Longer than the injected clock moves (the default TTL would expire on the way).
        ttl_secs: Some(7 * 86_400),
        bound_cidrs: bound_cidrs.iter().map(|s| s.to_string()).collect(),
        meta: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    h.node.token_create(ctx(Some(&h.root), "127.0.0.1:1"), req).await.result.unwrap().token.to_string()
}

async fn policy(h: &Harness, name: &str, text: &str) {
    h.node.policy_write(ctx(Some(&h.root), "127.0.0.1:1"), name.into(), text.into()).await.result.unwrap();
}

#[tokio::test]
async fn a_time_window_rule_denies_outside_its_window() {
    let h = harness().await;
    policy(&h, "office-hours", r#"path "secret/data/prod/*" { capabilities = ["read"] conditions { hours_utc = "08-18" days_utc = ["mon","tue","wed","thu","fri"] } }"#).await;
    let t = token(&h, "office-hours", &[], &[]).await;
    assert_eq!(read(&h, &t, "127.0.0.1:9", false).await.unwrap(), "s3cr3t");
    assert_eq!(last_outcome(&h), Outcome::Ok);
    // 19:00 the same day: outside the hours.
    h.clock.store(THURSDAY + 19 * HOUR_MS, Ordering::SeqCst);
    let denied = read(&h, &t, "127.0.0.1:9", false).await.unwrap_err();
    assert!(matches!(denied, ApiError::PermissionDenied));
    assert_eq!(denied.to_string(), "permission denied", "the caller learns nothing of the policy");
    assert_eq!(last_outcome(&h), Outcome::DeniedBy { condition: "office-hours: hours_utc".into() });
    // Saturday morning: outside the days.
    h.clock.store(THURSDAY + 2 * 24 * HOUR_MS + 10 * HOUR_MS, Ordering::SeqCst);
    assert!(read(&h, &t, "127.0.0.1:9", false).await.is_err());
    assert_eq!(last_outcome(&h), Outcome::DeniedBy { condition: "office-hours: days_utc".into() });
    // Back inside.
    h.clock.store(THURSDAY + 24 * HOUR_MS + 17 * HOUR_MS, Ordering::SeqCst);
    assert!(read(&h, &t, "127.0.0.1:9", false).await.is_ok());
}

#[tokio::test]
async fn metadata_mtls_and_bound_cidrs_are_conditions_too() {
    let h = harness().await;
    policy(
        &h,
        "prod-only",
        r#"path "secret/data/prod/*" { capabilities = ["read"] conditions { metadata = ["env=prod"] } }"#,
    )
    .await;
    policy(
        &h,
        "mtls-only",
        r#"path "secret/data/prod/*" { capabilities = ["read"] conditions { require_mtls = true } }"#,
    )
    .await;
    // Metadata from an AppRole reaches its tokens.
    for (role, env) in [("web-prod", "prod"), ("web-dev", "dev")] {
        let req = WriteRoleRequest {
            name: role.into(),
            policies: vec!["prod-only".into()],
            metadata: BTreeMap::from([("env".to_owned(), env.to_owned())]),
            ..Default::default()
        };
        h.node.approle_write(ctx(Some(&h.root), "127.0.0.1:1"), req).await.result.unwrap();
    }
    let login = |role: &'static str| {
        let h = &h;
        async move {
            let c = || ctx(Some(&h.root), "127.0.0.1:1");
            let role_id = h.node.approle_role_id(c(), role.into()).await.result.unwrap();
            let secret = h.node.approle_secret_id(c(), role.into()).await.result.unwrap();
            let t = h
                .node
                .approle_login(ctx(None, "127.0.0.1:2"), Zeroizing::new(role_id), secret.secret_id)
                .await;
            t.result.unwrap().token.to_string()
        }
    };
    let (prod, dev) = (login("web-prod").await, login("web-dev").await);
    assert!(read(&h, &prod, "127.0.0.1:9", false).await.is_ok());
    assert!(read(&h, &dev, "127.0.0.1:9", false).await.is_err());
    assert_eq!(last_outcome(&h), Outcome::DeniedBy { condition: "prod-only: metadata".into() });

    let t = token(&h, "mtls-only", &[], &[]).await;
    assert!(read(&h, &t, "127.0.0.1:9", true).await.is_ok());
    assert!(read(&h, &t, "127.0.0.1:9", false).await.is_err());
    assert_eq!(last_outcome(&h), Outcome::DeniedBy { condition: "mtls-only: require_mtls".into() });

    // A token bound to 10.0.0.0/8 is useless elsewhere, whatever its policies.
    let bound = token(&h, "mtls-only", &["10.0.0.0/8"], &[]).await;
    assert!(read(&h, &bound, "10.1.2.3:5", true).await.is_ok());
    assert!(read(&h, &bound, "192.168.1.1:5", true).await.is_err());
    assert_eq!(last_outcome(&h), Outcome::DeniedBy { condition: "token: bound_cidrs".into() });
    // Bad ranges are refused at creation, changing nothing.
    let req = CreateTokenRequest {
        policies: vec!["mtls-only".into()],
        bound_cidrs: vec!["10.0.0.0/99".into()],
        ..Default::default()
    };
    assert!(matches!(
        h.node.token_create(ctx(Some(&h.root), "127.0.0.1:1"), req).await.result,
        Err(ApiError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jit_grant_works_after_approval_and_not_after_its_ttl() {
    let h = harness().await;
    arca_node::lifecycle::start(&h.node, arca_node::lifecycle::LifecycleConfig::default());
    policy(&h, "prod-read", r#"path "secret/data/prod/*" { capabilities = ["read"] }"#).await;
    policy(&h, "may-request", r#"path "sys/access/request/prod-read" { capabilities = ["create"] }"#).await;
    policy(
        &h,
        "approver",
        r#"path "sys/access/approve/prod-read" { capabilities = ["update"] }
           path "sys/access/grants" { capabilities = ["list"] }"#,
    )
    .await;
    let named = |policy: &str, name: &str| CreateTokenRequest {
        policies: vec![policy.into()],
        ttl_secs: Some(7 * 86_400),
        display_name: name.into(),
        ..Default::default()
    };
    let c = || ctx(Some(&h.root), "127.0.0.1:1");
    let dev = h.node.token_create(c(), named("may-request", "dev")).await.result.unwrap().token.to_string();
    let boss = h.node.token_create(c(), named("approver", "boss")).await.result.unwrap().token.to_string();

    assert!(read(&h, &dev, "127.0.0.1:9", false).await.is_err(), "no access before the grant");
    let asked =
        h.node.access_request(ctx(Some(&dev), "127.0.0.1:9"), "prod-read".into(), 900, "incident 42".into());
    let grant = asked.await.result.unwrap();
    assert!(read(&h, &dev, "127.0.0.1:9", false).await.is_err(), "a pending request grants nothing");
    // Nobody approves their own request; the approver needs the approve capability.
    let own = h.node.access_approve(ctx(Some(&dev), "127.0.0.1:9"), grant.id.clone()).await.result;
    assert!(own.is_err());
    let root_asks = h.node.access_request(c(), "root".into(), 60, "why not".into()).await.result;
    assert!(matches!(root_asks, Err(ApiError::InvalidArgument(_))));
    let approved =
        h.node.access_approve(ctx(Some(&boss), "127.0.0.1:8"), grant.id.clone()).await.result.unwrap();
    assert_eq!(approved.approver_entity.as_deref(), Some("token:boss"));
    assert_eq!(read(&h, &dev, "127.0.0.1:9", false).await.unwrap(), "s3cr3t");

    // The TTL ends: access ends with it, and the expiry is recorded by the sweep.
    h.clock.fetch_add(901_000, Ordering::SeqCst);
    assert!(read(&h, &dev, "127.0.0.1:9", false).await.is_err(), "no access after the TTL");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !events(&h).iter().any(|e| e.operation == arca_audit::Operation::AccessExpire) {
        assert!(std::time::Instant::now() < deadline, "the expiry was never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let listed = h.node.access_list(ctx(Some(&boss), "127.0.0.1:8")).await.result.unwrap();
    assert_eq!(listed[0].state, arca_node::access::GrantState::Expired);
    let ops: Vec<(arca_audit::Operation, Outcome)> = events(&h)
        .into_iter()
        .filter(|e| e.operation.name().starts_with("access."))
        .map(|e| (e.operation, e.outcome))
        .collect();
    use arca_audit::Operation as Op;
    assert_eq!(
        ops,
        vec![
            (Op::AccessRequest, Outcome::Ok),
            (Op::AccessApprove, Outcome::Denied),
            (Op::AccessRequest, Outcome::Error { code: "invalid_argument".into() }),
            (Op::AccessApprove, Outcome::Ok),
            (Op::AccessExpire, Outcome::Ok),
            (Op::AccessList, Outcome::Ok),
        ]
    );
}

#[tokio::test]
async fn a_changed_policy_or_revoked_token_takes_effect_on_the_next_request() {
    // The node caches decoded policies and token records by their exact ciphertext: a
    // rewrite must never be served stale.
    let h = harness().await;
    policy(&h, "p", r#"path "secret/data/prod/*" { capabilities = ["read"] }"#).await;
    let t = token(&h, "p", &[], &[]).await;
    for _ in 0..3 {
        assert!(read(&h, &t, "127.0.0.1:9", false).await.is_ok());
    }
    policy(&h, "p", r#"path "secret/data/prod/*" { capabilities = ["deny"] }"#).await;
    assert!(matches!(read(&h, &t, "127.0.0.1:9", false).await, Err(ApiError::PermissionDenied)));
    policy(&h, "p", r#"path "secret/data/prod/*" { capabilities = ["read"] }"#).await;
    assert!(read(&h, &t, "127.0.0.1:9", false).await.is_ok());
    let accessor = h.node.token_lookup(ctx(Some(&t), "127.0.0.1:9"), None).await.result.unwrap().accessor;
    h.node.token_revoke(ctx(Some(&h.root), "127.0.0.1:1"), Some(accessor)).await.result.unwrap();
    assert!(matches!(read(&h, &t, "127.0.0.1:9", false).await, Err(ApiError::Unauthenticated)));
}

#[tokio::test]
async fn capabilities_say_what_a_token_may_do_now_and_each_ask_is_audited() {
    use arca_node::auth::CapabilitiesOf;
    let h = harness().await;
    policy(
        &h,
        "app",
        r#"path "secret/data/prod/*" { capabilities = ["read", "list"] conditions { hours_utc = "08-18" } }
path "secret/metadata/prod/*" { capabilities = ["read"] }
path "secret/data/prod/locked" { capabilities = ["deny"] }"#,
    )
    .await;
    let t = token(&h, "app", &[], &[]).await;
    let paths = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ask = |of: CapabilitiesOf, token: &str, p: &[&str]| {
        h.node.token_capabilities(ctx(Some(token), "127.0.0.1:9"), of, paths(p))
    };
    let asked = ["secret/data/prod/db", "/secret/metadata/prod/db", "secret/data/prod/locked", "sys/mounts"];
    let expected = |data: &[&str]| {
        vec![
            ("secret/data/prod/db".to_owned(), data.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            ("secret/metadata/prod/db".into(), vec!["read".into()]),
            ("secret/data/prod/locked".into(), vec!["deny".into()]),
            ("sys/mounts".into(), vec!["deny".into()]),
        ]
    };
    let before = events(&h).len();
    assert_eq!(ask(CapabilitiesOf::Caller, &t, &asked).await.result.unwrap(), expected(&["list", "read"]));
    // Conditions count: at 19:00 the time-bound rule does not apply.
    h.clock.store(THURSDAY + 19 * HOUR_MS, Ordering::SeqCst);
    assert_eq!(ask(CapabilitiesOf::Caller, &t, &asked).await.result.unwrap(), expected(&["deny"]));
    // Root is root; another token by value or accessor needs update on sys/capabilities*.
    let root_view = ask(CapabilitiesOf::Caller, &h.root, &["x/y"]).await.result.unwrap();
    assert_eq!(root_view, vec![("x/y".to_owned(), vec!["root".to_owned()])]);
    let of_t = ask(CapabilitiesOf::Token(Zeroizing::new(t.clone())), &h.root, &["secret/metadata/prod/a"]);
    assert_eq!(of_t.await.result.unwrap()[0].1, vec!["read".to_owned()]);
    let by_app = ask(CapabilitiesOf::Token(Zeroizing::new(h.root.clone())), &t, &["x"]).await.result;
    assert!(matches!(by_app, Err(ApiError::PermissionDenied)), "{by_app:?}");
    let lookup = h.node.token_lookup(ctx(Some(&t), "127.0.0.1:9"), None).await.result.unwrap();
    let of_accessor = ask(CapabilitiesOf::Accessor(lookup.accessor), &h.root, &["secret/metadata/prod/a"]);
    assert_eq!(of_accessor.await.result.unwrap()[0].1, vec!["read".to_owned()]);
    let none = ask(CapabilitiesOf::Token(Zeroizing::new("arca_nope".into())), &h.root, &["x"]).await.result;
    assert!(matches!(none, Err(ApiError::NotFound(_))), "{none:?}");
    // Bad asks change nothing and are refused.
    for bad in [vec![], vec!["a\u{7}".to_owned()], vec!["p".to_owned(); 65]] {
        let refused =
            h.node.token_capabilities(ctx(Some(&t), "127.0.0.1:9"), CapabilitiesOf::Caller, bad).await;
        assert!(matches!(refused.result, Err(ApiError::InvalidArgument(_))));
    }
    // One audit event per ask, under the asker, naming the kind of ask.
    let asks: Vec<Event> = events(&h)
        .into_iter()
        .skip(before)
        .filter(|e| e.operation != arca_audit::Operation::TokenLookup)
        .collect();
    assert_eq!(asks.len(), 10);
    assert!(asks.iter().all(|e| e.operation == arca_audit::Operation::TokenCapabilities));
    assert_eq!(asks[0].path, "sys/capabilities-self");
    assert_eq!(asks[3].path, "sys/capabilities");
    assert_eq!(asks[4].outcome, Outcome::Denied);
    assert_eq!(asks[5].path, "sys/capabilities-accessor");
}
