//! Regions: the replication listener (what a primary serves its standbys), the standby's
//! applier, the peer watcher that carries epochs between regions, and the operator's
//! region operations (status, promote, demote with a divergence report).
//!
//! Invariants:
//! - Only a primary serves its feed; only a standby applies one, one batch per store
//!   transaction together with its cursor (`arca_replication::apply_batch`), on the
//!   committer thread, by the one node of the region that holds the applier lease.
//! - A region's role and epoch live in its own store (`("region","state")`), read by every
//!   request batch: a promotion or a fencing takes effect at a batch boundary.
//! - Epochs only grow. A primary that meets a higher epoch — in a peer's hello, a pull, or
//!   a hello answer — fences itself before it answers anything else.
//! - Nothing is decrypted in transit: records and snapshots are the stored ciphertext.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arca_audit::Operation;
use arca_replication::{self as repl, ChangeRecord, Cursor, Op, RegionState, Role};
use arca_store::{RangeOptions, StoreExt, Transaction, prefix_end};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::config::ReplicationSection;
use crate::error::ApiError;
use crate::grpc::ProxyConfig;
use crate::keys;
use crate::kv::Metadata;
use crate::node::{Audited, Env, Node, RequestContext, now_unix_ms};
use crate::policy::Capability;
use crate::proto;
use crate::sequencer::{follow, lease_view, write_lease};

/// Most change records per pull.
pub const MAX_PULL_CHANGES: usize = 1000;
/// Most audit entries per pull.
pub const MAX_PULL_ENTRIES: usize = 4096;
/// Most pairs per snapshot chunk.
pub const MAX_SNAPSHOT_PAIRS: usize = 2000;
const LONG_POLL: Duration = Duration::from_millis(500);
const PEER_INTERVAL: Duration = Duration::from_millis(300);

/// A peer region and how to reach it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub region: String,
    pub endpoint: String,
}

/// What the node knows of replication at run time.
#[derive(Debug)]
pub struct Regions {
    pub peers: Vec<Peer>,
    pub initial_primary: String,
    tls: Option<tonic::transport::ClientTlsConfig>,
    channels: Mutex<BTreeMap<String, tonic::transport::Channel>>,
    /// Per standby: the feed position it last confirmed (mirrors `region_shipped`).
    shipped: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Per peer: (link up, role, epoch, last contact ms).
    links: Mutex<BTreeMap<String, PeerView>>,
    pub lag: LagGauges,
}

#[derive(Debug, Clone, Default)]
struct PeerView {
    up: bool,
    role: String,
    epoch: u64,
    last_contact_unix_ms: u64,
}

/// The standby's lag, as the applier last measured it.
#[derive(Debug, Default)]
pub struct LagGauges {
    pub versions: AtomicU64,
    pub entries: AtomicU64,
    /// Milliseconds.
    pub millis: AtomicU64,
    pub link_up: AtomicU64,
    pub applied_changes: AtomicU64,
    pub last_applied_unix_ms: AtomicU64,
    /// The last successful pull (this region's clock).
    pub last_contact_unix_ms: AtomicU64,
    /// This process holds the region's applier lease. The gauges above describe its own
    /// pulls: on a node of the region that does not apply, they are stale from whenever it
    /// last did, so its link is the peer watcher's view of the primary instead.
    pub applier: std::sync::atomic::AtomicBool,
}

impl LagGauges {
    /// Seconds behind: as last measured, or — while the link is down — at least the time
    /// since the last successful pull.
    pub fn seconds(&self) -> f64 {
        let measured = self.millis.load(Ordering::Relaxed);
        let last = self.last_contact_unix_ms.load(Ordering::Relaxed);
        // Before the first successful pull there is no "since": the lag is unknown, not
        // fifty years.
        let since = if self.link_up.load(Ordering::Relaxed) == 1
            || last == 0
            || !self.applier.load(Ordering::Relaxed)
        {
            0
        } else {
            now_unix_ms().saturating_sub(last)
        };
        measured.max(since) as f64 / 1000.0
    }
}

impl Regions {
    /// Whether this standby node reaches the primary: its last pull if it is the region's
    /// applier, otherwise the peer watcher's last hello.
    pub fn standby_link_up(&self, primary: &str) -> bool {
        if self.lag.applier.load(Ordering::Relaxed) {
            self.lag.link_up.load(Ordering::Relaxed) == 1
        } else {
            self.links.lock().unwrap_or_else(|p| p.into_inner()).get(primary).is_some_and(|view| view.up)
        }
    }

    /// The replication settings of region `own_region`. With mTLS, this region's certificate
    /// must name the region (see [`certificate_names_region`]): its peers check that it does
    /// on every call, so a certificate that does not is refused here, at start.
    pub fn from_config(
        section: &ReplicationSection,
        own_region: &str,
    ) -> Result<Regions, crate::server::BoxError> {
        let tls = match (&section.tls_cert_file, &section.tls_key_file, &section.ca_file) {
            (Some(cert), Some(key), Some(ca)) => {
                let pem = std::fs::read(cert)?;
                let leaf = {
                    use rustls::pki_types::pem::PemObject as _;
                    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                        .next()
                        .ok_or_else(|| format!("{}: no certificate in the file", cert.display()))??
                };
                if !certificate_names_region(leaf.as_ref(), own_region) {
                    return Err(format!(
                        "replication: the certificate {} does not name this region {own_region:?} as a DNS \
                         name in its subjectAltName; peers refuse calls from a region its certificate \
                         does not name",
                        cert.display()
                    )
                    .into());
                }
                let identity = tonic::transport::Identity::from_pem(pem, std::fs::read(key)?);
                let ca = tonic::transport::Certificate::from_pem(std::fs::read(ca)?);
                Some(tonic::transport::ClientTlsConfig::new().identity(identity).ca_certificate(ca))
            }
            _ => None,
        };
        Ok(Regions {
            peers: section
                .peers
                .iter()
                .map(|p| Peer { region: p.region.clone(), endpoint: p.endpoint.clone() })
                .collect(),
            initial_primary: section.initial_primary.clone(),
            tls,
            channels: Mutex::new(BTreeMap::new()),
            shipped: Mutex::new(BTreeMap::new()),
            links: Mutex::new(BTreeMap::new()),
            lag: LagGauges::default(),
        })
    }

    fn channel(&self, region: &str) -> Result<tonic::transport::Channel, Status> {
        if let Some(c) = self.channels.lock().unwrap_or_else(|p| p.into_inner()).get(region) {
            return Ok(c.clone());
        }
        let peer = self.peers.iter().find(|p| p.region == region).ok_or_else(|| {
            Status::failed_precondition(format!("no endpoint configured for region {region}"))
        })?;
        let mut endpoint = tonic::transport::Endpoint::from_shared(peer.endpoint.clone())
            .map_err(|_| Status::invalid_argument("invalid peer endpoint"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| Status::internal(e.to_string()))?;
        }
        let channel = endpoint.connect_lazy();
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).insert(region.to_owned(), channel.clone());
        Ok(channel)
    }

    fn client(&self, region: &str) -> Result<ReplicationClient, Status> {
        Ok(proto::replication_client::ReplicationClient::new(self.channel(region)?)
            .max_decoding_message_size(64 << 20))
    }

    fn note_link(&self, region: &str, up: bool, answer: Option<&proto::HelloResponse>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let view = links.entry(region.to_owned()).or_default();
        view.up = up;
        if let Some(a) = answer {
            view.role = a.role.clone();
            view.epoch = a.epoch;
            view.last_contact_unix_ms = now_unix_ms();
        }
    }
}

type ReplicationClient = proto::replication_client::ReplicationClient<tonic::transport::Channel>;

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Standby => "standby",
        Role::Fenced => "fenced",
    }
}

fn load_state(tx: &mut dyn Transaction) -> Result<Option<RegionState>, ApiError> {
    repl::apply::load_state(tx).map_err(repl_error)
}

fn repl_error(err: repl::ApplyError) -> ApiError {
    match err {
        repl::ApplyError::Store(e) => ApiError::Store(e),
        repl::ApplyError::NotStandby(role) => {
            ApiError::FailedPrecondition(format!("this region is {}: it applies no feed", role_name(role)))
        }
        other => ApiError::FailedPrecondition(other.to_string()),
    }
}

