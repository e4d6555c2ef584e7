//! The listeners' limits against real `arcad server` processes on loopback: a request head
//! or body that never finishes, a connection that says nothing, and a TLS handshake that
//! never starts are each closed (or refused) after their configured time, and counted on
//! `/metrics`, as is a client that stops reading its reply while it keeps sending; a live gRPC client that stays idle longer than the idle timeout keeps its
//! connection, because the node pings it and its answers count. Request bodies past the
//! node's budget of bytes are refused at once (503), and the bytes come back when the
//! requests holding them go away.

mod common;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Server, sample};

const HEADER_MS: u64 = 500;
const BODY_MS: u64 = 500;
const IDLE_MS: u64 = 1500;

fn write_config(dir: &Path, listener: &str) -> PathBuf {
    common::server_config(dir, &format!("max_connections = 64\n{listener}"), "")
}

fn host_port(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| rest)
}

/// Connects to `addr`, sends `bytes`, and reads until the server closes the connection;
/// returns how long that took from before the connect (the server's timers start at its
/// accept, which may come before the client has its connection back), and everything the
/// server sent. Fails if the connection is still open after `within`.
fn closed_after(addr: &str, bytes: &[u8], within: Duration) -> (Duration, Vec<u8>) {
    let sent = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(sent.elapsed()).unwrap_or_default();
        assert!(!left.is_zero(), "{addr}: still open after {within:?}");
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (sent.elapsed(), received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (sent.elapsed(), received),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "{addr}: still open after {within:?}, having sent {:?}",
                    String::from_utf8_lossy(&received)
                )
            }
            Err(e) => panic!("{addr}: {e}"),
        }
    }
}

fn timeouts(server: &Server, listener: &str, reason: &str) -> u64 {
    sample(
        &server.metrics(),
        &format!("arca_listener_timeouts_total{{listener=\"{listener}\",reason=\"{reason}\"}}"),
    )
}

#[test]
fn slow_or_silent_connections_are_closed_and_live_idle_grpc_clients_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "dangerous_plaintext = true\nheader_timeout_ms = {HEADER_MS}\nbody_timeout_ms = {BODY_MS}\nidle_timeout_ms = {IDLE_MS}\n"
        ),
    );
    let server = common::start_server(&config, &[]);
    let (http, grpc) = (host_port(&server.http).to_owned(), host_port(&server.addr).to_owned());
    let within = Duration::from_secs(15);
    let before = server.metrics();
    assert_eq!(sample(&before, "arca_listener_max_connections{listener=\"grpc\"}"), 64);
    assert_eq!(sample(&before, "arca_listener_max_connections{listener=\"http\"}"), 64);
    // Each listener shows the reasons it counts: HTTP/2 has no head timeout.
    assert_eq!(sample(&before, "arca_listener_timeouts_total{listener=\"http\",reason=\"header\"}"), 0);
    assert_eq!(
        sample(&before, "arca_listener_timeouts_total{listener=\"grpc\",reason=\"tls_handshake\"}"),
        0
    );
    let line = "arca_listener_timeouts_total{listener=\"grpc\",reason=\"header\"}";
    assert!(!before.contains(line), "{line} is never counted, so not shown");
    assert_eq!(sample(&before, "arca_listener_timeouts_total{listener=\"grpc\",reason=\"write\"}"), 0);

    // A live gRPC client, idle for longer than the idle timeout between two calls, keeps its
    // connection: the node's pings and the client's answers count as traffic.
    let accepted = |m: &str| sample(m, "arca_listener_accepted_total{listener=\"grpc\"}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (first, second) = runtime.block_on(async {
        let mut client = arca_client::RawClient::connect(server.addr.clone()).await.unwrap();
        client.status(arca_client::proto::Empty {}).await.unwrap();
        let first = server.metrics();
        tokio::time::sleep(Duration::from_millis(IDLE_MS * 3)).await;
        let status = client.status(arca_client::proto::Empty {}).await.unwrap().into_inner();
        assert!(status.sealed, "a server starts sealed");
        (first, server.metrics())
    });
    drop(runtime);
    assert_eq!(accepted(&first), accepted(&second), "the idle client's connection was kept");
    assert_eq!(sample(&second, "arca_listener_timeouts_total{listener=\"grpc\",reason=\"idle\"}"), 0);

    // A request head that never ends: closed after the header timeout.
    let (took, _) = closed_after(&http, b"GET /v1/sys/health HTTP/1.1\r\nHost: arca\r\n", within);
    assert!(took >= Duration::from_millis(HEADER_MS), "closed after {took:?}");
    assert_eq!(timeouts(&server, "http", "header"), 1);

    // A body that never ends: 408, and counted.
    let (took, reply) = closed_after(
        &http,
        b"POST /v1/secret/data/app HTTP/1.1\r\nHost: arca\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"data\":",
        within,
    );
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("did not arrive within 0.5 s"), "{reply}");
    assert!(took >= Duration::from_millis(BODY_MS), "answered after {took:?}");
    assert_eq!(timeouts(&server, "http", "body"), 1);

    // Connections that say nothing at all: closed after the idle timeout, on both listeners.
    for (listener, addr) in [("http", &http), ("grpc", &grpc)] {
        let (took, _) = closed_after(addr, b"", within);
        assert!(took >= Duration::from_millis(IDLE_MS), "{listener}: closed after {took:?}");
        assert_eq!(timeouts(&server, listener, "idle"), 1, "{listener}");
    }
    // Every gRPC connection above is closed (the live client's too, once it went away).
    assert_eq!(sample(&server.metrics(), "arca_listener_connections{listener=\"grpc\"}"), 0);
}

