//! Connections to providers: name resolution, TCP, and TLS verified against
//! the system roots plus the provider's own `ca_file`.

use std::{fmt, io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::TlsConnector;

use super::provider::BaseUrl;
use crate::{
    dns::Resolver,
    tls::{add_pem_roots, Io},
    wire::host::Host,
};

/// Addresses tried per connect: a name with dozens of records must not turn
/// one request into dozens of connection attempts.
const MAX_ADDRESSES_TRIED: usize = 4;

/// How to reach one provider; built once when the config is loaded.
#[derive(Clone)]
pub struct Connector {
    base_url: BaseUrl,
    /// `None` for http:// providers.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("base_url", &self.base_url.to_string())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

#[derive(Debug)]
pub enum ConnectError {
    Timeout(Duration),
    Failed(String),
}

impl Connector {
    /// `roots`: the system's, shared by every provider; `ca_file` adds to them.
    pub fn new(base_url: &BaseUrl, roots: &RootCertStore, ca_file: Option<&Path>) -> Result<Connector> {
        if !base_url.tls {
            return Ok(Connector { base_url: base_url.clone(), tls: None });
        }
        let mut roots = roots.clone();
        if let Some(ca_file) = ca_file {
            add_pem_roots(&mut roots, ca_file)?;
        }
        if roots.is_empty() {
            bail!("no trusted root certificates: the system has none and no ca_file is given");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = match &base_url.host {
            Host::Name(name) => ServerName::try_from(name.clone()).context("host is not a valid TLS server name")?,
            Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        };
        Ok(Connector { base_url: base_url.clone(), tls: Some((TlsConnector::from(Arc::new(config)), server_name)) })
    }

    /// Resolves, connects and, for https, completes the TLS handshake, all
    /// within `limit`. Errors name the host, never a credential.
    pub async fn connect(&self, limit: Duration, dns: &Resolver) -> Result<Box<dyn Io>, ConnectError> {
        timeout(limit, self.connect_unbounded(dns))
            .await
            .map_err(|_elapsed| ConnectError::Timeout(limit))?
            .map_err(ConnectError::Failed)
    }

    /// The provider's name is resolved by the agent's resolver
    /// (`--dns-server`), as every other name the agent looks up.
    async fn connect_unbounded(&self, dns: &Resolver) -> Result<Box<dyn Io>, String> {
        let host = self.base_url.lookup_host();
        let port = self.base_url.port;
        let addresses = dns.lookup(&host).await?.into_iter().map(|ip| SocketAddr::new(ip, port));
        let mut last_error = None;
        let mut stream = None;
        for address in addresses.take(MAX_ADDRESSES_TRIED) {
            match TcpStream::connect(address).await {
                Ok(connected) => {
                    stream = Some(connected);
                    break;
                }
                Err(error) => last_error = Some(format!("{address}: {error}")),
            }
        }
        let Some(stream) = stream else {
            let reason = last_error.unwrap_or_else(|| "no address".into());
            return Err(format!("cannot connect to {}: {reason}", self.base_url.host_header));
        };
        // Streamed requests and SSE pieces are small: send them at once.
        let _ = stream.set_nodelay(true);
        let Some((connector, server_name)) = &self.tls else {
            return Ok(Box::new(stream));
        };
        let tls = connector
            .connect(server_name.clone(), stream)
            .await
            .map_err(|error| format!("TLS handshake with {} failed: {error}", self.base_url.host_header))?;
        Ok(Box::new(tls))
    }
}

/// Whether `error` says the peer is gone: on a reused connection that means
/// the provider closed it while idle, and the request can go on a new one.
pub fn is_connection_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}
