//! `arca-siem watch`: anomaly rules over the exported stream.
//!
//! Rules run over entries in leaf order per log (repeats of a leaf are dropped) and use the
//! events' own times, so a replay of the topic raises the same alerts with the same ids:
//! - `distinct-secrets`: one identity reads ≥ N distinct secrets within a window;
//! - `first-access`: an identity touches a secret it never touched before;
//! - `new-source`: an identity appears from an IP address it never used before;
//! - `denial-burst`: ≥ N denied requests by one identity within a window;
//! - `read-after-destroy`: a secret is read after it was destroyed or deleted (metadata
//!   deleted, all versions destroyed, or the very version destroyed or deleted);
//! - `region-snapshot`: a region was served a snapshot — a copy of the whole replicated
//!   keyspace (a standby seeding, or whoever holds a region certificate); once per
//!   snapshot: its chunks come seconds apart, and a region's next snapshot event after
//!   [`SNAPSHOT_QUIET_MS`] without one is a new snapshot.
//!
//! `first-access` and `new-source` learn quietly during a baseline (the first entries or
//! seconds of each log), so that a stream's history is not one alert per identity.
//!
//! Entry messages carry no signature of their own: whoever can write to the topic can
//! inject, reorder or replace them. Given the logs' verifier keys ([`Watcher::verified`]),
//! the watcher holds each entry back until a checkpoint whose signature verifies covers it
//! and the tree of the entries received is that checkpoint's root; only then do the rules
//! see it. Whatever does not hold — a checkpoint that does not verify, two entries for one
//! leaf, entries that do not make the signed root, a log without a key, more than
//! [`HELD_LIMIT`] entries waiting — raises a `stream-integrity` alert, and a log whose
//! entries do not make a signed root is watched no further (fail closed: its alerts could
//! be an attacker's).
//!
//! A verified watcher starts at leaf 0, or — when the topics no longer hold the first
//! entries (Kafka's retention dropped them) — at the first entry it receives, leaf N, once it
//! is given the tree of leaves `0..N` ([`Watcher::seed`], read from the log's tiles). That
//! tree needs no trust of its own: the next signed checkpoint's root is made from it and the
//! entries after it, so a forged one stops the log with `root-mismatch`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use arca_audit::merkle::{self, Frontier, Hash};
use arca_audit::note::NoteVerifier;
use arca_audit::{Event, Operation, Outcome, checkpoint};
use serde::{Deserialize, Serialize};

use crate::ocsf;

/// Most entries a verifying watcher holds per log while it waits for a checkpoint (the
/// exporter publishes one per round, at most a few thousand entries apart; ~100 MB of
/// entries). An entry claiming a leaf this far past the last proven one is dropped.
pub const HELD_LIMIT: u64 = 250_000;

/// Each time this many more entries are held, the watcher says why they wait (a leaf that
/// has not arrived, or no signed checkpoint covering them).
const WAITING_REPORT_EVERY: usize = 10_000;

/// A region's snapshot events this far apart belong to two snapshots (`region-snapshot`).
pub const SNAPSHOT_QUIET_MS: u64 = 10 * 60 * 1000;

/// Rule settings (`[watch]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    pub distinct_secrets_threshold: usize,
    pub distinct_secrets_window_secs: u64,
    pub denial_burst_threshold: usize,
    pub denial_burst_window_secs: u64,
    pub first_access: bool,
    pub new_source: bool,
    pub read_after_destroy: bool,
    pub region_snapshot: bool,
    pub region_denied: bool,
    /// `first-access` and `new-source` only learn during the first `baseline_entries`
    /// entries of a log ...
    pub baseline_entries: u64,
    /// ... and during the first `baseline_secs` seconds of it (event time).
    pub baseline_secs: u64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            distinct_secrets_threshold: 20,
            distinct_secrets_window_secs: 360,
            denial_burst_threshold: 10,
            denial_burst_window_secs: 60,
            first_access: true,
            new_source: true,
            read_after_destroy: true,
            region_snapshot: true,
            region_denied: true,
            baseline_entries: 0,
            baseline_secs: 0,
        }
    }
}

impl Rules {
    pub fn validate(&self) -> Result<(), String> {
        if self.distinct_secrets_threshold < 2 || self.denial_burst_threshold < 2 {
            return Err("watch thresholds must be at least 2".into());
        }
        if self.distinct_secrets_window_secs == 0 || self.denial_burst_window_secs == 0 {
            return Err("watch windows must be at least one second".into());
        }
        Ok(())
    }
}

/// One alert. `id` is stable across replays: origin, leaf index and rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub id: String,
    pub rule: &'static str,
    pub severity: &'static str,
    pub origin: String,
    pub leaf_index: u64,
    pub time_unix_ms: u64,
    pub identity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
    pub detail: String,
    pub request_id: String,
}

/// `mount/path` of a KV request path (`secret/data/app/db` → `secret/app/db`).
pub fn secret_of(op: Operation, path: &str) -> Option<String> {
    use Operation::*;
    let kv = matches!(
        op,
        KvRead
            | KvWrite
            | KvPatch
            | KvDelete
            | KvUndelete
            | KvDestroy
            | KvReadMetadata
            | KvWriteMetadata
            | KvDeleteMetadata
    );
    if !kv {
        return None;
    }
    let mut parts = path.splitn(3, '/');
    let (mount, kind, rest) = (parts.next()?, parts.next()?, parts.next()?);
    matches!(kind, "data" | "metadata" | "delete" | "undelete" | "destroy").then(|| format!("{mount}/{rest}"))
}

