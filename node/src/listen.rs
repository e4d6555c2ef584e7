//! Accepting connections: how many each listener holds at once, and how long a connection
//! may take or stay silent.
//!
//! Every listener (gRPC, HTTP, replication) accepts through [`Incoming`]:
//! - at most [`Limits::max_connections`] connections are open at once; past that, new ones
//!   wait in the kernel's backlog until one closes (nothing is refused, nothing is spent on
//!   them);
//! - a connection that sends nothing for [`Limits::idle_timeout`] is closed
//!   ([`Guarded`]). HTTP/2 connections (gRPC) are pinged more often than that, so a live
//!   client's acknowledgements keep its connection open, and a silent or dead peer is dropped;
//! - so is a connection the node could write nothing more to for as long: its peer stopped
//!   taking what it was sent (a client that stops reading its reply: its window closes, the
//!   node's buffers fill, and the write waits). The read timer alone could not see it: a
//!   server that is writing a reply need not read, so a peer that sends a byte now and then
//!   but never reads would hold the connection for ever. (The kernel lets a write through
//!   again once its send buffer is half empty, so a peer must take that much per idle
//!   timeout: with the default 120 s and Linux's 4 MiB most, ~17 KB/s);
//! - a TLS handshake must finish within [`Limits::tls_handshake_timeout`];
//! - a connection is asked to close at [`Limits::max_connection_age`] (by the servers: HTTP/2
//!   GOAWAY, HTTP/1 after its current reply) and cut [`Limits::max_connection_age_grace`]
//!   later if it is still open ([`Guarded`]): clients spread over nodes added since, and an
//!   HTTP/2 client that gives the node no flow-control credit for its replies cannot hold
//!   them for as long as it answers pings.
//!
//! The HTTP listener also bounds, per request, how long its head (the request line and
//! headers, and the wait for the next request on a kept-alive connection) and its body take
//! to arrive. Without these, a client could hold every file descriptor of the node with
//! connections that never finish a request (slowloris) or never say anything.
//!
//! Memory: an HTTP/2 connection carries at most [`Limits::max_streams_per_connection`]
//! requests at once, and the bytes of requests a listener is receiving (heads, and bodies
//! until they are complete) are held under its [`BodyBudget`] ([`Limits::max_body_bytes_in_flight`]). Past it a request is refused at
//! once (HTTP 503, gRPC `RESOURCE_EXHAUSTED`) rather than buffered: without it, 4,096
//! connections × their streams × 256 KiB could be held before any token is checked. Each
//! listener has its own, so clients filling theirs cannot starve the replication listener.
//!
//! Invariants: every accepted connection holds a permit of its listener's semaphore until it is
//! dropped, so `arca_listener_connections` never exceeds `arca_listener_max_connections`; every
//! byte of a request's head and body received holds a permit of its listener's
//! [`BodyBudget`] until the body (or, over HTTP, the request) is dropped, so `arca_listener_body_bytes` never exceeds
//! `arca_listener_max_body_bytes`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::{Instant, Sleep};

/// How long to wait before accepting again after `accept` failed (out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// HTTP/1: the most a connection buffers of what it has not parsed yet, so the largest request
/// head (line and headers) it accepts; hyper answers a larger one with 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A listener's limits (`[listener]` in the configuration file; the same for every listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, per listener.
    pub max_connections: usize,
    /// A TLS handshake, from the connection's accept.
    pub tls_handshake_timeout: Duration,
    /// HTTP/1: a request's line and headers, counted from the connection's start or from the
    /// previous reply (so also how long a kept-alive connection may wait idle).
    pub header_timeout: Duration,
    /// HTTP: a request's whole body, once its head has arrived.
    pub body_timeout: Duration,
    /// Any connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2: requests (streams) open at once on one connection.
    pub max_streams_per_connection: u32,
    /// Bytes of request bodies being received at once, per listener.
    pub max_body_bytes_in_flight: usize,
    /// A connection this old is asked to close once its requests in flight are answered
    /// (HTTP/2 GOAWAY; HTTP/1 closes after its current reply), so that clients spread over
    /// nodes added since, and no connection lives for ever.
    pub max_connection_age: Duration,
    /// How long after `max_connection_age` a connection that has not closed yet (a request
    /// still in flight, or an HTTP/2 reply its client gives no flow-control credit) is cut.
    pub max_connection_age_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            tls_handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_streams_per_connection: 128,
            // 256 bodies of the largest size a request may have (256 KiB).
            max_body_bytes_in_flight: 64 << 20,
            max_connection_age: Duration::from_secs(3600),
            // Well above the longest request (an exec rotator may run for 60 s).
            max_connection_age_grace: Duration::from_secs(300),
        }
    }
}

