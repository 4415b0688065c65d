//! Process times for attribution that cannot be raced: when each sandboxed
//! process was forked and when it last tried to exec. connect4/6 copy them
//! into the connect record; the agent refuses a connection whose process
//! tried to exec (or whose pid went to another process) after connecting,
//! and counts an ancestor's executable only if the ancestor had exec'd it
//! before the descendant was forked.
//!
//! Exec attempts are stamped at syscall entry, before the kernel swaps the
//! executable, so once the agent has read /proc/<pid>/exe, unchanged times
//! prove that executable is the one that connected.

use agent_common::{ProcessTimes, PROCESS_TIMES_MAX_ENTRIES};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};

use crate::sandboxes::current_sandbox;

#[map]
pub static PROCESS_TIMES: LruHashMap<u32, ProcessTimes> = LruHashMap::with_max_entries(PROCESS_TIMES_MAX_ENTRIES, 0);

const CLONE_THREAD: u64 = 0x10000;
/// task_newtask: `pid_t pid` at 8, `u64 clone_flags` at 32.
const NEWTASK_PID_OFFSET: usize = 8;
const NEWTASK_CLONE_FLAGS_OFFSET: usize = 32;

/// The tracepoints are attached once for the whole host: they keep only
/// the processes of sandbox cgroups.
fn current_in_sandbox() -> bool {
    current_sandbox().is_some()
}

fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The times of the calling process, created as "before tracking" if it
/// has none yet (it was there before the agent, or its entry was evicted).
pub fn current_times() -> ProcessTimes {
    let tgid = current_tgid();
    // SAFETY: the value is copied out at once.
    if let Some(times) = unsafe { PROCESS_TIMES.get(&tgid) } {
        return *times;
    }
    let unknown = ProcessTimes::default();
    let _ = PROCESS_TIMES.insert(&tgid, &unknown, u64::from(BPF_NOEXIST));
    // SAFETY: as above; a racing exec may have written first.
    unsafe { PROCESS_TIMES.get(&tgid) }.copied().unwrap_or(unknown)
}

/// task/task_newtask, in the parent: a new process (not a thread).
#[tracepoint]
pub fn track_fork(ctx: TracePointContext) -> u32 {
    if !current_in_sandbox() {
        return 0;
    }
    // SAFETY: offsets from the tracepoint's format.
    let (Ok(pid), Ok(clone_flags)) =
        (unsafe { ctx.read_at::<i32>(NEWTASK_PID_OFFSET) }, unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS_OFFSET) })
    else {
        return 0;
    };
    if clone_flags & CLONE_THREAD != 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let forked_ns = unsafe { bpf_ktime_get_ns() };
    let _ = PROCESS_TIMES.insert(&(pid as u32), &ProcessTimes { forked_ns, exec_ns: 0 }, 0);
    0
}

/// syscalls/sys_enter_execve and sys_enter_execveat: an exec attempt,
/// stamped before the executable changes (a failed one counts too).
#[tracepoint]
pub fn track_exec(_ctx: TracePointContext) -> u32 {
    if !current_in_sandbox() {
        return 0;
    }
    let tgid = current_tgid();
    // SAFETY: the value is copied out at once.
    let forked_ns = unsafe { PROCESS_TIMES.get(&tgid) }.map_or(0, |times| times.forked_ns);
    // SAFETY: helper without arguments.
    let exec_ns = unsafe { bpf_ktime_get_ns() };
    let _ = PROCESS_TIMES.insert(&tgid, &ProcessTimes { forked_ns, exec_ns }, 0);
    0
}