#[derive(Default)]
struct LogState {
    next_index: u64,
    /// The first leaf the rules saw (the baseline counts from it), and its time.
    first_index: Option<u64>,
    first_time: Option<u64>,
    /// identity → (secret → last read time) within the window; whether alerted this window.
    reads: HashMap<String, (BTreeMap<String, u64>, bool)>,
    denials: HashMap<String, (VecDeque<u64>, bool)>,
    accessed: HashSet<(String, String)>,
    sources: HashSet<(String, String)>,
    /// secret → destroyed versions (`None`: all of them).
    gone: HashMap<String, Option<BTreeSet<u64>>>,
    /// identity → the time of its last snapshot event served.
    snapshots: HashMap<String, u64>,
    /// identity → the time of its last replication call denied.
    region_denials: HashMap<String, u64>,
}

/// The rule engine; feed it entries in any order, it keeps per-log state.
#[derive(Default)]
pub struct Watcher {
    rules: Rules,
    logs: HashMap<String, LogState>,
    /// With verifier keys: the entries held until a signed checkpoint proves them.
    gate: Option<Gate>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("rules", &self.rules)
            .field("logs", &self.logs.len())
            .field("verified", &self.gate.is_some())
            .finish()
    }
}

/// Entries waiting for their proof, per log.
struct Gate {
    verifiers: Vec<NoteVerifier>,
    /// One per log with a key.
    logs: HashMap<String, GateLog>,
    /// Logs without a key, alerted once each (the first [`UNKNOWN_LOGS_NAMED`]).
    unknown: HashSet<String>,
}

/// How many logs without a key are named in alerts: a message names its own log, so a
/// writer to the topic could name any number.
const UNKNOWN_LOGS_NAMED: usize = 100;

impl Gate {
    /// The log's state, or `None` (alerted on first sight) when there is no key for it.
    fn log(&mut self, origin: &str, alerts: &mut Vec<Alert>) -> Option<&mut GateLog> {
        if !self.verifiers.iter().any(|v| v.name() == origin) {
            if self.unknown.len() < UNKNOWN_LOGS_NAMED && self.unknown.insert(origin.to_owned()) {
                integrity(
                    alerts,
                    &mut GateLog::default(),
                    origin,
                    0,
                    "no-key",
                    "a message of a log without a verifier key: its entries are not watched".into(),
                );
            }
            return None;
        }
        Some(self.logs.entry(origin.to_owned()).or_default())
    }
}

#[derive(Default)]
struct GateLog {
    /// The tree of the entries proven so far (leaves `0..proven.size()`).
    proven: Frontier,
    /// Entries received at or past `proven.size()`: index → entry bytes (the first received).
    held: BTreeMap<u64, Vec<u8>>,
    /// The first leaf at or past `proven.size()` not held: leaves `proven.size()..contiguous`
    /// are all in `held`.
    contiguous: u64,
    /// Checkpoints whose signature verified, past `proven.size()`: size → root.
    signed: BTreeMap<u64, Hash>,
    /// Its entries did not make a signed root: nothing more is released.
    stalled: bool,
    /// While nothing is proven and no seed given: the smallest leaf an entry claimed.
    first_claimed: Option<u64>,
    /// Started past leaf 0 from a given tree ([`Watcher::seed`]).
    seeded: bool,
    /// That tree's size (0: from leaf 0).
    seed_size: u64,
    /// Integrity alerts already raised, by id (each once per run).
    raised: HashSet<String>,
}

impl Watcher {
    /// A watcher that runs the rules over every entry message as it arrives, unverified.
    pub fn new(rules: Rules) -> Watcher {
        Watcher { rules, logs: HashMap::new(), gate: None }
    }

    /// A watcher that runs the rules only over entries a signed checkpoint proved (see the
    /// module's documentation); `verifiers` are the logs' keys.
    pub fn verified(rules: Rules, verifiers: Vec<NoteVerifier>) -> Watcher {
        let gate = Gate { verifiers, logs: HashMap::new(), unknown: HashSet::new() };
        Watcher { rules, logs: HashMap::new(), gate: Some(gate) }
    }

    /// Verified: each log's count of entries proven so far (and so seen by the rules; past
    /// its seed, if it was given one), in origin order. Unverified: nothing.
    pub fn proven(&self) -> Vec<(String, u64)> {
        let Some(gate) = &self.gate else { return vec![] };
        let mut logs: Vec<(String, u64)> = gate
            .logs
            .iter()
            .map(|(origin, log)| (origin.clone(), log.proven.size() - log.seed_size))
            .collect();
        logs.sort();
        logs
    }

    /// Takes one message of the entries topic. Unverified, the rules run over it at once;
    /// verified, it is held until a checkpoint proves it, and what it completes is released
    /// to the rules in leaf order. Malformed messages and repeats are skipped (`verify` is
    /// what reports them).
    pub fn observe_message(&mut self, payload: &[u8]) -> Vec<Alert> {
        let Ok(value) = ocsf::parse(payload) else { return vec![] };
        let Ok(env) = ocsf::envelope(&value) else { return vec![] };
        if self.gate.is_none() {
            let Ok(event) = Event::decode(&env.entry) else { return vec![] };
            return self.observe(&env.origin, env.index, &event);
        }
        let mut alerts = Vec::new();
        self.hold(env.origin, env.index, env.entry, &mut alerts);
        alerts
    }

