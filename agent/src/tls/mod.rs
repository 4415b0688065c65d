//! TLS: the agent's CA and the leaf certificates it serves where it
//! terminates a sandbox's TLS; verified TLS from the agent to origins.

mod ca;
mod leaf;
mod upstream;

pub use ca::{AgentCa, DEFAULT_CA_DIR};
pub use leaf::LeafCache;
pub use upstream::{add_pem_roots, system_roots, UpstreamTls, UpstreamTlsError, UpstreamTlsErrorKind};
