//! L7: HTTP requests on connections to inspected endpoints, each decided by
//! the endpoint's rules before it goes upstream.
//!
//! A protocol is a room: it says what the request decision reads of a
//! request ([`Room::classify`]) and how a refusal reads in its own terms
//! ([`Room::refuse`]). The session (`session`) does the rest once for every
//! room: read, classify, decide, apply credentials, log one line, exchange
//! (`exchange`). REST is the room today (`rest`, WebSocket upgrades
//! included), its rules seeing the canonical path of [`crate::wire::path`].

mod exchange;
mod rest;
mod session;

use std::collections::BTreeMap;

pub use self::{
    exchange::{exchange, Exchanged, KEEP_ALIVE_IDLE, VIA},
    session::{check_request, serve, Checked, Target},
};
use crate::{conn::refuse::Response, http1::RequestHead, policy::Inspection};

/// What the request decision reads of one request, as a room classified it.
pub struct Classified {
    /// As sent (rules compare methods in any case).
    pub method: String,
    /// Canonical: what the rules see, the log says and the origin receives.
    pub path: String,
    /// Decoded names to decoded values.
    pub query: BTreeMap<String, Vec<String>>,
    /// The request target to forward, in origin-form.
    pub target: String,
}

/// A refused request, for the room to answer in its protocol's terms.
pub struct Refusal<'a> {
    /// 403 for a policy or credential refusal, 502 for an unavailable credential.
    pub status: u16,
    /// Machine-readable: `policy_denied`, `credential_not_bound`...
    pub kind: &'a str,
    /// What was refused, e.g. `POST /repos/o/r/issues not permitted by policy`.
    pub detail: &'a str,
    pub reason: &'a str,
    /// The policy and rule that decided, for a policy denial.
    pub policy: Option<&'a str>,
    pub rule: Option<&'a str>,
}

/// One protocol's view of the requests of an inspected connection.
pub trait Room: Sync {
    /// The request as the decision reads it; `Err` with a reason refuses it
    /// undecided (a target that has no canonical form, a malformed message).
    fn classify(&self, head: &RequestHead, inspection: &Inspection) -> Result<Classified, String>;

    /// The response a refused request gets.
    fn refuse(&self, refusal: &Refusal) -> Response;
}

/// The room that serves an inspected endpoint's requests.
pub fn room(_inspection: &Inspection) -> &'static dyn Room {
    &rest::Rest
}
