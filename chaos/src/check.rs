//! The invariant checkers, run after the faults healed. Each returns pass/fail with its
//! evidence; none trusts the system under test more than it must: audit entries are read
//! from the published log (entry bundles over HTTP), the log is verified with the `arca`
//! CLI, the SIEM stream with `arca-siem verify`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arca_audit::Event;
use arca_audit::tiles::{TILE_WIDTH, bundle_entries, entries_path};
use serde::Serialize;
use serde_json::Value;

use crate::client::{Op, agent, call};
use crate::cluster::{Cluster, Result, wait_for};

/// One checker's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub invariant: &'static str,
    pub pass: bool,
    pub evidence: String,
}

fn verdict(invariant: &'static str, pass: bool, evidence: impl Into<String>) -> Verdict {
    Verdict { invariant, pass, evidence: evidence.into() }
}

/// The log's size, from its checkpoint.
fn log_size(http: &str, region: &str) -> Option<u64> {
    let mut r = agent().get(format!("{http}/audit/{region}/checkpoint")).call().ok()?;
    if r.status() != 200 {
        return None;
    }
    r.body_mut().read_to_string().ok()?.lines().nth(1)?.parse().ok()
}

/// Every entry of `region`'s log, read from a node's published entry bundles.
pub fn log_entries(http: &str, region: &str) -> Result<Vec<Event>> {
    let size = log_size(http, region).ok_or_else(|| format!("no checkpoint from {region}"))?;
    let agent = agent();
    let mut out = Vec::with_capacity(size as usize);
    let mut index = 0;
    while index * TILE_WIDTH < size {
        let width = (size - index * TILE_WIDTH).min(TILE_WIDTH);
        let url = format!("{http}/audit/{region}/{}", entries_path(index, width));
        let mut r = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut r.body_mut().as_reader(), &mut data).map_err(|e| e.to_string())?;
        for entry in bundle_entries(&data).map_err(|e| format!("{url}: {e}"))? {
            out.push(Event::decode(entry).map_err(|e| format!("entry {}: {e}", out.len()))?);
        }
        index += 1;
    }
    Ok(out)
}

/// Every answered request (any status: denials and errors are accesses too) has its audit
/// entry, by request id, in the log of the region that answered it.
pub fn every_access_audited(cluster: &Cluster, history: &[Op]) -> Verdict {
    let mut missing = Vec::new();
    let mut checked = 0;
    for region in &cluster.regions {
        let Ok(node) = region.any() else {
            return verdict(
                "every-access-audited",
                false,
                format!("no node of {} to read its log from", region.name),
            );
        };
        // Let the sequencer cover everything recorded so far.
        let answered: Vec<&Op> =
            history.iter().filter(|o| o.region == region.name && o.position.is_some()).collect();
        let entries = match wait_and_read(&node.http(), &region.name, &answered) {
            Ok(e) => e,
            Err(e) => return verdict("every-access-audited", false, e),
        };
        let ids: BTreeSet<&str> = entries.iter().map(|e| e.request_id.as_str()).collect();
        for op in answered {
            checked += 1;
            if let Some(id) = &op.request_id
                && !ids.contains(id.as_str())
            {
                missing.push(format!(
                    "{} {} on {} (request {id}, status {:?})",
                    op.kind, op.path, op.node, op.status
                ));
            }
        }
    }
    let evidence = if missing.is_empty() {
        format!("{checked} answered requests, each found by request id in its region's log")
    } else {
        format!(
            "{} of {checked} answered requests have no audit entry: {}",
            missing.len(),
            missing.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        )
    };
    verdict("every-access-audited", missing.is_empty(), evidence)
}

