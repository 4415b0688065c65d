//! One daemon, many sandboxes: each a name, a cgroup, a policy, optionally
//! a network namespace and an inference config. The kernel programs are
//! loaded once for all of them; the sandboxes in the daemon's own network
//! namespace share one listener (a sandbox with a namespace of its own, or
//! a port of its own, has its own); sandboxes naming the same policy file
//! share it. Sandboxes come and go at run time (control socket, spec
//! directory); an add, remove or reload never disturbs another sandbox's
//! connections.

pub mod cli;
mod policies;
mod spec_dir;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio_rustls::TlsAcceptor;

pub use spec_dir::follow_dir;

use self::policies::{PolicyFiles, SharedPolicy};
use crate::{
    control::{self, Answer, BoxFuture, ControlRequest, SandboxSpec},
    inference::{Inference, InferenceRoute, RouteChange},
    observe::{DenialFilter, SandboxGauges, Scrape},
    policy::PolicyStore,
    preflight::{self, Cgroup},
    proxy::{self, Common, Listeners, Sandbox, SandboxParts, SandboxTable, ServedListeners},
    redirect::{self, Destination, KernelOptions, Redirect},
};

/// How long in-flight connections may finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Denials shown by `status`.
const STATUS_DENIALS: usize = 20;
/// Denials `policy suggest` reads: with their requests (16 at most, paths
/// of 1 KiB at most), well within a reply line.
const SUGGEST_DENIALS: usize = 128;

/// Sandboxes served at once by default (`run --max-sandboxes`).
pub const DEFAULT_MAX_SANDBOXES: u32 = 4096;

/// What every sandbox is set up with.
pub struct Options {
    /// Sandboxes served at once (`run --max-sandboxes`).
    pub max_sandboxes: usize,
    /// How the kernel programs are loaded (once, for every sandbox).
    pub kernel: KernelOptions,
    /// Every `credential_binding` of a policy must name one of these.
    pub credential_providers: Vec<String>,
    /// inference.local's certificate, signed by the agent's CA.
    pub inference_tls: TlsAcceptor,
    /// The agent CA's certificate (PEM), for `exec`'s trust bundle.
    pub ca_cert_pem: String,
}

struct Running {
    spec: SandboxSpec,
    cgroup: Cgroup,
    sandbox: Arc<Sandbox>,
    inference: Option<Arc<Inference>>,
    /// Its listeners: the shared ones, or its own (stopped when it goes).
    /// Their network namespace is the one `exec` checks a program joins.
    listeners: Arc<ServedListeners>,
    /// Whether they are the daemon's shared listeners.
    shared_listener: bool,
    /// Its policy file, shared with the sandboxes that name it too.
    policy: Arc<SharedPolicy>,
}

pub struct Daemon {
    common: Common,
    options: Options,
    redirect: Arc<Redirect>,
    /// The sandboxes served, as the listeners find them.
    table: Arc<SandboxTable>,
    /// The listener shared by the sandboxes in the daemon's network
    /// namespace, bound on the first one's add.
    shared_listeners: Mutex<Option<Arc<ServedListeners>>>,
    policy_files: PolicyFiles,
    sandboxes: Mutex<BTreeMap<String, Running>>,
}

impl Daemon {
    /// Loads the kernel programs (once for every sandbox to come).
    pub fn new(common: Common, options: Options) -> Result<Self> {
        let redirect = Arc::new(Redirect::load(&options.kernel)?);
        Ok(Self {
            common,
            options,
            redirect,
            table: Arc::default(),
            shared_listeners: Mutex::default(),
            policy_files: PolicyFiles::default(),
            sandboxes: Mutex::default(),
        })
    }

