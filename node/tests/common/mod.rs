//! Helpers shared by the end-to-end tests: real `arcad` processes on loopback, the real
//! `arca` binary, and direct reads of the store file.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arca_audit::Event;
use arca_store::{RangeOptions, SqliteConfig, SqliteStore, StoreExt, prefix_end};
use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub addr: String,
    /// The log's URL: `http://…/audit/local`.
    pub log_url: String,
    /// The HTTP listener: `http://host:port` (the Vault-compatible API is under `/v1/`).
    pub http: String,
    pub stderr_log: PathBuf,
}

impl Server {
    /// The node's `/metrics` page.
    pub fn metrics(&self) -> String {
        ureq::get(format!("{}/metrics", self.http)).call().unwrap().body_mut().read_to_string().unwrap()
    }
}

/// The value of the sample `name{labels}` on a `/metrics` page.
pub fn sample(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name_and_labels} in /metrics"))
        .parse()
        .unwrap()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `arcad dev` on free ports and waits (up to 30 s) for its listening lines.
pub fn start(data_dir: &Path, node_id: &str) -> Server {
    start_with(data_dir, node_id, &[])
}

/// Starts `arcad dev` without waiting for it (for runs that are meant to crash).
pub fn spawn(data_dir: &Path, node_id: &str, env: &[(&str, &str)]) -> Child {
    let stderr_log = data_dir.with_file_name(format!("{node_id}.stderr"));
    Command::new(env!("CARGO_BIN_EXE_arcad"))
        .args(["dev", "--data-dir"])
        .arg(data_dir)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--node-id", node_id])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr_log).unwrap())
        .spawn()
        .unwrap()
}

/// Like [`start`], with extra environment variables.
pub fn start_with(data_dir: &Path, node_id: &str, env: &[(&str, &str)]) -> Server {
    start_args(data_dir, node_id, env, &[])
}

/// Like [`start_with`], with extra `arcad dev` arguments.
pub fn start_args(data_dir: &Path, node_id: &str, env: &[(&str, &str)], extra: &[&str]) -> Server {
    start_at(data_dir, node_id, "127.0.0.1:0", env, extra)
}

/// Like [`start_args`], with gRPC on `grpc_addr` (for restarts on the same address).
pub fn start_at(
    data_dir: &Path,
    node_id: &str,
    grpc_addr: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Server {
    let stderr_log = data_dir.with_file_name(format!("{node_id}.stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_arcad"))
        .args(["dev", "--data-dir"])
        .arg(data_dir)
        .args(["--grpc-addr", grpc_addr, "--http-addr", "127.0.0.1:0", "--node-id", node_id])
        .args(extra)
        .env("RUST_LOG", "trace")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("arcad: grpc listening on ") {
                let _ = tx.send(("grpc", addr.to_owned()));
            }
            if let Some(addr) = line.strip_prefix("arcad: http listening on ") {
                let _ = tx.send(("http", addr.to_owned()));
            }
        }
    });
    let (mut grpc, mut http) = (None, None);
    while grpc.is_none() || http.is_none() {
        let (kind, addr) =
            rx.recv_timeout(Duration::from_secs(30)).expect("arcad did not start listening in time");
        if kind == "grpc" { grpc = Some(addr) } else { http = Some(addr) }
    }
    let (grpc, http) = (grpc.unwrap(), http.unwrap());
    Server {
        child,
        addr: format!("http://{grpc}"),
        log_url: format!("http://{http}/audit/local"),
        http: format!("http://{http}"),
        stderr_log,
    }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn arca(server: &Server, token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arca"));
    cmd.args(args).env("ARCA_ADDR", &server.addr).env_remove("ARCA_TOKEN");
    if let Some(token) = token {
        cmd.env("ARCA_TOKEN", token);
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `arca kv rotation set PATH --interval-secs SECS --rotator ROTATOR REST…`, as arguments.
pub fn rotation_set<'a>(
    path: &'a str,
    interval_secs: &'a str,
    rotator: &'a str,
    rest: &[&'a str],
) -> Vec<&'a str> {
    let mut args =
        vec!["kv", "rotation", "set", path, "--interval-secs", interval_secs, "--rotator", rotator];
    args.extend_from_slice(rest);
    args
}

/// Runs `arca --format json …`, expects success, returns the JSON.
pub fn ok_json(server: &Server, token: Option<&str>, args: &[&str], calls: &mut usize) -> Value {
    let mut full = vec!["--format", "json"];
    full.extend_from_slice(args);
    let run = arca(server, token, &full);
    *calls += 1;
    assert_eq!(run.code, 0, "arca {args:?} failed: {}", run.stderr);
    let value: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(value["audit_position"].is_string(), "every reply carries its audit position: {value}");
    value
}

pub fn fails(server: &Server, token: Option<&str>, args: &[&str], code: i32, calls: &mut usize) -> String {
    let run = arca(server, token, args);
    *calls += 1;
    assert_eq!(run.code, code, "arca {args:?}: expected exit {code}, got {} ({})", run.code, run.stderr);
    run.stderr
}

pub fn audit_events(db: &Path) -> Vec<Event> {
    audit_events_in(db, "local")
}

/// The audit events of `region`'s log in the store file `db`.
pub fn audit_events_in(db: &Path, region: &str) -> Vec<Event> {
    let store = SqliteStore::open(SqliteConfig::new(db)).unwrap();
    let prefix = arca_node::keys::audit_events(region);
    let rows = store
        .transact(|tx| tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default()))
        .unwrap()
        .value;
    rows.iter().map(|kv| Event::decode(&kv.value).unwrap()).collect()
}

