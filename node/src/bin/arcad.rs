//! `arcad`: the arca server.
//!
//! - `arcad dev [--data-dir DIR]`: a single-node dev server on the embedded store, initialised
//!   and unsealed, plaintext gRPC on loopback. Development only.
//! - `arcad server --config FILE`: the real mode (TOML config, TLS); starts sealed.
//! - `arcad check-config FILE`: validates a config file and exits.

// mimalloc instead of glibc's malloc: allocation was ~14% of the node's CPU under load
// (glibc's _int_free/_int_malloc/consolidate on the request path), see ARCHITECTURE.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use arca_node::archive::ArchiveConfig;
use arca_node::config::{Config, LogFormat};
use arca_node::grpc::ProxyConfig;
use arca_node::lifecycle::{self, LifecycleConfig};
use arca_node::node::{Node, NodeIdentity};
use arca_node::sequencer::{self, SequencerConfig};
use arca_node::server::{self, BoxError, ServeOptions, TlsFiles};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "arcad", version, about = "arca, the audit-first secrets store: server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Single-node development server: initialised, unsealed, plaintext on loopback.
    Dev {
        /// Where the store, the dev unseal key and the root token live.
        #[arg(long, default_value = ".arca-dev")]
        data_dir: PathBuf,
        /// gRPC address (loopback only in dev mode).
        #[arg(long, default_value = "127.0.0.1:8400")]
        grpc_addr: SocketAddr,
        /// HTTP address: /metrics and the audit log (/audit/<region>/…).
        #[arg(long, default_value = "127.0.0.1:8200")]
        http_addr: SocketAddr,
        /// This node's name in audit events.
        #[arg(long, default_value = "dev")]
        node_id: String,
        #[arg(long, default_value = "local")]
        region: String,
        /// Pause between sequencer steps when idle, in milliseconds (1..=1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        sequencer_interval_ms: u64,
        /// Archive the audit log here (tlog-tiles layout) and prune archived entries from
        /// the store.
        #[arg(long)]
        audit_archive_dir: Option<PathBuf>,
        /// With --audit-archive-dir: sequenced entries kept in the store.
        #[arg(long, default_value_t = 1_000_000)]
        audit_retain_entries: u64,
        /// External secret rotators (`--rotator exec --command NAME` runs DIR/NAME).
        #[arg(long)]
        rotators_dir: Option<PathBuf>,
        /// A URL prefix rotator hooks may use (repeatable).
        #[arg(long = "rotator-hook-prefix")]
        rotator_hook_prefixes: Vec<String>,
    },
    /// Production server from a config file.
    Server {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file.
    CheckConfig { file: PathBuf },
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[allow(clippy::too_many_arguments)] // the dev subcommand's flags, one by one
async fn dev(
    data_dir: PathBuf,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    node_id: String,
    region: String,
    sequencer: SequencerConfig,
    archive: Option<ArchiveConfig>,
    rotators_dir: Option<PathBuf>,
    hook_prefixes: Vec<String>,
) -> Result<(), BoxError> {
    if !grpc_addr.ip().is_loopback() || !http_addr.ip().is_loopback() {
        return Err("arcad dev listens on loopback addresses only".into());
    }
    std::fs::create_dir_all(&data_dir)
        .and_then(|()| {
            std::fs::set_permissions(&data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(|err| format!("the data directory {}: {err}", data_dir.display()))?;
    let store = server::open_sqlite(&data_dir.join("arca.db"))?;
    let node = Node::new(store, NodeIdentity { cluster: "dev".into(), region, node: node_id });
    server::dev_bootstrap(&node, &data_dir).await?;
    sequencer::start(&node, sequencer);
    lifecycle::start(
        &node,
        LifecycleConfig { rotators_dir, hook_prefixes, interval: std::time::Duration::from_millis(500) },
    );
    if let Some(archive) = archive {
        arca_node::archive::start(&node, archive);
    }
    let opts = ServeOptions {
        grpc_addr,
        tls: None,
        http_addr: Some(http_addr),
        proxy: ProxyConfig::default(),
        replication: None,
        limits: arca_node::listen::Limits::default(),
    };
    server::serve(node, opts, shutdown_signal()).await
}

async fn run_server(config: Config) -> Result<(), BoxError> {
    let store = server::open_store(&config.storage)?;
    let identity = NodeIdentity {
        cluster: config.node.cluster.clone().unwrap_or_else(|| "arca".into()),
        region: config.node.region.clone().unwrap_or_else(|| "local".into()),
        node: config
            .node
            .id
            .clone()
            .unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "node".into())),
    };
    let node = Node::new(store, identity);
    let hsm = config.seal.as_ref().map(|s| s.pkcs11()).transpose()?.flatten();
    let auto_unseal = hsm.is_some();
    if let Some(hsm) = hsm {
        node.set_hsm_seal(arca_node::hsm::Pkcs11Seal::new(hsm));
    }
    let replication = match &config.replication {
        Some(r) => {
            node.enable_regions(arca_node::region::Regions::from_config(r, &node.identity().region)?)
                .map_err(|e| format!("cannot record the region's initial role: {e}"))?;
            let tls = match (&r.tls_cert_file, &r.tls_key_file) {
                (Some(cert), Some(key)) => {
                    Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: r.ca_file.clone() })
                }
                _ => None,
            };
            Some(server::ReplicationListener { addr: r.listen_addr, tls })
        }
        None => None,
    };
    sequencer::start(&node, config.sequencer.to_config());
    lifecycle::start(
        &node,
        LifecycleConfig {
            rotators_dir: config.lifecycle.as_ref().and_then(|l| l.rotators_dir.clone()),
            hook_prefixes: config
                .lifecycle
                .as_ref()
                .map(|l| l.rotator_hook_prefixes.clone())
                .unwrap_or_default(),
            interval: std::time::Duration::from_millis(500),
        },
    );
    if let Some(a) = &config.audit_archive {
        arca_node::archive::start(
            &node,
            ArchiveConfig {
                dir: a.dir.clone(),
                retain_entries: a.retain_entries,
                retain_for: a.retain_days.map(|d| std::time::Duration::from_secs(d * 86_400)),
                interval: std::time::Duration::from_millis(a.interval_ms.unwrap_or(1000)),
            },
        );
    }
    let l = config.listener;
    let limits = l.limits()?;
    let tls = match (l.tls_cert_file, l.tls_key_file) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: l.client_ca_file }),
        _ => None,
    };
    let opts = ServeOptions {
        grpc_addr: l.grpc_addr,
        tls,
        http_addr: l.http_addr,
        limits,
        proxy: ProxyConfig { header: l.proxy_header, trusted: l.trusted_proxies },
        replication,
    };
    if auto_unseal {
        tokio::spawn(auto_unseal_until_done(node.clone()));
    } else {
        tracing::info!("starting sealed: unseal with `arca operator unseal`");
    }
    server::serve(node, opts, shutdown_signal()).await
}

