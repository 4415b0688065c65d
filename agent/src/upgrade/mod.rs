//! `sandbox-egress upgrade`: a new daemon takes over from the running one
//! without a refused connect or a cut connection.
//!
//! The running daemon starts the new binary with the same arguments and
//! one end of a socket pair as descriptor 3 (named by
//! `SANDBOX_EGRESS_UPGRADE_FD`). Over it, in order:
//!
//! 1. old -> new: every listening socket (SCM_RIGHTS), then the
//!    [`Inventory`] (what each socket is for, the sandboxes, DNS answers);
//! 2. new: serves the sandboxes on those sockets, attaching its eBPF
//!    programs over the pinned ones as a restart does; -> old: `R` + its pid;
//! 3. old: stops accepting (the sockets stay open in the new daemon, so
//!    connects wait in the same backlog) -> new: the [`FinalState`];
//! 4. new -> old: `A`; the old daemon answers `upgrade` and drains.
//!
//! If the new daemon exits or is silent before step 2 the old one kills it
//! and goes on as it was.
//!
//! - `transfer`: the channel (packets, SCM_RIGHTS);
//! - `inventory`: what crosses it besides the sockets;
//! - `process`: both ends of the protocol;
//! - `cli`: the `upgrade` command.

pub mod cli;
mod inventory;
mod process;
mod transfer;

pub use self::{
    inventory::{CarriedSandbox, FinalState, HandedSockets, Inventory, SocketRole},
    process::{Predecessor, Successor},
};

/// Names the descriptor of the handover channel in the new daemon.
pub const UPGRADE_FD_ENV: &str = "SANDBOX_EGRESS_UPGRADE_FD";
/// How long `upgrade` drains by default.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10m";
