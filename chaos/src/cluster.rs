//! The topology a drill or a chaos run starts: regions of real `arcad server` processes on
//! loopback (several nodes per region share the region's SQLite file), the link between
//! regions through fault-injecting proxies, clients reaching each node through its own
//! proxy, and — when asked — the Kafka-protocol broker (tansu, its data on a local
//! S3-protocol server so it survives a restart) with `arca-siem export` for the primary.
//! Every process's output is kept in the run directory for the report.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::proxy::Proxy;

pub use arca_testkit::free_port;

pub type Result<T> = std::result::Result<T, String>;

/// The run's clock and its timeline.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    events: Mutex<Vec<(u64, String, String)>>,
    quiet: bool,
}

impl Timeline {
    pub fn new(quiet: bool) -> Timeline {
        Timeline { start: Instant::now(), events: Mutex::default(), quiet }
    }

    pub fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Records an event of `kind` (`info`, `fault`, `heal`, `check`).
    pub fn note(&self, kind: &str, what: impl Into<String>) -> u64 {
        let at = self.ms();
        let what = what.into();
        if !self.quiet {
            eprintln!("{:>8.3}s  [{kind}] {what}", at as f64 / 1000.0);
        }
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push((at, kind.to_owned(), what));
        at
    }

    pub fn events(&self) -> Vec<(u64, String, String)> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One `arcad server` process.
#[derive(Debug)]
pub struct NodeProc {
    pub id: String,
    pub region: String,
    pub config: PathBuf,
    pub grpc: String,
    pub http_port: u16,
    /// Clients reach the node's HTTP API through this proxy (for connection resets).
    pub client_proxy: Proxy,
    pub child: Option<Child>,
    bin: PathBuf,
    env: Vec<(String, String)>,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl NodeProc {
    /// The node's HTTP API as clients see it (through the client proxy).
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_proxy.port)
    }

    /// The node's own HTTP listener (metrics, audit log), bypassing the proxy.
    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.with_extension("log"))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(self.bin.join("arcad"))
            .args(["server", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start arcad ({}): {e}", self.bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                if line.starts_with("arcad: grpc listening on ") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            let log = std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "node {} did not start ({status}); its log ends:\n{}",
                self.id,
                tail.join("\n")
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
        }
    }

    /// Runs `arca --format json ARGS` against this node.
    pub fn arca(&self, token: Option<&str>, args: &[&str]) -> Result<Value> {
        let mut cmd = Command::new(self.bin.join("arca"));
        cmd.args(["--format", "json"]).args(args).env("ARCA_ADDR", &self.grpc).env_remove("ARCA_TOKEN");
        if let Some(t) = token {
            cmd.env("ARCA_TOKEN", t);
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "arca {args:?} on {}: {}",
                self.id,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    pub fn status(&self, token: &str) -> Result<Value> {
        self.arca(Some(token), &["region", "status"])
    }

    pub fn unseal(&self, share: &str) -> bool {
        self.arca(None, &["operator", "unseal", share]).is_ok_and(|v| v["status"]["sealed"] == false)
    }
}

/// A region: its nodes, sharing one store file.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    pub nodes: Vec<NodeProc>,
    pub db: PathBuf,
}

