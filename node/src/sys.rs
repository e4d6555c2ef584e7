//! Operator and policy endpoints: init, unseal, seal, status, key rotation; policy CRUD.

use std::sync::Arc;

use arca_audit::Operation;
use zeroize::Zeroizing;

use crate::auth::{self, NewToken, TokenSpec};
use crate::barrier::{self, BarrierError, HsmWrapped, Keyring, SealConfig, UnsealProgress};
use crate::error::ApiError;
use crate::keys;
use crate::kv::{DEFAULT_MOUNT, Mount, validate_mount};
use crate::node::{Audited, Env, Node, RequestContext};
use crate::policy::{self, Capability};

/// What `init` hands the operator, once.
pub struct InitResult {
    pub shares: Vec<Zeroizing<String>>,
    pub threshold: u8,
    pub root_token: NewToken,
}

impl std::fmt::Debug for InitResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitResult")
            .field("shares", &self.shares.len())
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

/// The node's seal status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub initialized: bool,
    pub sealed: bool,
    pub shares: u8,
    pub threshold: u8,
    pub progress: u8,
    pub keyring_term: Option<u32>,
    /// `"shamir"` or `"pkcs11"` (the store's seal; empty before init).
    pub seal_type: String,
    /// Why the node is sealed, when it tried to unseal itself and could not.
    pub sealed_reason: Option<String>,
}

/// Where a seal migration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealTarget {
    Shamir,
    Hsm,
}

fn hsm_failed(err: crate::hsm::HsmError) -> ApiError {
    tracing::warn!(error = %err, "the HSM failed");
    ApiError::FailedPrecondition(err.to_string())
}

/// Has the HSM encrypt the unseal key, for the stored seal.
fn hsm_wrap(hsm: &crate::hsm::Pkcs11Seal, unseal: &barrier::SecretKey) -> Result<HsmWrapped, ApiError> {
    use base64::Engine as _;
    let wrapped = hsm.wrap(unseal.expose()).map_err(hsm_failed)?;
    Ok(HsmWrapped {
        key_label: hsm.key_label().to_owned(),
        wrapped_unseal_key: base64::engine::general_purpose::STANDARD.encode(wrapped),
    })
}

/// Needs `update` and `sudo` on `path`.
fn authorize_sudo(env: &mut Env<'_>, path: &str) -> Result<(), ApiError> {
    let record = env.authorize(path, &[Capability::Update])?;
    if !env.allowed(&record, path, &[Capability::Sudo])? {
        return Err(ApiError::PermissionDenied);
    }
    Ok(())
}

fn load_seal(env: &mut Env<'_>) -> Result<Option<SealConfig>, ApiError> {
    match env.tx.get(&keys::seal())? {
        None => Ok(None),
        Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(|_| BarrierError::CorruptSealData.into()),
    }
}

impl Node {
    /// Initializes the store: key hierarchy, Shamir shares, root token.
    pub async fn operator_init(
        self: &Arc<Self>,
        ctx: RequestContext,
        shares: u8,
        threshold: u8,
    ) -> Audited<InitResult> {
        let audited = self
            .execute(ctx, Operation::Init, "sys/init".into(), move |env| {
                if load_seal(env)?.is_some() {
                    return Err(ApiError::FailedPrecondition("the store is already initialized".into()));
                }
                let mut init = barrier::initialize(shares, threshold, env.now_unix_ms)?;
                if let Some(hsm) = env.node.hsm.get() {
                    // The shares become recovery keys; the HSM unseals from now on.
                    init.seal.hsm = Some(hsm_wrap(hsm, &init.unseal)?);
                }
                env.tx
                    .set(&keys::seal(), &serde_json::to_vec(&init.seal).map_err(|_| ApiError::Internal)?)?;
                env.tx.set(&keys::keyring(), &init.wrapped_keyring)?;
                // The root token must be encrypted under the new keyring: unseal with it now.
                // Should the commit fail, the caller seals again.
                env.node.barrier.install(init.unseal.clone(), init.root.clone(), init.keyring.clone());
                let root_token = auth::mint(
                    env,
                    TokenSpec {
                        policies: vec!["root".into()],
                        ttl_secs: None,
                        display_name: "root".into(),
                        entity: "root".into(),
                        renewable: false,
                        parent: None,
                        ..Default::default()
                    },
                )?;
                env.actor.entity = "root".into();
                env.actor.token_accessor = Some(root_token.record.accessor.clone());
                let secret = Mount {
                    name: DEFAULT_MOUNT.into(),
                    description: "key/value secret storage".into(),
                    created_unix_ms: env.now_unix_ms,
                    config: Default::default(),
                };
                env.tx.set(
                    &keys::mount(DEFAULT_MOUNT),
                    &serde_json::to_vec(&secret).map_err(|_| ApiError::Internal)?,
                )?;
                Ok(InitResult { shares: init.shares, threshold, root_token })
            })
            .await;
        if audited.result.is_err() && audited.position.is_none() {
            self.barrier.seal();
        }
        audited
    }