fn api_status(err: ApiError) -> Status {
    Status::from(err)
}

/// The 8-byte commit version at the front of a versionstamp.
fn stamp_version(stamp: &[u8]) -> u64 {
    stamp.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

impl Node {
    /// The region runtime, when replication is configured.
    pub fn regions(&self) -> Option<&Arc<Regions>> {
        self.regions.get()
    }

    /// Configures replication: records the initial role the first time, keeps `regions`
    /// for the loops and the listener.
    pub fn enable_regions(self: &Arc<Self>, regions: Regions) -> Result<(), ApiError> {
        let me = self.identity.region.clone();
        let initial = regions.initial_primary.clone();
        self.store.transact(|tx| -> Result<(), ApiError> {
            if load_state(tx)?.is_none() {
                let role = if initial == me { Role::Primary } else { Role::Standby };
                repl::apply::store_state(tx, &RegionState::new(role, 1, &initial, now_unix_ms()))?;
            }
            Ok(())
        })?;
        self.regions.set(Arc::new(regions)).map_err(|_| ApiError::Internal)?;
        Ok(())
    }

    /// This region's state (none: a single-region deployment).
    pub fn region_state(&self) -> Result<Option<RegionState>, ApiError> {
        Ok(self.store.transact(|tx| load_state(tx))?.value)
    }

    /// Raises this region's epoch to `epoch` if it is higher: a primary becomes fenced; a
    /// standby follows `primary`. Returns the state after.
    fn learn_epoch(
        &self,
        epoch: u64,
        primary: &str,
        peer_role: &str,
    ) -> Result<Option<RegionState>, ApiError> {
        let me = self.identity.region.clone();
        let changed = self.store.transact(|tx| -> Result<Option<RegionState>, ApiError> {
            let Some(mut state) = load_state(tx)? else { return Ok(None) };
            if epoch <= state.epoch {
                return Ok(Some(state));
            }
            let was = state.role;
            state.epoch = epoch;
            if peer_role == "primary" && !primary.is_empty() && primary != me {
                state.primary = primary.to_owned();
            }
            if state.role == Role::Primary {
                state.role = Role::Fenced;
                state.since_unix_ms = now_unix_ms();
                tracing::warn!(epoch, new_primary = %state.primary, "a newer epoch exists: this region is fenced and refuses writes");
            } else if was == Role::Standby {
                tracing::info!(epoch, primary = %state.primary, "following the newer epoch's primary");
            }
            repl::apply::store_state(tx, &state)?;
            Ok(Some(state))
        })?;
        Ok(changed.value)
    }

    /// `arca region status`.
    pub async fn region_status(
        self: &Arc<Self>,
        ctx: RequestContext,
    ) -> Audited<proto::RegionStatusResponse> {
        let node = self.clone();
        self.execute(ctx, Operation::RegionStatus, "sys/region/status".into(), move |env| {
            env.authorize("sys/region/status", &[Capability::Read])?;
            let state = load_state(env.tx)?;
            let me = node.identity.region.clone();
            let Some(state) = state else {
                return Ok(proto::RegionStatusResponse {
                    region: me.clone(),
                    role: "single".into(),
                    primary: me,
                    link: "n/a".into(),
                    ..Default::default()
                });
            };
            let cursor = repl::apply::load_cursor(env.tx, &state.primary).map_err(repl_error)?;
            let mut status = proto::RegionStatusResponse {
                region: me,
                role: role_name(state.role).into(),
                epoch: state.epoch,
                primary: state.primary.clone(),
                seeded: cursor.seeded,
                link: "n/a".into(),
                ..Default::default()
            };
            if let Some(regions) = node.regions() {
                let lag = &regions.lag;
                if state.role == Role::Standby {
                    status.lag_changes = lag.versions.load(Ordering::Relaxed);
                    status.lag_entries = lag.entries.load(Ordering::Relaxed);
                    status.lag_seconds = lag.seconds();
                    status.last_applied_unix_ms = cursor.applied_unix_ms;
                    status.link = if regions.standby_link_up(&state.primary) { "up" } else { "down" }.into();
                }
                let links = regions.links.lock().unwrap_or_else(|p| p.into_inner());
                for peer in &regions.peers {
                    let view = links.get(&peer.region).cloned().unwrap_or_default();
                    status.peers.push(proto::PeerStatus {
                        region: peer.region.clone(),
                        role: view.role,
                        epoch: view.epoch,
                        link: if view.up { "up" } else { "down" }.into(),
                        last_contact_unix_ms: view.last_contact_unix_ms,
                    });
                }
            }
            Ok(status)
        })
        .await
    }

    /// `arca region promote`: this standby stops applying, raises the epoch past every one
    /// it knows and opens writes.
    pub async fn region_promote(
        self: &Arc<Self>,
        ctx: RequestContext,
    ) -> Audited<proto::RegionStatusResponse> {
        let node = self.clone();
        let peer_epochs = self.regions().map_or(0, |r| {
            r.links.lock().unwrap_or_else(|p| p.into_inner()).values().map(|v| v.epoch).max().unwrap_or(0)
        });
        self.execute(ctx, Operation::RegionPromote, "sys/region/promote".into(), move |env| {
            env.authorize("sys/region/promote", &[Capability::Sudo])?;
            let mut state = load_state(env.tx)?
                .ok_or_else(|| ApiError::FailedPrecondition("replication is not configured".into()))?;
            if state.role != Role::Standby {
                return Err(ApiError::FailedPrecondition(format!(
                    "only a standby can be promoted; this region is {}",
                    role_name(state.role)
                )));
            }
            let cursor = repl::apply::load_cursor(env.tx, &state.primary).map_err(repl_error)?;
            if !cursor.seeded {
                return Err(ApiError::FailedPrecondition(
                    "this standby has not finished copying its primary's state: it cannot be promoted".into(),
                ));
            }
            let old = state.primary.clone();
            state.epoch = state.epoch.max(cursor.epoch).max(peer_epochs) + 1;
            state.role = Role::Primary;
            state.primary = node.identity.region.clone();
            state.since_unix_ms = env.now_unix_ms;
            state.previous_primary = Some(old);
            state.previous_applied = cursor.stamp.clone();
            repl::apply::store_state(env.tx, &state)?;
            Ok(proto::RegionStatusResponse {
                region: node.identity.region.clone(),
                role: "primary".into(),
                epoch: state.epoch,
                primary: state.primary,
                link: "n/a".into(),
                seeded: true,
                ..Default::default()
            })
        })
        .await
    }

    /// `arca region demote <primary>`: this region (a fenced or deposed primary) becomes a
    /// standby of `primary`. The writes it committed that `primary` never applied are
    /// recorded in a divergence report first; then the region re-copies `primary`'s state.
    pub async fn region_demote(
        self: &Arc<Self>,
        ctx: RequestContext,
        new_primary: String,
    ) -> Audited<proto::DivergenceReport> {
        // Ask the new primary how far it applied this region's feed (before the audited
        // work, which cannot wait on the network).
        let me = self.identity.region.clone();
        let answer = match self.regions() {
            Some(regions) => hello(regions, &me, self, &new_primary).await,
            None => Err(Status::failed_precondition("replication is not configured")),
        };
        let node = self.clone();
        let path = format!("sys/region/demote/{}", new_primary.chars().take(64).collect::<String>());
        self.execute(ctx, Operation::RegionDemote, path, move |env| {
            env.authorize("sys/region/demote", &[Capability::Sudo])?;
            if new_primary.is_empty() || new_primary.len() > 64 {
                return Err(ApiError::invalid("primary: a region name of 1 to 64 bytes"));
            }
            let answer = answer.clone().map_err(|s| {
                ApiError::FailedPrecondition(format!("cannot reach region {new_primary}: {}", s.message()))
            })?;
            if answer.role != "primary" {
                return Err(ApiError::FailedPrecondition(format!("region {new_primary} is not a primary")));
            }
            let mut state = load_state(env.tx)?
                .ok_or_else(|| ApiError::FailedPrecondition("replication is not configured".into()))?;
            if state.role == Role::Standby {
                return Err(ApiError::FailedPrecondition("this region is already a standby".into()));
            }
            if answer.epoch <= state.epoch && state.role == Role::Primary {
                return Err(ApiError::FailedPrecondition(format!(
                    "region {new_primary} has epoch {} and this primary {}: promote it first",
                    answer.epoch, state.epoch
                )));
            }
            let after = answer.applied_known.then(|| answer.applied_stamp.clone());
            let writes = divergent_writes(env, after.as_deref())?;
            let id = count_reports(env.tx)? + 1;
            let report = StoredReport {
                id,
                region: node.identity.region.clone(),
                new_primary: new_primary.clone(),
                epoch: answer.epoch,
                created_unix_ms: env.now_unix_ms,
                writes,
            };
            env.tx
                .set(&repl::divergence(id), &serde_json::to_vec(&report).map_err(|_| ApiError::Internal)?)?;
            state.role = Role::Standby;
            state.epoch = state.epoch.max(answer.epoch);
            state.primary = new_primary.clone();
            state.since_unix_ms = env.now_unix_ms;
            state.previous_primary = None;
            state.previous_applied = None;
            repl::apply::store_state(env.tx, &state)?;
            // Re-copy the new primary's state: this region's own history diverged.
            repl::apply::store_cursor(env.tx, &new_primary, &Cursor::default())?;
            Ok(report.to_proto())
        })
        .await
    }

    /// A stored divergence report.
    pub async fn region_divergence(
        self: &Arc<Self>,
        ctx: RequestContext,
        id: u64,
    ) -> Audited<proto::DivergenceReport> {
        self.execute(ctx, Operation::RegionDivergence, format!("sys/region/divergence/{id}"), move |env| {
            env.authorize("sys/region/divergence", &[Capability::Read])?;
            let raw = env
                .tx
                .get(&repl::divergence(id))?
                .ok_or_else(|| ApiError::NotFound(format!("no divergence report {id}")))?;
            let report: StoredReport = serde_json::from_slice(&raw).map_err(|_| ApiError::Internal)?;
            Ok(report.to_proto())
        })
        .await
    }
}

impl Node {
    /// The secret versions a divergence report lists, decrypted from the report's own copy
    /// of the change records (the region's live data was replaced when it was demoted).
    pub async fn region_divergent_secrets(
        self: &Arc<Self>,
        ctx: RequestContext,
        id: u64,
    ) -> Audited<proto::DivergentSecrets> {
        self.execute(
            ctx,
            Operation::RegionDivergentSecrets,
            format!("sys/region/divergence/{id}"),
            move |env| {
                env.authorize("sys/region/divergence", &[Capability::Sudo])?;
                let raw = env
                    .tx
                    .get(&repl::divergence(id))?
                    .ok_or_else(|| ApiError::NotFound(format!("no divergence report {id}")))?;
                let report: StoredReport = serde_json::from_slice(&raw).map_err(|_| ApiError::Internal)?;
                let mut out = proto::DivergentSecrets::default();
                for w in report.writes.iter().filter(|w| w.kind == "secret" && w.op == "set") {
                    let bytes = hex::decode(&w.record).map_err(|_| ApiError::Internal)?;
                    let record = ChangeRecord::decode(&bytes).map_err(|_| ApiError::Internal)?;
                    let described = describe_ops(&record.ops, |key, ct| open_metadata(env, key, ct));
                    for (op, d) in record.ops.iter().zip(described) {
                        let Op::Set { value, .. } = op else { continue };
                        let (Some(version), Some(aad)) = (d.version, &d.aad) else { continue };
                        if d.kind != "secret" || d.path != w.path || d.version != w.version {
                            continue;
                        }
                        let plain = env.decrypt_at(aad, value)?;
                        let mut data: crate::kv::SecretData =
                            serde_json::from_slice(&plain).map_err(|_| ApiError::Internal)?;
                        let (data, json_keys) = crate::grpc::data_to_wire(&mut data);
                        // The row's key names the mount and the path apart (a mount may
                        // have several segments).
                        let (mount, rest, _) = secret_row(op.key()).ok_or(ApiError::Internal)?;
                        out.secrets.push(proto::DivergentSecret {
                            mount,
                            path: rest,
                            version,
                            data,
                            position: w.position.clone(),
                            json_keys,
                        });
                    }
                }
                Ok(out)
            },
        )
        .await
    }
}

fn count_reports(tx: &mut dyn Transaction) -> Result<u64, ApiError> {
    let (begin, end) = keys::children_range(&repl::divergences());
    Ok(tx.get_range(&begin, &end, RangeOptions::limit(100_000))?.len() as u64)
}

/// A divergence report as stored (region-local).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredReport {
    id: u64,
    region: String,
    new_primary: String,
    epoch: u64,
    created_unix_ms: u64,
    writes: Vec<DivergentWrite>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DivergentWrite {
    position: String,
    time_unix_ms: u64,
    kind: String,
    path: String,
    version: Option<u64>,
    op: String,
    /// The change record's ops, hex (ciphertext as stored): what a re-apply needs.
    #[serde(default)]
    record: String,
}

impl StoredReport {
    fn to_proto(&self) -> proto::DivergenceReport {
        proto::DivergenceReport {
            id: self.id,
            region: self.region.clone(),
            new_primary: self.new_primary.clone(),
            epoch: self.epoch,
            created_unix_ms: self.created_unix_ms,
            writes: self
                .writes
                .iter()
                .map(|w| proto::DivergentWrite {
                    position: w.position.clone(),
                    time_unix_ms: w.time_unix_ms,
                    kind: w.kind.clone(),
                    path: w.path.clone(),
                    version: w.version,
                    op: w.op.clone(),
                })
                .collect(),
        }
    }
}

/// Every change this region committed after `after` (its feed position the new primary
/// applied; `None`: all), one row per key written.
fn divergent_writes(env: &mut Env<'_>, after: Option<&[u8]>) -> Result<Vec<DivergentWrite>, ApiError> {
    let prefix = repl::changes();
    let end = prefix_end(&prefix).ok_or(ApiError::Internal)?;
    let mut begin = prefix.clone();
    if let Some(stamp) = after {
        begin.extend_from_slice(stamp);
        begin.push(0);
    }
    let mut out = Vec::new();
    loop {
        let rows = env.tx.get_range(&begin, &end, RangeOptions::limit(1000))?;
        for kv in &rows {
            let stamp = &kv.key[prefix.len()..];
            let record = ChangeRecord::decode(&kv.value).map_err(|_| ApiError::Internal)?;
            let mut position = stamp.get(..10).ok_or(ApiError::Internal)?.to_vec();
            position.extend_from_slice(&record.event_order.to_be_bytes());
            let described = describe_ops(&record.ops, |key, ct| open_metadata(env, key, ct));
            // One row per thing written: a secret version's metadata update is part of it.
            let secrets: Vec<&str> =
                described.iter().filter(|d| d.kind == "secret").map(|d| d.path.as_str()).collect();
            for (op, d) in record.ops.iter().zip(&described) {
                if d.kind == "metadata" && secrets.contains(&d.path.as_str()) {
                    continue;
                }
                out.push(DivergentWrite {
                    position: hex::encode(&position),
                    time_unix_ms: record.time_unix_ms,
                    kind: d.kind.clone(),
                    path: d.path.clone(),
                    version: d.version,
                    op: match op {
                        Op::Set { .. } => "set",
                        Op::Clear { .. } => "clear",
                        Op::ClearRange { .. } => "clear_range",
                    }
                    .into(),
                    record: hex::encode(&kv.value),
                });
            }
        }
        match rows.last() {
            Some(last) if rows.len() == 1000 => {
                begin = last.key.clone();
                begin.push(0);
            }
            _ => break,
        }
    }
    Ok(out)
}

/// One replicated write, for a human: kind, path (`mount/path` for a secret), version; and
/// for a secret version's row, the AAD its data is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Described {
    kind: String,
    path: String,
    version: Option<u64>,
    aad: Option<Vec<u8>>,
}