impl Limits {
    /// How often an HTTP/2 connection is pinged: well within the idle timeout, so that a live
    /// client's acknowledgement always arrives before it.
    pub fn keepalive_interval(&self) -> Duration {
        (self.idle_timeout / 3).min(Duration::from_secs(30))
    }

    /// How long a ping's acknowledgement may take before the connection is closed.
    pub fn keepalive_timeout(&self) -> Duration {
        (self.idle_timeout / 3).min(Duration::from_secs(20))
    }
}

/// Why a listener closed a connection (or refused a request) for taking too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    Idle,
    Handshake,
    Header,
    Body,
    /// The node could write nothing more to the peer for the idle timeout: the peer stopped
    /// taking what it was sent.
    Write,
    /// The connection was still open at its age and the grace after it.
    Age,
}

impl Timeout {
    const ALL: [Timeout; 6] =
        [Timeout::Idle, Timeout::Handshake, Timeout::Header, Timeout::Body, Timeout::Write, Timeout::Age];

    /// Whether `listener` ever counts this reason: only the HTTP listener serves HTTP/1, whose
    /// request heads have a timeout (HTTP/2's have none).
    fn counted_on(self, listener: &str) -> bool {
        listener == "http" || self != Timeout::Header
    }

    fn name(self) -> &'static str {
        match self {
            Timeout::Idle => "idle",
            Timeout::Handshake => "tls_handshake",
            Timeout::Header => "header",
            Timeout::Body => "body",
            Timeout::Write => "write",
            Timeout::Age => "connection_age",
        }
    }
}

/// One listener's counters, rendered on `/metrics`, and its budget of request-body bytes.
#[derive(Debug)]
pub struct ListenerStats {
    open: AtomicU64,
    max: AtomicU64,
    accepted: AtomicU64,
    timeouts: [AtomicU64; 6],
    body: BodyBudget,
}

impl Default for ListenerStats {
    fn default() -> Self {
        ListenerStats {
            open: AtomicU64::new(0),
            max: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            timeouts: Default::default(),
            body: BodyBudget::new(Limits::default().max_body_bytes_in_flight),
        }
    }
}

