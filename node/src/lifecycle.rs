//! Secret lifecycle: scheduled, zero-downtime rotation with stages, and revocation.
//!
//! A secret may carry a [`RotationPolicy`] (an interval or a cron schedule, and a
//! [`Rotator`]). A rotation runs four steps — **create** (a new version, staged `pending`,
//! while readers keep getting `current`), **set** and **test** (an external rotator applies
//! and checks it in the target system), **finish** (one transaction: `pending` becomes
//! `current`, the old `current` becomes `previous`). Each step is its own audited
//! transaction and records the next step in the secret's metadata, so a crash anywhere
//! resumes where it stopped; external steps must be idempotent (they may run twice).
//! Built-in rotators (random password, API key, Ed25519/X25519 key pairs) need no set/test.
//!
//! The scheduler runs on one node per region (a lease in the store), every 500 ms: it rotates
//! every secret whose next time has passed — a schedule missed while no node ran is caught up
//! on recovery — and resumes unfinished rotations. External rotators are executables named
//! in the node's rotators directory (never an arbitrary path: writing metadata must not
//! become running commands); they get the step as their argument and JSON on stdin.
//!
//! Revocation (`arca kv revoke`) marks versions revoked and destroys their ciphertext in one
//! transaction; the mark replicates with the metadata, and every node of every region then
//! refuses the version with "revoked" (audited as such).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca_audit::Operation;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::backoff::Backoff;
use crate::error::ApiError;
use crate::keys;
use crate::kv::{self, Metadata, NewVersionStage, STAGE_CURRENT, STAGE_PENDING, STAGE_PREVIOUS, SecretData};
use crate::metrics::Retried;
use crate::node::{Env, Node, RequestContext, now_unix_ms};
use crate::policy::Capability;

/// How and when a secret rotates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Rotate every this many seconds…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    /// …or on this UTC cron schedule (`minute hour day-of-month month day-of-week`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    pub rotator: Rotator,
    pub next_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unix_ms: Option<u64>,
}

/// What makes the new value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rotator {
    /// A random password in `field` (letters and digits, plus symbols when asked).
    Password { field: String, length: u32, symbols: bool },
    /// A random API key in `field` (`bytes` random bytes, base64url).
    ApiKey { field: String, bytes: u32 },
    /// An Ed25519 key pair: `private_key` (the 32-byte seed) and `public_key`, base64.
    Ed25519,
    /// An X25519 key pair: `private_key` and `public_key`, base64.
    X25519,
    /// An executable in the node's rotators directory, driven through create/set/test/finish.
    Exec { command: String },
    /// An HTTP hook (a URL under one of the node's allowed prefixes), POSTed each step.
    Http { url: String },
}

/// The step a rotation under way runs next.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Create,
    Set,
    Test,
    Finish,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Set => "set",
            Step::Test => "test",
            Step::Finish => "finish",
        }
    }

    fn operation(self) -> Operation {
        match self {
            Step::Create => Operation::KvRotateCreate,
            Step::Set => Operation::KvRotateSet,
            Step::Test => Operation::KvRotateTest,
            Step::Finish => Operation::KvRotateFinish,
        }
    }
}

/// A rotation under way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotationState {
    pub step: Step,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_version: Option<u64>,
    pub started_unix_ms: u64,
}

/// What `arca kv rotation set` asks for.
#[derive(Debug, Clone, Default)]
pub struct RotationRequest {
    pub interval_secs: Option<u64>,
    pub schedule: Option<String>,
    /// `password`, `api-key`, `ed25519`, `x25519`, `exec`.
    pub rotator: String,
    pub field: Option<String>,
    pub length: Option<u32>,
    pub symbols: bool,
    pub bytes: Option<u32>,
    pub command: Option<String>,
    pub url: Option<String>,
}

