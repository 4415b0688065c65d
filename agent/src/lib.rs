//! sandbox-egress: the agent's modules, as a library so fuzz targets and
//! the `sandbox-egress` binary share them.

pub mod cli;
pub mod conn;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod dns;
pub mod exec;
pub mod http1;
pub mod inference;
pub mod l7;
pub mod logging;
pub mod observe;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod redirect;
pub mod relay;
pub mod rewound;
pub mod sniff;
pub mod ssrf;
pub mod tls;
pub mod upgrade;
pub mod wire;
