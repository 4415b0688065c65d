//! Refusals and drops reported to the agent as structured events (it
//! escapes the sandbox's own strings, like comm, before they reach a log),
//! at most once a second per sandbox and kind, with the count of the ones
//! suppressed in between: a sandbox cannot flood the log.

use agent_common::KernelEvent;
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{LruHashMap, RingBuf},
};

const REPORT_INTERVAL_NS: u64 = 1_000_000_000;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct RateKey {
    cgroup_id: u64,
    kind: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RateState {
    last_ns: u64,
    suppressed: u64,
}

#[map]
static RATES: LruHashMap<RateKey, RateState> = LruHashMap::with_max_entries(4096, 0);

/// Whether an event of `kind` for `cgroup_id` may be reported now; if so,
/// how many were suppressed since the last one reported.
fn may_report(cgroup_id: u64, kind: u32) -> Option<u64> {
    let key = RateKey { cgroup_id, kind, _pad: 0 };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match RATES.get_ptr_mut(&key) {
        // SAFETY: the pointer is the map value's; races only blur the counts.
        Some(state) => unsafe {
            if now.wrapping_sub((*state).last_ns) < REPORT_INTERVAL_NS {
                (*state).suppressed += 1;
                return None;
            }
            let suppressed = (*state).suppressed;
            (*state).last_ns = now;
            (*state).suppressed = 0;
            Some(suppressed)
        },
        None => {
            let _ = RATES.insert(&key, &RateState { last_ns: now, suppressed: 0 }, 0);
            Some(0)
        }
    }
}

/// Reports a refusal by the calling process.
pub fn report_refusal(cgroup_id: u64, kind: u32) {
    let Some(suppressed) = may_report(cgroup_id, kind) else { return };
    let event = KernelEvent {
        kind,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        cgroup_id,
        ifindex: 0,
        _pad: 0,
        suppressed,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    let _ = EVENTS.output::<KernelEvent>(&event, 0);
}

/// Reports a dropped packet (no process context to name).
pub fn report_drop(cgroup_id: u64, kind: u32, ifindex: u32) {
    let Some(suppressed) = may_report(cgroup_id, kind) else { return };
    let event = KernelEvent { kind, pid: 0, cgroup_id, ifindex, _pad: 0, suppressed, comm: [0; 16] };
    let _ = EVENTS.output::<KernelEvent>(&event, 0);
}