impl RotationRequest {
    fn rotator(&self) -> Result<Rotator, ApiError> {
        let field = || {
            let f = self.field.clone().unwrap_or_else(|| "password".into());
            if f.is_empty() || f.len() > 128 {
                Err(ApiError::invalid("field: 1 to 128 characters"))
            } else {
                Ok(f)
            }
        };
        Ok(match self.rotator.as_str() {
            "password" => {
                let length = self.length.unwrap_or(32);
                if !(12..=256).contains(&length) {
                    return Err(ApiError::invalid("password length: 12 to 256"));
                }
                Rotator::Password { field: field()?, length, symbols: self.symbols }
            }
            "api-key" => {
                let bytes = self.bytes.unwrap_or(32);
                if !(16..=128).contains(&bytes) {
                    return Err(ApiError::invalid("api key bytes: 16 to 128"));
                }
                Rotator::ApiKey { field: field()?, bytes }
            }
            "ed25519" => Rotator::Ed25519,
            "x25519" => Rotator::X25519,
            "http" => {
                let url = self.url.clone().unwrap_or_default();
                if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 1024 {
                    return Err(ApiError::invalid("url: the rotator hook's http(s) URL"));
                }
                Rotator::Http { url }
            }
            "exec" => {
                let command = self.command.clone().unwrap_or_default();
                let ok = !command.is_empty()
                    && command.len() <= 128
                    && command.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    && !command.starts_with('.');
                if !ok {
                    return Err(ApiError::invalid(
                        "command: the name of an executable in the node's rotators directory (a-z, 0-9, '-', '_', '.')",
                    ));
                }
                Rotator::Exec { command }
            }
            _ => return Err(ApiError::invalid("rotator: password, api-key, ed25519, x25519, exec or http")),
        })
    }
}

/// The next time after `after_unix_ms` the policy fires.
fn next_time(
    interval_secs: Option<u64>,
    schedule: Option<&str>,
    after_unix_ms: u64,
) -> Result<u64, ApiError> {
    match (interval_secs, schedule) {
        (Some(secs), None) if (1..=366 * 86_400).contains(&secs) => Ok(after_unix_ms + secs * 1000),
        (Some(_), None) => Err(ApiError::invalid("interval: 1 second to 366 days")),
        (None, Some(cron)) => cron_next(cron, after_unix_ms).map_err(ApiError::invalid),
        _ => Err(ApiError::invalid("give exactly one of an interval and a schedule")),
    }
}

/// One cron field: the values it allows.
fn cron_field(text: &str, min: u32, max: u32) -> Result<Vec<bool>, String> {
    let mut allowed = vec![false; max as usize + 1];
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                (r, s.parse::<u32>().ok().filter(|s| *s > 0).ok_or(format!("bad step in {part:?}"))?)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                a.parse().map_err(|_| format!("bad range {part:?}"))?,
                b.parse().map_err(|_| format!("bad range {part:?}"))?,
            )
        } else {
            let v: u32 = range.parse().map_err(|_| format!("bad value {part:?}"))?;
            (v, v)
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{part:?} is outside {min}-{max}"));
        }
        for v in (lo..=hi).step_by(step as usize) {
            allowed[v as usize] = true;
        }
    }
    Ok(allowed)
}

/// The first minute strictly after `after_unix_ms` that a five-field UTC cron schedule
/// names (day of week 0-6, Sunday = 0; day-of-month and day-of-week must both match).
pub fn cron_next(schedule: &str, after_unix_ms: u64) -> Result<u64, String> {
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = fields.as_slice() else {
        return Err("schedule: five fields, `minute hour day-of-month month day-of-week` (UTC)".into());
    };
    let (minute, hour) = (cron_field(minute, 0, 59)?, cron_field(hour, 0, 23)?);
    let (dom, month, dow) = (cron_field(dom, 1, 31)?, cron_field(month, 1, 12)?, cron_field(dow, 0, 6)?);
    let mut t = (after_unix_ms / 60_000 + 1) * 60; // seconds, next whole minute
    for _ in 0..(366 * 24 * 60) {
        let days = t / 86_400;
        let (y, m, d) = civil_from_days(days as i64);
        let _ = y;
        let weekday = ((days + 4) % 7) as usize; // 1970-01-01 was a Thursday (4, Sunday = 0)
        let secs = t % 86_400;
        if minute[(secs / 60 % 60) as usize]
            && hour[(secs / 3600) as usize]
            && dom[d as usize]
            && month[m as usize]
            && dow[weekday]
        {
            return Ok(t * 1000);
        }
        t += 60;
    }
    Err("schedule: never fires within a year".into())
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn random_string(length: u32, symbols: bool) -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const SYMBOLS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#%+-.:=?@^_~";
    let alphabet = if symbols { SYMBOLS } else { ALNUM };
    // Rejection sampling: no modulo bias.
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::with_capacity(length as usize);
    while out.len() < length as usize {
        let mut buf = [0u8; 64];
        rand::fill(&mut buf);
        for b in buf {
            if (b as usize) < limit && out.len() < length as usize {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    out
}

/// The new data a built-in rotator makes from the current data (other fields kept).
fn generate(rotator: &Rotator, current: &SecretData) -> Option<SecretData> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut data = SecretData(current.0.clone());
    match rotator {
        Rotator::Password { field, length, symbols } => {
            data.0.insert(field.clone(), random_string(*length, *symbols).into());
        }
        Rotator::ApiKey { field, bytes } => {
            let mut raw = Zeroizing::new(vec![0u8; *bytes as usize]);
            rand::fill(&mut raw[..]);
            data.0.insert(
                field.clone(),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..]).into(),
            );
        }
        Rotator::Ed25519 => {
            let mut seed = Zeroizing::new([0u8; 32]);
            rand::fill(&mut seed[..]);
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            data.0.insert("private_key".into(), b64.encode(&seed[..]).into());
            data.0.insert("public_key".into(), b64.encode(key.verifying_key().to_bytes()).into());
        }
        Rotator::X25519 => {
            let mut secret = Zeroizing::new([0u8; 32]);
            rand::fill(&mut secret[..]);
            let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(*secret);
            data.0.insert("private_key".into(), b64.encode(&secret[..]).into());
            data.0.insert("public_key".into(), b64.encode(public.to_bytes()).into());
        }
        Rotator::Exec { .. } | Rotator::Http { .. } => return None,
    }
    Some(data)
}