#[test]
fn a_tls_handshake_that_never_starts_is_cut_off_on_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::TestCa::new(dir.path());
    let (cert, key) = ca.issue("server", "localhost");
    let config = write_config(
        dir.path(),
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_handshake_timeout_ms = 500\nidle_timeout_ms = 600000\n",
            cert.display(),
            key.display()
        ),
    );
    let server = common::start_server(&config, &[]);
    // /metrics over HTTPS, trusting the test CA.
    let ca = ureq::tls::Certificate::from_pem(&std::fs::read(&ca.ca_file).unwrap()).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![ca])))
                .build(),
        )
        .build()
        .into();
    let https = format!("https://localhost:{}", host_port(&server.http).rsplit_once(':').unwrap().1);
    let handshakes_cut = |listener: &str| {
        let metrics =
            agent.get(format!("{https}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
        sample(
            &metrics,
            &format!("arca_listener_timeouts_total{{listener=\"{listener}\",reason=\"tls_handshake\"}}"),
        )
    };
    // With the idle timeout at ten minutes, only the handshake timeout can close these
    // within the fifteen seconds allowed; each listener counts its own.
    for (url, listener) in [(&server.http, "http"), (&server.addr, "grpc")] {
        let before = handshakes_cut(listener);
        let (took, _) = closed_after(host_port(url), b"", Duration::from_secs(15));
        assert!(took >= Duration::from_millis(500), "{url}: closed after {took:?}");
        assert_eq!(handshakes_cut(listener), before + 1, "{listener}: the cut handshake was not counted");
    }
}

/// Polls `/metrics` until `name` reads `value`, for at most 15 s.
fn eventually_sample(server: &Server, name: &str, value: u64) {
    let what = format!("{name} to read {value}");
    common::wait_until(&what, Duration::from_secs(15), || sample(&server.metrics(), name) == value);
}

#[test]
fn request_bodies_past_the_nodes_budget_are_refused_with_503_and_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "dangerous_plaintext = true\nmax_body_bytes_in_flight = 1048576\n");
    let server = common::start_server(&config, &[]);
    let http = host_port(&server.http).to_owned();
    let before = server.metrics();
    assert_eq!(sample(&before, "arca_listener_max_body_bytes{listener=\"http\"}"), 1 << 20);
    assert_eq!(sample(&before, "arca_listener_body_bytes{listener=\"http\"}"), 0);
    // Four requests that declare bodies of 250,000 bytes and send none of it: the node
    // allocates for what they declared, and charges that and their heads.
    let head = |path: &str, length: usize| {
        let text = format!("PUT {path} HTTP/1.1\r\nHost: arca\r\nContent-Length: {length}\r\n");
        let parsed = tonic::codegen::http::Request::put(path)
            .header("host", "arca")
            .header("content-length", length.to_string())
            .body(())
            .unwrap();
        (text, arca_node::listen::head_bytes(parsed.uri(), parsed.headers()))
    };
    let (held_head, held_head_bytes) = head("/v1/secret/data/held", 250_000);
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(&http).unwrap();
            stream.write_all(format!("{held_head}\r\n").as_bytes()).unwrap();
            stream
        })
        .collect();
    let each = 250_000 + held_head_bytes as u64;
    eventually_sample(&server, "arca_listener_body_bytes{listener=\"http\"}", 4 * each);
    // Each listener has its own budget: gRPC requests are still served.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = arca_client::RawClient::connect(server.addr.clone()).await.unwrap();
        client.status(arca_client::proto::Empty {}).await.unwrap();
    });
    drop(runtime);
    // A fifth, of 60,000 bytes, does not fit in what is left (48,128 bytes less the heads): 503
    // at once, with Retry-After, audited.
    let body = format!(r#"{{"data":{{"k":"{}"}}}}"#, "v".repeat(60_000 - 17));
    assert_eq!(body.len(), 60_000);
    let fifth = format!("{}Connection: close\r\n\r\n{body}", head("/v1/secret/data/more", body.len()).0);
    let fifth = fifth.as_bytes();
    let (_, reply) = closed_after(&http, fifth, Duration::from_secs(15));
    let reply = String::from_utf8_lossy(&reply).to_ascii_lowercase();
    assert!(reply.starts_with("http/1.1 503"), "{reply}");
    assert!(reply.contains("\r\nretry-after: 1\r\n"), "{reply}");
    assert!(
        reply.contains("as many request bodies on this listener as it holds at once (1048576 bytes)"),
        "{reply}"
    );
    assert!(reply.contains("\r\nx-arca-audit-position: "), "the refusal is audited: {reply}");
    assert_eq!(sample(&server.metrics(), "arca_listener_body_refused_total{listener=\"http\"}"), 1);
    // One client goes away: what it held comes back, and the same request is no longer
    // refused for its body (the node is sealed, so it is refused for that instead).
    drop(held.pop());
    eventually_sample(&server, "arca_listener_body_bytes{listener=\"http\"}", 3 * each);
    let (_, reply) = closed_after(&http, fifth, Duration::from_secs(15));
    let reply = String::from_utf8_lossy(&reply).to_ascii_lowercase();
    assert!(!reply.contains("request bodies"), "{reply}");
    assert_eq!(sample(&server.metrics(), "arca_listener_body_refused_total{listener=\"http\"}"), 1);
    drop(held);
    eventually_sample(&server, "arca_listener_body_bytes{listener=\"http\"}", 0);
}

