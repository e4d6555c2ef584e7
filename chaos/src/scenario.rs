//! Scenarios: which faults a run injects, when and where — all drawn from the seed — while
//! the workload runs; then the faults heal and the checkers run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::check::{self, Verdict};
use crate::client::{Op, Workload};
use crate::cluster::{Cluster, Result, Shape, Timeline, wait_for};
use crate::rng::Rng;

/// Every scenario `--scenario all` runs, in order.
pub const ALL: &[&str] = &[
    "node-kill",
    "leader-kill",
    "pause",
    "exporter-kill",
    "broker-stop",
    "link-cut",
    "link-slow",
    "link-lossy",
    "conn-reset",
    "region-loss",
    "disk-full",
];

/// The short fixed set CI runs.
pub const QUICK: &[&str] = &["node-kill", "link-cut", "broker-stop", "region-loss"];

/// Where a run finds things and how long it lasts.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bin: PathBuf,
    pub tools: PathBuf,
    pub clients: usize,
    pub nodes_per_region: usize,
    /// Seconds of workload before the faults, and after they heal.
    pub settle: Duration,
    /// Debug: what to break on purpose in the nodes (`ARCA_FAULT_INJECT`), to show a
    /// checker fails when its property does not hold.
    pub inject: Option<String>,
}

/// What one run found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub seed: u64,
    pub pass: bool,
    pub verdicts: Vec<Verdict>,
    pub timeline: Vec<(u64, String, String)>,
    pub ops: usize,
    pub acked: usize,
    pub unanswered: usize,
    /// Per second: (acknowledged, failed or unanswered).
    pub per_second: Vec<(u64, u64)>,
    pub rto_ms: Option<u64>,
    pub rpo_writes: Option<usize>,
    /// The standby's largest replication lag seen by the sampler.
    pub lag_ms_max: u64,
    pub dir: PathBuf,
    pub reproduce: String,
}

/// Runs `scenario` with `seed` in `dir`.
pub fn run(scenario: &str, seed: u64, dir: &Path, settings: &Settings, quiet: bool) -> Result<Outcome> {
    if !ALL.contains(&scenario) {
        return Err(format!("unknown scenario {scenario:?}; known: {}", ALL.join(", ")));
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let t = Arc::new(Timeline::new(quiet));
    let mut rng = Rng::new(seed);
    let env: Vec<(String, String)> =
        settings.inject.iter().map(|i| ("ARCA_FAULT_INJECT".to_owned(), i.clone())).collect();
    // disk-full: the primary's store on a small tmpfs of its own (needs root to mount).
    let disk = (scenario == "disk-full").then(|| dir.join("eu-disk"));
    if let Some(d) = &disk {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
            .arg(d)
            .status()
            .map_err(|e| e.to_string())?;
        if !mounted.success() {
            return Err("disk-full needs to mount a tmpfs (run as root)".into());
        }
    }
    let _unmount = Unmount(disk.clone());
    let shape = Shape {
        regions: vec!["eu", "us"],
        nodes_per_region: settings.nodes_per_region,
        siem: true,
        env,
        first_region_disk: disk.clone(),
    };
    let mut cluster = Cluster::start(dir, &settings.bin, &settings.tools, &shape, seed)?;
    t.note(
        "info",
        format!(
            "{scenario} (seed {seed}): regions eu (primary) and us, {} node(s) each, exporter and broker",
            shape.nodes_per_region
        ),
    );
    let denied = denied_token(&cluster)?;
    let targets = cluster.targets();
    let workload = Workload::start(targets, cluster.root.clone(), denied, settings.clients, seed, t.clone());
    let sampler = Sampler::start(&cluster, t.clone());
    std::thread::sleep(settings.settle);

    let mut diverged: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut rto_ms = None;
    let mut rpo = None;
    inject_faults(scenario, &mut cluster, &mut rng, &t, &workload, &mut diverged, &mut rto_ms, &mut rpo)?;

    std::thread::sleep(settings.settle);
    let history = workload.stop();
    t.note("info", format!("workload stopped: {} operations", history.len()));
    let (states, lag_ms_max, sampled_failures) = sampler.stop();

    let verdicts = vec![
        check::no_acked_write_lost(&cluster, &history, &diverged),
        check::every_access_audited(&cluster, &history),
        {
            let mut v = check::logs_verify(&cluster, &states);
            if !sampled_failures.is_empty() {
                v.pass = false;
                v.evidence = format!("{}; during the run: {}", v.evidence, sampled_failures.join("; "));
            }
            v
        },
        check::siem_complete(&cluster, Duration::from_secs(60)),
        check::standby_converges(&cluster, &history, Duration::from_secs(60)),
        check::no_secret_in_logs(&cluster, &history),
    ];
    for v in &verdicts {
        t.note("check", format!("{} {}: {}", if v.pass { "PASS" } else { "FAIL" }, v.invariant, v.evidence));
    }
    let pass = verdicts.iter().all(|v| v.pass);
    let end = t.ms();
    Ok(Outcome {
        scenario: scenario.to_owned(),
        seed,
        pass,
        verdicts,
        timeline: t.events(),
        ops: history.len(),
        acked: history.iter().filter(|o| o.acked()).count(),
        unanswered: history.iter().filter(|o| o.status.is_none()).count(),
        per_second: per_second(&history, history.iter().map(|o| o.end_ms).max().unwrap_or(end)),
        rto_ms,
        rpo_writes: rpo,
        lag_ms_max,
        dir: dir.to_path_buf(),
        reproduce: format!("arca-chaos run --scenario {scenario} --seed {seed}"),
    })
}

fn per_second(history: &[Op], end_ms: u64) -> Vec<(u64, u64)> {
    let mut out = vec![(0, 0); (end_ms / 1000 + 1) as usize];
    for op in history {
        let last = out.len() - 1;
        let slot = &mut out[((op.end_ms / 1000) as usize).min(last)];
        if op.status.is_some_and(|s| s < 500) { slot.0 += 1 } else { slot.1 += 1 }
    }
    out
}

/// Unmounts the disk-full scenario's tmpfs when the run ends (lazily: the nodes may still
/// hold it open while they stop).
struct Unmount(Option<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::process::Command::new("umount").arg("-l").arg(d).status();
        }
    }
}