    /// Adds one unseal key share.
    pub async fn operator_unseal(
        self: &Arc<Self>,
        ctx: RequestContext,
        share: Zeroizing<String>,
    ) -> Audited<UnsealProgress> {
        self.execute(ctx, Operation::Unseal, "sys/unseal".into(), move |env| {
            let seal = load_seal(env)?.ok_or(ApiError::NotInitialized)?;
            if !env.node.barrier.is_sealed() {
                return Ok(UnsealProgress { sealed: false, progress: 0, threshold: seal.threshold });
            }
            let wrapped = env.tx.get(&keys::keyring())?.ok_or(BarrierError::CorruptSealData)?;
            Ok(env.node.barrier.submit_share(&seal, &wrapped, &share)?)
        })
        .await
    }

    /// Seals this node (needs `update` and `sudo` on `sys/seal`).
    pub async fn operator_seal(self: &Arc<Self>, ctx: RequestContext) -> Audited<()> {
        let audited = self
            .execute(ctx, Operation::Seal, "sys/seal".into(), move |env| authorize_sudo(env, "sys/seal"))
            .await;
        if audited.result.is_ok() {
            self.barrier.seal();
            self.caches.clear();
            tracing::warn!("node sealed by operator request");
        }
        audited
    }

    pub async fn operator_status(self: &Arc<Self>, ctx: RequestContext) -> Audited<Status> {
        self.execute(ctx, Operation::Status, "sys/seal-status".into(), move |env| {
            let seal = load_seal(env)?;
            Ok(Status {
                initialized: seal.is_some(),
                sealed: env.node.barrier.is_sealed(),
                shares: seal.as_ref().map_or(0, |s| s.shares),
                threshold: seal.as_ref().map_or(0, |s| s.threshold),
                progress: env.node.barrier.progress(),
                keyring_term: env.node.barrier.active_term(),
                seal_type: seal.as_ref().map_or("", |s| s.kind()).to_owned(),
                sealed_reason: if env.node.barrier.is_sealed() {
                    env.node.sealed_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
                } else {
                    None
                },
            })
        })
        .await
    }

    /// Unseals with the HSM (at start, by the node itself; audited as `system:hsm-seal`). On
    /// failure the node stays sealed and `status` says why.
    pub async fn operator_auto_unseal(self: &Arc<Self>) -> Audited<UnsealProgress> {
        let ctx = RequestContext::new(None, arca_audit::Source { address: "local".into(), proxy: None });
        let audited = self
            .execute(ctx, Operation::Unseal, "sys/unseal".into(), move |env| {
                env.actor.entity = "system:hsm-seal".into();
                let hsm = env.node.hsm.get().ok_or_else(|| ApiError::FailedPrecondition("no HSM seal is configured".into()))?;
                let seal = load_seal(env)?.ok_or(ApiError::NotInitialized)?;
                if !env.node.barrier.is_sealed() {
                    return Ok(UnsealProgress { sealed: false, progress: 0, threshold: seal.threshold });
                }
                let Some(wrapped) = &seal.hsm else {
                    return Err(ApiError::FailedPrecondition(
                        "the store is sealed with Shamir keys: unseal with key shares, then run `arca operator migrate-seal --to hsm`".into(),
                    ));
                };
                use base64::Engine as _;
                let blob = base64::engine::general_purpose::STANDARD
                    .decode(&wrapped.wrapped_unseal_key)
                    .map_err(|_| BarrierError::CorruptSealData)?;
                let unseal = barrier::unseal_key_from_bytes(&hsm.unwrap(&blob).map_err(hsm_failed)?)?;
                let root = barrier::open_root(&seal, &unseal).map_err(|_| {
                    ApiError::FailedPrecondition(format!(
                        "the HSM key {:?} did not decrypt this store's unseal key",
                        wrapped.key_label
                    ))
                })?;
                let stored = env.tx.get(&keys::keyring())?.ok_or(BarrierError::CorruptSealData)?;
                let keyring = Keyring::unwrap(&root, &stored)?;
                env.node.barrier.install(unseal, root, keyring);
                Ok(UnsealProgress { sealed: false, progress: 0, threshold: seal.threshold })
            })
            .await;
        *self.sealed_reason.lock().unwrap_or_else(|p| p.into_inner()) =
            audited.result.as_ref().err().map(|e| format!("auto-unseal failed: {e}"));
        audited
    }

