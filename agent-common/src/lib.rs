//! Types shared between the eBPF programs and the agent. Every type is
//! `#[repr(C)]` with explicit padding: the verifier rejects map writes of
//! structs with uninitialised padding bytes.
#![no_std]

/// Name of the map holding connect records keyed by socket cookie
/// (written by connect4/6, moved by sock_ops).
pub const MAP_BY_COOKIE: &str = "CONNECTS_BY_COOKIE";
/// Name of the map holding connect records keyed by the client's address,
/// which the agent looks up with `peer_addr()` after `accept()`.
pub const MAP_BY_CLIENT: &str = "CONNECTS_BY_CLIENT";
/// Name of the map holding, per UDP socket cookie, the DNS server the
/// sandbox addressed: replies are made to appear to come from it.
pub const MAP_DNS_SERVER_BY_COOKIE: &str = "DNS_SERVER_BY_COOKIE";
/// Name of the map holding, per UDP client address of a DNS query sent to
/// the agent, the cgroup id of the sandbox socket that sent it (written by
/// the packet program on the way out).
pub const MAP_DNS_CLIENTS: &str = "DNS_CLIENTS";
/// Name of the map holding, per process (tgid) of the sandbox, when it was
/// forked and when it last tried to exec (written by tracepoints).
pub const MAP_PROCESS_TIMES: &str = "PROCESS_TIMES";
/// Name of the map listing the abstract unix socket names sandboxes may
/// reach (`run --allow-abstract-unix`); every other one is refused.
pub const MAP_ABSTRACT_UNIX_ALLOWED: &str = "ABSTRACT_UNIX_ALLOWED";
/// Name of the map of sandbox cgroups, served or closed ([`SandboxEntry`]
/// by cgroup id): the programs, loaded once for every sandbox, find a
/// process's sandbox there, and process tracking keeps only the processes
/// of those cgroups (and of the cgroups below them).
pub const MAP_SANDBOXES: &str = "SANDBOXES";
/// Name of the ring buffer of [`KernelEvent`]s: refusals and drops the
/// agent logs (kernel-side warnings are rate limited there, per sandbox).
pub const MAP_EVENTS: &str = "EVENTS";
/// Name of the kernel fast path's decision cache ([`FastKey`] to
/// [`FastDecision`]): filled by the agent from its own decisions, read by
/// connect4/6.
pub const MAP_FAST_DECISIONS: &str = "FAST_DECISIONS";
/// Name of the map of sockets let out by the fast path ([`FastSocket`] by
/// socket cookie): the packet backstop lets exactly these through, and
/// sock_ops reports each one's close.
pub const MAP_FAST_SOCKETS: &str = "FAST_SOCKETS";
/// Name of the ring buffer of [`FastClose`]s, one per fast socket closed.
pub const MAP_FAST_CLOSES: &str = "FAST_CLOSES";
/// Name of the per-CPU count of [`FastClose`]s lost to a full ring.
pub const MAP_FAST_CLOSES_LOST: &str = "FAST_CLOSES_LOST";
/// Deepest cgroup level searched for a process's sandbox (the root is 0).
pub const MAX_CGROUP_LEVEL: u32 = 32;
/// DNS queries to this port, on any address, are answered by the agent.
pub const DNS_PORT: u16 = 53;

/// Entries of the cookie map live only between connect() and the SYN.
pub const BY_COOKIE_MAX_ENTRIES: u32 = 16_384;
/// Entries of the client map live between the SYN and the agent's accept().
pub const BY_CLIENT_MAX_ENTRIES: u32 = 65_536;
/// One entry per UDP socket that sent a DNS query, while it lives.
pub const DNS_SERVER_MAX_ENTRIES: u32 = 16_384;

/// One entry per UDP socket that sent a query to the agent, while it lives.
pub const DNS_CLIENTS_MAX_ENTRIES: u32 = 16_384;

