//! The kernel fast path, the proxy's side: after relaying an L4 stream it
//! allowed, offers the same decision to the kernel (which then connects the
//! same executable to the same destination directly); and turns the
//! kernel's report of each fast socket's close into the same close line and
//! metrics as a relayed connection, with `path: kernel`.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{FastClose, FastDecision, FastKey, SockAddrKey, DNS_PORT, POLICY_NAME_MAX};
use tracing::Instrument;

use super::sandbox::{Sandbox, SandboxTable};
use crate::{
    conn::{known_exe, Origin},
    dns::is_inference_address,
    observe::{Ended, Observer},
    redirect::fast::{monotonic_ns, Closes},
};

/// At most one warning about lost closes in this long.
const LOST_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Offers the kernel the decision that let `origin` relay a stream as it is
/// (opaque, silent or TLS passthrough) to its destination, if the address
/// alone (no SNI) allows the executable alone there by a `protocol: tcp`
/// endpoint: the kernel never sees bytes, so neither does that decision.
pub fn offer(origin: &Origin, sandbox: &Sandbox) {
    let destination = origin.destination;
    // Only an executable whose path is known for its identity: the kernel
    // matches the identity, the policy matched the path.
    let identified = origin.exe.is_some() && known_exe(origin.exe_id) == origin.exe;
    if !sandbox.redirect.exe_known()
        || !identified
        || destination.port() == DNS_PORT
        || is_inference_address(destination.ip())
    {
        return;
    }
    let Some(allow) = sandbox.context.decider.fast_path(origin, destination) else { return };
    let name = allow.policy.as_bytes();
    if name.len() > POLICY_NAME_MAX {
        return;
    }
    let mut policy = [0; POLICY_NAME_MAX];
    policy[..name.len()].copy_from_slice(name);
    let expires_ns = match allow.expires {
        None => u64::MAX,
        Some(at) => {
            let left = at.saturating_duration_since(Instant::now());
            monotonic_ns().saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
        }
    };
    let key = FastKey {
        cgroup_id: origin.cgroup_id,
        exe: origin.exe_id,
        destination: key_of(destination),
        fast_generation: sandbox.fast_generation(allow.generation),
    };
    sandbox.redirect.allow_fast(key, FastDecision { expires_ns, sandbox_cgroup_id: sandbox.cgroup_id, policy });
}

fn key_of(address: SocketAddr) -> SockAddrKey {
    let ip = match address.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SockAddrKey::new(ip.octets(), address.port())
}

/// Logs every fast socket's close this daemon's programs report, until the
/// ring fails or the daemon exits (after an upgrade, the old daemon's ring
/// still holds the closes reported before the new programs replaced its own).
pub fn serve_closes(mut closes: Closes, table: Arc<SandboxTable>, observer: Arc<Observer>) {
    let drain = async move {
        let mut lost_reported = closes.lost();
        let mut warned_at: Option<Instant> = None;
        loop {
            let Ok(batch) = closes.read().await else { return };
            for close in &batch {
                match table.get(close.socket.sandbox_cgroup_id) {
                    Some(sandbox) => sandbox.span.in_scope(|| log_close(close, &sandbox)),
                    None => tracing::debug!(
                        cgroup_id = close.socket.sandbox_cgroup_id,
                        pid = close.socket.tgid,
                        "a kernel fast-path connection closed, of a sandbox no longer served: not logged"
                    ),
                }
            }
            let lost = closes.lost();
            if lost > lost_reported {
                observer.fast_closes_lost(lost - lost_reported);
                if warned_at.is_none_or(|at| at.elapsed() >= LOST_WARNING_INTERVAL) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        event = "fast_closes_lost",
                        lost,
                        "the kernel's ring of fast-path closes was full: {lost} connections ended without a close \
                         line since this daemon started"
                    );
                }
                lost_reported = lost;
            }
        }
    };
    tokio::spawn(drain.in_current_span());
}

/// The close line of a fast socket: a relayed connection's fields, from
/// the kernel's record and TCP counts.
fn log_close(close: &FastClose, sandbox: &Sandbox) {
    let socket = &close.socket;
    let ip = Ipv6Addr::from(socket.destination.addr);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    let destination = SocketAddr::new(ip, socket.destination.port);
    let (verdict, reason) = if close.established() {
        ("relayed", None)
    } else {
        ("upstream_failed", Some(format!("connecting to {destination} failed (kernel fast path)")))
    };
    let (bytes_up, bytes_down) = close.payload();
    let observed = &sandbox.context.observed;
    observed.connection_ended(&Ended { verdict, protocol: "tcp", bytes_up, bytes_down, denial: None });
    let policy = nul_terminated(&socket.policy);
    let comm = nul_terminated(&socket.comm);
    let exe = known_exe(socket.exe).map(|exe| exe.display().to_string());
    tracing::info!(
        event = "connection",
        path = "kernel",
        verdict,
        reason,
        protocol = "tcp",
        pid = socket.tgid,
        exe,
        comm,
        uid = socket.uid,
        cgroup_id = socket.cgroup_id,
        destination = %destination,
        upstream = %destination,
        policy,
        policy_generation = sandbox.policy_generation_of(socket.fast_generation),
        bytes_up,
        bytes_down,
        accepted_monotonic_ns = socket.started_ns,
        duration_ms = close.closed_ns.saturating_sub(socket.started_ns) as f64 / 1e6,
    );
}

/// Raw, like every sandbox-given string: the log formatters escape it.
fn nul_terminated(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}