    /// Takes one message of the checkpoints topic: verified, a checkpoint whose signature
    /// holds releases the held entries it proves. Unverified, checkpoints are not used.
    pub fn observe_checkpoint(&mut self, payload: &[u8]) -> Vec<Alert> {
        let Some(gate) = &mut self.gate else { return vec![] };
        let mut alerts = Vec::new();
        let Ok(text) = std::str::from_utf8(payload) else { return alerts };
        let body = arca_audit::note::unverified_text(text).unwrap_or(text);
        let Ok(claimed) = checkpoint::Checkpoint::parse(body) else { return alerts };
        let origin = claimed.origin;
        let Some(verifier) = gate.verifiers.iter().find(|v| v.name() == origin).cloned() else {
            gate.log(&origin, &mut alerts);
            return alerts;
        };
        let log = gate.log(&origin, &mut alerts).expect("a key");
        let size = claimed.size;
        let cp = match checkpoint::open(text, &verifier) {
            Ok(cp) => cp,
            Err(e) => {
                let detail = format!(
                    "a checkpoint of size {size} does not verify ({e}): someone else wrote to the topic"
                );
                integrity(&mut alerts, log, &origin, size, "bad-signature", detail);
                return alerts;
            }
        };
        let (size, root) = (cp.size(), *cp.root());
        if size < log.proven.size() {
            return alerts; // an earlier checkpoint, already passed by a later one
        }
        if size == log.proven.size() {
            if root != log.proven.root() {
                let detail = format!("two signed checkpoints of size {size} differ: the log forked");
                integrity(&mut alerts, log, &origin, size, "fork", detail);
            }
            return alerts;
        }
        match log.signed.get(&size) {
            Some(other) if *other != root => {
                let detail = format!("two signed checkpoints of size {size} differ: the log forked");
                integrity(&mut alerts, log, &origin, size, "fork", detail);
            }
            Some(_) => {}
            None => {
                log.signed.insert(size, root);
            }
        }
        self.release(&origin, &mut alerts);
        alerts
    }

    /// Holds an entry of a verified stream and releases what it completes.
    fn hold(&mut self, origin: String, index: u64, entry: Vec<u8>, alerts: &mut Vec<Alert>) {
        let gate = self.gate.as_mut().expect("verified");
        let Some(log) = gate.log(&origin, alerts) else { return };
        if log.stalled || index < log.proven.size() {
            return; // proven already (a repeat), or no longer watched
        }
        // Leaves are held within HELD_LIMIT of the last proven one; before any is proven (and
        // no seed given), of the first leaf claimed, where a seed would start the log.
        let base = if log.proven.size() == 0 && !log.seeded {
            let base = *log.first_claimed.insert(log.first_claimed.map_or(index, |f| f.min(index)));
            // An earlier leaf arrived: what is held too far past it goes.
            let far = log.held.split_off(&base.saturating_add(HELD_LIMIT));
            if let Some(first) = far.keys().next() {
                let detail =
                    format!("an entry claims leaf {first}, more than {HELD_LIMIT} past leaf {base}: dropped");
                integrity(alerts, log, &origin, base, "too-far", detail);
            }
            base
        } else {
            log.proven.size()
        };
        if index - base >= HELD_LIMIT || log.held.len() as u64 >= HELD_LIMIT {
            let detail =
                format!("an entry claims leaf {index}, more than {HELD_LIMIT} past leaf {base}: dropped");
            integrity(alerts, log, &origin, base, "too-far", detail);
            return;
        }
        match log.held.get(&index) {
            Some(first) if *first != entry => {
                let detail =
                    format!("two different entries for leaf {index}: someone else wrote to the topic");
                integrity(alerts, log, &origin, index, "conflict", detail);
                return;
            }
            Some(_) => return, // a repeat
            None => {
                log.held.insert(index, entry);
                while log.held.contains_key(&log.contiguous) {
                    log.contiguous += 1;
                }
            }
        }
        self.release(&origin, alerts);
        let gate = self.gate.as_mut().expect("verified");
        if let Some(log) = gate.logs.get_mut(&origin)
            && !log.held.is_empty()
            && log.held.len().is_multiple_of(WAITING_REPORT_EVERY)
        {
            let (waiting, next) = (log.held.len(), log.contiguous);
            if log.held.range(next..).next().is_none() {
                let at = log.proven.size();
                let detail =
                    format!("{waiting} entries from leaf {at} wait and no signed checkpoint proves them");
                integrity(alerts, log, &origin, at, "unproven", detail);
            } else {
                let detail = format!("leaf {next} has not arrived; {waiting} entries wait for it");
                integrity(alerts, log, &origin, next, "gap", detail);
            }
        }
    }

    /// Verified logs that could start past leaf 0: nothing proven, no seed given, leaf 0 not
    /// held, and an entry received; with the first leaf claimed (the seed's size to give).
    pub fn wants_seed(&self) -> Vec<(String, u64)> {
        let Some(gate) = &self.gate else { return vec![] };
        let mut wanted: Vec<(String, u64)> = gate
            .logs
            .iter()
            .filter(|(_, log)| log.proven.size() == 0 && !log.seeded && !log.stalled)
            .filter_map(|(origin, log)| Some((origin.clone(), log.first_claimed.filter(|n| *n > 0)?)))
            .collect();
        wanted.sort();
        wanted
    }

    /// Starts a verified log past leaf 0: `tree` is the log's tree of leaves
    /// `0..tree.size()` (from its tiles). Only for a log with nothing proven yet; entries
    /// before it are dropped unwatched. A signed checkpoint of that very size must have its
    /// root (else `seed-mismatch`, and the log is watched no further); later ones prove it
    /// together with the entries after it.
    pub fn seed(&mut self, origin: &str, tree: Frontier) -> Result<Vec<Alert>, String> {
        let Some(gate) = self.gate.as_mut() else { return Err("not a verified watcher".into()) };
        let mut alerts = Vec::new();
        let Some(log) = gate.log(origin, &mut alerts) else { return Err(format!("no key for {origin}")) };
        if log.proven.size() != 0 || log.seeded || log.stalled {
            return Err(format!("{origin}: the log is already being watched"));
        }
        let size = tree.size();
        if let Some(root) = log.signed.get(&size)
            && *root != tree.root()
        {
            let detail = format!(
                "the tree of leaves 0..{size} given to start from is not the signed checkpoint's: \
                 this log is watched no further"
            );
            integrity(&mut alerts, log, origin, size, "seed-mismatch", detail);
            log.stalled = true;
            return Ok(alerts);
        }
        log.signed = log.signed.split_off(&(size + 1));
        log.held = log.held.split_off(&size);
        log.contiguous = size;
        while log.held.contains_key(&log.contiguous) {
            log.contiguous += 1;
        }
        log.proven = tree;
        log.seeded = true;
        log.seed_size = size;
        self.release(origin, &mut alerts);
        Ok(alerts)
    }

