//! One sandbox served: its policy watch, its DNS sockets and its accept
//! loops, every log line inside naming it.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Result;
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};
use tracing::Instrument;

use super::{
    connection,
    limits::SandboxSlots,
    listeners::Listeners,
    sandbox::{Common, Sandbox, SandboxParts},
};
use crate::{
    conn::{Accepted, Context, Decider},
    dns::{CountAnswer, SandboxOf},
};

/// Serves one sandbox on `listeners` until `stop` turns true: its policy
/// watch, its DNS and its connections, every log line inside naming it.
/// Connections in flight when it stops run to their end.
pub fn serve_sandbox(
    common: &Common,
    parts: SandboxParts,
    listeners: Listeners,
    stop: watch::Receiver<bool>,
) -> Result<Arc<Sandbox>> {
    let SandboxParts { name, redirect, policies, inference, own_netns, max_connections } = parts;
    let span = tracing::info_span!("sandbox", sandbox = %name);
    let _entered = span.enter();
    policies.spawn_watch(stop.clone())?;
    let observed = common.observer.sandbox(&name);
    let listen_port = listeners.port();
    let decider = Decider {
        policies: policies.clone(),
        records: common.records.clone(),
        resolver: common.resolver.clone(),
        observed: observed.clone(),
    };
    let sandbox = Arc::new(Sandbox {
        name,
        listen_port,
        own_netns,
        sandbox_slots: SandboxSlots::new(max_connections),
        redirect,
        stats: common.stats.clone(),
        context: Context {
            config: common.config.clone(),
            decider,
            credentials: common.credentials.clone(),
            observed: observed.clone(),
            stopping: stop.clone(),
        },
        dns: common.dns.clone(),
        inference,
        observer: common.observer.clone(),
    });
    for socket in listeners.dns {
        let attributing = sandbox.clone();
        let sandbox_of: SandboxOf = Arc::new(move |client| attributing.redirect.dns_client_sandbox(client));
        let answers = observed.clone();
        let count: CountAnswer = Arc::new(move |answer| answers.dns_answer(answer));
        let serving = common.dns.clone().serve_udp(socket, sandbox_of, policies.clone(), count);
        let mut stop = stop.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = serving => {}
                    _ = stop.changed() => {}
                }
            }
            .in_current_span(),
        );
    }
    let listeners = std::iter::once(listeners.v4).chain(listeners.v6);
    for listener in listeners {
        tokio::spawn(accept_loop(listener, sandbox.clone(), common.slots.clone(), stop.clone()).in_current_span());
    }
    Ok(sandbox)
}

async fn accept_loop(
    listener: TcpListener,
    sandbox: Arc<Sandbox>,
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
        let accepted = Accepted::now();
        sandbox.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            connection::refuse_over_limit(stream, peer, accepted, &sandbox);
            continue;
        };
        let sandbox = sandbox.clone();
        tokio::spawn(
            async move {
                connection::handle(stream, peer, accepted, &sandbox).await;
                drop(slot);
            }
            .in_current_span(),
        );
    }
}
