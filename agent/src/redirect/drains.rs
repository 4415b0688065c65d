//! What the kernel side reports: refusals and drops (a ring buffer of
//! [`KernelEvent`]s) and the programs' own traces (aya-log), drained into
//! the agent's log for as long as the programs are loaded.

use agent_common::{event_kind, KernelEvent};
use anyhow::Result;
use aya::Ebpf;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::Instrument;

/// Logs the kernel side's refusals and drops as they arrive.
pub(super) fn start_event_drain(map: aya::maps::Map, mut stopped: watch::Receiver<()>) -> Result<()> {
    let ring = aya::maps::RingBuf::try_from(map)?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|error| error.into_parts().1)?;
    let drain = async move {
        while let Ok(mut ready) = ring.readable_mut().await {
            while let Some(item) = ready.get_inner_mut().next() {
                if item.len() >= std::mem::size_of::<KernelEvent>() {
                    // SAFETY: the kernel side writes whole KernelEvents, a repr(C) plain-data type.
                    log_kernel_event(&unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<KernelEvent>()) });
                }
            }
            ready.clear_ready();
        }
    };
    tokio::spawn(
        async move {
            tokio::select! {
                () = drain => {}
                _ = stopped.changed() => {}
            }
        }
        .in_current_span(),
    );
    Ok(())
}

fn log_kernel_event(event: &KernelEvent) {
    let comm_len = event.comm.iter().position(|&b| b == 0).unwrap_or(event.comm.len());
    // Raw, like every sandbox-given string: the log formatters escape it.
    let comm = String::from_utf8_lossy(&event.comm[..comm_len]).into_owned();
    let (pid, cgroup_id, suppressed) = (event.pid, event.cgroup_id, event.suppressed);
    match event.kind {
        event_kind::OTHER_NETNS => tracing::warn!(
            event = "kernel_refusal",
            kind = "other_netns",
            pid,
            comm,
            cgroup_id,
            suppressed,
            "refused pid={pid} comm={comm}: it is in another network namespace than its sandbox's listener; register \
             the namespace with the sandbox (--netns) ({suppressed} similar suppressed)"
        ),
        event_kind::ABSTRACT_UNIX => tracing::warn!(
            event = "kernel_refusal",
            kind = "abstract_unix",
            pid,
            comm,
            cgroup_id,
            suppressed,
            "refused pid={pid} comm={comm}: abstract unix sockets are out of a sandbox's reach unless listed with \
             --allow-abstract-unix ({suppressed} similar suppressed)"
        ),
        kind @ (event_kind::PACKET_EGRESS | event_kind::PACKET_INGRESS) => {
            let direction = if kind == event_kind::PACKET_EGRESS { "leaving" } else { "arriving" };
            tracing::warn!(
                event = "kernel_refusal",
                kind = if kind == event_kind::PACKET_EGRESS { "packet_egress" } else { "packet_ingress" },
                cgroup_id,
                ifindex = event.ifindex,
                suppressed,
                "dropped a packet of sandbox cgroup {cgroup_id} {direction} over device ifindex {}: sandboxes talk \
                 only to the agent, over loopback ({suppressed} similar suppressed)",
                event.ifindex
            )
        }
        event_kind::CLOSED => tracing::warn!(
            event = "kernel_refusal",
            kind = "closed",
            pid,
            comm,
            cgroup_id,
            suppressed,
            "refused pid={pid} comm={comm}: its sandbox was removed and its cgroup stays closed until it is served \
             again or detached ({suppressed} similar suppressed)"
        ),
        event_kind::UNKNOWN_SANDBOX => tracing::warn!(
            event = "kernel_refusal",
            kind = "unknown_sandbox",
            pid,
            comm,
            cgroup_id,
            suppressed,
            "refused pid={pid} comm={comm}: its cgroup has the agent's programs but no sandbox entry (fail \
             closed); add the sandbox again or detach the cgroup ({suppressed} similar suppressed)"
        ),
        kind => tracing::warn!(kind, cgroup_id, "unknown kernel event"),
    }
}

/// Forwards aya-log records to `tracing` (via the log bridge) as they arrive.
pub(super) fn start_ebpf_log_drain(ebpf: &mut Ebpf, mut stopped: watch::Receiver<()>) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "eBPF traces unavailable");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(error) => {
            let (_, error) = error.into_parts();
            tracing::warn!(%error, "eBPF traces unavailable");
            return;
        }
    };
    let drain = async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    };
    tokio::spawn(
        async move {
            tokio::select! {
                () = drain => {}
                _ = stopped.changed() => {}
            }
        }
        .in_current_span(),
    );
}