    /// Releases to the rules, in leaf order, every held entry a signed checkpoint proves.
    fn release(&mut self, origin: &str, alerts: &mut Vec<Alert>) {
        loop {
            let gate = self.gate.as_mut().expect("verified");
            let Some(log) = gate.logs.get_mut(origin) else { return };
            if log.stalled {
                return;
            }
            let Some((&size, &root)) = log.signed.first_key_value() else { return };
            let from = log.proven.size();
            if log.contiguous < size {
                return; // a leaf up to the checkpoint's size has not arrived
            }
            let mut tree = log.proven.clone();
            for entry in log.held.range(from..size).map(|(_, e)| e) {
                tree.push(merkle::leaf_hash(entry));
            }
            if tree.root() != root {
                let detail = format!(
                    "the entries received for leaves {from}..{size} do not make the signed root: \
                     the stream was altered; this log is watched no further (run `arca-siem verify`)"
                );
                integrity(alerts, log, origin, size, "root-mismatch", detail);
                log.stalled = true;
                log.held.clear();
                log.signed.clear();
                log.contiguous = log.proven.size();
                return;
            }
            let rest = log.held.split_off(&size);
            let proven = std::mem::replace(&mut log.held, rest);
            log.proven = tree;
            log.signed.remove(&size);
            for (index, entry) in proven {
                // The signed tree covers these bytes: an entry that does not decode is the
                // log's own (the node's sequencer wrote it), reported rather than skipped.
                match Event::decode(&entry) {
                    Ok(event) => alerts.extend(self.observe(origin, index, &event)),
                    Err(e) => {
                        let gate = self.gate.as_mut().expect("verified");
                        let log = gate.logs.get_mut(origin).expect("held above");
                        let detail = format!("leaf {index} is signed but does not decode: {e}");
                        integrity(alerts, log, origin, index, "undecodable", detail);
                    }
                }
            }
        }
    }

    /// Runs the rules over leaf `index` of log `origin`.
    pub fn observe(&mut self, origin: &str, index: u64, event: &Event) -> Vec<Alert> {
        let rules = self.rules.clone();
        let log = self.logs.entry(origin.to_owned()).or_default();
        if index < log.next_index {
            return vec![];
        }
        log.next_index = index.saturating_add(1);
        let t = event.time_unix_ms;
        let first = *log.first_time.get_or_insert(t);
        let first_index = *log.first_index.get_or_insert(index);
        let learning = index - first_index < rules.baseline_entries
            || t < first.saturating_add(rules.baseline_secs * 1000);
        let identity = event.actor.entity.clone();
        let secret = secret_of(event.operation, &event.path);
        let ip = ocsf::source_ip(&event.source.address).to_owned();
        let mut alerts = Vec::new();
        let mut alert =
            |rule: &'static str, severity: &'static str, detail: String, secret: Option<String>| {
                alerts.push(Alert {
                    id: format!("{origin}/{index}/{rule}"),
                    rule,
                    severity,
                    origin: origin.to_owned(),
                    leaf_index: index,
                    time_unix_ms: t,
                    identity: identity.clone(),
                    secret,
                    source_ip: Some(ip.clone()),
                    detail,
                    request_id: event.request_id.clone(),
                })
            };

        // new-source
        if rules.new_source && log.sources.insert((identity.clone(), ip.clone())) && !learning {
            alert("new-source", "medium", format!("{identity} used a new source address {ip}"), None);
        }

        // denial-burst
        if event.outcome.is_denied() {
            let window = rules.denial_burst_window_secs.saturating_mul(1000);
            let (times, alerted) = log.denials.entry(identity.clone()).or_default();
            times.push_back(t);
            while times.front().is_some_and(|f| f.saturating_add(window) < t) {
                times.pop_front();
            }
            if times.len() < rules.denial_burst_threshold {
                *alerted = false;
            } else if !*alerted {
                *alerted = true;
                alert(
                    "denial-burst",
                    "high",
                    format!(
                        "{identity} was denied {} times within {}s",
                        times.len(),
                        rules.denial_burst_window_secs
                    ),
                    None,
                );
            }
        }

        // region-snapshot
        if event.operation == Operation::RegionSnapshot && event.outcome == Outcome::Ok {
            let last = log.snapshots.insert(identity.clone(), t);
            if rules.region_snapshot && last.is_none_or(|last| last.saturating_add(SNAPSHOT_QUIET_MS) < t) {
                alert(
                    "region-snapshot",
                    "high",
                    format!("{identity} was served a snapshot of the whole replicated keyspace"),
                    None,
                );
            }
        }

        // region-denied: the replication listener refused a caller for who it is (a region
        // that is no peer, or a certificate that does not name the region it calls as). Its
        // certificate was signed by the regions' CA, so either a region is misconfigured or a
        // region certificate is in other hands. A caller retries every 300 ms: one alert per
        // identity until it has been quiet as long as between two snapshots.
        let replication = matches!(
            event.operation,
            Operation::RegionPull | Operation::RegionSnapshot | Operation::RegionHello
        );
        if replication && event.outcome.is_denied() {
            let last = log.region_denials.insert(identity.clone(), t);
            if rules.region_denied && last.is_none_or(|last| last.saturating_add(SNAPSHOT_QUIET_MS) < t) {
                alert(
                    "region-denied",
                    "critical",
                    format!(
                        "{identity} was refused by the replication listener ({}): a region certificate \
                         used by no configured region, or as another region",
                        event.path
                    ),
                    None,
                );
            }
        }

        if let Some(secret) = secret {
            // read-after-destroy
            let is_read = event.operation == Operation::KvRead;
            if rules.read_after_destroy && is_read {
                let hit = match log.gone.get(&secret) {
                    Some(None) => true,
                    Some(Some(versions)) => event.secret_version.is_some_and(|v| versions.contains(&v)),
                    None => false,
                };
                if hit {
                    alert(
                        "read-after-destroy",
                        "high",
                        format!("{identity} read {secret} after it was destroyed or deleted"),
                        Some(secret.clone()),
                    );
                }
            }
            if event.outcome == Outcome::Ok {
                match event.operation {
                    Operation::KvDeleteMetadata => {
                        log.gone.insert(secret.clone(), None);
                    }
                    Operation::KvDestroy | Operation::KvDelete => match event.secret_version {
                        Some(v) => {
                            // `None` already: every version is gone.
                            if let Some(versions) =
                                log.gone.entry(secret.clone()).or_insert_with(|| Some(BTreeSet::new()))
                            {
                                versions.insert(v);
                            }
                        }
                        None => {
                            log.gone.insert(secret.clone(), None);
                        }
                    },
                    Operation::KvWrite | Operation::KvUndelete => {
                        // A new version (or a restored one) is readable again.
                        if event.operation == Operation::KvWrite {
                            log.gone.remove(&secret);
                        } else if let Some(Some(versions)) = log.gone.get_mut(&secret)
                            && let Some(v) = event.secret_version
                        {
                            versions.remove(&v);
                        }
                    }
                    _ => {}
                }
            }

            // first-access
            if rules.first_access && log.accessed.insert((identity.clone(), secret.clone())) && !learning {
                alert(
                    "first-access",
                    "low",
                    format!("{identity} accessed {secret} for the first time"),
                    Some(secret.clone()),
                );
            }

            // distinct-secrets
            if is_read {
                let window = rules.distinct_secrets_window_secs.saturating_mul(1000);
                let (seen, alerted) = log.reads.entry(identity.clone()).or_default();
                seen.insert(secret.clone(), t);
                seen.retain(|_, last| last.saturating_add(window) >= t);
                if seen.len() < rules.distinct_secrets_threshold {
                    *alerted = false;
                } else if !*alerted {
                    *alerted = true;
                    alert(
                        "distinct-secrets",
                        "high",
                        format!(
                            "{identity} read {} distinct secrets within {}s",
                            seen.len(),
                            rules.distinct_secrets_window_secs
                        ),
                        None,
                    );
                }
            }
        }
        alerts
    }
}