/// The `SETTINGS_MAX_CONCURRENT_STREAMS` a listener at `addr` announces to an HTTP/2 client
/// (prior knowledge, no TLS), read after one request has been answered.
async fn announced_max_streams(addr: &str, path: &str) -> usize {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(stream).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = tonic::codegen::http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    response.await.unwrap();
    let max = send.current_max_send_streams();
    driver.abort();
    max
}

#[test]
fn http_listeners_bound_streams_per_connection_and_request_heads() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "dangerous_plaintext = true\nmax_streams_per_connection = 3\n");
    let server = common::start_server(&config, &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (grpc, http) = runtime.block_on(async {
        (
            announced_max_streams(host_port(&server.addr), "/arca.v1.Arca/Status").await,
            announced_max_streams(host_port(&server.http), "/v1/sys/health").await,
        )
    });
    assert_eq!((grpc, http), (3, 3));
    // An HTTP/1 request head over 64 KiB is refused (431) and its connection closed; one just
    // under is served.
    let head = |filler: usize| {
        format!(
            "GET /v1/sys/health HTTP/1.1\r\nHost: arca\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
            "f".repeat(filler)
        )
    };
    let http = host_port(&server.http);
    let (_, reply) = closed_after(http, head(70 * 1024).as_bytes(), Duration::from_secs(15));
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let (_, reply) = closed_after(http, head(60 * 1024).as_bytes(), Duration::from_secs(15));
    let reply = String::from_utf8_lossy(&reply);
    assert!(!reply.starts_with("HTTP/1.1 431") && reply.starts_with("HTTP/1.1 "), "{reply}");
}

