//! The userspace proxy: accept -> attribute -> decide -> relay.

mod connection;
mod decide;
mod exchange;
mod http_proxy;
mod inference_route;
mod inspect;
mod limits;
mod netns;
mod origin;
mod policy_store;
mod respond;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpSocket, UdpSocket},
    sync::{watch, Semaphore},
};
use tracing::Instrument;

use crate::{
    dns::{DnsResponder, SandboxOf},
    observe::Observer,
    redirect::Redirect,
};

const LISTEN_BACKLOG: u32 = 4096;

pub use inference_route::InferenceRoute;
pub use policy_store::PolicyStore;

pub struct Config {
    pub max_connections: usize,
    /// Per cgroup (sandbox) below and including the attached one.
    pub max_connections_per_sandbox: usize,
    pub connect_timeout: Duration,
    /// A relayed connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    pub sniff: crate::sniff::Limits,
    /// Certificates the agent serves where it terminates a sandbox's TLS.
    pub leaf_certs: crate::tls::LeafCache,
    /// TLS from the agent to the origins of terminated connections.
    pub upstream_tls: crate::tls::UpstreamTls,
}

/// The loopback sockets a sandbox is redirected to: TCP connects to
/// 127.0.0.1:P (v4-mapped ones included) and [::1]:P, DNS over UDP to the
/// same port number; in the agent's network namespace, or in the sandbox's
/// own (`--netns`).
pub struct Listeners {
    v4: TcpListener,
    v6: Option<TcpListener>,
    dns: Vec<UdpSocket>,
}

impl Listeners {
    /// Binds port `port` (0: any free one) on the loopback of `netns`, or of
    /// the agent's own namespace. A namespace's loopback that is down is
    /// brought up: the sandbox reaches the agent over it.
    pub fn bind(port: u16, netns: Option<&Path>) -> Result<Self> {
        let Some(path) = netns else { return Self::bind_here(port) };
        let namespace =
            std::fs::File::open(path).with_context(|| format!("open the network namespace {}", path.display()))?;
        let runtime = tokio::runtime::Handle::current();
        // Sockets stay in the namespace they were made in: a thread enters
        // it, makes them, and ends.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("enter the network namespace {} (is it one?)", path.display()))?;
                    netns::loopback_up()?;
                    let _runtime = runtime.enter();
                    Self::bind_here(port)
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("binding in {} panicked", path.display())))
        })
    }

    fn bind_here(port: u16) -> Result<Self> {
        let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
        let port = v4.local_addr()?.port();
        let mut dns = vec![bind_udp(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?];
        let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            Ok(listener) => {
                dns.push(bind_udp(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))?);
                Some(listener)
            }
            Err(error)
                if error.downcast_ref::<io::Error>().map(io::Error::kind) == Some(io::ErrorKind::AddrNotAvailable) =>
            {
                tracing::warn!("no IPv6 loopback: IPv6 connects from the sandbox will be refused");
                None
            }
            Err(error) => return Err(error),
        };
        Ok(Self { v4, v6, dns })
    }

    pub fn port(&self) -> u16 {
        self.v4.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    /// The kernel's cookie of the network namespace the sockets are in.
    pub fn netns_cookie(&self) -> Result<u64> {
        netns::cookie(&self.v4)
    }
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr).map_err(|error| {
        let hint = if error.kind() == io::ErrorKind::AddrInUse {
            ": the UDP port is already in use (choose another listen port)"
        } else {
            ""
        };
        anyhow::Error::new(error).context(format!("cannot serve DNS on {addr}{hint}"))
    })?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket)?)
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|error| {
        let hint = if error.kind() == io::ErrorKind::AddrInUse {
            ": the port is already in use (choose another listen port)"
        } else {
            ""
        };
        anyhow::Error::new(error).context(format!("cannot listen on {addr}{hint}"))
    })?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

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
    pub dns: Arc<DnsResponder>,
    pub credentials: Arc<crate::credentials::Credentials>,
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

pub use connection::Shared as Sandbox;

/// Serves one sandbox on `listeners` until `stop` turns true: its policy
/// watch, its DNS and its connections, every log line inside naming it.
/// Connections in flight when it stops run to their end.
pub fn serve_sandbox(
    common: &Common,
    parts: SandboxParts,
    listeners: Listeners,
    stop: watch::Receiver<bool>,
) -> Result<Arc<Sandbox>> {
    let SandboxParts { name, redirect, policies, inference, own_netns, max_connections } = parts;
    let span = tracing::info_span!("sandbox", sandbox = %name);
    let _entered = span.enter();
    policies.spawn_watch(stop.clone())?;
    let observed = common.observer.sandbox(&name);
    let listen_port = listeners.port();
    let sandbox = Arc::new(connection::Shared {
        name,
        listen_port,
        own_netns,
        sandbox_slots: limits::SandboxSlots::new(max_connections),
        redirect,
        config: common.config.clone(),
        stats: common.stats.clone(),
        decider: decide::Decider { policies: policies.clone(), dns: common.dns.clone(), observed: observed.clone() },
        dns: common.dns.clone(),
        inference,
        credentials: common.credentials.clone(),
        observer: common.observer.clone(),
        observed: observed.clone(),
    });
    for socket in listeners.dns {
        let attributing = sandbox.clone();
        let sandbox_of: SandboxOf = Arc::new(move |client| attributing.redirect.dns_client_sandbox(client));
        let answers = observed.clone();
        let count: crate::dns::CountAnswer = Arc::new(move |answer| answers.dns_answer(answer));
        let serving = common.dns.clone().serve_udp(socket, sandbox_of, policies.clone(), count);
        let mut stop = stop.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = serving => {}
                    _ = stop.changed() => {}
                }
            }
            .in_current_span(),
        );
    }
    let listeners = std::iter::once(listeners.v4).chain(listeners.v6);
    for listener in listeners {
        tokio::spawn(accept_loop(listener, sandbox.clone(), common.slots.clone(), stop.clone()).in_current_span());
    }
    Ok(sandbox)
}

async fn accept_loop(
    listener: TcpListener,
    sandbox: Arc<Sandbox>,
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
        let accepted = connection::Accepted::now();
        sandbox.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            connection::refuse_over_limit(stream, peer, accepted, &sandbox);
            continue;
        };
        let sandbox = sandbox.clone();
        tokio::spawn(
            async move {
                connection::handle(stream, peer, accepted, &sandbox).await;
                drop(slot);
            }
            .in_current_span(),
        );
    }
}
