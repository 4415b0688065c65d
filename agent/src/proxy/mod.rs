//! The userspace proxy: the listeners (shared by the sandboxes in the
//! agent's network namespace, one set per sandbox with a namespace of its
//! own), and one connection's walk
//! from accept to its close line. Each kind of connection has a route of
//! its own that owns it to its end; what they share is in [`crate::conn`],
//! the L7 rooms in [`crate::l7`], inference.local in [`crate::inference`].
//!
//! - `sandbox`: one sandbox as its connections see it;
//! - `accept`: listeners served, their DNS and accept loops, each
//!   connection handed to the sandbox its kernel record names;
//! - `connection`: attribute -> limits -> explicit or transparent -> close line;
//! - `route`: a transparent connection, by what its first bytes say;
//! - `early`: server-first streams (connect on the address, first speaker goes);
//! - `fast`: the kernel fast path: decisions offered to it, its close lines;
//! - `passthrough`: TLS without inspection, opaque and silent streams;
//! - `terminate`: TLS (or a tunnel) to an inspected endpoint, into the L7 session;
//! - `plain_http`: the private-IP gate, request by request;
//! - `explicit`: `CONNECT` and absolute-form requests to the agent's own listener.

mod accept;
mod connection;
mod early;
mod explicit;
mod fast;
mod limits;
mod listeners;
mod netns;
mod passthrough;
mod plain_http;
mod route;
mod sandbox;
mod terminate;

pub use self::{
    accept::{serve_listeners, ServedListeners},
    fast::serve_closes,
    listeners::{ListenerKind, Listeners},
    netns::cookie as netns_cookie,
    sandbox::{Common, Sandbox, SandboxParts, SandboxTable, Stats},
};
