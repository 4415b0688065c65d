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
    sandbox::{Common, SandboxTable, Stats},
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

    /// The kernel's record of an accepted connection; a connection without
    /// one is closed and counted, never guessed.
    fn record_of(&self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, ConnectRecord)> {
        let Some(record) = self.redirect.take_record(self.netns_cookie, self.port, peer) else {
            let unattributed = self.stats.unattributed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(client = %peer, unattributed, "connection closed: no kernel record of its origin");
            reset(stream);
            return None;
        };
        Some((stream, record))
    }

    /// A connection whose sandbox is not in the table: one being added (a
    /// daemon restarted over its pins accepts before it has added every
    /// sandbox again) is served once it is, within `SANDBOX_WAIT`; the
    /// connection holds its global slot while it waits. Otherwise it is
    /// closed and counted.
    async fn serve_when_added(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        accepted: Accepted,
        record: ConnectRecord,
        slot: OwnedSemaphorePermit,
    ) {
        let Some(sandbox) = self.table.wait_for(record.sandbox_cgroup_id, SANDBOX_WAIT).await else {
            let unattributed = self.stats.unattributed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                client = %peer,
                cgroup_id = record.sandbox_cgroup_id,
                unattributed,
                "connection closed: its sandbox is not served (removed, or not added again within {}s)",
                SANDBOX_WAIT.as_secs()
            );
            reset(stream);
            return;
        };
        let span = sandbox.span.clone();
        connection::handle(stream, peer, accepted, &record, &sandbox).instrument(span).await;
        drop(slot);
    }
}

async fn accept_loop(listener: TcpListener, finder: Finder, slots: Arc<Semaphore>, mut stop: watch::Receiver<bool>) {
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
        let Some((stream, record)) = finder.record_of(stream, peer) else { continue };
        let Some(sandbox) = finder.table.get(record.sandbox_cgroup_id) else {
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    tokio::spawn(finder.clone().serve_when_added(stream, peer, accepted, record, slot));
                }
                Err(_) => {
                    tracing::warn!(client = %peer, cgroup_id = record.sandbox_cgroup_id, "connection closed: over the connection limit while its sandbox is added");
                    reset(stream);
                }
            }
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            sandbox.span.in_scope(|| connection::refuse_over_limit(stream, peer, accepted, &record, &sandbox));
            continue;
        };
        let span = sandbox.span.clone();
        tokio::spawn(
            async move {
                connection::handle(stream, peer, accepted, &record, &sandbox).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}
