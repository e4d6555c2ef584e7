//! The failover drill (`arca-chaos drill failover`): two regions of real `arcad` processes on loopback, a
//! workload, the loss of the primary region, promotion of the standby, the old primary's
//! return (fenced, demoted, divergence report), and a planned failback — with a timeline,
//! replication lag under sustained writes, RTO and RPO.
//!
//! RTO: from the primary's `kill -9` to the first write accepted by the promoted region.
//! RPO: writes the old primary acknowledged that the promoted region does not have — each
//! listed, and checked against the divergence report the old primary writes on demotion.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::agent;
use crate::cluster::{Cluster, Result, Shape, Timeline, wait_for};

/// An acknowledged write: its number, the region that took it, when (drill ms).
type Ack = (u64, &'static str, u64);

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

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[allow(clippy::too_many_lines)]
pub fn failover(bin: &Path, dir: &Path, steady: Duration, writers: usize, json_only: bool) -> Result<bool> {
    let t = Arc::new(Timeline::new(json_only));
    let shape = Shape {
        regions: vec!["eu", "us"],
        nodes_per_region: 1,
        siem: false,
        env: vec![],
        first_region_disk: None,
    };
    let mut cluster = Cluster::start(dir, bin, Path::new(""), &shape, 1)?;
    let (share, root) = (cluster.share.clone(), cluster.root.clone());
    let eu_http = cluster.regions[0].nodes[0].http();
    let us_http = cluster.regions[1].nodes[0].http();
    t.note("info", "two regions started: eu (primary) initialised; us seeded and unsealed with eu's key");

    // 1. Replication lag under sustained writes: writers on eu; a prober times how long the
    //    newest acknowledged write takes to be readable on us.
    let stop = Arc::new(AtomicBool::new(false));
    let last_ack: Arc<Mutex<Option<(String, Instant)>>> = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..writers {
        let (stop, last_ack, acked, http, root) =
            (stop.clone(), last_ack.clone(), acked.clone(), eu_http.clone(), root.clone());
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
        let (stop, last_ack, http, root) = (stop.clone(), last_ack.clone(), us_http.clone(), root.clone());
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
    t.note(
        "info",
        format!("steady phase: {writers} writers on eu for {}s, lag probed on us", steady.as_secs()),
    );
    std::thread::sleep(steady);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let mut lag = prober.join().map_err(|_| "the prober panicked")?;
    let write_rate = acked.load(Ordering::Relaxed) as f64 / steady_from.elapsed().as_secs_f64();
    lag.sort_unstable();
    t.note("info", format!(
        "steady phase done: {write_rate:.0} writes/s; replication lag p50 {} ms, p99 {} ms, max {} ms ({} probes)",
        quantile(&lag, 0.5),
        quantile(&lag, 0.99),
        lag.last().copied().unwrap_or(0),
        lag.len()
    ));

    // 2. The failover: one writer, sequential keys, to whichever region takes writes.
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    // Set by the writer once it has seen the pause (no write in flight).
    let paused = Arc::new(AtomicBool::new(false));
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let targets = [("eu", eu_http.clone()), ("us", us_http.clone())];
    let preferred = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, pause, paused, acks, root, t, preferred) = (
            stop.clone(),
            pause.clone(),
            paused.clone(),
            acks.clone(),
            root.clone(),
            t.clone(),
            preferred.clone(),
        );
        std::thread::spawn(move || {
            let agent = agent();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let hold = pause.load(Ordering::SeqCst);
                paused.store(hold, Ordering::SeqCst);
                if hold {
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
    let killed_at = t.note("info", "eu (the primary region) is lost: kill -9");
    cluster.regions[0].nodes[0].kill();
    // The SRE's runbook, scripted: detect, promote.
    let probe = agent();
    wait_for("eu to be seen down", Duration::from_secs(10), || {
        probe.get(format!("{eu_http}/v1/sys/health")).call().is_err()
    })?;
    t.note("info", "eu detected down (health check failed)");
    let promoted = cluster.regions[1].nodes[0].arca(Some(&root), &["region", "promote"])?;
    t.note("info", format!("us promoted: epoch {}", promoted["epoch"]));
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
    t.note("info", format!("first write accepted by us: RTO {rto} ms"));
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
        .filter(|n| read(&reader, &us_http, &root, &format!("drill/fo/{n}")).is_none())
        .collect();
    t.note(
        "info",
        format!(
            "RPO: {} of {} writes acknowledged by eu are missing on us{}",
            missing.len(),
            eu_acked.len(),
            if missing.is_empty() { String::new() } else { format!(": {missing:?}") }
        ),
    );

    // 3. eu returns: fenced on first contact, then demoted with a divergence report.
    cluster.regions[0].nodes[0].start()?;
    let (eu, us) = (&cluster.regions[0].nodes[0], &cluster.regions[1].nodes[0]);
    eu.arca(None, &["operator", "unseal", &share])?;
    wait_for("eu to be fenced", Duration::from_secs(30), || {
        eu.status(&root).is_ok_and(|s| s["role"] == "fenced")
    })?;
    t.note("info", "eu restarted: it learned epoch 2 on first contact and is fenced (refuses writes)");
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
    // Every acknowledged write us lacks is in the report; the report may also list writes
    // eu committed whose acknowledgement never reached the client (killed mid-reply) —
    // never ones the client saw acknowledged and us has.
    let report_matches = missing.iter().all(|n| diverged.contains(n))
        && diverged.iter().all(|n| missing.contains(n) || !eu_acked.contains(n));
    t.note(
        "info",
        format!(
            "eu demoted to a standby of us; divergence report {} lists {} write(s): {}",
            report["id"],
            diverged.len(),
            if report_matches {
                "every missing one (and no acknowledged write us has)"
            } else {
                "NOT the missing ones"
            }
        ),
    );
    wait_for("eu to re-copy us and catch up", Duration::from_secs(60), || {
        eu.status(&root).is_ok_and(|s| s["seeded"] == true && s["lag_versions"] == 0 && s["link"] == "up")
    })?;
    t.note("info", "eu caught up as a standby of us");

    // 4. Planned failback: pause writes, wait for zero lag, promote eu, demote us.
    pause.store(true, Ordering::SeqCst);
    wait_for("the writer to pause", Duration::from_secs(10), || paused.load(Ordering::SeqCst))?;
    let last_us = acks.lock().map_err(|_| "acks poisoned")?.last().map(|(n, _, _)| *n).unwrap_or(0);
    wait_for("eu to have every write", Duration::from_secs(30), || {
        read(&reader, &eu_http, &root, &format!("drill/fo/{last_us}")).is_some()
    })?;
    let fb = t.note("info", "failback: writes paused, eu has every write");
    eu.arca(Some(&root), &["region", "promote"])?;
    wait_for("us to be fenced", Duration::from_secs(30), || {
        us.status(&root).is_ok_and(|s| s["role"] == "fenced")
    })?;
    let back = us.arca(Some(&root), &["region", "demote", "eu"])?;
    let failback_lost = back["writes"].as_array().map_or(0, Vec::len);
    preferred.store(0, Ordering::Relaxed);
    pause.store(false, Ordering::Relaxed);
    let resumed = t.note("info", format!(
        "eu promoted again (epoch {}), us demoted with {failback_lost} divergent write(s); writes resume on eu",
        eu.status(&root)?["epoch"]
    ));
    wait_for("a write on eu after failback", Duration::from_secs(30), || {
        acks.lock().map(|a| a.iter().any(|(_, r, at)| *r == "eu" && *at > resumed)).unwrap_or(false)
    })?;
    let downtime = t.note("info", "first write on eu after failback") - fb;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();

    let ok = report_matches && failback_lost == 0 && rto <= 5000;
    let events: Vec<Value> =
        t.events().iter().map(|(at, _, what)| json!({"at_ms": at, "event": what})).collect();
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