impl ListenerStats {
    pub fn timed_out(&self, why: Timeout) {
        self.timeouts[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The listener's budget of request-body bytes.
    pub fn body(&self) -> &BodyBudget {
        &self.body
    }

    pub fn timeouts(&self, why: Timeout) -> u64 {
        self.timeouts[why as usize].load(Ordering::Relaxed)
    }

    /// Appends this listener's samples (the `# TYPE` lines are the caller's).
    pub(crate) fn render(&self, listener: &str) -> [String; 7] {
        let timeouts = Timeout::ALL
            .iter()
            .filter(|t| t.counted_on(listener))
            .map(|t| {
                format!(
                    "arca_listener_timeouts_total{{listener=\"{listener}\",reason=\"{}\"}} {}\n",
                    t.name(),
                    self.timeouts(*t)
                )
            })
            .collect();
        [
            format!("arca_listener_connections{{listener=\"{listener}\"}} {}\n", self.open()),
            format!(
                "arca_listener_max_connections{{listener=\"{listener}\"}} {}\n",
                self.max.load(Ordering::Relaxed)
            ),
            format!(
                "arca_listener_accepted_total{{listener=\"{listener}\"}} {}\n",
                self.accepted.load(Ordering::Relaxed)
            ),
            timeouts,
            format!("arca_listener_body_bytes{{listener=\"{listener}\"}} {}\n", self.body.held()),
            format!("arca_listener_max_body_bytes{{listener=\"{listener}\"}} {}\n", self.body.limit()),
            format!("arca_listener_body_refused_total{{listener=\"{listener}\"}} {}\n", self.body.refused()),
        ]
    }
}

/// Raises this process's soft limit of open files to its hard limit (as Go programs do at
/// start: a service manager's default soft limit, often 1,024, would otherwise cap every
/// listener together far below `max_connections`), and warns when even the hard limit is
/// below what the three listeners and the store may hold. Returns the soft limit now
/// (`None`: unlimited).
pub fn raise_open_files_limit(limits: &Limits) -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let raise = match (limit.current, limit.maximum) {
        (Some(current), Some(maximum)) => current < maximum,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if raise {
        limit.current = limit.maximum;
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %err, "could not raise the open-file limit to its hard limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    // Three listeners at their cap, and room for the store's files, sockets to peers and logs.
    let needed = 3 * limits.max_connections as u64 + 256;
    match now {
        Some(open_files) if open_files < needed => tracing::warn!(
            open_files,
            needed,
            "the open-file limit is below what the listeners may hold (3 × listener.max_connections, and the \
             store's files): past it, new connections wait until others close; raise the hard limit \
             (LimitNOFILE) or lower listener.max_connections"
        ),
        _ => tracing::debug!(open_files = ?now, "open-file limit"),
    }
    now
}

type Acquiring =
    Pin<Box<dyn std::future::Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A listener's stream of accepted connections, at most `max_connections` open at once.
pub struct Incoming {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    acquiring: Option<Acquiring>,
    permit: Option<OwnedSemaphorePermit>,
    backoff: Option<Pin<Box<Sleep>>>,
    idle_timeout: Duration,
    /// From accept to the cut: the age and its grace.
    lifetime: Duration,
    stats: Arc<ListenerStats>,
    /// Accept errors (out of file descriptors: one every 50 ms while it lasts), logged a few
    /// lines per 10 s.
    failures: crate::outage::Outage,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("listener", &self.listener).finish_non_exhaustive()
    }
}

impl Incoming {
    pub fn new(listener: TcpListener, limits: &Limits, stats: Arc<ListenerStats>) -> Self {
        stats.max.store(limits.max_connections as u64, Ordering::Relaxed);
        stats.body.set_limit(limits.max_body_bytes_in_flight);
        Incoming {
            listener,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            acquiring: None,
            permit: None,
            backoff: None,
            idle_timeout: limits.idle_timeout,
            lifetime: limits.max_connection_age + limits.max_connection_age_grace,
            stats,
            failures: crate::outage::Outage::new("accept", crate::outage::Level::Warn),
        }
    }

    /// The next connection; accept errors (out of file descriptors) are logged and retried
    /// after a pause.
    pub async fn accept(&mut self) -> Guarded {
        loop {
            match std::future::poll_fn(|cx| self.poll_accept(cx)).await {
                Ok(conn) => {
                    self.failures.succeeded();
                    return conn;
                }
                Err(err) => {
                    self.failures.failed("accept", &err, None);
                }
            }
        }
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Guarded>> {
        if let Some(backoff) = &mut self.backoff {
            ready!(backoff.as_mut().poll(cx));
            self.backoff = None;
        }
        let permit = match self.permit.take() {
            Some(permit) => permit,
            None => ready!(self.poll_permit(cx))?,
        };
        match self.listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, peer))) => {
                // Requests are small and answered at once: no Nagle delay.
                let _ = stream.set_nodelay(true);
                self.stats.open.fetch_add(1, Ordering::Relaxed);
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Ok(Guarded {
                    stream,
                    peer,
                    _permit: permit,
                    idle_timeout: self.idle_timeout,
                    expires: Instant::now() + self.lifetime,
                    last_read: Instant::now(),
                    timer: None,
                    write_stalled: None,
                    write_timer: None,
                    stats: self.stats.clone(),
                }))
            }
            // The permit waits with the listener for the next connection.
            Poll::Pending => {
                self.permit = Some(permit);
                Poll::Pending
            }
            Poll::Ready(Err(err)) => {
                self.permit = Some(permit);
                self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                Poll::Ready(Err(err))
            }
        }
    }

    /// A permit for one more connection: at once if one is free, else once a connection
    /// closes.
    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<OwnedSemaphorePermit>> {
        // The semaphore is never closed; if it were, accepting would stop with an error.
        let closed = |_| io::Error::other("the listener's connection limit was closed");
        let acquiring = match self.acquiring.as_mut() {
            Some(acquiring) => acquiring,
            None => match self.permits.clone().try_acquire_owned() {
                Ok(permit) => return Poll::Ready(Ok(permit)),
                Err(TryAcquireError::Closed) => return Poll::Ready(Err(closed(()))),
                Err(TryAcquireError::NoPermits) => {
                    self.acquiring.insert(Box::pin(self.permits.clone().acquire_owned()))
                }
            },
        };
        let permit = ready!(acquiring.as_mut().poll(cx));
        self.acquiring = None;
        Poll::Ready(permit.map_err(|_| closed(())))
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Guarded>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_accept(cx).map(Some)
    }
}

