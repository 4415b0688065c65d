//! One sandbox as its connections see it, and what every sandbox shares.

use std::sync::{atomic::AtomicU64, Arc};

use tokio::sync::Semaphore;

use super::limits::SandboxSlots;
use crate::{
    conn::{Config, Context},
    credentials::Credentials,
    dns::{DnsRecords, DnsResponder, Resolver},
    inference::InferenceRoute,
    observe::Observer,
    policy::PolicyStore,
    redirect::Redirect,
};

/// Counters reported at shutdown.
#[derive(Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Connections with no kernel record: closed, never guessed.
    pub unattributed: AtomicU64,
    /// Connections refused because `max_connections` (in total or from
    /// their sandbox) were in flight.
    pub over_limit: AtomicU64,
}

/// What every sandbox's connections share: made once by the daemon.
pub struct Common {
    pub config: Arc<Config>,
    pub stats: Arc<Stats>,
    /// `--max-connections`, all sandboxes together.
    pub slots: Arc<Semaphore>,
    /// Answers the sandboxes' queries...
    pub dns: Arc<DnsResponder>,
    /// ...and keeps what each was told...
    pub records: Arc<DnsRecords>,
    /// ...beside the agent's own lookups.
    pub resolver: Arc<Resolver>,
    pub credentials: Arc<Credentials>,
    pub observer: Arc<Observer>,
}

/// One sandbox's own parts, made by the daemon when it is added.
pub struct SandboxParts {
    pub name: Arc<str>,
    pub redirect: Redirect,
    pub policies: PolicyStore,
    pub inference: Option<InferenceRoute>,
    /// Set when the sandbox has a network namespace of its own: its
    /// loopback is its own, never the agent's.
    pub own_netns: bool,
    /// Connections of one of its cgroups relayed at once.
    pub max_connections: usize,
}

/// One sandbox, as its connections see it; the daemon-wide parts are shared
/// by every sandbox.
pub struct Sandbox {
    pub name: Arc<str>,
    /// Its listener's port: a connect to it is an explicit proxy request.
    pub listen_port: u16,
    /// The sandbox has a network namespace of its own: its loopback is not the agent's.
    pub own_netns: bool,
    pub redirect: Redirect,
    pub stats: Arc<Stats>,
    pub sandbox_slots: SandboxSlots,
    /// What every route and L7 room sees of it.
    pub context: Context,
    pub dns: Arc<DnsResponder>,
    /// `None` when the sandbox has no inference config.
    pub inference: Option<InferenceRoute>,
    pub observer: Arc<Observer>,
}
