//! End to end: real `arcad` nodes serve a workload, `arca-siem export` publishes the log to a
//! real Kafka-protocol broker (tansu), an independent consumer reads it, and
//! `arca-siem verify` proves it — including across broker outages and against tampering.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

fn distinct_indexes(messages: &[Value]) -> BTreeSet<u64> {
    messages.iter().filter_map(|m| m["arca"]["leaf_index"].as_u64()).collect()
}

#[test]
fn every_entry_reaches_kafka_as_ocsf_and_the_stream_verifies() {
    let stack = Stack::start(false, "");
    let (node, exporter, config, broker) = (&stack.node, &stack.exporter, &stack.config, &stack.broker);

    let reader = node.token_reading("reader", "app/");
    for i in 0..20 {
        assert_eq!(node.put(&format!("app/s{i}"), "value"), 200);
        assert_eq!(node.get_as(&reader, &format!("app/s{i}")), 200);
    }
    for i in 0..5 {
        assert_eq!(node.put(&format!("other/s{i}"), "value"), 200);
        assert_eq!(node.get_as(&reader, &format!("other/s{i}")), 403);
    }
    assert_eq!(node.get_as("not-a-token", "app/s1"), 403);
    let size = exporter.wait_caught_up(node, DEADLINE);
    assert!(size >= 53, "{size}");

    // An independent consumer (tansu's own client) sees one message per entry.
    let messages = consume_independently(&broker.brokers(), "arca.audit.entries", size as usize);
    assert_eq!(distinct_indexes(&messages), (0..size).collect::<BTreeSet<u64>>());
    for m in &messages {
        assert_eq!(m["class_uid"], 6003, "{m}");
        assert_eq!(m["category_uid"], 6);
        assert!(m["activity_id"].as_u64().is_some_and(|a| [1, 2, 3, 4, 99].contains(&a)), "{m}");
        assert!(m["actor"]["user"]["name"].as_str().is_some_and(|s| !s.is_empty()), "{m}");
        assert!(m["api"]["operation"].as_str().is_some_and(|s| !s.is_empty()), "{m}");
        assert!(m["src_endpoint"].is_object(), "{m}");
        assert!(m["resources"][0]["name"].is_string(), "{m}");
        assert!(m["status"].is_string() && m["time"].is_u64(), "{m}");
        assert_eq!(m["arca"]["origin"], "arca/dev/local");
        assert_eq!(m["arca"]["leaf_hash"].as_str().map(str::len), Some(64));
    }
    let reads = messages.iter().filter(|m| m["api"]["operation"] == "kv.read").count();
    let denied = messages
        .iter()
        .filter(|m| m["status"] == "Failure" && m["actor"]["user"]["name"] == "token:reader")
        .count();
    assert!(reads >= 26, "{reads} reads");
    assert_eq!(denied, 5);
    // No secret value anywhere in the stream.
    assert!(!messages.iter().any(|m| m.to_string().contains("\"value\"")));

    let (code, out, err) = siem(config, &["verify", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verify: OK"), "{out}");
    assert!(exporter.metric("latency_seconds_count") >= size as f64);
}

/// The broker is killed mid-workload and restarted (its data on S3-protocol storage, so it
/// survives): no request fails, lag grows while it is down, and afterwards every entry is
/// delivered and the stream verifies.
#[test]
fn a_broker_outage_loses_nothing_and_blocks_nothing() {
    let mut stack = Stack::start(true, "");
    let config = stack.config.clone();
    let (node, exporter) = (&stack.node, &stack.exporter);

    for i in 0..15 {
        assert_eq!(node.put(&format!("a/s{i}"), "v"), 200);
    }
    let before = exporter.wait_caught_up(node, DEADLINE);
    let failures_before = exporter.metric("failures_total");

    stack.broker.kill();
    for i in 0..30 {
        assert_eq!(node.put(&format!("b/s{i}"), "v"), 200, "a request failed during the outage");
        assert_eq!(node.get(&format!("b/s{i}")), 200, "a request failed during the outage");
    }
    wait_until("lag to show the outage", DEADLINE, || {
        exporter.metric("lag_entries") >= 30.0 && exporter.metric("lag_seconds") > 0.0
    });
    assert!(exporter.metric("next_index") as u64 <= before + 1);
    // Long enough for a delivery round to time out and be retried (its messages may
    // then reach the broker twice; consumers drop repeats by leaf index).
    wait_until("a delivery round to fail", DEADLINE, || exporter.metric("failures_total") > failures_before);

    stack.broker.restart();
    let size = exporter.wait_caught_up(node, DEADLINE);
    assert_eq!(exporter.metric("lag_entries"), 0.0);

    let (code, out, err) = siem(&config, &["verify", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("verified to size {size} of {size}")), "{out}");
}

/// A broker that stops answering (SIGSTOP) blocks nothing either.
#[test]
fn a_paused_broker_blocks_nothing() {
    let stack = Stack::start(false, "");
    let (node, exporter, config, broker) = (&stack.node, &stack.exporter, &stack.config, &stack.broker);
    assert_eq!(node.put("x", "v"), 200);
    exporter.wait_caught_up(node, DEADLINE);

    broker.pause();
    for i in 0..20 {
        assert_eq!(node.put(&format!("p/s{i}"), "v"), 200);
    }
    wait_until("lag to show the pause", DEADLINE, || exporter.metric("lag_entries") >= 20.0);
    broker.resume();
    exporter.wait_caught_up(node, DEADLINE);
    assert_eq!(exporter.metric("lag_entries"), 0.0);
    let (code, out, err) = siem(config, &["verify", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Copies the exported topics into new ones through a tampering hand: message 5 has its
/// actor edited, message 9 is dropped. `verify` on the copy names both indexes.
#[test]
fn verify_names_an_altered_and_a_dropped_message() {
    let mut stack = Stack::start(false, "");
    for i in 0..12 {
        assert_eq!(stack.node.put(&format!("t/s{i}"), "v"), 200);
    }
    let size = stack.exporter.wait_caught_up(&stack.node, DEADLINE);
    stack.exporter.kill(); // the stream stays as it is
    let (node, config) = (&stack.node, &stack.config);

    let kafka = arca_siem_export::config::Config::load(config).unwrap().kafka;
    let consumer = arca_siem_export::kafka::reader(&kafka).unwrap();
    let entries = arca_siem_export::kafka::read_topic(&consumer, "arca.audit.entries", DEADLINE).unwrap();
    let checkpoints =
        arca_siem_export::kafka::read_topic(&consumer, "arca.audit.checkpoints", DEADLINE).unwrap();
    assert_eq!(
        distinct_indexes(
            &entries.iter().map(|r| serde_json::from_slice(&r.payload).unwrap()).collect::<Vec<_>>()
        )
        .len() as u64,
        size
    );

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let topics = ["tampered.entries", "tampered.checkpoints"];
        arca_siem_export::kafka::ensure_topics(&kafka, &topics, DEADLINE).await.unwrap();
        let producer: FutureProducer<arca_siem_export::kafka::BrokerWatch> =
            arca_siem_export::kafka::producer(&kafka, Duration::from_secs(10), Default::default()).unwrap();
        for r in &entries {
            let mut value: Value = serde_json::from_slice(&r.payload).unwrap();
            let index = value["arca"]["leaf_index"].as_u64().unwrap();
            if index == 9 {
                continue;
            }
            if index == 5 {
                value["actor"]["user"]["name"] = "token:innocent".into();
            }
            let payload = value.to_string();
            let header = r.leaf_index_header.clone().unwrap();
            let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: arca_siem_export::kafka::LEAF_INDEX_HEADER,
                value: Some(header.as_str()),
            });
            let record =
                FutureRecord::to(topics[0]).key(r.key.as_deref().unwrap()).payload(&payload).headers(headers);
            producer.send(record, Duration::from_secs(10)).await.unwrap();
        }
        for r in &checkpoints {
            let record = FutureRecord::to(topics[1]).key(r.key.as_deref().unwrap()).payload(&r.payload);
            producer.send(record, Duration::from_secs(10)).await.unwrap();
        }
    });
    let tampered = stack.dir.path().join("tampered.toml");
    let text = std::fs::read_to_string(config).unwrap().replace(
        "[kafka]\n",
        "[kafka]\nentries_topic = \"tampered.entries\"\ncheckpoints_topic = \"tampered.checkpoints\"\n",
    );
    std::fs::write(&tampered, text).unwrap();
    let (code, out, err) = siem(&tampered, &["verify", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("missing: index 9\n"), "{out}");
    assert!(out.contains("altered: index 5 "), "{out}");
    assert!(out.contains("actor"), "{out}");
    assert!(out.contains("verify: FAILED"), "{out}");

    // The untouched stream still verifies.
    let (code, out, _) = siem(config, &["verify", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 0, "{out}");
}

/// Two exporters on one region: one leads, the other stands by; when the leader is killed
/// the other takes over from the cursor, and the stream still verifies.
#[test]
fn one_exporter_leads_and_a_standby_takes_over() {
    let mut stack = Stack::start(false, "lease_ttl_ms = 1000\n");
    let (node, a, config_a, dir) = (&stack.node, &stack.exporter, &stack.config, stack.dir.path());
    let (port_a, port_b) = (stack.metrics_port, free_port());
    let config_b = dir.join("siem-b.toml");
    std::fs::write(
        &config_b,
        std::fs::read_to_string(config_a)
            .unwrap()
            .replace(&format!("127.0.0.1:{port_a}"), &format!("127.0.0.1:{port_b}")),
    )
    .unwrap();
    for i in 0..10 {
        assert_eq!(node.put(&format!("l/s{i}"), "v"), 200);
    }
    a.wait_caught_up(node, DEADLINE);
    let b = Exporter::start(dir, &config_b, port_b);
    wait_until("the standby to read the store", DEADLINE, || b.metric("next_index") > 0.0);
    assert_eq!(a.metric("leader"), 1.0);
    for i in 0..10 {
        assert_eq!(node.put(&format!("m/s{i}"), "v"), 200);
    }
    a.wait_caught_up(node, DEADLINE);
    assert_eq!(b.metric("entries_total"), 0.0, "the standby published while the leader held the lease");

    stack.exporter.kill();
    let node = &stack.node;
    for i in 0..10 {
        assert_eq!(node.put(&format!("n/s{i}"), "v"), 200);
    }
    let size = b.wait_caught_up(node, DEADLINE);
    assert_eq!(b.metric("leader"), 1.0);
    assert!(b.metric("entries_total") > 0.0);
    let (code, out, err) = siem(&config_b, &["verify", "--vkey-url", &node.vkey_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("verified to size {size} of {size}")), "{out}");
}