/// A connection after its TLS handshake.
pub type TlsConn = tokio_rustls::server::TlsStream<Guarded>;

/// The TLS handshake of an accepted connection, within [`Limits::tls_handshake_timeout`]: a
/// handshake that takes longer is counted (`reason="tls_handshake"`) and the connection
/// dropped, as is one that fails.
pub async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    conn: Guarded,
    timeout: Duration,
) -> Option<TlsConn> {
    let stats = conn.stats().clone();
    let accepting = acceptor.accept(conn);
    tokio::pin!(accepting);
    tokio::select! {
        accepted = &mut accepting => accepted.ok(),
        () = tokio::time::sleep(timeout) => {
            // Counted before the connection closes (with `accepting`), so that a peer that
            // sees it closed finds it counted.
            stats.timed_out(Timeout::Handshake);
            None
        }
    }
}

/// A listener's connections once their TLS handshake is done, for tonic (which takes a
/// stream of them): each handshake runs on a task of its own (a slow one holds up no other),
/// through [`handshake`]. tonic finds the peer's certificates on each request
/// (`Request::peer_certs`) from the stream's connect info, as when it does TLS itself.
pub struct TlsIncoming {
    ready: tokio::sync::mpsc::UnboundedReceiver<TlsConn>,
}

impl std::fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIncoming").finish_non_exhaustive()
    }
}

impl TlsIncoming {
    pub fn new(mut incoming: Incoming, config: Arc<rustls::ServerConfig>, timeout: Duration) -> TlsIncoming {
        let (tx, ready) = tokio::sync::mpsc::unbounded_channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                // Stops accepting once the server has dropped the stream.
                let conn = tokio::select! {
                    conn = incoming.accept() => conn,
                    () = tx.closed() => return,
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Some(tls) = handshake(&acceptor, conn, timeout).await {
                        let _ = tx.send(tls);
                    }
                });
            }
        });
        TlsIncoming { ready }
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().ready.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

/// An accepted connection: holds its listener's permit, fails its reads once its peer has
/// sent nothing for the idle timeout, and its writes once they have waited as long for the
/// peer to take what it was sent (the server then closes it).
pub struct Guarded {
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    /// When the connection is cut however busy it is: its age and the grace after it (the
    /// server asks it to close at its age; this is for one that did not).
    expires: Instant,
    last_read: Instant,
    /// Armed at some deadline at or before `last_read + idle_timeout` (or `expires`); moved on
    /// only when it fires early, so a busy connection does not touch the timer on every read.
    timer: Option<Pin<Box<Sleep>>>,
    /// Since when writes have been waiting for the peer to take bytes (`None` while they flow).
    write_stalled: Option<Instant>,
    /// Armed at `write_stalled + idle_timeout` while writes wait; only a write that waits
    /// touches it.
    write_timer: Option<Pin<Box<Sleep>>>,
    stats: Arc<ListenerStats>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Guarded {
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }

    /// `Ready` once the peer has been silent for the idle timeout, or the connection has
    /// expired.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Timeout> {
        loop {
            let deadline = (self.last_read + self.idle_timeout).min(self.expires);
            let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            ready!(timer.as_mut().poll(cx));
            let now = Instant::now();
            if now >= self.expires {
                return Poll::Ready(Timeout::Age);
            }
            if now >= deadline {
                return Poll::Ready(Timeout::Idle);
            }
            // Fired for an earlier deadline: the peer has spoken since.
            timer.as_mut().reset(deadline);
        }
    }

    /// The error a read or write fails with when the connection is cut for `why` (counted).
    fn cut(&self, why: Timeout) -> io::Error {
        self.stats.timed_out(why);
        let secs = self.idle_timeout.as_secs_f64();
        let message = match why {
            Timeout::Age => "the connection outlived its age and grace".to_owned(),
            Timeout::Write => format!("the peer took nothing more for {secs} s"),
            _ => format!("the peer sent nothing for {secs} s"),
        };
        io::Error::new(io::ErrorKind::TimedOut, message)
    }

    /// What a write that the socket took (`Ready`) or left waiting (`Pending`) means for the
    /// connection: a write taken ends a stall; a wait starts one, or fails the write once the
    /// stall has lasted the idle timeout.
    fn write_outcome<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.write_stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let stalled = *self.write_stalled.get_or_insert_with(Instant::now) + self.idle_timeout;
                let deadline = stalled.min(self.expires);
                let timer =
                    self.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                ready!(timer.as_mut().poll(cx));
                let why = if Instant::now() >= self.expires { Timeout::Age } else { Timeout::Write };
                Poll::Ready(Err(self.cut(why)))
            }
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => match this.poll_idle(cx) {
                Poll::Ready(why) => Poll::Ready(Err(this.cut(why))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.write_outcome(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.write_outcome(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The bytes of request bodies a listener holds while they arrive
/// ([`Limits::max_body_bytes_in_flight`]): a semaphore with a permit per byte. A body takes
/// permits for each chunk as it arrives ([`BodyBudget::charge`]) and gives them back when it
/// is dropped; a chunk that does not fit is refused at once, never waited for (two bodies
/// each waiting for the other's bytes would hold them forever).
#[derive(Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    limit: AtomicUsize,
    refused: AtomicU64,
}

/// What one request body holds of its listener's [`BodyBudget`]; given back on drop.
#[derive(Debug, Default)]
pub struct Charge(Option<OwnedSemaphorePermit>);

/// A request refused because its listener holds its limit of request-body bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSpent {
    pub limit: usize,
}

impl std::fmt::Display for BudgetSpent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node is receiving as many request bodies on this listener as it holds at once ({} bytes); retry shortly",
            self.limit
        )
    }
}

impl BodyBudget {
    pub fn new(limit: usize) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        BodyBudget {
            permits: Arc::new(Semaphore::new(limit)),
            limit: AtomicUsize::new(limit),
            refused: AtomicU64::new(0),
        }
    }

    /// Sets the limit; meant for before the listener serves (bytes held then are not taken
    /// back, so `held` may read low until they are given back).
    pub fn set_limit(&self, limit: usize) {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        let old = self.limit.swap(limit, Ordering::Relaxed);
        if limit > old {
            self.permits.add_permits(limit - old);
        } else {
            self.permits.forget_permits(old - limit);
        }
    }

    /// Adds `bytes` to what `charge` holds, or refuses them (and counts the refusal) when the
    /// node does not have them to spare. A refused body should be dropped with its charge.
    pub fn charge(&self, charge: &mut Charge, bytes: usize) -> Result<(), BudgetSpent> {
        if bytes == 0 {
            return Ok(());
        }
        let acquired =
            u32::try_from(bytes).ok().and_then(|n| self.permits.clone().try_acquire_many_owned(n).ok());
        match (acquired, &mut charge.0) {
            (Some(permit), Some(held)) => held.merge(permit),
            (Some(permit), none) => *none = Some(permit),
            (None, _) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(BudgetSpent { limit: self.limit() });
            }
        }
        Ok(())
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.limit().saturating_sub(self.permits.available_permits())
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// What a request's head holds in memory, counted as HTTP/2 counts a header list (each
/// field's name and value, and 32 bytes; RFC 9113, section 6.5.2), with its target. A
/// request waiting for its body holds its head too, so both are charged to the budget.
pub fn head_bytes(uri: &axum::http::Uri, headers: &axum::http::HeaderMap) -> usize {
    let target = uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    headers.iter().fold(target, |sum, (name, value)| sum + name.as_str().len() + value.len() + 32)
}