/// Initializes the node (one key share) and unseals it; returns the root token.
fn init_and_unseal(server: &Server) -> String {
    let mut calls = 0;
    let init = common::ok_json(
        server,
        None,
        &["operator", "init", "--key-shares", "1", "--key-threshold", "1"],
        &mut calls,
    );
    let share = init["unseal_keys"][0].as_str().unwrap().to_owned();
    common::ok_json(server, None, &["operator", "unseal", &share], &mut calls);
    init["root_token"].as_str().unwrap().to_owned()
}

/// A client that asks for a large reply and stops reading it, while it keeps sending a byte
/// now and then (so its connection is never silent): once the node's writes have waited the
/// idle timeout for it to take anything, the node closes the connection and counts it.
#[test]
fn a_client_that_stops_taking_its_reply_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        write_config(dir.path(), &format!("dangerous_plaintext = true\nidle_timeout_ms = {IDLE_MS}\n"));
    let server = common::start_server(&config, &[]);
    let http = host_port(&server.http).to_owned();
    let root = init_and_unseal(&server);
    // A secret of 60 KB (most of the 64 KiB a secret may hold): far more than the client's
    // receive buffer and the node's send buffer hold.
    let body = format!(r#"{{"data":{{"v":"{}"}}}}"#, "x".repeat(60_000));
    let put = format!(
        "PUT /v1/secret/data/big HTTP/1.1\r\nHost: arca\r\nX-Vault-Token: {root}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (_, reply) = closed_after(&http, put.as_bytes(), Duration::from_secs(15));
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));

    // On loopback the node's send buffer grows to megabytes with the 64 KiB segments: a small
    // MSS (which the node adopts) and receive buffer keep both small, as on a real network.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_tcp_mss(536).unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    socket.connect(&http.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let mut stream: TcpStream = socket.into();
    let request = format!("GET /v1/secret/data/big HTTP/1.1\r\nHost: arca\r\nX-Vault-Token: {root}\r\n\r\n");
    let before = timeouts(&server, "http", "write");
    // The node's writes cannot wait before the request is sent.
    let started = Instant::now();
    stream.write_all(request.as_bytes()).unwrap();
    // A byte of a next request every 200 ms, the reply never read: closed within the idle
    // timeout (and some), never kept open by the bytes the client sends.
    let mut closed = false;
    while started.elapsed() < Duration::from_millis(IDLE_MS * 6) {
        std::thread::sleep(Duration::from_millis(200));
        if stream.write_all(b"G").is_err() || timeouts(&server, "http", "write") > before {
            closed = true;
            break;
        }
    }
    assert!(closed, "a client that takes nothing kept its connection for {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_millis(IDLE_MS), "closed after {:?}", started.elapsed());
    common::wait_until("the write timeout is counted", Duration::from_secs(10), || {
        timeouts(&server, "http", "write") == before + 1
    });
}

/// Opens an HTTP/2 connection (prior knowledge) that gives the node no flow-control credit,
/// sends one request to `path` and reads its reply's head; its body can never come. Returns
/// how long after the connection began the node ended it.
async fn starved_h2_connection(addr: &str, path: &str) -> Duration {
    let began = Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) =
        h2::client::Builder::new().initial_window_size(0).handshake(stream).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = tonic::codegen::http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    // An empty message, framed as gRPC (the HTTP listener takes it as an empty body).
    body.send_data(tonic::codegen::Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    response.await.unwrap();
    // The driver runs until the node closes the connection.
    let _ = tokio::time::timeout(Duration::from_secs(30), driver).await.expect("the node never ended it");
    began.elapsed()
}

