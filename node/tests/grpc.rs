//! The gRPC surface in process: TLS and mutual TLS, the trusted-proxy header, request size
//! limits, malformed protobuf and unknown methods (refused by tonic, audited all the same),
//! and secret values of any JSON type (`json_keys`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use arca_audit::{Event, Operation, Outcome};
use arca_node::grpc::{
    AUDIT_POSITION_HEADER, ProxyConfig, REQUEST_ID_HEADER, WRAP_CREATION_PATH_HEADER, WRAP_TOKEN_HEADER,
    WRAP_TTL_HEADER, WRAP_TTL_SECS_HEADER,
};
use arca_node::listen::Limits;
use arca_node::node::{Node, NodeIdentity, RequestContext};
use arca_node::proto;
use arca_node::proto::arca_client::ArcaClient;
use arca_node::server::{ServeOptions, TlsFiles, serve_listener};
use arca_store::{RangeOptions, SqliteConfig, SqliteStore, Store, StoreExt, prefix_end};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};

struct Running {
    addr: SocketAddr,
    node: Arc<Node>,
    store: Arc<dyn Store>,
    root: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn run(proxy: ProxyConfig, tls: Option<TlsFiles>) -> Running {
    run_with(proxy, tls, Limits::default()).await
}

async fn run_with(proxy: ProxyConfig, tls: Option<TlsFiles>, limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("a.db"))).unwrap());
    let node = Node::new(
        store.clone(),
        NodeIdentity { cluster: "t".into(), region: "local".into(), node: "n".into() },
    );
    let ctx = RequestContext::new(None, arca_audit::Source { address: "test".into(), proxy: None });
    let root = node.operator_init(ctx, 1, 1).await.result.unwrap().root_token.token.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions { grpc_addr: addr, tls, http_addr: None, proxy, replication: None, limits };
    tokio::spawn(serve_listener(node.clone(), listener, opts, async move {
        let _ = stopped.await;
    }));
    Running { addr, node, store, root, _stop: stop, _dir: dir }
}

async fn plain_client(addr: SocketAddr) -> ArcaClient<Channel> {
    // connect() completes once the server accepts: no sleeping for readiness.
    ArcaClient::connect(format!("http://{addr}")).await.unwrap()
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn events(store: &dyn Store) -> Vec<Event> {
    let prefix = arca_node::keys::audit_events("local");
    let rows = store
        .transact(|tx| tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default()))
        .unwrap()
        .value;
    rows.iter().map(|kv| Event::decode(&kv.value).unwrap()).collect()
}

#[derive(Clone, PartialEq, prost::Message)]
struct WrongShape {
    /// `KvPutRequest.path` is a string; send a varint in its place.
    #[prost(uint64, tag = "2")]
    path: u64,
}

/// The request tonic refused is in the audit log: a `rejected` event for the gRPC method,
/// naming the caller, whose request id and durable position the refusal carried.
fn assert_refusal_audited(store: &dyn Store, status: &tonic::Status, method: &str, entity: &str) {
    let event = events(store).pop().expect("an audit event");
    assert_eq!(event.operation, Operation::Rejected, "{event:?}");
    assert_eq!(event.path, method);
    assert_eq!(event.outcome, Outcome::Error { code: "invalid_argument".into() });
    assert_eq!(event.actor.entity, entity);
    assert!(event.source.address.starts_with("127.0.0.1:"), "{:?}", event.source);
    let request_id = status.metadata().get(REQUEST_ID_HEADER).expect("the request id").to_str().unwrap();
    assert_eq!(event.request_id, request_id);
    let position =
        status.metadata().get(AUDIT_POSITION_HEADER).expect("the audit position").to_str().unwrap();
    let key = store
        .transact(|tx| {
            let prefix = arca_node::keys::audit_events("local");
            tx.get_range(&prefix, &prefix_end(&prefix).unwrap(), RangeOptions::default())
        })
        .unwrap()
        .value
        .pop()
        .unwrap()
        .key;
    assert!(hex::encode(&key).ends_with(position), "the position names the event's key");
}

