//! Several OS processes on one SQLite file: how a region runs active-active nodes on one
//! host. The test binary re-executes itself as the worker processes: a test that finds
//! `ARCA_STORE_WORKER` in its environment does the worker's part instead of the test's.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use arca_store::tuple::{self, Element};
use arca_store::{RangeOptions, SqliteConfig, SqliteStore, StoreError, StoreExt, Versionstamp, prefix_end};

const WORKER_ENV: &str = "ARCA_STORE_WORKER";
const COUNTERS: u64 = 3;

fn counter_key(i: u64) -> Vec<u8> {
    tuple::pack(&["counter".into(), i.into()])
}

fn log_prefix() -> Vec<u8> {
    tuple::pack(&["log".into()])
}

/// Starts this test binary as a worker running `test` with `args` in its environment.
fn spawn_worker(test: &str, args: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(WORKER_ENV, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Worker: `iterations` transactions, each incrementing one shared counter (a read-modify-write
/// that conflicts with the other processes) and appending a versionstamped record that names
/// the worker and its sequence number.
fn increment_and_append(path: &Path, worker: u64, iterations: u64) {
    let store = SqliteStore::open(SqliteConfig::new(path)).unwrap();
    for seq in 0..iterations {
        store
            .transact(|tx| {
                let key = counter_key(seq % COUNTERS);
                let seen = tx.get(&key)?.map(|v| u64::from_be_bytes(v.try_into().unwrap())).unwrap_or(0);
                tx.set(&key, &(seen + 1).to_be_bytes())?;
                let suffix = tuple::pack(&[worker.into(), seq.into()]);
                tx.set_versionstamped_key(&log_prefix(), &suffix, b"")?;
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }
}

#[test]
fn processes_share_one_file_without_losing_increments() {
    if let Ok(args) = std::env::var(WORKER_ENV) {
        let mut parts = args.split(';');
        let path = parts.next().unwrap();
        let worker = parts.next().unwrap().parse().unwrap();
        let iterations = parts.next().unwrap().parse().unwrap();
        increment_and_append(Path::new(path), worker, iterations);
        return;
    }

    const WORKERS: u64 = 3;
    const ITERATIONS: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let children: Vec<_> = (0..WORKERS)
        .map(|w| {
            spawn_worker(
                "processes_share_one_file_without_losing_increments",
                &format!("{};{w};{ITERATIONS}", path.display()),
            )
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a worker process failed");
    }

    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let (counters, log) = store
        .transact(|tx| {
            let mut total = 0;
            for i in 0..COUNTERS {
                total += tx.get(&counter_key(i))?.map(|v| u64::from_be_bytes(v.try_into().unwrap())).unwrap();
            }
            let prefix = log_prefix();
            let log = tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default())?;
            Ok::<_, StoreError>((total, log))
        })
        .unwrap()
        .value;
    assert_eq!(counters, WORKERS * ITERATIONS, "an increment was lost");
    assert_eq!(log.len() as u64, WORKERS * ITERATIONS, "an append was lost");

    let prefix_len = log_prefix().len();
    let mut last_stamp = None;
    let mut next_seq = vec![0u64; WORKERS as usize];
    let mut interleaved = false;
    let mut previous_worker = None;
    for kv in &log {
        let stamp = Versionstamp::from_slice(&kv.key[prefix_len..]).unwrap();
        assert!(Some(stamp) > last_stamp, "versionstamps must strictly increase");
        last_stamp = Some(stamp);
        let suffix = tuple::unpack(&kv.key[prefix_len + Versionstamp::LEN..]).unwrap();
        let [Element::Int(worker), Element::Int(seq)] = suffix.as_slice() else { panic!("bad suffix") };
        let (worker, seq) = (worker.as_u64().unwrap() as usize, seq.as_u64().unwrap());
        assert_eq!(seq, next_seq[worker], "a worker's appends must appear in its own order");
        next_seq[worker] += 1;
        interleaved |= previous_worker.is_some_and(|p| p != worker);
        previous_worker = Some(worker);
    }
    eprintln!("workers interleaved their commits: {interleaved}");
}

/// Worker: increments one counter forever, printing each value after its commit returned.
fn acknowledge_forever(path: &Path) {
    let store = SqliteStore::open(SqliteConfig::new(path)).unwrap();
    loop {
        let value = store
            .transact(|tx| {
                let seen = tx.get(b"acked")?.map(|v| u64::from_be_bytes(v.try_into().unwrap())).unwrap_or(0);
                tx.set(b"acked", &(seen + 1).to_be_bytes())?;
                Ok::<_, StoreError>(seen + 1)
            })
            .unwrap()
            .value;
        println!("ack {value}");
    }
}

#[test]
fn acknowledged_commits_survive_kill_9() {
    if let Ok(path) = std::env::var(WORKER_ENV) {
        acknowledge_forever(Path::new(&path));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kill.db");
    SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let mut child = spawn_worker("acknowledged_commits_survive_kill_9", &path.display().to_string());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_ack = 0;
    while last_ack < 200 {
        let line = lines.next().expect("worker stopped early").unwrap();
        if let Some(n) = line.strip_prefix("ack ") {
            last_ack = n.parse().unwrap();
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix: no destructor, no clean close.
    child.wait().unwrap();
    // Acknowledgements already in the pipe were made before the kill.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("ack ") {
            last_ack = n.parse().unwrap();
        }
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let stored = store
        .transact(|tx| tx.get(b"acked"))
        .unwrap()
        .value
        .map(|v| u64::from_be_bytes(v.try_into().unwrap()))
        .unwrap();
    // The commit in flight at the kill may or may not have landed; every acknowledged one did.
    assert!(stored == last_ack || stored == last_ack + 1, "stored {stored}, acknowledged {last_ack}");
}