/// One entry per sandboxed process, while it (or a later one with its pid) lives.
pub const PROCESS_TIMES_MAX_ENTRIES: u32 = 65_536;
/// Sandbox cgroups the kernel's sandbox map holds, for every agent on the
/// host (served, or removed without detach); allocated as they come.
pub const SANDBOXES_MAX_ENTRIES: u32 = 65_536;
/// Fast-path decisions cached for every agent on the host (LRU: an
/// evicted one only costs a proxied connection).
pub const FAST_DECISIONS_MAX_ENTRIES: u32 = 65_536;
/// Fast-path sockets open at once on the host (LRU).
pub const FAST_SOCKETS_MAX_ENTRIES: u32 = 65_536;
/// Bytes of the ring buffer of fast-path closes.
pub const FAST_CLOSES_BYTES: u32 = 1024 * 1024;
/// A policy name longer than this is never fast-pathed.
pub const POLICY_NAME_MAX: usize = 64;
/// Names given with `--allow-abstract-unix`.
pub const ABSTRACT_UNIX_ALLOWED_MAX_ENTRIES: u32 = 64;
/// An abstract unix name is at most 107 bytes (sun_path less its leading NUL).
pub const ABSTRACT_NAME_MAX: usize = 107;

/// A sandbox cgroup as the programs see it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxEntry {
    /// Cookie of the network namespace its listener is in: its sockets
    /// elsewhere are refused.
    pub netns_cookie: u64,
    /// Its listener's port (host order): TCP connects go to it, DNS over UDP
    /// to the same port number.
    pub listen_port: u16,
    /// 1 while served; 0 once removed: its connects and datagrams are
    /// refused (fail closed) until it is served again or detached.
    pub open: u16,
    /// The generation of the fast-path decisions that hold for it: a policy
    /// reload changes it, and the decisions of earlier ones stop matching.
    pub fast_generation: u32,
}

/// A client's address towards one listener, in one network namespace:
/// loopback addresses repeat from one namespace to the next, and one
/// client port may connect to several listeners at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub netns_cookie: u64,
    pub addr: SockAddrKey,
    /// The listener's port (host order).
    pub listen_port: u16,
    pub _pad: u16,
}

impl ClientKey {
    pub const fn new(netns_cookie: u64, listen_port: u16, addr: SockAddrKey) -> Self {
        Self { netns_cookie, addr, listen_port, _pad: 0 }
    }
}

/// The DNS server a UDP socket addressed, and where its queries went instead.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsRedirect {
    pub server: SockAddrKey,
    /// The sandbox listener's port its queries went to (host order).
    pub listen_port: u16,
    pub _pad: u16,
    pub netns_cookie: u64,
    pub sandbox_cgroup_id: u64,
}

/// Who sent a DNS query to the agent: the socket's cgroup, and the sandbox
/// cgroup it belongs to (the same, or an ancestor).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsClient {
    pub cgroup_id: u64,
    pub sandbox_cgroup_id: u64,
}

/// A socket address: IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`)
/// so one key type serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAddrKey {
    /// Address bytes in network order.
    pub addr: [u8; 16],
    /// Port in host order.
    pub port: u16,
    pub _pad: u16,
}

impl SockAddrKey {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self { addr, port, _pad: 0 }
    }

    /// `ip4_be` is an IPv4 address as the kernel stores it (network order).
    pub const fn from_ipv4(ip4_be: u32, port: u16) -> Self {
        let b = ip4_be.to_ne_bytes();
        Self::new([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]], port)
    }

    /// `ip6_be` is an IPv6 address as the kernel stores it (four network-order words).
    pub const fn from_ipv6(ip6_be: [u32; 4], port: u16) -> Self {
        let w0 = ip6_be[0].to_ne_bytes();
        let w1 = ip6_be[1].to_ne_bytes();
        let w2 = ip6_be[2].to_ne_bytes();
        let w3 = ip6_be[3].to_ne_bytes();
        Self::new(
            [
                w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0], w3[1],
                w3[2], w3[3],
            ],
            port,
        )
    }
}

