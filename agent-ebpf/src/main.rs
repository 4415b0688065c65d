//! Transparent redirect of a sandbox cgroup's TCP connects to the agent.
//!
//! connect4/connect6 record the original destination and the caller under
//! the socket cookie, then rewrite the destination to the agent's loopback
//! listener. sock_ops, just before the SYN, moves the record under the
//! client's (ip, port), which is what the agent sees as `peer_addr()`.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use agent_common::{
    is_v4_mapped, ConnectRecord, SockAddrKey, BY_CLIENT_MAX_ENTRIES, BY_COOKIE_MAX_ENTRIES,
};
use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, generated::bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::LruHashMap,
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext, Global,
};
use aya_log_ebpf::debug;

/// Set by the agent at load time (host order).
#[unsafe(no_mangle)]
static LISTEN_PORT: Global<u16> = Global::new(0);

#[map]
static CONNECTS_BY_COOKIE: LruHashMap<u64, ConnectRecord> =
    LruHashMap::with_max_entries(BY_COOKIE_MAX_ENTRIES, 0);

#[map]
static CONNECTS_BY_CLIENT: LruHashMap<SockAddrKey, ConnectRecord> =
    LruHashMap::with_max_entries(BY_CLIENT_MAX_ENTRIES, 0);

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const LOOPBACK_V4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6_BE: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
const MAPPED_LOOPBACK_V4_BE: [u32; 4] = [
    0,
    0,
    u32::from_ne_bytes([0, 0, 0xff, 0xff]),
    LOOPBACK_V4_BE,
];

enum Stream {
    Tcp,
    /// UDP and friends: not this program's business.
    NotStream,
    /// SOCK_STREAM with another protocol (MPTCP, SCTP): the agent cannot
    /// relay it, so it must not leave the sandbox.
    Unsupported,
}

fn stream_kind(sa: *const bpf_sock_addr) -> Stream {
    // SAFETY: the kernel hands a valid context; fields are read once each.
    let (sock_type, protocol) =
        unsafe { (read_volatile(&(*sa).type_), read_volatile(&(*sa).protocol)) };
    match (sock_type, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) => Stream::Tcp,
        (SOCK_STREAM, _) => Stream::Unsupported,
        _ => Stream::NotStream,
    }
}

/// Stores who connects where, under the socket cookie. An existing record is
/// kept: while a restarting agent's programs overlap, the first program in the
/// chain saw the real destination and later ones only see the listener.
fn record_connect(ctx: &SockAddrContext, original_dst: SockAddrKey) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let record = ConnectRecord {
        original_dst,
        tgid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        _pad: 0,
        // SAFETY: helper without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if CONNECTS_BY_COOKIE
        .insert(cookie, record, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        debug!(
            ctx,
            "redirect pid={} comm={} dst=[{:i}]:{}",
            record.tgid,
            comm_str(&record.comm),
            original_dst.addr,
            original_dst.port
        );
    }
}

fn comm_str(comm: &[u8; 16]) -> &str {
    let mut len = 0;
    while len < comm.len() && comm[len] != 0 {
        len += 1;
    }
    // SAFETY: comm is what the task named itself; aya-log copies bytes as is.
    unsafe { core::str::from_utf8_unchecked(&comm[..len]) }
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    match stream_kind(sa) {
        Stream::Tcp => {}
        Stream::NotStream => return ALLOW,
        Stream::Unsupported => return REJECT,
    }
    // SAFETY: valid context; user_ip4/user_port are readable and writable
    // in connect4 programs.
    unsafe {
        let ip4 = read_volatile(&(*sa).user_ip4);
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        record_connect(&ctx, SockAddrKey::from_ipv4(ip4, port));
        write_volatile(&mut (*sa).user_ip4, LOOPBACK_V4_BE);
        write_volatile(&mut (*sa).user_port, u32::from(LISTEN_PORT.load().to_be()));
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    match stream_kind(sa) {
        Stream::Tcp => {}
        Stream::NotStream => return ALLOW,
        Stream::Unsupported => return REJECT,
    }
    // SAFETY: valid context; user_ip6 is accessed as four u32 words, the
    // only width the verifier allows for writes.
    unsafe {
        let ip6 = [
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ];
        let port = u16::from_be(read_volatile(&(*sa).user_port) as u16);
        record_connect(&ctx, SockAddrKey::from_ipv6(ip6, port));
        // A v4-mapped destination travels over IPv4: send it to the IPv4 listener.
        let listener = if is_v4_mapped(ip6) {
            MAPPED_LOOPBACK_V4_BE
        } else {
            LOOPBACK_V6_BE
        };
        write_volatile(&mut (*sa).user_ip6[0], listener[0]);
        write_volatile(&mut (*sa).user_ip6[1], listener[1]);
        write_volatile(&mut (*sa).user_ip6[2], listener[2]);
        write_volatile(&mut (*sa).user_ip6[3], listener[3]);
        write_volatile(&mut (*sa).user_port, u32::from(LISTEN_PORT.load().to_be()));
    }
    ALLOW
}

/// Re-keys the connect record by the client's address before the SYN, so the
/// record exists by the time the agent accepts the connection.
#[sock_ops]
pub fn rekey_by_client(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // Every field is read up front: the verifier rejects ctx reads that LLVM
    // merges across branches.
    // SAFETY: valid sock_ops context.
    let (op, family, local_ip4, local_port, remote_ip6) = unsafe {
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
        )
    };
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
