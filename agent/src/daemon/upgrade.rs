//! Both daemons' sides of `upgrade` (the protocol is in [`crate::upgrade`]):
//! the running one gathers its sockets and state and hands over; the new
//! one serves the sandboxes it was handed, on their sockets.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, PoisonError},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::Daemon;
use crate::{
    proxy::ListenerKind,
    upgrade::{CarriedSandbox, FinalState, Inventory, SocketRole, Successor},
};

/// How long the new daemon may take to serve every sandbox (each attaches
/// its eBPF programs).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the new daemon may take to take the final state in.
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Hands over to `binary` (default: this daemon's own); once it serves,
    /// stops accepting and drains for at most `drain`. Answers the new pid.
    pub(super) async fn upgrade(self: Arc<Self>, binary: Option<PathBuf>, drain: Duration) -> Result<Value> {
        let Ok(_one) = self.upgrading.try_lock() else { bail!("an upgrade is already under way") };
        if self.draining.load(Ordering::Relaxed) || self.handed_over.borrow().is_some() {
            bail!("this daemon is draining: upgrade the one that serves now");
        }
        let binary = binary.unwrap_or_else(|| self.options.binary.clone());
        let daemon = self.clone();
        self.handing_over.store(true, Ordering::Relaxed);
        let handed = tokio::task::spawn_blocking(move || daemon.hand_over(&binary)).await;
        let pid = handed.context("the upgrade failed").and_then(|handed| handed).inspect_err(|error| {
            self.handing_over.store(false, Ordering::Relaxed);
            tracing::error!(event = "upgrade_failed", "upgrade failed, this daemon serves on: {error:#}");
        })?;
        self.handed_over.send_replace(Some(drain));
        Ok(json!({ "pid": pid, "previous_pid": std::process::id() }))
    }

    fn hand_over(&self, binary: &Path) -> Result<u32> {
        let (fds, inventory) = self.inventory()?;
        tracing::info!(
            event = "upgrade_started",
            binary = %binary.display(),
            sandboxes = inventory.sandboxes.len(),
            sockets = fds.len(),
            "upgrade: starting the new daemon and handing it every listening socket"
        );
        let mut successor = Successor::start(binary, &self.options.args)?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        successor.hand_over(&raw, &inventory)?;
        drop(fds);
        let pid = successor.wait_ready(READY_TIMEOUT)?;
        let state = FinalState {
            dns_records: self.common.records.export(),
            denials: self.common.observer.recent_denials.export(),
        };
        // The new daemon has set its own fast-path generations: this one no longer changes them.
        self.fast_path_handed.send_replace(true);
        successor.finish(&state, TAKE_OVER_TIMEOUT).context("the new daemon did not take over")?;
        // The sockets stay open in the new daemon: connects wait in the same backlogs.
        self.stop_accepting();
        for running in self.sandboxes().values_mut() {
            running.sockets.clear();
        }
        self.shared_sockets.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.servers.lock().unwrap_or_else(PoisonError::into_inner).clear();
        tracing::info!(
            event = "upgraded",
            new_pid = pid,
            "upgrade: pid {pid} serves; this daemon stops accepting and drains"
        );
        Ok(pid)
    }

    /// Duplicates of every listening socket, and what crosses with them.
    fn inventory(&self) -> Result<(Vec<OwnedFd>, Inventory)> {
        let mut sockets = Vec::new();
        let mut fds = Vec::new();
        for (role, fd) in self.servers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            sockets.push(role.clone());
            fds.push(fd.try_clone()?);
        }
        for (kind, fd) in self.shared_sockets.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            sockets.push(SocketRole::Shared { kind: *kind });
            fds.push(fd.try_clone()?);
        }
        let mut sandboxes = Vec::new();
        for (name, running) in self.sandboxes().iter() {
            for (kind, fd) in &running.sockets {
                sockets.push(SocketRole::Sandbox { name: name.clone(), kind: *kind });
                fds.push(fd.try_clone()?);
            }
            let route = running.inference.as_ref().and_then(|inference| inference.route());
            sandboxes.push(CarriedSandbox { spec: running.spec.clone(), route });
        }
        let inventory =
            Inventory { from_pid: std::process::id(), sockets, sandboxes, dns_records: self.common.records.export() };
        Ok((fds, inventory))
    }

    /// Serves the sandboxes a previous daemon handed over, on the sockets
    /// they had: the shared ones (`shared`) or their own (`sockets`, by
    /// sandbox name), with the inference route each had and the DNS
    /// answers given.
    pub fn take_over(
        &self,
        inventory: Inventory,
        shared: Vec<(ListenerKind, OwnedFd)>,
        mut sockets: BTreeMap<String, Vec<(ListenerKind, OwnedFd)>>,
    ) -> Result<()> {
        if !shared.is_empty() {
            *self.inherited_shared.lock().unwrap_or_else(PoisonError::into_inner) = Some(shared);
        }
        for CarriedSandbox { spec, route } in inventory.sandboxes {
            let name = spec.name.clone();
            let inherited = sockets.remove(&name);
            if inherited.is_none() && spec.netns.is_some() {
                bail!("no sockets handed over for sandbox {name}, which has a network namespace of its own");
            }
            self.add_on(spec, inherited).with_context(|| format!("sandbox {name}"))?;
            self.carried.lock().unwrap_or_else(PoisonError::into_inner).insert(name.clone());
            let inference = self.sandboxes().get(&name).and_then(|running| running.inference.clone());
            if let (Some(route), Some(inference)) = (route, inference) {
                if let Err(error) = inference.carry_route(route) {
                    tracing::warn!(sandbox = %name, "the inference route carried over is refused: {error:#}");
                }
            }
        }
        self.common.records.import(&inventory.dns_records);
        Ok(())
    }

    /// What the previous daemon recorded until it stopped accepting.
    pub fn take_final_state(&self, state: FinalState) {
        self.common.records.import(&state.dns_records);
        self.common.observer.recent_denials.import(state.denials);
    }
}
