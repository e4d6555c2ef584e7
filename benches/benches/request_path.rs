//! The in-process request path: policy evaluation, barrier encryption and decryption, audit
//! event encoding — and a whole audited read through the node (group commit, fsync'd
//! SQLite), one at a time and 64 concurrent.
//!
//! `cargo bench -p arca-benches --bench request_path`

use std::hint::black_box;

use arca_node::barrier::{self, Barrier};
use arca_node::kv::SecretData;
use arca_node::policy::{self, Capability};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn policy_text() -> String {
    let mut text = String::new();
    for team in ["billing", "search", "payments", "identity", "ads", "infra", "data", "ml", "web", "mobile"] {
        text.push_str(&format!("path \"secret/data/{team}/*\" {{ capabilities = [\"read\", \"list\"] }}\n"));
        text.push_str(&format!("path \"secret/data/{team}/admin/+\" {{ capabilities = [\"deny\"] }}\n"));
    }
    text
}

fn pieces(c: &mut Criterion) {
    let init = barrier::initialize(1, 1, 0).expect("init");
    let barrier = Barrier::default();
    barrier.install(init.unseal, init.root, init.keyring);
    let plaintext = vec![0x42u8; 1024];
    let aad = b"kv/secret/payments/stripe/7";
    let ciphertext = barrier.encrypt(&plaintext, aad).expect("encrypt");
    let policy = policy::parse(&policy_text()).expect("policy");
    let ev = arca_benches::sample_event(0);

    let mut group = c.benchmark_group("request_path");
    group.throughput(Throughput::Elements(1));
    group.bench_function("barrier_encrypt_1KiB", |b| {
        b.iter(|| barrier.encrypt(black_box(&plaintext), aad).expect("encrypt"))
    });
    group.bench_function("barrier_decrypt_1KiB", |b| {
        b.iter(|| barrier.decrypt(black_box(&ciphertext), aad).expect("decrypt"))
    });
    group.bench_function("policy_evaluate_20_rules", |b| {
        b.iter(|| policy::allows([&policy], black_box("secret/data/payments/stripe"), Capability::Read))
    });
    group.bench_function("audit_event_encode", |b| b.iter(|| black_box(&ev).encode()));
    group.bench_function("policy_check_decrypt_encode", |b| {
        b.iter(|| {
            assert!(policy::allows([&policy], "secret/data/payments/stripe", Capability::Read));
            let plain = barrier.decrypt(&ciphertext, aad).expect("decrypt");
            black_box((plain, ev.encode()))
        })
    });
    group.finish();
}

fn audited_reads(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let arca_benches::BenchNode { node, root, .. } = arca_benches::bench_node(&rt, dir.path());
    let ctx = arca_benches::context;

    let mut group = c.benchmark_group("node");
    group.throughput(Throughput::Elements(1));
    group.bench_function("audited_read_sequential", |b| {
        b.iter(|| {
            rt.block_on(node.kv_read(ctx(Some(&root)), "secret".into(), "bench/db".into(), None))
                .result
                .expect("read")
        })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("audited_read_64_concurrent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let node = node.clone();
                        let root = root.clone();
                        tokio::spawn(async move {
                            node.kv_read(ctx(Some(&root)), "secret".into(), "bench/db".into(), None)
                                .await
                                .result
                                .expect("read")
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("task");
                }
            })
        })
    });
    group.finish();

    // The same read through the transports, in process: gRPC (the tonic service called
    // directly) and the Vault HTTP API (the axum router, no socket).
    let grpc = arca_node::grpc::Service::new(node.clone(), Default::default());
    let router = arca_node::http::router(node.clone(), Default::default(), &Default::default());
    let mut group = c.benchmark_group("transport");
    group.throughput(Throughput::Elements(1));
    group.bench_function("grpc_kv_get_in_process", |b| {
        use arca_node::proto::arca_server::Arca as _;
        b.iter(|| {
            rt.block_on(async {
                let mut request = tonic::Request::new(arca_node::proto::KvGetRequest {
                    path: "bench/db".into(),
                    ..Default::default()
                });
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {root}").parse().expect("header"));
                grpc.kv_get(request).await.expect("grpc read")
            })
        })
    });
    group.bench_function("http_vault_get_in_process", |b| {
        use tower::ServiceExt as _;
        b.iter(|| {
            rt.block_on(async {
                let request = axum::http::Request::get("/v1/secret/data/bench/db")
                    .header("x-vault-token", root.as_str())
                    .body(axum::body::Body::empty())
                    .expect("request");
                let response = router.clone().oneshot(request).await.expect("http read");
                assert_eq!(response.status(), 200);
            })
        })
    });
    group.finish();

    // Proof generation from the store's tiles, after sequencing everything written so far.
    rt.block_on(async {
        for i in 0..2000 {
            let data = [("password", i.to_string())].into_iter().collect::<SecretData>();
            node.kv_write(ctx(Some(&root)), "secret".into(), format!("bench/p{}", i % 50), data, None)
                .await
                .result
                .expect("write");
        }
    });
    while arca_node::sequencer::integrate(&node, "bench", &Default::default()).expect("integrate").is_some() {
    }
    let mut group = c.benchmark_group("audit_log");
    group.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    group.bench_function("inclusion_proof_from_tiles", |b| {
        b.iter(|| {
            i = (i + 7919) % 2000;
            node.audit_inclusion_proof(arca_node::sequencer::LeafRef::Index(i)).expect("proof")
        })
    });
    group.bench_function("consistency_proof_from_tiles", |b| {
        b.iter(|| node.audit_consistency_proof(1000, None).expect("proof"))
    });
    group.finish();
}

criterion_group!(benches, pieces, audited_reads);
criterion_main!(benches);