/// Where the scheduler keeps which secrets rotate, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexEntry {
    mount: String,
    path: String,
}

/// The node's lifecycle settings.
#[derive(Debug, Clone, Default)]
pub struct LifecycleConfig {
    /// Where external rotators live (none: exec rotators are refused).
    pub rotators_dir: Option<PathBuf>,
    /// URL prefixes HTTP rotator hooks may use (none: hooks are refused). Without this list,
    /// anyone who may write a secret's metadata could have the node post it anywhere.
    pub hook_prefixes: Vec<String>,
    /// Scheduler period.
    pub interval: Duration,
}

fn put_index(env: &mut Env<'_>, mount: &str, path: &str, set: bool) -> Result<(), ApiError> {
    let key = keys::rotation_index(mount, path);
    if set {
        let entry = IndexEntry { mount: mount.into(), path: path.into() };
        env.tx.set(&key, &serde_json::to_vec(&entry).map_err(|_| ApiError::Internal)?)?;
    } else {
        env.tx.clear(&key)?;
    }
    Ok(())
}

/// What one step needs from the store, read inside its transaction.
struct StepView {
    step: Step,
    rotator: Rotator,
    current: Option<SecretData>,
    pending: Option<SecretData>,
    pending_version: Option<u64>,
}

impl Node {
    /// Sets (or replaces) a secret's rotation policy; the first rotation is due after one
    /// interval (or at the schedule's next time). Needs `update` on `<mount>/metadata/<path>`.
    pub async fn kv_rotation_set(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        req: RotationRequest,
    ) -> Audited<Metadata> {
        let audit_path = format!("{mount}/metadata/{path}");
        self.execute(ctx, Operation::KvWriteMetadata, audit_path.clone(), move |env| {
            kv::validate_path(&path)?;
            let rotator = req.rotator()?;
            if let Some(s) = &req.schedule
                && s.len() > 128
            {
                return Err(ApiError::invalid("schedule too long"));
            }
            let next = next_time(req.interval_secs, req.schedule.as_deref(), env.now_unix_ms)?;
            if let Rotator::Http { url } = &rotator
                && !env
                    .node
                    .lifecycle
                    .get()
                    .is_some_and(|l| l.hook_prefixes.iter().any(|p| url.starts_with(p.as_str())))
            {
                return Err(ApiError::FailedPrecondition(
                    "this URL is not under an allowed rotator hook prefix of this node".into(),
                ));
            }
            if matches!(rotator, Rotator::Exec { .. })
                && env.node.lifecycle.get().and_then(|l| l.rotators_dir.as_ref()).is_none()
            {
                return Err(ApiError::FailedPrecondition(
                    "this node has no rotators directory: exec rotators are off".into(),
                ));
            }
            env.authorize(&audit_path, &[Capability::Update])?;
            let mut meta = kv::require_meta(env, &mount, &path)?;
            meta.rotation = Some(RotationPolicy {
                interval_secs: req.interval_secs,
                schedule: req.schedule.clone(),
                rotator,
                next_unix_ms: next,
                last_unix_ms: meta.rotation.as_ref().and_then(|r| r.last_unix_ms),
            });
            meta.updated_unix_ms = env.now_unix_ms;
            kv::store_meta(env, &mount, &path, meta.clone())?;
            put_index(env, &mount, &path, true)?;
            Ok(meta)
        })
        .await
    }