#[tokio::test]
async fn malformed_protobuf_is_an_invalid_argument_and_audited() {
    let server = run(ProxyConfig::default(), None).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let before = events(server.store.as_ref()).len();
    let codec = tonic_prost::ProstCodec::<WrongShape, proto::KvWriteResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/arca.v1.Arca/KvPut");
    let status = grpc.unary(authed(WrongShape { path: 7 }, &server.root), path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("malformed request"), "{}", status.message());
    assert_eq!(events(server.store.as_ref()).len(), before + 1, "one event for the refused request");
    assert_refusal_audited(server.store.as_ref(), &status, "/arca.v1.Arca/KvPut", "root");
}

#[tokio::test]
async fn a_message_cut_short_is_an_invalid_argument_and_audited() {
    use tonic::codegen::Service as _;
    let server = run(ProxyConfig::default(), None).await;
    let mut channel =
        Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let before = events(server.store.as_ref()).len();
    // A gRPC frame that announces 5 bytes of message and carries 2 (tonic: INTERNAL).
    let request = tonic::codegen::http::Request::post(format!("http://{}/arca.v1.Arca/KvPut", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {}", server.root))
        .body(tonic::body::Body::new("\0\0\0\0\u{5}ab".to_owned()))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let response = channel.call(request).await.unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("a trailers-only refusal");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("malformed request"), "{}", status.message());
    assert_eq!(events(server.store.as_ref()).len(), before + 1, "one event for the refused request");
    assert_refusal_audited(server.store.as_ref(), &status, "/arca.v1.Arca/KvPut", "root");
}

/// A request body that sends its first bytes and then nothing, never ending.
struct Stalled(Option<tonic::codegen::Bytes>);

impl http_body::Body for Stalled {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.get_mut().0.take() {
            Some(bytes) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes)))),
            None => std::task::Poll::Pending,
        }
    }
}

