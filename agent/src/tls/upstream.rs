//! Client-side TLS from the agent to origins: the system's roots, plus
//! extra ones from PEM files (`--upstream-ca`, a provider's `ca_file`).

use std::{fmt, net::IpAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    CertificateError, ClientConfig, RootCertStore,
};
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::{client::TlsStream, TlsConnector};

/// The system's trusted roots; certificates it cannot parse are skipped
/// with a warning, as a browser would.
pub fn system_roots() -> RootCertStore {
    let loaded = rustls_native_certs::load_native_certs();
    for error in &loaded.errors {
        tracing::warn!("loading system root certificates: {error}");
    }
    let mut roots = RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::warn!("{ignored} system root certificates could not be parsed and are not trusted");
    }
    roots
}

/// Adds every certificate of the PEM bundle `ca_file` to `roots`; a file
/// that cannot be read or holds no certificate is an error.
pub fn add_pem_roots(roots: &mut RootCertStore, ca_file: &Path) -> Result<()> {
    let shown = ca_file.display();
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("cannot read {shown}"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in {shown}"))?;
    if certificates.is_empty() {
        bail!("no certificate in {shown}");
    }
    for certificate in certificates {
        roots.add(certificate).with_context(|| format!("unusable certificate in {shown}"))?;
    }
    Ok(())
}

/// TLS to the origin of a connection the agent terminated; built once at
/// start-up.
pub struct UpstreamTls {
    /// Offers HTTP/1.1 only.
    http1: TlsConnector,
    /// Offers `h2`, then HTTP/1.1: the origin's answer says which it speaks.
    h2: TlsConnector,
    handshake_timeout: Duration,
}

/// Why the TLS handshake with an origin failed, for the client's 502/504.
#[derive(Debug)]
pub struct UpstreamTlsError {
    pub kind: UpstreamTlsErrorKind,
    /// Names the origin; never secret (no request data is sent before it).
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTlsErrorKind {
    /// The origin's certificate did not verify: unknown issuer, another
    /// name, expired... (a 502: the sandbox is talking to the wrong server).
    VerifyFailed,
    /// Any other failure: an alert, a reset, not TLS at all, no HTTP/1.1 (502).
    HandshakeFailed,
    /// No handshake within the timeout (504).
    Timeout,
}

impl UpstreamTlsErrorKind {
    /// The error's name in response bodies and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VerifyFailed => "upstream_tls_verify_failed",
            Self::HandshakeFailed => "upstream_tls_handshake_failed",
            Self::Timeout => "upstream_tls_timeout",
        }
    }
}

impl fmt::Display for UpstreamTlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for UpstreamTlsError {}

impl UpstreamTls {
    /// `roots`: normally [`system_roots`]; `extra_ca`: a PEM bundle added
    /// to them (`--upstream-ca`). Each handshake gets `handshake_timeout`.
    pub fn new(mut roots: RootCertStore, extra_ca: Option<&Path>, handshake_timeout: Duration) -> Result<Self> {
        if let Some(extra_ca) = extra_ca {
            add_pem_roots(&mut roots, extra_ca)?;
        }
        if roots.is_empty() {
            // Not fatal: only terminated TLS needs them, and the policy may have none.
            tracing::warn!("no trusted root certificates for TLS to origins (none on the system, no --upstream-ca)");
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // An HTTP/1.1 client's requests are relayed as such: no h2 back.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = config.clone();
        h2.alpn_protocols.insert(0, b"h2".to_vec());
        let (http1, h2) = (TlsConnector::from(Arc::new(config)), TlsConnector::from(Arc::new(h2)));
        Ok(Self { http1, h2, handshake_timeout })
    }

    /// The TLS handshake with the origin at the other end of `tcp`, verified
    /// for `name`: a DNS name, or an IP address literal (`[v6]` too).
    /// Offers HTTP/1.1, and `h2` first if `h2`: [`speaks_h2`] tells what the
    /// origin picked.
    pub async fn connect(
        &self,
        name: &str,
        tcp: TcpStream,
        h2: bool,
    ) -> Result<TlsStream<TcpStream>, UpstreamTlsError> {
        let bare = name.strip_prefix('[').and_then(|v6| v6.strip_suffix(']')).unwrap_or(name);
        // "api.example.test (10.0.0.2:443)", or "10.0.0.2:443" when the name is that address.
        let origin = match tcp.peer_addr() {
            Ok(peer) if bare.parse::<IpAddr>() == Ok(peer.ip()) => peer.to_string(),
            Ok(peer) => format!("{name} ({peer})"),
            Err(_) => name.to_owned(),
        };
        let failed = |kind, reason| UpstreamTlsError { kind, reason };
        let server_name = match bare.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(bare.to_owned()).map_err(|_| {
                failed(UpstreamTlsErrorKind::HandshakeFailed, format!("{name:?} is not a valid TLS server name"))
            })?,
        };
        let connector = if h2 { &self.h2 } else { &self.http1 };
        let handshake = timeout(self.handshake_timeout, connector.connect(server_name, tcp)).await;
        match handshake {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(error)) => Err(match certificate_error(&error) {
                Some(cause) => {
                    failed(UpstreamTlsErrorKind::VerifyFailed, format!("certificate verify failed for {name}: {cause}"))
                }
                None => failed(
                    UpstreamTlsErrorKind::HandshakeFailed,
                    format!("TLS handshake with {origin} failed: {error}"),
                ),
            }),
            Err(_elapsed) => Err(failed(
                UpstreamTlsErrorKind::Timeout,
                format!("TLS handshake with {origin} timed out after {} ms", self.handshake_timeout.as_millis()),
            )),
        }
    }
}

