//! One sandbox as its connections see it, and what every sandbox shares.

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Arc, PoisonError, RwLock},
    time::Duration,
};

use tokio::sync::{watch, Notify, Semaphore};

use super::{early::Greeters, limits::SandboxSlots};
use crate::{
    conn::{Config, Context, Decider},
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
    /// Its cgroup's id: the kernel's records name it.
    pub cgroup_id: u64,
    /// Its listener's port.
    pub listen_port: u16,
    pub redirect: Arc<Redirect>,
    pub policies: PolicyStore,
    pub inference: Option<InferenceRoute>,
    /// Set when the sandbox has a network namespace of its own: its
    /// loopback is its own, never the agent's.
    pub own_netns: bool,
    /// Turns true when the daemon stops accepting.
    pub stopping: watch::Receiver<bool>,
    /// Connections of one of its cgroups relayed at once.
    pub max_connections: usize,
    /// Its fast-path generations are this plus its policy's generation.
    pub fast_base: u32,
}

/// One sandbox, as its connections see it; the daemon-wide parts are shared
/// by every sandbox.
pub struct Sandbox {
    pub name: Arc<str>,
    pub cgroup_id: u64,
    /// Every line logged for it is inside this span.
    pub span: tracing::Span,
    /// Its listener's port: a connect to it is an explicit proxy request.
    pub listen_port: u16,
    /// The sandbox has a network namespace of its own: its loopback is not the agent's.
    pub own_netns: bool,
    pub redirect: Arc<Redirect>,
    pub stats: Arc<Stats>,
    pub sandbox_slots: SandboxSlots,
    /// What every route and L7 room sees of it.
    pub context: Context,
    pub dns: Arc<DnsResponder>,
    /// `None` when the sandbox has no inference config.
    pub inference: Option<InferenceRoute>,
    pub observer: Arc<Observer>,
    /// Its destinations whose server spoke first: connected without waiting for the client.
    pub greeters: Greeters,
    fast_base: u32,
}

impl Sandbox {
    /// The kernel fast path's generation for its policy's `generation`.
    pub fn fast_generation(&self, generation: u64) -> u32 {
        self.fast_base.wrapping_add(generation as u32)
    }

    /// The policy generation a fast-path generation stands for, if it is
    /// one of this sandbox's (not of an earlier daemon's).
    pub fn policy_generation_of(&self, fast_generation: u32) -> Option<u64> {
        let generation = u64::from(fast_generation.wrapping_sub(self.fast_base));
        (generation >= 1 && generation <= self.context.decider.policies.current().generation).then_some(generation)
    }

    /// A sandbox ready for its connections, from its parts and what every sandbox shares.
    pub fn new(common: &Common, parts: SandboxParts) -> Arc<Self> {
        let SandboxParts {
            name,
            cgroup_id,
            listen_port,
            redirect,
            policies,
            inference,
            own_netns,
            stopping,
            max_connections,
            fast_base,
        } = parts;
        let span = tracing::info_span!("sandbox", sandbox = %name);
        let observed = common.observer.sandbox(&name);
        let decider = Decider {
            policies,
            records: common.records.clone(),
            resolver: common.resolver.clone(),
            observed: observed.clone(),
        };
        Arc::new(Self {
            name,
            cgroup_id,
            span,
            listen_port,
            own_netns,
            redirect,
            stats: common.stats.clone(),
            sandbox_slots: SandboxSlots::new(max_connections),
            context: Context {
                config: common.config.clone(),
                decider,
                credentials: common.credentials.clone(),
                observed,
                stopping,
            },
            dns: common.dns.clone(),
            inference,
            observer: common.observer.clone(),
            greeters: Greeters::default(),
            fast_base,
        })
    }
}

/// The sandboxes served, by cgroup id: a listener finds each connection's
/// sandbox by the cgroup its kernel record names, so many sandboxes can
/// share one listener.
#[derive(Default)]
pub struct SandboxTable {
    sandboxes: RwLock<HashMap<u64, Arc<Sandbox>>>,
    /// Woken on every insert, for connections waiting for their sandbox.
    inserted: Notify,
}

impl SandboxTable {
    pub fn insert(&self, sandbox: Arc<Sandbox>) {
        self.sandboxes.write().unwrap_or_else(PoisonError::into_inner).insert(sandbox.cgroup_id, sandbox);
        self.inserted.notify_waiters();
    }

    pub fn remove(&self, cgroup_id: u64) {
        self.sandboxes.write().unwrap_or_else(PoisonError::into_inner).remove(&cgroup_id);
    }

    pub fn get(&self, cgroup_id: u64) -> Option<Arc<Sandbox>> {
        self.sandboxes.read().unwrap_or_else(PoisonError::into_inner).get(&cgroup_id).cloned()
    }

    /// The sandbox of `cgroup_id` once it is in the table, for at most `wait`.
    pub async fn wait_for(&self, cgroup_id: u64, wait: Duration) -> Option<Arc<Sandbox>> {
        let waiting = async {
            loop {
                let inserted = self.inserted.notified();
                tokio::pin!(inserted);
                // Registered before the lookup, so an insert in between is not missed.
                inserted.as_mut().enable();
                if let Some(sandbox) = self.get(cgroup_id) {
                    return sandbox;
                }
                inserted.await;
            }
        };
        tokio::time::timeout(wait, waiting).await.ok()
    }
}