    /// Moves the seal between Shamir and the HSM (needs `update` and `sudo` on
    /// `sys/seal/migrate`). The unseal key stays the same, so the existing key shares stay
    /// valid: as recovery keys under the HSM seal, as unseal keys again under Shamir.
    pub async fn operator_migrate_seal(
        self: &Arc<Self>,
        ctx: RequestContext,
        to: SealTarget,
    ) -> Audited<String> {
        self.execute(ctx, Operation::SealMigrate, "sys/seal/migrate".into(), move |env| {
            authorize_sudo(env, "sys/seal/migrate")?;
            let mut seal = load_seal(env)?.ok_or(ApiError::NotInitialized)?;
            let unseal = env.node.barrier.unseal_key()?;
            seal.hsm = match to {
                SealTarget::Shamir => None,
                SealTarget::Hsm => {
                    let hsm = env.node.hsm.get().ok_or_else(|| {
                        ApiError::FailedPrecondition(
                            "this node has no HSM seal configured ([seal] type = \"pkcs11\")".into(),
                        )
                    })?;
                    Some(hsm_wrap(hsm, &unseal)?)
                }
            };
            env.tx.set(&keys::seal(), &serde_json::to_vec(&seal).map_err(|_| ApiError::Internal)?)?;
            Ok(seal.kind().to_owned())
        })
        .await
    }

    /// Adds a keyring term that encrypts from now on (needs `update` on `sys/rotate`).
    pub async fn operator_rotate(self: &Arc<Self>, ctx: RequestContext) -> Audited<u32> {
        let audited = self
            .execute(ctx, Operation::Rotate, "sys/rotate".into(), move |env| {
                env.authorize("sys/rotate", &[Capability::Update])?;
                // Start from the stored keyring: another node may have rotated already.
                let stored = env.tx.get(&keys::keyring())?.ok_or(BarrierError::CorruptSealData)?;
                env.node.barrier.reload_keyring(&stored)?;
                let (next, wrapped) = env.node.barrier.rotated(env.now_unix_ms)?;
                env.tx.set(&keys::keyring(), &wrapped)?;
                Ok(next)
            })
            .await;
        let Audited { result, request_id, position } = audited;
        let result = result.and_then(|next: Keyring| {
            let term = next.active_term();
            self.barrier.install_keyring(next)?;
            Ok(term)
        });
        Audited { result, request_id, position }
    }

    pub async fn policy_write(
        self: &Arc<Self>,
        ctx: RequestContext,
        name: String,
        text: String,
    ) -> Audited<()> {
        let path = format!("sys/policies/acl/{name}");
        self.execute(ctx, Operation::PolicyWrite, path.clone(), move |env| {
            policy::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string()))?;
            if name == "root" {
                return Err(ApiError::invalid("the root policy cannot be changed"));
            }
            policy::parse(&text).map_err(|e| ApiError::invalid(format!("policy: {e}")))?;
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            env.put_sealed(&keys::policy(&name), text.as_bytes())
        })
        .await
    }

    pub async fn policy_read(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<String> {
        let path = format!("sys/policies/acl/{name}");
        self.execute(ctx, Operation::PolicyRead, path.clone(), move |env| {
            policy::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string()))?;
            env.authorize(&path, &[Capability::Read])?;
            let text = env
                .get_sealed(&keys::policy(&name))?
                .ok_or_else(|| ApiError::NotFound("no such policy".into()))?;
            String::from_utf8(text.to_vec()).map_err(|_| ApiError::Internal)
        })
        .await
    }

    pub async fn policy_list(self: &Arc<Self>, ctx: RequestContext) -> Audited<Vec<String>> {
        self.execute(ctx, Operation::PolicyList, "sys/policies/acl".into(), move |env| {
            env.authorize("sys/policies/acl", &[Capability::List])?;
            let mut names = env.names_under(&keys::policies())?;
            names.push("root".to_owned());
            names.sort();
            Ok(names)
        })
        .await
    }

    pub async fn policy_delete(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<()> {
        let path = format!("sys/policies/acl/{name}");
        self.execute(ctx, Operation::PolicyDelete, path.clone(), move |env| {
            policy::validate_name(&name).map_err(|e| ApiError::invalid(e.to_string()))?;
            if name == "root" {
                return Err(ApiError::invalid("the root policy cannot be deleted"));
            }
            env.authorize(&path, &[Capability::Delete])?;
            if env.tx.get(&keys::policy(&name))?.is_none() {
                return Err(ApiError::NotFound("no such policy".into()));
            }
            env.tx.clear(&keys::policy(&name))?;
            Ok(())
        })
        .await
    }
}

