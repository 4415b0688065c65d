//! Server-side TLS settings for connections the agent terminates.

use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::{server::ResolvesServerCertUsingSni, ServerConfig};

/// A server config offering only HTTP/1.1, with no certificate yet: the
/// caller sets `cert_resolver`. Where the origin speaks HTTP/2 (or the
/// client speaks nothing else), the leaf cache offers `h2` first.
pub(super) fn http1_server_config() -> Result<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ResolvesServerCertUsingSni::new()));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
