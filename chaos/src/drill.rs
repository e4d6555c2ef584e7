//! The failover drill (`arca-chaos drill failover`): two regions of real `arcad` processes on loopback, a
//! workload, the loss of the primary region, promotion of the standby, the old primary's
//! return (fenced, demoted, divergence report), and a planned failback — with a timeline,
//! replication lag under sustained writes, RTO and RPO.
//!
//! RTO: from the primary's `kill -9` to the first write accepted by the promoted region.
//! RPO: writes the old primary acknowledged that the promoted region does not have — each
//! listed, and checked against the divergence report the old primary writes on demotion.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

type Result<T> = std::result::Result<T, String>;

/// An acknowledged write: its number, the region that took it, when (drill ms).
type Ack = (u64, &'static str, u64);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0)).unwrap_or(0)
}

/// The drill's clock and its timeline.
struct Timeline {
    start: Instant,
    events: Mutex<Vec<(u64, String)>>,
    quiet: bool,
}

impl Timeline {
    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn note(&self, what: impl Into<String>) -> u64 {
        let at = self.ms();
        let what = what.into();
        if !self.quiet {
            eprintln!("{:>8.3}s  {what}", at as f64 / 1000.0);
        }
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push((at, what));
        at
    }
}

/// One region's single node.
struct Region {
    name: &'static str,
    config: PathBuf,
    grpc: String,
    http: String,
    child: Option<Child>,
    bin: PathBuf,
}