fn read_mounts(env: &mut Env<'_>) -> Result<Vec<Mount>, ApiError> {
    let (begin, end) = keys::children_range(&keys::mounts());
    let mut mounts = Vec::new();
    for kv in env.tx.get_range(&begin, &end, Default::default())? {
        mounts.push(serde_json::from_slice(&kv.value).map_err(|_| ApiError::Internal)?);
    }
    Ok(mounts)
}

impl Node {
    /// Enables a KV v2 mount (needs `create`/`update` on `sys/mounts/<name>`).
    pub async fn mount_enable(
        self: &Arc<Self>,
        ctx: RequestContext,
        name: String,
        description: String,
    ) -> Audited<Mount> {
        let path = format!("sys/mounts/{name}");
        self.execute(ctx, Operation::MountWrite, path.clone(), move |env| {
            validate_mount(&name)?;
            if description.len() > 1024 {
                return Err(ApiError::invalid("description: at most 1024 bytes"));
            }
            env.authorize(&path, &[Capability::Create, Capability::Update])?;
            // Mounts do not nest (as Vault's): a path names at most one mount.
            let nested = |a: &str, b: &str| a == b || b.strip_prefix(a).is_some_and(|r| r.starts_with('/'));
            if let Some(taken) =
                read_mounts(env)?.into_iter().find(|m| nested(&m.name, &name) || nested(&name, &m.name))
            {
                return Err(ApiError::invalid(format!("path is already in use at {}/", taken.name)));
            }
            let mount = Mount {
                name: name.clone(),
                description: description.clone(),
                created_unix_ms: env.now_unix_ms,
                config: Default::default(),
            };
            env.tx.set(&keys::mount(&name), &serde_json::to_vec(&mount).map_err(|_| ApiError::Internal)?)?;
            Ok(mount)
        })
        .await
    }

    /// Disables a mount and deletes everything stored in it (needs `delete` on `sys/mounts/<name>`).
    pub async fn mount_disable(self: &Arc<Self>, ctx: RequestContext, name: String) -> Audited<()> {
        let path = format!("sys/mounts/{name}");
        self.execute(ctx, Operation::MountDelete, path.clone(), move |env| {
            validate_mount(&name)?;
            env.authorize(&path, &[Capability::Delete, Capability::Update])?;
            if env.tx.get(&keys::mount(&name))?.is_none() {
                return Err(ApiError::NotFound(format!("no secrets engine mounted at {name}/")));
            }
            let (begin, end) = keys::children_range(&keys::kv_mount(&name));
            env.tx.clear_range(&begin, &end)?;
            env.tx.clear(&keys::mount(&name))?;
            Ok(())
        })
        .await
    }

    /// Lists mounts (needs `read` on `sys/mounts`).
    pub async fn mount_list(self: &Arc<Self>, ctx: RequestContext) -> Audited<Vec<Mount>> {
        self.execute(ctx, Operation::MountList, "sys/mounts".into(), move |env| {
            env.authorize("sys/mounts", &[Capability::Read, Capability::List])?;
            read_mounts(env)
        })
        .await
    }

    /// The mount serving `path` (any authenticated token may ask, as with Vault's
    /// `sys/internal/ui/mounts`).
    pub async fn mount_for_path(self: &Arc<Self>, ctx: RequestContext, path: String) -> Audited<Mount> {
        let audit_path = format!("sys/internal/ui/mounts/{path}");
        self.execute(ctx, Operation::MountRead, audit_path, move |env| {
            env.authenticate()?;
            // Each leading run of segments that could name a mount, shortest first; mounts do
            // not nest, so at most one exists.
            let path = path.trim_start_matches('/');
            let mut end = 0;
            for segment in path.split('/') {
                end += segment.len();
                let candidate = &path[..end];
                if validate_mount(candidate).is_err() {
                    break;
                }
                if let Some(raw) = env.tx.get(&keys::mount(candidate))? {
                    return serde_json::from_slice(&raw).map_err(|_| ApiError::Internal);
                }
                end += 1;
            }
            Err(ApiError::NotFound("no mount serves this path".into()))
        })
        .await
    }
}