/// Polls the log's checkpoint (up to `deadline`) until it covers at least `size` entries.
pub fn wait_for_log(server: &Server, size: u64, deadline: Duration) -> u64 {
    let started = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    loop {
        if let Ok(mut response) = agent.get(format!("{}/checkpoint", server.log_url)).call()
            && response.status() == 200
        {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let seen: u64 = text.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0);
            if seen >= size {
                return seen;
            }
        }
        assert!(started.elapsed() < deadline, "the log did not reach {size} entries within {deadline:?}");
        // Poll, not wait: the condition is re-checked every round.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log's verifier key, as the node publishes it.
pub fn vkey(server: &Server) -> String {
    let run = arca(server, None, &["audit", "vkey", "--url", &server.log_url]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.stdout.trim().to_owned()
}

/// Writes `dir/arcad.toml` for one node `n1` of region `local` on `dir/arca.db`, its gRPC and
/// HTTP listeners on free loopback ports: `listener` is added to `[listener]` (TLS files,
/// `dangerous_plaintext`, limits), `rest` after it (other sections).
pub fn server_config(dir: &Path, listener: &str, rest: &str) -> PathBuf {
    let path = dir.join("arcad.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nid = \"n1\"\nregion = \"local\"\ncluster = \"test\"\n\n[storage]\nengine = \"sqlite\"\npath = \"{}\"\n\n\
             [listener]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n{listener}{rest}",
            dir.join("arca.db").display()
        ),
    )
    .unwrap();
    path
}

/// Starts `arcad server --config CONFIG` with extra environment variables and waits for its
/// listening lines; its stderr is appended to CONFIG with the extension `stderr`.
pub fn start_server(config: &Path, env: &[(&str, &str)]) -> Server {
    let stderr_log = config.with_extension("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_arcad"))
        .args(["server", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&stderr_log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            for (kind, prefix) in
                [("grpc", "arcad: grpc listening on "), ("http", "arcad: http listening on ")]
            {
                if let Some(addr) = line.strip_prefix(prefix) {
                    let _ = tx.send((kind, addr.to_owned()));
                }
            }
        }
    });
    let (mut grpc, mut http) = (None, None);
    while grpc.is_none() || http.is_none() {
        let (kind, addr) = rx.recv_timeout(Duration::from_secs(30)).expect("arcad did not start");
        if kind == "grpc" { grpc = Some(addr) } else { http = Some(addr) }
    }
    let http = http.unwrap();
    Server {
        child,
        addr: format!("http://{}", grpc.unwrap()),
        log_url: format!("http://{http}/audit/local"),
        http: format!("http://{http}"),
        stderr_log,
    }
}

/// A test certificate authority writing its files (mode 0600) under a directory.
pub struct TestCa {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    /// The CA certificate (PEM file).
    pub ca_file: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = write_private(&dir.join("ca.crt"), &ca.pem());
        TestCa { dir: dir.to_owned(), ca, ca_file }
    }

    /// A certificate for `san` signed by the CA: (`<name>.crt`, `<name>.key`).
    pub fn issue(&self, name: &str, san: &str) -> (PathBuf, PathBuf) {
        self.issue_for(name, &[san])
    }

    /// A certificate for the DNS names `sans` (subjectAltName), as `<name>.crt` and `.key`.
    pub fn issue_for(&self, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(sans).unwrap().signed_by(&key, &self.ca).unwrap();
        (
            write_private(&self.dir.join(format!("{name}.crt")), &cert.pem()),
            write_private(&self.dir.join(format!("{name}.key")), &key.serialize_pem()),
        )
    }
}

fn write_private(path: &Path, contents: &str) -> PathBuf {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.to_owned()
}

/// How often [`wait_until`] and [`eventually`] look again.
const POLL: Duration = Duration::from_millis(50);

/// Polls `ok` until it holds; fails the test, naming `what`, once `within` has passed.
pub fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// [`wait_until`] for tests on tokio: the condition is a future, and the wait yields.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut ok: impl FnMut() -> F,
) {
    let end = Instant::now() + within;
    while !ok().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}