fn wait_and_read(http: &str, region: &str, answered: &[&Op]) -> Result<Vec<Event>> {
    let want: BTreeSet<&str> = answered.iter().filter_map(|o| o.request_id.as_deref()).collect();
    let mut last = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        last = log_entries(http, region).unwrap_or(last);
        let have: BTreeSet<&str> = last.iter().map(|e| e.request_id.as_str()).collect();
        if want.iter().all(|id| have.contains(id)) || std::time::Instant::now() > deadline {
            return Ok(last);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every acknowledged write is readable at its version on the primary at the end, unless
/// its version was deleted by an acknowledged delete, or it is listed in a divergence
/// report (a write the deposed primary acknowledged and never shipped).
pub fn no_acked_write_lost(cluster: &Cluster, history: &[Op], diverged: &BTreeSet<(String, u64)>) -> Verdict {
    let Ok(primary) =
        cluster.primary().and_then(|p| cluster.region(&p).and_then(|r| r.any()).map(|n| n.http()))
    else {
        return verdict("no-acked-write-lost", false, "no primary to read from");
    };
    let deleted: BTreeSet<(String, u64)> = history
        .iter()
        .filter(|o| o.kind == "delete" && o.acked())
        .filter_map(|o| Some((o.path.clone(), o.version?)))
        .collect();
    let agent = agent();
    let (mut checked, mut excused, mut pruned) = (0, 0, 0);
    let mut lost = Vec::new();
    // KV v2 keeps the newest 10 versions of a secret: older ones are pruned by design.
    let mut current: BTreeMap<String, u64> = BTreeMap::new();
    for op in history.iter().filter(|o| (o.kind == "write" || o.kind == "rotate") && o.acked()) {
        let (Some(v), Some(value)) = (op.version, &op.value) else { continue };
        if deleted.contains(&(op.path.clone(), v)) {
            continue;
        }
        let latest = *current.entry(op.path.clone()).or_insert_with(|| {
            call(&agent, "GET", &format!("{primary}/v1/secret/metadata/{}", op.path), &cluster.root, None)
                .ok()
                .and_then(|r| r.body["data"]["current_version"].as_u64())
                .unwrap_or(0)
        });
        if v + 10 <= latest {
            pruned += 1;
            continue;
        }
        if diverged.contains(&(format!("secret/{}", op.path), v)) {
            excused += 1;
            continue;
        }
        checked += 1;
        let reply = call(
            &agent,
            "GET",
            &format!("{primary}/v1/secret/data/{}?version={v}", op.path),
            &cluster.root,
            None,
        );
        let got = reply.ok().and_then(|r| r.body["data"]["data"]["v"].as_str().map(str::to_owned));
        if got.as_deref() != Some(value.as_str()) {
            lost.push(format!("{} v{v} (acknowledged by {} at {} ms)", op.path, op.node, op.end_ms));
        }
    }
    let evidence = if lost.is_empty() {
        format!(
            "{checked} acknowledged writes read back at their versions; {excused} excused by a divergence report; {pruned} older than the 10 versions KV keeps"
        )
    } else {
        format!(
            "{} acknowledged writes lost: {}",
            lost.len(),
            lost.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        )
    };
    verdict("no-acked-write-lost", lost.is_empty(), evidence)
}

/// Each region's log verifies end to end, and every checkpoint sampled during the run is
/// consistent with the final one (`arca audit verify --state`, run on each sample).
pub fn logs_verify(cluster: &Cluster, states: &[(String, std::path::PathBuf)]) -> Verdict {
    let mut problems = Vec::new();
    for region in &cluster.regions {
        let Ok(node) = region.any() else { continue };
        let url = format!("{}/audit/{}", node.http(), region.name);
        let state = states.iter().find(|(r, _)| *r == region.name).map(|(_, p)| p.clone());
        let mut args = vec!["audit".to_owned(), "verify".into(), "--url".into(), url.clone()];
        let vkey = match crate::client::agent().get(format!("{url}/vkey")).call() {
            Ok(mut r) => r.body_mut().read_to_string().unwrap_or_default(),
            Err(e) => {
                problems.push(format!("{}: no vkey: {e}", region.name));
                continue;
            }
        };
        args.extend(["--vkey".into(), vkey.trim().to_owned()]);
        if let Some(state) = state {
            args.extend(["--state".into(), state.display().to_string()]);
        }
        let out = std::process::Command::new(cluster.bin.join("arca")).args(&args).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => problems.push(format!("{}: {}", region.name, String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => problems.push(format!("{}: {e}", region.name)),
        }
    }
    let evidence = if problems.is_empty() {
        "every region's log verifies from entry 0 to its checkpoint, consistent with every checkpoint sampled during the run".into()
    } else {
        problems.join("; ")
    };
    verdict("logs-verify", problems.is_empty(), evidence)
}

/// The SIEM stream is complete and verifies once the exporter caught up, and a verified
/// `watch` over it proves every entry without a stream-integrity alert.
pub fn siem_complete(cluster: &Cluster, deadline: Duration) -> Verdict {
    let Some(siem) = &cluster.siem else {
        return verdict("siem-complete", true, "no SIEM export in this run");
    };
    let region = &cluster.regions[0];
    let Ok(node) = region.any() else {
        return verdict("siem-complete", false, "no node to read the log size from");
    };
    let caught_up = wait_for("the exporter to catch up", deadline, || {
        let size = log_size(&node.http(), &region.name).unwrap_or(u64::MAX);
        siem.metric("next_index").is_some_and(|n| n as u64 >= size)
    });
    if let Err(e) = caught_up {
        return verdict("siem-complete", false, e);
    }
    let vkey_url = format!("{}/audit/{}/vkey", node.http(), region.name);
    let verified = match siem.verify(&vkey_url) {
        Ok((true, out)) => out.lines().next().unwrap_or("").to_owned(),
        Ok((false, out)) => return verdict("siem-complete", false, out),
        Err(e) => return verdict("siem-complete", false, e),
    };
    // The verified watcher over the same stream (repeats, re-sends after broker faults and
    // all): every entry proven, so no stream-integrity alert.
    let size = log_size(&node.http(), &region.name).unwrap_or(0);
    match siem.watch(&vkey_url) {
        Ok((true, alerts, progress)) => {
            let integrity: Vec<&str> =
                alerts.lines().filter(|l| l.contains("\"stream-integrity\"")).collect();
            // "arca-siem: <origin>: <n> entries proven …"
            let proven = progress
                .lines()
                .filter(|l| l.starts_with("arca-siem: ") && l.contains(" entries proven "))
                .filter_map(|l| l.split(": ").nth(2)?.split(' ').next()?.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            let evidence = format!(
                "{verified}; verified watch: {proven} of {size} entries proven, {} alerts, {} stream-integrity",
                alerts.lines().count(),
                integrity.len()
            );
            if integrity.is_empty() && proven >= size {
                verdict("siem-complete", true, evidence)
            } else {
                verdict("siem-complete", false, format!("{evidence}: {}", integrity.join("; ")))
            }
        }
        Ok((false, _, err)) => verdict("siem-complete", false, format!("{verified}; watch failed: {err}")),
        Err(e) => verdict("siem-complete", false, e),
    }
}

/// After the faults healed, the standby applies everything: zero lag, link up, and the
/// same latest value for every key on both sides.
pub fn standby_converges(cluster: &Cluster, history: &[Op], deadline: Duration) -> Verdict {
    let Ok(primary_name) = cluster.primary() else {
        return verdict("standby-converges", false, "no primary");
    };
    let Some(standby) = cluster.regions.iter().find(|r| r.name != primary_name) else {
        return verdict("standby-converges", true, "a single region");
    };
    let (Ok(p), Ok(s)) = (cluster.region(&primary_name).and_then(|r| r.any()), standby.any()) else {
        return verdict("standby-converges", false, "a region has no running node");
    };
    let root = &cluster.root;
    let caught_up = wait_for("the standby to catch up", deadline, || {
        s.status(root).is_ok_and(|st| st["lag_versions"] == 0 && st["link"] == "up" && st["seeded"] == true)
    });
    if let Err(e) = caught_up {
        return verdict(
            "standby-converges",
            false,
            format!("{e}: {}", s.status(root).map(|v| v.to_string()).unwrap_or_default()),
        );
    }
    let agent = agent();
    let paths: BTreeSet<&str> =
        history.iter().filter(|o| o.kind != "denied").map(|o| o.path.as_str()).collect();
    let mut differ = Vec::new();
    let latest = |http: &str, path: &str| -> Option<Value> {
        call(&agent, "GET", &format!("{http}/v1/secret/data/{path}"), root, None)
            .ok()
            .map(|r| r.body["data"]["data"].clone())
    };
    for path in &paths {
        if latest(&p.http(), path) != latest(&s.http(), path) {
            differ.push((*path).to_owned());
        }
    }
    let evidence = if differ.is_empty() {
        format!("lag 0, link up; {} keys read the same on {} and {}", paths.len(), primary_name, standby.name)
    } else {
        format!(
            "{} keys differ: {}",
            differ.len(),
            differ.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )
    };
    verdict("standby-converges", differ.is_empty(), evidence)
}

/// No secret value written during the run appears in any process's log.
pub fn no_secret_in_logs(cluster: &Cluster, history: &[Op]) -> Verdict {
    let values: BTreeSet<&str> = history.iter().filter_map(|o| o.value.as_deref()).collect();
    let mut found: BTreeMap<String, usize> = BTreeMap::new();
    let logs = cluster.logs();
    for log in &logs {
        let Ok(text) = std::fs::read_to_string(log) else { continue };
        let hits = values.iter().filter(|v| text.contains(**v)).count();
        if hits > 0 {
            found.insert(log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), hits);
        }
    }
    let evidence = if found.is_empty() {
        format!("{} secret values searched for in {} process logs: none found", values.len(), logs.len())
    } else {
        format!("secret values found in logs: {found:?}")
    };
    verdict("no-secret-in-logs", found.is_empty(), evidence)
}
