//! What the running daemon hands its successor besides the sockets: what
//! each socket is for, the sandboxes as they are now, and the state they
//! built up (DNS answers, recent denials).

use std::{collections::BTreeMap, os::fd::OwnedFd};

use serde::{Deserialize, Serialize};

use crate::{control::SandboxSpec, dns::CarriedRecord, inference::Route, observe::CarriedDenial, proxy::ListenerKind};

/// Sent first, with the sockets.
#[derive(Debug, Serialize, Deserialize)]
pub struct Inventory {
    /// The daemon handing over.
    pub from_pid: u32,
    /// What the i-th socket sent is for.
    pub sockets: Vec<SocketRole>,
    /// Every sandbox served, however it was added (flag, spec file,
    /// control socket), with the inference route it has now.
    pub sandboxes: Vec<CarriedSandbox>,
    /// The DNS answers given so far: name-decided streams go on being
    /// decided the same way.
    pub dns_records: Vec<CarriedRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum SocketRole {
    Control,
    Metrics,
    /// The listener the sandboxes in the daemon's network namespace share.
    Shared {
        kind: ListenerKind,
    },
    /// A sandbox's own listener (its network namespace, or a port of its own).
    Sandbox {
        name: String,
        kind: ListenerKind,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedSandbox {
    pub spec: SandboxSpec,
    /// The route set at run time (`inference set|update`), if any.
    pub route: Option<Route>,
}

/// Sent once the successor is ready and the running daemon has stopped
/// accepting: what it recorded in between, and its recent denials.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FinalState {
    pub dns_records: Vec<CarriedRecord>,
    pub denials: Vec<CarriedDenial>,
}

/// The sockets handed over, by what each is for.
#[derive(Default)]
pub struct HandedSockets {
    pub control: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub shared: Vec<(ListenerKind, OwnedFd)>,
    /// By sandbox name.
    pub sandboxes: BTreeMap<String, Vec<(ListenerKind, OwnedFd)>>,
}

impl HandedSockets {
    pub fn sort(sockets: impl IntoIterator<Item = (SocketRole, OwnedFd)>) -> Self {
        let mut sorted = Self::default();
        for (role, fd) in sockets {
            match role {
                SocketRole::Control => sorted.control = Some(fd),
                SocketRole::Metrics => sorted.metrics = Some(fd),
                SocketRole::Shared { kind } => sorted.shared.push((kind, fd)),
                SocketRole::Sandbox { name, kind } => sorted.sandboxes.entry(name).or_default().push((kind, fd)),
            }
        }
        sorted
    }
}
