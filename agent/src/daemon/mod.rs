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
mod upgrade;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub use spec_dir::follow_dir;

use self::policies::{PolicyFiles, SharedPolicy};
use crate::{
    conn,
    control::{self, Answer, BoxFuture, ControlRequest, ControlServer, SandboxSpec},
    inference::{Inference, InferenceRoute, RouteChange},
    observe::{DenialFilter, SandboxGauges, Scrape},
    policy::PolicyStore,
    preflight::{self, Cgroup},
    proxy::{self, Common, ListenerKind, Listeners, Sandbox, SandboxParts, SandboxTable, ServedListeners},
    redirect::{self, Destination, KernelOptions, Redirect},
    upgrade::SocketRole,
};

/// How long connections cut at the end of a drain are given to write
/// their close lines.
const CUT_GRACE: Duration = Duration::from_secs(5);
/// Duplicates of listening sockets, by what each is, for an upgrade to hand over.
type Sockets = Vec<(ListenerKind, OwnedFd)>;
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
    /// This daemon's binary and arguments, as started: what `upgrade`
    /// starts by default, and with.
    pub binary: PathBuf,
    pub args: Vec<OsString>,
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
    /// Duplicates of its own listening sockets (none for the shared ones),
    /// for an upgrade to hand over.
    sockets: Vec<(ListenerKind, OwnedFd)>,
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
    /// Duplicates of the shared listening sockets, for an upgrade to hand over.
    shared_sockets: Mutex<Vec<(ListenerKind, OwnedFd)>>,
    /// The shared sockets a previous daemon handed over, until the first
    /// sandbox that shares them is added.
    inherited_shared: Mutex<Option<Vec<(ListenerKind, OwnedFd)>>>,
    policy_files: PolicyFiles,
    sandboxes: Mutex<BTreeMap<String, Running>>,
    /// The control socket and the metrics listener, for an upgrade to hand over.
    servers: Mutex<Vec<(SocketRole, OwnedFd)>>,
    /// Set (to the drain timeout) once an upgrade handed over.
    handed_over: watch::Sender<Option<Duration>>,
    /// One upgrade at a time.
    upgrading: tokio::sync::Mutex<()>,
    /// Sandboxes a previous daemon handed over that no spec file has claimed yet.
    carried: Mutex<std::collections::BTreeSet<String>>,
    /// Set once a shutdown drains: no upgrade from then on.
    draining: AtomicBool,
    /// Set while an upgrade takes the inventory over, and after: a sandbox
    /// added, removed or rerouted here then would not reach the new daemon.
    handing_over: AtomicBool,
    /// Set when the daemon stops accepting: HTTP/2 connections get a GOAWAY.
    stopping: watch::Sender<bool>,
    /// Set when an upgrade hands the kernel fast path (its closes, its
    /// sandboxes' generations) to the new daemon.
    fast_path_handed: watch::Sender<bool>,
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
            shared_sockets: Mutex::default(),
            inherited_shared: Mutex::default(),
            policy_files: PolicyFiles::default(),
            sandboxes: Mutex::default(),
            servers: Mutex::default(),
            handed_over: watch::channel(None).0,
            upgrading: tokio::sync::Mutex::new(()),
            carried: Mutex::default(),
            draining: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            stopping: watch::channel(false).0,
            fast_path_handed: watch::channel(false).0,
        })
    }

    fn sandboxes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts serving a sandbox: its policy loaded, its listener bound (in
    /// its namespace), its cgroup redirected there. Returns what `sandbox
    /// list` shows of it.
    pub fn add(&self, spec: SandboxSpec) -> Result<Value> {
        self.add_on(spec, None)
    }

    /// [`Self::add`], on the sockets a previous daemon handed over if `inherited`.
    fn add_on(&self, spec: SandboxSpec, inherited: Option<Vec<(ListenerKind, OwnedFd)>>) -> Result<Value> {
        self.not_handing_over()?;
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
        let (listeners, shared_listener, sockets) = self.listeners_for(&spec, inherited)?;
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
            stopping: self.stopping.subscribe(),
            max_connections: spec.max_connections.unwrap_or(self.common.config.max_connections_per_sandbox),
            // Random per add: fast-path decisions of an earlier add or daemon never match.
            fast_base: rand::random(),
        };
        let sandbox = Sandbox::new(&self.common, parts);
        // In the table before the kernel sends it anything.
        self.table.insert(sandbox.clone());
        let destination = Destination {
            listen_port: listeners.port,
            netns_cookie: listeners.netns_cookie,
            fast_generation: sandbox.fast_generation(policy.store.current().generation),
        };
        if let Err(error) = self.redirect.attach(&cgroup, destination) {
            self.table.remove(cgroup.id);
            return Err(error);
        }
        self.follow_reloads(&sandbox, &policy.store);
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
        let running = Running { spec, cgroup, sandbox, inference, listeners, shared_listener, policy, sockets };
        let shown = describe(&running);
        sandboxes.insert(running.spec.name.clone(), running);
        Ok(shown)
    }

    /// The listeners a new sandbox's connects go to: those a previous
    /// daemon handed over for it (`inherited`); its own in its own network
    /// namespace, or on a port of its own; otherwise the daemon's shared ones
    /// (bound, or taken from those handed over, if none are yet). Also says
    /// whether they are the shared ones, and duplicates of its own sockets.
    fn listeners_for(
        &self,
        spec: &SandboxSpec,
        inherited: Option<Vec<(ListenerKind, OwnedFd)>>,
    ) -> Result<(Arc<ServedListeners>, bool, Sockets)> {
        let serve = |listeners: Listeners| -> Result<(Arc<ServedListeners>, Sockets)> {
            let sockets = listeners.duplicates()?;
            let served = proxy::serve_listeners(&self.common, listeners, self.table.clone(), self.redirect.clone())?;
            Ok((Arc::new(served), sockets))
        };
        let own = |listeners: Listeners| serve(listeners).map(|(served, sockets)| (served, false, sockets));
        let mark = self.options.kernel.listener_mark;
        if let Some(sockets) = inherited {
            return own(Listeners::from_inherited(sockets, mark)?);
        }
        if spec.netns.is_some() {
            return own(Listeners::bind(spec.listen_port, spec.netns.as_deref(), mark)?);
        }
        let mut shared = self.shared_listeners.lock().unwrap_or_else(PoisonError::into_inner);
        match &*shared {
            Some(listeners) if spec.listen_port == 0 || spec.listen_port == listeners.port => {
                return Ok((listeners.clone(), true, Vec::new()));
            }
            Some(_) => return own(Listeners::bind(spec.listen_port, None, mark)?),
            None if spec.listen_port != 0 => return own(Listeners::bind(spec.listen_port, None, mark)?),
            None => {}
        }
        let handed = self.inherited_shared.lock().unwrap_or_else(PoisonError::into_inner).take();
        let listeners = match handed {
            Some(sockets) => Listeners::from_inherited(sockets, mark)?,
            None => Listeners::bind(0, None, mark)?,
        };
        let (listeners, sockets) = serve(listeners)?;
        *self.shared_sockets.lock().unwrap_or_else(PoisonError::into_inner) = sockets;
        tracing::info!(
            event = "shared_listener",
            listen_port = listeners.port,
            "listening for the sandboxes in the daemon's network namespace"
        );
        *shared = Some(listeners.clone());
        Ok((listeners, true, Vec::new()))
    }

    /// Each policy reload of `sandbox` changes its fast-path generation in
    /// the kernel (decisions of earlier ones stop matching), for as long as
    /// it is the one served in its cgroup and no upgrade handed it over (the
    /// new daemon's generations are then in force).
    fn follow_reloads(&self, sandbox: &Arc<Sandbox>, store: &PolicyStore) {
        let mut generations = store.generations();
        let (table, redirect, sandbox) = (self.table.clone(), self.redirect.clone(), Arc::downgrade(sandbox));
        let handed = self.fast_path_handed.subscribe();
        tokio::spawn(async move {
            // The first round covers a reload between the attach and this task's start.
            loop {
                let Some(sandbox) = sandbox.upgrade().filter(|_| !*handed.borrow()) else { return };
                if !table.get(sandbox.cgroup_id).is_some_and(|served| Arc::ptr_eq(&served, &sandbox)) {
                    return;
                }
                let generation = *generations.borrow_and_update();
                redirect.set_fast_generation(sandbox.cgroup_id, sandbox.fast_generation(generation));
                drop(sandbox);
                if generations.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Logs the close of every kernel fast-path connection this daemon's
    /// programs report, until it exits.
    pub fn log_fast_closes(&self) {
        if let Some(closes) = self.redirect.take_fast_closes() {
            proxy::serve_closes(closes, self.table.clone(), self.common.observer.clone());
        }
    }

    /// Stops every listener (connections in flight run on).
    fn stop_accepting(&self) {
        for running in self.sandboxes().values() {
            running.listeners.stop();
        }
        if let Some(shared) = &*self.shared_listeners.lock().unwrap_or_else(PoisonError::into_inner) {
            shared.stop();
        }
    }

    /// Stops serving a sandbox. Its cgroup stays attached and closed (the
    /// kernel refuses its connects and datagrams) unless `detach`, which
    /// refuses while processes remain in the cgroup unless `force`. Its
    /// connections in flight run to their end.
    pub fn remove(&self, name: &str, detach: bool, force: bool) -> Result<()> {
        self.not_handing_over()?;
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
        // A sandbox carried over an upgrade counts as this file's (the
        // previous daemon made it from the file of its name).
        let carried =
            previous.is_none() && self.carried.lock().unwrap_or_else(PoisonError::into_inner).remove(&spec.name);
        let carried = carried.then(|| spec.name.clone());
        if let Some(previous) = previous.or(carried.as_deref()) {
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

    fn not_handing_over(&self) -> Result<()> {
        if self.handing_over.load(Ordering::Relaxed) {
            bail!("an upgrade is under way: ask again in a moment (the new daemon answers then)");
        }
        Ok(())
    }

    pub fn serves(&self, name: &str) -> bool {
        self.sandboxes().contains_key(name)
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
            ControlRequest::Upgrade { binary, drain_timeout_ms } => {
                return self.upgrade(binary, Duration::from_millis(drain_timeout_ms)).await;
            }
        };
        let (sandbox, change) = change;
        if !matches!(change, RouteChange::Get) {
            self.not_handing_over()?;
        }
        self.inference_of(sandbox.as_deref())?.answer_control(change).await
    }

    /// Serves the control socket at `path` (root only), or the one an
    /// upgrade handed over (`inherited`).
    pub async fn serve_control(self: &Arc<Self>, path: &Path, inherited: Option<OwnedFd>) -> Result<ControlServer> {
        let server = control::spawn(path, control::ROOT_UID, self.clone(), inherited).await?;
        self.hand_over_also(SocketRole::Control, server.socket().try_clone_to_owned()?);
        Ok(server)
    }

    /// A socket of the daemon's own (control, metrics) an upgrade hands over too.
    pub fn hand_over_also(&self, role: SocketRole, socket: OwnedFd) {
        self.servers.lock().unwrap_or_else(PoisonError::into_inner).push((role, socket));
    }

    /// Resolves once an upgrade handed over: to the drain timeout it asked for.
    pub async fn handed_over(&self) -> Duration {
        let mut handed_over = self.handed_over.subscribe();
        let drain = handed_over.wait_for(Option::is_some).await.map(|drain| drain.unwrap_or_default());
        match drain {
            Ok(drain) => drain,
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops every sandbox's listeners and lets the connections in flight
    /// run to their end, for at most `drain`; then resets the rest (each
    /// logs its close line). Cgroups stay redirected: after a shutdown
    /// their connects are refused until an agent serves them again, or
    /// `detach`; after an upgrade the new daemon serves them.
    pub async fn shutdown(&self, drain: Duration) {
        self.draining.store(true, Ordering::Relaxed);
        self.stop_accepting();
        // Open HTTP/2 connections are told to go away.
        self.stopping.send_replace(true);
        let max = self.common.config.max_connections;
        let in_flight = |daemon: &Self| max - daemon.common.slots.available_permits();
        tracing::info!(
            event = "draining",
            connections = in_flight(self),
            drain_timeout_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX),
            "no longer accepting: the connections in flight run to their end, for at most {}",
            humantime::format_duration(drain)
        );
        let all = max as u32;
        let drained = tokio::time::timeout(drain, self.common.slots.acquire_many(all)).await.is_ok();
        let mut cut = 0;
        if !drained {
            cut = in_flight(self);
            tracing::warn!(event = "drain_timeout", connections = cut, "drain timeout: resetting {cut} connections");
            conn::drain::cut_all();
            let _ = tokio::time::timeout(CUT_GRACE, self.common.slots.acquire_many(all)).await;
        }
        let stats = &self.common.stats;
        let count = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            event = "shutdown",
            accepted = count(&stats.accepted),
            unattributed = count(&stats.unattributed),
            over_limit = count(&stats.over_limit),
            in_flight_cut = !drained,
            connections_cut = cut,
            "agent stopped; the sandboxes' cgroups stay redirected to their ports, so their connects are refused \
             until an agent serves them again or `sandbox-egress detach` removes the redirect"
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