    /// Removes a secret's rotation policy (a rotation under way is abandoned; its pending
    /// version stays, unstaged).
    pub async fn kv_rotation_clear(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
    ) -> Audited<Metadata> {
        let audit_path = format!("{mount}/metadata/{path}");
        self.execute(ctx, Operation::KvWriteMetadata, audit_path.clone(), move |env| {
            kv::validate_path(&path)?;
            env.authorize(&audit_path, &[Capability::Update])?;
            let mut meta = kv::require_meta(env, &mount, &path)?;
            meta.rotation = None;
            meta.rotation_state = None;
            meta.stages.remove(STAGE_PENDING);
            kv::store_meta(env, &mount, &path, meta.clone())?;
            put_index(env, &mount, &path, false)?;
            Ok(meta)
        })
        .await
    }

    /// Rotates now (`arca rotate`): needs `update` on `<mount>/rotate/<path>`; runs every step
    /// before answering and returns the new current version.
    pub async fn kv_rotate_now(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
    ) -> Audited<u64> {
        let audit_path = format!("{mount}/rotate/{path}");
        let (m, p) = (mount.clone(), path.clone());
        let asked = self
            .execute(ctx, Operation::KvRotate, audit_path.clone(), move |env| {
                kv::validate_path(&p)?;
                env.authorize(&audit_path, &[Capability::Update])?;
                let meta = kv::require_meta(env, &m, &p)?;
                if meta.rotation.is_none() {
                    return Err(ApiError::FailedPrecondition(
                        "this secret has no rotation policy: set one with `arca kv rotation set`".into(),
                    ));
                }
                Ok(())
            })
            .await;
        let Audited { result, request_id, position } = asked;
        let result = match result {
            Ok(()) => self.rotate(&mount, &path, true).await.and_then(|v| v.ok_or(ApiError::Internal)),
            Err(e) => Err(e),
        };
        Audited { result, request_id, position }
    }

