//! Two regions of real `arcad server` processes on loopback: steady replication, a cut and
//! healed link, promotion, fencing of the returning old primary, demotion with an exact
//! divergence report, failback — and the replication listener's mTLS.
//!
//! The standby pulls from the primary through a TCP proxy owned by the test, so the link
//! can be cut and healed. Every wait polls a condition with a deadline.

mod common;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_audit::Outcome;
use arca_testkit::free_port;
use common::{Server, arca, sample};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

fn wait_until(what: &str, ok: impl FnMut() -> bool) {
    common::wait_until(what, DEADLINE, ok);
}

/// A TCP proxy whose link can be cut (every connection closed, new ones refused) and healed.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (cut2, open2) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let mut list = open2.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, cut, open }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// One region's node: its config (kept for restarts) and its process.
struct Region {
    name: String,
    config: PathBuf,
    server: Option<Server>,
    repl_port: u16,
}

impl Region {
    fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn start(&mut self) {
        let mut server = common::start_server(&self.config, &[]);
        server.log_url = format!("{}/audit/{}", server.http, self.name);
        self.server = Some(server);
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }

    fn status(&self, token: &str) -> Value {
        let run = arca(self.server(), Some(token), &["--format", "json", "region", "status"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        serde_json::from_str(&run.stdout).unwrap()
    }

    fn unseal_when_copied(&self, share: &str) {
        wait_until(&format!("{} to receive the seal and unseal", self.name), || {
            arca(self.server(), None, &["operator", "unseal", share]).code == 0
                && arca(self.server(), None, &["--format", "json", "operator", "status"])
                    .stdout
                    .contains("\"sealed\": false")
        });
    }
}

struct Tls {
    ca: PathBuf,
    certs: Vec<(PathBuf, PathBuf)>,
}

/// A CA and one certificate per region, for `localhost` (where it listens) and the region's
/// name (which its peers check), written under `dir`.
fn pki(dir: &Path, regions: &[&str]) -> Tls {
    let ca = common::TestCa::new(dir);
    let certs = regions.iter().map(|region| ca.issue_for(region, &["localhost", region])).collect();
    Tls { ca: ca.ca_file.clone(), certs }
}

/// Writes the configs of two regions, `eu` (the initial primary) and `us`; `us` reaches
/// `eu`'s replication listener through `eu_endpoint_for_us` (a proxy port).
/// Both regions' configuration files; `listener` is added to their `[listener]` sections.
fn configs(dir: &Path, tls: Option<&Tls>, listener: &str) -> (Region, Region, u16) {
    let (eu_repl, us_repl) = (free_port(), free_port());
    let scheme = if tls.is_some() { "https://localhost" } else { "http://127.0.0.1" };
    let write = |name: &str, repl: u16, peer: &str, peer_endpoint: String, i: usize| {
        let tls_lines = match tls {
            Some(t) => format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nca_file = \"{}\"\n",
                t.certs[i].0.display(),
                t.certs[i].1.display(),
                t.ca.display()
            ),
            None => "dangerous_plaintext = true\n".into(),
        };
        let text = format!(
            "[node]\nid = \"{name}-1\"\nregion = \"{name}\"\ncluster = \"test\"\n\n[storage]\nengine = \"sqlite\"\npath = \"{}\"\n\n\
             [listener]\ngrpc_addr = \"127.0.0.1:0\"\ndangerous_plaintext = true\nhttp_addr = \"127.0.0.1:0\"\n{listener}\n\
             [sequencer]\ninterval_ms = 50\n\n\
             [replication]\nlisten_addr = \"127.0.0.1:{repl}\"\n{tls_lines}initial_primary = \"eu\"\n\
             [[replication.peers]]\nregion = \"{peer}\"\nendpoint = \"{peer_endpoint}\"\n",
            dir.join(format!("{name}.db")).display()
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    // us pulls from eu through the proxy (its port is known only once the proxy starts, so
    // it is patched in by the caller: see `link`).
    let eu = write("eu", eu_repl, "us", format!("{scheme}:{us_repl}"), 0);
    let us = write("us", us_repl, "eu", format!("{scheme}:EU_VIA_PROXY"), 1);
    (
        Region { name: "eu".into(), config: eu, server: None, repl_port: eu_repl },
        Region { name: "us".into(), config: us, server: None, repl_port: us_repl },
        eu_repl,
    )
}

/// Points `region`'s endpoint for its peer at `port`.
fn link(region: &Region, port: u16) {
    let text = std::fs::read_to_string(&region.config).unwrap().replace("EU_VIA_PROXY", &port.to_string());
    std::fs::write(&region.config, text).unwrap();
}

struct Cluster {
    eu: Region,
    us: Region,
    proxy: Proxy,
    share: String,
    root: String,
    /// Each region's certificate and key, with TLS.
    tls_certs: Vec<(PathBuf, PathBuf)>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.eu.kill();
        self.us.kill();
    }
}

fn cluster(with_tls: bool) -> Cluster {
    cluster_with(with_tls, "")
}

/// A cluster whose regions' `[listener]` sections also hold `listener`.
fn cluster_with(with_tls: bool, listener: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let tls = with_tls.then(|| pki(dir.path(), &["eu", "us", "mallory"]));
    let (mut eu, mut us, eu_repl) = configs(dir.path(), tls.as_ref(), listener);
    let proxy = Proxy::start(eu_repl);
    link(&us, proxy.port);
    eu.start();
    us.start();
    // Initialized over the Vault HTTP API (`sys/init`, as `bao operator init` does it): the
    // share in hex and in base64, and the root token.
    let mut response = ureq::put(format!("{}/v1/sys/init", eu.server().http))
        .header("Content-Type", "application/json")
        .send(r#"{"secret_shares": 1, "secret_threshold": 1}"#)
        .unwrap();
    let init: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    let share = init["keys"][0].as_str().unwrap().to_owned();
    let share_b64 = init["keys_base64"][0].as_str().unwrap();
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD.decode(share_b64).unwrap();
    assert_eq!(hex::encode(decoded), share, "the same share, in base64");
    let root = init["root_token"].as_str().unwrap().to_owned();
    assert!(root.starts_with("arca_"), "{init}");
    assert_eq!(arca(eu.server(), None, &["operator", "unseal", &share]).code, 0);
    // The standby unseals with the primary's key once it has copied the primary's state.
    us.unseal_when_copied(&share);
    let tls_certs = tls.map(|t| t.certs).unwrap_or_default();
    Cluster { eu, us, proxy, share, root, tls_certs, _dir: dir }
}

/// A mount of two segments the test enables (over HTTP: mounts are managed there).
const TEAM_MOUNT: &str = "team/kv";

fn put(region: &Region, token: &str, path: &str, value: &str) -> common::Run {
    arca(region.server(), Some(token), &["--mounts", TEAM_MOUNT, "kv", "put", path, &format!("v={value}")])
}

fn get(region: &Region, token: &str, path: &str) -> Option<String> {
    let run =
        arca(region.server(), Some(token), &["--mounts", TEAM_MOUNT, "--format", "json", "kv", "get", path]);
    if run.code != 0 {
        return None;
    }
    let v: Value = serde_json::from_str(&run.stdout).ok()?;
    v["data"]["v"].as_str().map(str::to_owned)
}

/// Change records in a region's feed, read from its store file.
fn feed_len(db: &Path) -> usize {
    use arca_store::StoreExt;
    let store = arca_store::SqliteStore::open(arca_store::SqliteConfig::new(db)).unwrap();
    let prefix = arca_replication::changes();
    let end = arca_store::prefix_end(&prefix).unwrap();
    store.transact(|tx| tx.get_range(&prefix, &end, arca_store::RangeOptions::limit(0))).unwrap().value.len()
}

#[test]
fn replicate_cut_heal_promote_fence_demote_and_fail_back() {
    let mut c = cluster(false);
    let (root, share) = (c.root.clone(), c.share.clone());

    // Steady replication: a write on the primary is readable on the standby within the lag.
    assert_eq!(put(&c.eu, &root, "secret/app/db", "one").code, 0);
    let enabled = ureq::post(format!("{}/v1/sys/mounts/{TEAM_MOUNT}", c.eu.server().http))
        .header("X-Vault-Token", &root)
        .send(r#"{"type": "kv-v2"}"#)
        .unwrap();
    assert_eq!(enabled.status().as_u16(), 204);
    wait_until("the write to reach us", || get(&c.us, &root, "secret/app/db").as_deref() == Some("one"));
    // A token issued in eu works in us (tokens replicate).
    let child =
        arca(c.eu.server(), Some(&root), &["--format", "json", "token", "create", "--policy", "root"]);
    assert_eq!(child.code, 0, "{}", child.stderr);
    let child: Value = serde_json::from_str(&child.stdout).unwrap();
    let child = child["token"].as_str().or(child["client_token"].as_str()).unwrap().to_owned();
    wait_until("the token to reach us", || get(&c.us, &child, "secret/app/db").is_some());
    // The standby refuses writes and names the primary.
    let refused = put(&c.us, &root, "secret/app/x", "no");
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("\"eu\""), "{}", refused.stderr);
    let status = c.us.status(&root);
    assert_eq!(
        (status["role"].as_str(), status["primary"].as_str(), status["link"].as_str()),
        (Some("standby"), Some("eu"), Some("up"))
    );

    // The link is cut: eu keeps serving, us reports the link down and a growing lag.
    c.proxy.cut();
    for i in 0..10 {
        assert_eq!(put(&c.eu, &root, &format!("secret/cut/s{i}"), "during").code, 0);
    }
    wait_until("us to see the link down and lag", || {
        let s = c.us.status(&root);
        s["link"] == "down" && s["lag_seconds"].as_f64().is_some_and(|l| l > 0.0)
    });
    assert_eq!(get(&c.us, &root, "secret/cut/s9"), None);
    // Healed: it catches up, nothing lost.
    c.proxy.heal();
    wait_until("us to catch up", || {
        (0..10).all(|i| get(&c.us, &root, &format!("secret/cut/s{i}")).is_some())
    });
    wait_until("the lag to drain", || {
        let s = c.us.status(&root);
        s["link"] == "up" && s["lag_versions"] == 0
    });
    // The primary drops the change records the standby confirmed.
    let db = c._dir.path().join("eu.db");
    wait_until("eu to trim its confirmed feed", || feed_len(&db) == 0);

    // eu acknowledges writes us never receives, then is lost.
    c.proxy.cut();
    let lost = |i: usize| if i < 2 { format!("secret/lost/s{i}") } else { format!("{TEAM_MOUNT}/lost/s{i}") };
    for i in 0..3 {
        let json = format!(r#"n:={{"i":[{i},true]}}"#);
        let run = arca(
            c.eu.server(),
            Some(&root),
            &["--mounts", TEAM_MOUNT, "kv", "put", &lost(i), "v=acked", &json],
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    c.eu.kill();

    // Promote us: writes open there; the eu token still works.
    let promoted = arca(c.us.server(), Some(&root), &["--format", "json", "region", "promote"]);
    assert_eq!(promoted.code, 0, "{}", promoted.stderr);
    let promoted: Value = serde_json::from_str(&promoted.stdout).unwrap();
    assert_eq!(promoted["epoch"], 2);
    assert_eq!(put(&c.us, &child, "secret/app/after", "us").code, 0);

    // eu returns: on first contact it learns epoch 2, is fenced and refuses writes.
    c.eu.start();
    assert_eq!(arca(c.eu.server(), None, &["operator", "unseal", &share]).code, 0);
    wait_until("eu to be fenced", || c.eu.status(&root)["role"] == "fenced");
    let refused = put(&c.eu, &root, "secret/app/split", "brain");
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("\"us\""), "{}", refused.stderr);

    // Demote eu: the divergence report lists exactly the three writes us never got.
    let demoted = arca(c.eu.server(), Some(&root), &["--format", "json", "region", "demote", "us"]);
    assert_eq!(demoted.code, 0, "{}", demoted.stderr);
    let report: Value = serde_json::from_str(&demoted.stdout).unwrap();
    let mut paths: Vec<String> = report["writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| format!("{} {} v{}", w["kind"].as_str().unwrap(), w["path"].as_str().unwrap(), w["version"]))
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        vec!["secret secret/lost/s0 v1", "secret secret/lost/s1 v1", "secret team/kv/lost/s2 v1"],
        "{report}"
    );
    assert!(report["writes"][0]["position"].as_str().is_some_and(|p| p.len() == 24));
    let id = report["id"].as_u64().unwrap().to_string();
    let again = arca(c.eu.server(), Some(&root), &["--format", "json", "region", "divergence", &id]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    // eu re-copies us's state: it has us's write, not its own lost ones.
    wait_until("eu to follow us", || get(&c.eu, &root, "secret/app/after").as_deref() == Some("us"));
    assert_eq!(get(&c.eu, &root, "secret/lost/s0"), None);
    // The operator re-applies them on the new primary, from the report's own copy (into
    // the right mount, of one segment or two).
    assert_eq!(get(&c.us, &root, "secret/lost/s1"), None);
    assert_eq!(get(&c.us, &root, &lost(2)), None);
    let primary_addr = c.us.server().addr.clone();
    let reapplied = arca(
        c.eu.server(),
        Some(&root),
        &["--format", "json", "region", "reapply", &id, "--primary-addr", &primary_addr],
    );
    assert_eq!(reapplied.code, 0, "{}", reapplied.stderr);
    let reapplied: Value = serde_json::from_str(&reapplied.stdout).unwrap();
    assert_eq!(reapplied["reapplied"].as_array().map(Vec::len), Some(3), "{reapplied}");
    for i in 0..3 {
        let path = lost(i);
        assert_eq!(get(&c.us, &root, &path).as_deref(), Some("acked"));
        // A value that is not a string is re-applied as it was, JSON and all.
        let run = arca(
            c.us.server(),
            Some(&root),
            &["--mounts", TEAM_MOUNT, "--format", "json", "kv", "get", &path],
        );
        let read: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(read["data"]["n"], serde_json::json!({"i": [i, true]}), "{read}");
    }
    wait_until("the re-applied writes to reach eu", || {
        get(&c.eu, &root, &lost(2)).as_deref() == Some("acked")
    });

    // Failback: promote eu, demote us (nothing diverged there), writes flow eu → us again.
    c.proxy.heal();
    let promoted = arca(c.eu.server(), Some(&root), &["--format", "json", "region", "promote"]);
    assert_eq!(promoted.code, 0, "{}", promoted.stderr);
    wait_until("us to be fenced", || c.us.status(&root)["role"] == "fenced");
    let demoted = arca(c.us.server(), Some(&root), &["--format", "json", "region", "demote", "eu"]);
    assert_eq!(demoted.code, 0, "{}", demoted.stderr);
    let report: Value = serde_json::from_str(&demoted.stdout).unwrap();
    assert_eq!(report["writes"].as_array().map(Vec::len), Some(0), "{report}");
    assert_eq!(put(&c.eu, &root, "secret/app/back", "home").code, 0);
    wait_until("the failback write to reach us", || {
        get(&c.us, &root, "secret/app/back").as_deref() == Some("home")
    });
    let s = c.eu.status(&root);
    assert_eq!((s["role"].as_str(), s["epoch"].as_u64()), (Some("primary"), Some(3)));
    // Metrics show the standby's lag and link.
    let metrics = c.us.server().metrics();
    assert!(metrics.contains("arca_replication_link_up 1"), "{metrics}");
    assert!(metrics.contains("arca_region_role{role=\"standby\",primary=\"eu\"} 1"), "{metrics}");
}

#[test]
fn the_replication_listener_requires_the_callers_region_certificate_and_audits_what_it_serves() {
    let c = cluster(true);
    assert_eq!(put(&c.eu, &c.root, "secret/tls/a", "x").code, 0);
    wait_until("the write to reach us over mTLS", || {
        get(&c.us, &c.root, "secret/tls/a").as_deref() == Some("x")
    });
    // Without a client certificate the listener refuses the connection.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ca = std::fs::read_to_string(c._dir.path().join("ca.crt")).unwrap();
    let port = c.eu.repl_port;
    let outcome = rt.block_on(async move {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await;
        match channel {
            Err(_) => Err("refused at connect".to_owned()),
            Ok(channel) => {
                let mut client = arca_node::proto::replication_client::ReplicationClient::new(channel);
                client
                    .pull(arca_node::proto::PullRequest { region: "mallory".into(), ..Default::default() })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        }
    });
    assert!(outcome.is_err(), "a client without a region certificate pulled the feed");

    // What the listener served is audited in eu's log: the pulls that shipped change records
    // and the snapshot that seeded us, with us as the caller.
    let eu_log = common::audit_events_in(&c._dir.path().join("eu.db"), "eu");
    let served = |op: arca_audit::Operation| {
        eu_log
            .iter()
            .filter(|e| e.operation == op && e.actor.entity == "region:us" && e.outcome == Outcome::Ok)
            .map(|e| e.path.clone())
            .collect::<Vec<_>>()
    };
    let pulls = served(arca_audit::Operation::RegionPull);
    assert!(!pulls.is_empty() && pulls.iter().all(|p| p == "sys/replication/pull/us"), "{pulls:?}");
    let chunks = served(arca_audit::Operation::RegionSnapshot);
    assert!(!chunks.is_empty() && chunks.iter().all(|p| p == "sys/replication/snapshot/us"), "{chunks:?}");

    // Calls with a certificate the regions' CA signed, each refused and audited in the
    // refusing region's log under the request id its answer carries: a snapshot naming a
    // region the certificate does not name (mallory's certificate, as us); a pull from a
    // region that is no peer, though its certificate names it (mallory); a pull from the
    // standby, which is not the primary (eu's certificate, as eu); an unknown method (us's
    // certificate).
    let identity = |i: usize| {
        let (cert, key) = &c.tls_certs[i];
        tonic::transport::Identity::from_pem(
            std::fs::read_to_string(cert).unwrap(),
            std::fs::read_to_string(key).unwrap(),
        )
    };
    let ca = std::fs::read_to_string(c._dir.path().join("ca.crt")).unwrap();
    let connect = |port: u16, identity: tonic::transport::Identity| {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.clone()))
            .identity(identity)
            .domain_name("localhost");
        async move {
            tonic::transport::Endpoint::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap()
        }
    };
    let client = arca_node::proto::replication_client::ReplicationClient::new;
    let request_id = |status: &tonic::Status| {
        status.metadata().get("x-arca-request-id").expect("a request id").to_str().unwrap().to_owned()
    };
    let (us_port, eu_port) = (c.us.repl_port, c.eu.repl_port);
    let (impostor, stranger, refused_pull, unknown) = rt.block_on(async {
        let mut mallory = client(connect(eu_port, identity(2)).await);
        let snapshot = arca_node::proto::SnapshotRequest { region: "us".into(), ..Default::default() };
        let impostor = mallory.snapshot(snapshot).await.unwrap_err();
        let pull = arca_node::proto::PullRequest { region: "mallory".into(), ..Default::default() };
        let stranger = mallory.pull(pull).await.unwrap_err();
        let mut eu = client(connect(us_port, identity(0)).await);
        let pull = arca_node::proto::PullRequest { region: "eu".into(), ..Default::default() };
        let refused_pull = eu.pull(pull).await.unwrap_err();
        let mut grpc = tonic::client::Grpc::new(connect(eu_port, identity(1)).await);
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<arca_node::proto::Empty, arca_node::proto::Empty>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/arca.v1.Replication/Nope");
        let unknown =
            grpc.unary(tonic::Request::new(arca_node::proto::Empty {}), path, codec).await.unwrap_err();
        (impostor, stranger, refused_pull, unknown)
    });
    assert_eq!(impostor.code(), tonic::Code::PermissionDenied, "{impostor:?}");
    assert!(impostor.message().contains("does not name region \"us\""), "{impostor:?}");
    assert_eq!(stranger.code(), tonic::Code::PermissionDenied, "{stranger:?}");
    assert!(stranger.message().contains("\"mallory\" is not a peer"), "{stranger:?}");
    assert_eq!(refused_pull.code(), tonic::Code::FailedPrecondition, "{refused_pull:?}");
    let eu_log = common::audit_events_in(&c._dir.path().join("eu.db"), "eu");
    let event = eu_log.iter().find(|e| e.request_id == request_id(&impostor)).expect("the impostor's event");
    // The actor is the certificate that called, not the region it claimed.
    assert_eq!(event.operation, arca_audit::Operation::RegionSnapshot);
    assert_eq!(event.path, "sys/replication/snapshot/us");
    assert!(event.actor.entity.starts_with("certificate:localhost,mallory sha256:"), "{:?}", event.actor);
    assert_eq!(event.outcome, Outcome::Denied);
    let event = eu_log.iter().find(|e| e.request_id == request_id(&stranger)).expect("the stranger's event");
    assert_eq!(
        (event.operation, event.actor.entity.as_str(), event.path.as_str()),
        (arca_audit::Operation::RegionPull, "region:mallory", "sys/replication/pull/mallory")
    );
    assert_eq!(event.outcome, Outcome::Denied);
    let us_log = common::audit_events_in(&c._dir.path().join("us.db"), "us");
    let event =
        us_log.iter().find(|e| e.request_id == request_id(&refused_pull)).expect("the refused pull's event");
    assert_eq!(
        (event.operation, event.actor.entity.as_str(), event.path.as_str()),
        (arca_audit::Operation::RegionPull, "region:eu", "sys/replication/pull/eu")
    );
    assert_eq!(event.outcome, Outcome::Error { code: "failed_precondition".into() });
    assert_eq!(unknown.code(), tonic::Code::Unimplemented, "{unknown:?}");
    let event =
        eu_log.iter().find(|e| e.request_id == request_id(&unknown)).expect("the unknown call's event");
    assert_eq!(
        (event.operation, event.path.as_str()),
        (arca_audit::Operation::Rejected, "/arca.v1.Replication/Nope")
    );
    // No token is sent there: the caller is named by its certificate.
    assert!(event.actor.entity.starts_with("certificate:localhost,us sha256:"), "{:?}", event.actor);
}

/// Polls an async condition with the test deadline.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, ok: impl FnMut() -> F) {
    common::eventually(what, DEADLINE, ok).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_reads_from_the_standby_and_sends_writes_to_whichever_region_is_primary() {
    use arca_client::{Auth, Client, Config, ErrorKind, Retry};
    let mut c = cluster(false);
    let root = c.root.clone();
    let (eu_addr, us_addr) = (c.eu.server().addr.clone(), c.us.server().addr.clone());
    // The standby is listed first: reads are served there; writes are sent on to eu.
    let retry = Retry {
        rounds: 3,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    let config = Config::new(&format!("us={us_addr},eu={eu_addr}")).unwrap().auth(Auth::token(root.clone()));
    let client = Client::connect(config.retry(retry)).await.unwrap();
    let written = client.write("secret/app/db", [("v", "one")]).await.unwrap();
    assert_eq!(written.receipt.node, eu_addr, "the write went to the primary");
    eventually("the write to reach us", || async {
        client
            .read("secret/app/db")
            .await
            .is_ok_and(|s| s.get("v") == Some("one") && s.receipt.node == us_addr)
    })
    .await;

    // eu is lost: reads go on from us; writes cannot be served anywhere, and say so.
    c.eu.kill();
    let read = client.read("secret/app/db").await.unwrap();
    assert_eq!((read.get("v"), read.receipt.node.as_str()), (Some("one"), us_addr.as_str()));
    let refused = client.write("secret/app/db", [("v", "two")]).await.unwrap_err();
    assert!(matches!(refused.kind(), ErrorKind::ReadOnlyRegion { .. } | ErrorKind::Connect), "{refused:?}");
    assert!(!refused.is_maybe_committed());

    // us is promoted: the same client's writes now land there, with no reconfiguration.
    let promoted = arca(c.us.server(), Some(&root), &["region", "promote"]);
    assert_eq!(promoted.code, 0, "{}", promoted.stderr);
    let written = client.write("secret/app/db", [("v", "two")]).await.unwrap();
    assert_eq!((written.receipt.node.as_str(), written.version), (us_addr.as_str(), 2));
    let us_db = c._dir.path().join("us.db");
    let audited = || {
        common::audit_events_in(&us_db, "us")
            .into_iter()
            .find(|e| Some(&e.request_id) == written.receipt.request_id.as_ref())
    };
    // Durable before the reply: no waiting.
    let event = audited().expect("the write is in us's audit log");
    assert_eq!((event.operation, event.region.as_str()), (arca_audit::Operation::KvWrite, "us"));
}

#[test]
fn a_revocation_on_the_primary_is_refused_on_the_standby_once_replicated() {
    let c = cluster(false);
    let root = c.root.clone();
    assert_eq!(put(&c.eu, &root, "secret/app/db", "one").code, 0);
    assert_eq!(put(&c.eu, &root, "secret/app/db", "two").code, 0);
    wait_until("v2 to reach us", || get(&c.us, &root, "secret/app/db").as_deref() == Some("two"));
    let revoked = arca(c.eu.server(), Some(&root), &["kv", "revoke", "secret/app/db", "--versions", "2"]);
    assert_eq!(revoked.code, 0, "{}", revoked.stderr);
    // The standby refuses it as soon as the revocation has replicated — with "revoked".
    wait_until("the revocation to reach us", || {
        let run = arca(c.us.server(), Some(&root), &["kv", "get", "secret/app/db"]);
        run.code != 0 && run.stderr.contains("revoked")
    });
    let v1 = arca(
        c.us.server(),
        Some(&root),
        &["--format", "json", "kv", "get", "--version", "1", "secret/app/db"],
    );
    assert_eq!(v1.code, 0, "other versions stay readable: {}", v1.stderr);
    let us_db = c._dir.path().join("us.db");
    assert!(
        common::audit_events_in(&us_db, "us").iter().any(|e| e.operation == arca_audit::Operation::KvRead
            && e.outcome == arca_audit::Outcome::Error { code: "revoked".into() }),
        "the refused read is audited in us"
    );
}

#[test]
fn scheduled_rotations_run_on_the_primary_and_replicate_to_the_standby() {
    let c = cluster(false);
    let root = c.root.clone();
    assert_eq!(put(&c.eu, &root, "secret/app/key", "first").code, 0);
    let set = arca(
        c.eu.server(),
        Some(&root),
        &common::rotation_set("secret/app/key", "1", "api-key", &["--field", "v"]),
    );
    assert_eq!(set.code, 0, "{}", set.stderr);
    // The standby serves the rotated values as they replicate.
    wait_until("two rotations to reach us", || {
        let run = arca(
            c.us.server(),
            Some(&root),
            &["--format", "json", "kv", "metadata", "get", "secret/app/key"],
        );
        serde_json::from_str::<Value>(&run.stdout).ok().and_then(|m| m["stages"]["current"].as_u64())
            >= Some(3)
    });
    assert_ne!(get(&c.us, &root, "secret/app/key").as_deref(), Some("first"));
    // Only the primary rotated: the standby's scheduler never tried (no refused step in its log).
    let us_log = common::audit_events_in(&c._dir.path().join("us.db"), "us");
    assert!(
        !us_log.iter().any(|e| e.operation.name().starts_with("kv.rotate")),
        "the standby attempted rotations"
    );
    let eu_log = common::audit_events_in(&c._dir.path().join("eu.db"), "eu");
    assert!(eu_log.iter().filter(|e| e.operation == arca_audit::Operation::KvRotateFinish).count() >= 2);

    // eu is lost and us promoted: us's scheduler carries on rotating (the index replicated).
    let mut c = c;
    c.eu.kill();
    let promoted = arca(c.us.server(), Some(&root), &["region", "promote"]);
    assert_eq!(promoted.code, 0, "{}", promoted.stderr);
    wait_until("us to rotate on its own", || {
        common::audit_events_in(&c._dir.path().join("us.db"), "us")
            .iter()
            .any(|e| e.operation == arca_audit::Operation::KvRotateFinish)
    });
}

/// Every connection of both regions is recycled within a second (asked to close at 300 ms,
/// cut 300 ms later): the standby's pulls reconnect each time, and every write still reaches
/// it, in order.
#[test]
fn replication_keeps_up_while_its_connections_are_recycled() {
    let c = cluster_with(false, "max_connection_age_ms = 300\nmax_connection_age_grace_ms = 300\n");
    let root = c.root.clone();
    let accepted = |region: &Region| {
        sample(&region.server().metrics(), "arca_listener_accepted_total{listener=\"replication\"}")
    };
    // Write, and wait for each version on the standby, until the link has gone through
    // three more connections.
    let before = accepted(&c.eu);
    let started = std::time::Instant::now();
    let mut written = 0u64;
    while accepted(&c.eu) < before + 3 {
        assert!(started.elapsed() < DEADLINE, "the link was not recycled within {DEADLINE:?}");
        written += 1;
        let value = format!("v{written}");
        assert_eq!(put(&c.eu, &root, "secret/app/db", &value).code, 0);
        wait_until("the write to reach us", || get(&c.us, &root, "secret/app/db").as_deref() == Some(&value));
    }
    let run = arca(
        c.us.server(),
        Some(&root),
        &["--mounts", TEAM_MOUNT, "--format", "json", "kv", "metadata", "get", "secret/app/db"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let meta: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(meta["current_version"].as_u64(), Some(written), "every version replicated: {meta}");
    assert_eq!(sample(&c.us.server().metrics(), "arca_replication_link_up"), 1);
}