    fn sandboxes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts serving a sandbox: its policy loaded, its listener bound (in
    /// its namespace), its cgroup redirected there. Returns what `sandbox
    /// list` shows of it.
    pub fn add(&self, spec: SandboxSpec) -> Result<Value> {
        spec.check_name()?;
        let mut sandboxes = self.sandboxes();
        if sandboxes.contains_key(&spec.name) {
            bail!("a sandbox named {} is already served (remove it first)", spec.name);
        }
        if sandboxes.len() >= self.options.max_sandboxes {
            bail!(
                "the daemon serves {} sandboxes, its --max-sandboxes: remove one first, or restart the daemon with \
                 a larger --max-sandboxes",
                sandboxes.len()
            );
        }
        let cgroup = preflight::cgroup_v2_dir(&spec.cgroup)?;
        for (name, other) in sandboxes.iter() {
            if cgroup.path.starts_with(&other.cgroup.path) || other.cgroup.path.starts_with(&cgroup.path) {
                bail!(
                    "cgroup {} overlaps sandbox {name}'s cgroup {}: a cgroup tree belongs to one sandbox",
                    cgroup.path.display(),
                    other.cgroup.path.display()
                );
            }
        }
        let policy = self.policy_files.load(&spec.policy, &self.options.credential_providers)?;
        let span = tracing::info_span!("sandbox", sandbox = %spec.name);
        let _entered = span.enter();
        let inference = match &spec.inference_config {
            None => None,
            Some(path) => Some(Arc::new(Inference::load(path)?)),
        };
        let (listeners, shared_listener) = self.listeners_for(&spec)?;
        let parts = SandboxParts {
            name: spec.name.as_str().into(),
            cgroup_id: cgroup.id,
            listen_port: listeners.port,
            redirect: self.redirect.clone(),
            policies: policy.store.clone(),
            inference: inference.clone().map(|inference| InferenceRoute {
                inference,
                tls: self.options.inference_tls.clone(),
                dns: self.common.resolver.clone(),
            }),
            own_netns: spec.netns.is_some(),
            max_connections: spec.max_connections.unwrap_or(self.common.config.max_connections_per_sandbox),
        };
        let sandbox = Sandbox::new(&self.common, parts);
        // In the table before the kernel sends it anything.
        self.table.insert(sandbox.clone());
        let destination = Destination { listen_port: listeners.port, netns_cookie: listeners.netns_cookie };
        if let Err(error) = self.redirect.attach(&cgroup, destination) {
            self.table.remove(cgroup.id);
            return Err(error);
        }
        policy.store.add_sandbox(&spec.name);
        tracing::info!(
            event = "sandbox_added",
            cgroup = %cgroup.path.display(),
            cgroup_id = cgroup.id,
            netns = spec.netns.as_ref().map(|netns| netns.display().to_string()),
            listen_port = listeners.port,
            policy_file = %spec.policy.display(),
            "sandbox added: its cgroup's connects and DNS queries go to this agent"
        );
        let running = Running { spec, cgroup, sandbox, inference, listeners, shared_listener, policy };
        let shown = describe(&running);
        sandboxes.insert(running.spec.name.clone(), running);
        Ok(shown)
    }

    /// The listeners a new sandbox's connects go to: its own in its own
    /// network namespace, or on a port of its own; otherwise the daemon's
    /// shared ones (bound now if none are yet). Also says whether they are the shared ones.
    fn listeners_for(&self, spec: &SandboxSpec) -> Result<(Arc<ServedListeners>, bool)> {
        let own = |port, netns| -> Result<(Arc<ServedListeners>, bool)> {
            let listeners = Listeners::bind(port, netns)?;
            let served = proxy::serve_listeners(&self.common, listeners, self.table.clone(), self.redirect.clone())?;
            Ok((Arc::new(served), false))
        };
        if spec.netns.is_some() {
            return own(spec.listen_port, spec.netns.as_deref());
        }
        let mut shared = self.shared_listeners.lock().unwrap_or_else(PoisonError::into_inner);
        match &*shared {
            Some(listeners) if spec.listen_port == 0 || spec.listen_port == listeners.port => {
                return Ok((listeners.clone(), true));
            }
            Some(_) => return own(spec.listen_port, None),
            None if spec.listen_port != 0 => return own(spec.listen_port, None),
            None => {}
        }
        let (listeners, _) = own(0, None)?;
        tracing::info!(
            event = "shared_listener",
            listen_port = listeners.port,
            "listening for the sandboxes in the daemon's network namespace"
        );
        *shared = Some(listeners.clone());
        Ok((listeners, true))
    }

    /// Stops serving a sandbox. Its cgroup stays attached and closed (the
    /// kernel refuses its connects and datagrams) unless `detach`, which
    /// refuses while processes remain in the cgroup unless `force`. Its
    /// connections in flight run to their end.
    pub fn remove(&self, name: &str, detach: bool, force: bool) -> Result<()> {
        let mut sandboxes = self.sandboxes();
        let running = sandboxes.get(name).with_context(|| format!("no sandbox named {name}"))?;
        if detach && !force {
            let processes = redirect::count_processes(&running.cgroup.path);
            if processes > 0 {
                bail!(
                    "{processes} processes remain in {}: detaching would let their connects go direct; stop them \
                     first, or give --force",
                    running.cgroup.path.display()
                );
            }
        }
        let running = sandboxes.remove(name).expect("checked above");
        if detach {
            self.redirect.detach(&running.cgroup)?;
        } else {
            self.redirect.close(&running.cgroup);
        }
        self.table.remove(running.cgroup.id);
        running.policy.store.remove_sandbox(name);
        tracing::info!(
            event = "sandbox_removed",
            sandbox = name,
            cgroup = %running.cgroup.path.display(),
            detached = detach,
            "{}",
            if detach {
                "sandbox removed and detached: its cgroup's connects go direct again"
            } else {
                "sandbox removed: its cgroup stays redirected, so its connects are refused (fail closed)"
            }
        );
        Ok(())
    }

    /// From a spec file: adds it, or replaces the sandbox `previous` (the
    /// one this file made before) when the spec changed. A spec that does
    /// not load leaves the previous sandbox as it was.
    pub fn apply(&self, spec: SandboxSpec, previous: Option<&str>) -> Result<String> {
        if let Some(previous) = previous {
            let unchanged = self.sandboxes().get(previous).is_some_and(|running| running.spec == spec);
            if unchanged {
                return Ok(spec.name);
            }
            // Checked before the previous one goes: a broken file removes nothing.
            PolicyStore::load(&spec.policy, self.options.credential_providers.clone())?;
            if let Some(path) = &spec.inference_config {
                Inference::load(path)?;
            }
            preflight::cgroup_v2_dir(&spec.cgroup)?;
            if self.sandboxes().contains_key(previous) {
                self.remove(previous, false, false)?;
            }
        }
        let name = spec.name.clone();
        self.add(spec)?;
        Ok(name)
    }

    pub fn list(&self) -> Vec<Value> {
        self.sandboxes().values().map(describe).collect()
    }

    /// A sandbox as `exec` needs it: what `list` shows, the cookie of its
    /// listener's network namespace, and the agent's CA.
    fn get(&self, name: &str) -> Result<Value> {
        let sandboxes = self.sandboxes();
        let running = sandboxes.get(name).with_context(|| format!("no sandbox named {name}"))?;
        Ok(json!({
            "sandbox": describe(running),
            "netns_cookie": running.listeners.netns_cookie,
            "agent_ca": self.options.ca_cert_pem,
        }))
    }

    /// The port every sandbox served listens on, if they share one (one
    /// sandbox, or all on the shared listener), for the ready line.
    pub fn common_listen_port(&self) -> Option<u16> {
        let sandboxes = self.sandboxes();
        let mut ports = sandboxes.values().map(|running| running.listeners.port);
        let first = ports.next()?;
        ports.all(|port| port == first).then_some(first)
    }

    pub fn status(&self) -> Value {
        let in_flight = self.common.config.max_connections - self.common.slots.available_permits();
        let shared = self.shared_listeners.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|l| l.port);
        json!({
            "sandboxes": self.list(),
            "shared_listen_port": shared,
            "max_sandboxes": self.options.max_sandboxes,
            "policy_files": self.policy_files.count(),
            "compiled_policies": crate::policy::compiled_policies(),
            "connections_in_flight": in_flight,
            "max_connections": self.common.config.max_connections,
            "recent_denials": self.common.observer.recent_denials.top(STATUS_DENIALS),
        })
    }

