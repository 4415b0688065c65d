//! What every route of the proxy and every L7 room share, below them all:
//! the per-sandbox context, decisions, the close record, refusals and
//! upstream connects. Nothing here knows a route or a protocol room.
//!
//! - `context`/`config`: one sandbox as a connection sees it;
//! - `origin`: who connected where, from the kernel's record;
//! - `decide`/`verdict`: Rego plus the agent's own checks, and their outcome;
//! - `ledger`: the one close line per connection;
//! - `drain`: connections cut when a drain times out;
//! - `refuse`: resets and the agent's own HTTP/1 responses;
//! - `upstream`: connects to allowed destinations.

mod config;
mod context;
mod decide;
pub mod drain;
mod ledger;
mod origin;
pub mod refuse;
mod upstream;
mod verdict;

pub use self::{
    config::Config,
    context::Context,
    decide::{Decider, FastAllow},
    ledger::{Accepted, CloseLog, InferenceLog},
    origin::{known_exe, Origin},
    upstream::connect_upstream,
    verdict::{Allowed, Denial, Verdict},
};
