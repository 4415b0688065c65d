//! One redirected connection, from accept to its close log line.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::Instant,
};

use tokio::net::TcpStream;

use super::{origin::Origin, Config, Stats};
use crate::{redirect::Redirect, relay};

pub struct Shared {
    pub redirect: Redirect,
    pub config: Config,
    pub stats: Stats,
}

pub async fn handle(client: TcpStream, peer: SocketAddr, shared: &Shared) {
    let started = Instant::now();
    let Some(record) = shared.redirect.take_record(peer) else {
        let unattributed = shared.stats.unattributed.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(client = %peer, unattributed, "connection closed: no kernel record of its origin");
        return;
    };
    let origin = Origin::from_record(&record);

    let (verdict, reason, outcome) = match check_destination(origin.destination, &shared.config) {
        Err(reason) => ("denied", Some(reason), relay::Outcome::default()),
        Ok(()) => match connect_upstream(origin.destination, &shared.config).await {
            Err(reason) => ("upstream_failed", Some(reason), relay::Outcome::default()),
            Ok(upstream) => {
                let _ = client.set_nodelay(true);
                ("relayed", None, relay::relay(client, upstream).await)
            }
        },
    };

    tracing::info!(
        event = "connection",
        verdict,
        reason,
        pid = origin.pid,
        exe = origin.exe.as_ref().map(|exe| exe.display().to_string()),
        comm = origin.comm,
        uid = origin.uid,
        cgroup_id = origin.cgroup_id,
        client = %peer,
        destination = %origin.destination,
        bytes_up = outcome.bytes_up,
        bytes_down = outcome.bytes_down,
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
        error = outcome.error.map(|error| error.to_string()),
    );
}

/// Destinations that are never relayed whatever the policy says.
fn check_destination(destination: SocketAddr, config: &Config) -> Result<(), String> {
    let ip = destination.ip().to_canonical();
    if ip.is_unspecified() || destination.port() == 0 {
        return Err(format!("{destination} is not a valid destination"));
    }
    if ip.is_loopback() {
        if destination.port() == config.listen_port {
            return Err("the agent's own listener is not a destination".into());
        }
        if !config.allowed_loopback_ports.contains(&destination.port()) {
            return Err(format!("loopback port {} is not allowed (see --allow-loopback-port)", destination.port()));
        }
    }
    Ok(())
}

async fn connect_upstream(destination: SocketAddr, config: &Config) -> Result<TcpStream, String> {
    match tokio::time::timeout(config.connect_timeout, TcpStream::connect(destination)).await {
        Err(_) => Err(format!("connect to {destination} timed out after {:?}", config.connect_timeout)),
        Ok(Err(error)) => Err(format!("connect to {destination} failed: {error}")),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}