impl Region {
    /// A running node of the region.
    pub fn any(&self) -> Result<&NodeProc> {
        self.nodes.iter().find(|n| n.running()).ok_or_else(|| format!("no node of {} is running", self.name))
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Shape {
    pub regions: Vec<&'static str>,
    pub nodes_per_region: usize,
    pub siem: bool,
    /// Extra environment for every `arcad` (the checker self-tests' fault injection).
    pub env: Vec<(String, String)>,
    /// Where the first region keeps its store (default: the run directory) — a small
    /// tmpfs for the disk-full scenario.
    pub first_region_disk: Option<PathBuf>,
}

/// The broker and the exporter.
#[derive(Debug)]
pub struct Siem {
    pub s3: Child,
    pub broker: Option<Child>,
    pub broker_port: u16,
    pub s3_endpoint: String,
    pub exporter: Option<Child>,
    pub config: PathBuf,
    pub metrics_port: u16,
    tools: PathBuf,
    bin: PathBuf,
    dir: PathBuf,
}

impl Drop for Siem {
    fn drop(&mut self) {
        self.stop_exporter();
        self.stop_broker();
        let _ = self.s3.kill();
        let _ = self.s3.wait();
    }
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).map_err(|e| e.to_string())
}

fn wait_port(port: u16, deadline: Duration) -> Result<()> {
    let end = Instant::now() + deadline;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            return Err(format!("nothing listens on port {port}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Siem {
    pub fn start_broker(&mut self) -> Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.broker_port);
        let child = Command::new(self.tools.join("tansu"))
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "s3://broker/",
            ])
            .env("AWS_ENDPOINT", &self.s3_endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "chaos")
            .env("AWS_SECRET_ACCESS_KEY", "chaos")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .stdout(log_file(&self.dir, "broker.log")?)
            .stderr(log_file(&self.dir, "broker.log")?)
            .spawn()
            .map_err(|e| format!("cannot start tansu: {e}"))?;
        self.broker = Some(child);
        wait_port(self.broker_port, Duration::from_secs(30))
    }

    pub fn stop_broker(&mut self) {
        if let Some(mut c) = self.broker.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_exporter(&mut self) -> Result<()> {
        let child = Command::new(self.bin.join("arca-siem"))
            .arg("-c")
            .arg(&self.config)
            .arg("export")
            .stdout(log_file(&self.dir, "exporter.log")?)
            .stderr(log_file(&self.dir, "exporter.log")?)
            .spawn()
            .map_err(|e| format!("cannot start arca-siem: {e}"))?;
        self.exporter = Some(child);
        wait_port(self.metrics_port, Duration::from_secs(30))
    }

    pub fn stop_exporter(&mut self) {
        if let Some(mut c) = self.exporter.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One exporter metric (`arca_siem_export_<name>`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let mut r = crate::client::agent()
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .call()
            .ok()?;
        let text = r.body_mut().read_to_string().ok()?;
        let prefix = format!("arca_siem_export_{name} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok())
    }

    /// `arca-siem verify` against the region's published key.
    pub fn verify(&self, vkey_url: &str) -> Result<(bool, String)> {
        let out = Command::new(self.bin.join("arca-siem"))
            .arg("-c")
            .arg(&self.config)
            .args(["verify", "--vkey-url", vkey_url, "--timeout-secs", "60"])
            .output()
            .map_err(|e| e.to_string())?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// `arca-siem watch`, verified against the region's published key, over the stream as it
    /// stands (`--until-end`, nothing published): whether it ran, its alerts (one JSON line
    /// each) and what it said on stderr (how far each log was proven).
    pub fn watch(&self, vkey_url: &str) -> Result<(bool, String, String)> {
        let out = Command::new(self.bin.join("arca-siem"))
            .arg("-c")
            .arg(&self.config)
            .args(["watch", "--until-end", "--no-publish", "--vkey-url", vkey_url, "--timeout-secs", "60"])
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Ok((out.status.success(), stdout, stderr))
    }
}

/// Everything a run started.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub regions: Vec<Region>,
    /// Per region: the proxy other regions reach its replication listeners through.
    pub links: Vec<Proxy>,
    pub siem: Option<Siem>,
    pub root: String,
    pub share: String,
}

impl Cluster {
    /// Writes the configs and starts every process; initialises the first region and
    /// unseals the others once they copied its state.
    pub fn start(dir: &Path, bin: &Path, tools: &Path, shape: &Shape, seed: u64) -> Result<Cluster> {
        let names = &shape.regions;
        let repl_ports: Vec<Vec<u16>> =
            names.iter().map(|_| (0..shape.nodes_per_region).map(|_| free_port()).collect()).collect();
        let links: Vec<Proxy> = repl_ports
            .iter()
            .enumerate()
            .map(|(i, ports)| {
                Proxy::start(ports.clone(), seed.wrapping_add(i as u64)).map_err(|e| e.to_string())
            })
            .collect::<Result<_>>()?;
        let mut regions = Vec::new();
        for (r, name) in names.iter().enumerate() {
            let db = match (&shape.first_region_disk, r) {
                (Some(disk), 0) => disk.join(format!("{name}.db")),
                _ => dir.join(format!("{name}.db")),
            };
            let mut nodes = Vec::new();
            for (n, repl_port) in repl_ports[r].iter().enumerate() {
                let (grpc, http) = (free_port(), free_port());
                let id = format!("{name}-{}", n + 1);
                let peers: String = names
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != r)
                    .map(|(j, peer)| {
                        format!("[[replication.peers]]\nregion = \"{peer}\"\nendpoint = \"http://127.0.0.1:{}\"\n", links[j].port)
                    })
                    .collect();
                let text = format!(
                    "[node]\nid = \"{id}\"\nregion = \"{name}\"\ncluster = \"chaos\"\n\n[storage]\nengine = \"sqlite\"\npath = \"{}\"\n\n\
                     [listener]\ngrpc_addr = \"127.0.0.1:{grpc}\"\ndangerous_plaintext = true\nhttp_addr = \"127.0.0.1:{http}\"\n\n\
                     [sequencer]\ninterval_ms = 50\nlease_ttl_ms = 1000\n\n\
                     [replication]\nlisten_addr = \"127.0.0.1:{}\"\ndangerous_plaintext = true\ninitial_primary = \"{}\"\n{peers}",
                    db.display(),
                    repl_port,
                    names[0]
                );
                let config = dir.join(format!("{id}.toml"));
                std::fs::write(&config, text).map_err(|e| e.to_string())?;
                let client_proxy =
                    Proxy::start(vec![http], seed.wrapping_mul(31).wrapping_add((r * 8 + n) as u64))
                        .map_err(|e| e.to_string())?;
                nodes.push(NodeProc {
                    id,
                    region: name.to_string(),
                    config,
                    grpc: format!("http://127.0.0.1:{grpc}"),
                    http_port: http,
                    client_proxy,
                    child: None,
                    bin: bin.to_path_buf(),
                    env: shape.env.clone(),
                });
            }
            regions.push(Region { name: name.to_string(), nodes, db });
        }
        for region in &mut regions {
            for node in &mut region.nodes {
                node.start()?;
            }
        }
        let first = regions[0].nodes.first().ok_or("no node")?;
        let init = first.arca(None, &["operator", "init", "--key-shares", "1", "--key-threshold", "1"])?;
        let share = init["unseal_keys"][0].as_str().ok_or("no unseal key")?.to_owned();
        let root = init["root_token"].as_str().ok_or("no root token")?.to_owned();
        for region in &regions {
            for node in &region.nodes {
                wait_for(&format!("{} to unseal", node.id), Duration::from_secs(60), || node.unseal(&share))?;
            }
        }
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            regions,
            links,
            siem: None,
            root,
            share,
        };
        if shape.siem {
            cluster.start_siem(tools)?;
        }
        Ok(cluster)
    }

    fn start_siem(&mut self, tools: &Path) -> Result<()> {
        let s3_port = free_port();
        let s3 = Command::new(tools.join("venv/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &s3_port.to_string()])
            .stdout(log_file(&self.dir, "s3.log")?)
            .stderr(log_file(&self.dir, "s3.log")?)
            .spawn()
            .map_err(|e| format!("cannot start the S3 server (run scripts/setup.sh): {e}"))?;
        wait_port(s3_port, Duration::from_secs(30))?;
        let s3_endpoint = format!("http://127.0.0.1:{s3_port}");
        crate::client::agent()
            .put(format!("{s3_endpoint}/broker"))
            .send_empty()
            .map_err(|e| e.to_string())?;
        let (broker_port, metrics_port) = (free_port(), free_port());
        let config = self.dir.join("siem.toml");
        let region = &self.regions[0];
        std::fs::write(
            &config,
            format!(
                "region = \"{}\"\n\n[storage]\nengine = \"sqlite\"\npath = \"{}\"\n\n[kafka]\nbrokers = \"127.0.0.1:{broker_port}\"\n\n\
                 [export]\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\ndelivery_timeout_ms = 3000\nmax_backoff_ms = 500\nlease_ttl_ms = 1500\n",
                region.name,
                region.db.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut siem = Siem {
            s3,
            broker: None,
            broker_port,
            s3_endpoint,
            exporter: None,
            config,
            metrics_port,
            tools: tools.to_path_buf(),
            bin: self.bin.clone(),
            dir: self.dir.clone(),
        };
        siem.start_broker()?;
        siem.start_exporter()?;
        self.siem = Some(siem);
        Ok(())
    }

    /// Every node, as the workload's clients know them.
    pub fn targets(&self) -> Vec<crate::client::Target> {
        self.regions
            .iter()
            .flat_map(|r| {
                r.nodes.iter().map(|n| crate::client::Target {
                    region: r.name.clone(),
                    node: n.id.clone(),
                    url: n.client_url(),
                })
            })
            .collect()
    }

    pub fn region(&self, name: &str) -> Result<&Region> {
        self.regions.iter().find(|r| r.name == name).ok_or_else(|| format!("no region {name}"))
    }

    /// The region that takes writes now (as its own nodes say).
    pub fn primary(&self) -> Result<String> {
        for r in &self.regions {
            if let Ok(node) = r.any()
                && node.status(&self.root).is_ok_and(|s| s["role"] == "primary")
            {
                return Ok(r.name.clone());
            }
        }
        Err("no region is primary".into())
    }

    /// Every process log of the run.
    pub fn logs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn describe(&self) -> Value {
        json!({
            "regions": self.regions.iter().map(|r| json!({"name": r.name, "nodes": r.nodes.iter().map(|n| n.id.clone()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
            "siem": self.siem.is_some(),
        })
    }
}

pub fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + deadline;
    while !ok() {
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}
