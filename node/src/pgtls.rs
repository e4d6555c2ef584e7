//! TLS to PostgreSQL for the dynamic credentials engine ([`crate::database`]): rustls under
//! tokio-postgres, chosen by the connection URL's `sslmode` (libpq's names).
//!
//! - `disable`, `allow`, `prefer` (or none): no TLS. (libpq's `allow` and `prefer` may try
//!   TLS without checking the server; arca never opens an unverified TLS session, so these
//!   mean plaintext: say `require` or stricter to have TLS.)
//! - `require`, `verify-ca`: TLS, the server's chain verified against the connection's CA
//!   certificates (`ca_pem`), or Mozilla's roots when it has none; the host name is not
//!   checked. (libpq's `require` without a root file checks nothing: arca always checks the
//!   chain.)
//! - `verify-full`: the same, and the certificate must name the URL's host.
//!
//! With TLS, a connection may carry a client certificate and its key (`client_cert_pem`,
//! `client_key_pem`), for servers that ask for one (pg_hba's `clientcert=verify-full` or
//! `cert` authentication).
//!
//! libpq's file parameters (`sslrootcert`, `sslcert`, `sslkey`, …) are refused: a file path
//! means nothing on the standby region the connection replicates to, so the certificates and
//! the key travel with the connection, sealed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// How a connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    /// The chain is verified, not the host name.
    VerifyChain,
    /// The chain and the host name are verified.
    VerifyFull,
}

/// Most CA certificates a connection may carry, in bytes of PEM.
pub const MAX_CA_PEM_BYTES: usize = 64 * 1024;

/// The URL to give tokio-postgres (its `sslmode` one it knows: `disable` or `require`) and
/// the TLS mode the URL asks for. Errors name the parameter, never the URL (it holds the
/// admin password).
pub fn prepare(url: &str) -> Result<(String, TlsMode), String> {
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), TlsMode::Off)) };
    let mut mode = TlsMode::Off;
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key {
            "sslmode" => {
                mode = match value {
                    "disable" | "allow" | "prefer" => TlsMode::Off,
                    "require" | "verify-ca" => TlsMode::VerifyChain,
                    "verify-full" => TlsMode::VerifyFull,
                    _ => return Err("sslmode: disable, prefer, require, verify-ca or verify-full".into()),
                };
            }
            "sslrootcert" | "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" | "sslsni" => {
                return Err(format!(
                    "{key}: not supported; give the server's CA certificates as the connection's ca_pem, \
                     a client certificate and key as its client_cert_pem and client_key_pem"
                ));
            }
            _ => kept.push(param),
        }
    }
    kept.push(if mode == TlsMode::Off { "sslmode=disable" } else { "sslmode=require" });
    Ok((format!("{base}?{}", kept.join("&")), mode))
}

/// Parses the PEM CA certificates a connection carries.
pub fn parse_ca(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if pem.len() > MAX_CA_PEM_BYTES {
        return Err(format!("ca_pem: at most {MAX_CA_PEM_BYTES} bytes"));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| "ca_pem: not PEM certificates".to_owned())?;
    if certs.is_empty() {
        return Err("ca_pem: no certificate in it".into());
    }
    let mut roots = RootCertStore::empty();
    for cert in &certs {
        roots.add(cert.clone()).map_err(|e| format!("ca_pem: a certificate is not a CA root: {e}"))?;
    }
    Ok(certs)
}

/// A client certificate (PEM: the certificate, then its chain) and its private key (PEM).
#[derive(Clone, Copy)]
pub struct ClientCert<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

impl std::fmt::Debug for ClientCert<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert").finish_non_exhaustive()
    }
}

/// Parses a client certificate and its key. Errors never echo the key.
pub fn parse_client(
    client: ClientCert<'_>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    if client.cert_pem.len() > MAX_CA_PEM_BYTES || client.key_pem.len() > MAX_CA_PEM_BYTES {
        return Err(format!("client_cert_pem, client_key_pem: at most {MAX_CA_PEM_BYTES} bytes each"));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| "client_cert_pem: not PEM certificates".to_owned())?;
    if certs.is_empty() {
        return Err("client_cert_pem: no certificate in it".into());
    }
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())
        .map_err(|_| "client_key_pem: not a PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned())?;
    Ok((certs, key))
}