/// Describes each of a record's ops. A secret's slot row does not name its version: the
/// version is the one the secret's metadata, set in the same record, keeps in that slot
/// (`open` decrypts and parses metadata read at a key). A slot row the record's metadata
/// does not name (the clear of a pruned version's row) has no version.
fn describe_ops(ops: &[Op], mut open: impl FnMut(&[u8], &[u8]) -> Option<Metadata>) -> Vec<Described> {
    let mut opened: BTreeMap<Vec<u8>, Option<Metadata>> = BTreeMap::new();
    ops.iter()
        .map(|op| {
            let (kind, path, version) = describe(op.key());
            let aad = version.is_some().then(|| op.key().to_vec());
            let Some((mount, secret, DataRow::Slot(slot))) = secret_row(op.key()) else {
                return Described { kind, path, version, aad };
            };
            let meta_key = keys::kv_meta(&mount, &secret);
            let meta = opened.entry(meta_key.clone()).or_insert_with(|| {
                ops.iter().rev().find_map(|o| match o {
                    Op::Set { key, value } if *key == meta_key => open(key, value),
                    _ => None,
                })
            });
            let version = meta
                .as_ref()
                .and_then(|m| m.versions.iter().find(|(_, state)| state.slot == Some(slot)).map(|(v, _)| *v));
            let aad = version.map(|v| keys::kv_version(&mount, &secret, v));
            Described { kind, path, version, aad }
        })
        .collect()
}

