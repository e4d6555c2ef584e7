//! `arca-siem watch` over a real exported stream: a quiet workload raises nothing; a
//! scripted one raises exactly the alerts its anomalies call for, on stdout and on the
//! alerts topic, verified (each entry proven by a signed checkpoint) or not.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// The alerts of a verified watch: entries held until a checkpoint signed by `node`'s key
/// proves them.
fn alerts(config: &std::path::Path, node: &Node, exported: u64) -> Vec<Value> {
    let (code, out, err) = siem(config, &["watch", "--until-end", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("UNVERIFIED"), "{err}");
    // Every entry exported when the watch started was proven by a signed checkpoint.
    let proven: u64 = err
        .lines()
        .find_map(|l| {
            l.strip_prefix("arca-siem: ")?
                .split(": ")
                .nth(1)?
                .strip_suffix(" entries proven by signed checkpoints and watched")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no progress line in {err}"));
    assert!(proven >= exported, "{proven} entries proven of {exported}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `(rule, identity, secret or source)` → count.
fn tally(alerts: &[Value]) -> BTreeMap<(String, String, String), usize> {
    let mut t = BTreeMap::new();
    for a in alerts {
        let what = match a["rule"].as_str().unwrap() {
            "new-source" => a["source_ip"].as_str().unwrap().to_owned(),
            "first-access" | "read-after-destroy" => {
                let s = a["secret"].as_str().unwrap();
                if s.starts_with("secret/app/s") { "secret/app/s*".to_owned() } else { s.to_owned() }
            }
            _ => String::new(),
        };
        *t.entry((
            a["rule"].as_str().unwrap().to_owned(),
            a["identity"].as_str().unwrap().to_owned(),
            what,
        ))
        .or_default() += 1;
    }
    t
}

#[test]
fn watch_raises_the_right_alerts_and_none_for_a_quiet_stream() {
    let stack = Stack::start(false, "");
    let (node, exporter, config, broker) = (&stack.node, &stack.exporter, &stack.config, &stack.broker);

    // Baseline: the secrets, two identities, the app's habits.
    let app = node.token_reading("app", "app/");
    let intruder = node.token_reading("intruder", "nothing/");
    for name in ["db", "api", "old"] {
        assert_eq!(node.put(&format!("app/{name}"), "v"), 200);
    }
    for i in 0..25 {
        assert_eq!(node.put(&format!("app/s{i}"), "v"), 200);
    }
    for _ in 0..2 {
        assert_eq!(node.get_as(&app, "app/db"), 200);
        assert_eq!(node.get_as(&app, "app/api"), 200);
    }
    let baseline = exporter.wait_caught_up(node, DEADLINE);
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, format!("{text}\n[watch]\nbaseline_entries = {baseline}\n")).unwrap();

    // Quiet: the same identity, secrets and address as before.
    for _ in 0..10 {
        assert_eq!(node.get_as(&app, "app/db"), 200);
        assert_eq!(node.get_as(&app, "app/api"), 200);
    }
    let exported = exporter.wait_caught_up(node, DEADLINE);
    assert_eq!(alerts(config, node, exported), Vec::<Value>::new());

    // Anomalies.
    for i in 0..25 {
        assert_eq!(node.get_as(&app, &format!("app/s{i}")), 200); // a sweep: distinct-secrets
    }
    for _ in 0..12 {
        assert_eq!(node.get_as(&intruder, "app/db"), 403); // denial-burst
    }
    assert_eq!(node.get_from("127.0.0.2", &app, "app/db"), 200); // new-source
    assert_eq!(node.destroy("app/old", &[1]), 204);
    assert_eq!(node.get_as(&app, "app/old"), 404); // read-after-destroy
    let exported = exporter.wait_caught_up(node, DEADLINE);

    let raised = alerts(config, node, exported);
    let s = |x: &str| x.to_owned();
    let expected: BTreeMap<(String, String, String), usize> = [
        ((s("distinct-secrets"), s("token:app"), s("")), 1),
        ((s("first-access"), s("token:app"), s("secret/app/s*")), 25),
        ((s("first-access"), s("token:intruder"), s("secret/app/db")), 1),
        ((s("first-access"), s("token:app"), s("secret/app/old")), 1),
        ((s("denial-burst"), s("token:intruder"), s("")), 1),
        ((s("new-source"), s("token:intruder"), s("127.0.0.1")), 1),
        ((s("new-source"), s("token:app"), s("127.0.0.2")), 1),
        ((s("read-after-destroy"), s("token:app"), s("secret/app/old")), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(tally(&raised), expected, "{raised:#?}");
    // Replays raise the same alerts, with the same ids; unverified too (with a warning).
    let ids: Vec<&Value> = raised.iter().map(|a| &a["id"]).collect();
    let (code, out, err) = siem(config, &["watch", "--until-end"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("UNVERIFIED"), "{err}");
    let again: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(again.iter().map(|a| &a["id"]).collect::<Vec<_>>(), ids);

    // Both runs published to the alerts topic: the first quiet run nothing.
    let published = consume_independently(&broker.brokers(), "arca.audit.alerts", 2 * raised.len());
    assert_eq!(published.len(), 2 * raised.len());
    assert_eq!(published[0]["id"], raised[0]["id"]);
}