/// A tokio-postgres TLS connector over rustls for `mode` (not [`TlsMode::Off`]), trusting
/// `ca_pem`'s certificates, or Mozilla's roots without it; presenting `client`, if given.
pub fn connector(
    mode: TlsMode,
    ca_pem: Option<&str>,
    client: Option<ClientCert<'_>>,
) -> Result<RustlsConnect, String> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in parse_ca(pem)? {
                roots.add(cert).map_err(|e| format!("ca_pem: {e}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("TLS roots: {e}"))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match mode {
        TlsMode::VerifyFull | TlsMode::Off => builder.with_webpki_verifier(verifier),
        TlsMode::VerifyChain => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
        }
    };
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let (certs, key) = parse_client(client)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client_cert_pem, client_key_pem: {e}"))?
        }
    };
    Ok(RustlsConnect(Arc::new(config)))
}

/// Verifies the chain as webpki does, and accepts a certificate that does not name the host
/// (`verify-ca`): webpki checks the name only after the chain held.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS factory over a rustls client configuration.
#[derive(Debug, Clone)]
pub struct RustlsConnect(Arc<ClientConfig>);

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnector;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a TLS server name"))?;
        Ok(RustlsConnector { config: self.0.clone(), name })
    }
}

/// One connection's TLS handshake.
#[derive(Debug)]
pub struct RustlsConnector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnector {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS session to PostgreSQL.
#[derive(Debug)]
pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TlsStream for RustlsStream {
    /// No channel binding: SCRAM runs without it (`SCRAM-SHA-256`), as over libpq's
    /// `channel_binding=prefer` with a server that does not offer it.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_picks_the_mode_and_tokio_postgres_gets_a_mode_it_knows() {
        let base = "postgres://u:p@db:5432/postgres";
        assert_eq!(prepare(base).unwrap(), (base.to_owned(), TlsMode::Off));
        for (mode, expected, passed) in [
            ("disable", TlsMode::Off, "disable"),
            ("prefer", TlsMode::Off, "disable"),
            ("require", TlsMode::VerifyChain, "require"),
            ("verify-ca", TlsMode::VerifyChain, "require"),
            ("verify-full", TlsMode::VerifyFull, "require"),
        ] {
            let (url, got) = prepare(&format!("{base}?connect_timeout=5&sslmode={mode}")).unwrap();
            assert_eq!(got, expected, "{mode}");
            assert_eq!(url, format!("{base}?connect_timeout=5&sslmode={passed}"));
            assert!(url.parse::<tokio_postgres::Config>().is_ok(), "{url}");
        }
    }

    #[test]
    fn unknown_modes_and_file_parameters_are_refused_without_echoing_the_url() {
        for bad in ["sslmode=maybe", "sslrootcert=/etc/ca.pem", "sslkey=/k", "sslmode=verify-full&sslcert=/c"]
        {
            let err = prepare(&format!("postgres://u:s3cret@db/postgres?{bad}")).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.starts_with("ssl"), "{err}");
        }
    }

    #[test]
    fn ca_pem_must_hold_certificates() {
        assert!(parse_ca("").is_err());
        assert!(parse_ca("not pem").is_err());
        assert!(parse_ca(&"x".repeat(MAX_CA_PEM_BYTES + 1)).is_err());
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        assert_eq!(parse_ca(&ca.cert.pem()).unwrap().len(), 1);
        assert!(connector(TlsMode::VerifyFull, Some(&ca.cert.pem()), None).is_ok());
        assert!(connector(TlsMode::VerifyChain, None, None).is_ok());
    }

    #[test]
    fn a_client_certificate_needs_its_own_key_and_errors_never_show_the_key() {
        let client = rcgen::generate_simple_self_signed(vec!["postgres".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["other".into()]).unwrap();
        let (cert_pem, key_pem) = (client.cert.pem(), client.signing_key.serialize_pem());
        let good = ClientCert { cert_pem: &cert_pem, key_pem: &key_pem };
        assert!(connector(TlsMode::VerifyFull, None, Some(good)).is_ok());
        assert!(!format!("{good:?}").contains("PRIVATE KEY"));
        let other_key = other.signing_key.serialize_pem();
        let wrong = ClientCert { cert_pem: &cert_pem, key_pem: &other_key };
        let err = connector(TlsMode::VerifyFull, None, Some(wrong)).err().unwrap();
        assert!(err.starts_with("client_cert_pem, client_key_pem"), "{err}");
        let secret_ish =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleSBtYXRlcmlhbA==\n-----END PRIVATE KEY-----\n";
        for (cert, key) in
            [("not pem", key_pem.as_str()), (cert_pem.as_str(), "not a key"), (cert_pem.as_str(), secret_ish)]
        {
            let err =
                connector(TlsMode::VerifyChain, None, Some(ClientCert { cert_pem: cert, key_pem: key }))
                    .err()
                    .unwrap();
            assert!(err.starts_with("client_"), "{err}");
            assert!(!err.contains("c2VjcmV0"), "{err}");
        }
    }
}