/// Asks the HSM to unseal, again every 5 s while it cannot (token absent, module failing,
/// store not initialized yet); stops once unsealed. A node sealed later by an operator stays
/// sealed until it restarts.
async fn auto_unseal_until_done(node: std::sync::Arc<Node>) {
    loop {
        let audited = node.operator_auto_unseal().await;
        match audited.result {
            Ok(_) => {
                tracing::info!("unsealed by the HSM");
                return;
            }
            Err(err) => tracing::warn!(error = %err, "staying sealed: the HSM could not unseal"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("arcad: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Dev {
            data_dir,
            grpc_addr,
            http_addr,
            node_id,
            region,
            sequencer_interval_ms,
            audit_archive_dir,
            audit_retain_entries,
            rotators_dir,
            rotator_hook_prefixes,
        } => {
            init_logging("info", LogFormat::Text);
            let sequencer = SequencerConfig {
                interval: std::time::Duration::from_millis(sequencer_interval_ms),
                ..SequencerConfig::default()
            };
            let archive = audit_archive_dir.map(|dir| ArchiveConfig {
                dir,
                retain_entries: audit_retain_entries,
                retain_for: None,
                interval: std::time::Duration::from_millis(200),
            });
            runtime.block_on(dev(
                data_dir,
                grpc_addr,
                http_addr,
                node_id,
                region,
                sequencer,
                archive,
                rotators_dir,
                rotator_hook_prefixes,
            ))
        }
        Command::Server { config } => match Config::load(&config) {
            Ok(config) => {
                init_logging(&config.log.level, config.log.format);
                runtime.block_on(run_server(config))
            }
            Err(err) => Err(err.into()),
        },
        Command::CheckConfig { file } => {
            Config::load(&file).map(|_| println!("{}: ok", file.display())).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("arcad: {err}");
            ExitCode::FAILURE
        }
    }
}
