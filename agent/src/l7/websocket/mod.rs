//! WebSocket messages after a `101 Switching Protocols` on an inspected
//! `protocol: websocket` endpoint (RFC 6455, permessage-deflate RFC 7692).
//!
//! What is inspected: every **client text message**, complete (fragments
//! reassembled, inflated, valid UTF-8), goes to the caller's [`Inspector`],
//! which forwards it (rewritten if it likes) as one uncompressed masked
//! frame, or closes both sides with its code and reason; a refused message
//! never reaches the origin.
//!
//! What is not: binary messages (relayed, uncompressed, never decided, as
//! OpenShell does), ping and pong (relayed), the client's close (checked,
//! then relayed), and everything the origin sends, copied to the client
//! byte for byte.
//!
//! Every client frame is parsed and held to RFC 6455 whatever it carries:
//! masked; RSV1 only on the first frame of a compressed message and only
//! with permessage-deflate; no reserved opcode; control frames whole and at
//! most 125 bytes; lengths in their shortest form; continuations only
//! inside a message and data frames only outside one; at most
//! [`Limits::max_fragments`] frames a message; close codes an endpoint may
//! send. A breach closes both sides with 1002; a text message over
//! [`Limits::max_text`] (after inflation too) or a binary one over
//! [`Limits::max_binary`] with 1009 (1009 for binary too, where OpenShell
//! says 1002: the RFC's code for a message too big to process, and the
//! client learns what went wrong); text that is not UTF-8 with 1007; a text
//! message still incomplete after [`Limits::text_total`], or with no byte
//! for [`Limits::text_idle`], with 1002; a new policy generation with 1012.
//! Each close the relay sends carries a short reason.
//!
//! permessage-deflate: [`offer`] forwards the client's permessage-deflate
//! offers (and nothing else) so client and origin negotiate it; [`accept`]
//! holds the origin's answer to them. The relay then inflates each
//! compressed client message (one context across messages unless
//! `client_no_context_takeover`), and sends the origin every message
//! uncompressed: RSV1 clear is valid in a compressed session, and the
//! origin's own inflater never sees a byte from us, so its context cannot
//! go wrong. A compressed message is never relayed uninspected. The
//! origin's messages reach the client compressed, as the origin sent them.

mod client;
mod extensions;
pub mod frame;
#[cfg(test)]
mod interop;
mod relay;
#[cfg(test)]
mod testing;

pub use self::{
    client::{ClientFrames, Progress, Step},
    extensions::{accept, offer, Deflate, Offer},
    frame::POLICY_VIOLATION,
    relay::{relay, Ended, Outcome},
};

use std::time::Duration;

/// What the session decides for one complete client text message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextVerdict {
    /// Forward it (possibly rewritten, e.g. a credential placeholder
    /// replaced).
    Forward(String),
    /// Close both sides with this code (1008 for a policy denial) and
    /// reason; the message is not forwarded.
    Close { code: u16, reason: String },
}

/// Decides each complete client text message (after reassembly,
/// inflation and the UTF-8 check); the decision and its log line are the
/// implementor's.
pub trait Inspector: Send {
    fn text(&mut self, message: &str) -> TextVerdict;
}

/// A close frame's code and reason: what both sides get when the relay ends
/// a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    /// A breach of the protocol (1002).
    pub fn protocol(reason: impl Into<String>) -> Self {
        Self { code: frame::PROTOCOL_ERROR, reason: reason.into() }
    }
}

/// Bounds on what the client may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of one text message, after inflation (1009 over it).
    pub max_text: usize,
    /// Bytes of one binary message, after inflation (1009 over it).
    pub max_binary: u64,
    /// Frames of one message (1002 over it).
    pub max_fragments: usize,
    /// Longest pause in an unfinished text message (1002).
    pub text_idle: Duration,
    /// Longest a text message may take from its first byte to its last (1002).
    pub text_total: Duration,
}

impl Default for Limits {
    /// OpenShell's.
    fn default() -> Self {
        Self {
            max_text: 4 * 1024 * 1024,
            max_binary: 16 * 1024 * 1024,
            max_fragments: 4096,
            text_idle: Duration::from_secs(30),
            text_total: Duration::from_secs(120),
        }
    }
}
