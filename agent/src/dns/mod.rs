//! The sandbox's DNS, answered by the agent (the eBPF side sends every UDP
//! query to port 53 here, and TCP connects to port 53 reach the proxy).
//!
//! `inference.local` gets reserved addresses that the proxy recognises as
//! the managed inference route. Otherwise only names the policy could allow
//! are answered (a host or wildcard of some endpoint, whatever its ports and
//! binaries: DNS has no process to check), for the query types a client
//! needs to connect (A, AAAA, CNAME, HTTPS, SVCB, SRV): those queries go to
//! the host's resolver unchanged. Anything else gets REFUSED without leaving
//! the machine, so DNS cannot carry data out (tunnelling encodes it in the
//! names asked, and reads TXT or NULL answers).
//!
//! Each sandbox (cgroup) has its own query rate and queries in flight, so
//! one flooding sandbox is refused while the others are still answered.
//!
//! The A/AAAA answers are recorded per sandbox (see [`DnsRecords`]): the
//! proxy decides opaque streams by the names the sandbox resolved to the
//! address it connects to, and checks that a name the sandbox claims (SNI,
//! Host) stands for that address, as the sandbox itself was told.
//!
//! The rooms: `responder` answers the sandboxes (UDP and TCP), `records`
//! keeps what each sandbox was told, `budgets` bounds each sandbox's queries
//! and refusal lines, and `resolver` is the agent's own lookups, which the
//! proxy and the inference route use without touching the responder.

mod budgets;
mod records;
mod resolver;
mod responder;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use self::{
    budgets::DnsLimits,
    records::{CarriedRecord, DnsRecords, RecordLimits},
    resolver::Resolver,
    responder::{Asker, AskerOf, CountAnswer, DnsResponder},
};

pub const INFERENCE_HOST: &str = "inference.local";
/// From 240.0.0.0/4 (class E) and 100::/64 (RFC 6666, discard-only): never
/// routed, so never a real destination a sandbox could need.
pub const INFERENCE_V4: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 1);
pub const INFERENCE_V6: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1);

const MAX_MESSAGE: usize = 4096;
/// Sandboxes with records or budget state kept; idle ones (no query in
/// flight, a full bucket) are forgotten first, as they equal a fresh entry.
const MAX_SANDBOXES: usize = 4096;
/// (name, address) pairs recorded per sandbox, beyond which the oldest go.
pub const RECORDS_PER_SANDBOX: usize = 4096;

/// The cgroup id of the sandbox that sent a query; `None` when unknown
/// (such queries share one budget of their own).
pub type Sandbox = Option<u64>;

pub fn is_inference_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip == IpAddr::V4(INFERENCE_V4) || ip == IpAddr::V6(INFERENCE_V6)
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}