impl Drop for Region {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Region {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.with_extension("log"))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(self.bin.join("arcad"))
            .args(["server", "--config"])
            .arg(&self.config)
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
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("region {} did not start", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn arca(&self, token: Option<&str>, args: &[&str]) -> Result<Value> {
        let mut cmd = Command::new(self.bin.join("arca"));
        cmd.args(["--format", "json"]).args(args).env("ARCA_ADDR", &self.grpc).env_remove("ARCA_TOKEN");
        if let Some(t) = token {
            cmd.env("ARCA_TOKEN", t);
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "arca {args:?} on {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    fn status(&self, token: &str) -> Result<Value> {
        self.arca(Some(token), &["region", "status"])
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(1500)))
        .build()
        .into()
}

/// Writes `secret/<path>` through the Vault API; true when acknowledged.
fn write(agent: &ureq::Agent, http: &str, token: &str, path: &str, value: &str) -> bool {
    agent
        .post(format!("{http}/v1/secret/data/{path}"))
        .header("X-Vault-Token", token)
        .header("Content-Type", "application/json")
        .send(json!({"data": {"v": value}}).to_string())
        .is_ok_and(|r| r.status() == 200)
}

/// Reads `secret/<path>`'s value.
fn read(agent: &ureq::Agent, http: &str, token: &str, path: &str) -> Option<String> {
    let mut r =
        agent.get(format!("{http}/v1/secret/data/{path}")).header("X-Vault-Token", token).call().ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
    v["data"]["data"]["v"].as_str().map(str::to_owned)
}

fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + deadline;
    while !ok() {
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn configure(dir: &Path, bin: &Path) -> Result<(Region, Region)> {
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let mut regions = Vec::new();
    for (i, (name, peer)) in [("eu", "us"), ("us", "eu")].into_iter().enumerate() {
        let (grpc, http, repl) = (ports[i * 3], ports[i * 3 + 1], ports[i * 3 + 2]);
        let peer_repl = ports[(1 - i) * 3 + 2];
        let config = dir.join(format!("{name}.toml"));
        let text = format!(
            "[node]\nid = \"{name}-1\"\nregion = \"{name}\"\ncluster = \"drill\"\n\n[storage]\nengine = \"sqlite\"\npath = \"{}\"\n\n\
             [listener]\ngrpc_addr = \"127.0.0.1:{grpc}\"\ndangerous_plaintext = true\nhttp_addr = \"127.0.0.1:{http}\"\n\n\
             [replication]\nlisten_addr = \"127.0.0.1:{repl}\"\ndangerous_plaintext = true\ninitial_primary = \"eu\"\n\
             [[replication.peers]]\nregion = \"{peer}\"\nendpoint = \"http://127.0.0.1:{peer_repl}\"\n",
            dir.join(format!("{name}.db")).display()
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        regions.push(Region {
            name,
            config,
            grpc: format!("http://127.0.0.1:{grpc}"),
            http: format!("http://127.0.0.1:{http}"),
            child: None,
            bin: bin.to_path_buf(),
        });
    }
    let us = regions.pop().ok_or("no us")?;
    let eu = regions.pop().ok_or("no eu")?;
    Ok((eu, us))
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[allow(clippy::too_many_lines)]
pub fn failover(bin: &Path, dir: &Path, steady: Duration, writers: usize, json_only: bool) -> Result<bool> {
    let t = Arc::new(Timeline { start: Instant::now(), events: Mutex::default(), quiet: json_only });
    let (mut eu, mut us) = configure(dir, bin)?;
    eu.start()?;
    us.start()?;
    t.note("two regions started: eu (primary), us (standby)");
    let init = eu.arca(None, &["operator", "init", "--key-shares", "1", "--key-threshold", "1"])?;
    let share = init["unseal_keys"][0].as_str().ok_or("no unseal key")?.to_owned();
    let root = init["root_token"].as_str().ok_or("no root token")?.to_owned();
    eu.arca(None, &["operator", "unseal", &share])?;
    wait_for("us to copy eu's state and unseal", Duration::from_secs(30), || {
        us.arca(None, &["operator", "unseal", &share]).is_ok_and(|v| v["status"]["sealed"] == false)
    })?;
    t.note("eu initialised and unsealed; us seeded and unsealed with eu's key");

    // 1. Replication lag under sustained writes: writers on eu; a prober times how long the
    //    newest acknowledged write takes to be readable on us.
    let stop = Arc::new(AtomicBool::new(false));
    let last_ack: Arc<Mutex<Option<(String, Instant)>>> = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..writers {
        let (stop, last_ack, acked, http, root) =
            (stop.clone(), last_ack.clone(), acked.clone(), eu.http.clone(), root.clone());
        handles.push(std::thread::spawn(move || {
            let agent = agent();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let path = format!("drill/steady/{w}-{n}");
                if write(&agent, &http, &root, &path, "x") {
                    acked.fetch_add(1, Ordering::Relaxed);
                    *last_ack.lock().unwrap_or_else(|p| p.into_inner()) = Some((path, Instant::now()));
                }
                n += 1;
            }
        }));
    }
    let prober = {
        let (stop, last_ack, http, root) = (stop.clone(), last_ack.clone(), us.http.clone(), root.clone());
        std::thread::spawn(move || {
            let agent = agent();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let probe = last_ack.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some((path, at)) = probe else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let give_up = Instant::now() + Duration::from_secs(10);
                while read(&agent, &http, &root, &path).is_none() && Instant::now() < give_up {
                    std::thread::sleep(Duration::from_millis(2));
                }
                samples.push(at.elapsed().as_millis() as u64);
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };
    let steady_from = Instant::now();
    t.note(format!("steady phase: {writers} writers on eu for {}s, lag probed on us", steady.as_secs()));
    std::thread::sleep(steady);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let mut lag = prober.join().map_err(|_| "the prober panicked")?;
    let write_rate = acked.load(Ordering::Relaxed) as f64 / steady_from.elapsed().as_secs_f64();
    lag.sort_unstable();
    t.note(format!(
        "steady phase done: {write_rate:.0} writes/s; replication lag p50 {} ms, p99 {} ms, max {} ms ({} probes)",
        quantile(&lag, 0.5),
        quantile(&lag, 0.99),
        lag.last().copied().unwrap_or(0),
        lag.len()
    ));

    // 2. The failover: one writer, sequential keys, to whichever region takes writes.
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let targets = [("eu", eu.http.clone()), ("us", us.http.clone())];
    let preferred = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, pause, acks, root, t, preferred) =
            (stop.clone(), pause.clone(), acks.clone(), root.clone(), t.clone(), preferred.clone());
        std::thread::spawn(move || {
            let agent = agent();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if pause.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                // A client that knows both regions: the preferred one first, then the other.
                let first = preferred.load(Ordering::Relaxed) as usize;
                for k in [first, 1 - first] {
                    let (name, http) = &targets[k];
                    if write(&agent, http, &root, &format!("drill/fo/{n}"), &n.to_string()) {
                        acks.lock().unwrap_or_else(|p| p.into_inner()).push((n, name, t.ms()));
                        preferred.store(k as u64, Ordering::Relaxed);
                        n += 1;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    wait_for("writes to flow", Duration::from_secs(10), || {
        acks.lock().map(|a| a.len() >= 100).unwrap_or(false)
    })?;
    let killed_at = t.note("eu (the primary region) is lost: kill -9");
    eu.kill();
    // The SRE's runbook, scripted: detect, promote.
    let probe = agent();
    wait_for("eu to be seen down", Duration::from_secs(10), || {
        probe.get(format!("{}/v1/sys/health", eu.http)).call().is_err()
    })?;
    t.note("eu detected down (health check failed)");
    let promoted = us.arca(Some(&root), &["region", "promote"])?;
    t.note(format!("us promoted: epoch {}", promoted["epoch"]));
    wait_for("a write on us", Duration::from_secs(30), || {
        acks.lock().map(|a| a.iter().any(|(_, r, at)| *r == "us" && *at > killed_at)).unwrap_or(false)
    })?;
    let first_us = acks
        .lock()
        .map_err(|_| "acks poisoned")?
        .iter()
        .find(|(_, r, at)| *r == "us" && *at > killed_at)
        .map(|(_, _, at)| *at)
        .ok_or("no write on us")?;
    let rto = first_us - killed_at;
    t.note(format!("first write accepted by us: RTO {rto} ms"));
    // RPO: eu's acknowledged writes that us does not have.
    let eu_acked: Vec<u64> = acks
        .lock()
        .map_err(|_| "acks poisoned")?
        .iter()
        .filter(|(_, r, _)| *r == "eu")
        .map(|(n, _, _)| *n)
        .collect();
    let reader = agent();
    let missing: Vec<u64> = eu_acked
        .iter()
        .copied()
        .filter(|n| read(&reader, &us.http, &root, &format!("drill/fo/{n}")).is_none())
        .collect();
    t.note(format!(
        "RPO: {} of {} writes acknowledged by eu are missing on us{}",
        missing.len(),
        eu_acked.len(),
        if missing.is_empty() { String::new() } else { format!(": {missing:?}") }
    ));

    // 3. eu returns: fenced on first contact, then demoted with a divergence report.
    eu.start()?;
    eu.arca(None, &["operator", "unseal", &share])?;
    wait_for("eu to be fenced", Duration::from_secs(30), || {
        eu.status(&root).is_ok_and(|s| s["role"] == "fenced")
    })?;
    t.note("eu restarted: it learned epoch 2 on first contact and is fenced (refuses writes)");
    let report = eu.arca(Some(&root), &["region", "demote", "us"])?;
    let mut diverged: Vec<u64> = report["writes"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|w| w["path"].as_str()?.strip_prefix("secret/drill/fo/")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    diverged.sort_unstable();
    diverged.dedup();
    let report_matches = diverged == missing;
    t.note(format!(
        "eu demoted to a standby of us; divergence report {} lists {} write(s): {}",
        report["id"],
        diverged.len(),
        if report_matches { "exactly the missing ones" } else { "NOT the missing ones" }
    ));
    wait_for("eu to re-copy us and catch up", Duration::from_secs(60), || {
        eu.status(&root).is_ok_and(|s| s["seeded"] == true && s["lag_versions"] == 0 && s["link"] == "up")
    })?;
    t.note("eu caught up as a standby of us");

    // 4. Planned failback: pause writes, wait for zero lag, promote eu, demote us.
    pause.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50)); // let an in-flight write finish
    let last_us = acks.lock().map_err(|_| "acks poisoned")?.last().map(|(n, _, _)| *n).unwrap_or(0);
    wait_for("eu to have every write", Duration::from_secs(30), || {
        read(&reader, &eu.http, &root, &format!("drill/fo/{last_us}")).is_some()
    })?;
    let fb = t.note("failback: writes paused, eu has every write");
    eu.arca(Some(&root), &["region", "promote"])?;
    wait_for("us to be fenced", Duration::from_secs(30), || {
        us.status(&root).is_ok_and(|s| s["role"] == "fenced")
    })?;
    let back = us.arca(Some(&root), &["region", "demote", "eu"])?;
    let failback_lost = back["writes"].as_array().map_or(0, Vec::len);
    preferred.store(0, Ordering::Relaxed);
    pause.store(false, Ordering::Relaxed);
    let resumed = t.note(format!(
        "eu promoted again (epoch {}), us demoted with {failback_lost} divergent write(s); writes resume on eu",
        eu.status(&root)?["epoch"]
    ));
    wait_for("a write on eu after failback", Duration::from_secs(30), || {
        acks.lock().map(|a| a.iter().any(|(_, r, at)| *r == "eu" && *at > resumed)).unwrap_or(false)
    })?;
    let downtime = t.note("first write on eu after failback") - fb;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();

    let ok = report_matches && failback_lost == 0 && rto <= 5000;
    let events: Vec<Value> = t
        .events
        .lock()
        .map_err(|_| "timeline poisoned")?
        .iter()
        .map(|(at, what)| json!({"at_ms": at, "event": what}))
        .collect();
    let summary = json!({
        "rto_ms": rto,
        "rpo_writes": missing.len(),
        "rpo_missing": missing,
        "divergence_report_matches": report_matches,
        "failback_writes_lost": failback_lost,
        "failback_write_pause_ms": downtime,
        "steady": {
            "writers": writers,
            "writes_per_s": write_rate.round(),
            "lag_ms": {"p50": quantile(&lag, 0.5), "p99": quantile(&lag, 0.99), "max": lag.last().copied().unwrap_or(0), "probes": lag.len()},
        },
        "timeline": events,
        "ok": ok,
    });
    if json_only {
        println!("{summary}");
    } else {
        println!();
        println!("failover drill: two regions on loopback, one node each");
        println!(
            "  replication lag under {write_rate:.0} writes/s: p50 {} ms, p99 {} ms",
            quantile(&lag, 0.5),
            quantile(&lag, 0.99)
        );
        println!("  RTO (primary lost → first write on the promoted region): {rto} ms (target ≤ 5000)");
        println!(
            "  RPO: {} acknowledged write(s) lost{}",
            missing.len(),
            if report_matches {
                ", each listed in the divergence report"
            } else {
                " — NOT matching the divergence report"
            }
        );
        println!("  planned failback: {failback_lost} write(s) lost, writes paused {downtime} ms");
        println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    }
    Ok(ok)
}
