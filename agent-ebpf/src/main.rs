//! Transparent redirect of a sandbox cgroup's TCP connects and DNS queries
//! to the agent.
//!
//! connect4/connect6 record the original destination and the caller under
//! the socket cookie, then rewrite the destination to the agent's loopback
//! listener. sock_ops, just before the SYN, moves the record under the
//! client's (ip, port), which is what the agent sees as `peer_addr()`.
//!
//! DNS over UDP (sendmsg, or connect on a UDP socket, to port 53 at any
//! address) goes to the agent's DNS responder on the same loopback port;
//! recvmsg makes the replies appear to come from the server the program
//! asked, so resolvers that check the reply's source accept them. Every
//! other datagram is refused (EPERM): QUIC clients fall back to TCP at once,
//! and no UDP or ICMP leaves the sandbox around the proxy.
//!
//! The programs are loaded once and attached to every sandbox's cgroup; each
//! finds its caller's sandbox in the SANDBOXES map (sandboxes.rs): the port
//! of its listener and the network namespace that listener is in. A
//! sandboxed process in another namespace (unshare -n, a container's netns)
//! cannot be redirected: its connects and datagrams are refused (EPERM) with
//! a trace naming the process, rather than reaching whatever that namespace
//! routes. So are those of a removed sandbox (fail closed), and of a cgroup
//! with the programs attached but no entry.
#![no_std]
#![no_main]

mod containment;
mod fast;
mod identity;
mod sandboxes;
mod trace;

use core::ptr::{read_volatile, write_volatile};

use agent_common::{
    event_kind, is_v4_mapped, ClientKey, ConnectRecord, DnsClient, DnsRedirect, ExeId, SockAddrKey,
    BY_CLIENT_MAX_ENTRIES, BY_COOKIE_MAX_ENTRIES, DNS_CLIENTS_MAX_ENTRIES, DNS_PORT, DNS_SERVER_MAX_ENTRIES,
};
use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::LruHashMap,
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use fast::{current_exe, fast_connect};
use identity::current_times;
use sandboxes::current_sandbox;
use trace::report_refusal;

#[map]
static CONNECTS_BY_COOKIE: LruHashMap<u64, ConnectRecord> = LruHashMap::with_max_entries(BY_COOKIE_MAX_ENTRIES, 0);

#[map]
static CONNECTS_BY_CLIENT: LruHashMap<ClientKey, ConnectRecord> =
    LruHashMap::with_max_entries(BY_CLIENT_MAX_ENTRIES, 0);

#[map]
pub(crate) static DNS_SERVER_BY_COOKIE: LruHashMap<u64, DnsRedirect> =
    LruHashMap::with_max_entries(DNS_SERVER_MAX_ENTRIES, 0);

#[map]
pub(crate) static DNS_CLIENTS: LruHashMap<ClientKey, DnsClient> =
    LruHashMap::with_max_entries(DNS_CLIENTS_MAX_ENTRIES, 0);

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const AF_INET: u32 = 2;
const LOOPBACK_V4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6_BE: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
const MAPPED_LOOPBACK_V4_BE: [u32; 4] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), LOOPBACK_V4_BE];

enum Socket {
    Tcp,
    Udp,
    /// Other datagram sockets (ICMP ping sockets...): refused.
    OtherDatagram,
    /// SOCK_STREAM with another protocol (MPTCP, SCTP): the agent cannot
    /// relay it, so it must not leave the sandbox.
    UnsupportedStream,
}

fn socket_kind(sa: *const bpf_sock_addr) -> Socket {
    // SAFETY: the kernel hands a valid context; fields are read once each.
    let (sock_type, protocol) = unsafe { (read_volatile(&(*sa).type_), read_volatile(&(*sa).protocol)) };
    match (sock_type, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) => Socket::Tcp,
        (SOCK_STREAM, _) => Socket::UnsupportedStream,
        (SOCK_DGRAM, IPPROTO_UDP) => Socket::Udp,
        _ => Socket::OtherDatagram,
    }
}

pub(crate) fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is the program's own.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The caller's sandbox, as far as its connects and datagrams may go to it.
struct Caller {
    sandbox_cgroup_id: u64,
    netns_cookie: u64,
    listen_port: u16,
    fast_generation: u32,
}

/// The caller's sandbox if it is served and the caller is in its
/// listener's network namespace; if not, traces the refusal (the only
/// place it can be explained from).
fn caller(ctx: &SockAddrContext) -> Option<Caller> {
    // SAFETY: helper without pointer arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let Some((sandbox_cgroup_id, entry)) = current_sandbox() else {
        report_refusal(cgroup_id, event_kind::UNKNOWN_SANDBOX);
        return None;
    };
    if entry.open == 0 {
        report_refusal(cgroup_id, event_kind::CLOSED);
        return None;
    }
    // SAFETY: the context pointer is the program's own.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns_cookie != entry.netns_cookie {
        report_refusal(cgroup_id, event_kind::OTHER_NETNS);
        return None;
    }
    Some(Caller {
        sandbox_cgroup_id,
        netns_cookie,
        listen_port: entry.listen_port,
        fast_generation: entry.fast_generation,
    })
}

