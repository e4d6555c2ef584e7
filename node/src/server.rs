//! Running a node: the gRPC listener (TLS or loopback plaintext), the `/metrics` endpoint,
//! and `arcad dev`'s bootstrap (initialise and unseal a single-node dev store).

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arca_audit::Source;
use tokio::net::TcpListener;
use tonic::transport::Server;
use zeroize::Zeroizing;

use arca_store::{SqliteConfig, SqliteStore, Store};

use crate::config::{Engine, StorageSection};
use crate::grpc::{ProxyConfig, Service};
use crate::listen::{Incoming, Limits, Timeout, TlsIncoming};
use crate::node::{Node, RequestContext};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens the SQLite store at `path` (created on first use, mode 0600).
pub fn open_sqlite(path: &Path) -> Result<Arc<dyn Store>, BoxError> {
    Ok(Arc::new(SqliteStore::open(SqliteConfig::new(path))?))
}

/// Opens the store a `[storage]` section names.
pub fn open_store(storage: &StorageSection) -> Result<Arc<dyn Store>, BoxError> {
    match storage.engine {
        Engine::Sqlite => open_sqlite(storage.path.as_deref().ok_or("storage.path is required")?),
        Engine::Fdb => open_fdb(storage),
    }
}

#[cfg(feature = "fdb")]
fn open_fdb(storage: &StorageSection) -> Result<Arc<dyn Store>, BoxError> {
    use arca_store::fdb::{FdbConfig, FdbNetwork, FdbStore};
    // The network must outlive every store; a process boots it once (a second boot is an
    // error) and runs until it exits.
    let network: &'static FdbNetwork = Box::leak(Box::new(FdbNetwork::boot()?));
    let fdb_config = FdbConfig { cluster_file: storage.cluster_file.clone(), ..FdbConfig::default() };
    Ok(Arc::new(FdbStore::open(network, fdb_config)?))
}

#[cfg(not(feature = "fdb"))]
fn open_fdb(_storage: &StorageSection) -> Result<Arc<dyn Store>, BoxError> {
    Err("this build has no FoundationDB support (build with --features fdb)".into())
}

/// TLS files for the gRPC listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// How to serve a node.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub grpc_addr: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// The HTTP listener: `/metrics` and the audit log (`/audit/<region>/…`).
    pub http_addr: Option<SocketAddr>,
    pub proxy: ProxyConfig,
    /// The replication listener (other regions pull from it), when regions are configured.
    pub replication: Option<ReplicationListener>,
    /// Every listener's connection limits and timeouts.
    pub limits: Limits,
}

/// Where and how the replication service listens: mTLS (`tls` with the regions' CA as
/// `client_ca`, required), or plaintext on loopback for development.
#[derive(Debug, Clone)]
pub struct ReplicationListener {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
}

/// Serves until `shutdown` completes. Prints `arcad: grpc listening on ADDR` (and
/// `arcad: http listening on ADDR`) on stdout once bound, so scripts and tests learn the
/// ports (useful with port 0).
pub async fn serve(
    node: Arc<Node>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    if opts.tls.is_none() && !opts.grpc_addr.ip().is_loopback() {
        return Err("refusing to serve plaintext gRPC on a non-loopback address".into());
    }
    crate::listen::raise_open_files_limit(&opts.limits);
    let listener = TcpListener::bind(opts.grpc_addr).await?;
    serve_listener(node, listener, opts, shutdown).await
}

