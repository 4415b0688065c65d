//! Listeners served: their DNS sockets and accept loops, for every sandbox
//! whose connects come to them (each connection's sandbox is the one its
//! kernel record names), every log line inside naming that sandbox.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use agent_common::ConnectRecord;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
};
use tracing::Instrument;

use super::{
    connection,
    listeners::Listeners,
    sandbox::{Common, Sandbox, SandboxTable, Stats},
};
use crate::{
    conn::{refuse::reset, Accepted},
    dns::{Asker, AskerOf, CountAnswer},
    redirect::Redirect,
};

/// How long a connection waits for its sandbox to be added (see
/// `Finder::serve_when_added`).
const SANDBOX_WAIT: Duration = Duration::from_secs(5);

/// Listeners being served; dropping it stops them (connections in flight
/// run to their end).
pub struct ServedListeners {
    pub port: u16,
    /// The network namespace the listeners are in.
    pub netns_cookie: u64,
    stop: watch::Sender<bool>,
}

impl ServedListeners {
    /// Stops accepting on them (as dropping them does).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for ServedListeners {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// What an accept loop or DNS socket needs to find a sandbox.
#[derive(Clone)]
struct Finder {
    table: Arc<SandboxTable>,
    redirect: Arc<Redirect>,
    netns_cookie: u64,
    /// The listeners' port (TCP and DNS alike).
    port: u16,
    stats: Arc<Stats>,
}

/// Serves `listeners` (DNS and connections) for the sandboxes of `table`
/// until the returned handle is dropped.
pub fn serve_listeners(
    common: &Common,
    listeners: Listeners,
    table: Arc<SandboxTable>,
    redirect: Arc<Redirect>,
) -> anyhow::Result<ServedListeners> {
    let port = listeners.port();
    let netns_cookie = listeners.netns_cookie()?;
    let (stop, stopped) = watch::channel(false);
    let finder = Finder { table, redirect, netns_cookie, port, stats: common.stats.clone() };
    for socket in listeners.dns {
        let finding = finder.clone();
        let asker_of: AskerOf = Arc::new(move |client| finding.dns_asker(client));
        let serving = common.dns.clone().serve_udp(socket, asker_of);
        let mut stop = stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serving => {}
                _ = stop.changed() => {}
            }
        });
    }
    let finder = Arc::new(finder);
    for listener in std::iter::once(listeners.v4).chain(listeners.v6) {
        tokio::spawn(accept_loop(listener, finder.clone(), common.slots.clone(), stopped.clone()));
    }
    Ok(ServedListeners { port, netns_cookie, stop })
}

impl Finder {
    /// Who sent a DNS query from `client`: a sandbox served on these listeners.
    fn dns_asker(&self, client: SocketAddr) -> Option<Asker> {
        let sender = self.redirect.dns_client(self.netns_cookie, self.port, client)?;
        let sandbox = self.table.get(sender.sandbox_cgroup_id)?;
        let observed = sandbox.context.observed.clone();
        let count: CountAnswer = Arc::new(move |answer| observed.dns_answer(answer));
        Some(Asker {
            cgroup: Some(sender.cgroup_id),
            policies: sandbox.context.decider.policies.clone(),
            count,
            span: sandbox.span.clone(),
        })
    }

    /// One accepted connection, in a task of its own: its kernel record,
    /// its sandbox, its global slot (`None`: over `--max-connections`:
    /// refused and logged), then its walk to the close line, in its
    /// sandbox's span.
    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        accepted: Accepted,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        let Some(record) = self.redirect.take_record(self.netns_cookie, self.port, peer) else {
            let unattributed = self.stats.unattributed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(client = %peer, unattributed, "connection closed: no kernel record of its origin");
            return reset(stream);
        };
        let sandbox = match self.table.get(record.sandbox_cgroup_id) {
            Some(sandbox) => sandbox,
            None if slot.is_none() => {
                tracing::warn!(client = %peer, cgroup_id = record.sandbox_cgroup_id, "connection closed: over the connection limit while its sandbox is added");
                return reset(stream);
            }
            None => match self.wait_for_sandbox(peer, &record).await {
                Some(sandbox) => sandbox,
                None => return reset(stream),
            },
        };
        let span = sandbox.span.clone();
        let Some(slot) = slot else {
            return span.in_scope(|| connection::refuse_over_limit(stream, peer, accepted, &record, &sandbox));
        };
        connection::handle(stream, peer, accepted, &record, &sandbox).instrument(span).await;
        drop(slot);
    }

    /// The sandbox of a connection that is not in the table: one being
    /// added (a daemon restarted over its pins accepts before it has added
    /// every sandbox again) is served once it is, within `SANDBOX_WAIT`; the
    /// connection holds its global slot while it waits. Otherwise `None`,
    /// counted.
    async fn wait_for_sandbox(&self, peer: SocketAddr, record: &ConnectRecord) -> Option<Arc<Sandbox>> {
        let sandbox = self.table.wait_for(record.sandbox_cgroup_id, SANDBOX_WAIT).await;
        if sandbox.is_none() {
            let unattributed = self.stats.unattributed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                client = %peer,
                cgroup_id = record.sandbox_cgroup_id,
                unattributed,
                "connection closed: its sandbox is not served (removed, or not added again within {}s)",
                SANDBOX_WAIT.as_secs()
            );
        }
        sandbox
    }
}

/// Accepts and hands each connection to a task of its own, at once: the
/// kernel record, attribution, limits and logging all happen there, so the
/// loop waits on nothing but accept. (One loop per listener: several on
/// duplicates of the socket, one per runtime worker, were all woken by
/// each connect and measured slower on 2 cores.)
async fn accept_loop(
    listener: TcpListener,
    finder: Arc<Finder>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let accepted = Accepted::now();
        finder.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let slot = slots.clone().try_acquire_owned().ok();
        tokio::spawn(finder.clone().serve(stream, peer, accepted, slot));
    }
}