/// Remembers which DNS server a UDP socket addressed (the latest one), and
/// where its queries go instead.
fn record_dns_server(ctx: &SockAddrContext, caller: &Caller, server: SockAddrKey) {
    let redirect = DnsRedirect {
        server,
        listen_port: caller.listen_port,
        _pad: 0,
        netns_cookie: caller.netns_cookie,
        sandbox_cgroup_id: caller.sandbox_cgroup_id,
    };
    let _ = DNS_SERVER_BY_COOKIE.insert(socket_cookie(ctx), redirect, u64::from(BPF_ANY));
}

/// Sends a UDP datagram (or connects a UDP socket) for port 53 to the
/// agent's DNS responder instead. Returns whether it was redirected.
fn redirect_dns4(ctx: &SockAddrContext, caller: &Caller) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; user_ip4/user_port are readable and writable here.
    unsafe {
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        if port != DNS_PORT {
            return false;
        }
        record_dns_server(ctx, caller, SockAddrKey::from_ipv4(read_volatile(&(*sa).user_ip4), port));
        write_volatile(&mut (*sa).user_ip4, LOOPBACK_V4_BE);
        write_volatile(&mut (*sa).user_port, u32::from(caller.listen_port.to_be()));
    }
    true
}

fn redirect_dns6(ctx: &SockAddrContext, caller: &Caller) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; user_ip6 is accessed as four u32 words.
    unsafe {
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        if port != DNS_PORT {
            return false;
        }
        let ip6 = read_ip6(&(*sa).user_ip6);
        record_dns_server(ctx, caller, SockAddrKey::from_ipv6(ip6, port));
        write_ip6(&mut (*sa).user_ip6, loopback_for(ip6));
        write_volatile(&mut (*sa).user_port, u32::from(caller.listen_port.to_be()));
    }
    true
}

/// A v4-mapped destination travels over IPv4: it goes to the IPv4 loopback.
fn loopback_for(ip6: [u32; 4]) -> [u32; 4] {
    if is_v4_mapped(ip6) {
        MAPPED_LOOPBACK_V4_BE
    } else {
        LOOPBACK_V6_BE
    }
}

/// # Safety
/// `words` must point into a valid bpf_sock_addr context.
unsafe fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    unsafe { [read_volatile(&words[0]), read_volatile(&words[1]), read_volatile(&words[2]), read_volatile(&words[3])] }
}

/// Four u32 stores: the only width the verifier allows for user_ip6 writes.
/// # Safety
/// `words` must point into a valid bpf_sock_addr context.
unsafe fn write_ip6(words: &mut [u32; 4], ip6: [u32; 4]) {
    unsafe {
        write_volatile(&mut words[0], ip6[0]);
        write_volatile(&mut words[1], ip6[1]);
        write_volatile(&mut words[2], ip6[2]);
        write_volatile(&mut words[3], ip6[3]);
    }
}

/// Stores who connects where, under the socket cookie. An existing record is
/// kept: while a restarting agent's programs overlap, the first program in the
/// chain saw the real destination and later ones only see the listener.
fn record_connect(ctx: &SockAddrContext, caller: &Caller, original_dst: SockAddrKey, exe: ExeId) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let record = ConnectRecord {
        original_dst,
        tgid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        listen_port: caller.listen_port,
        _pad: 0,
        // SAFETY: helper without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        sandbox_cgroup_id: caller.sandbox_cgroup_id,
        netns_cookie: caller.netns_cookie,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        times: current_times(),
        exe,
    };
    let cookie = socket_cookie(ctx);
    fast::forget_socket(cookie);
    if CONNECTS_BY_COOKIE.insert(cookie, record, u64::from(BPF_NOEXIST)).is_ok() {
        debug!(ctx, "redirect pid={} dst=[{:i}]:{}", record.tgid, original_dst.addr, original_dst.port);
    }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    let Some(caller) = caller(&ctx) else { return REJECT };
    let sa = ctx.sock_addr;
    match socket_kind(sa) {
        Socket::Tcp => {}
        Socket::Udp => return dns_or_reject(redirect_dns4(&ctx, &caller)),
        Socket::OtherDatagram | Socket::UnsupportedStream => return REJECT,
    }
    // SAFETY: valid context; user_ip4/user_port are readable and writable
    // in connect4 programs.
    unsafe {
        let ip4 = read_volatile(&(*sa).user_ip4);
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        let destination = SockAddrKey::from_ipv4(ip4, port);
        let exe = current_exe();
        if fast_connect(&ctx, &caller, destination, exe, true) {
            return ALLOW;
        }
        record_connect(&ctx, &caller, destination, exe);
        write_volatile(&mut (*sa).user_ip4, LOOPBACK_V4_BE);
        write_volatile(&mut (*sa).user_port, u32::from(caller.listen_port.to_be()));
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    let Some(caller) = caller(&ctx) else { return REJECT };
    let sa = ctx.sock_addr;
    match socket_kind(sa) {
        Socket::Tcp => {}
        Socket::Udp => return dns_or_reject(redirect_dns6(&ctx, &caller)),
        Socket::OtherDatagram | Socket::UnsupportedStream => return REJECT,
    }
    // SAFETY: valid context for a connect6 program.
    unsafe {
        let ip6 = read_ip6(&(*sa).user_ip6);
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        let destination = SockAddrKey::from_ipv6(ip6, port);
        let exe = current_exe();
        if fast_connect(&ctx, &caller, destination, exe, is_v4_mapped(ip6)) {
            return ALLOW;
        }
        record_connect(&ctx, &caller, destination, exe);
        write_ip6(&mut (*sa).user_ip6, loopback_for(ip6));
        write_volatile(&mut (*sa).user_port, u32::from(caller.listen_port.to_be()));
    }
    ALLOW
}