/// Like [`serve`], on an already bound listener (`opts.grpc_addr` is ignored).
pub async fn serve_listener(
    node: Arc<Node>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let grpc_addr = listener.local_addr()?;
    if opts.tls.is_none() && !grpc_addr.ip().is_loopback() {
        return Err("refusing to serve plaintext gRPC on a non-loopback address".into());
    }
    let limits = &opts.limits;
    let grpc_tls = match &opts.tls {
        Some(tls) => Some(grpc_tls_config(tls, tls.client_ca.as_deref())?),
        None => {
            tracing::warn!(%grpc_addr, "serving gRPC in PLAINTEXT on loopback: development only");
            None
        }
    };
    if let Some(addr) = opts.http_addr {
        if opts.tls.is_none() && !addr.ip().is_loopback() {
            return Err("refusing to serve plaintext HTTP on a non-loopback address".into());
        }
        let http_listener = TcpListener::bind(addr).await?;
        let tls = match &opts.tls {
            Some(files) => Some(http_tls_config(files)?),
            None => None,
        };
        let http_addr = http_listener.local_addr()?;
        let incoming = Incoming::new(http_listener, limits, node.metrics().listener("http"));
        println!("arcad: http listening on {http_addr}");
        tokio::spawn(serve_http(node.clone(), incoming, tls, opts.proxy.clone(), limits.clone()));
    }
    if let Some(repl) = &opts.replication {
        serve_replication(node.clone(), repl, limits).await?;
        crate::region::start(&node);
    }
    // Registered before the line that tells a supervisor (and the tests) the node is up, so
    // that /metrics shows the listener from then on.
    let stats = node.metrics().listener("grpc");
    let incoming = Incoming::new(listener, limits, stats.clone());
    println!("arcad: grpc listening on {grpc_addr}");
    std::io::stdout().flush()?;
    tracing::info!(%grpc_addr, tls = opts.tls.is_some(), "node serving");
    let service = Service::new(node, opts.proxy);
    let router = grpc_builder(limits)
        .layer(service.refusals_layer().body_timeout(limits.body_timeout, stats))
        .add_service(service.into_server());
    match grpc_tls {
        Some(config) => {
            let incoming = TlsIncoming::new(incoming, config, limits.tls_handshake_timeout);
            router.serve_with_incoming_shutdown(incoming, shutdown).await?
        }
        None => router.serve_with_incoming_shutdown(incoming, shutdown).await?,
    }
    Ok(())
}

/// A gRPC listener's TLS settings: the node's certificate, HTTP/2 only, and, with
/// `client_ca`, a client certificate it signed required of every client. The handshakes
/// are ours, not tonic's ([`TlsIncoming`]), so that they are bounded and counted like the
/// HTTP listener's.
fn grpc_tls_config(
    files: &TlsFiles,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, BoxError> {
    tls_config(files, client_ca, &[b"h2"])
}

/// A listener's rustls settings (ring, TLS 1.2 and 1.3): `files`' certificate chain and
/// key (a key file that group or others can read is refused; its PEM is zeroized once
/// parsed), a client certificate signed by `client_ca` required when one is given, and
/// `alpn` in order of preference.
fn tls_config(
    files: &TlsFiles,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, BoxError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    refuse_shared_key_file(&files.key)?;
    let certs = CertificateDer::pem_file_iter(&files.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&Zeroizing::new(std::fs::read(&files.key)?))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no CA certificate in it", ca.display()).into());
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A gRPC server that pings its connections often enough that a live client's answers keep
/// them within the idle timeout, closes those whose peer stops answering, serves at most
/// `max_streams_per_connection` requests at once on a connection (tonic sets no limit), and
/// sends a connection GOAWAY at its `max_connection_age` (`listen::Guarded` cuts it after the
/// grace, so tonic's own grace is not set).
fn grpc_builder(limits: &Limits) -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive_interval()))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout()))
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_connection_age(limits.max_connection_age)
}

/// Binds the replication listener and serves it in the background.
async fn serve_replication(
    node: Arc<Node>,
    opts: &ReplicationListener,
    limits: &Limits,
) -> Result<(), BoxError> {
    let listener = TcpListener::bind(opts.addr).await?;
    let addr = listener.local_addr()?;
    let tls = match &opts.tls {
        Some(tls) => {
            let ca = tls.client_ca.as_ref().ok_or("the replication listener needs the regions' CA")?;
            // A client certificate signed by the regions' CA is required: only peer
            // regions may pull a feed or say hello.
            Some(grpc_tls_config(tls, Some(ca))?)
        }
        None if addr.ip().is_loopback() => {
            tracing::warn!(%addr, "serving replication in PLAINTEXT on loopback: development only");
            None
        }
        None => return Err("refusing to serve plaintext replication on a non-loopback address".into()),
    };
    println!("arcad: replication listening on {addr}");
    let service = crate::region::ReplicationService::new(node.clone()).into_server();
    let stats = node.metrics().listener("replication");
    let incoming = Incoming::new(listener, limits, stats.clone());
    let router = grpc_builder(limits)
        .layer(crate::grpc::AuditRefusalsLayer::replication(node).body_timeout(limits.body_timeout, stats))
        .add_service(service);
    let handshake_timeout = limits.tls_handshake_timeout;
    tokio::spawn(async move {
        let served = match tls {
            Some(config) => {
                router.serve_with_incoming(TlsIncoming::new(incoming, config, handshake_timeout)).await
            }
            None => router.serve_with_incoming(incoming).await,
        };
        if let Err(err) = served {
            tracing::error!(error = %err, "the replication listener stopped");
        }
    });
    Ok(())
}

