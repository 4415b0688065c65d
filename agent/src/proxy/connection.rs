//! One redirected connection, from accept to its close log line:
//! attribute -> limits -> explicit or transparent route -> the raw relay the
//! route left, if any -> close line.

use std::{net::SocketAddr, sync::atomic::Ordering};

use agent_common::ConnectRecord;
use tokio::net::TcpStream;

use super::{explicit, route, sandbox::Sandbox};
use crate::{
    conn::{
        drain::{self, Resettable},
        refuse::reset,
        Accepted, CloseLog, Origin,
    },
    relay,
};

pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    accepted: Accepted,
    record: &ConnectRecord,
    sandbox: &Sandbox,
) {
    let origin = attribute(record, peer, sandbox);
    let observed = &sandbox.context.observed;
    let _active = observed.connection_started();
    if let Some(reason) = origin.identity_lost {
        reset(client);
        let log = CloseLog {
            verdict: "denied",
            reason: Some(reason.into()),
            denial: Some("identity_lost"),
            protocol: "unknown",
            ..CloseLog::default()
        };
        return log.emit(observed, &origin, peer, accepted);
    }
    let Some(_sandbox_slot) = sandbox.sandbox_slots.try_acquire(origin.cgroup_id) else {
        let max = sandbox.sandbox_slots.max_per_sandbox();
        refuse(
            client,
            &origin,
            peer,
            accepted,
            sandbox,
            format!("too many connections in flight from this sandbox (--max-connections-per-sandbox {max})"),
        );
        return;
    };
    let _ = client.set_nodelay(true);
    let mut log = CloseLog::opened_by(&origin);
    let client_socket = Resettable::of(&client);
    // Boxed, and freed before the raw relay a route may leave runs (the
    // routes' states are kilobytes): an idle relayed connection holds the
    // relay and this frame only.
    let mut walk = Box::pin(async {
        if is_own_listener(origin.destination, sandbox.listen_port) {
            explicit::serve(client, &origin, sandbox, &mut log).await;
        } else {
            route::transparent(client, &origin, sandbox, &mut log).await;
        }
    });
    // A cut client is set to reset while its socket is still open: each
    // future stays alive through its select.
    let mut cut = tokio::select! {
        () = &mut walk => false,
        () = drain::cut() => {
            client_socket.reset_on_close();
            true
        }
    };
    drop(walk);
    if let (false, Some(later)) = (cut, log.then_relay.take()) {
        let relay = relay::relay(later);
        tokio::pin!(relay);
        tokio::select! {
            outcome = &mut relay => log.relayed(outcome),
            () = drain::cut() => {
                client_socket.reset_on_close();
                cut = true;
            }
        }
    }
    if cut {
        log.cut();
    }
    log.emit(observed, &origin, peer, accepted);
}

/// Turns away a connection beyond `--max-connections`, logged like any other.
pub fn refuse_over_limit(
    client: TcpStream,
    peer: SocketAddr,
    accepted: Accepted,
    record: &ConnectRecord,
    sandbox: &Sandbox,
) {
    let origin = attribute(record, peer, sandbox);
    let max = sandbox.context.config.max_connections;
    let reason = format!("too many connections in flight (--max-connections {max})");
    refuse(client, &origin, peer, accepted, sandbox, reason);
}

/// Resets a connection over a limit and logs it (a warning too: the
/// sandbox sees only a reset).
fn refuse(client: TcpStream, origin: &Origin, peer: SocketAddr, accepted: Accepted, sandbox: &Sandbox, reason: String) {
    reset(client);
    sandbox.stats.over_limit.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(pid = origin.pid, cgroup_id = origin.cgroup_id, "connection refused: {reason}");
    let log = CloseLog {
        verdict: "denied",
        reason: Some(reason),
        denial: Some("over_limit"),
        protocol: "unknown",
        ..CloseLog::default()
    };
    log.emit(&sandbox.context.observed, origin, peer, accepted);
}

/// Who made the connection, from the kernel's record.
fn attribute(record: &ConnectRecord, peer: SocketAddr, sandbox: &Sandbox) -> Origin {
    let with_ancestors = sandbox.context.decider.policies.current().policy.matches_binaries();
    Origin::from_record(record, peer, with_ancestors, |pid| sandbox.redirect.process_times(pid))
}

fn is_own_listener(destination: SocketAddr, listen_port: u16) -> bool {
    destination.ip().to_canonical().is_loopback() && destination.port() == listen_port
}
