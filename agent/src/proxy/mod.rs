//! The userspace proxy: accept -> attribute -> decide -> relay.

mod connection;
mod decide;
mod exchange;
mod http_proxy;
mod inference_route;
mod inspect;
mod limits;
mod origin;
mod policy_store;
mod respond;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpSocket, UdpSocket},
    signal::unix::{signal, SignalKind},
    sync::{watch, Semaphore},
};

use crate::{
    dns::{DnsResponder, SandboxOf},
    preflight::Cgroup,
    redirect::Redirect,
};

/// How long in-flight connections may finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const LISTEN_BACKLOG: u32 = 4096;

pub use inference_route::InferenceRoute;
pub use policy_store::PolicyStore;

pub struct Config {
    pub listen_port: u16,
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

/// The loopback sockets the sandbox is redirected to: TCP connects to
/// 127.0.0.1:P (v4-mapped ones included) and [::1]:P, DNS over UDP to the
/// same port number.
pub struct Listeners {
    v4: TcpListener,
    v6: Option<TcpListener>,
    dns: Vec<UdpSocket>,
}

impl Listeners {
    pub async fn bind(port: u16) -> Result<Self> {
        let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
        let port = v4.local_addr()?.port();
        let mut dns = vec![bind_udp(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?];
        let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            Ok(listener) => {
                dns.push(bind_udp(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await?);
                Some(listener)
            }
            Err(error)
                if error.downcast_ref::<io::Error>().map(io::Error::kind) == Some(io::ErrorKind::AddrNotAvailable) =>
            {
                tracing::warn!("no IPv6 loopback on this host: IPv6 connects from the sandbox will be refused");
                None
            }
            Err(error) => return Err(error),
        };
        Ok(Self { v4, v6, dns })
    }

    pub fn port(&self) -> u16 {
        self.v4.local_addr().map(|a| a.port()).unwrap_or_default()
    }
}

async fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    UdpSocket::bind(addr).await.map_err(|error| {
        let hint = if error.kind() == io::ErrorKind::AddrInUse {
            ": the UDP port is already in use (choose another with --listen-port)"
        } else {
            ""
        };
        anyhow::Error::new(error).context(format!("cannot serve DNS on {addr}{hint}"))
    })
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|error| {
        let hint = if error.kind() == io::ErrorKind::AddrInUse {
            ": the port is already in use (choose another with --listen-port)"
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

/// Everything a connection may need, made by `run` before serving.
pub struct Parts {
    pub redirect: Redirect,
    pub config: Config,
    pub policies: PolicyStore,
    pub dns: Arc<DnsResponder>,
    pub inference: Option<InferenceRoute>,
    pub credentials: crate::credentials::Credentials,
}

pub async fn serve(listeners: Listeners, parts: Parts, cgroup: &Cgroup) -> Result<()> {
    let Parts { redirect, config, policies, dns, inference, credentials } = parts;
    policies.spawn_watch()?;
    let shared = Arc::new(connection::Shared {
        sandbox_slots: limits::SandboxSlots::new(config.max_connections_per_sandbox),
        redirect,
        config,
        stats: Stats::default(),
        decider: decide::Decider { policies, dns: dns.clone() },
        dns,
        inference,
        credentials,
    });
    for socket in listeners.dns {
        let attributing = shared.clone();
        let sandbox_of: SandboxOf = Arc::new(move |client| attributing.redirect.dns_client_sandbox(client));
        tokio::spawn(shared.dns.clone().serve_udp(socket, sandbox_of));
    }
    // Installed before "ready": a signal right after it must not kill the agent.
    let shutdown_signal = shutdown_signal()?;
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut accept_loops =
        vec![tokio::spawn(accept_loop(listeners.v4, shared.clone(), slots.clone(), stop_rx.clone()))];
    if let Some(v6) = listeners.v6 {
        accept_loops.push(tokio::spawn(accept_loop(v6, shared.clone(), slots.clone(), stop_rx.clone())));
    }
    tracing::info!(
        event = "ready",
        cgroup = %cgroup.path.display(),
        cgroup_id = cgroup.id,
        listen_port = shared.config.listen_port,
        "agent ready: the cgroup's TCP connects are redirected to this agent"
    );

    shutdown_signal.await;
    let _ = stop_tx.send(true);
    for accept_loop in accept_loops {
        let _ = accept_loop.await;
    }
    let max = shared.config.max_connections as u32;
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(max)).await.is_ok();
    let stats = &shared.stats;
    tracing::info!(
        event = "shutdown",
        accepted = stats.accepted.load(Ordering::Relaxed),
        unattributed = stats.unattributed.load(Ordering::Relaxed),
        over_limit = stats.over_limit.load(Ordering::Relaxed),
        in_flight_cut = !drained,
        "agent stopped; the cgroup stays redirected to this port, so its connects are refused until the agent runs again \
         or `sandbox-egress detach` removes the redirect"
    );
    Ok(())
}

fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<connection::Shared>,
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
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            connection::refuse_over_limit(stream, peer, accepted, &shared);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            connection::handle(stream, peer, accepted, &shared).await;
            drop(slot);
        });
    }
}