/// A secret's metadata as a change record carries it, decrypted; `None` (and a warning) when
/// it does not open.
fn open_metadata(env: &mut Env<'_>, key: &[u8], ct: &[u8]) -> Option<Metadata> {
    let opened =
        env.decrypt_at(key, ct).ok().and_then(|plain| serde_json::from_slice::<Metadata>(&plain).ok());
    if opened.is_none() {
        tracing::warn!(
            "a replicated secret's metadata did not open: its slot rows are reported without versions"
        );
    }
    opened
}

/// Where a secret version's data row is.
enum DataRow {
    /// At the version's own key (rows written before slots).
    Version(u64),
    Slot(u32),
}

/// A secret version's data row: mount, path, and which row.
fn secret_row(key: &[u8]) -> Option<(String, String, DataRow)> {
    use arca_store::tuple::{Element, unpack};
    let parts = unpack(key).ok()?;
    let [k, mount, kind, path, Element::Int(n)] = parts.as_slice() else { return None };
    let row = match (k.as_str(), kind.as_str()) {
        (Some("kv"), Some("v")) => DataRow::Version(n.as_u64()?),
        (Some("kv"), Some("s")) => DataRow::Slot(u32::try_from(n.as_u64()?).ok()?),
        _ => return None,
    };
    Some((mount.as_str()?.to_owned(), path.as_str()?.to_owned(), row))
}

/// What a replicated key is, for a human: kind, path, version (none for a slot row: see
/// [`describe_ops`]).
fn describe(key: &[u8]) -> (String, String, Option<u64>) {
    use arca_store::tuple::{Element, unpack};
    if let Some((mount, path, row)) = secret_row(key) {
        let version = match row {
            DataRow::Version(v) => Some(v),
            DataRow::Slot(_) => None,
        };
        return ("secret".into(), format!("{mount}/{path}"), version);
    }
    let Ok(parts) = unpack(key) else { return ("unknown".into(), hex::encode(key), None) };
    let text = |e: &Element| e.as_str().map(str::to_owned);
    match parts.as_slice() {
        [k, mount, kind, path] if text(k).as_deref() == Some("kv") && text(kind).as_deref() == Some("m") => (
            "metadata".into(),
            format!("{}/{}", text(mount).unwrap_or_default(), text(path).unwrap_or_default()),
            None,
        ),
        [k, what, ..] if text(k).as_deref() == Some("sys") => {
            let what = text(what).unwrap_or_default();
            let kind = match what.as_str() {
                "token" | "accessor" | "child" => "token",
                "policy" => "policy",
                "approle" | "approle-id" | "secret-id" => "approle",
                _ => "system",
            };
            (kind.into(), format!("sys/{what}"), None)
        }
        _ => ("unknown".into(), hex::encode(key), None),
    }
}

/// Says hello to `region`: our epoch for theirs. A higher epoch in the answer fences us.
async fn hello(
    regions: &Regions,
    me: &str,
    node: &Node,
    region: &str,
) -> Result<proto::HelloResponse, Status> {
    let state = node.region_state().map_err(api_status)?;
    let Some(state) = state else { return Err(Status::failed_precondition("replication is not configured")) };
    let mut client = regions.client(region)?;
    let request = proto::HelloRequest {
        region: me.to_owned(),
        epoch: state.epoch,
        role: role_name(state.role).into(),
        primary: state.primary.clone(),
    };
    match client.hello(request).await {
        Ok(answer) => {
            let answer = answer.into_inner();
            regions.note_link(region, true, Some(&answer));
            if answer.epoch > state.epoch {
                node.learn_epoch(answer.epoch, &answer.primary, &answer.role).map_err(api_status)?;
            }
            Ok(answer)
        }
        Err(status) => {
            regions.note_link(region, false, None);
            Err(status)
        }
    }
}

/// The replication listener's service.
#[derive(Debug, Clone)]
pub struct ReplicationService {
    node: Arc<Node>,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>) -> Self {
        ReplicationService { node }
    }

    pub fn into_server(self) -> proto::replication_server::ReplicationServer<Self> {
        proto::replication_server::ReplicationServer::new(self).max_encoding_message_size(64 << 20)
    }

    /// Our state; a caller with a higher epoch fences us first.
    fn check_caller(
        &self,
        caller_epoch: u64,
        caller_primary: &str,
        caller_role: &str,
    ) -> Result<RegionState, Status> {
        let state = self
            .node
            .region_state()
            .map_err(api_status)?
            .ok_or_else(|| Status::failed_precondition("replication is not configured"))?;
        if caller_epoch > state.epoch {
            return self
                .node
                .learn_epoch(caller_epoch, caller_primary, caller_role)
                .map_err(api_status)?
                .ok_or_else(|| Status::internal("region state vanished"));
        }
        Ok(state)
    }

    fn require_primary(&self, state: &RegionState) -> Result<(), Status> {
        if state.role != Role::Primary {
            return Err(Status::failed_precondition(format!(
                "region {} is {} (epoch {}); the primary is {}",
                self.node.identity.region,
                role_name(state.role),
                state.epoch,
                state.primary
            )));
        }
        Ok(())
    }

    fn read_pull(&self, req: &proto::PullRequest) -> Result<proto::PullResponse, ApiError> {
        let region = self.node.identity.region.clone();
        let max = (req.max_changes as usize).clamp(1, MAX_PULL_CHANGES);
        let out = self.node.store.transact(|tx| -> Result<proto::PullResponse, ApiError> {
            let prefix = repl::changes();
            let end = prefix_end(&prefix).ok_or(ApiError::Internal)?;
            let mut begin = prefix.clone();
            if !req.after_stamp.is_empty() {
                begin.extend_from_slice(&req.after_stamp);
                begin.push(0);
            }
            let rows = tx.get_range(&begin, &end, RangeOptions::limit(max))?;
            let head =
                tx.get_range(&prefix, &end, RangeOptions { limit: 1, reverse: true, snapshot: false })?;
            let (head_stamp, head_time) = match head.first() {
                Some(kv) => (
                    kv.key[prefix.len()..].to_vec(),
                    ChangeRecord::decode(&kv.value).map(|r| r.time_unix_ms).unwrap_or(0),
                ),
                None => (Vec::new(), 0),
            };
            let changes = rows
                .into_iter()
                .map(|kv| proto::Change { stamp: kv.key[prefix.len()..].to_vec(), record: kv.value })
                .collect();
            // The sequenced audit log after the caller's position.
            let log = follow::head(tx, &region)?;
            let want = log.size.saturating_sub(req.audit_next).min(MAX_PULL_ENTRIES as u64) as usize;
            let after = (!req.audit_after.is_empty()).then_some(req.audit_after.as_slice());
            let entries = if want == 0 { Vec::new() } else { follow::entries(tx, &region, after, want)? };
            let up_to = req.audit_next + entries.len() as u64;
            let checkpoints = if entries.is_empty() {
                Vec::new()
            } else {
                follow::checkpoints(tx, &region, req.audit_next, up_to, 10_000)?
            };
            Ok(proto::PullResponse {
                region: region.clone(),
                epoch: 0,
                changes,
                audit_first: req.audit_next,
                audit_last_stamp: entries.last().map(|(s, _)| s.clone()).unwrap_or_default(),
                audit_entries: entries.into_iter().map(|(_, e)| e).collect(),
                checkpoints: checkpoints
                    .into_iter()
                    .map(|(size, note)| proto::SignedCheckpoint { size, note })
                    .collect(),
                head_stamp,
                log_size: log.size,
                head_time_unix_ms: head_time,
            })
        })?;
        Ok(out.value)
    }
}

