//! The workload: concurrent clients over the Vault-compatible HTTP API, each operation
//! recorded with its request id, its audit position, the node and region that answered,
//! its start and end times and its outcome — the history the checkers reason about.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::cluster::Timeline;
use crate::rng::Rng;

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(3000)))
        .build()
        .into()
}

/// A node as clients know it.
#[derive(Debug, Clone)]
pub struct Target {
    pub region: String,
    pub node: String,
    pub url: String,
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub request_id: Option<String>,
    pub position: Option<String>,
    pub body: Value,
}

/// One request; `Err` when no answer came (connection refused or reset, timeout).
pub fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> Result<Reply, String> {
    let response = match method {
        "GET" => agent.get(url).header("X-Vault-Token", token).call(),
        _ => agent
            .post(url)
            .header("X-Vault-Token", token)
            .header("Content-Type", "application/json")
            .send(body.unwrap_or(Value::Null).to_string()),
    };
    let mut r = response.map_err(|e| e.to_string())?;
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (request_id, position) = (header("x-arca-request-id"), header("x-arca-audit-position"));
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Ok(Reply { status, request_id, position, body: serde_json::from_str(&text).unwrap_or(Value::Null) })
}

/// One operation of the history.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub client: usize,
    pub kind: &'static str,
    pub path: String,
    /// The value written (writes) — a random token the log checker looks for.
    pub value: Option<String>,
    /// The version written, or deleted.
    pub version: Option<u64>,
    pub region: String,
    pub node: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// `None`: no answer (the outcome is unknown to the client).
    pub status: Option<u16>,
    pub request_id: Option<String>,
    pub position: Option<String>,
}

impl Op {
    pub fn acked(&self) -> bool {
        matches!(self.status, Some(200 | 204))
    }
}

/// The running workload.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    pub history: Arc<Mutex<Vec<Op>>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

pub const KEYS_PER_CLIENT: u64 = 12;

impl Workload {
    /// Starts `clients` clients. Each writes, rotates (a new version), deletes a version it
    /// wrote, reads its own and others' keys (from any node: standbys serve reads), and
    /// makes denied reads with `denied_token`. Writes go to the node that took the last
    /// write; on no answer or a refusal they move on to the next node.
    pub fn start(
        targets: Vec<Target>,
        root: String,
        denied_token: String,
        clients: usize,
        seed: u64,
        timeline: Arc<Timeline>,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let history: Arc<Mutex<Vec<Op>>> = Arc::default();
        let handles = (0..clients)
            .map(|c| {
                let (stop, history, targets, root, denied, t) = (
                    stop.clone(),
                    history.clone(),
                    targets.clone(),
                    root.clone(),
                    denied_token.clone(),
                    timeline.clone(),
                );
                std::thread::spawn(move || client(c, &targets, &root, &denied, seed, &stop, &history, &t))
            })
            .collect();
        Workload { stop, history, handles }
    }

    pub fn stop(self) -> Vec<Op> {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.join();
        }
        self.history.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[allow(clippy::too_many_arguments)]
fn client(
    c: usize,
    targets: &[Target],
    root: &str,
    denied: &str,
    seed: u64,
    stop: &AtomicBool,
    history: &Mutex<Vec<Op>>,
    t: &Timeline,
) {
    let agent = agent();
    let mut rng = Rng::new(seed.wrapping_mul(1000).wrapping_add(c as u64));
    let mut writer = c % targets.len().max(1);
    let reader = c % targets.len().max(1);
    // Versions this client wrote and still has, per key.
    let mut mine: Vec<Vec<u64>> = vec![Vec::new(); KEYS_PER_CLIENT as usize];
    while !stop.load(Ordering::Relaxed) {
        let roll = rng.below(100);
        let k = rng.below(KEYS_PER_CLIENT);
        let path = format!("chaos/c{c}/k{k}");
        let start_ms = t.ms();
        let mut op = Op {
            client: c,
            kind: "read",
            path: path.clone(),
            value: None,
            version: None,
            region: String::new(),
            node: String::new(),
            start_ms,
            end_ms: 0,
            status: None,
            request_id: None,
            position: None,
        };
        let (method, url_path, token, body, writes) = match roll {
            0..=34 => {
                let value = format!("chaosval-{}", rng.token(16));
                op.kind = if mine[k as usize].is_empty() { "write" } else { "rotate" };
                op.value = Some(value.clone());
                ("POST", format!("secret/data/{path}"), root, Some(json!({"data": {"v": value}})), true)
            }
            35..=41 if !mine[k as usize].is_empty() => {
                let versions = &mut mine[k as usize];
                let v = versions.remove(rng.below(versions.len() as u64) as usize);
                op.kind = "delete";
                op.version = Some(v);
                ("POST", format!("secret/delete/{path}"), root, Some(json!({"versions": [v]})), true)
            }
            42..=51 => {
                op.kind = "denied";
                ("GET", format!("secret/data/{path}"), denied, None, false)
            }
            _ => {
                // Someone's key, from this client's read node (a standby's reads are stale by the lag).
                let other = rng.below(8);
                op.path = format!("chaos/c{other}/k{k}");
                ("GET", format!("secret/data/{}", op.path), root, None, false)
            }
        };
        // Writes: the last node that took one, then the others in turn; reads: the reader node.
        let order: Vec<usize> = if writes {
            (0..targets.len()).map(|i| (writer + i) % targets.len()).collect()
        } else {
            vec![reader]
        };
        // Every attempt is recorded: a refused or unanswered one is an access too.
        let mut acked_version = None;
        for i in order {
            let target = &targets[i];
            let mut attempt = op.clone();
            attempt.region = target.region.clone();
            attempt.node = target.node.clone();
            attempt.start_ms = t.ms();
            let outcome = call(&agent, method, &format!("{}/v1/{url_path}", target.url), token, body.clone());
            attempt.end_ms = t.ms();
            let mut done = true;
            if let Ok(reply) = outcome {
                attempt.status = Some(reply.status);
                attempt.request_id = reply.request_id;
                attempt.position = reply.position;
                if attempt.kind == "write" || attempt.kind == "rotate" {
                    attempt.version = reply.body["data"]["version"].as_u64();
                }
                if writes && reply.status == 503 {
                    done = false; // a standby or a sealed node: try the next one
                } else if writes {
                    writer = i;
                }
            } else {
                done = !writes;
            }
            if (attempt.kind == "write" || attempt.kind == "rotate") && attempt.acked() {
                acked_version = attempt.version;
            }
            history.lock().unwrap_or_else(|p| p.into_inner()).push(attempt);
            if done {
                break;
            }
        }
        if let Some(v) = acked_version {
            mine[k as usize].push(v);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