/// `ip6_be` (four network-order words) is `::ffff:a.b.c.d`.
pub const fn is_v4_mapped(ip6_be: [u32; 4]) -> bool {
    ip6_be[0] == 0 && ip6_be[1] == 0 && ip6_be[2] == u32::from_be(0x0000_ffff)
}

/// What the kernel saw when a sandboxed process called connect().
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectRecord {
    /// The destination the process asked for.
    pub original_dst: SockAddrKey,
    /// Process (thread-group) id of the caller.
    pub tgid: u32,
    pub uid: u32,
    /// The listener the connect went to (host order).
    pub listen_port: u16,
    pub _pad: u16,
    pub cgroup_id: u64,
    /// The sandbox's cgroup: `cgroup_id` or an ancestor of it.
    pub sandbox_cgroup_id: u64,
    /// The network namespace the connect came from (its listener's).
    pub netns_cookie: u64,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
    /// The process's times when it connected: the agent refuses the
    /// connection if they changed before it read the process's identity
    /// (an exec, or its pid taken by another process).
    pub times: ProcessTimes,
    /// The process's executable when it connected (zero if unknown).
    pub exe: ExeId,
}

/// An executable file as the kernel knows it: inode number, device
/// (`s_dev`, the kernel's encoding: major << 20 | minor) and the inode's
/// generation (a freed inode number used again gets another one on ext4,
/// xfs, btrfs and tmpfs). Zero: unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExeId {
    pub ino: u64,
    pub dev: u32,
    pub generation: u32,
}

/// A fast-path decision's key: who (cgroup and executable) may reach which
/// destination, under which generation of its sandbox's policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FastKey {
    /// The connecting process's own cgroup (names resolved are per cgroup).
    pub cgroup_id: u64,
    pub exe: ExeId,
    pub destination: SockAddrKey,
    pub fast_generation: u32,
}

/// A fast-path decision: allowed until `expires_ns`, by `policy`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FastDecision {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`); `u64::MAX` for IP literals.
    pub expires_ns: u64,
    pub sandbox_cgroup_id: u64,
    /// The allowing policy's name, NUL padded.
    pub policy: [u8; POLICY_NAME_MAX],
}

/// A socket connected by the fast path, while it is open.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FastSocket {
    /// CLOCK_MONOTONIC at connect().
    pub started_ns: u64,
    pub sandbox_cgroup_id: u64,
    pub cgroup_id: u64,
    pub exe: ExeId,
    pub destination: SockAddrKey,
    pub tgid: u32,
    pub uid: u32,
    /// The TCP states it went through (bit `1 << state`), for what its
    /// byte counts include (SYN, FINs) and whether it was established.
    pub states: u32,
    pub fast_generation: u32,
    pub comm: [u8; 16],
    pub policy: [u8; POLICY_NAME_MAX],
    pub _pad: u32,
}

// No implicit padding anywhere: the verifier rejects uninitialised bytes.
const _: () = {
    assert!(size_of::<FastKey>() == 48);
    assert!(size_of::<FastDecision>() == 80);
    assert!(size_of::<FastSocket>() == 160);
    assert!(size_of::<FastClose>() == 192);
    assert!(size_of::<ConnectRecord>() == 104);
};

/// A fast-path socket closed, with the kernel's TCP byte counts: they
/// count the SYN and FINs as one byte each (see [`FastClose::payload`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FastClose {
    pub socket: FastSocket,
    /// Bytes the peer acknowledged (sent by the sandbox).
    pub bytes_acked: u64,
    /// Bytes received from the peer.
    pub bytes_received: u64,
    /// CLOCK_MONOTONIC at close.
    pub closed_ns: u64,
    /// The state it closed from.
    pub closed_from: u32,
    pub _pad: u32,
}

