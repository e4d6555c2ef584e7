//! `arca-bench`: a closed-loop load generator for arca's gRPC API or any Vault-compatible HTTP
//! API — so the same tool, the same requests and the same clock drive arca and OpenBao.
//!
//! ```text
//! arca-bench run --target http --addr http://127.0.0.1:8200 --token T --setup \
//!     --secrets 1000 --size 1024 --concurrency 16,64 --read-ratio 1.0 --duration 10 --warmup 2 \
//!     --label arca --json arca.json --svg arca.svg
//! arca-bench compare openbao.json arca.json
//! ```
//!
//! Each of `concurrency` workers holds one connection and sends one request at a time
//! (like wrk); latencies after the warm-up go into an HdrHistogram (µs).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::io::Write as _;

use arca_benches::http1;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "arca-bench", about = "load generator for arca (gRPC) and Vault-compatible HTTP APIs")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Target {
    /// arca's gRPC API.
    Grpc,
    /// A Vault-compatible HTTP API (arca or OpenBao), KV v2 at `secret/`.
    Http,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a load and report throughput and latency per concurrency.
    Run {
        #[arg(long, value_enum, default_value = "http")]
        target: Target,
        #[arg(long)]
        addr: String,
        #[arg(long, env = "ARCA_BENCH_TOKEN", hide_env_values = true)]
        token: String,
        /// Write the secrets first.
        #[arg(long)]
        setup: bool,
        #[arg(long, default_value_t = 1000)]
        secrets: usize,
        /// Secret value size, bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, value_delimiter = ',', default_value = "16")]
        concurrency: Vec<usize>,
        /// Fraction of reads (the rest are writes).
        #[arg(long, default_value_t = 1.0)]
        read_ratio: f64,
        /// Measured seconds per concurrency level.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Unmeasured seconds before each level.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value = "target")]
        label: String,
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Fail (exit 1) when more requests than this failed.
        #[arg(long)]
        max_errors: Option<u64>,
    },
    /// Compare result files side by side, in pairs (baseline, candidate), with ratios
    /// (candidate ÷ baseline); with several pairs (rounds), also the median ratio.
    Compare {
        #[arg(required = true, value_name = "BASELINE CANDIDATE")]
        files: Vec<PathBuf>,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One client connection.
enum Conn {
    /// HTTP/1.1 keep-alive ([`arca_benches::http1`]); reopened after an error or a close.
    Http {
        conn: Option<http1::Connection>,
        host: String,
        token: String,
        request: Vec<u8>,
    },
    Grpc {
        client: arca_node::proto::arca_client::ArcaClient<tonic::transport::Channel>,
        token: String,
    },
}

impl Conn {
    async fn open(target: Target, addr: &str, token: &str) -> Result<Conn, BoxError> {
        match target {
            Target::Http => {
                let host = addr.trim_start_matches("http://").trim_end_matches('/').to_owned();
                let conn = Some(http1::Connection::connect(&host).await?);
                Ok(Conn::Http { conn, host, token: token.to_owned(), request: Vec::with_capacity(4096) })
            }
            Target::Grpc => {
                let client = arca_node::proto::arca_client::ArcaClient::connect(addr.to_owned()).await?;
                Ok(Conn::Grpc { client, token: token.to_owned() })
            }
        }
    }

    async fn read(&mut self, path: &str) -> Result<(), BoxError> {
        match self {
            Conn::Http { conn, host, token, request } => {
                request.clear();
                let _ = write!(
                    request,
                    "GET /v1/secret/data/{path} HTTP/1.1\r\nhost: {host}\r\nx-vault-token: {token}\r\n\r\n"
                );
                round_trip(conn, host, request).await
            }
            Conn::Grpc { client, token } => {
                let mut request = tonic::Request::new(arca_node::proto::KvGetRequest {
                    path: path.to_owned(),
                    ..Default::default()
                });
                request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
                client.kv_get(request).await?;
                Ok(())
            }
        }
    }

    async fn write(&mut self, path: &str, value: &str) -> Result<(), BoxError> {
        match self {
            Conn::Http { conn, host, token, request } => {
                let body = serde_json::to_vec(&json!({"data": {"v": value}}))?;
                request.clear();
                let _ = write!(
                    request,
                    "POST /v1/secret/data/{path} HTTP/1.1\r\nhost: {host}\r\nx-vault-token: {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                request.extend_from_slice(&body);
                round_trip(conn, host, request).await
            }
            Conn::Grpc { client, token } => {
                let data = [("v".to_owned(), value.to_owned())].into();
                let mut request = tonic::Request::new(arca_node::proto::KvPutRequest {
                    path: path.to_owned(),
                    data,
                    ..Default::default()
                });
                request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
                client.kv_put(request).await?;
                Ok(())
            }
        }
    }
}

/// Sends `request` on `conn` (opening a connection first if the last one ended) and checks
/// the response's status; a failed exchange drops the connection.
async fn round_trip(
    conn: &mut Option<http1::Connection>,
    host: &str,
    request: &[u8],
) -> Result<(), BoxError> {
    let mut open = match conn.take() {
        Some(open) if open.is_reusable() => open,
        _ => http1::Connection::connect(host).await?,
    };
    let response = open.round_trip(request).await?;
    *conn = Some(open);
    if !(200..300).contains(&response.status) {
        return Err(
            format!("HTTP {}: {}", response.status, String::from_utf8_lossy(&response.body_start)).into()
        );
    }
    Ok(())
}

/// xorshift64*: a fast, `Send` generator for picking secrets (not for anything secret).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn secret_path(i: usize) -> String {
    format!("bench/s{i}")
}

struct Level {
    concurrency: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    hist: Histogram<u64>,
}

async fn run_level(
    target: Target,
    addr: &str,
    token: &str,
    cfg: &RunCfg,
    concurrency: usize,
) -> Result<Level, BoxError> {
    let start = Instant::now();
    let warm_until = start + Duration::from_secs_f64(cfg.warmup);
    let stop_at = warm_until + Duration::from_secs_f64(cfg.duration);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut conn = Conn::open(target, addr, token).await?;
        let (secrets, read_ratio, value) = (cfg.secrets, cfg.read_ratio, "x".repeat(cfg.size));
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut requests, mut errors) = (0u64, 0u64);
            let mut rng = XorShift(rand::random::<u64>() | 1);
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                let path = secret_path((rng.next() % secrets as u64) as usize);
                let outcome = if ((rng.next() >> 11) as f64 / (1u64 << 53) as f64) < read_ratio {
                    conn.read(&path).await
                } else {
                    conn.write(&path, &value).await
                };
                if now >= warm_until {
                    requests += 1;
                    match outcome {
                        Ok(()) => {
                            let _ = hist.record(now.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, requests, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors) = (0, 0);
    for worker in workers {
        let (h, r, e) = worker.await?;
        hist.add(h)?;
        requests += r;
        errors += e;
    }
    Ok(Level { concurrency, requests, errors, seconds: cfg.duration, hist })
}

struct RunCfg {
    secrets: usize,
    size: usize,
    read_ratio: f64,
    duration: f64,
    warmup: f64,
}

fn level_json(level: &Level, read_ratio: f64) -> Value {
    let h = &level.hist;
    let ok = level.requests - level.errors;
    let cdf: Vec<Value> = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0]
        .iter()
        .map(|q| json!([q, h.value_at_quantile(*q)]))
        .collect();
    json!({
        "concurrency": level.concurrency, "read_ratio": read_ratio, "requests": level.requests, "errors": level.errors,
        "throughput_per_s": ok as f64 / level.seconds, "p50_us": h.value_at_quantile(0.5), "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99), "p999_us": h.value_at_quantile(0.999), "max_us": h.max(), "cdf_us": cdf,
    })
}

/// A small self-contained SVG: throughput per concurrency, and each level's latency CDF.
fn svg(label: &str, results: &[Value]) -> String {
    let (w, h) = (720.0, 300.0);
    let max_tp = results.iter().filter_map(|r| r["throughput_per_s"].as_f64()).fold(1.0, f64::max);
    let max_lat = results.iter().filter_map(|r| r["p999_us"].as_u64()).max().unwrap_or(1).max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    out.push_str(&format!(r#"<text x="10" y="16" font-size="13">{label}: throughput by concurrency (left), latency CDF (right)</text>"#));
    let bar_w = 300.0 / results.len().max(1) as f64;
    for (i, r) in results.iter().enumerate() {
        let tp = r["throughput_per_s"].as_f64().unwrap_or(0.0);
        let bh = 230.0 * tp / max_tp;
        let x = 20.0 + i as f64 * bar_w;
        out.push_str(&format!(
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#4477aa"/>"##,
            270.0 - bh,
            bar_w * 0.7
        ));
        out.push_str(&format!(r#"<text x="{x:.1}" y="285">c={} {:.0}/s</text>"#, r["concurrency"], tp));
    }
    let colors = ["#cc6677", "#117733", "#882255", "#ddcc77", "#332288"];
    for (i, r) in results.iter().enumerate() {
        let points: Vec<String> = r["cdf_us"]
            .as_array()
            .map(|cdf| {
                cdf.iter()
                    .map(|p| {
                        let (q, v) = (p[0].as_f64().unwrap_or(0.0), p[1].as_f64().unwrap_or(0.0));
                        format!("{:.1},{:.1}", 380.0 + 320.0 * (v / max_lat), 270.0 - 230.0 * q)
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&format!(
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            colors[i % colors.len()],
            points.join(" ")
        ));
        out.push_str(&format!(
            r#"<text x="620" y="{}" fill="{}">c={}</text>"#,
            40 + 14 * i,
            colors[i % colors.len()],
            r["concurrency"]
        ));
    }
    out.push_str(&format!(r#"<text x="380" y="285">latency 0 … {:.1} ms</text></svg>"#, max_lat / 1000.0));
    out
}

#[allow(clippy::too_many_arguments)]
async fn run(
    target: Target,
    addr: String,
    token: String,
    setup: bool,
    cfg: RunCfg,
    levels: Vec<usize>,
    label: String,
    json_out: Option<PathBuf>,
    svg_out: Option<PathBuf>,
    max_errors: Option<u64>,
) -> Result<(), BoxError> {
    if setup {
        let value = "x".repeat(cfg.size);
        let mut conns = Vec::new();
        for _ in 0..8 {
            conns.push(Conn::open(target, &addr, &token).await?);
        }
        let per = cfg.secrets.div_ceil(8);
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(w, mut conn)| {
                let value = value.clone();
                let total = cfg.secrets;
                tokio::spawn(async move {
                    for i in (w * per)..((w + 1) * per).min(total) {
                        conn.write(&secret_path(i), &value).await?;
                    }
                    Ok::<_, BoxError>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        eprintln!("{label}: wrote {} secrets of {} bytes", cfg.secrets, cfg.size);
    }
    let mut results = Vec::new();
    for c in levels {
        let level = run_level(target, &addr, &token, &cfg, c).await?;
        let j = level_json(&level, cfg.read_ratio);
        println!(
            "{label}: c={c:<3} reads={:.0}% {:>9.0} req/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}",
            cfg.read_ratio * 100.0,
            j["throughput_per_s"].as_f64().unwrap_or(0.0),
            level.hist.value_at_quantile(0.5) as f64 / 1000.0,
            level.hist.value_at_quantile(0.9) as f64 / 1000.0,
            level.hist.value_at_quantile(0.99) as f64 / 1000.0,
            level.hist.value_at_quantile(0.999) as f64 / 1000.0,
            level.errors
        );
        results.push(j);
        if let Some(max) = max_errors
            && level.errors > max
        {
            return Err(format!(
                "{label}: {} requests failed at concurrency {c} (allowed: {max})",
                level.errors
            )
            .into());
        }
    }
    if let Some(path) = svg_out {
        std::fs::write(path, svg(&label, &results))?;
    }
    if let Some(path) = json_out {
        let doc = json!({"label": label, "target": format!("{target:?}").to_lowercase(), "secrets": cfg.secrets, "size": cfg.size, "results": results});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

/// Prints result files side by side, in pairs (baseline, candidate), with each pair's ratios
/// (candidate ÷ baseline) per load; with several pairs (rounds of the same comparison), also the
/// median ratio and its range, so that one slow moment of a shared machine does not decide it.
fn compare(files: &[PathBuf]) -> Result<(), BoxError> {
    if files.is_empty() || !files.len().is_multiple_of(2) {
        return Err("compare takes result files in pairs: BASELINE CANDIDATE [BASELINE CANDIDATE …]".into());
    }
    let docs = files
        .iter()
        .map(|file| Ok(serde_json::from_slice::<Value>(&std::fs::read(file)?)?))
        .collect::<Result<Vec<_>, BoxError>>()?;
    let pairs: Vec<(&Value, &Value)> = docs.chunks(2).map(|pair| (&pair[0], &pair[1])).collect();
    let label = |doc: &Value, default: &'static str| doc["label"].as_str().unwrap_or(default).to_owned();
    let (la, lb) = (label(pairs[0].0, "baseline"), label(pairs[0].1, "candidate"));
    let empty = Vec::new();
    let results = |doc: &Value| doc["results"].as_array().unwrap_or(&empty).clone();
    let num = |r: &Value, key: &str| r[key].as_f64().unwrap_or(0.0);
    println!(
        "{:<10} {:>5} {:>4} {:>6} {:>11} {:>9} {:>9} {:>9}",
        "system", "round", "conc", "reads", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for level in results(pairs[0].0) {
        let same =
            |r: &&Value| r["concurrency"] == level["concurrency"] && r["read_ratio"] == level["read_ratio"];
        let (mut ratios, mut tails) = (Vec::new(), Vec::new());
        for (round, (a, b)) in pairs.iter().enumerate() {
            let (ra, rb) = (results(a), results(b));
            let (Some(ra), Some(rb)) = (ra.iter().find(same), rb.iter().find(same)) else {
                continue;
            };
            for (label, r) in [(&la, ra), (&lb, rb)] {
                println!(
                    "{label:<10} {:>5} {:>4} {:>5.0}% {:>11.0} {:>9.2} {:>9.2} {:>9}",
                    round + 1,
                    r["concurrency"],
                    num(r, "read_ratio") * 100.0,
                    num(r, "throughput_per_s"),
                    num(r, "p50_us") / 1000.0,
                    num(r, "p99_us") / 1000.0,
                    r["errors"]
                );
            }
            ratios.push(num(rb, "throughput_per_s") / num(ra, "throughput_per_s").max(1e-9));
            tails.push(num(rb, "p99_us") / num(ra, "p50_us").max(1e-9));
        }
        let (Some(ratio), Some(tail)) = (median(&ratios), median(&tails)) else {
            continue;
        };
        if ratios.len() == 1 {
            println!("  ratio {lb}/{la}: throughput ×{ratio:.2}; {lb} p99 is {tail:.2}× {la} p50\n");
        } else {
            let list = |xs: &[f64], prefix: &str| {
                xs.iter().map(|x| format!("{prefix}{x:.2}")).collect::<Vec<_>>().join(" ")
            };
            println!(
                "  ratio {lb}/{la} over {} rounds: throughput median ×{ratio:.2} ({}); {lb} p99 is median {tail:.2}× {la} p50 ({})\n",
                ratios.len(),
                list(&ratios, "×"),
                list(&tails, "")
            );
        }
    }
    Ok(())
}

/// The median of `xs` (the mean of the middle two for an even count); `None` when empty.
fn median(xs: &[f64]) -> Option<f64> {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if !n.is_multiple_of(2) => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run {
            target,
            addr,
            token,
            setup,
            secrets,
            size,
            concurrency,
            read_ratio,
            duration,
            warmup,
            label,
            json,
            svg,
            max_errors,
        } => {
            if !(0.0..=1.0).contains(&read_ratio) || secrets == 0 || concurrency.contains(&0) {
                eprintln!("arca-bench: read-ratio in 0..=1, secrets and concurrency at least 1");
                return std::process::ExitCode::from(2);
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
            let cfg = RunCfg { secrets, size, read_ratio, duration, warmup };
            rt.block_on(run(target, addr, token, setup, cfg, concurrency, label, json, svg, max_errors))
        }
        Cmd::Compare { files } => compare(&files),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("arca-bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