#[tokio::test]
async fn a_request_body_that_never_ends_is_refused_after_the_body_timeout_and_audited() {
    use tonic::codegen::Service as _;
    let timeout = std::time::Duration::from_millis(500);
    let server =
        run_with(ProxyConfig::default(), None, Limits { body_timeout: timeout, ..Limits::default() }).await;
    let mut channel =
        Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let before = events(server.store.as_ref()).len();
    // A gRPC frame that announces 5 bytes of message, then 2 of them, then nothing.
    let body = Stalled(Some(tonic::codegen::Bytes::from_static(b"\0\0\0\0\x05ab")));
    let request = tonic::codegen::http::Request::post(format!("http://{}/arca.v1.Arca/KvPut", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {}", server.root))
        .body(tonic::body::Body::new(body))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let sent = std::time::Instant::now();
    let response = tokio::time::timeout(std::time::Duration::from_secs(15), channel.call(request))
        .await
        .expect("refused before the test's own deadline")
        .unwrap();
    assert!(sent.elapsed() >= timeout, "refused after {:?}", sent.elapsed());
    let status = tonic::Status::from_header_map(response.headers()).expect("a trailers-only refusal");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("did not arrive within 0.5 s"), "{}", status.message());
    assert_eq!(events(server.store.as_ref()).len(), before + 1, "one event for the refused request");
    assert_refusal_audited(server.store.as_ref(), &status, "/arca.v1.Arca/KvPut", "root");
}

/// A KvPut whose gRPC frame announces a message of `len` bytes and sends all but its last
/// byte, then nothing: the node holds what arrived until the body times out or is dropped.
fn stalled_put(server: &Running, len: usize) -> tonic::codegen::http::Request<tonic::body::Body> {
    let mut frame = vec![b'x'; 5 + len - 1];
    frame[0] = 0;
    frame[1..5].copy_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
    tonic::codegen::http::Request::post(format!("http://{}/arca.v1.Arca/KvPut", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {}", server.root))
        .body(tonic::body::Body::new(Stalled(Some(frame.into()))))
        .unwrap()
}

#[tokio::test]
async fn request_bodies_past_the_nodes_budget_are_refused_audited_and_their_bytes_given_back() {
    use tonic::codegen::Service as _;
    let limits = Limits { max_body_bytes_in_flight: 1 << 20, ..Limits::default() };
    let server = run_with(ProxyConfig::default(), None, limits).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let stats = server.node.metrics().listener("grpc");
    let budget = stats.body();
    assert_eq!(budget.limit(), 1 << 20);
    // Four bodies of nearly 250 KiB each, never finished: the node holds them.
    let each = 5 + 250 * 1024 - 1;
    let held: Vec<_> = (0..4)
        .map(|_| {
            let (mut channel, request) = (channel.clone(), stalled_put(&server, 250 * 1024));
            tokio::spawn(async move {
                std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
                channel.call(request).await
            })
        })
        .collect();
    // Their heads are charged too (a few hundred bytes each).
    let within = std::time::Duration::from_secs(15);
    common::eventually("the four bodies held", within, || std::future::ready(budget.held() >= 4 * each))
        .await;
    let before = events(server.store.as_ref()).len();
    // A fifth of 100 KiB does not fit in what is left (24 KiB): refused at once, audited.
    let mut fifth = channel.clone();
    std::future::poll_fn(|cx| fifth.poll_ready(cx)).await.unwrap();
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        fifth.call(stalled_put(&server, 100 * 1024)),
    )
    .await
    .expect("refused at once, not after the body timeout")
    .unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("a trailers-only refusal");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("as many request bodies on this listener as it holds at once (1048576 bytes)"),
        "{}",
        status.message()
    );
    assert_eq!(budget.refused(), 1);
    // Had the refused body kept what it took (its first DATA frame of 16 KiB fitted), the
    // budget would hold that much more than the four.
    let held_now = budget.held();
    assert!(
        (4 * each..4 * each + 4096).contains(&held_now),
        "the refused body's bytes were given back: {held_now}"
    );
    assert_eq!(events(server.store.as_ref()).len(), before + 1, "one event for the refused request");
    assert_refusal_audited(server.store.as_ref(), &status, "/arca.v1.Arca/KvPut", "root");
    // The clients give up: every byte held comes back.
    for request in &held {
        request.abort();
    }
    common::eventually("the budget given back", within, || std::future::ready(budget.held() == 0)).await;
    // And a request is served again.
    let mut client = plain_client(server.addr).await;
    let put = proto::KvPutRequest {
        path: "after".into(),
        data: [("v".to_owned(), "x".repeat(60 * 1024))].into(),
        ..Default::default()
    };
    client.kv_put(authed(put, &server.root)).await.unwrap();
    assert_eq!(budget.refused(), 1);
}

#[tokio::test]
async fn oversized_requests_are_refused_audited_and_change_nothing() {
    let server = run(ProxyConfig::default(), None).await;
    let mut client = plain_client(server.addr).await;
    let before = events(server.store.as_ref()).len();
    let huge = proto::KvPutRequest {
        mount: String::new(),
        path: "big".into(),
        data: [("v".to_owned(), "x".repeat(300 * 1024))].into(),
        cas: None,
        json_keys: Vec::new(),
    };
    let status = client.kv_put(authed(huge, &server.root)).await.unwrap_err();
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted), "{status:?}");
    assert_eq!(events(server.store.as_ref()).len(), before + 1, "the refused put is audited");
    assert_refusal_audited(server.store.as_ref(), &status, "/arca.v1.Arca/KvPut", "root");
    let get = client
        .kv_get(authed(proto::KvGetRequest { path: "big".into(), ..Default::default() }, &server.root))
        .await;
    assert_eq!(get.unwrap_err().code(), Code::NotFound, "the refused put wrote nothing");
    assert_eq!(events(server.store.as_ref()).len(), before + 2);
}

