//! Audit log retention under sustained load: audited reads (64 concurrent, in process) for
//! `ARCA_BENCH_SECS` (default 60) with the archiver on (keep `ARCA_BENCH_RETAIN` entries,
//! default 20,000, archive step every 200 ms). Every 5 s it prints the store's audit
//! entries and file size beside the archive's size: the store should level off while the
//! archive grows linearly.
//!
//! `cargo bench -p arca-benches --bench audit_retention`

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arca_node::archive::{self, ArchiveConfig};
use arca_node::sequencer::{self, SequencerConfig};
use arca_store::{RangeOptions, StoreExt, prefix_end};

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("ARCA_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let retain: u64 = std::env::var("ARCA_BENCH_RETAIN").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let arca_benches::BenchNode { node, store, root } = arca_benches::bench_node(&rt, dir.path());
    let _guard = rt.enter();
    sequencer::start(&node, SequencerConfig::default());
    let archive_dir = dir.path().join("archive");
    archive::start(
        &node,
        ArchiveConfig {
            dir: archive_dir.clone(),
            retain_entries: retain,
            retain_for: None,
            interval: Duration::from_millis(200),
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    for _ in 0..64 {
        let (node, root, stop, served) = (node.clone(), root.clone(), stop.clone(), served.clone());
        rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = node
                    .kv_read(arca_benches::context(Some(&root)), "secret".into(), "bench/db".into(), None)
                    .await;
                if r.result.is_ok() {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let prefix = arca_node::keys::audit_events("local");
    let end = prefix_end(&prefix).unwrap();
    let db = dir.path().join("bench.db");
    println!(
        "audit retention soak: {secs} s of audited reads (64 concurrent), keep {retain} entries in the store"
    );
    println!("| t (s) | reads served | entries in the store | store file (MB) | archive (MB) |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let started = Instant::now();
    let mut next = 5;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() >= Duration::from_secs(next) {
            let events = store
                .transact(|tx| tx.get_range(&prefix, &end, RangeOptions::default()).map(|r| r.len()))
                .map(|c| c.value)
                .unwrap_or(0);
            let file = ["", "-wal"]
                .iter()
                .map(|s| std::fs::metadata(format!("{}{s}", db.display())).map(|m| m.len()).unwrap_or(0))
                .sum::<u64>();
            println!(
                "| {next} | {} | {events} | {:.1} | {:.1} |",
                served.load(Ordering::Relaxed),
                file as f64 / 1e6,
                dir_bytes(&archive_dir) as f64 / 1e6
            );
            next += 5;
        }
    }
    stop.store(true, Ordering::Relaxed);
}
