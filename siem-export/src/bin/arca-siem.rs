//! `arca-siem`: export a region's audit log to Kafka, verify a consumed stream, watch it.
//!
//! Exit codes: 0 success; 1 verification failed (verify) ; 2 usage or configuration error;
//! 3 the broker or the store is unavailable.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca_audit::note::NoteVerifier;
use arca_node::sequencer::follow;
use arca_siem_export::config::Config;
use arca_siem_export::export::{ExportMetrics, Exporter, read_cursor};
use arca_siem_export::kafka;
use arca_siem_export::watch::{Alert, Watcher};
use arca_siem_export::{seed, verify};
use arca_store::StoreExt;
use clap::{Parser, Subcommand};
use rdkafka::producer::{FutureRecord, Producer};

#[derive(Debug, Parser)]
#[command(name = "arca-siem", version, about = "arca's audit log, exported to Kafka, verified and watched")]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', global = true, env = "ARCA_SIEM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish the region's sequenced log (one active exporter per region; others stand by).
    Export,
    /// Show the exporter's cursor and lag, read from the store.
    Status,
    /// Consume both topics from the beginning and prove the stream complete and unaltered.
    Verify {
        /// A log's verifier key (C2SP vkey), pinned out of band. Repeat for several logs.
        #[arg(long)]
        vkey: Vec<String>,
        /// Fetch a verifier key from a node's `/audit/<region>/vkey` (trust on first use).
        #[arg(long)]
        vkey_url: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Give up when the broker does not deliver the topics within this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Run the anomaly rules over the entries topic; alerts go to stdout and the alerts topic.
    /// With the logs' verifier keys, each entry is held until a signed checkpoint proves it.
    Watch {
        /// A log's verifier key (C2SP vkey), pinned out of band: verified watching. Repeat for
        /// several logs.
        #[arg(long)]
        vkey: Vec<String>,
        /// Fetch a verifier key from a node's `/audit/<region>/vkey` (trust on first use).
        #[arg(long)]
        vkey_url: Vec<String>,
        /// A log's tiles (`http://NODE/audit/<region>`, or its archive served over HTTP),
        /// verified: when the topics no longer hold the log's first entries, watching starts
        /// at the first entry received, from the tree before it read there. Repeat for
        /// several logs.
        #[arg(long)]
        tiles: Vec<String>,
        /// Stop at the end the topic had at start (default: follow forever).
        #[arg(long)]
        until_end: bool,
        /// Print alerts only; do not publish them.
        #[arg(long)]
        no_publish: bool,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let Some(path) = cli.config.as_deref() else {
        eprintln!("arca-siem: --config is required");
        return ExitCode::from(2);
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("arca-siem: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("arca-siem: cannot start the runtime: {err}");
            return ExitCode::from(3);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Export => export(config).await,
            Command::Status => status(config).await,
            Command::Verify { vkey, vkey_url, json, timeout_secs } => {
                run_verify(config, vkey, vkey_url, json, Duration::from_secs(timeout_secs)).await
            }
            Command::Watch { vkey, vkey_url, tiles, until_end, no_publish, timeout_secs } => {
                let options =
                    WatchOptions { tiles, until_end, no_publish, timeout: Duration::from_secs(timeout_secs) };
                watch(config, vkey, vkey_url, options).await
            }
        }
    });
    match outcome {
        Ok(code) => code,
        Err(Failure(code, message)) => {
            eprintln!("arca-siem: {message}");
            ExitCode::from(code)
        }
    }
}

#[derive(Debug)]
struct Failure(u8, String);

fn usage(message: impl Into<String>) -> Failure {
    Failure(2, message.into())
}