/// A token whose policy allows nothing the workload touches (its reads are denied).
pub fn denied_token(cluster: &Cluster) -> Result<String> {
    let node = cluster.regions[0].any()?;
    let policy = cluster.dir.join("chaos-none.hcl");
    std::fs::write(&policy, "path \"secret/data/nothing/*\" { capabilities = [\"read\"] }\n")
        .map_err(|e| e.to_string())?;
    node.arca(Some(&cluster.root), &["policy", "write", "chaos-none", &policy.display().to_string()])?;
    let token = node.arca(
        Some(&cluster.root),
        &["token", "create", "--policy", "chaos-none", "--display-name", "intruder"],
    )?;
    token["token"].as_str().map(str::to_owned).ok_or_else(|| "no token in the reply".into())
}

/// What the sampler saw: each region's state file, the standby's largest lag (ms), and the
/// inconsistencies it found.
type Sampled = (Vec<(String, PathBuf)>, u64, Vec<String>);

/// Samples each region's log during the run with `arca audit verify --state`, so every
/// checkpoint seen is checked consistent with the next.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Sampled>,
}

impl Sampler {
    fn start(cluster: &Cluster, t: Arc<Timeline>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let regions: Vec<(String, Vec<String>, PathBuf)> = cluster
            .regions
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.nodes.iter().map(|n| n.http()).collect(),
                    cluster.dir.join(format!("{}-state.json", r.name)),
                )
            })
            .collect();
        let bin = cluster.bin.clone();
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut lag_max = 0u64;
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                for (_, https, _) in regions.iter().skip(1) {
                    for http in https {
                        if let Ok(mut r) = crate::client::agent().get(format!("{http}/metrics")).call()
                            && let Ok(text) = r.body_mut().read_to_string()
                            && let Some(l) =
                                text.lines().find_map(|l| l.strip_prefix("arca_replication_lag_seconds "))
                            && let Ok(secs) = l.parse::<f64>()
                        {
                            lag_max = lag_max.max((secs * 1000.0) as u64);
                        }
                    }
                }
                for (name, https, state) in &regions {
                    for http in https {
                        let url = format!("{http}/audit/{name}");
                        let Ok(mut r) = crate::client::agent().get(format!("{url}/vkey")).call() else {
                            continue;
                        };
                        let vkey = r.body_mut().read_to_string().unwrap_or_default();
                        let out = std::process::Command::new(bin.join("arca"))
                            .args(["audit", "verify", "--url", &url, "--vkey", vkey.trim(), "--state"])
                            .arg(state)
                            .output();
                        if let Ok(o) = out
                            && o.status.code() == Some(6)
                        {
                            let why = format!(
                                "{name}'s log during the run: {}",
                                String::from_utf8_lossy(&o.stderr).trim()
                            );
                            t.note("check", format!("FAIL {why}"));
                            failures.push(why);
                        }
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            (regions.into_iter().map(|(n, _, p)| (n, p)).collect(), lag_max, failures)
        });
        Sampler { stop, handle }
    }

    fn stop(self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

fn hold(rng: &mut Rng, lo_ms: u64, hi_ms: u64) {
    std::thread::sleep(Duration::from_millis(rng.between(lo_ms, hi_ms)));
}

#[allow(clippy::too_many_arguments, clippy::too_many_lines)]
fn inject_faults(
    scenario: &str,
    cluster: &mut Cluster,
    rng: &mut Rng,
    t: &Timeline,
    workload: &Workload,
    diverged: &mut BTreeSet<(String, u64)>,
    rto_ms: &mut Option<u64>,
    rpo: &mut Option<usize>,
) -> Result<()> {
    let share = cluster.share.clone();
    let root = cluster.root.clone();
    match scenario {
        "node-kill" | "pause" | "leader-kill" => {
            let region = &mut cluster.regions[0];
            let i = if scenario == "leader-kill" {
                sequencer_leader(&region.db, &region.name)
                    .and_then(|holder| {
                        region.nodes.iter().position(|n| holder.starts_with(&format!("{}:", n.id)))
                    })
                    .unwrap_or(0)
            } else {
                rng.below(region.nodes.len() as u64) as usize
            };
            let node = &mut region.nodes[i];
            if scenario == "pause" {
                node.signal("-STOP");
                t.note("fault", format!("SIGSTOP {}", node.id));
                hold(rng, 1500, 3000);
                node.signal("-CONT");
                t.note("heal", format!("SIGCONT {}", node.id));
            } else {
                node.kill();
                t.note(
                    "fault",
                    format!(
                        "kill -9 {}{}",
                        node.id,
                        if scenario == "leader-kill" { " (the sequencer leader)" } else { "" }
                    ),
                );
                hold(rng, 1000, 2500);
                node.start()?;
                wait_for("the node to unseal", Duration::from_secs(30), || node.unseal(&share))?;
                t.note("heal", format!("{} restarted and unsealed", node.id));
            }
        }
        "exporter-kill" | "broker-stop" => {
            let siem = cluster.siem.as_mut().ok_or("no SIEM export")?;
            if scenario == "exporter-kill" {
                siem.stop_exporter();
                t.note("fault", "kill -9 the exporter");
                hold(rng, 1000, 2500);
                siem.start_exporter()?;
                t.note("heal", "exporter restarted");
            } else {
                siem.stop_broker();
                t.note("fault", "kill -9 the broker");
                hold(rng, 1500, 3000);
                siem.start_broker()?;
                t.note("heal", "broker restarted (its data on S3-protocol storage)");
            }
        }
        "link-cut" | "link-slow" | "link-lossy" => {
            for link in &cluster.links {
                match scenario {
                    "link-cut" => link.cut(),
                    "link-slow" => link.slow(Duration::from_millis(rng.between(100, 300))),
                    _ => link.lossy(rng.between(20, 80)),
                }
            }
            t.note("fault", format!("the link between regions: {}", &scenario[5..]));
            hold(rng, 2000, 3500);
            for link in &cluster.links {
                link.heal();
            }
            t.note("heal", "the link healed");
        }
        "conn-reset" => {
            t.note("fault", "client connections reset at random for ~3 s");
            let until = t.ms() + 3000;
            while t.ms() < until {
                for region in &cluster.regions {
                    for node in &region.nodes {
                        node.client_proxy.reset_all();
                    }
                }
                hold(rng, 100, 500);
            }
            t.note("heal", "connection resets stopped");
        }
        "region-loss" => {
            let killed = t.note("fault", "region eu lost: kill -9 every eu node");
            for node in &mut cluster.regions[0].nodes {
                node.kill();
            }
            let us = cluster.regions[1].any()?;
            wait_for("a us node to promote", Duration::from_secs(30), || {
                us.arca(Some(&root), &["region", "promote"]).is_ok()
            })?;
            t.note("heal", "us promoted");
            // The RTO ends at the first change (write, rotation or delete) that the promoted
            // region acknowledged; the wait and the measure use the same test, so the wait
            // cannot end on an operation the measure then skips.
            let change_on_us = |o: &Op| {
                o.region == "us"
                    && o.acked()
                    && matches!(o.kind, "write" | "rotate" | "delete")
                    && o.end_ms > killed
            };
            wait_for("a write on us", Duration::from_secs(30), || {
                workload.history.lock().map(|h| h.iter().any(change_on_us)).unwrap_or(false)
            })?;
            let first = workload
                .history
                .lock()
                .map_err(|_| "history poisoned")?
                .iter()
                .filter(|o| change_on_us(o))
                .map(|o| o.end_ms)
                .min()
                .ok_or("no write on us")?;
            *rto_ms = Some(first - killed);
            t.note("info", format!("RTO {} ms", first - killed));
            hold(rng, 500, 1500);
            for node in &mut cluster.regions[0].nodes {
                node.start()?;
            }
            for node in &cluster.regions[0].nodes {
                wait_for("eu to unseal", Duration::from_secs(30), || node.unseal(&share))?;
            }
            let eu = cluster.regions[0].any()?;
            wait_for("eu to be fenced", Duration::from_secs(30), || {
                eu.status(&root).is_ok_and(|s| s["role"] == "fenced")
            })?;
            t.note("info", "eu back: fenced on first contact");
            let report = eu.arca(Some(&root), &["region", "demote", "us"])?;
            let writes: Vec<Value> = report["writes"].as_array().cloned().unwrap_or_default();
            for w in &writes {
                if let (Some(path), Some(v)) = (w["path"].as_str(), w["version"].as_u64()) {
                    diverged.insert((path.to_owned(), v));
                }
            }
            *rpo = Some(diverged.len());
            t.note("info", format!("eu demoted; divergence report lists {} write(s)", writes.len()));
        }
        "disk-full" => {
            let disk = cluster.regions[0].db.parent().ok_or("no disk")?.to_path_buf();
            let filler = disk.join("filler");
            let mut file = std::fs::File::create(&filler).map_err(|e| e.to_string())?;
            let chunk = vec![0u8; 1 << 20];
            while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
            drop(file);
            t.note("fault", "the primary's disk is full");
            hold(rng, 1500, 3000);
            std::fs::remove_file(&filler).map_err(|e| e.to_string())?;
            t.note("heal", "space freed");
            for node in &cluster.regions[0].nodes {
                wait_for(&format!("{} to serve", node.id), Duration::from_secs(30), || {
                    crate::client::agent().get(format!("{}/v1/sys/health", node.http())).call().is_ok()
                })?;
            }
        }
        other => return Err(format!("scenario {other} has no faults defined")),
    }
    Ok(())
}

/// The sequencer lease holder of `region`, read from the store file.
fn sequencer_leader(db: &Path, region: &str) -> Option<String> {
    use arca_store::StoreExt;
    let store = arca_store::SqliteStore::open(arca_store::SqliteConfig::new(db)).ok()?;
    let raw = store.transact(|tx| tx.get(&arca_node::keys::audit_lease(region))).ok()?.value?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    v["holder"].as_str().map(str::to_owned)
}

/// The whole run as JSON.
pub fn to_json(o: &Outcome) -> Value {
    json!(o)
}