#[test]
fn connections_are_asked_to_close_at_their_age_and_cut_after_its_grace() {
    const AGE_MS: u64 = 1000;
    const GRACE_MS: u64 = 1500;
    let (age, grace) = (Duration::from_millis(AGE_MS), Duration::from_millis(GRACE_MS));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "dangerous_plaintext = true\nidle_timeout_ms = 30000\nmax_connection_age_ms = {AGE_MS}\n\
             max_connection_age_grace_ms = {GRACE_MS}\n"
        ),
    );
    let server = common::start_server(&config, &[]);
    let (http, grpc) = (host_port(&server.http).to_owned(), host_port(&server.addr).to_owned());

    // An HTTP/1 connection kept alive after its reply: closed at its age, not cut.
    let began = Instant::now();
    let mut stream = TcpStream::connect(&http).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: arca\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    let took = began.elapsed();
    assert!(reply.starts_with(b"HTTP/1.1 "), "{}", String::from_utf8_lossy(&reply));
    assert!(took >= age && took < age + grace, "closed after {took:?}");

    // A gRPC client's connection is asked to close at its age (GOAWAY) and closes; the
    // client's next call opens another, unaware.
    let accepted = || sample(&server.metrics(), "arca_listener_accepted_total{listener=\"grpc\"}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut client = runtime.block_on(async {
        let mut client = arca_client::RawClient::connect(server.addr.clone()).await.unwrap();
        client.status(arca_client::proto::Empty {}).await.unwrap();
        client
    });
    let first = accepted();
    common::wait_until("the client's connection closed at its age", Duration::from_secs(15), || {
        sample(&server.metrics(), "arca_listener_connections{listener=\"grpc\"}") == 0
    });
    runtime.block_on(client.status(arca_client::proto::Empty {})).unwrap();
    assert_eq!(accepted(), first + 1, "the next call opened a connection");
    drop(client);
    for listener in ["http", "grpc"] {
        assert_eq!(timeouts(&server, listener, "connection_age"), 0, "{listener}: nothing was cut yet");
    }

    // An HTTP/2 reply its client gives no flow-control credit never finishes: the connection
    // is cut after its age and grace, on both listeners, and counted.
    for (listener, addr, path) in [("http", &http, "/v1/sys/health"), ("grpc", &grpc, "/arca.v1.Arca/Status")]
    {
        let took = runtime.block_on(starved_h2_connection(addr, path));
        assert!(took >= age + grace, "{listener}: cut after {took:?}");
        common::wait_until("the cut is counted", Duration::from_secs(10), || {
            timeouts(&server, listener, "connection_age") == 1
        });
    }
}

/// The SDK rides through connection recycling: with every connection asked to close after
/// 200 ms, concurrent writes and reads for three seconds. A request that hyper dropped before
/// sending it (its connection got GOAWAY first) is sent again, even a write, and a read is
/// retried on any transport error: no read fails. A write that meets the HTTP/2 layer's
/// GOAWAY error may have been served, so it fails, and says so (`is_maybe_committed`).
#[test]
fn the_sdk_goes_through_connection_recycling() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "dangerous_plaintext = true\nidle_timeout_ms = 30000\nmax_connection_age_ms = 200\n\
         max_connection_age_grace_ms = 5000\n",
    );
    let server = common::start_server(&config, &[]);
    let root = init_and_unseal(&server);
    let accepted = || sample(&server.metrics(), "arca_listener_accepted_total{listener=\"grpc\"}");
    let before = accepted();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (done, maybe, failed) = runtime.block_on(async {
        let config = arca_client::Config::new(&server.addr).unwrap().auth(arca_client::Auth::token(root));
        let client = arca_client::Client::connect(config).await.unwrap();
        let started = Instant::now();
        let (mut done, mut maybe, mut failed) = (0, 0, Vec::new());
        while started.elapsed() < Duration::from_secs(3) {
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let path = format!("secret/app/k{i}");
                        if let Err(err) = client.write(&path, [("n", done.to_string())]).await {
                            return Err(("write", err));
                        }
                        client.read(&path).await.map_err(|err| ("read", err))
                    })
                })
                .collect();
            for task in tasks {
                match task.await.unwrap() {
                    Ok(_) => done += 1,
                    Err(("write", err)) if err.is_maybe_committed() => maybe += 1,
                    Err((what, err)) => failed.push(format!("{what}: {:?}: {err}", err.kind())),
                }
            }
        }
        (done, maybe, failed)
    });
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        done + maybe + failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Most calls went through: a write is refused only when it meets a GOAWAY.
    assert!(maybe * 20 < done, "{maybe} writes maybe committed against {done} calls served");
    assert!(accepted() >= before + 5, "the connections were recycled meanwhile");
}