    /// Runs (or resumes) the rotation of one secret to its end, when due or `force`d.
    /// Returns the new current version, or `None` when nothing was due.
    pub(crate) async fn rotate(
        self: &Arc<Self>,
        mount: &str,
        path: &str,
        force: bool,
    ) -> Result<Option<u64>, ApiError> {
        // One rotation of a secret at a time on this node: the scheduler skips a secret being
        // rotated on demand; an on-demand rotation waits for the scheduler's to end.
        let key = (mount.to_owned(), path.to_owned());
        let _guard = loop {
            if let Some(guard) = RotatingGuard::take(self, key.clone()) {
                break guard;
            }
            if !force {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        loop {
            let view = self.step_view(mount, path, force).await?;
            let Some(view) = view else { return Ok(None) };
            if view.step == Step::Finish {
                return self.finish(mount, path).await.map(Some);
            }
            // The external part of the step, outside any transaction (may run again after a crash).
            let created = match (&view.rotator, view.step) {
                (Rotator::Exec { command }, step) => {
                    self.run_rotator(command, step, mount, path, &view).await?
                }
                (Rotator::Http { url }, step) => self.call_hook(url, step, mount, path, &view).await?,
                (builtin, Step::Create) => {
                    generate(builtin, view.current.as_ref().unwrap_or(&SecretData::default()))
                }
                _ => None,
            };
            self.advance(mount, path, view.step, created).await?;
            crate::sequencer::failpoint(&format!("rotation.after-{}", view.step.name()));
        }
    }

    /// Starts a due rotation (or finds the one under way) and reads what its step needs.
    async fn step_view(
        self: &Arc<Self>,
        mount: &str,
        path: &str,
        force: bool,
    ) -> Result<Option<StepView>, ApiError> {
        let (m, p) = (mount.to_owned(), path.to_owned());
        let op = Operation::KvRotateCreate;
        let audited = self
            .execute_system(op, format!("{m}/data/{p}"), move |env| {
                let Some(mut meta) = kv::load_meta(env, &m, &p)? else { return Ok(None) };
                let Some(policy) = meta.rotation.clone() else { return Ok(None) };
                let state = match meta.rotation_state.clone() {
                    Some(state) => state,
                    None if force || policy.next_unix_ms <= env.now_unix_ms => {
                        let state = RotationState {
                            step: Step::Create,
                            pending_version: None,
                            started_unix_ms: env.now_unix_ms,
                        };
                        meta.rotation_state = Some(state.clone());
                        kv::store_meta(env, &m, &p, meta.clone())?;
                        state
                    }
                    None => return Ok(None),
                };
                let read = |env: &mut Env<'_>, v: Option<u64>| -> Result<Option<SecretData>, ApiError> {
                    let Some(v) = v else { return Ok(None) };
                    let Some(vm) = meta.versions.get(&v) else { return Ok(None) };
                    let Some(plain) = kv::read_data(env, &m, &p, v, vm)? else { return Ok(None) };
                    Ok(Some(serde_json::from_slice(&plain).map_err(|_| ApiError::Internal)?))
                };
                let current = read(env, meta.stage(STAGE_CURRENT))?;
                let pending = read(env, state.pending_version)?;
                env.secret_version = state.pending_version;
                Ok(Some(StepView {
                    step: state.step,
                    rotator: policy.rotator,
                    current,
                    pending,
                    pending_version: state.pending_version,
                }))
            })
            .await;
        audited.result
    }

    /// Records a step as done: create writes the pending version; set and test move on.
    async fn advance(
        self: &Arc<Self>,
        mount: &str,
        path: &str,
        step: Step,
        created: Option<SecretData>,
    ) -> Result<(), ApiError> {
        let (m, p) = (mount.to_owned(), path.to_owned());
        let audited = self
            .execute_system(step.operation(), format!("{m}/data/{p}"), move |env| {
                let mut meta = kv::require_meta(env, &m, &p)?;
                let Some(mut state) = meta.rotation_state.clone() else { return Ok(()) };
                if state.step != step {
                    return Ok(()); // another node did it meanwhile
                }
                let builtin = !matches!(
                    meta.rotation.as_ref().map(|r| &r.rotator),
                    Some(Rotator::Exec { .. } | Rotator::Http { .. })
                );
                state.step = match step {
                    Step::Create => {
                        let data = created.clone().ok_or_else(|| {
                            ApiError::FailedPrecondition("the rotator made no new value".into())
                        })?;
                        meta.rotation_state = None; // written below with the version
                        let config = kv::mount_config(env, &m)?;
                        let version = kv::write_version(
                            env,
                            (&m, &config),
                            &p,
                            Some(meta.clone()),
                            &data,
                            NewVersionStage::Pending,
                        )?;
                        meta = kv::require_meta(env, &m, &p)?;
                        state.pending_version = Some(version);
                        if builtin { Step::Finish } else { Step::Set }
                    }
                    Step::Set => Step::Test,
                    Step::Test | Step::Finish => Step::Finish,
                };
                env.secret_version = state.pending_version;
                meta.rotation_state = Some(state);
                kv::store_meta(env, &m, &p, meta)?;
                Ok(())
            })
            .await;
        audited.result
    }

    /// The last step: `pending` becomes `current` in one transaction.
    async fn finish(self: &Arc<Self>, mount: &str, path: &str) -> Result<u64, ApiError> {
        let (m, p) = (mount.to_owned(), path.to_owned());
        let audited = self
            .execute_system(Operation::KvRotateFinish, format!("{m}/data/{p}"), move |env| {
                let mut meta = kv::require_meta(env, &m, &p)?;
                let state = meta.rotation_state.clone().ok_or(ApiError::Internal)?;
                let pending = state.pending_version.ok_or(ApiError::Internal)?;
                if let Some(old) = meta.stage(STAGE_CURRENT) {
                    meta.stages.insert(STAGE_PREVIOUS.into(), old);
                }
                meta.stages.insert(STAGE_CURRENT.into(), pending);
                meta.stages.remove(STAGE_PENDING);
                meta.rotation_state = None;
                let now = env.now_unix_ms;
                if let Some(policy) = meta.rotation.as_mut() {
                    policy.last_unix_ms = Some(now);
                    policy.next_unix_ms = next_time(policy.interval_secs, policy.schedule.as_deref(), now)?;
                }
                meta.updated_unix_ms = now;
                env.secret_version = Some(pending);
                kv::store_meta(env, &m, &p, meta)?;
                Ok(pending)
            })
            .await;
        if let Ok(v) = &audited.result {
            tracing::info!(mount, path, version = v, "secret rotated");
        }
        audited.result
    }

    /// Runs an external rotator's step: `<dir>/<command> <step>`, with JSON on stdin
    /// (`path`, `step`, `pending_version`, `current`, `pending`). For `create` it prints the
    /// new data as a JSON object (the secret's data). Exit 0 is success.
    async fn run_rotator(
        self: &Arc<Self>,
        command: &str,
        step: Step,
        mount: &str,
        path: &str,
        view: &StepView,
    ) -> Result<Option<SecretData>, ApiError> {
        use tokio::io::AsyncWriteExt as _;
        let dir = self
            .lifecycle
            .get()
            .and_then(|l| l.rotators_dir.clone())
            .ok_or_else(|| ApiError::FailedPrecondition("this node has no rotators directory".into()))?;
        let input = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({
                "path": format!("{mount}/{path}"), "step": step.name(), "pending_version": view.pending_version,
                "current": view.current.as_ref().map(|d| &d.0), "pending": view.pending.as_ref().map(|d| &d.0),
            }))
            .map_err(|_| ApiError::Internal)?,
        );
        let mut child = tokio::process::Command::new(dir.join(command))
            .arg(step.name())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ApiError::FailedPrecondition(format!("rotator {command}: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&input).await;
        }
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .map_err(|_| {
                ApiError::FailedPrecondition(format!("rotator {command}: {} timed out", step.name()))
            })?
            .map_err(|e| ApiError::FailedPrecondition(format!("rotator {command}: {e}")))?;
        let stdout = Zeroizing::new(out.stdout);
        if !out.status.success() {
            return Err(ApiError::FailedPrecondition(format!(
                "rotator {command}: {} failed ({})",
                step.name(),
                out.status
            )));
        }
        if step != Step::Create {
            return Ok(None);
        }
        let data: SecretData = serde_json::from_slice(&stdout).map_err(|_| {
            ApiError::FailedPrecondition(format!("rotator {command}: create must print a JSON object"))
        })?;
        Ok(Some(data))
    }

