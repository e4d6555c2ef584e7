//! What a [`Client`](crate::Client) connects to and how: nodes (each optionally labelled with
//! its region), TLS, authentication, retries and timeouts.
//!
//! Key material (tokens, secret ids, private keys) is held in zeroizing buffers and never
//! shown by `Debug`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::Error;

/// One node to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// The node's region, when known: writes refused by a standby ("send writes to the primary
    /// region X") are sent to a node of region X.
    pub region: Option<String>,
}

impl NodeAddr {
    /// Parses `URL` or `REGION=URL`.
    pub fn parse(spec: &str) -> Result<NodeAddr, Error> {
        let spec = spec.trim();
        let (region, url) = match spec.split_once('=') {
            Some((region, url)) if !region.contains("://") => (Some(region.trim().to_owned()), url.trim()),
            _ => (None, spec),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() <= "https://".len() {
            return Err(Error::config(format!("a node address is http(s)://host:port, got {url:?}")));
        }
        if region.as_deref().is_some_and(|r| r.is_empty() || r.contains(char::is_whitespace)) {
            return Err(Error::config(format!("an empty or blank region name in {spec:?}")));
        }
        Ok(NodeAddr { url: url.to_owned(), region })
    }

    /// Parses a comma-separated list of [`NodeAddr::parse`] items (as in `ARCA_ADDR`).
    pub fn parse_list(list: &str) -> Result<Vec<NodeAddr>, Error> {
        let nodes = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(NodeAddr::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if nodes.is_empty() {
            return Err(Error::config("no node address given"));
        }
        Ok(nodes)
    }
}

/// How the client proves who it is.
#[derive(Clone, Default)]
pub enum Auth {
    /// No token: only unauthenticated calls (status, unseal) succeed.
    #[default]
    None,
    /// A token given by the caller.
    Token(Zeroizing<String>),
    /// AppRole login (role id + secret id); the client logs in on first use and again when its
    /// token is refused.
    AppRole { role_id: String, secret_id: Zeroizing<String> },
    /// Login with the client certificate presented over mutual TLS (needs [`Tls::identity`]).
    Certificate,
}

impl Auth {
    pub fn token(token: impl Into<String>) -> Auth {
        Auth::Token(Zeroizing::new(token.into()))
    }

    pub fn app_role(role_id: impl Into<String>, secret_id: impl Into<String>) -> Auth {
        Auth::AppRole { role_id: role_id.into(), secret_id: Zeroizing::new(secret_id.into()) }
    }

    /// Whether the client can obtain a new token by itself.
    pub(crate) fn logs_in(&self) -> bool {
        matches!(self, Auth::AppRole { .. } | Auth::Certificate)
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(*****)"),
            Auth::AppRole { role_id, .. } => {
                write!(f, "AppRole {{ role_id: {role_id:?}, secret_id: ***** }}")
            }
            Auth::Certificate => f.write_str("Certificate"),
        }
    }
}

/// TLS settings for `https://` nodes. The server is verified against [`Tls::ca_pem`].
#[derive(Clone, Default)]
pub struct Tls {
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) identity: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    pub(crate) domain: Option<String>,
}

impl Tls {
    pub fn new() -> Tls {
        Tls::default()
    }

    /// The CA certificate(s) (PEM) the server's certificate must chain to.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Tls {
        self.ca_pem = Some(pem.into());
        self
    }

    /// A client certificate and its private key (PEM), for mutual TLS and [`Auth::Certificate`].
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Tls {
        self.identity = Some((cert_pem.into(), Zeroizing::new(key_pem.into())));
        self
    }

    /// The name the server's certificate is checked against (default: the URL's host).
    pub fn domain(mut self, name: impl Into<String>) -> Tls {
        self.domain = Some(name.into());
        self
    }

    /// Reads the CA and, when given, the client certificate and key from files. A private key
    /// readable by group or others is refused.
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Tls, Error> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::config(format!("{}: {e}", p.display())));
        let mut tls = Tls::new();
        if let Some(ca) = ca {
            tls = tls.ca_pem(read(ca)?);
        }
        match (cert, key) {
            (Some(cert), Some(key)) => {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(key)
                    .map_err(|e| Error::config(format!("{}: {e}", key.display())))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(Error::config(format!(
                        "{}: a private key must not be readable by group or others (chmod 600)",
                        key.display()
                    )));
                }
                tls = tls.identity(read(cert)?, read(key)?);
            }
            (None, None) => {}
            _ => return Err(Error::config("give both a client certificate and its key")),
        }
        Ok(tls)
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity.as_ref().map(|_| "*****"))
            .field("domain", &self.domain)
            .finish()
    }
}

