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

/// Copies the exported topics from leaf `from` on into topics of their own, as a broker
/// whose retention dropped the log's first entries (and the checkpoints before them) holds
/// them; returns a configuration that reads those.
fn retained_from(stack: &Stack, from: u64) -> std::path::PathBuf {
    use arca_siem_export::kafka;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let config = arca_siem_export::config::Config::load(&stack.config).unwrap();
    let reader = kafka::reader(&config.kafka).unwrap();
    let entries = kafka::read_topic(&reader, &config.kafka.entries_topic, DEADLINE).unwrap();
    let checkpoints = kafka::read_topic(&reader, &config.kafka.checkpoints_topic, DEADLINE).unwrap();
    let late = arca_siem_export::config::KafkaSection {
        entries_topic: "late.entries".into(),
        checkpoints_topic: "late.checkpoints".into(),
        alerts_topic: "late.alerts".into(),
        ..config.kafka.clone()
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(kafka::ensure_topics(&late, &["late.entries", "late.checkpoints"], DEADLINE)).unwrap();
    let producer: BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &late.brokers).create().unwrap();
    let mut kept = (0, 0);
    for r in &entries {
        let index: u64 = r.leaf_index_header.as_deref().unwrap().parse().unwrap();
        if index < from {
            continue;
        }
        let headers = OwnedHeaders::new()
            .insert(Header { key: kafka::LEAF_INDEX_HEADER, value: Some(&index.to_string()) });
        let record = BaseRecord::to("late.entries")
            .key(r.key.as_deref().unwrap())
            .payload(&r.payload)
            .headers(headers);
        producer.send(record).map_err(|(e, _)| e).unwrap();
        kept.0 += 1;
    }
    for r in &checkpoints {
        let text = std::str::from_utf8(&r.payload).unwrap();
        let body = arca_audit::note::unverified_text(text).unwrap_or(text);
        if arca_audit::checkpoint::Checkpoint::parse(body).unwrap().size <= from {
            continue;
        }
        let record = BaseRecord::<[u8], [u8]>::to("late.checkpoints").payload(&r.payload[..]);
        producer.send(record).map_err(|(e, _)| e).unwrap();
        kept.1 += 1;
    }
    producer.flush(DEADLINE).unwrap();
    assert!(kept.0 > 0 && kept.1 > 0, "{kept:?}");
    let text = std::fs::read_to_string(&stack.config).unwrap().replace(
        "[kafka]\n",
        "[kafka]\nentries_topic = \"late.entries\"\ncheckpoints_topic = \"late.checkpoints\"\nalerts_topic = \"late.alerts\"\n",
    );
    let path = stack.dir.path().join("late.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_watcher_that_starts_after_retention_proves_the_rest_from_the_tiles() {
    let stack = Stack::start(false, "");
    let (node, exporter) = (&stack.node, &stack.exporter);
    let app = node.token_reading("app", "app/");
    for i in 0..30 {
        assert_eq!(node.put(&format!("app/s{i}"), "v"), 200);
        assert_eq!(node.get_as(&app, &format!("app/s{i}")), 200);
    }
    let exported = exporter.wait_caught_up(node, DEADLINE);
    let from = exported / 2 + 1;
    let late = retained_from(&stack, from);
    let tiles = node.vkey_url().trim_end_matches("/vkey").to_owned();

    // Verified, with the tiles: from leaf `from` on, every entry proven, no integrity alert,
    // and the rules' alerts those of the same stream watched unverified.
    let (code, out, err) = siem(
        &late,
        &["watch", "--until-end", "--no-publish", "--vkey-url", &node.vkey_url(), "--tiles", &tiles],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains(&format!("the topic starts at leaf {from}: watching from there")), "{err}");
    let proven: u64 = err
        .lines()
        .find_map(|l| {
            l.split(": ")
                .nth(2)?
                .strip_suffix(" entries proven by signed checkpoints and watched")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no progress line in {err}"));
    assert!(proven >= exported - from, "{proven} of {} entries proven", exported - from);
    let verified: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(verified.iter().all(|a| a["rule"] != "stream-integrity"), "{verified:#?}");
    assert!(verified.iter().all(|a| a["leaf_index"].as_u64().unwrap() >= from));
    assert!(verified.iter().any(|a| a["rule"] == "first-access"), "the rules ran: {verified:#?}");
    let (code, out, err) = siem(&late, &["watch", "--until-end", "--no-publish"]);
    assert_eq!(code, 0, "{out}{err}");
    let unverified: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids =
        |alerts: &[Value]| alerts.iter().map(|a| a["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(ids(&verified), ids(&unverified));

    // Without tiles, or with the wrong ones: nothing proven, and stderr says why.
    let (code, out, err) =
        siem(&late, &["watch", "--until-end", "--no-publish", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains(&format!("the topic starts at leaf {from}, not 0")), "{err}");
    assert!(err.contains(": 0 entries proven"), "{err}");
    assert!(out.lines().all(|l| !l.contains("\"first-access\"")), "{out}");
    let wrong = format!("{}/audit/elsewhere", node.http);
    let (code, out, err) = siem(
        &late,
        &["watch", "--until-end", "--no-publish", "--vkey-url", &node.vkey_url(), "--tiles", &wrong],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("cannot start past leaf 0"), "{err}");
    assert!(err.contains(": 0 entries proven"), "{err}");
}