/// Datagrams may only carry DNS (which the agent answers).
fn dns_or_reject(redirected_to_agent: bool) -> i32 {
    if redirected_to_agent {
        ALLOW
    } else {
        REJECT
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_dns_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(caller) = caller(&ctx) else { return REJECT };
    dns_or_reject(redirect_dns4(&ctx, &caller))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_dns_sendmsg6(ctx: SockAddrContext) -> i32 {
    let Some(caller) = caller(&ctx) else { return REJECT };
    dns_or_reject(redirect_dns6(&ctx, &caller))
}

/// A reply from the agent's DNS responder is shown as coming from the
/// server the socket addressed.
#[cgroup_sock_addr(recvmsg4)]
pub fn restore_dns_source4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; recvmsg4 may read and write user_ip4/user_port.
    unsafe {
        let ip4 = read_volatile(&(*sa).user_ip4);
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        if ip4 != LOOPBACK_V4_BE {
            return ALLOW;
        }
        if let Some(redirect) = DNS_SERVER_BY_COOKIE.get(socket_cookie(&ctx)) {
            if port != redirect.listen_port {
                return ALLOW;
            }
            let server = redirect.server;
            let a = server.addr;
            write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes([a[12], a[13], a[14], a[15]]));
            write_volatile(&mut (*sa).user_port, u32::from(server.port.to_be()));
        }
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn restore_dns_source6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; recvmsg6 may read and write user_ip6/user_port.
    unsafe {
        let ip6 = read_ip6(&(*sa).user_ip6);
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        if ip6 != LOOPBACK_V6_BE && ip6 != MAPPED_LOOPBACK_V4_BE {
            return ALLOW;
        }
        if let Some(redirect) = DNS_SERVER_BY_COOKIE.get(socket_cookie(&ctx)) {
            if port != redirect.listen_port {
                return ALLOW;
            }
            let server = redirect.server;
            let a = server.addr;
            let words = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
            write_ip6(&mut (*sa).user_ip6, words);
            write_volatile(&mut (*sa).user_port, u32::from(server.port.to_be()));
        }
    }
    ALLOW
}

/// Re-keys the connect record by the client's address before the SYN, so the
/// record exists by the time the agent accepts the connection. For a fast
/// socket instead, asks for its state changes, and reports its close.
#[sock_ops]
pub fn rekey_by_client(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // Every field is read up front: the verifier rejects ctx reads that LLVM
    // merges across branches.
    // SAFETY: valid sock_ops context.
    let (op, family, local_ip4, local_port, remote_ip6, states, bytes_acked, bytes_received) = unsafe {
        (
            read_volatile(&(*ops).op),
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).local_port),
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ],
            (read_volatile(&(*ops).__bindgen_anon_1.args[0]), read_volatile(&(*ops).__bindgen_anon_1.args[1])),
            read_volatile(&(*ops).bytes_acked),
            read_volatile(&(*ops).bytes_received),
        )
    };
    if op == BPF_SOCK_OPS_STATE_CB {
        // SAFETY: the context pointer is the program's own.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        fast::state_changed(cookie, states.0, states.1, bytes_acked, bytes_received);
        return 1;
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: valid sock_ops context.
    let local_ip6 = unsafe {
        [
            read_volatile(&(*ops).local_ip6[0]),
            read_volatile(&(*ops).local_ip6[1]),
            read_volatile(&(*ops).local_ip6[2]),
            read_volatile(&(*ops).local_ip6[3]),
        ]
    };
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if fast::is_fast(cookie) {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        return 1;
    }
    // SAFETY: the value is copied out before any map update.
    let Some(record) = (unsafe { CONNECTS_BY_COOKIE.get(cookie) }).copied() else {
        return 1;
    };
    // A v4-mapped connect on an AF_INET6 socket goes through tcp_v4_connect:
    // its source address is the IPv4 one.
    let port = local_port as u16;
    let client = if family == AF_INET || is_v4_mapped(remote_ip6) {
        SockAddrKey::from_ipv4(local_ip4, port)
    } else {
        SockAddrKey::from_ipv6(local_ip6, port)
    };
    let client = ClientKey::new(record.netns_cookie, record.listen_port, client);
    // A stale entry for a reused client port is replaced by the newer connect.
    let _ = CONNECTS_BY_CLIENT.insert(client, record, u64::from(BPF_ANY));
    let _ = CONNECTS_BY_COOKIE.remove(cookie);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