    /// Calls an HTTP rotator hook: POST `url` with the same JSON an exec rotator reads; a 2xx
    /// answer is success, and for `create` its body is the new data (a JSON object).
    async fn call_hook(
        self: &Arc<Self>,
        url: &str,
        step: Step,
        mount: &str,
        path: &str,
        view: &StepView,
    ) -> Result<Option<SecretData>, ApiError> {
        let allowed =
            self.lifecycle.get().is_some_and(|l| l.hook_prefixes.iter().any(|p| url.starts_with(p.as_str())));
        if !allowed {
            return Err(ApiError::FailedPrecondition(
                "the rotator hook's URL is no longer allowed on this node".into(),
            ));
        }
        let body = Zeroizing::new(
            serde_json::to_string(&serde_json::json!({
                "path": format!("{mount}/{path}"), "step": step.name(), "pending_version": view.pending_version,
                "current": view.current.as_ref().map(|d| &d.0), "pending": view.pending.as_ref().map(|d| &d.0),
            }))
            .map_err(|_| ApiError::Internal)?,
        );
        let url = url.to_owned();
        let answer = tokio::task::spawn_blocking(move || -> Result<Zeroizing<String>, String> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(30)))
                .http_status_as_error(false)
                .build()
                .into();
            let mut response = agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.as_str())
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            response
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_string()
                .map(Zeroizing::new)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|e| ApiError::FailedPrecondition(format!("rotator hook: {} failed: {e}", step.name())))?;
        if step != Step::Create {
            return Ok(None);
        }
        let data: SecretData = serde_json::from_str(&answer).map_err(|_| {
            ApiError::FailedPrecondition("rotator hook: create must answer a JSON object".into())
        })?;
        Ok(Some(data))
    }

    /// Revokes versions (none given and not `all`: the current one); their ciphertext is
    /// destroyed. Needs `update` on `<mount>/revoke/<path>`.
    pub async fn kv_revoke(
        self: &Arc<Self>,
        ctx: RequestContext,
        mount: String,
        path: String,
        versions: Vec<u64>,
        all: bool,
    ) -> Audited<Vec<u64>> {
        let audit_path = format!("{mount}/revoke/{path}");
        self.execute(ctx, Operation::KvRevoke, audit_path.clone(), move |env| {
            kv::validate_path(&path)?;
            if versions.len() > 1000 {
                return Err(ApiError::invalid("at most 1000 versions at once"));
            }
            env.authorize(&audit_path, &[Capability::Update])?;
            let mut meta = kv::require_meta(env, &mount, &path)?;
            let targets: Vec<u64> = if all {
                meta.versions.keys().copied().collect()
            } else if versions.is_empty() {
                meta.stage(STAGE_CURRENT).into_iter().collect()
            } else {
                versions.clone()
            };
            let now = env.now_unix_ms;
            let mut revoked = Vec::new();
            for v in targets {
                let Some(vm) = meta.versions.get_mut(&v) else { continue };
                if vm.revoked_unix_ms.is_none() {
                    vm.revoked_unix_ms = Some(now);
                    vm.destroyed = true;
                    env.tx.clear(&vm.data_key(&mount, &path, v))?;
                    revoked.push(v);
                }
            }
            if meta
                .rotation_state
                .as_ref()
                .and_then(|s| s.pending_version)
                .is_some_and(|p| revoked.contains(&p))
            {
                meta.rotation_state = None;
                meta.stages.remove(STAGE_PENDING);
            }
            env.secret_version = revoked.last().copied();
            meta.updated_unix_ms = now;
            kv::store_meta(env, &mount, &path, meta)?;
            Ok(revoked)
        })
        .await
    }
}

