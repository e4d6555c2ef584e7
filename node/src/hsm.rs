//! The PKCS#11 seal: the unseal key encrypted by an AES-256 key that never leaves an HSM.
//!
//! On `init` (or `migrate-seal --to hsm`) the node finds — or creates — a secret key with the
//! configured label in the token (`CKA_TOKEN`, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`), and
//! asks the HSM to encrypt the unseal key with it (`CKM_AES_GCM`, a fresh 96-bit IV, AAD
//! naming the purpose). On start it asks the HSM to decrypt that blob and unseals. The Shamir
//! shares of the same unseal key remain the recovery keys.
//!
//! Every operation loads the module, opens a session, logs in, and finalizes again: a token
//! that was removed and put back is seen on the next attempt. Errors name the module, token
//! or key that failed and the PKCS#11 return code; they never carry the PIN or key bytes.

use std::fmt;
use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

const IV_LEN: usize = 12;
const AAD: &[u8] = b"arca/v1/unseal-key";

/// Where the PIN comes from. Never inline in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file readable only by its owner (mode 0600 or stricter).
    File(PathBuf),
    /// An environment variable's name.
    Env(String),
}

/// The `[seal]` section of a pkcs11 seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    pub token_label: String,
    pub key_label: String,
    pub pin: PinSource,
}

/// Why the HSM could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("cannot load the PKCS#11 module {module}: {reason}")]
    Module { module: String, reason: String },
    #[error("no HSM token labelled {0:?} is present")]
    NoToken(String),
    #[error("the HSM PIN: {0}")]
    Pin(String),
    #[error("no key labelled {0:?} in the HSM token")]
    NoKey(String),
    #[error("the HSM refused {operation}: {reason}")]
    Refused { operation: &'static str, reason: String },
    #[error("the HSM returned malformed data")]
    Malformed,
}

/// A configured PKCS#11 seal.
pub struct Pkcs11Seal {
    config: Pkcs11Config,
}

impl fmt::Debug for Pkcs11Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Seal")
            .field("module", &self.config.module)
            .field("token", &self.config.token_label)
            .field("key", &self.config.key_label)
            .finish_non_exhaustive()
    }
}

fn refused(operation: &'static str) -> impl Fn(cryptoki::error::Error) -> HsmError {
    move |e| HsmError::Refused { operation, reason: e.to_string() }
}

impl Pkcs11Seal {
    pub fn new(config: Pkcs11Config) -> Self {
        Pkcs11Seal { config }
    }

    pub fn key_label(&self) -> &str {
        &self.config.key_label
    }

    fn pin(&self) -> Result<AuthPin, HsmError> {
        let pin = match &self.config.pin {
            PinSource::File(path) => {
                use std::os::unix::fs::PermissionsExt as _;
                let meta =
                    std::fs::metadata(path).map_err(|e| HsmError::Pin(format!("{}: {e}", path.display())))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(HsmError::Pin(format!(
                        "{} must not be readable by group or others (chmod 600)",
                        path.display()
                    )));
                }
                Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| HsmError::Pin(format!("{}: {e}", path.display())))?,
                )
            }
            PinSource::Env(name) => Zeroizing::new(
                std::env::var(name)
                    .map_err(|_| HsmError::Pin(format!("the environment variable {name} is not set")))?,
            ),
        };
        Ok(AuthPin::from(pin.trim().to_owned()))
    }

    /// Runs `f` in a logged-in session on the configured token.
    fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T, HsmError>) -> Result<T, HsmError> {
        let module = self.config.module.display().to_string();
        let ctx = Pkcs11::new(&self.config.module)
            .map_err(|e| HsmError::Module { module: module.clone(), reason: e.to_string() })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| HsmError::Module { module, reason: e.to_string() })?;
        let mut found = None;
        for slot in ctx.get_slots_with_token().map_err(refused("listing slots"))? {
            let info = ctx.get_token_info(slot).map_err(refused("reading token information"))?;
            if info.label().trim_end() == self.config.token_label {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| HsmError::NoToken(self.config.token_label.clone()))?;
        let session = ctx.open_rw_session(slot).map_err(refused("opening a session"))?;
        session.login(UserType::User, Some(&self.pin()?)).map_err(refused("the login"))?;
        let out = f(&session);
        let _ = session.logout();
        drop(session);
        let _ = ctx.finalize();
        out
    }

    fn find_key(&self, session: &Session) -> Result<Option<ObjectHandle>, HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(self.config.key_label.as_bytes().to_vec()),
        ];
        let found = session.find_objects(&template).map_err(refused("finding the key"))?;
        Ok(found.into_iter().next())
    }

    /// Encrypts `unseal_key` with the HSM key, creating the key first when the token has none
    /// with its label. Returns `iv ‖ ciphertext ‖ tag`.
    pub fn wrap(&self, unseal_key: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.with_session(|session| {
            let key = match self.find_key(session)? {
                Some(key) => key,
                None => {
                    let template = [
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Label(self.config.key_label.as_bytes().to_vec()),
                    ];
                    tracing::info!(key = %self.config.key_label, "creating the seal key in the HSM");
                    session
                        .generate_key(&Mechanism::AesKeyGen, &template)
                        .map_err(refused("creating the key"))?
                }
            };
            let mut iv = [0u8; IV_LEN];
            rand::fill(&mut iv);
            let params =
                GcmParams::new(&mut iv, AAD, 128.into()).map_err(refused("the AES-GCM parameters"))?;
            let ciphertext = session
                .encrypt(&Mechanism::AesGcm(params), key, unseal_key)
                .map_err(refused("encryption"))?;
            let mut out = iv.to_vec();
            out.extend_from_slice(&ciphertext);
            Ok(out)
        })
    }

    /// Decrypts what [`Pkcs11Seal::wrap`] returned.
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        if wrapped.len() <= IV_LEN + 16 {
            return Err(HsmError::Malformed);
        }
        self.with_session(|session| {
            let key =
                self.find_key(session)?.ok_or_else(|| HsmError::NoKey(self.config.key_label.clone()))?;
            let mut iv = [0u8; IV_LEN];
            iv.copy_from_slice(&wrapped[..IV_LEN]);
            let params =
                GcmParams::new(&mut iv, AAD, 128.into()).map_err(refused("the AES-GCM parameters"))?;
            let plain = session
                .decrypt(&Mechanism::AesGcm(params), key, &wrapped[IV_LEN..])
                .map_err(refused("decryption"))?;
            Ok(Zeroizing::new(plain))
        })
    }
}
