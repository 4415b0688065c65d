//! What every sandbox's connections are served with: limits, timeouts, and
//! the TLS the agent speaks itself.

use std::time::Duration;

pub struct Config {
    pub max_connections: usize,
    /// Per cgroup (sandbox) below and including the attached one.
    pub max_connections_per_sandbox: usize,
    pub connect_timeout: Duration,
    /// A relayed connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    pub sniff: crate::sniff::Limits,
    /// Certificates the agent serves where it terminates a sandbox's TLS.
    pub leaf_certs: crate::tls::LeafCache,
    /// TLS from the agent to the origins of terminated connections.
    pub upstream_tls: crate::tls::UpstreamTls,
}
