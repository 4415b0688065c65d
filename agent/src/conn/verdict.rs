//! What a decision says: allowed (where to, by which policy, inspected or
//! not), or denied (the kind, which is the JSON `error` of a 403, and why).

use std::net::{IpAddr, SocketAddr};

use crate::{policy::Inspection, ssrf::AddressClass};

/// Why a connection was refused; `kind` is the JSON `error` of a 403.
#[derive(Debug)]
pub struct Denial {
    pub kind: &'static str,
    pub reason: String,
    pub address_class: Option<&'static str>,
}

impl Denial {
    pub(super) fn policy(reason: String) -> Self {
        Self { kind: "policy_denied", reason, address_class: None }
    }

    pub(super) fn ssrf(ip: IpAddr, reason: String) -> Self {
        Self { kind: "ssrf_denied", reason, address_class: Some(AddressClass::of(ip).name()) }
    }

    pub(super) fn mismatch(reason: String) -> Self {
        Self { kind: "host_mismatch", reason, address_class: None }
    }

    pub fn unresolved(reason: String) -> Self {
        Self { kind: "policy_denied", reason, address_class: None }
    }
}

#[derive(Debug)]
pub struct Allowed {
    /// The address to connect to: always one the checks ran on.
    pub upstream: SocketAddr,
    pub policy: Option<String>,
    /// Set when only an `enforcement: audit` endpoint let it through: what would have denied.
    pub audit: Option<String>,
    /// The name, resolved by the sandbox to the address, that allowed a
    /// stream with no host of its own.
    pub resolved_host: Option<String>,
    /// Set when an inspected endpoint allowed it: each HTTP request is then
    /// decided on its own ([`Decider::request`]).
    pub inspect: Option<Inspection>,
}

pub struct Verdict {
    pub outcome: Result<Allowed, Denial>,
    /// Which policy generation decided (it changes on every reload).
    pub generation: u64,
    /// The port decided on (a CONNECT's or a Host's, not the agent's own
    /// listener), and the address when one was known: what a denial is
    /// kept under for `policy suggest`.
    pub port: u16,
    pub address: Option<IpAddr>,
}