/// The replication calls as served, before their audit (see [`ReplicationService::audited`]).
impl ReplicationService {
    async fn serve_pull(&self, req: proto::PullRequest) -> Result<Response<proto::PullResponse>, Status> {
        // What the standby confirms having applied bounds what the feed may drop, and
        // what the audit archiver may prune.
        if !req.after_stamp.is_empty() {
            record_shipped(&self.node, &req.region, &req.after_stamp).await;
        }
        record_shipped_audit(&self.node, &req.region, req.audit_next).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(req.wait_ms).min(5000));
        loop {
            let state = self.check_caller(req.epoch, "", "standby")?;
            self.require_primary(&state)?;
            let this = self.clone();
            let r = req.clone();
            let mut out = tokio::task::spawn_blocking(move || this.read_pull(&r))
                .await
                .map_err(|_| Status::internal("pull interrupted"))?
                .map_err(api_status)?;
            out.epoch = state.epoch;
            let idle = out.changes.is_empty() && out.audit_entries.is_empty();
            if !idle || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(out));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn serve_snapshot(
        &self,
        req: proto::SnapshotRequest,
    ) -> Result<Response<proto::SnapshotChunk>, Status> {
        let state = self.check_caller(req.epoch, "", "standby")?;
        self.require_primary(&state)?;
        let node = self.node.clone();
        let max = (req.max_pairs as usize).clamp(1, MAX_SNAPSHOT_PAIRS);
        let chunk = tokio::task::spawn_blocking(move || {
            node.store.transact(|tx| -> Result<proto::SnapshotChunk, ApiError> {
                let mut chunk = proto::SnapshotChunk::default();
                if req.after_key.is_empty() {
                    let prefix = repl::changes();
                    let end = prefix_end(&prefix).ok_or(ApiError::Internal)?;
                    let head = tx.get_range(
                        &prefix,
                        &end,
                        RangeOptions { limit: 1, reverse: true, snapshot: false },
                    )?;
                    chunk.feed_stamp =
                        head.first().map(|kv| kv.key[prefix.len()..].to_vec()).unwrap_or_default();
                }
                for (begin, end) in repl::replicated_ranges() {
                    if chunk.pairs.len() >= max {
                        break;
                    }
                    let mut from = begin.clone();
                    if !req.after_key.is_empty() {
                        if req.after_key.as_slice() >= end.as_slice() {
                            continue;
                        }
                        if req.after_key.as_slice() >= begin.as_slice() {
                            from = req.after_key.clone();
                            from.push(0);
                        }
                    }
                    let rows = tx.get_range(&from, &end, RangeOptions::limit(max - chunk.pairs.len()))?;
                    chunk
                        .pairs
                        .extend(rows.into_iter().map(|kv| proto::Pair { key: kv.key, value: kv.value }));
                }
                chunk.done = chunk.pairs.len() < max;
                Ok(chunk)
            })
        })
        .await
        .map_err(|_| Status::internal("snapshot interrupted"))?
        .map_err(api_status)?;
        if !chunk.value.feed_stamp.is_empty() {
            record_shipped(&self.node, &req.region, &chunk.value.feed_stamp).await;
        }
        Ok(Response::new(chunk.value))
    }

    async fn serve_hello(&self, req: proto::HelloRequest) -> Result<Response<proto::HelloResponse>, Status> {
        let state = self.check_caller(req.epoch, &req.primary, &req.role)?;
        // How far this region applied the caller's feed: as a standby of it, or — once
        // promoted over it — up to the promotion.
        let node = self.node.clone();
        let caller = req.region.clone();
        let applied = tokio::task::spawn_blocking(move || {
            node.store.transact(|tx| -> Result<Option<Vec<u8>>, ApiError> {
                let state = load_state(tx)?;
                if let Some(s) = &state
                    && s.previous_primary.as_deref() == Some(caller.as_str())
                {
                    return Ok(Some(
                        s.previous_applied
                            .as_deref()
                            .map(hex::decode)
                            .transpose()
                            .map_err(|_| ApiError::Internal)?
                            .unwrap_or_default(),
                    ));
                }
                let cursor = repl::apply::load_cursor(tx, &caller).map_err(repl_error)?;
                Ok(cursor.seeded.then(|| cursor.stamp_bytes().unwrap_or_default()))
            })
        })
        .await
        .map_err(|_| Status::internal("hello interrupted"))?
        .map_err(api_status)?
        .value;
        if let Some(regions) = self.node.regions() {
            regions.note_link(
                &req.region,
                true,
                Some(&proto::HelloResponse {
                    role: req.role.clone(),
                    epoch: req.epoch,
                    ..Default::default()
                }),
            );
        }
        Ok(Response::new(proto::HelloResponse {
            region: self.node.identity.region.clone(),
            epoch: state.epoch,
            role: role_name(state.role).into(),
            primary: state.primary,
            applied_known: applied.is_some(),
            applied_stamp: applied.unwrap_or_default(),
        }))
    }
}

/// Every call on the replication listener is audited in the serving region's log, durable
/// before its answer goes out, except the two that are the replication's own heartbeat: a
/// hello that succeeds (every 300 ms per peer) and a pull that ships no change record (its
/// only payload, if any, is the audit log itself, public to SIEM consumers; auditing it
/// would feed the next pull). So a pull that ships change records, every snapshot chunk and
/// every refusal are recorded, with the caller as `region:<name>`. Only configured peers may
/// call, and over mTLS the name is the connection's: the regions' CA signed its certificate,
/// and the certificate names the region; a call that fails either is refused
/// (`PERMISSION_DENIED`) before anything is served or recorded (see
/// [`ReplicationService::check_identity`]). In plaintext (loopback, development only) the
/// name is the caller's claim. tonic's own refusals (a message
/// that does not decode, an unknown method) are audited by the listener's
/// [`crate::grpc::AuditRefusals`] layer.
#[tonic::async_trait]
impl proto::replication_server::Replication for ReplicationService {
    async fn pull(
        &self,
        request: Request<proto::PullRequest>,
    ) -> Result<Response<proto::PullResponse>, Status> {
        let ctx = crate::grpc::handler_context(&ProxyConfig::default(), &request);
        let named = self.check_identity(&request, &request.get_ref().region);
        let req = request.into_inner();
        let caller = req.region.clone();
        let (answer, actor) = match named {
            Ok(()) => (self.serve_pull(req).await, None),
            Err(Refused { status, actor }) => (Err(status), actor),
        };
        let ships = answer.as_ref().is_ok_and(|a| !a.get_ref().changes.is_empty());
        self.audited(ctx, Operation::RegionPull, &caller, actor, answer, ships).await
    }

