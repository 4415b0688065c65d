//! The policy in force, replaced whole on reload (SIGHUP or a change of the
//! file). New connections use the new policy; each decision logs the
//! generation that made it. A policy that fails to load is refused loudly and
//! the previous one stays in force.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock, Mutex, PoisonError, RwLock, Weak,
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use super::Policy;

/// How often the policy file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

pub struct Loaded {
    /// Shared with every file of the same text (see [`compiled_policies`]).
    pub policy: Arc<Policy>,
    pub generation: u64,
}

#[derive(Clone)]
pub struct PolicyStore {
    path: Arc<PathBuf>,
    /// The providers of `--credentials`: every `credential_binding` of a
    /// policy must name one, at start-up and on reload.
    credential_providers: Arc<Vec<String>>,
    current: Arc<RwLock<Arc<Loaded>>>,
    reload_failures: Arc<AtomicU64>,
    /// The current generation, for what must end when the policy changes
    /// (inspected WebSocket sessions).
    generations: Arc<watch::Sender<u64>>,
    /// The sandboxes that share this policy file, named in its reload lines.
    sandboxes: Arc<RwLock<Vec<String>>>,
}

impl PolicyStore {
    pub fn load(path: &Path, credential_providers: Vec<String>) -> Result<Self> {
        let credential_providers = Arc::new(credential_providers);
        let policy = load_checked(path, &credential_providers)?;
        tracing::info!(policy_file = %path.display(), generation = 1, "policy loaded");
        Ok(Self {
            path: Arc::new(path.to_owned()),
            credential_providers,
            current: Arc::new(RwLock::new(Arc::new(Loaded { policy, generation: 1 }))),
            reload_failures: Arc::default(),
            generations: Arc::new(watch::Sender::new(1)),
            sandboxes: Arc::default(),
        })
    }

    /// Counts `sandbox` among the ones sharing this policy (named in reload lines).
    pub fn add_sandbox(&self, sandbox: &str) {
        self.sandboxes.write().unwrap_or_else(|poisoned| poisoned.into_inner()).push(sandbox.to_owned());
    }

    pub fn remove_sandbox(&self, sandbox: &str) {
        self.sandboxes.write().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|name| name != sandbox);
    }

    /// The sandboxes sharing this policy, comma separated.
    fn sandbox_names(&self) -> String {
        self.sandboxes.read().unwrap_or_else(|poisoned| poisoned.into_inner()).join(",")
    }

    /// Changes with every generation loaded.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generations.subscribe()
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub(crate) fn reload(&self, trigger: &str) {
        match load_checked(&self.path, &self.credential_providers) {
            Ok(policy) => {
                let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                let generation = current.generation + 1;
                *current = Arc::new(Loaded { policy, generation });
                self.generations.send_replace(generation);
                tracing::info!(
                    event = "policy_reloaded",
                    trigger,
                    generation,
                    policy_file = %self.path.display(),
                    sandbox = %self.sandbox_names(),
                    "policy reloaded"
                );
            }
            Err(error) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    event = "policy_reload_failed",
                    trigger,
                    generation = self.current().generation,
                    policy_file = %self.path.display(),
                    sandbox = %self.sandbox_names(),
                    "policy reload refused, the previous policy stays in force: {error:#}"
                )
            }
        }
    }

    /// Reloads refused since the start (the previous policy stayed in force).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// Reloads on SIGHUP and whenever the file's modification time or size
    /// changes, until `stop` turns true (the sandbox was removed).
    pub fn spawn_watch(&self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let mut hangup = signal(SignalKind::hangup())?;
        let store = self.clone();
        let mut last_seen = file_stamp(&self.path);
        let watch = async move {
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = hangup.recv() => {
                        last_seen = file_stamp(&store.path);
                        store.reload("SIGHUP");
                    }
                    _ = tick.tick() => {
                        let stamp = file_stamp(&store.path);
                        if stamp != last_seen {
                            last_seen = stamp;
                            store.reload("file changed");
                        }
                    }
                }
            }
        };
        // Outside any sandbox's span: the file may serve several; its lines name them.
        tokio::spawn(watch);
        Ok(())
    }
}

fn load_checked(path: &Path, credential_providers: &[String]) -> Result<Arc<Policy>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read policy file {}", path.display()))?;
    let policy = compile(&text).with_context(|| format!("policy file {}", path.display()))?;
    policy
        .check_credential_bindings(credential_providers.iter().map(String::as_str))
        .with_context(|| format!("policy file {}", path.display()))?;
    Ok(policy)
}

/// Compiled policies by their text, while in use: identical policy files,
/// whatever their path, share one compiled policy.
static COMPILED: LazyLock<Mutex<HashMap<String, Weak<Policy>>>> = LazyLock::new(Mutex::default);

fn compile(text: &str) -> Result<Arc<Policy>> {
    let mut compiled = COMPILED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(policy) = compiled.get(text).and_then(Weak::upgrade) {
        return Ok(policy);
    }
    let policy = Arc::new(Policy::from_yaml(text)?);
    compiled.retain(|_, policy| policy.strong_count() > 0);
    compiled.insert(text.to_owned(), Arc::downgrade(&policy));
    Ok(policy)
}

/// Compiled policies in use (one per distinct policy text).
pub fn compiled_policies() -> usize {
    COMPILED.lock().unwrap_or_else(PoisonError::into_inner).values().filter(|policy| policy.strong_count() > 0).count()
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}