/// Whether the origin agreed on `h2` in the handshake of `tls`.
pub fn speaks_h2(tls: &TlsStream<TcpStream>) -> bool {
    tls.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// Why the origin's certificate was refused, if that is why the handshake failed.
fn certificate_error(error: &std::io::Error) -> Option<&CertificateError> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(cause) => Some(cause),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf};

    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;
    use crate::tls::{AgentCa, LeafCache};

    const NAME: &str = "api.example.test";

    /// A file for one test, removed on drop (failing tests included).
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> Self {
            let path = std::env::temp_dir().join(format!("se-upstream-test-{}-{name}", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    async fn listen() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    /// Connects to an origin that serves `leaves`' certificate for `served`, verifying `name`.
    async fn connect_to_leaf(
        upstream: &UpstreamTls,
        leaves: &LeafCache,
        served: &str,
        name: &str,
    ) -> Result<TlsStream<TcpStream>, UpstreamTlsError> {
        let (listener, address) = listen().await;
        let origin = async {
            let (tcp, _) = listener.accept().await.unwrap();
            // The handshake fails there too when the client refuses the certificate.
            let _ = leaves.accept(served, tcp, false).await;
        };
        let client = async { upstream.connect(name, TcpStream::connect(address).await.unwrap(), false).await };
        tokio::join!(origin, client).1
    }

    fn upstream_trusting(ca: &AgentCa, file: &str) -> (UpstreamTls, TempFile) {
        let bundle = TempFile::new(file, ca.cert_pem());
        let upstream = UpstreamTls::new(RootCertStore::empty(), Some(&bundle.0), Duration::from_secs(5)).unwrap();
        (upstream, bundle)
    }

    #[tokio::test]
    async fn an_origin_certified_by_the_upstream_ca_verifies_by_name_and_by_address() {
        let origin_ca = AgentCa::ephemeral();
        let (upstream, _bundle) = upstream_trusting(&origin_ca, "trusted.pem");
        let leaves = LeafCache::new(origin_ca, NonZeroUsize::MIN).unwrap();
        let tls = connect_to_leaf(&upstream, &leaves, NAME, NAME).await.expect("verifies by name");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        connect_to_leaf(&upstream, &leaves, "127.0.0.1", "127.0.0.1").await.expect("verifies by address");
    }

    #[tokio::test]
    async fn a_self_signed_origin_fails_verification_and_the_reason_names_the_host() {
        let origin_ca = AgentCa::ephemeral();
        let (upstream, _bundle) = upstream_trusting(&AgentCa::ephemeral(), "other.pem");
        let self_signed = rcgen::generate_simple_self_signed(vec![NAME.to_owned()]).unwrap();
        let (listener, address) = listen().await;
        let origin = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self_signed.signing_key.serialize_der().into());
            let config =
                rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(vec![self_signed.cert.der().clone()], key)
                    .unwrap();
            let _ = tokio_rustls::TlsAcceptor::from(Arc::new(config)).accept(tcp).await;
        };
        let client = async { upstream.connect(NAME, TcpStream::connect(address).await.unwrap(), false).await };
        let error = tokio::join!(origin, client).1.err().unwrap();
        assert_eq!(error.kind, UpstreamTlsErrorKind::VerifyFailed);
        assert_eq!(error.reason, format!("certificate verify failed for {NAME}: UnknownIssuer"));

        // A trusted certificate for another name is refused too, naming both.
        let (upstream, _bundle) = upstream_trusting(&origin_ca, "wrong-name.pem");
        let leaves = LeafCache::new(origin_ca, NonZeroUsize::MIN).unwrap();
        let error = connect_to_leaf(&upstream, &leaves, "other.example.test", NAME).await.err().unwrap();
        assert_eq!(error.kind, UpstreamTlsErrorKind::VerifyFailed);
        assert!(error.reason.contains(NAME) && error.reason.contains("other.example.test"), "{}", error.reason);
    }

    #[tokio::test]
    async fn an_origin_that_is_not_tls_or_silent_fails_the_handshake_or_times_out() {
        let (upstream, _bundle) = upstream_trusting(&AgentCa::ephemeral(), "plain.pem");
        let (listener, address) = listen().await;
        let origin = async {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
        };
        let client = async { upstream.connect("127.0.0.1", TcpStream::connect(address).await.unwrap(), false).await };
        let error = tokio::join!(origin, client).1.err().unwrap();
        assert_eq!(error.kind, UpstreamTlsErrorKind::HandshakeFailed);
        assert!(error.reason.starts_with(&format!("TLS handshake with {address} failed: ")), "{}", error.reason);

        let upstream = UpstreamTls::new(RootCertStore::empty(), None, Duration::from_millis(50)).unwrap();
        let (_silent, address) = listen().await;
        let error = upstream.connect(NAME, TcpStream::connect(address).await.unwrap(), false).await.err().unwrap();
        assert_eq!(error.kind, UpstreamTlsErrorKind::Timeout);
        assert_eq!(error.reason, format!("TLS handshake with {NAME} ({address}) timed out after 50 ms"));
    }

    #[test]
    fn an_unreadable_or_empty_upstream_ca_is_refused() {
        let missing = Path::new("/nonexistent/upstream-ca.pem");
        let error = UpstreamTls::new(RootCertStore::empty(), Some(missing), Duration::from_secs(1)).err().unwrap();
        assert!(format!("{error:#}").starts_with("cannot read /nonexistent/upstream-ca.pem"), "{error:#}");
        let empty = TempFile::new("empty.pem", "not a certificate\n");
        let error = UpstreamTls::new(RootCertStore::empty(), Some(&empty.0), Duration::from_secs(1)).err().unwrap();
        assert_eq!(error.to_string(), format!("no certificate in {}", empty.0.display()));
    }
}