/// When a sandboxed process was forked and when it last tried to exec,
/// in CLOCK_MONOTONIC nanoseconds; 0 where it happened before tracking
/// began (before the agent first attached).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessTimes {
    pub forked_ns: u64,
    pub exec_ns: u64,
}

/// What a [`KernelEvent`] reports.
pub mod event_kind {
    /// A connect or datagram from another network namespace, refused.
    pub const OTHER_NETNS: u32 = 1;
    /// A packet of a sandbox socket leaving over a device other than loopback, dropped.
    pub const PACKET_EGRESS: u32 = 2;
    /// A packet for a sandbox socket arriving over a device other than loopback, dropped.
    pub const PACKET_INGRESS: u32 = 3;
    /// A connect or send to an abstract unix socket not allowed, refused.
    pub const ABSTRACT_UNIX: u32 = 4;
    /// A connect or datagram of a removed sandbox, refused (fail closed).
    pub const CLOSED: u32 = 5;
    /// A connect or datagram from a cgroup with the programs attached but
    /// no sandbox entry, refused (fail closed).
    pub const UNKNOWN_SANDBOX: u32 = 6;
}

/// A refusal or drop, at most one per second per sandbox and kind; the ones
/// in between are only counted (`suppressed`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KernelEvent {
    pub kind: u32,
    /// The calling process, or 0 for packets (no process context).
    pub pid: u32,
    pub cgroup_id: u64,
    /// The device's ifindex for packets, else 0.
    pub ifindex: u32,
    pub _pad: u32,
    /// Events of this kind and sandbox not reported since the last one.
    pub suppressed: u64,
    /// `comm` of the calling thread (NUL padded; zero for packets).
    pub comm: [u8; 16],
}

/// An abstract unix socket name: `len` bytes of `name`, zero padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbstractName {
    pub len: u8,
    pub name: [u8; ABSTRACT_NAME_MAX],
}

/// TCP states (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const FIN_WAIT2: u32 = 5;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

impl FastClose {
    fn went_through(&self, state: u32) -> bool {
        self.socket.states & (1 << state) != 0
    }

    pub fn established(&self) -> bool {
        self.went_through(tcp_state::ESTABLISHED)
    }

    /// Payload bytes (up: acknowledged by the peer, down: received): the
    /// kernel's counts less the SYN and FINs in them. Our FIN was
    /// acknowledged if the socket reached FIN_WAIT2, or closed from
    /// LAST_ACK or CLOSING; the peer's came if it went through CLOSE_WAIT or
    /// CLOSING, or closed from FIN_WAIT2 (into TIME_WAIT).
    pub fn payload(&self) -> (u64, u64) {
        use tcp_state::*;
        let fin_acked = self.went_through(FIN_WAIT2) || matches!(self.closed_from, LAST_ACK | CLOSING);
        let fin_received = self.went_through(CLOSE_WAIT) || self.went_through(CLOSING) || self.closed_from == FIN_WAIT2;
        let up = self.bytes_acked.saturating_sub(u64::from(self.established()) + u64::from(fin_acked));
        (up, self.bytes_received.saturating_sub(u64::from(fin_received)))
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these types are repr(C), Copy, and made only of integers and
    // byte arrays with explicit padding fields: every bit pattern is valid.
    unsafe impl aya::Pod for super::SockAddrKey {}
    unsafe impl aya::Pod for super::ConnectRecord {}
    unsafe impl aya::Pod for super::ProcessTimes {}
    unsafe impl aya::Pod for super::AbstractName {}
    unsafe impl aya::Pod for super::SandboxEntry {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::DnsRedirect {}
    unsafe impl aya::Pod for super::DnsClient {}
    unsafe impl aya::Pod for super::ExeId {}
    unsafe impl aya::Pod for super::FastKey {}
    unsafe impl aya::Pod for super::FastDecision {}
    unsafe impl aya::Pod for super::FastSocket {}
}
