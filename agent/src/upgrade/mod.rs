//! `sandbox-egress upgrade`: a new daemon takes over from the running one
//! without a refused connect or a cut connection.
//!
//! The running daemon starts the new binary with the same arguments and
//! one end of a SOCK_SEQPACKET pair, whose number `SANDBOX_EGRESS_UPGRADE_FD`
//! names. Over it, in order:
//!
//! 1. old -> new: every listening socket (SCM_RIGHTS), then the
//!    [`Inventory`] (what each socket is for, the sandboxes, DNS answers);
//! 2. new: serves the sandboxes on those sockets (both daemons accept from
//!    the same backlogs for a moment), attaching its eBPF programs over the
//!    pinned ones as a restart does; -> old: `R` + its pid;
//! 3. old -> new: the [`FinalState`] (DNS answers given meanwhile, recent
//!    denials); new: tells systemd its pid -> old: `A`;
//! 4. old: stops accepting, answers `upgrade` and drains.
//!
//! If the new daemon exits or is silent before step 4 the old one stops it
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