fn refuse_shared_key_file(path: &Path) -> Result<(), BoxError> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!("{} is accessible to group or others; chmod 600 it", path.display()).into());
    }
    Ok(())
}

/// The HTTP listener's TLS settings: the gRPC listener's certificate, no client certificate
/// (what it serves is public), HTTP/2 or HTTP/1.1.
fn http_tls_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, BoxError> {
    tls_config(files, None, &[b"h2", b"http/1.1"])
}

async fn serve_http(
    node: Arc<Node>,
    mut incoming: Incoming,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy: ProxyConfig,
    limits: Limits,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let app = crate::http::router(node, proxy, &limits);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = Builder::new(TokioExecutor::new());
    // hyper enforces the header timeout only with a timer. A request head over 64 KiB is
    // answered 431 by hyper (its default buffer, ~400 KiB a connection, would let 4,096
    // connections hold 1.6 GiB before any token is read).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(crate::listen::MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval())
        .keep_alive_timeout(limits.keepalive_timeout())
        .max_concurrent_streams(limits.max_streams_per_connection);
    let builder = Arc::new(builder);
    loop {
        let conn = incoming.accept().await;
        let peer = conn.peer_addr();
        let stats = conn.stats().clone();
        let app = app.clone().layer(axum::Extension(crate::vault::PeerAddr(Some(peer))));
        let service = TowerToHyperService::new(app);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let handshake_timeout = limits.tls_handshake_timeout;
        // Counted from the accept, as `Guarded` counts the age and grace it cuts at.
        let aged = tokio::time::Instant::now() + limits.max_connection_age;
        tokio::spawn(async move {
            let served = match acceptor {
                Some(acceptor) => {
                    let Some(tls_stream) = crate::listen::handshake(&acceptor, conn, handshake_timeout).await
                    else {
                        return;
                    };
                    until_aged(builder.serve_connection(TokioIo::new(tls_stream), service), aged).await
                }
                None => until_aged(builder.serve_connection(TokioIo::new(conn), service), aged).await,
            };
            if let Err(err) = served {
                if err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                    stats.timed_out(Timeout::Header);
                }
                tracing::debug!(error = %err, "http connection ended with an error");
            }
        });
    }
}

/// Serves an HTTP connection; at `aged`, asks it to close once its requests in flight are
/// answered (HTTP/1: after the current reply, at once when idle; HTTP/2: GOAWAY).
async fn until_aged<I>(
    serving: hyper_util::server::conn::auto::Connection<
        '_,
        I,
        hyper_util::service::TowerToHyperService<axum::Router>,
        hyper_util::rt::TokioExecutor,
    >,
    aged: tokio::time::Instant,
) -> Result<(), BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::pin!(serving);
    tokio::select! {
        // The connection first, and no random draw per poll: this runs on every request.
        biased;
        served = serving.as_mut() => return served,
        () = tokio::time::sleep_until(aged) => serving.as_mut().graceful_shutdown(),
    }
    serving.await
}

/// Writes `contents` to a new file readable by the owner only.
fn write_private(path: &Path, contents: &str) -> Result<(), BoxError> {
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

fn local_context() -> RequestContext {
    RequestContext::new(None, Source { address: "local:arcad-dev".into(), proxy: None })
}

/// `arcad dev`: initialises the store on first start (one key share, kept in the data dir —
/// development only) and unseals it on every start. Returns the root token's file.
pub async fn dev_bootstrap(node: &Arc<Node>, data_dir: &Path) -> Result<PathBuf, BoxError> {
    let share_file = data_dir.join("unseal-key");
    let token_file = data_dir.join("root-token");
    let status = node.operator_status(local_context()).await.result?;
    if !status.initialized {
        let init = node.operator_init(local_context(), 1, 1).await.result?;
        write_private(&share_file, &init.shares[0])?;
        write_private(&token_file, &init.root_token.token)?;
        println!("arcad dev: initialised a new store in {}", data_dir.display());
        println!("arcad dev: Root Token: {}", &*init.root_token.token);
    } else {
        refuse_shared_key_file(&share_file)?;
        let share = Zeroizing::new(std::fs::read_to_string(&share_file)?.trim().to_owned());
        let progress = node.operator_unseal(local_context(), share).await.result?;
        if progress.sealed {
            return Err("the stored dev unseal key did not unseal the store".into());
        }
    }
    eprintln!(
        "WARNING: arcad dev keeps its unseal key in {} and serves plaintext gRPC on loopback.\n\
         WARNING: never use dev mode for real secrets.",
        share_file.display()
    );
    println!("arcad dev: root token in {}", token_file.display());
    Ok(token_file)
}