/// Raises a `stream-integrity` alert (each kind once per leaf and run). Its time is 0: it
/// comes from no event.
fn integrity(
    alerts: &mut Vec<Alert>,
    log: &mut GateLog,
    origin: &str,
    index: u64,
    kind: &str,
    detail: String,
) {
    let id = format!("{origin}/{index}/stream-integrity/{kind}");
    if !log.raised.insert(id.clone()) {
        return;
    }
    alerts.push(Alert {
        id,
        rule: "stream-integrity",
        severity: "critical",
        origin: origin.to_owned(),
        leaf_index: index,
        time_unix_ms: 0,
        identity: String::new(),
        secret: None,
        source_ip: None,
        detail,
        request_id: String::new(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_audit::{Actor, Source};

    fn ev(
        t: u64,
        who: &str,
        ip: &str,
        op: Operation,
        path: &str,
        version: Option<u64>,
        outcome: Outcome,
    ) -> Event {
        Event {
            time_unix_ms: t,
            request_id: format!("r{t}"),
            cluster: "c".into(),
            region: "r".into(),
            node: "n".into(),
            actor: Actor { entity: who.into(), token_accessor: None },
            source: Source { address: format!("{ip}:1000"), proxy: None },
            operation: op,
            path: path.into(),
            secret_version: version,
            outcome,
        }
    }

    fn read(t: u64, who: &str, path: &str) -> Event {
        ev(t, who, "10.0.0.1", Operation::KvRead, path, Some(1), Outcome::Ok)
    }

    fn run(rules: Rules, events: &[Event]) -> Vec<Alert> {
        let mut w = Watcher::new(rules);
        events.iter().enumerate().flat_map(|(i, e)| w.observe("o", i as u64, e)).collect()
    }

    fn quiet_rules() -> Rules {
        Rules { baseline_entries: 3, ..Rules::default() }
    }

    #[test]
    fn a_quiet_stream_raises_nothing() {
        let mut events = vec![read(0, "app", "secret/data/db"), read(1, "app", "secret/data/api")];
        events.push(ev(2, "app", "10.0.0.1", Operation::KvWrite, "secret/data/db", Some(2), Outcome::Ok));
        for i in 0..200 {
            events.push(read(
                1000 + i * 500,
                "app",
                if i % 2 == 0 { "secret/data/db" } else { "secret/data/api" },
            ));
        }
        assert_eq!(run(quiet_rules(), &events), vec![]);
    }

    #[test]
    fn distinct_secrets_fires_once_per_burst() {
        let mut events = vec![read(0, "app", "secret/data/db"); 3];
        for i in 0..25 {
            events.push(read(10_000 + i, "app", &format!("secret/data/s{i}")));
        }
        let rules = Rules { first_access: false, ..quiet_rules() };
        let alerts = run(rules.clone(), &events);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!((alerts[0].rule, alerts[0].leaf_index), ("distinct-secrets", 3 + 18));
        // Spread over more than the window: nothing.
        let slow: Vec<Event> =
            (0..25).map(|i| read(i * 60_000, "app", &format!("secret/data/s{i}"))).collect();
        assert_eq!(run(rules, &slow), vec![]);
    }

    #[test]
    fn first_access_and_new_source() {
        let events = [
            read(0, "app", "secret/data/db"),
            read(1, "app", "secret/data/db"),
            read(2, "app", "secret/data/db"),
            read(3, "app", "secret/data/payroll"),
            ev(4, "app", "192.0.2.9", Operation::KvRead, "secret/data/db", Some(1), Outcome::Ok),
        ];
        let alerts = run(quiet_rules(), &events);
        let got: Vec<_> = alerts.iter().map(|a| (a.rule, a.leaf_index)).collect();
        assert_eq!(got, vec![("first-access", 3), ("new-source", 4)]);
        assert_eq!(alerts[0].secret.as_deref(), Some("secret/payroll"));
        assert_eq!(alerts[1].source_ip.as_deref(), Some("192.0.2.9"));
    }

    #[test]
    fn denial_burst() {
        let mut events = vec![read(0, "app", "secret/data/db"); 3];
        for i in 0..12 {
            events.push(ev(
                100 + i,
                "intruder",
                "10.0.0.1",
                Operation::KvRead,
                "secret/data/db",
                None,
                Outcome::Denied,
            ));
        }
        let rules = Rules { first_access: false, new_source: false, ..quiet_rules() };
        let alerts = run(rules, &events);
        assert_eq!(
            alerts.iter().map(|a| (a.rule, a.leaf_index)).collect::<Vec<_>>(),
            vec![("denial-burst", 12)]
        );
    }

    #[test]
    fn read_after_destroy() {
        let ok = Outcome::Ok;
        let events = [
            read(0, "app", "secret/data/db"),
            read(1, "app", "secret/data/old"),
            read(2, "app", "secret/data/db"),
            ev(3, "admin", "10.0.0.1", Operation::KvDestroy, "secret/destroy/db", Some(1), ok.clone()),
            ev(
                4,
                "app",
                "10.0.0.1",
                Operation::KvRead,
                "secret/data/db",
                Some(1),
                Outcome::Error { code: "not_found".into() },
            ),
            ev(5, "admin", "10.0.0.1", Operation::KvDeleteMetadata, "secret/metadata/old", None, ok.clone()),
            read(6, "app", "secret/data/old"),
            ev(7, "admin", "10.0.0.1", Operation::KvWrite, "secret/data/old", Some(1), ok),
            read(8, "app", "secret/data/old"),
        ];
        let rules = Rules { first_access: false, new_source: false, ..quiet_rules() };
        let got: Vec<_> = run(rules, &events).iter().map(|a| (a.rule, a.leaf_index)).collect();
        assert_eq!(got, vec![("read-after-destroy", 4), ("read-after-destroy", 6)]);
    }

    #[test]
    fn region_snapshot_fires_once_per_snapshot() {
        let snapshot = |t: u64, who: &str, outcome: Outcome| {
            let path = format!("sys/replication/snapshot/{}", who.trim_start_matches("region:"));
            ev(t, who, "10.0.0.2", Operation::RegionSnapshot, &path, None, outcome)
        };
        let refused = Outcome::Error { code: "failed_precondition".into() };
        let events = [
            read(0, "app", "secret/data/db"),
            // A refused snapshot hands nothing over.
            snapshot(1_000, "region:us", refused),
            // One snapshot, three chunks.
            snapshot(2_000, "region:us", Outcome::Ok),
            snapshot(2_050, "region:us", Outcome::Ok),
            snapshot(2_100, "region:us", Outcome::Ok),
            // Another region's, at the same time.
            snapshot(2_200, "region:ap", Outcome::Ok),
            // us again, after the quiet time: a new snapshot.
            snapshot(2_100 + SNAPSHOT_QUIET_MS + 1, "region:us", Outcome::Ok),
        ];
        let rules = Rules { first_access: false, new_source: false, ..quiet_rules() };
        let alerts = run(rules.clone(), &events);
        assert_eq!(
            hits(&alerts),
            vec![
                ("region-snapshot", 2, "region:us"),
                ("region-snapshot", 5, "region:ap"),
                ("region-snapshot", 6, "region:us")
            ]
        );
        assert_eq!(alerts[0].severity, "high");
        // Switched off: nothing.
        assert_eq!(run(Rules { region_snapshot: false, ..rules }, &events), vec![]);
    }

    #[test]
    fn region_denied_fires_once_per_caller_until_it_is_quiet() {
        const CERT: &str = "certificate:mallory sha256:0011";
        let call = |t: u64, who: &str, op: Operation, call: &str, outcome: Outcome| {
            ev(t, who, "10.0.0.9", op, &format!("sys/replication/{call}/us"), None, outcome)
        };
        let (pull, denied) = (Operation::RegionPull, Outcome::Denied);
        let events = [
            // Refused for the region's role, not for who called: nothing.
            call(0, "region:us", pull, "pull", Outcome::Error { code: "failed_precondition".into() }),
            // A certificate calling as us, three times in a row: one alert.
            call(1_000, CERT, Operation::RegionSnapshot, "snapshot", denied.clone()),
            call(1_300, CERT, pull, "pull", denied.clone()),
            call(1_600, CERT, Operation::RegionHello, "hello", denied.clone()),
            // A region that is no peer: its own alert.
            call(1_700, "region:ap", pull, "pull", denied.clone()),
            // A denied read elsewhere is no replication call.
            ev(1_800, "token:app", "10.0.0.9", Operation::KvRead, "secret/data/x", None, denied.clone()),
            // The certificate again, after a quiet time: a new alert.
            call(1_600 + SNAPSHOT_QUIET_MS + 1, CERT, pull, "pull", denied),
        ];
        let rules = Rules { first_access: false, new_source: false, ..quiet_rules() };
        let alerts = run(rules.clone(), &events);
        assert_eq!(
            hits(&alerts),
            vec![("region-denied", 1, CERT), ("region-denied", 4, "region:ap"), ("region-denied", 6, CERT)]
        );
        assert_eq!(alerts[0].severity, "critical");
        assert!(alerts[0].detail.contains("sys/replication/snapshot/us"), "{}", alerts[0].detail);
        assert_eq!(run(Rules { region_denied: false, ..rules }, &events), vec![]);
    }

    /// Each alert's rule, leaf and identity.
    fn hits(alerts: &[Alert]) -> Vec<(&str, u64, &str)> {
        alerts.iter().map(|a| (a.rule, a.leaf_index, a.identity.as_str())).collect()
    }

    #[test]
    fn repeats_are_dropped_and_ids_are_stable() {
        let mut w = Watcher::new(Rules::default());
        let e = read(5, "app", "secret/data/x");
        let first = w.observe("o", 0, &e);
        assert_eq!(first.len(), 2); // first-access and new-source, no baseline
        assert_eq!(w.observe("o", 0, &e), vec![]);
        assert_eq!(first[0].id, "o/0/new-source");
    }

    mod verified {
        use super::*;
        use crate::verify::tests::{ORIGIN, event, log, message, signed_log};

        fn feed(w: &mut Watcher, records: &[crate::kafka::Record]) -> Vec<Alert> {
            records.iter().flat_map(|r| w.observe_message(&r.payload)).collect()
        }

        fn checkpoints(w: &mut Watcher, records: &[crate::kafka::Record]) -> Vec<Alert> {
            records.iter().flat_map(|r| w.observe_checkpoint(&r.payload)).collect()
        }

        fn rules_only(alerts: &[Alert]) -> Vec<&Alert> {
            alerts.iter().filter(|a| a.rule != "stream-integrity").collect()
        }

        fn integrity_kinds(alerts: &[Alert]) -> Vec<(&str, u64)> {
            alerts
                .iter()
                .filter(|a| a.rule == "stream-integrity")
                .map(|a| (a.id.rsplit('/').next().unwrap(), a.leaf_index))
                .collect()
        }

        #[test]
        fn entries_wait_for_the_checkpoint_that_proves_them() {
            let (entries, cps, v) = log(10, &[4, 10]);
            let unverified = feed(&mut Watcher::new(Rules::default()), &entries);
            assert_eq!(unverified.len(), 11, "first-access for each of 10 secrets, one new source");

            let mut w = Watcher::verified(Rules::default(), vec![v]);
            assert_eq!(feed(&mut w, &entries), vec![], "nothing is proven yet");
            let first = checkpoints(&mut w, &cps[..1]);
            assert!(first.iter().all(|a| a.leaf_index < 4), "{first:#?}");
            assert_eq!(first, unverified[..5].to_vec(), "leaves 0..4: four first accesses, one new source");
            assert_eq!(w.proven(), vec![(ORIGIN.to_owned(), 4)]);
            let rest = checkpoints(&mut w, &cps[1..]);
            assert_eq!([first, rest].concat(), unverified, "the same alerts, once proven");
            assert_eq!(w.proven(), vec![(ORIGIN.to_owned(), 10)]);
            assert_eq!(feed(&mut w, &entries), vec![], "repeats of proven leaves are dropped");
        }

        #[test]
        fn the_order_of_the_two_topics_does_not_matter() {
            let (entries, cps, v) = log(10, &[4, 10]);
            let expected = feed(&mut Watcher::new(Rules::default()), &entries);
            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let mut got = checkpoints(&mut w, &cps);
            for r in entries.iter().rev() {
                got.extend(w.observe_message(&r.payload));
            }
            assert_eq!(got, expected);
        }

        #[test]
        fn a_forged_far_leaf_blinds_an_unverified_watcher_but_not_a_verified_one() {
            let (entries, cps, v) = log(10, &[10]);
            let expected = feed(&mut Watcher::new(Rules::default()), &entries);
            let forged = message(u64::MAX - 1, &event(99).encode());
            let with_forgery = [vec![forged], entries].concat();

            let mut unverified = Watcher::new(Rules::default());
            let blinded = feed(&mut unverified, &with_forgery);
            assert_eq!(blinded.len(), 2, "the forged leaf's own alerts, then nothing: {blinded:#?}");

            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let mut got = feed(&mut w, &with_forgery);
            got.extend(checkpoints(&mut w, &cps));
            assert_eq!(integrity_kinds(&got), vec![("too-far", 0)]);
            assert_eq!(rules_only(&got), expected.iter().collect::<Vec<_>>());
        }

        /// The tree of the first `n` leaves, as a log's tiles give it.
        fn tree_of(n: u64) -> Frontier {
            let mut tree = Frontier::new();
            for i in 0..n {
                tree.push(merkle::leaf_hash(&event(i).encode()));
            }
            tree
        }

        #[test]
        fn a_watcher_that_starts_late_is_seeded_and_proves_the_rest() {
            // The topic lost leaves 0..10 to retention.
            let (entries, cps, v) = log(20, &[8, 14, 20]);
            let late = &entries[10..];
            let expected = feed(&mut Watcher::new(Rules::default()), late);
            assert!(!expected.is_empty());

            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let mut got = checkpoints(&mut w, &cps);
            got.extend(feed(&mut w, late));
            assert_eq!(got, vec![], "nothing proven: leaf 0 never comes");
            assert_eq!(w.wants_seed(), vec![(ORIGIN.to_owned(), 10)]);
            got.extend(w.seed(ORIGIN, tree_of(10)).unwrap());
            assert_eq!(got, expected, "the same alerts as from leaf 10 on, once proven");
            assert_eq!(w.proven(), vec![(ORIGIN.to_owned(), 10)], "leaves 10..20");
            assert_eq!(w.wants_seed(), vec![]);
            assert!(w.seed(ORIGIN, tree_of(10)).is_err(), "a log is seeded once");
        }

        #[test]
        fn a_forged_seed_stops_the_log() {
            let (entries, cps, v) = log(20, &[8, 14, 20]);
            let mut forged = tree_of(9);
            forged.push(merkle::leaf_hash(b"not the log's leaf 9"));
            let mut w = Watcher::verified(Rules::default(), vec![v.clone()]);
            let mut got = checkpoints(&mut w, &cps);
            got.extend(feed(&mut w, &entries[10..]));
            got.extend(w.seed(ORIGIN, forged).unwrap());
            assert_eq!(integrity_kinds(&got), vec![("root-mismatch", 14)]);
            assert_eq!(rules_only(&got), Vec::<&Alert>::new());
            assert_eq!(w.proven(), vec![(ORIGIN.to_owned(), 0)]);

            // A seed at a signed checkpoint's own size must have its root.
            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let mut got = checkpoints(&mut w, &cps);
            got.extend(feed(&mut w, &entries[8..]));
            let mut wrong = tree_of(7);
            wrong.push(merkle::leaf_hash(b"x"));
            got.extend(w.seed(ORIGIN, wrong).unwrap());
            got.extend(checkpoints(&mut w, &cps));
            assert_eq!(integrity_kinds(&got), vec![("seed-mismatch", 8)]);
            assert_eq!(rules_only(&got), Vec::<&Alert>::new(), "watched no further");
        }

        #[test]
        fn a_late_stream_far_past_leaf_0_is_held_from_its_first_leaf() {
            let (_, _, v) = log(1, &[]);
            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let start = 3 * HELD_LIMIT;
            let mut got = Vec::new();
            for i in start..start + 5 {
                got.extend(w.observe_message(&message(i, &event(i).encode()).payload));
            }
            assert_eq!(got, vec![], "held, not too far: the stream starts there");
            assert_eq!(w.wants_seed(), vec![(ORIGIN.to_owned(), start)]);
            // An earlier leaf moves the start; what is then too far past it goes.
            let early = w.observe_message(&message(start - HELD_LIMIT - 1, &event(1).encode()).payload);
            assert_eq!(integrity_kinds(&early), vec![("too-far", start - HELD_LIMIT - 1)]);
            assert_eq!(w.wants_seed(), vec![(ORIGIN.to_owned(), start - HELD_LIMIT - 1)]);
        }

        #[test]
        fn an_injected_entry_stops_the_log_with_an_alert_and_no_rule_sees_it() {
            let (entries, cps, v) = log(10, &[4, 10]);
            let mut injected = event(2);
            injected.actor.entity = "token:intruder".into();
            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let mut got = w.observe_message(&message(2, &injected.encode()).payload);
            got.extend(feed(&mut w, &entries));
            got.extend(checkpoints(&mut w, &cps));
            assert_eq!(integrity_kinds(&got), vec![("conflict", 2), ("root-mismatch", 4)]);
            assert_eq!(rules_only(&got), Vec::<&Alert>::new(), "nothing past the proven prefix (empty)");
            assert!(got.iter().all(|a| !a.detail.contains("intruder")));
            // Watched no further: later messages release nothing.
            assert_eq!(feed(&mut w, &entries), vec![]);
        }

        #[test]
        fn checkpoints_that_do_not_verify_release_nothing() {
            let (entries, _, v) = log(6, &[6]);
            let (_, other_cps, _) = signed_log(6, &[6], 8);
            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let mut got = feed(&mut w, &entries);
            got.extend(checkpoints(&mut w, &other_cps));
            assert_eq!(integrity_kinds(&got), vec![("bad-signature", 6)]);
            assert_eq!(rules_only(&got), Vec::<&Alert>::new());
            // The same again is not raised twice.
            assert_eq!(checkpoints(&mut w, &other_cps), vec![]);
        }

        #[test]
        fn entries_that_wait_say_why() {
            let n = WAITING_REPORT_EVERY as u64 + 1;
            let (entries, cps, v) = log(n, &[n]);
            // Leaf 0 lost: everything waits for it.
            let mut w = Watcher::verified(Rules::default(), vec![v.clone()]);
            let mut got = feed(&mut w, &entries[1..]);
            got.extend(checkpoints(&mut w, &cps));
            assert_eq!(integrity_kinds(&got), vec![("gap", 0)]);
            assert_eq!(rules_only(&got), Vec::<&Alert>::new());
            // It arrives late (a re-send): all is proven.
            let late = w.observe_message(&entries[0].payload);
            assert_eq!(rules_only(&late).len(), late.len());
            assert_eq!(late.iter().map(|a| a.leaf_index).max(), Some(n - 1));
            // No checkpoint at all.
            let mut w = Watcher::verified(Rules::default(), vec![v]);
            let got = feed(&mut w, &entries);
            assert_eq!(integrity_kinds(&got), vec![("unproven", 0)]);
        }

        #[test]
        fn logs_without_a_key_are_named_once_and_not_watched() {
            let (entries, cps, _) = log(4, &[4]);
            let other = arca_audit::note::NoteSigner::from_seed("arca/else/r2", &[8; 32]).unwrap().verifier();
            assert_ne!(other.name(), ORIGIN);
            let mut w = Watcher::verified(Rules::default(), vec![other]);
            let mut got = feed(&mut w, &entries);
            got.extend(checkpoints(&mut w, &cps));
            assert_eq!(integrity_kinds(&got), vec![("no-key", 0)]);
            assert_eq!(got.len(), 1);
        }
    }

    #[test]
    fn secret_names() {
        assert_eq!(secret_of(Operation::KvRead, "secret/data/a/b").as_deref(), Some("secret/a/b"));
        assert_eq!(secret_of(Operation::KvDestroy, "kv/destroy/x").as_deref(), Some("kv/x"));
        assert_eq!(secret_of(Operation::TokenCreate, "auth/token/create"), None);
        assert_eq!(secret_of(Operation::KvRead, "secret"), None);
    }
}
