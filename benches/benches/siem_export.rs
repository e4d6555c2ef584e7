//! SIEM export throughput and access-to-Kafka latency, against a real tansu broker
//! (memory storage) on loopback, in one run:
//!
//! 0. **the node's audit rate**: audited reads, 64 concurrent, in process, for 3 s;
//! 1. **throughput**: a sequenced log of `ARCA_BENCH_ENTRIES` (default 100,000) entries is
//!    exported from cursor 0 to the end; entries/s, beside the sequencer's own rate on the
//!    same machine in the same run;
//! 2. **latency**: the node-side load at `ARCA_BENCH_RATE` entries/s (default 20,000) for
//!    10 s while the sequencer (100 ms steps) and the exporter both run; event time to the
//!    broker's acknowledgement, p50/p99/max.
//!
//! `cargo bench -p arca-benches --bench siem_export` (run `scripts/setup.sh` first: it
//! installs the broker). Machines are shared and noisy: read the ratios.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arca_node::sequencer::{self, SequencerConfig};
use arca_siem_export::config::{Config, ExportSection};
use arca_siem_export::export::{ExportMetrics, Exporter};

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_broker() -> (Broker, String) {
    let tansu = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/tansu");
    assert!(tansu.exists(), "run scripts/setup.sh first: it installs the broker");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(tansu)
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Broker(child), format!("127.0.0.1:{port}"))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches`
    }
    let entries = env_u64("ARCA_BENCH_ENTRIES", 100_000);
    let rate = env_u64("ARCA_BENCH_RATE", 20_000);
    let (_broker, brokers) = start_broker();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let arca_benches::BenchNode { node, store, root } = arca_benches::bench_node(&rt, dir.path());
    let ctx = arca_benches::context;
    // 0. The node's own audit rate: audited reads, 64 concurrent, in process (no transport:
    // the most audit entries per second this node can produce).
    let started = Instant::now();
    let reads: u64 = rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (node, root) = (node.clone(), root.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while started.elapsed() < Duration::from_secs(3) {
                        node.kv_read(ctx(Some(&root)), "secret".into(), "bench/db".into(), None)
                            .await
                            .result
                            .expect("read");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        total
    });
    let audit_rate = reads as f64 / started.elapsed().as_secs_f64();
    let config = Config::parse(&format!("[kafka]\nbrokers = \"{brokers}\"\n")).unwrap();
    let settings = ExportSection { batch_entries: 5000, ..config.export.clone() };

    // 1. Throughput: the reads' entries, topped up to `entries` with fixture events.
    arca_benches::fill_queue(store.as_ref(), 0, entries.saturating_sub(reads), false);
    let seq_config = SequencerConfig { max_batch: 16_384, ..SequencerConfig::default() };
    let started = Instant::now();
    while sequencer::integrate(&node, "bench", &seq_config).expect("integrate").is_some() {}
    let sequencer_rate = entries as f64 / started.elapsed().as_secs_f64();
    let metrics = Arc::new(ExportMetrics::default());
    let mut exporter =
        Exporter::new(store.clone(), "local".into(), config.kafka.clone(), settings, metrics.clone());
    // Topic creation and the first connection are not part of the rate.
    rt.block_on(async {
        exporter.round().await.expect("first round");
    });
    let first = metrics.delivered.load(Ordering::Relaxed);
    let started = Instant::now();
    rt.block_on(exporter.drain(Instant::now() + Duration::from_secs(600))).expect("drain");
    let export_secs = started.elapsed().as_secs_f64();
    let exported = metrics.delivered.load(Ordering::Relaxed) - first;
    let total = metrics.delivered.load(Ordering::Relaxed);
    assert!(total >= entries, "only {total} of {entries} exported");
    let export_rate = exported as f64 / export_secs;

    // 2. Latency under a steady load, by the same exporter (a second one would wait for
    // the first one's lease to expire).
    metrics.latency_ms.lock().unwrap().reset();
    let live_metrics = metrics.clone();
    let live = exporter;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_rx = stop.clone();
    let exporter_task = rt.spawn(live.run(async move {
        while !stop_rx.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));
    sequencer::start(&node, SequencerConfig::default());
    let progress = live_metrics.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            if std::env::var("ARCA_BENCH_DEBUG").is_ok() {
                eprintln!(
                    "{}",
                    progress.render().lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join(" ")
                );
            }
        }
    });
    let per_tick = (rate / 100).max(1);
    let load_started = Instant::now();
    let base = total;
    let mut next = entries;
    let mut tick = 0u64;
    while load_started.elapsed() < Duration::from_secs(10) {
        arca_benches::fill_queue(store.as_ref(), next, per_tick, true);
        next += per_tick;
        tick += 1;
        // Pace to the rate: tick n is due at n × 10 ms.
        if let Some(wait) = Duration::from_millis(tick * 10).checked_sub(load_started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let offered = (next - entries) as f64 / load_started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    while live_metrics.delivered.load(Ordering::Relaxed) < base + (next - entries) {
        assert!(Instant::now() < deadline, "the exporter did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(exporter_task).unwrap();
    let h = live_metrics.latency_ms.lock().unwrap().clone();

    println!("siem export against tansu 0.6.0 (memory storage), one run on this machine");
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!("| node audit rate: audited reads, 64 concurrent, in process | {audit_rate:.0} entries/s |");
    println!("| sequencer integration (same store, same run) | {sequencer_rate:.0} entries/s |");
    println!("| export throughput, {exported} entries | {export_rate:.0} entries/s |");
    println!("| **export ÷ node audit rate** (target ≥ ×2) | **×{:.2}** |", export_rate / audit_rate);
    println!("| export ÷ sequencer | ×{:.2} |", export_rate / sequencer_rate);
    println!("| live load offered | {offered:.0} entries/s for 10 s |");
    println!(
        "| access → Kafka ack latency p50 / p99 / max | {} / {} / {} ms |",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
    println!(
        "{}",
        serde_json::json!({
            "node_audit_entries_per_s": audit_rate.round(),
            "sequencer_entries_per_s": sequencer_rate.round(),
            "export_entries_per_s": export_rate.round(),
            "offered_entries_per_s": offered.round(),
            "latency_ms": {"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "max": h.max()},
        })
    );
}