fn unavailable(message: impl Into<String>) -> Failure {
    Failure(3, message.into())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn open_store(config: &Config) -> Result<Arc<dyn arca_store::Store>, Failure> {
    let storage = config.storage.as_ref().ok_or_else(|| usage("the [storage] section is required"))?;
    if let Some(path) = &storage.path
        && !path.exists()
    {
        return Err(unavailable(format!("no store at {}: start the node first", path.display())));
    }
    arca_node::server::open_store(storage).map_err(|e| unavailable(format!("cannot open the store: {e}")))
}

async fn export(config: Config) -> Result<ExitCode, Failure> {
    let store = open_store(&config)?;
    let metrics = Arc::new(ExportMetrics::default());
    if let Some(addr) = config.export.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| unavailable(format!("cannot listen on {addr}: {e}")))?;
        let m = metrics.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move { m.render() }
            }),
        );
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "metrics endpoint stopped");
            }
        });
        tracing::info!(%addr, "metrics on /metrics");
    }
    tracing::info!(region = %config.region, brokers = %config.kafka.brokers, topic = %config.kafka.entries_topic, "exporting");
    let exporter =
        Exporter::new(store, config.region.clone(), config.kafka.clone(), config.export.clone(), metrics);
    exporter.run(shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

async fn status(config: Config) -> Result<ExitCode, Failure> {
    let store = open_store(&config)?;
    let region = config.region.clone();
    let (cursor, head) = tokio::task::spawn_blocking(move || {
        let cursor = read_cursor(store.as_ref(), &region)?;
        let head = store.transact(|tx| follow::head(tx, &region))?.value;
        Ok::<_, arca_node::error::ApiError>((cursor, head))
    })
    .await
    .map_err(|_| unavailable("the store read was interrupted"))?
    .map_err(|e| unavailable(format!("cannot read the store: {e}")))?;
    let report = serde_json::json!({
        "region": config.region,
        "log_size": head.size,
        "exported": cursor.next_index,
        "lag_entries": head.size.saturating_sub(cursor.next_index),
        "last_checkpoint_exported": cursor.checkpoint_size,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

fn fetch_vkey(url: &str) -> Result<String, Failure> {
    let mut response = ureq::get(url).call().map_err(|e| unavailable(format!("cannot fetch {url}: {e}")))?;
    let text = response
        .body_mut()
        .with_config()
        .limit(4096)
        .read_to_string()
        .map_err(|e| unavailable(format!("cannot read {url}: {e}")))?;
    Ok(text.trim().to_owned())
}

/// The verifier keys given, and those fetched from the URLs given.
async fn verifiers(vkeys: Vec<String>, vkey_urls: Vec<String>) -> Result<Vec<NoteVerifier>, Failure> {
    let mut keys = vkeys;
    for url in &vkey_urls {
        let url = url.clone();
        keys.push(
            tokio::task::spawn_blocking(move || fetch_vkey(&url))
                .await
                .map_err(|_| unavailable("interrupted"))??,
        );
    }
    keys.iter()
        .map(|k| NoteVerifier::parse(k).map_err(|e| usage(format!("invalid verifier key: {e}"))))
        .collect()
}

async fn run_verify(
    config: Config,
    vkeys: Vec<String>,
    vkey_urls: Vec<String>,
    json: bool,
    timeout: Duration,
) -> Result<ExitCode, Failure> {
    let verifiers = verifiers(vkeys, vkey_urls).await?;
    if verifiers.is_empty() {
        return Err(usage("give the logs' verifier keys with --vkey or --vkey-url"));
    }
    let kafka = config.kafka.clone();
    let report = tokio::task::spawn_blocking(move || {
        let consumer = kafka::reader(&kafka).map_err(|e| unavailable(format!("kafka: {e}")))?;
        // Checkpoints first: the exporter publishes one only after the broker acknowledged
        // the entries it covers, so every checkpoint read has its entries in the later read.
        let checkpoints = kafka::read_topic(&consumer, &kafka.checkpoints_topic, timeout)
            .map_err(|e| unavailable(format!("cannot read {}: {e}", kafka.checkpoints_topic)))?;
        let entries = kafka::read_topic(&consumer, &kafka.entries_topic, timeout)
            .map_err(|e| unavailable(format!("cannot read {}: {e}", kafka.entries_topic)))?;
        Ok::<_, Failure>(verify::verify(&entries, &checkpoints, &verifiers))
    })
    .await
    .map_err(|_| unavailable("interrupted"))??;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", report.summary());
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Starts verified logs past leaf 0 from their tiles ([`Watcher::seed`]), when the topics
/// no longer hold their first entries.
struct Seeds {
    sources: Vec<seed::HttpTiles>,
    verifiers: Vec<NoteVerifier>,
    /// Per log: when to try again (a checkpoint that did not reach the leaf yet), or `None`
    /// (gave up: said why on stderr).
    retry: HashMap<String, Option<Instant>>,
}

impl Seeds {
    fn new(bases: &[String], verifiers: Vec<NoteVerifier>, timeout: Duration) -> Seeds {
        let sources = bases.iter().map(|b| seed::HttpTiles::new(b, timeout)).collect();
        Seeds { sources, verifiers, retry: HashMap::new() }
    }

    /// Seeds each log that wants it from the first source whose checkpoint is that log's.
    fn offer(&mut self, watcher: &mut Watcher) -> Vec<Alert> {
        let mut alerts = Vec::new();
        if self.sources.is_empty() {
            return alerts;
        }
        for (origin, from) in watcher.wants_seed() {
            match self.retry.get(&origin) {
                Some(None) => continue,
                Some(Some(at)) if Instant::now() < *at => continue,
                _ => {}
            }
            let mut last_error = format!("no --tiles source serves {origin}");
            let mut seeded = false;
            for source in &self.sources {
                match source.tree(from, &self.verifiers) {
                    Ok((tree, cp)) if cp.checkpoint().origin == origin => {
                        match watcher.seed(&origin, tree) {
                            Ok(more) => alerts.extend(more),
                            Err(e) => {
                                last_error = e;
                                continue;
                            }
                        }
                        alerts.extend(watcher.observe_checkpoint(cp.note().as_bytes()));
                        eprintln!(
                            "arca-siem: {origin}: the topic starts at leaf {from}: watching from there, the tree \
                             before it read from {}'s tiles at the signed checkpoint of size {}",
                            source.base(),
                            cp.size()
                        );
                        seeded = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => last_error = e,
                }
            }
            if seeded {
                self.retry.remove(&origin);
            } else if last_error.contains("does not reach") {
                self.retry.insert(origin, Some(Instant::now() + Duration::from_secs(5)));
            } else {
                eprintln!("arca-siem: {origin}: cannot start past leaf 0: {last_error}");
                self.retry.insert(origin, None);
            }
        }
        alerts
    }
}

struct WatchOptions {
    tiles: Vec<String>,
    until_end: bool,
    no_publish: bool,
    timeout: Duration,
}

async fn watch(
    config: Config,
    vkeys: Vec<String>,
    vkey_urls: Vec<String>,
    options: WatchOptions,
) -> Result<ExitCode, Failure> {
    let WatchOptions { tiles, until_end, no_publish, timeout } = options;
    let verifiers = verifiers(vkeys, vkey_urls).await?;
    if verifiers.is_empty() && !tiles.is_empty() {
        return Err(usage("--tiles needs the logs' verifier keys (--vkey or --vkey-url)"));
    }
    if verifiers.is_empty() {
        eprintln!(
            "arca-siem: watching UNVERIFIED entry messages: whoever can write to the topic can raise or \
             suppress alerts. Give the logs' verifier keys (--vkey or --vkey-url) to hold each entry \
             until a signed checkpoint proves it."
        );
    }
    let kafka_cfg = config.kafka.clone();
    let producer = if no_publish {
        None
    } else {
        kafka::ensure_topics(&kafka_cfg, &[kafka_cfg.alerts_topic.as_str()], timeout)
            .await
            .map_err(|e| unavailable(format!("cannot create {}: {e}", kafka_cfg.alerts_topic)))?;
        Some(
            kafka::producer(&kafka_cfg, timeout, kafka::BrokerWatch::default())
                .map_err(|e| unavailable(format!("kafka: {e}")))?,
        )
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, String)>(1024);
    let rules = config.watch.clone();
    let kafka = kafka_cfg.clone();
    let consume = tokio::task::spawn_blocking(move || {
        let consumer = kafka::reader(&kafka).map_err(|e| unavailable(format!("kafka: {e}")))?;
        let verified = !verifiers.is_empty();
        let mut seeds = Seeds::new(&tiles, verifiers.clone(), timeout);
        let mut watcher = if verified { Watcher::verified(rules, verifiers) } else { Watcher::new(rules) };
        // Verified, checkpoints too; with --until-end the checkpoints are read first, as
        // `verify` does (the exporter publishes one only after the entries it covers).
        let topics: Vec<&str> = if verified {
            vec![kafka.checkpoints_topic.as_str(), kafka.entries_topic.as_str()]
        } else {
            vec![kafka.entries_topic.as_str()]
        };
        let entries = topics.len() - 1;
        kafka::follow_topics(&consumer, &topics, timeout, until_end, |topic, record| {
            let mut alerts = if topic == entries {
                watcher.observe_message(&record.payload)
            } else {
                watcher.observe_checkpoint(&record.payload)
            };
            alerts.extend(seeds.offer(&mut watcher));
            for alert in alerts {
                let line = serde_json::to_string(&alert).unwrap_or_default();
                if tx.blocking_send((alert.origin.clone(), line)).is_err() {
                    return false;
                }
            }
            true
        })
        .map_err(|e| unavailable(format!("cannot read {}: {e}", topics.join(", "))))?;
        // Where each log got to (with --until-end, or when the alerts stopped being read).
        for (origin, from) in watcher.wants_seed() {
            eprintln!(
                "arca-siem: {origin}: the topic starts at leaf {from}, not 0, and no tiles gave the tree \
                 before it: its entries wait unproven (give --tiles http://NODE/audit/<region>)"
            );
        }
        for (origin, proven) in watcher.proven() {
            eprintln!("arca-siem: {origin}: {proven} entries proven by signed checkpoints and watched");
        }
        Ok::<_, Failure>(())
    });
    let mut published = 0u64;
    while let Some((origin, line)) = rx.recv().await {
        println!("{line}");
        if let Some(p) = &producer {
            let record =
                FutureRecord::to(&kafka_cfg.alerts_topic).key(origin.as_str()).payload(line.as_str());
            match p.send(record, timeout).await {
                Ok(_) => published += 1,
                Err((err, _)) => tracing::warn!(error = %err, "an alert was not published"),
            }
        }
    }
    consume.await.map_err(|_| unavailable("interrupted"))??;
    if let Some(p) = &producer {
        let _ = p.flush(timeout);
    }
    tracing::info!(published, "watch finished");
    Ok(ExitCode::SUCCESS)
}