    async fn snapshot(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<proto::SnapshotChunk>, Status> {
        let ctx = crate::grpc::handler_context(&ProxyConfig::default(), &request);
        let named = self.check_identity(&request, &request.get_ref().region);
        let req = request.into_inner();
        let caller = req.region.clone();
        let (answer, actor) = match named {
            Ok(()) => (self.serve_snapshot(req).await, None),
            Err(Refused { status, actor }) => (Err(status), actor),
        };
        self.audited(ctx, Operation::RegionSnapshot, &caller, actor, answer, true).await
    }

    async fn hello(
        &self,
        request: Request<proto::HelloRequest>,
    ) -> Result<Response<proto::HelloResponse>, Status> {
        let ctx = crate::grpc::handler_context(&ProxyConfig::default(), &request);
        let named = self.check_identity(&request, &request.get_ref().region);
        let req = request.into_inner();
        let caller = req.region.clone();
        let (answer, actor) = match named {
            Ok(()) => (self.serve_hello(req).await, None),
            Err(Refused { status, actor }) => (Err(status), actor),
        };
        self.audited(ctx, Operation::RegionHello, &caller, actor, answer, false).await
    }
}

impl ReplicationService {
    /// Audits a replication call when it was refused, or when `ships` (it hands over the
    /// region's data): operation `op`, actor `region:<caller>`, path
    /// `sys/replication/<call>/<caller>`. The event is durable before the answer goes out;
    /// if it cannot be recorded the answer is `UNAVAILABLE` instead. The answer carries the
    /// event's audit position and request id, as the client API's do.
    async fn audited<T>(
        &self,
        ctx: RequestContext,
        op: Operation,
        caller: &str,
        actor: Option<String>,
        answer: Result<Response<T>, Status>,
        ships: bool,
    ) -> Result<Response<T>, Status> {
        if answer.is_ok() && !ships {
            return answer;
        }
        let caller: String = caller.chars().take(64).collect();
        let call = match op {
            Operation::RegionPull => "pull",
            Operation::RegionSnapshot => "snapshot",
            _ => "hello",
        };
        let path = format!("sys/replication/{call}/{caller}");
        let refusal = answer.as_ref().err().map(|s| (s.code(), s.message().to_owned()));
        let audited = self
            .node
            .execute(ctx, op, path, move |env| {
                env.actor.entity = actor.clone().unwrap_or_else(|| format!("region:{caller}"));
                match &refusal {
                    None => Ok(()),
                    Some((code, message)) => Err(refusal_error(*code, message)),
                }
            })
            .await;
        let position = audited.position_hex();
        let mut answer = match (answer, position.is_some()) {
            (Ok(answer), true) => Ok(answer),
            (Err(status), true) => Err(status),
            (_, false) => Err(Status::unavailable("the call could not be audited, so it was not served")),
        };
        let metadata = match &mut answer {
            Ok(answer) => answer.metadata_mut(),
            Err(status) => status.metadata_mut(),
        };
        if let Some(value) = position.and_then(|p| p.parse().ok()) {
            metadata.insert(crate::grpc::AUDIT_POSITION_HEADER, value);
        }
        if let Ok(value) = audited.request_id.parse() {
            metadata.insert(crate::grpc::REQUEST_ID_HEADER, value);
        }
        answer
    }
}

/// Whether the X.509 certificate `der` names `region`: as one of the DNS names of its
/// subjectAltName, exactly — a wildcard names no region, and the subject's common name is
/// not read (as in TLS name checks since RFC 6125). A region's certificate thus carries its
/// region's name beside the host names it serves under, e.g. `us-east` and
/// `us-east.arca.internal`. A certificate that does not parse names nothing.
pub fn certificate_names_region(der: &[u8], region: &str) -> bool {
    let der = rustls::pki_types::CertificateDer::from(der);
    webpki::EndEntityCert::try_from(&der)
        .is_ok_and(|cert| cert.valid_dns_names().any(|name| !name.starts_with('*') && name == region))
}

impl ReplicationService {
    /// Who may call: over mTLS, a replication call must name a region its connection's
    /// certificate names ([`certificate_names_region`]), so one region's certificate cannot
    /// pull, snapshot or say hello as another (which would move that region's shipped
    /// position or its link's view); in plaintext (loopback only, see
    /// `server::serve_replication`) there is no certificate to ask. And the region must be one
    /// of this region's configured peers: the peer list is the allow list, as it is for the
    /// feed's trimming, which only waits for configured standbys.
    ///
    /// A call whose certificate does not name its region is audited with the certificate as
    /// its actor ([`certificate_actor`]), not the region it claims.
    fn check_identity<T>(&self, request: &Request<T>, region: &str) -> Result<(), Refused> {
        let shown = || region.chars().take(64).collect::<String>();
        if let Some(certs) = request.peer_certs() {
            let leaf = certs.first().map(|c| c.as_ref()).unwrap_or_default();
            if !certificate_names_region(leaf, region) {
                return Err(Refused {
                    status: Status::permission_denied(format!(
                        "the connection's certificate does not name region {:?}",
                        shown()
                    )),
                    actor: Some(certificate_actor(leaf)),
                });
            }
        }
        match self.node.regions() {
            Some(regions) if !regions.peers.iter().any(|p| p.region == region) => Err(Refused {
                status: Status::permission_denied(format!(
                    "region {:?} is not a peer of this region",
                    shown()
                )),
                actor: None,
            }),
            _ => Ok(()),
        }
    }
}

/// A replication call refused before it is served: its status, and the audit event's actor
/// when it is not the region the call names.
struct Refused {
    status: Status,
    actor: Option<String>,
}

/// A peer certificate as an audit actor: `certificate:<its DNS names, comma-separated>
/// sha256:<the first 16 hex digits of its DER's SHA-256>` (at most 160 characters).
pub(crate) fn certificate_actor(der: &[u8]) -> String {
    use sha2::Digest as _;
    let der_ref = rustls::pki_types::CertificateDer::from(der);
    let names = match webpki::EndEntityCert::try_from(&der_ref) {
        Ok(cert) => cert.valid_dns_names().collect::<Vec<_>>().join(","),
        Err(_) => "(unparsed)".into(),
    };
    let digest = hex::encode(sha2::Sha256::digest(der));
    let names: String = names.chars().take(120).collect();
    format!("certificate:{names} sha256:{}", &digest[..16])
}

/// A refused replication call's status, as the error its audit event records (the event
/// keeps the error's code; the message goes back to the caller only).
fn refusal_error(code: tonic::Code, message: &str) -> ApiError {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange => ApiError::invalid(message),
        Code::FailedPrecondition | Code::Aborted => ApiError::FailedPrecondition(message.to_owned()),
        Code::Unauthenticated => ApiError::Unauthenticated,
        Code::PermissionDenied => ApiError::PermissionDenied,
        Code::NotFound => ApiError::NotFound(message.to_owned()),
        Code::Unavailable => ApiError::Unavailable,
        _ => ApiError::Internal,
    }
}

/// On a primary: the audit position (next leaf index, 8 bytes) `standby` confirmed.
pub fn shipped_audit_key(standby: &str) -> Vec<u8> {
    arca_store::tuple::pack(&["region".into(), "shipped-audit".into(), standby.into()])
}

/// Records `standby`'s confirmed feed position (when it moved), on the committer thread.
async fn record_shipped(node: &Arc<Node>, standby: &str, stamp: &[u8]) {
    let Some(regions) = node.regions() else { return };
    if !regions.peers.iter().any(|p| p.region == standby) {
        return;
    }
    {
        let shipped = regions.shipped.lock().unwrap_or_else(|p| p.into_inner());
        if shipped.get(standby).is_some_and(|s| s.as_slice() >= stamp) {
            return;
        }
    }
    let (n, name, value) = (node.clone(), standby.to_owned(), stamp.to_vec());
    let stored = tokio::task::spawn_blocking(move || {
        let (n2, name2, value2) = (n.clone(), name.clone(), value.clone());
        n.committer().run_task(move || {
            n2.store.transact(|tx| tx.set(&repl::region_shipped(&name2), &value2)).map(|_| ())
        })
    })
    .await;
    if let Ok(Some(Ok(()))) = stored {
        regions.shipped.lock().unwrap_or_else(|p| p.into_inner()).insert(standby.to_owned(), stamp.to_vec());
    }
}

async fn record_shipped_audit(node: &Arc<Node>, standby: &str, next: u64) {
    let Some(regions) = node.regions() else { return };
    if !regions.peers.iter().any(|p| p.region == standby) {
        return;
    }
    let key = format!("audit:{standby}");
    {
        let shipped = regions.shipped.lock().unwrap_or_else(|p| p.into_inner());
        if shipped.get(&key).is_some_and(|s| s.as_slice() >= next.to_be_bytes().as_slice()) {
            return;
        }
    }
    let (n, name) = (node.clone(), standby.to_owned());
    let stored = tokio::task::spawn_blocking(move || {
        let n2 = n.clone();
        n.committer().run_task(move || {
            n2.store.transact(|tx| tx.set(&shipped_audit_key(&name), &next.to_be_bytes())).map(|_| ())
        })
    })
    .await;
    if let Ok(Some(Ok(()))) = stored {
        regions.shipped.lock().unwrap_or_else(|p| p.into_inner()).insert(key, next.to_be_bytes().to_vec());
    }
}

