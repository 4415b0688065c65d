//! Where an inspected connection's requests go, and how they were allowed.

use std::net::SocketAddr;

use crate::policy::Inspection;

/// Where an inspected connection's requests go: the address the policy
/// allowed, over TLS verified for `name` when the client spoke TLS (plain
/// HTTP decides each request's own upstream, and names it here per request).
pub struct Target {
    /// The name the connection was decided on (SNI, CONNECT host, or the
    /// name the sandbox resolved): requests must name it in Host.
    pub name: String,
    pub upstream: SocketAddr,
    /// The first inspected endpoint allowing the connection, with the others.
    pub inspection: Inspection,
    pub tls: bool,
    /// Plain HTTP through the private-IP gate, decided request by request
    /// (not a TLS or CONNECT stream decided once for its host).
    pub via_gate: bool,
}

/// Why no request of a connection can reach the origin (it cannot be
/// reached, its TLS failed, it speaks no HTTP/2 to an HTTP/2-only client):
/// every request decided allowed gets this answer, a refusal still its own.
#[derive(Debug)]
pub struct Unserved {
    /// 502, or 504 for a timeout.
    pub status: u16,
    pub kind: &'static str,
    pub reason: String,
}
