//! What keeps a sandbox from reaching anything but the agent, beside the
//! connect/sendmsg redirect:
//! - sockets: AF_INET/AF_INET6 only as TCP or UDP (no ICMP ping sockets,
//!   UDP-Lite, SCTP, MPTCP, raw);
//! - no binding a socket to a device or an outgoing interface;
//! - packets: every packet of a sandbox socket leaves and arrives over
//!   loopback, where the agent is; any other is dropped (the backstop);
//! - abstract unix sockets: refused unless the agent was told the name.

use agent_common::{event_kind, AbstractName, ClientKey, DnsClient, SockAddrKey, ABSTRACT_UNIX_ALLOWED_MAX_ENTRIES};
use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::{cgroup_skb, cgroup_sock, cgroup_sockopt, map},
    maps::HashMap,
    programs::{SkBuffContext, SockContext, SockoptContext},
};
use core::ptr::read_volatile;

use crate::{fast, trace::report_drop, DNS_CLIENTS, DNS_SERVER_BY_COOKIE};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const LOOPBACK_IFINDEX: u32 = 1;

#[cgroup_sock(sock_create)]
pub fn restrict_inet_sockets(ctx: SockContext) -> i32 {
    // SAFETY: valid context; family/type/protocol are readable in sock_create.
    let (family, sock_type, protocol) = unsafe {
        let sock = ctx.sock;
        (read_volatile(&(*sock).family), read_volatile(&(*sock).type_), read_volatile(&(*sock).protocol))
    };
    if family != AF_INET && family != AF_INET6 {
        return ALLOW;
    }
    match (sock_type, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP) => ALLOW,
        _ => REJECT,
    }
}

const SOL_SOCKET: i32 = 1;
const SO_BINDTODEVICE: i32 = 25;
const SO_BINDTOIFINDEX: i32 = 62;
const IPPROTO_IP: i32 = 0;
const IP_UNICAST_IF: i32 = 50;
const IPPROTO_IPV6: i32 = 41;
const IPV6_UNICAST_IF: i32 = 76;
const IPV6_PKTINFO: i32 = 50;

/// Options that choose the device a socket sends on: a datagram rewritten
/// to 127.0.0.1 must not leave on another device.
#[cgroup_sockopt(setsockopt)]
pub fn refuse_device_binding(ctx: SockoptContext) -> i32 {
    // SAFETY: valid context; level and optname are readable.
    let (level, optname) = unsafe { (read_volatile(&(*ctx.sockopt).level), read_volatile(&(*ctx.sockopt).optname)) };
    match (level, optname) {
        (SOL_SOCKET, SO_BINDTODEVICE | SO_BINDTOIFINDEX)
        | (IPPROTO_IP, IP_UNICAST_IF)
        | (IPPROTO_IPV6, IPV6_UNICAST_IF | IPV6_PKTINFO) => REJECT,
        _ => ALLOW,
    }
}

const IPPROTO_UDP_U8: u8 = 17;

/// The backstop: a sandbox's packets leave only over loopback, but for
/// those of sockets the fast path let out. On the way, notes which sandbox
/// sent each DNS query to the agent.
#[cgroup_skb(egress)]
pub fn contain_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: valid context; ifindex is readable in cgroup_skb programs.
    let ifindex = unsafe { read_volatile(&(*ctx.skb.skb).ifindex) };
    if ifindex == LOOPBACK_IFINDEX {
        record_dns_client(&ctx);
        return ALLOW;
    }
    if is_fast_socket(&ctx) {
        return ALLOW;
    }
    dropped(&ctx, event_kind::PACKET_EGRESS, ifindex);
    REJECT
}

/// Nothing reaches a sandbox's sockets from outside the machine: listeners
/// in a sandbox are not reachable over any device but loopback.
#[cgroup_skb(ingress)]
pub fn contain_ingress(ctx: SkBuffContext) -> i32 {
    // SAFETY: valid context; ifindex is readable in cgroup_skb programs.
    let ifindex = unsafe { read_volatile(&(*ctx.skb.skb).ifindex) };
    if ifindex == LOOPBACK_IFINDEX || is_fast_socket(&ctx) {
        return ALLOW;
    }
    dropped(&ctx, event_kind::PACKET_INGRESS, ifindex);
    REJECT
}

fn is_fast_socket(ctx: &SkBuffContext) -> bool {
    // SAFETY: the context pointer is the program's own.
    fast::is_fast(unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) })
}

fn dropped(ctx: &SkBuffContext, kind: u32, ifindex: u32) {
    // SAFETY: the context pointer is the program's own.
    report_drop(unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }, kind, ifindex);
}

/// A UDP datagram over loopback from a sandbox goes to the agent (any other
/// is refused at sendmsg/connect): remember which sandbox its source is, in
/// the network namespace its socket's queries were redirected in.
fn record_dns_client(ctx: &SkBuffContext) {
    let Ok(first) = ctx.load::<u8>(0) else { return };
    let (client, udp_offset) = match first >> 4 {
        4 => {
            let Ok(protocol) = ctx.load::<u8>(9) else { return };
            let Ok(source) = ctx.load::<u32>(12) else { return };
            if protocol != IPPROTO_UDP_U8 {
                return;
            }
            (SockAddrKey::from_ipv4(source, 0), usize::from(first & 0x0f) * 4)
        }
        6 => {
            let Ok(next_header) = ctx.load::<u8>(6) else { return };
            let Ok(source) = ctx.load::<[u32; 4]>(8) else { return };
            if next_header != IPPROTO_UDP_U8 {
                return;
            }
            (SockAddrKey::from_ipv6(source, 0), 40)
        }
        _ => return,
    };
    let Ok(ports) = ctx.load::<[u8; 4]>(udp_offset) else { return };
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(redirect) = (unsafe { DNS_SERVER_BY_COOKIE.get(&cookie) }).copied() else { return };
    if u16::from_be_bytes([ports[2], ports[3]]) != redirect.listen_port {
        return;
    }
    let client = SockAddrKey { port: u16::from_be_bytes([ports[0], ports[1]]), ..client };
    // SAFETY: the context pointer is the program's own.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let sender = DnsClient { cgroup_id, sandbox_cgroup_id: redirect.sandbox_cgroup_id };
    let _ = DNS_CLIENTS.insert(&ClientKey::new(redirect.netns_cookie, redirect.listen_port, client), &sender, 0);
}

/// Abstract unix socket names sandboxes may reach (`run --allow-abstract-unix`),
/// read by the unix socket programs the agent assembles itself
/// (agent/src/redirect/abstract_unix.rs: aya cannot load those hooks).
#[map]
static ABSTRACT_UNIX_ALLOWED: HashMap<AbstractName, u8> =
    HashMap::with_max_entries(ABSTRACT_UNIX_ALLOWED_MAX_ENTRIES, 0);
