//! L7: HTTP requests on connections to inspected endpoints, each decided by
//! the endpoint's rules before it goes upstream.
//!
//! A protocol is a room: it says whether it reads the body to decide, what
//! the request decision reads of a request ([`Room::classify`]: one call per
//! JSON-RPC message, one operation per GraphQL envelope, the request itself
//! for REST) and how a refusal reads in its own terms ([`Room::refuse`]).
//! The session (`session`) does the rest once for every room: read, pick the
//! endpoint whose `path` selects the request, classify, decide each call,
//! apply credentials, log one line per call, exchange (`exchange`). The
//! rooms: `rest` (REST, and WebSocket upgrades), `jsonrpc` (JSON-RPC and
//! MCP), `graphql`; all see the canonical path of [`crate::wire::path`].

mod body;
mod check;
mod exchange;
mod graphql;
pub mod grpc;
pub mod h2;
mod jsonrpc;
mod log;
mod messages;
mod rest;
mod session;
mod target;
pub mod websocket;

use serde_json::Value;

pub use self::{
    check::{
        check_request, classify_request, decide_calls, decide_request, reader, Allowed, Checked, Decided, Refused,
        RequestBody, Upgrade,
    },
    exchange::{exchange, Exchanged, KEEP_ALIVE_IDLE, VIA},
    messages::classify_text,
    session::{connect, serve, Connected, Upstream},
    target::{Target, Unserved},
};
use crate::{
    conn::refuse::{header_safe, Response, POLICY_HEADER},
    http1::RequestHead,
    policy::{Inspection, Message},
    wire::path::CanonicalTarget,
};

/// The method a WebSocket client text message is decided as.
pub const WEBSOCKET_TEXT: &str = "WEBSOCKET_TEXT";

/// One thing the request decision decides: the request itself, a JSON-RPC
/// call, or a GraphQL operation.
pub struct Call {
    pub message: Message,
    /// A JSON-RPC call's `id` (`null` for a notification), for its refusal.
    pub id: Option<Value>,
}

/// What a room read of one request.
pub struct Classified {
    /// In order; a request is allowed only if every call is.
    pub calls: Vec<Call>,
    /// The body was an array (a JSON-RPC or GraphQL batch): a refusal answers
    /// each call.
    pub batch: bool,
}

impl Classified {
    fn single(message: Message) -> Self {
        Self { calls: vec![Call { message, id: None }], batch: false }
    }
}

/// A request a room cannot read as its protocol: refused before any rule,
/// even under `enforcement: audit`.
#[derive(Debug)]
pub struct Rejected {
    pub reason: String,
    /// Not even well-formed (JSON-RPC's parse error), as opposed to invalid.
    pub unparsable: bool,
}

impl Rejected {
    pub fn invalid(reason: String) -> Self {
        Self { reason, unparsable: false }
    }

    pub fn unparsable(reason: String) -> Self {
        Self { reason, unparsable: true }
    }
}

/// Why a request is refused, for rooms whose refusals say so.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cause {
    /// Not well-formed for its protocol.
    Unparsable,
    /// Well-formed, but not a valid request of its protocol.
    Invalid,
    /// The rules deny it.
    Policy,
    /// A credential could not be applied, or a placeholder does not belong.
    Credential,
}

/// A refused request, for the room to answer in its protocol's terms.
pub struct Refusal<'a> {
    /// 403 for a policy or credential refusal, 502 for an unavailable
    /// credential, 413 for a body over the endpoint's limit.
    pub status: u16,
    /// Machine-readable: `policy_denied`, `credential_not_bound`...
    pub kind: &'a str,
    /// What was refused, e.g. `POST /repos/o/r/issues not permitted by policy`.
    pub detail: &'a str,
    pub reason: &'a str,
    /// The policy and rule that decided, for a policy denial.
    pub policy: Option<&'a str>,
    pub rule: Option<&'a str>,
    pub cause: Cause,
}

/// One protocol's view of the requests of an inspected connection.
pub trait Room: Sync {
    /// Whether the decision needs the request's body (up to the endpoint's
    /// `max_body_bytes`).
    fn reads_body(&self, _head: &RequestHead) -> bool {
        false
    }

    /// What the decision reads of the request; `body` is empty unless
    /// [`Room::reads_body`].
    fn classify(
        &self,
        head: &RequestHead,
        target: &CanonicalTarget,
        body: &[u8],
        inspection: &Inspection,
    ) -> Result<Classified, Rejected>;

    /// The response a refused request gets; `classified` when it was read.
    fn refuse(&self, refusal: &Refusal, classified: Option<&Classified>) -> Response;
}

/// The room that reads an endpoint's requests.
fn room(inspection: &Inspection) -> &'static dyn Room {
    match inspection.protocol {
        "graphql" => &graphql::GraphQl,
        "json-rpc" => &jsonrpc::JsonRpc { mcp: false },
        "mcp" => &jsonrpc::JsonRpc { mcp: true },
        _ => &rest::Rest,
    }
}

/// A JSON body with the refusal's status, naming the policy in a header.
fn json_refusal(refusal: &Refusal, body: &Value) -> Response {
    let mut headers = vec![("Content-Type", "application/json".to_owned())];
    if let Some(policy) = refusal.policy {
        headers.push((POLICY_HEADER, header_safe(policy)));
    }
    Response { status: refusal.status, headers, body: serde_json::to_vec(body).unwrap_or_default() }
}
