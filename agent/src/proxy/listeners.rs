//! The loopback sockets a sandbox is redirected to, bound in the agent's
//! network namespace or in the sandbox's own.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use super::netns;

const LISTEN_BACKLOG: u32 = 4096;

/// The loopback sockets a sandbox is redirected to: TCP connects to
/// 127.0.0.1:P (v4-mapped ones included) and [::1]:P, DNS over UDP to the
/// same port number; in the agent's network namespace, or in the sandbox's
/// own (`--netns`).
pub struct Listeners {
    pub(super) v4: TcpListener,
    pub(super) v6: Option<TcpListener>,
    pub(super) dns: Vec<UdpSocket>,
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
