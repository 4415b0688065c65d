//! The loopback sockets a sandbox is redirected to, bound in the agent's
//! network namespace or in the sandbox's own.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use super::netns;

const LISTEN_BACKLOG: u32 = 4096;

/// The loopback sockets a sandbox is redirected to: TCP connects to
/// 127.0.0.1:P (v4-mapped ones included) and [::1]:P, DNS over UDP to the
/// same port number; in the agent's network namespace, or in the sandbox's
/// own (`--netns`). The TCP listeners carry the agent's listener mark
/// (SO_MARK), by which the kernel fast path knows them from a listener a
/// sandboxed process would bind on the same port once the agent is gone.
/// Their accepted connections inherit it; it does not change how those
/// are routed: their peers are on loopback, and the `local` table (rule
/// priority 0) is consulted before any fwmark rule.
pub struct Listeners {
    pub(super) v4: TcpListener,
    pub(super) v6: Option<TcpListener>,
    pub(super) dns: Vec<UdpSocket>,
}

impl Listeners {
    /// Binds port `port` (0: any free one) on the loopback of `netns`, or of
    /// the agent's own namespace. A namespace's loopback that is down is
    /// brought up: the sandbox reaches the agent over it. The TCP listeners
    /// get `mark`.
    pub fn bind(port: u16, netns: Option<&Path>, mark: u32) -> Result<Self> {
        let Some(path) = netns else { return Self::bind_here(port, mark) };
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
                    Self::bind_here(port, mark)
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("binding in {} panicked", path.display())))
        })
    }

    fn bind_here(port: u16, mark: u32) -> Result<Self> {
        let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), mark)?;
        let port = v4.local_addr()?.port();
        let mut dns = vec![bind_udp(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?];
        let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), mark) {
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

    /// Duplicates of every socket, with what each is for: what an upgrade
    /// hands to the next daemon.
    pub fn duplicates(&self) -> Result<Vec<(ListenerKind, OwnedFd)>> {
        let tcp = std::iter::once((ListenerKind::TcpV4, self.v4.as_fd()))
            .chain(self.v6.iter().map(|v6| (ListenerKind::TcpV6, v6.as_fd())));
        let dns = self.dns.iter().map(|socket| (ListenerKind::Dns, socket.as_fd()));
        tcp.chain(dns)
            .map(|(kind, fd)| Ok((kind, fd.try_clone_to_owned().context("duplicate a listening socket")?)))
            .collect()
    }

    /// The sockets a previous daemon bound and handed over (in whatever
    /// network namespace they were made); the TCP listeners get `mark` (a
    /// daemon of an earlier version set none).
    pub fn from_inherited(sockets: Vec<(ListenerKind, OwnedFd)>, mark: u32) -> Result<Self> {
        let (mut v4, mut v6, mut dns) = (None, None, Vec::new());
        for (kind, fd) in sockets {
            match kind {
                ListenerKind::TcpV4 => v4 = Some(inherited_tcp(fd, mark)?),
                ListenerKind::TcpV6 => v6 = Some(inherited_tcp(fd, mark)?),
                ListenerKind::Dns => {
                    let socket = std::net::UdpSocket::from(fd);
                    socket.set_nonblocking(true)?;
                    dns.push(UdpSocket::from_std(socket)?);
                }
            }
        }
        let Some(v4) = v4 else { bail!("no IPv4 listener handed over") };
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

/// What a listening socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    TcpV4,
    TcpV6,
    Dns,
}

/// The mark of the first TCP listener among `sockets` that has one: that of
/// the daemon that handed them over, kept so that its programs, still
/// attached until this daemon's replace them, go on taking its listeners
/// for the agent's.
pub fn inherited_mark<'a>(sockets: impl IntoIterator<Item = &'a (ListenerKind, OwnedFd)>) -> Option<u32> {
    sockets
        .into_iter()
        .filter(|(kind, _)| *kind != ListenerKind::Dns)
        .find_map(|(_, fd)| getsockopt(fd, sockopt::Mark).ok().filter(|mark| *mark != 0))
}

fn inherited_tcp(fd: OwnedFd, mark: u32) -> Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    set_mark(&listener, mark)?;
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
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

/// Sets the agent's listener mark (SO_MARK needs CAP_NET_ADMIN).
fn set_mark(socket: &impl AsFd, mark: u32) -> Result<()> {
    setsockopt(socket, sockopt::Mark, &mark).context("set the listener mark (SO_MARK needs CAP_NET_ADMIN)")
}

fn bind(addr: SocketAddr, mark: u32) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    set_mark(&socket, mark)?;
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
