//! `arca-siem watch`: anomaly rules over the exported stream.
//!
//! Rules run over entries in leaf order per log (repeats of a leaf are dropped) and use the
//! events' own times, so a replay of the topic raises the same alerts with the same ids:
//! - `distinct-secrets`: one identity reads ≥ N distinct secrets within a window;
//! - `first-access`: an identity touches a secret it never touched before;
//! - `new-source`: an identity appears from an IP address it never used before;
//! - `denial-burst`: ≥ N denied requests by one identity within a window;
//! - `read-after-destroy`: a secret is read after it was destroyed or deleted (metadata
//!   deleted, all versions destroyed, or the very version destroyed or deleted).
//!
//! `first-access` and `new-source` learn quietly during a baseline (the first entries or
//! seconds of each log), so that a stream's history is not one alert per identity.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use arca_audit::{Event, Operation, Outcome};
use serde::{Deserialize, Serialize};

use crate::ocsf;

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
    first_time: Option<u64>,
    /// identity → (secret → last read time) within the window; whether alerted this window.
    reads: HashMap<String, (BTreeMap<String, u64>, bool)>,
    denials: HashMap<String, (VecDeque<u64>, bool)>,
    accessed: HashSet<(String, String)>,
    sources: HashSet<(String, String)>,
    /// secret → destroyed versions (`None`: all of them).
    gone: HashMap<String, Option<BTreeSet<u64>>>,
}

/// The rule engine; feed it entries in any order, it keeps per-log state.
#[derive(Default)]
pub struct Watcher {
    rules: Rules,
    logs: HashMap<String, LogState>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").field("rules", &self.rules).field("logs", &self.logs.len()).finish()
    }
}

impl Watcher {
    pub fn new(rules: Rules) -> Watcher {
        Watcher { rules, logs: HashMap::new() }
    }

    /// Runs the rules over one consumed message's payload. Malformed messages and repeats
    /// are skipped (`verify` is what reports them).
    pub fn observe_message(&mut self, payload: &[u8]) -> Vec<Alert> {
        let Ok(value) = ocsf::parse(payload) else { return vec![] };
        let Ok(env) = ocsf::envelope(&value) else { return vec![] };
        let Ok(event) = Event::decode(&env.entry) else { return vec![] };
        self.observe(&env.origin, env.index, &event)
    }

    /// Runs the rules over leaf `index` of log `origin`.
    pub fn observe(&mut self, origin: &str, index: u64, event: &Event) -> Vec<Alert> {
        let rules = self.rules.clone();
        let log = self.logs.entry(origin.to_owned()).or_default();
        if index < log.next_index {
            return vec![];
        }
        log.next_index = index + 1;
        let t = event.time_unix_ms;
        let first = *log.first_time.get_or_insert(t);
        let learning = index < rules.baseline_entries || t < first.saturating_add(rules.baseline_secs * 1000);
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
            let window = rules.denial_burst_window_secs * 1000;
            let (times, alerted) = log.denials.entry(identity.clone()).or_default();
            times.push_back(t);
            while times.front().is_some_and(|f| *f + window < t) {
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
                let window = rules.distinct_secrets_window_secs * 1000;
                let (seen, alerted) = log.reads.entry(identity.clone()).or_default();
                seen.insert(secret.clone(), t);
                seen.retain(|_, last| *last + window >= t);
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
    fn repeats_are_dropped_and_ids_are_stable() {
        let mut w = Watcher::new(Rules::default());
        let e = read(5, "app", "secret/data/x");
        let first = w.observe("o", 0, &e);
        assert_eq!(first.len(), 2); // first-access and new-source, no baseline
        assert_eq!(w.observe("o", 0, &e), vec![]);
        assert_eq!(first[0].id, "o/0/new-source");
    }

    #[test]
    fn secret_names() {
        assert_eq!(secret_of(Operation::KvRead, "secret/data/a/b").as_deref(), Some("secret/a/b"));
        assert_eq!(secret_of(Operation::KvDestroy, "kv/destroy/x").as_deref(), Some("kv/x"));
        assert_eq!(secret_of(Operation::TokenCreate, "auth/token/create"), None);
        assert_eq!(secret_of(Operation::KvRead, "secret"), None);
    }
}