/// Retries of calls that failed without being served (node unreachable, sealed, storage
/// unavailable): each round tries every node once, then waits, doubling the wait up to `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Rounds over the nodes before giving up (at least 1).
    pub rounds: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    /// 5 rounds, 100 ms doubling to 2 s: about 1.5 s of waiting before an error.
    fn default() -> Self {
        Retry { rounds: 5, initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2) }
    }
}

/// Everything a [`Client`](crate::Client) needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// In order of preference: reads go to the first reachable node, writes to the primary
    /// (found by following the nodes' answers).
    pub nodes: Vec<NodeAddr>,
    pub tls: Tls,
    pub auth: Auth,
    pub retry: Retry,
    /// Per connection attempt (default 5 s).
    pub connect_timeout: Duration,
    /// Per call attempt (default 30 s).
    pub request_timeout: Duration,
    /// Mounts of several segments (`team/kv`) the client's paths may start with; without
    /// one, a path's first segment is its mount.
    pub mounts: Vec<String>,
}

impl Config {
    /// One node (or a comma-separated list, see [`NodeAddr::parse_list`]), no auth, defaults.
    pub fn new(nodes: &str) -> Result<Config, Error> {
        Ok(Config {
            nodes: NodeAddr::parse_list(nodes)?,
            tls: Tls::default(),
            auth: Auth::None,
            retry: Retry::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            mounts: Vec::new(),
        })
    }

    /// From the environment, as the `arca` CLI reads it: `ARCA_ADDR` (default
    /// `http://127.0.0.1:8400`; a comma-separated list, items `URL` or `REGION=URL`),
    /// `ARCA_TOKEN`, `ARCA_CACERT`, `ARCA_CLIENT_CERT`, `ARCA_CLIENT_KEY`, `ARCA_MOUNTS`
    /// (comma-separated mounts of several segments).
    pub fn from_env() -> Result<Config, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut config = Config::new(&var("ARCA_ADDR").unwrap_or_else(|| "http://127.0.0.1:8400".into()))?;
        if let Some(token) = var("ARCA_TOKEN") {
            config.auth = Auth::token(token);
        }
        let (ca, cert, key) = (var("ARCA_CACERT"), var("ARCA_CLIENT_CERT"), var("ARCA_CLIENT_KEY"));
        config.tls = Tls::from_files(
            ca.as_deref().map(Path::new),
            cert.as_deref().map(Path::new),
            key.as_deref().map(Path::new),
        )?;
        for mount in var("ARCA_MOUNTS").as_deref().unwrap_or_default().split(',') {
            config = config.mount(mount.trim());
        }
        Ok(config)
    }

    pub fn auth(mut self, auth: Auth) -> Config {
        self.auth = auth;
        self
    }

    pub fn tls(mut self, tls: Tls) -> Config {
        self.tls = tls;
        self
    }

    pub fn retry(mut self, retry: Retry) -> Config {
        self.retry = retry;
        self
    }

    /// Declares a mount of several segments (`team/kv`), so that `team/kv/app/db` names
    /// `app/db` in it (see [`split_path_in`](crate::split_path_in)). Empty: ignored.
    pub fn mount(mut self, name: &str) -> Config {
        let name = name.trim_matches('/');
        if !name.is_empty() && !self.mounts.iter().any(|m| m == name) {
            self.mounts.push(name.to_owned());
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_strictly() {
        let nodes = NodeAddr::parse_list("eu=https://a:8400, http://b:8400").unwrap();
        assert_eq!(nodes[0], NodeAddr { url: "https://a:8400".into(), region: Some("eu".into()) });
        assert_eq!(nodes[1], NodeAddr { url: "http://b:8400".into(), region: None });
        for bad in ["", ",", "a:8400", "eu=", "=http://a", "ftp://x", "http://"] {
            assert!(NodeAddr::parse_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let auth = Auth::app_role("role-1", "s3cr3t-id");
        let tls = Tls::new().identity("CERT", "PRIVATE-KEY-BYTES");
        let text = format!("{auth:?} {:?} {tls:?}", Auth::token("hvs.tok3n"));
        for secret in ["s3cr3t-id", "hvs.tok3n", "PRIVATE-KEY-BYTES"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains("role-1"));
    }
}