/// On a primary: drops the change records every configured standby has confirmed. A
/// standby that never confirmed anything holds the whole feed.
pub fn trim_feed(node: &Node) -> Result<u64, ApiError> {
    let Some(regions) = node.regions() else { return Ok(0) };
    let peers: Vec<String> = regions.peers.iter().map(|p| p.region.clone()).collect();
    let trimmed = node.store.transact(|tx| -> Result<u64, ApiError> {
        let Some(state) = load_state(tx)? else { return Ok(0) };
        if state.role != Role::Primary || peers.is_empty() {
            return Ok(0);
        }
        let mut min: Option<Vec<u8>> = None;
        for peer in &peers {
            let Some(stamp) = tx.get(&repl::region_shipped(peer))? else { return Ok(0) };
            if min.as_ref().is_none_or(|m| stamp < *m) {
                min = Some(stamp);
            }
        }
        let Some(min) = min else { return Ok(0) };
        let prefix = repl::changes();
        let mut end = prefix.clone();
        end.extend_from_slice(&min);
        end.push(0);
        let doomed = tx.get_range(&prefix, &end, RangeOptions::limit(100_000))?.len() as u64;
        if doomed > 0 {
            tx.clear_range(&prefix, &end)?;
        }
        Ok(doomed)
    })?;
    Ok(trimmed.value)
}

/// Starts the peer watcher and the applier on the runtime, until the node is dropped.
pub fn start(node: &Arc<Node>) {
    let Some(regions) = node.regions().cloned() else { return };
    let weak = Arc::downgrade(node);
    let watcher_regions = regions.clone();
    let watcher = weak.clone();
    tokio::spawn(async move {
        let mut round = 0u64;
        loop {
            let Some(node) = watcher.upgrade() else { break };
            let me = node.identity.region.clone();
            for peer in &watcher_regions.peers {
                let _ = hello(&watcher_regions, &me, &node, &peer.region).await;
            }
            round += 1;
            if round.is_multiple_of(20) {
                let n = node.clone();
                let trimmed = tokio::task::spawn_blocking(move || {
                    let n2 = n.clone();
                    n.committer().run_task(move || trim_feed(&n2))
                })
                .await;
                if let Ok(Some(Ok(count))) = trimmed
                    && count > 0
                {
                    tracing::debug!(count, "change records every standby confirmed were trimmed");
                }
            }
            drop(node);
            tokio::time::sleep(PEER_INTERVAL).await;
        }
    });
    tokio::spawn(applier(weak, regions));
}