#[tokio::test]
async fn unknown_methods_and_services_are_unimplemented_and_audited_without_trusting_the_token() {
    let server = run(ProxyConfig::default(), None).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let codec = tonic_prost::ProstCodec::<proto::Empty, proto::Empty>::default();
    let method = "/arca.v1.Arca/NoSuchMethod";
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let status = grpc.unary(authed(proto::Empty {}, "not-a-token"), path, codec.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_refusal_audited(server.store.as_ref(), &status, method, "anonymous");
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let status = grpc.unary(authed(proto::Empty {}, &server.root), path, codec.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_refusal_audited(server.store.as_ref(), &status, method, "root");
    // A service the listener does not serve at all.
    let other = "/grpc.health.v1.Health/Check";
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(other);
    let status = grpc.unary(authed(proto::Empty {}, &server.root), path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_refusal_audited(server.store.as_ref(), &status, other, "root");
}

/// `message` with the root token and a wrap TTL.
fn wrapping<T>(message: T, token: &str, ttl: &str) -> Request<T> {
    let mut request = authed(message, token);
    request.metadata_mut().insert(WRAP_TTL_HEADER, ttl.parse().unwrap());
    request
}

fn header<T>(response: &tonic::Response<T>, name: &str) -> String {
    response.metadata().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn any_answer_may_be_wrapped_and_is_unwrapped_once() {
    use prost::Message as _;
    let server = run(ProxyConfig::default(), None).await;
    let mut client = plain_client(server.addr).await;
    let put = proto::KvPutRequest {
        path: "app/db".into(),
        data: [("password".to_owned(), "wrapped-s3cret".to_owned())].into(),
        ..Default::default()
    };
    client.kv_put(authed(put, &server.root)).await.unwrap();
    let get = proto::KvGetRequest { path: "app/db".into(), ..Default::default() };
    let wrapped = client.kv_get(wrapping(get.clone(), &server.root, "5m")).await.unwrap();
    // The answer holds no secret: the method's empty message, and the token beside it.
    assert_eq!(wrapped.get_ref(), &proto::KvGetResponse::default());
    let token = header(&wrapped, WRAP_TOKEN_HEADER);
    assert!(token.starts_with("arcaw_"), "{token:?}");
    assert_eq!(header(&wrapped, WRAP_TTL_SECS_HEADER), "300");
    assert_eq!(header(&wrapped, WRAP_CREATION_PATH_HEADER), "/arca.v1.Arca/KvGet");
    // The read and its wrap share one request id: two events under it.
    let request_id = header(&wrapped, REQUEST_ID_HEADER);
    let under: Vec<Operation> = events(server.store.as_ref())
        .into_iter()
        .filter(|e| e.request_id == request_id)
        .map(|e| e.operation)
        .collect();
    assert_eq!(under, vec![Operation::KvRead, Operation::WrapCreate]);
    assert!(!header(&wrapped, AUDIT_POSITION_HEADER).is_empty());
    // Lookup, then one unwrap with the token alone; then it is gone.
    let looked = client.wrap_lookup(Request::new(proto::WrapToken { token: token.clone() })).await.unwrap();
    assert_eq!(looked.get_ref().creation_path, "/arca.v1.Arca/KvGet");
    assert_eq!(looked.get_ref().ttl_secs, 300);
    let unwrapped =
        client.unwrap(Request::new(proto::WrapToken { token: token.clone() })).await.unwrap().into_inner();
    assert_eq!(unwrapped.grpc_method, "/arca.v1.Arca/KvGet");
    let answer = proto::KvGetResponse::decode(unwrapped.message.as_slice()).unwrap();
    assert_eq!(answer.data.get("password").map(String::as_str), Some("wrapped-s3cret"));
    assert_eq!(answer.version, 1);
    let again = client.unwrap(Request::new(proto::WrapToken { token: token.clone() })).await.unwrap_err();
    assert_eq!(again.code(), Code::InvalidArgument, "single use: {again:?}");
    assert!(client.wrap_lookup(Request::new(proto::WrapToken { token })).await.is_err());
    // An error is answered as it is, not wrapped.
    let missing = proto::KvGetRequest { path: "app/none".into(), ..Default::default() };
    let status = client.kv_get(wrapping(missing, &server.root, "5m")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.metadata().get(WRAP_TOKEN_HEADER).is_none());
    // A TTL that is not a duration, or past 7 days, is refused, audited, and runs nothing.
    let before = events(server.store.as_ref()).len();
    let status = client.kv_get(wrapping(get.clone(), &server.root, "soon")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_refusal_audited(server.store.as_ref(), &status, "/arca.v1.Arca/KvGet", "root");
    assert_eq!(events(server.store.as_ref()).len(), before + 1, "the read did not run");
    // Past 7 days: refused before the call runs too, so a write it would wrap is not made.
    let before = events(server.store.as_ref()).len();
    let put_again = proto::KvPutRequest {
        path: "app/db".into(),
        data: [("password".to_owned(), "never-written".to_owned())].into(),
        ..Default::default()
    };
    let status = client.kv_put(wrapping(put_again, &server.root, "8d")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("1s to 7d"), "{status:?}");
    assert_refusal_audited(server.store.as_ref(), &status, "/arca.v1.Arca/KvPut", "root");
    assert_eq!(events(server.store.as_ref()).len(), before + 1, "the write did not run");
    let current = client.kv_get(authed(get.clone(), &server.root)).await.unwrap().into_inner();
    assert_eq!(
        (current.version, current.data.get("password").map(String::as_str)),
        (1, Some("wrapped-s3cret"))
    );
    // An AppRole secret id delivered wrapped, unwrapped by the application, used to log in.
    let role = proto::AppRoleWriteRequest {
        name: "web".into(),
        policies: vec!["default".into()],
        ..Default::default()
    };
    client.app_role_write(authed(role, &server.root)).await.unwrap();
    let role_id = client
        .app_role_role_id(authed(proto::AppRoleName { name: "web".into() }, &server.root))
        .await
        .unwrap()
        .into_inner()
        .role_id;
    let wrapped = client
        .app_role_secret_id(wrapping(proto::AppRoleName { name: "web".into() }, &server.root, "60s"))
        .await
        .unwrap();
    assert!(wrapped.get_ref().secret_id.is_empty());
    let token = header(&wrapped, WRAP_TOKEN_HEADER);
    let unwrapped = client.unwrap(Request::new(proto::WrapToken { token })).await.unwrap().into_inner();
    let secret_id = proto::SecretIdResponse::decode(unwrapped.message.as_slice()).unwrap().secret_id;
    let login = proto::AppRoleLoginRequest { role_id, secret_id };
    assert!(
        client.app_role_login(Request::new(login)).await.unwrap().into_inner().token.starts_with("arca_")
    );
}

#[tokio::test]
async fn values_that_are_not_strings_travel_as_json_text_named_in_json_keys() {
    let server = run(ProxyConfig::default(), None).await;
    let mut client = plain_client(server.addr).await;
    let put = |data: &[(&str, &str)], json_keys: &[&str]| proto::KvPutRequest {
        path: "cfg".into(),
        data: data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        json_keys: json_keys.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    };
    let written = put(
        &[("user", "svc"), ("port", "5432"), ("pool", r#"{"max": 8, "hosts": ["a"]}"#)],
        &["port", "pool"],
    );
    client.kv_put(authed(written, &server.root)).await.unwrap();
    let get = || authed(proto::KvGetRequest { path: "cfg".into(), ..Default::default() }, &server.root);
    let got = client.kv_get(get()).await.unwrap().into_inner();
    let mut keys = got.json_keys.clone();
    keys.sort();
    assert_eq!(keys, ["pool", "port"], "a string is a string; the others are named");
    assert_eq!(
        (got.data["user"].as_str(), got.data["port"].as_str(), got.data["pool"].as_str()),
        ("svc", "5432", r#"{"hosts":["a"],"max":8}"#)
    );

    // A merge patch of one key; a JSON null removes another.
    let patch = proto::KvPatchRequest {
        path: "cfg".into(),
        set: [
            ("pool".to_owned(), r#"{"max": null, "min": 1}"#.to_owned()),
            ("port".to_owned(), "null".to_owned()),
        ]
        .into(),
        json_keys: vec!["pool".into(), "port".into()],
        ..Default::default()
    };
    assert_eq!(client.kv_patch(authed(patch, &server.root)).await.unwrap().into_inner().version, 2);
    let got = client.kv_get(get()).await.unwrap().into_inner();
    assert_eq!(got.data.len(), 2);
    assert_eq!(
        (got.data["pool"].as_str(), got.json_keys.as_slice()),
        (r#"{"hosts":["a"],"min":1}"#, &["pool".to_owned()][..])
    );

    // Refused, audited, and nothing written: text that is not JSON (the error names the key,
    // never the value), and a JSON key the data does not hold.
    for (request, message) in [
        (put(&[("token", "not-json-s3cr3t")], &["token"]), r#"the value of "token" is not valid JSON"#),
        (put(&[("user", "svc")], &["missing"]), r#"json_keys: "missing" is not a key of the data"#),
    ] {
        let before = events(server.store.as_ref()).len();
        let status = client.kv_put(authed(request, &server.root)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(message) && !status.message().contains("s3cr3t"), "{status:?}");
        let after = events(server.store.as_ref());
        assert_eq!(after.len(), before + 1, "one audit event");
        let event = &after[before];
        assert_eq!((event.operation, event.path.as_str()), (Operation::Rejected, "secret/data/cfg"));
        assert_eq!(event.outcome, Outcome::Error { code: "invalid_argument".into() });
    }
    assert_eq!(client.kv_get(get()).await.unwrap().into_inner().version, 2, "nothing was written");
}

#[tokio::test]
async fn replies_carry_the_audit_position_even_on_errors() {
    let server = run(ProxyConfig::default(), None).await;
    let mut client = plain_client(server.addr).await;
    let ok = client.status(Request::new(proto::Empty {})).await.unwrap();
    assert!(ok.metadata().get(AUDIT_POSITION_HEADER).is_some());
    let denied = client
        .kv_get(Request::new(proto::KvGetRequest { path: "x".into(), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    assert!(denied.metadata().get(AUDIT_POSITION_HEADER).is_some());
}

#[tokio::test]
async fn the_proxy_header_counts_only_from_trusted_proxies() {
    let header = "x-forwarded-for".to_owned();
    let trusted =
        run(ProxyConfig { header: Some(header.clone()), trusted: vec!["127.0.0.1".parse().unwrap()] }, None)
            .await;
    let untrusted =
        run(ProxyConfig { header: Some(header), trusted: vec!["10.9.9.9".parse().unwrap()] }, None).await;
    for server in [&trusted, &untrusted] {
        let mut client = plain_client(server.addr).await;
        let mut request = Request::new(proto::Empty {});
        request.metadata_mut().insert("x-forwarded-for", "203.0.113.9, 10.0.0.1".parse().unwrap());
        client.status(request).await.unwrap();
    }
    let via_proxy = events(trusted.store.as_ref()).pop().unwrap();
    assert_eq!(via_proxy.source.address, "203.0.113.9");
    assert!(via_proxy.source.proxy.unwrap().starts_with("127.0.0.1:"));
    let direct = events(untrusted.store.as_ref()).pop().unwrap();
    assert!(direct.source.address.starts_with("127.0.0.1:"), "an untrusted peer cannot name the client");
    assert_eq!(direct.source.proxy, None);
}

struct Pki {
    ca_pem: String,
    dir: tempfile::TempDir,
    client_cert: String,
    client_key: String,
}

fn pki() -> (Pki, TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&server_key, &ca).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert =
        CertificateParams::new(vec!["client".to_owned()]).unwrap().signed_by(&client_key, &ca).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        path
    };
    let files = TlsFiles {
        cert: write("server.crt", &server_cert.pem()),
        key: write("server.key", &server_key.serialize_pem()),
        client_ca: Some(write("ca.crt", &ca.pem())),
    };
    (
        Pki { ca_pem: ca.pem(), client_cert: client_cert.pem(), client_key: client_key.serialize_pem(), dir },
        files,
    )
}

async fn tls_client(
    addr: SocketAddr,
    pki: &Pki,
    with_cert: bool,
) -> Result<ArcaClient<Channel>, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    if with_cert {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    let channel =
        Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls)?.connect().await?;
    Ok(ArcaClient::new(channel))
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let (pki, mut files) = pki();
    let _keep = &pki.dir;
    files.client_ca = None;
    let tls_only = run(ProxyConfig::default(), Some(files.clone())).await;
    let mut client = tls_client(tls_only.addr, &pki, false).await.unwrap();
    assert!(client.status(Request::new(proto::Empty {})).await.unwrap().get_ref().initialized);
    // A plaintext client cannot talk to a TLS listener.
    let plain = Endpoint::from_shared(format!("http://{}", tls_only.addr)).unwrap().connect().await;
    if let Ok(channel) = plain {
        assert!(ArcaClient::new(channel).status(Request::new(proto::Empty {})).await.is_err());
    }

    let (pki, files) = self::pki();
    let mutual = run(ProxyConfig::default(), Some(files)).await;
    let mut with_cert = tls_client(mutual.addr, &pki, true).await.unwrap();
    assert!(with_cert.status(Request::new(proto::Empty {})).await.is_ok());
    let without = match tls_client(mutual.addr, &pki, false).await {
        Err(_) => true,
        Ok(mut client) => client.status(Request::new(proto::Empty {})).await.is_err(),
    };
    assert!(without, "mTLS must refuse a client without a certificate");

    // Certificate identity: before a role pins the certificate, login is a denial.
    let denied = with_cert.cert_login(Request::new(proto::Empty {})).await.unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    let role = proto::CertRoleWriteRequest {
        name: "web".into(),
        certificate_pem: pki.client_cert.clone(),
        policies: vec!["web".into()],
        token_ttl_secs: Some(600),
    };
    with_cert.cert_role_write(authed(role, &mutual.root)).await.unwrap();
    let policy = proto::PolicyWriteRequest {
        name: "web".into(),
        policy: r#"path "secret/data/web/*" { capabilities = ["read", "create"] }"#.into(),
    };
    with_cert.policy_write(authed(policy, &mutual.root)).await.unwrap();
    let login = with_cert.cert_login(Request::new(proto::Empty {})).await.unwrap().into_inner();
    assert_eq!(login.info.as_ref().unwrap().entity, "cert:web");
    let put = proto::KvPutRequest {
        path: "web/tls".into(),
        data: [("k".to_owned(), "v".to_owned())].into(),
        ..Default::default()
    };
    with_cert.kv_put(authed(put, &login.token)).await.unwrap();
    let other = proto::KvPutRequest {
        path: "ops/x".into(),
        data: [("k".to_owned(), "v".to_owned())].into(),
        ..Default::default()
    };
    assert_eq!(
        with_cert.kv_put(authed(other, &login.token)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let bad_pem = proto::CertRoleWriteRequest {
        name: "x".into(),
        certificate_pem: "not a pem".into(),
        ..Default::default()
    };
    assert_eq!(
        with_cert.cert_role_write(authed(bad_pem, &mutual.root)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A request tonic refuses over mutual TLS is audited with the TLS peer's address.
    let huge = proto::KvPutRequest {
        path: "web/big".into(),
        data: [("v".to_owned(), "x".repeat(300 * 1024))].into(),
        ..Default::default()
    };
    let status = with_cert.kv_put(authed(huge, &login.token)).await.unwrap_err();
    assert_refusal_audited(mutual.store.as_ref(), &status, "/arca.v1.Arca/KvPut", "cert:web");

    // Over plain TLS (no client certificate) the login is denied.
    let (pki2, mut files2) = self::pki();
    files2.client_ca = None;
    let no_mtls = run(ProxyConfig::default(), Some(files2)).await;
    let mut anon = tls_client(no_mtls.addr, &pki2, false).await.unwrap();
    assert_eq!(
        anon.cert_login(Request::new(proto::Empty {})).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}