use crate::node::Audited;

/// This node is rotating a secret; dropped when the rotation ends (or fails).
struct RotatingGuard {
    node: Arc<Node>,
    key: (String, String),
}

impl RotatingGuard {
    fn take(node: &Arc<Node>, key: (String, String)) -> Option<RotatingGuard> {
        let mut set = node.rotating.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(key.clone()).then(|| RotatingGuard { node: node.clone(), key })
    }
}

impl Drop for RotatingGuard {
    fn drop(&mut self) {
        self.node.rotating.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Starts the rotation scheduler (one active per region, by lease).
pub fn start(node: &Arc<Node>, config: LifecycleConfig) {
    let interval = if config.interval.is_zero() { Duration::from_millis(500) } else { config.interval };
    let _ = node.lifecycle.set(config);
    let node = node.clone();
    tokio::spawn(async move {
        let holder = format!("{}/{}", node.identity.node, rand_id());
        let mut retries = Retries::default();
        loop {
            tokio::time::sleep(interval).await;
            if node.barrier.is_sealed() {
                continue;
            }
            match scheduler_round(&node, &holder, &mut retries).await {
                Ok(()) => {}
                Err(err) => tracing::debug!(error = %err, "rotation round"),
            }
        }
    });
}

fn rand_id() -> String {
    let mut b = [0u8; 6];
    rand::fill(&mut b);
    hex::encode(b)
}

/// The scheduler's memory of what failed: rotations by (mount, path), revocations by lease,
/// and databases the reaper could not reach.
#[derive(Default)]
struct Retries {
    rotations: Backoff<(String, String)>,
    leases: Backoff<String>,
    /// Database connections the reaper could not reach, by name.
    databases: Backoff<String>,
    /// Connections whose interrupted admin password rotation is not finished yet.
    root_rotations: Backoff<String>,
}

async fn scheduler_round(node: &Arc<Node>, holder: &str, retries: &mut Retries) -> Result<(), ApiError> {
    use arca_store::StoreExt as _;
    let lease_key = keys::rotation_lease(&node.identity.region);
    let holder_owned = holder.to_owned();
    let lead = node
        .store
        .transact(|tx| -> Result<bool, ApiError> {
            // A standby (or fenced) region changes nothing: its primary's scheduler rotates,
            // reaps and expires, and the results replicate here.
            match arca_replication::apply::load_state(tx) {
                Ok(Some(state)) if !state.writable() => return Ok(false),
                Ok(_) => {}
                Err(arca_replication::ApplyError::Store(e)) => return Err(ApiError::Store(e)),
                Err(_) => return Ok(false),
            }
            let now = now_unix_ms();
            let (may_lead, renew) = crate::sequencer::lease_view(tx, &lease_key, &holder_owned, now, 5_000)?;
            if may_lead && renew {
                crate::sequencer::write_lease(tx, &lease_key, &holder_owned, now + 5_000)?;
            }
            Ok(may_lead)
        })?
        .value;
    if !lead {
        // Another node tries them now (or none, on a standby); a later lead starts over.
        *retries = Retries::default();
        retries.report(node);
        return Ok(());
    }
    let round = scheduler_tasks(node, retries).await;
    retries.report(node);
    round
}

impl Retries {
    /// `/metrics`: what waits to be tried again, as of this round.
    fn report(&self, node: &Node) {
        let metrics = node.metrics();
        metrics.scheduler_waiting(Retried::Rotation, self.rotations.len());
        metrics.scheduler_waiting(Retried::Revocation, self.leases.len());
        metrics.scheduler_waiting(Retried::Database, self.databases.len());
    }
}

/// The lead scheduler's round: sweeps, the reaper, due rotations.
async fn scheduler_tasks(node: &Arc<Node>, retries: &mut Retries) -> Result<(), ApiError> {
    use arca_store::StoreExt as _;
    if let Err(err) = node.access_expire_sweep().await {
        tracing::debug!(error = %err, "access expiry sweep");
    }
    if let Err(err) = node.reap_expired(&mut retries.leases, &mut retries.databases).await {
        tracing::debug!(error = %err, "lease reaper");
    }
    node.finish_interrupted_rotations(&mut retries.root_rotations).await;
    if !retries.databases.is_empty() {
        // A deleted connection no longer waits (no lease names it: see `db_config_delete`).
        let names = node.store.transact(|tx| crate::node::names_under(tx, &keys::db_connections()));
        match names {
            Ok(names) => retries.databases.keep_only(&names.value.into_iter().collect()),
            Err(err) => tracing::debug!(error = %err, "database connections"),
        }
    }
    if let Err(err) = node.wrap_expire_sweep().await {
        tracing::debug!(error = %err, "wrapped response expiry sweep");
    }
    let prefix = keys::rotation_index_prefix();
    let end = arca_store::prefix_end(&prefix).ok_or(ApiError::Internal)?;
    let rows = node
        .store
        .transact(|tx| -> Result<_, ApiError> {
            Ok(tx.get_range(&prefix, &end, arca_store::RangeOptions::default())?)
        })?
        .value;
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    for row in rows {
        let Ok(entry) = serde_json::from_slice::<IndexEntry>(&row.value) else { continue };
        let key = (entry.mount, entry.path);
        seen.insert(key.clone());
        if !retries.rotations.due(&key, Instant::now()) {
            continue;
        }
        match node.rotate(&key.0, &key.1, false).await {
            Ok(_) => retries.rotations.succeeded(&key),
            Err(err) => {
                let (failures, wait) = retries.rotations.failed(key.clone(), Instant::now());
                node.metrics().scheduler_failed(Retried::Rotation);
                tracing::warn!(
                    mount = %key.0,
                    path = %key.1,
                    error = %err,
                    failures,
                    retry_in_s = wait.as_secs(),
                    "rotation failed; tried again after a wait that doubles with each failure"
                );
            }
        }
    }
    // A secret no longer scheduled (deleted, or its rotation cleared) is forgotten.
    retries.rotations.keep_only(&seen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_schedules_fire_when_they_say() {
        // 2026-11-26 (Thursday) 00:00 UTC.
        let thursday = 1_795_651_200_000;
        assert_eq!(cron_next("30 3 * * *", thursday).unwrap(), thursday + (3 * 60 + 30) * 60_000);
        assert_eq!(cron_next("*/15 * * * *", thursday + 60_000).unwrap(), thursday + 15 * 60_000);
        // Next Monday (day 1) at 00:00: four days on.
        assert_eq!(cron_next("0 0 * * 1", thursday).unwrap(), thursday + 4 * 86_400_000);
        // The first of December.
        assert_eq!(cron_next("0 0 1 12 *", thursday).unwrap(), thursday + 5 * 86_400_000);
        for bad in ["", "* * * *", "61 * * * *", "* 24 * * *", "*/0 * * * *", "a b c d e", "0 0 31 2 *"] {
            assert!(cron_next(bad, thursday).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn built_in_rotators_make_fresh_values_and_keep_other_fields() {
        let current: SecretData = [
            ("user", serde_json::json!("app")),
            ("password", serde_json::json!("old")),
            ("hosts", serde_json::json!(["a", {"port": 5432}])),
        ]
        .into_iter()
        .collect();
        let p = Rotator::Password { field: "password".into(), length: 40, symbols: false };
        let (a, b) = (generate(&p, &current).unwrap(), generate(&p, &current).unwrap());
        assert_eq!(a.0["user"], "app");
        assert_eq!(a.0["hosts"], current.0["hosts"], "a value of any JSON type is kept");
        let password = a.text("password").unwrap();
        assert_eq!(password.len(), 40);
        assert!(password.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.0["password"], b.0["password"]);
        let k = generate(&Rotator::Ed25519, &SecretData::default()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let seed: [u8; 32] = b64.decode(k.text("private_key").unwrap()).unwrap().try_into().unwrap();
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        assert_eq!(b64.decode(k.text("public_key").unwrap()).unwrap(), public);
        let x = generate(&Rotator::X25519, &SecretData::default()).unwrap();
        let secret: [u8; 32] = b64.decode(x.text("private_key").unwrap()).unwrap().try_into().unwrap();
        assert_eq!(
            b64.decode(x.text("public_key").unwrap()).unwrap(),
            curve25519_dalek::MontgomeryPoint::mul_base_clamped(secret).to_bytes()
        );
        let bad = RotationRequest {
            rotator: "exec".into(),
            command: Some("../bin/sh".into()),
            ..Default::default()
        };
        assert!(bad.rotator().is_err(), "a rotator names a file in the rotators directory, nothing else");
    }
}