    /// What the metrics read at scrape time.
    pub fn gauges(&self) -> Scrape {
        let sandboxes = self
            .sandboxes()
            .iter()
            .map(|(name, running)| {
                let policies = &running.sandbox.context.decider.policies;
                let gauges = SandboxGauges {
                    generation: policies.current().generation,
                    reload_failures: policies.reload_failures(),
                };
                (name.clone(), gauges)
            })
            .collect();
        Scrape { sandboxes, maps: self.redirect.map_fill() }
    }

    fn inference_of(&self, name: Option<&str>) -> Result<Arc<Inference>> {
        let sandboxes = self.sandboxes();
        if let Some(name) = name {
            let running = sandboxes.get(name).with_context(|| format!("no sandbox named {name}"))?;
            return running.inference.clone().with_context(|| format!("sandbox {name} has no inference config"));
        }
        let with: Vec<(&String, &Arc<Inference>)> = sandboxes
            .iter()
            .filter_map(|(name, running)| running.inference.as_ref().map(|inference| (name, inference)))
            .collect();
        match with.as_slice() {
            [] => bail!("no sandbox has an inference config"),
            [(_, inference)] => Ok((*inference).clone()),
            several => bail!(
                "several sandboxes have an inference config ({}): name one with --sandbox",
                several.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    async fn answer_request(self: Arc<Self>, request: ControlRequest) -> Result<Value> {
        let change = match request {
            ControlRequest::SandboxAdd { spec } => {
                let name = spec.name.clone();
                // Loading and attaching the eBPF programs blocks for a while.
                let daemon = self.clone();
                let added = tokio::task::spawn_blocking(move || daemon.add(spec))
                    .await
                    .context("adding the sandbox failed")?
                    .with_context(|| format!("sandbox {name}"))?;
                return Ok(json!({ "sandbox": added }));
            }
            ControlRequest::SandboxRemove { name, detach, force } => {
                self.remove(&name, detach, force)?;
                return Ok(json!({ "removed": name, "detached": detach }));
            }
            ControlRequest::SandboxList => return Ok(json!({ "sandboxes": self.list() })),
            ControlRequest::SandboxGet { name } => return self.get(&name),
            ControlRequest::Status => return Ok(self.status()),
            ControlRequest::RecentDenials { sandbox, since_seconds } => {
                let filter =
                    DenialFilter { sandbox: sandbox.as_deref(), since: since_seconds.map(Duration::from_secs) };
                let denials = self.common.observer.recent_denials.rows(&filter, SUGGEST_DENIALS);
                return Ok(json!({ "denials": denials }));
            }
            ControlRequest::Get { sandbox } => (sandbox, RouteChange::Get),
            ControlRequest::Set { provider, model, sandbox } => (sandbox, RouteChange::Set { provider, model }),
            ControlRequest::Update { provider, model, sandbox } => (sandbox, RouteChange::Update { provider, model }),
        };
        let (sandbox, change) = change;
        self.inference_of(sandbox.as_deref())?.answer_control(change).await
    }

    /// Serves the control socket at `path` (root only).
    pub async fn serve_control(self: &Arc<Self>, path: &Path) -> Result<()> {
        control::spawn(path, control::ROOT_UID, self.clone()).await
    }

    /// Stops every sandbox's listeners and waits (a while) for the
    /// connections in flight. Cgroups stay redirected: their connects are
    /// refused until an agent serves them again, or `detach`.
    pub async fn shutdown(&self) {
        self.sandboxes().clear();
        self.shared_listeners.lock().unwrap_or_else(PoisonError::into_inner).take();
        let max = self.common.config.max_connections as u32;
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, self.common.slots.acquire_many(max)).await.is_ok();
        let stats = &self.common.stats;
        let count = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            event = "shutdown",
            accepted = count(&stats.accepted),
            unattributed = count(&stats.unattributed),
            over_limit = count(&stats.over_limit),
            in_flight_cut = !drained,
            "agent stopped; the sandboxes' cgroups stay redirected to their ports, so their connects are refused \
             until the agent runs again or `sandbox-egress detach` removes the redirect"
        );
    }
}

impl Answer for Daemon {
    fn answer(self: Arc<Self>, request: ControlRequest) -> BoxFuture<Result<Value>> {
        Box::pin(self.answer_request(request))
    }
}

fn describe(running: &Running) -> Value {
    let sandbox = &running.sandbox;
    let policies = &sandbox.context.decider.policies;
    json!({
        "name": running.spec.name,
        "cgroup": running.cgroup.path,
        "cgroup_id": running.cgroup.id,
        "policy": running.spec.policy,
        "policy_generation": policies.current().generation,
        "policy_reload_failures": policies.reload_failures(),
        "netns": running.spec.netns,
        "listen_port": sandbox.listen_port,
        "shared_listener": running.shared_listener,
        "inference_config": running.spec.inference_config,
        "connections_active": sandbox.context.observed.active(),
    })
}