/// The standby's loop: seed from a snapshot, then pull and apply, holding the region's
/// applier lease.
async fn applier(weak: Weak<Node>, regions: Arc<Regions>) {
    let mut instance = [0u8; 8];
    rand::fill(&mut instance);
    let mut holder = String::new();
    let mut backoff = Duration::from_millis(100);
    // A primary region that is down for an hour is a line per run, one per 10 s, and one
    // when the link is back — not one per retry.
    let mut outage = crate::outage::Outage::new("replication step", crate::outage::Level::Warn);
    loop {
        let Some(node) = weak.upgrade() else { break };
        if holder.is_empty() {
            holder = format!("{}:{}", node.identity.node, hex::encode(instance));
        }
        let outcome = applier_step(&node, &regions, &holder).await;
        drop(node);
        if outcome.is_ok() {
            outage.succeeded();
        }
        match outcome {
            Ok(true) => backoff = Duration::from_millis(100),
            Ok(false) => {
                backoff = Duration::from_millis(100);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => {
                regions.lag.link_up.store(0, Ordering::Relaxed);
                outage.failed("link_down", &err, None);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One step. `Ok(true)`: progress (go again); `Ok(false)`: nothing to do here.
async fn applier_step(node: &Arc<Node>, regions: &Regions, holder: &str) -> Result<bool, String> {
    let lease_key = keys::region_applier_lease();
    let (state, cursor) = {
        let n = node.clone();
        let holder = holder.to_owned();
        tokio::task::spawn_blocking(move || {
            n.store.transact(|tx| -> Result<Option<(RegionState, Cursor)>, ApiError> {
                let Some(state) = load_state(tx)? else { return Ok(None) };
                if state.role != Role::Standby {
                    return Ok(None);
                }
                let now = now_unix_ms();
                let (may, renew) = lease_view(tx, &lease_key, &holder, now, 3000)?;
                if let Some(regions) = n.regions() {
                    regions.lag.applier.store(may, Ordering::Relaxed);
                }
                if !may {
                    return Ok(None);
                }
                if renew {
                    write_lease(tx, &lease_key, &holder, now + 3000)?;
                }
                let cursor = repl::apply::load_cursor(tx, &state.primary).map_err(repl_error)?;
                Ok(Some((state, cursor)))
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .value
        .ok_or(())
        .map_or((None, None), |(s, c)| (Some(s), Some(c)))
    };
    let (Some(state), Some(cursor)) = (state, cursor) else { return Ok(false) };
    let source = state.primary.clone();
    let mut client = regions.client(&source).map_err(|s| s.message().to_owned())?;
    if !cursor.seeded {
        let after_key =
            cursor.snapshot_after.as_deref().map(hex::decode).transpose().map_err(|e| e.to_string())?;
        let chunk = client
            .snapshot(proto::SnapshotRequest {
                region: node.identity.region.clone(),
                epoch: state.epoch,
                after_key: after_key.unwrap_or_default(),
                max_pairs: MAX_SNAPSHOT_PAIRS as u32,
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        regions.lag.link_up.store(1, Ordering::Relaxed);
        let n = node.clone();
        let applied = node
            .committer()
            .run_task(move || {
                let pairs: Vec<(Vec<u8>, Vec<u8>)> =
                    chunk.pairs.into_iter().map(|p| (p.key, p.value)).collect();
                let stamp = chunk.feed_stamp;
                n.store.transact(|tx| {
                    repl::apply_snapshot_chunk(tx, &source, &pairs, Some(&stamp), chunk.done, now_unix_ms())
                })
            })
            .ok_or("the committer is gone")?;
        let cursor = applied.map_err(|e| e.to_string())?.value;
        if cursor.seeded {
            tracing::info!(source = %state.primary, "standby seeded from a snapshot; following the feed");
        }
        return Ok(true);
    }
    let response = client
        .pull(proto::PullRequest {
            region: node.identity.region.clone(),
            epoch: state.epoch,
            after_stamp: cursor.stamp_bytes().unwrap_or_default(),
            audit_next: cursor.audit_next,
            audit_after: cursor.audit_stamp.as_deref().and_then(|s| hex::decode(s).ok()).unwrap_or_default(),
            max_changes: MAX_PULL_CHANGES as u32,
            wait_ms: LONG_POLL.as_millis() as u32,
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    regions.lag.link_up.store(1, Ordering::Relaxed);
    if response.epoch > state.epoch {
        node.learn_epoch(response.epoch, &source, "primary").map_err(|e| e.to_string())?;
    }
    let batch = repl::Batch {
        source: source.clone(),
        epoch: response.epoch,
        changes: response
            .changes
            .into_iter()
            .map(|c| repl::ShippedChange { stamp: c.stamp, record: c.record })
            .collect(),
        audit: repl::AuditShipment {
            first_index: response.audit_first,
            entries: response.audit_entries,
            checkpoints: response.checkpoints.into_iter().map(|c| (c.size, c.note)).collect(),
            last_stamp: (!response.audit_last_stamp.is_empty()).then_some(response.audit_last_stamp),
        },
    };
    let progressed = !batch.changes.is_empty() || !batch.audit.entries.is_empty();
    let n = node.clone();
    let applied = node
        .committer()
        .run_task(move || n.store.transact(|tx| repl::apply_batch(tx, &batch, now_unix_ms())))
        .ok_or("the committer is gone")?
        .map_err(|e| e.to_string())?
        .value;
    let lag = &regions.lag;
    lag.last_contact_unix_ms.store(now_unix_ms(), Ordering::Relaxed);
    let applied_version = applied.cursor.stamp_bytes().map_or(0, |s| stamp_version(&s));
    let behind_versions = stamp_version(&response.head_stamp).saturating_sub(applied_version);
    lag.versions.store(behind_versions, Ordering::Relaxed);
    lag.entries.store(response.log_size.saturating_sub(applied.cursor.audit_next), Ordering::Relaxed);
    let behind_ms = if behind_versions == 0 {
        0
    } else {
        now_unix_ms().saturating_sub(applied.cursor.source_time_unix_ms)
    };
    lag.millis.store(behind_ms, Ordering::Relaxed);
    lag.applied_changes.fetch_add(applied.changes, Ordering::Relaxed);
    lag.last_applied_unix_ms.store(applied.cursor.applied_unix_ms, Ordering::Relaxed);
    Ok(progressed)
}

/// Prometheus lines for the region: role, epoch, and (standby) lag and link.
pub fn render_metrics(node: &Node, state: &RegionState) -> String {
    let Some(regions) = node.regions() else { return String::new() };
    let lag = &regions.lag;
    let role = role_name(state.role);
    let standby = state.role == Role::Standby;
    let g = |a: &AtomicU64| if standby { a.load(Ordering::Relaxed) } else { 0 };
    format!(
        "# HELP arca_region_epoch The cluster epoch this region knows.\n# TYPE arca_region_epoch gauge\n\
         arca_region_epoch {}\n\
         # HELP arca_region_role 1 for this region's role.\n# TYPE arca_region_role gauge\n\
         arca_region_role{{role=\"{role}\",primary=\"{}\"}} 1\n\
         # HELP arca_replication_lag_versions Store versions of the primary's feed not applied here.\n\
         # TYPE arca_replication_lag_versions gauge\narca_replication_lag_versions {}\n\
         # HELP arca_replication_lag_entries Audit entries of the primary's log not received here.\n\
         # TYPE arca_replication_lag_entries gauge\narca_replication_lag_entries {}\n\
         # HELP arca_replication_lag_seconds Age of the oldest change not applied here.\n\
         # TYPE arca_replication_lag_seconds gauge\narca_replication_lag_seconds {}\n\
         # HELP arca_replication_link_up 1 while the last pull from the primary succeeded.\n\
         # TYPE arca_replication_link_up gauge\narca_replication_link_up {}\n\
         # HELP arca_replication_applied_changes_total Change records applied here.\n\
         # TYPE arca_replication_applied_changes_total counter\narca_replication_applied_changes_total {}\n",
        state.epoch,
        state.primary,
        g(&lag.versions),
        g(&lag.entries),
        if standby { lag.seconds() } else { 0.0 },
        u64::from(standby && node.regions().is_some_and(|r| r.standby_link_up(&state.primary))),
        lag.applied_changes.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_seconds_grow_while_the_link_is_down_and_are_zero_before_any_contact() {
        let g = LagGauges::default();
        g.applier.store(true, Ordering::Relaxed);
        assert_eq!(g.seconds(), 0.0, "no contact yet: no made-up lag");
        g.last_contact_unix_ms.store(now_unix_ms() - 2500, Ordering::Relaxed);
        assert!(g.seconds() >= 2.5, "{}", g.seconds());
        // A node that lost the applier lease to another node of its region does not report
        // its own stale pull as growing lag.
        g.applier.store(false, Ordering::Relaxed);
        assert_eq!(g.seconds(), 0.0);
        g.applier.store(true, Ordering::Relaxed);
        g.link_up.store(1, Ordering::Relaxed);
        g.millis.store(40, Ordering::Relaxed);
        assert_eq!(g.seconds(), 0.04);
    }

    #[test]
    fn describes_replicated_keys() {
        assert_eq!(
            describe(&keys::kv_version("secret", "app/db", 3)),
            ("secret".into(), "secret/app/db".into(), Some(3))
        );
        assert_eq!(
            describe(&keys::kv_slot("secret", "app/db", 3)),
            ("secret".into(), "secret/app/db".into(), None)
        );
        assert_eq!(describe(&keys::kv_meta("secret", "app/db")).0, "metadata");
        assert_eq!(describe(&keys::policy("ops")).0, "policy");
        assert_eq!(describe(&keys::token(b"h")).0, "token");
        assert_eq!(describe(b"\xff\x00garbage").0, "unknown");
    }

    #[test]
    fn a_slot_row_takes_its_version_from_the_metadata_in_its_record() {
        use crate::kv::VersionMeta;
        let state = |slot| VersionMeta {
            created_unix_ms: 1,
            deletion_unix_ms: None,
            destroyed: false,
            revoked_unix_ms: None,
            slot,
        };
        let mut meta = Metadata::default();
        meta.versions.insert(6, state(Some(1)));
        meta.versions.insert(7, state(Some(4)));
        meta.versions.insert(8, state(None));
        let meta_key = keys::kv_meta("secret", "app/db");
        // A write of version 7 into slot 4 that prunes the version in slot 2, and a row of
        // another secret's slot 4 whose metadata the record does not carry.
        let ops = vec![
            Op::Clear { key: keys::kv_slot("secret", "app/db", 2) },
            Op::Set { key: keys::kv_slot("secret", "app/db", 4), value: b"ct".to_vec() },
            Op::Set { key: keys::kv_slot("secret", "other", 4), value: b"ct".to_vec() },
            Op::Set { key: meta_key.clone(), value: serde_json::to_vec(&meta).unwrap() },
            Op::Set { key: keys::kv_version("secret", "app/db", 8), value: b"ct".to_vec() },
        ];
        let mut opened = Vec::new();
        let described = describe_ops(&ops, |key, ct| {
            opened.push(key.to_vec());
            serde_json::from_slice(ct).ok()
        });
        let got: Vec<_> = described.iter().map(|d| (d.kind.as_str(), d.path.as_str(), d.version)).collect();
        assert_eq!(
            got,
            vec![
                ("secret", "secret/app/db", None),
                ("secret", "secret/app/db", Some(7)),
                ("secret", "secret/other", None),
                ("metadata", "secret/app/db", None),
                ("secret", "secret/app/db", Some(8)),
            ]
        );
        // The data is bound to the version's own key, never to the slot.
        assert_eq!(described[1].aad, Some(keys::kv_version("secret", "app/db", 7)));
        assert_eq!(described[4].aad, Some(keys::kv_version("secret", "app/db", 8)));
        assert_eq!((described[0].aad.as_ref(), described[2].aad.as_ref()), (None, None));
        // The metadata is opened once per secret, however many of its rows the record holds.
        assert_eq!(opened, vec![meta_key]);
    }

    #[test]
    fn a_region_certificate_names_its_region_and_a_region_refuses_to_start_without_one() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let issue = |sans: &[&str], common_name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params =
                rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
            (params.signed_by(&key, &issuer).unwrap(), key)
        };
        let (named, _) = issue(&["us-east.arca.internal", "us-east"], "whatever");
        assert!(certificate_names_region(named.der(), "us-east"));
        assert!(!certificate_names_region(named.der(), "eu-west"), "another region");
        assert!(!certificate_names_region(named.der(), "us"), "a prefix of a name");
        assert!(!certificate_names_region(named.der(), "us-east.arca"), "a prefix of a name");
        // Only the subjectAltName counts: a common name is no region's name.
        let (by_cn, _) = issue(&["host.example"], "us-east");
        assert!(!certificate_names_region(by_cn.der(), "us-east"));
        assert!(!certificate_names_region(b"not a certificate", "us-east"));
        assert!(!certificate_names_region(named.der(), "us east"), "not a DNS name");
        assert!(!certificate_names_region(named.der(), "US-EAST"), "region names are exact");
        // A wildcard names no region.
        let (wildcard, _) = issue(&["*.arca.internal"], "whatever");
        assert!(!certificate_names_region(wildcard.der(), "eu.arca.internal"));
        assert!(!certificate_names_region(wildcard.der(), "*.arca.internal"));

        // At start, a region whose certificate does not name it is refused with the reason.
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (cert, key) = issue(&["localhost", "eu"], "eu");
        let section = |cert_file: &str| ReplicationSection {
            listen_addr: "127.0.0.1:1".parse().unwrap(),
            tls_cert_file: Some(write(cert_file, &cert.pem())),
            tls_key_file: Some(write("key.pem", &key.serialize_pem())),
            ca_file: Some(write("ca.pem", &ca.pem())),
            dangerous_plaintext: false,
            initial_primary: "eu".into(),
            peers: vec![],
        };
        assert!(Regions::from_config(&section("eu.crt"), "eu").is_ok());
        let refused = Regions::from_config(&section("eu.crt"), "us").unwrap_err().to_string();
        assert!(refused.contains("does not name this region \"us\""), "{refused}");
        let mut empty = section("eu.crt");
        empty.tls_cert_file = Some(write("empty.crt", ""));
        let refused = Regions::from_config(&empty, "eu").unwrap_err().to_string();
        assert!(refused.contains("no certificate"), "{refused}");
    }
}
