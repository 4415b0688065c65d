//! TLS: the agent's CA and the leaf certificates it serves where it
//! terminates a sandbox's TLS; verified TLS from the agent to origins; what
//! sandboxed programs trust (the system roots and the CA, for every runtime).

mod ca;
pub mod cli;
mod leaf;
mod server;
mod trust;
mod upstream;

pub use ca::{AgentCa, DEFAULT_CA_DIR};
pub use leaf::LeafCache;
pub use trust::{load_system_roots, write_readable_file, TrustBundle, TRUSTSTORE_PASSWORD};
pub use upstream::{add_pem_roots, speaks_h2, system_roots, UpstreamTls, UpstreamTlsError, UpstreamTlsErrorKind};

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to an origin or a provider, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
