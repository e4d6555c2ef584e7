//! Real processes on loopback for the SIEM tests: `arcad dev` nodes, the tansu broker
//! (memory storage, or S3 storage on a local S3-protocol server so that it survives a
//! restart), the `arca-siem` exporter, and clients of the node's Vault-compatible API.
//! Every wait is on a condition with a deadline, never a fixed sleep.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tool(name: &str) -> PathBuf {
    let path = workspace().join(".tools").join(name);
    assert!(path.exists(), "{} is missing: run scripts/setup.sh", path.display());
    path
}

/// A binary of the workspace, built beside `arca-siem`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let siem = PathBuf::from(env!("CARGO_BIN_EXE_arca-siem"));
    let path = siem.with_file_name(name);
    assert!(path.exists(), "{} is missing: build it with `cargo build -p arca-node --bins`", path.display());
    path
}

pub use arca_testkit::free_port;

/// Polls `condition` every 50 ms until it holds; panics with `what` at the deadline.
pub fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_millis(200))
        .is_ok()
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).unwrap()
}

/// A local S3-protocol server (moto, from PyPI) holding the broker's data.
pub struct S3 {
    child: Child,
    pub endpoint: String,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3 {
    pub fn start(dir: &Path, bucket: &str) -> S3 {
        let port = free_port();
        let child = Command::new(tool("venv/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log_file(dir, "s3.stdout"))
            .stderr(log_file(dir, "s3.stderr"))
            .spawn()
            .unwrap();
        let s3 = S3 { child, endpoint: format!("http://127.0.0.1:{port}") };
        wait_until("the S3 server", Duration::from_secs(30), || port_open(port));
        ureq::put(&format!("{}/{bucket}", s3.endpoint)).send_empty().expect("create the bucket");
        s3
    }
}

/// Where the broker keeps its data.
#[derive(Clone)]
pub enum Storage {
    Memory,
    S3 { endpoint: String, bucket: String },
}

/// The tansu broker, a real Kafka-protocol server.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    storage: Storage,
    dir: PathBuf,
    starts: u32,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Broker {
    pub fn start(dir: &Path, storage: Storage) -> Broker {
        let mut b = Broker { child: None, port: free_port(), storage, dir: dir.to_path_buf(), starts: 0 };
        b.restart();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        self.starts += 1;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(tool("tansu"));
        cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url]);
        match &self.storage {
            Storage::Memory => {
                cmd.args(["--storage-engine", "memory://tansu/"]);
            }
            Storage::S3 { endpoint, bucket } => {
                cmd.args(["--storage-engine", &format!("s3://{bucket}/")])
                    .env("AWS_ENDPOINT", endpoint)
                    .env("AWS_ALLOW_HTTP", "true")
                    .env("AWS_ACCESS_KEY_ID", "arca-test")
                    .env("AWS_SECRET_ACCESS_KEY", "arca-test")
                    .env("AWS_DEFAULT_REGION", "us-east-1");
            }
        }
        let child = cmd
            .stdout(log_file(&self.dir, &format!("broker-{}.stdout", self.starts)))
            .stderr(log_file(&self.dir, &format!("broker-{}.stderr", self.starts)))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_until("the broker", Duration::from_secs(30), || port_open(port));
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    /// SIGSTOP: the broker stops answering, connections stay open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

/// An `arcad dev` node.
pub struct Node {
    child: Child,
    pub http: String,
    pub data_dir: PathBuf,
    pub token: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    pub fn start(dir: &Path, node_id: &str) -> Node {
        let data_dir = dir.join(format!("{node_id}-data"));
        let mut child = Command::new(workspace_bin("arcad"))
            .args(["dev", "--data-dir"])
            .arg(&data_dir)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--node-id", node_id])
            .stdout(Stdio::piped())
            .stderr(log_file(dir, &format!("{node_id}.stderr")))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("arcad: http listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).expect("arcad did not start listening in time");
        let token = std::fs::read_to_string(data_dir.join("root-token")).unwrap().trim().to_owned();
        Node { child, http: format!("http://{addr}"), data_dir, token }
    }

    pub fn db(&self) -> PathBuf {
        self.data_dir.join("arca.db")
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/v1/{path}", self.http);
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let response = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(t) = token {
                    r = r.header("X-Vault-Token", t);
                }
                r.call()
            }
            (_, body) => {
                let mut r = agent.post(&url);
                if let Some(t) = token {
                    r = r.header("X-Vault-Token", t);
                }
                r.header("Content-Type", "application/json").send(body.unwrap_or(Value::Null).to_string())
            }
        };
        let mut response = response.unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, value)
    }

    /// Writes `secret/<path>` as root.
    pub fn put(&self, path: &str, value: &str) -> u16 {
        self.call(
            "POST",
            &format!("secret/data/{path}"),
            Some(&self.token),
            Some(serde_json::json!({"data": {"v": value}})),
        )
        .0
    }

    /// Reads `secret/<path>` with `token`.
    pub fn get_as(&self, token: &str, path: &str) -> u16 {
        self.call("GET", &format!("secret/data/{path}"), Some(token), None).0
    }

    pub fn get(&self, path: &str) -> u16 {
        self.get_as(&self.token.clone(), path)
    }

    /// Creates a token with only `policy` (reading `secret/data/<allowed>*`).
    pub fn token_reading(&self, name: &str, allowed: &str) -> String {
        let policy = format!("path \"secret/data/{allowed}*\" {{ capabilities = [\"read\"] }}");
        let (s, _) = self.call(
            "POST",
            &format!("sys/policies/acl/{name}"),
            Some(&self.token),
            Some(serde_json::json!({"policy": policy})),
        );
        assert!(s < 300, "policy write: {s}");
        let (s, v) = self.call(
            "POST",
            "auth/token/create",
            Some(&self.token),
            Some(serde_json::json!({"policies": [name], "display_name": name})),
        );
        assert!(s < 300, "token create: {s} {v}");
        v["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// Reads `secret/<path>` over a connection from the local address `from` (any
    /// 127.0.0.0/8 address): a client on another host, as the audit log sees it.
    pub fn get_from(&self, from: &str, token: &str, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr: std::net::SocketAddr = self.http.trim_start_matches("http://").parse().unwrap();
        let request = format!(
            "GET /v1/secret/data/{path} HTTP/1.1\r\nHost: {addr}\r\nX-Vault-Token: {token}\r\nConnection: close\r\n\r\n"
        );
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let response = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            let mut stream = socket.connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            stream.read_to_end(&mut out).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        });
        response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    pub fn destroy(&self, path: &str, versions: &[u64]) -> u16 {
        self.call(
            "POST",
            &format!("secret/destroy/{path}"),
            Some(&self.token),
            Some(serde_json::json!({"versions": versions})),
        )
        .0
    }

    /// Every audit event the node has recorded (sequenced or not), read from its store.
    pub fn event_count(&self) -> u64 {
        use arca_store::StoreExt;
        let store = arca_store::SqliteStore::open(arca_store::SqliteConfig::new(self.db())).unwrap();
        let prefix = arca_node::keys::audit_events("local");
        let end = arca_store::prefix_end(&prefix).unwrap();
        store
            .transact(|tx| {
                tx.get_range(&prefix, &end, arca_store::RangeOptions::limit(1_000_000))
                    .map(|rows| rows.len() as u64)
            })
            .unwrap()
            .value
    }

    /// The log's size as its latest checkpoint says.
    pub fn log_size(&self) -> u64 {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let Ok(mut r) = agent.get(&format!("{}/audit/local/checkpoint", self.http)).call() else { return 0 };
        if r.status() != 200 {
            return 0;
        }
        let text = r.body_mut().read_to_string().unwrap_or_default();
        text.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0)
    }

    pub fn vkey_url(&self) -> String {
        format!("{}/audit/local/vkey", self.http)
    }
}

/// Writes an `arca-siem` configuration for `node` and `brokers`; returns its path.
pub fn siem_config(dir: &Path, node: &Node, brokers: &str, metrics_port: u16, extra: &str) -> PathBuf {
    let path = dir.join("siem.toml");
    let text = format!(
        "region = \"local\"\n\n[storage]\nengine = \"sqlite\"\npath = \"{}\"\n\n[kafka]\nbrokers = \"{brokers}\"\n\n\
         [export]\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\ndelivery_timeout_ms = 3000\nmax_backoff_ms = 500\n\n{extra}",
        node.db().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The `arca-siem export` process.
pub struct Exporter {
    child: Child,
    pub metrics_url: String,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Exporter {
    pub fn start(dir: &Path, config: &Path, metrics_port: u16) -> Exporter {
        let child = Command::new(env!("CARGO_BIN_EXE_arca-siem"))
            .args(["-c"])
            .arg(config)
            .arg("export")
            .stdout(log_file(dir, "exporter.stdout"))
            .stderr(log_file(dir, "exporter.stderr"))
            .spawn()
            .unwrap();
        let e = Exporter { child, metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics") };
        wait_until("the exporter's metrics", Duration::from_secs(30), || port_open(metrics_port));
        e
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One metric's value (`arca_siem_export_<name>`).
    pub fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&self.metrics_url).call().unwrap().body_mut().read_to_string().unwrap();
        let prefix = format!("arca_siem_export_{name} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    }

    /// Waits until every event the node recorded so far is sequenced and delivered;
    /// returns the log's size then.
    pub fn wait_caught_up(&self, node: &Node, deadline: Duration) -> u64 {
        let size = node.event_count();
        wait_until(&format!("export of {size} entries"), deadline, || {
            node.log_size() >= size && self.metric("next_index") as u64 >= size
        });
        size
    }
}

/// Runs `arca-siem` with `args`; returns (exit code, stdout, stderr).
pub fn siem(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_arca-siem")).arg("-c").arg(config).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every message of a topic, read by tansu's own client (`tansu cat consume`): a consumer
/// that shares no code with the exporter. Returns the JSON values in offset order.
pub fn consume_independently(brokers: &str, topic: &str, expect: usize) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while out.len() < expect {
        assert!(Instant::now() < end, "only {} of {expect} messages consumed from {topic}", out.len());
        let run = Command::new(tool("tansu"))
            .args(["cat", "consume", topic, "--broker", &format!("tcp://{brokers}"), "--partition", "0"])
            .args(["--max-wait-time-ms", "500", "--fetch-offset", &out.len().to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&run.stdout);
        let batch: Vec<Value> = text
            .lines()
            .filter(|l| l.starts_with('['))
            .flat_map(|l| serde_json::from_str::<Vec<Value>>(l).unwrap_or_default())
            .collect();
        out.extend(batch.into_iter().map(|m| m["value"].clone()));
    }
    out
}

/// A whole export setup: a broker, a dev node, an `arca-siem` configuration and a running
/// exporter, in one temporary directory. Fields drop in order: processes first.
pub struct Stack {
    pub exporter: Exporter,
    pub node: Node,
    pub broker: Broker,
    pub config: PathBuf,
    pub metrics_port: u16,
    _s3: Option<S3>,
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// With the broker's data in memory, or (`durable`) on a local S3-protocol server so
    /// that it survives a broker restart. `export` is extra `[export]` settings.
    pub fn start(durable: bool, export: &str) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let s3 = durable.then(|| S3::start(dir.path(), "broker"));
        let storage = match &s3 {
            Some(s3) => Storage::S3 { endpoint: s3.endpoint.clone(), bucket: "broker".into() },
            None => Storage::Memory,
        };
        let broker = Broker::start(dir.path(), storage);
        let node = Node::start(dir.path(), "n1");
        let metrics_port = free_port();
        let config = siem_config(dir.path(), &node, &broker.brokers(), metrics_port, export);
        let exporter = Exporter::start(dir.path(), &config, metrics_port);
        Stack { exporter, node, broker, config, metrics_port, _s3: s3, dir }
    }
}
