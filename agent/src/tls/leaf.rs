//! Server-side TLS where the agent terminates a sandbox's connection: a leaf
//! certificate per name, signed by the agent's CA, made on first use and
//! kept in a bounded least-recently-used cache.

use std::{
    io,
    num::NonZeroUsize,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use lru::LruCache;
use rustls::{sign::SingleCertAndKey, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use super::{server::http1_server_config, AgentCa};

/// Leaf certificates by name. The `lru` crate gives O(1) lookups and
/// evictions whatever `--leaf-cache-size` is, where a hand-made map would
/// scan for the oldest entry; its std-hasher build keys a SipHash with a
/// random seed, so names a sandbox picks cannot be made to collide.
pub struct LeafCache {
    ca: AgentCa,
    /// Cloned for each name: its `Arc`s (session cache included) are shared
    /// by all, only the certificate differs.
    base: ServerConfig,
    configs: Mutex<LruCache<String, Configs>>,
}

/// One name's server configs: offering HTTP/1.1, or `h2` and HTTP/1.1.
#[derive(Clone)]
struct Configs {
    http1: Arc<ServerConfig>,
    h2: Arc<ServerConfig>,
}

impl LeafCache {
    pub fn new(ca: AgentCa, capacity: NonZeroUsize) -> Result<Self> {
        Ok(Self { ca, base: http1_server_config()?, configs: Mutex::new(LruCache::new(capacity)) })
    }

    /// The server config for `name` (a DNS name, or an IP address literal
    /// for connections without SNI), offering `h2` if `h2`: made on first
    /// use, then cached.
    pub fn server_config(&self, name: &str, h2: bool) -> io::Result<Arc<ServerConfig>> {
        let configs = self.configs(name)?;
        Ok(if h2 { configs.h2 } else { configs.http1 })
    }

    fn configs(&self, name: &str) -> io::Result<Configs> {
        // Names are case-insensitive: one certificate for every spelling.
        let name = name.to_ascii_lowercase();
        // A miss is made under the lock: a key and a signature take well under
        // a millisecond, and concurrent first connections to one name then
        // share one certificate instead of each making its own.
        let mut configs = self.configs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(config) = configs.get(&name) {
            return Ok(config.clone());
        }
        let leaf = self.ca.leaf(&name).map_err(|error| io::Error::other(format!("{error:#}")))?;
        let mut http1 = self.base.clone();
        http1.cert_resolver = Arc::new(SingleCertAndKey::from(leaf));
        let mut h2 = http1.clone();
        h2.alpn_protocols.insert(0, b"h2".to_vec());
        let made = Configs { http1: Arc::new(http1), h2: Arc::new(h2) };
        configs.put(name, made.clone());
        Ok(made)
    }

    /// Completes the TLS handshake of a sandbox's connection to `name`,
    /// offering `h2` (before HTTP/1.1) if `h2`. `stream` replays the
    /// ClientHello if it was read to sniff it ([`crate::rewound::Rewound`]).
    pub async fn accept<S>(&self, name: &str, stream: S, h2: bool) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        TlsAcceptor::from(self.server_config(name, h2)?).accept(stream).await
    }
}

#[cfg(test)]
mod tests {
    use rustls::{
        pki_types::{pem::PemObject, CertificateDer, ServerName},
        ClientConfig, RootCertStore,
    };
    use tokio_rustls::TlsConnector;

    use super::*;

    fn cache(capacity: usize) -> (LeafCache, RootCertStore) {
        let ca = AgentCa::ephemeral();
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        (LeafCache::new(ca, NonZeroUsize::new(capacity).unwrap()).unwrap(), roots)
    }

    /// A handshake with a client trusting only `roots` and verifying
    /// `server_name`; returns the leaf certificate it was shown and the ALPN.
    async fn handshake(
        leaves: &LeafCache,
        roots: &RootCertStore,
        name: &str,
        server_name: &str,
    ) -> (CertificateDer<'static>, Option<Vec<u8>>) {
        handshake_offering(leaves, roots, name, server_name, false).await
    }

    /// As [`handshake`], the agent offering `h2` if `h2`.
    async fn handshake_offering(
        leaves: &LeafCache,
        roots: &RootCertStore,
        name: &str,
        server_name: &str,
        h2: bool,
    ) -> (CertificateDer<'static>, Option<Vec<u8>>) {
        let mut client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_name = ServerName::try_from(server_name.to_owned()).unwrap();
        let connect = TlsConnector::from(Arc::new(client)).connect(server_name, client_io);
        let (client, server) = tokio::join!(connect, leaves.accept(name, server_io, h2));
        server.expect("the agent completes the handshake");
        let client = client.expect("the client trusts the leaf through the CA");
        let (_, session) = client.get_ref();
        (session.peer_certificates().unwrap()[0].clone(), session.alpn_protocol().map(<[u8]>::to_vec))
    }

    #[tokio::test]
    async fn leaf_verifies_against_the_ca_for_a_dns_name_and_offers_only_http1() {
        let (leaves, roots) = cache(4);
        let (_, alpn) = handshake(&leaves, &roots, "api.example.test", "api.example.test").await;
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test]
    async fn h2_is_offered_only_when_asked_with_the_same_certificate() {
        let (leaves, roots) = cache(4);
        let (http1_leaf, _) = handshake(&leaves, &roots, "api.example.test", "api.example.test").await;
        let (h2_leaf, alpn) = handshake_offering(&leaves, &roots, "api.example.test", "api.example.test", true).await;
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(h2_leaf, http1_leaf);
    }

    #[tokio::test]
    async fn leaf_verifies_against_the_ca_for_an_ip_address() {
        let (leaves, roots) = cache(4);
        handshake(&leaves, &roots, "10.0.0.2", "10.0.0.2").await;
        handshake(&leaves, &roots, "2001:db8::2", "2001:db8::2").await;
    }

    #[tokio::test]
    async fn same_name_same_certificate_and_the_least_recently_used_is_evicted() {
        let (leaves, roots) = cache(2);
        let (a, _) = handshake(&leaves, &roots, "a.test", "a.test").await;
        let (b, _) = handshake(&leaves, &roots, "b.test", "b.test").await;
        assert_eq!(handshake(&leaves, &roots, "A.Test", "a.test").await.0, a, "cached, whatever the case");
        // a was used last: c evicts b.
        handshake(&leaves, &roots, "c.test", "c.test").await;
        assert_eq!(handshake(&leaves, &roots, "a.test", "a.test").await.0, a);
        assert_ne!(handshake(&leaves, &roots, "b.test", "b.test").await.0, b, "b was evicted and made anew");
    }

    #[test]
    fn a_name_that_cannot_be_in_a_certificate_is_an_error() {
        let (leaves, _) = cache(1);
        assert!(leaves.server_config("caf\u{e9}.test", false).is_err());
    }
}