/// A gRPC request's body, bounded in time and memory:
/// - it must end within the body timeout, counted from when its head arrived: past it, reading
///   it fails with `DEADLINE_EXCEEDED`. The timer is armed only if the body is not all there
///   at the first read, as a unary request's usually is;
/// - its head (charged by the caller, [`head_bytes`]) and each chunk that arrives are charged
///   to the listener's [`BodyBudget`] until the body is dropped
///   (tonic drops a unary request's body once its message is decoded, before the handler
///   runs); a chunk that does not fit fails the read with `RESOURCE_EXHAUSTED`.
///
/// Either failure is answered by tonic before any handler runs, so the refusal layer audits
/// it as a refused request.
pub struct BoundedBody<B> {
    inner: B,
    deadline: Instant,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    stats: Arc<ListenerStats>,
    charge: Charge,
}

impl<B> BoundedBody<B> {
    pub fn new(inner: B, timeout: Duration, stats: Arc<ListenerStats>, charge: Charge) -> Self {
        BoundedBody { inner, deadline: Instant::now() + timeout, timeout, timer: None, stats, charge }
    }
}

impl<B> std::fmt::Debug for BoundedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedBody").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl<B> http_body::Body for BoundedBody<B>
where
    B: http_body::Body<Error = tonic::Status> + Unpin,
{
    type Data = B::Data;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use hyper::body::Buf as _;
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some(Ok(frame)) = &frame {
                let bytes = frame.data_ref().map_or(0, |data| data.remaining());
                if let Err(spent) = this.stats.body.charge(&mut this.charge, bytes) {
                    return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(spent.to_string()))));
                }
            }
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        this.stats.timed_out(Timeout::Body);
        let secs = this.timeout.as_secs_f64();
        Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
            "the request body did not arrive within {secs} s"
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn the_body_budget_refuses_what_does_not_fit_and_takes_back_what_is_dropped() {
        let budget = BodyBudget::new(100);
        let (mut a, mut b) = (Charge::default(), Charge::default());
        budget.charge(&mut a, 30).unwrap();
        budget.charge(&mut a, 30).unwrap();
        assert_eq!(budget.held(), 60);
        assert_eq!(budget.charge(&mut b, 41), Err(BudgetSpent { limit: 100 }));
        assert_eq!((budget.held(), budget.refused()), (60, 1), "a refusal takes nothing");
        budget.charge(&mut b, 40).unwrap();
        budget.charge(&mut b, 0).unwrap();
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40, "a dropped charge gives back every byte it took");
        // More than a semaphore can take at once is refused, not truncated.
        assert!(BodyBudget::new(usize::MAX).charge(&mut b, usize::MAX).is_err());
        drop(b);
        assert_eq!(budget.held(), 0);
        // Resized before serving: the new limit holds at once.
        let resized = BodyBudget::new(100);
        resized.set_limit(10);
        assert!(resized.charge(&mut Charge::default(), 11).is_err());
        resized.set_limit(1000);
        resized.charge(&mut Charge::default(), 999).unwrap();
        assert_eq!((resized.limit(), resized.held(), resized.refused()), (1000, 0, 1));
    }

    async fn listener(limits: &Limits) -> (Incoming, SocketAddr, Arc<ListenerStats>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(ListenerStats::default());
        (Incoming::new(listener, limits, stats.clone()), addr, stats)
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_for_the_idle_timeout_fails_its_read() {
        let idle = Duration::from_millis(1000);
        let limits = Limits { idle_timeout: idle, ..Limits::default() };
        let (mut incoming, addr, stats) = listener(&limits).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.accept().await;
        let started = Instant::now();
        // A byte every 200 ms keeps it open well past the idle timeout: each read moves the
        // deadline on.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).await.unwrap();
        }
        let spoke = Instant::now();
        assert!(spoke - started > idle, "the reads kept it open");
        let mut byte = [0u8; 1];
        let err = conn.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(spoke.elapsed() >= idle, "not closed before the idle timeout: {:?}", spoke.elapsed());
        assert_eq!(stats.timeouts(Timeout::Idle), 1);
    }

    #[tokio::test]
    async fn a_write_fails_once_the_peer_has_taken_nothing_for_the_idle_timeout() {
        let idle = Duration::from_millis(1000);
        let limits = Limits { idle_timeout: idle, ..Limits::default() };
        let (mut incoming, addr, stats) = listener(&limits).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket.connect(addr).await.unwrap();
        let mut conn = incoming.accept().await;
        // A send buffer of a fixed size (on loopback the kernel grows it to megabytes), so that
        // what the reader below takes soon makes room for more.
        socket2::SockRef::from(&conn.stream).set_send_buffer_size(64 * 1024).unwrap();
        // A reader that takes 32 KiB every 100 ms: the node's writes wait each time its
        // buffers are full, but never for the idle timeout, and 1 MiB gets through although
        // that takes longer than the timeout.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            let mut total = 0;
            while total < 1 << 20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut taken = 0;
                while taken < buf.len() {
                    match client.read(&mut buf[taken..]).await.unwrap() {
                        0 => panic!("closed"),
                        n => taken += n,
                    }
                }
                total += taken;
            }
            client
        });
        let started = Instant::now();
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..16 {
            conn.write_all(&chunk).await.unwrap();
        }
        let took = started.elapsed();
        assert!(took > idle, "the writes outlasted the idle timeout: {took:?}");
        let client = reader.await.unwrap();
        assert_eq!(stats.timeouts(Timeout::Write), 0);
        // Now it takes nothing: the write that waits fails after the idle timeout, not before
        // (the stall begins at a write made from here on).
        let stopped = Instant::now();
        let mut waited = false;
        let mut written = 0usize;
        let err = loop {
            match tokio::time::timeout(Duration::from_millis(100), conn.write(&chunk)).await {
                Ok(Ok(n)) => written += n,
                Ok(Err(err)) => break err,
                Err(_) => waited = true,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(waited, "the writes waited");
        assert!(stopped.elapsed() >= idle, "failed after {:?}", stopped.elapsed());
        assert!(written > 0);
        assert_eq!(stats.timeouts(Timeout::Write), 1);
        drop(client);
    }

    #[tokio::test]
    async fn no_more_than_max_connections_are_accepted_until_one_closes() {
        let limits = Limits { max_connections: 2, ..Limits::default() };
        let (mut incoming, addr, stats) = listener(&limits).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let first = incoming.accept().await;
        let second = incoming.accept().await;
        assert_eq!(stats.open(), 2);
        // The third waits in the backlog: no permit, so accept is not even polled.
        let mut third = std::pin::pin!(incoming.accept());
        assert!(futures_poll_once(third.as_mut()).await.is_none());
        drop(first);
        assert_eq!(stats.open(), 1);
        let third = third.await;
        assert_eq!(stats.open(), 2);
        drop((second, third));
        assert_eq!(stats.open(), 0);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        // (An unlimited hard limit has nothing to raise to.)
        let Some(maximum) = before.maximum.filter(|m| *m > 1) else { return };
        // Lower the soft limit, as a service manager's default would be (by one only: the
        // tests beside this one share the process).
        let lowered = rustix::process::Rlimit { current: Some(maximum - 1), maximum: Some(maximum) };
        setrlimit(Resource::Nofile, lowered).unwrap();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(maximum - 1));
        let now = raise_open_files_limit(&Limits::default());
        assert_eq!(now, Some(maximum));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(maximum));
    }

    /// Polls `fut` once: its output if it was ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
        // Give the accept a chance to see the pending connection first.
        tokio::task::yield_now().await;
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut fut).poll(cx) {
                Poll::Ready(out) => Some(out),
                Poll::Pending => None,
            })
        })
        .await
    }
}
