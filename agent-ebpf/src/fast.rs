//! The L4 fast path: a TCP connect that the agent already allowed, for the
//! same cgroup, executable and destination under the same policy
//! generation (FAST_DECISIONS, filled by the agent only from its own
//! decisions), is let out as it is instead of redirected, while the agent's
//! listener is up. Each such socket is kept in FAST_SOCKETS by cookie: the
//! packet backstop lets exactly those out, and sock_ops reports each one's
//! close (with the kernel's byte counts) on the FAST_CLOSES ring.
//!
//! The executable is read from the calling task (task->mm->exe_file's inode,
//! device and inode generation) at offsets the agent takes from the
//! kernel's BTF at load.

use core::ptr::read_volatile;

use agent_common::{
    tcp_state, ExeId, FastClose, FastDecision, FastKey, FastSocket, SockAddrKey, FAST_CLOSES_BYTES,
    FAST_DECISIONS_MAX_ENTRIES, FAST_SOCKETS_MAX_ENTRIES,
};
use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_ANY},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_task, bpf_sk_lookup_tcp, bpf_sk_release},
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
    EbpfContext,
};

use crate::{socket_cookie, Caller};

#[map]
static FAST_DECISIONS: LruHashMap<FastKey, FastDecision> = LruHashMap::with_max_entries(FAST_DECISIONS_MAX_ENTRIES, 0);

#[map]
pub(crate) static FAST_SOCKETS: LruHashMap<u64, FastSocket> = LruHashMap::with_max_entries(FAST_SOCKETS_MAX_ENTRIES, 0);

#[map]
static FAST_CLOSES: RingBuf = RingBuf::with_byte_size(FAST_CLOSES_BYTES, 0);

/// Closes not reported because the ring was full (one counter per CPU).
#[map]
static FAST_CLOSES_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// Field offsets in the running kernel, set by the agent from its BTF;
// EXE_OFFSETS_KNOWN stays 0 without them (no executable is read then).
#[unsafe(no_mangle)]
static EXE_OFFSETS_KNOWN: u32 = 0;
#[unsafe(no_mangle)]
static TASK_MM_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static MM_EXE_FILE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FILE_INODE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static INODE_INO_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static INODE_SB_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SB_DEV_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static INODE_GENERATION_OFFSET: u32 = 0;

const CURRENT_NETNS: u64 = u64::MAX;
const LOOPBACK_V4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6_BE: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// The calling process's executable; zero if it cannot be read.
pub fn current_exe() -> ExeId {
    // SAFETY: every kernel read goes through bpf_probe_read_kernel.
    unsafe { read_exe() }.unwrap_or_default()
}

/// # Safety
/// Reads kernel memory only through bpf_probe_read_kernel.
unsafe fn read_exe() -> Option<ExeId> {
    unsafe {
        if read_volatile(&EXE_OFFSETS_KNOWN) == 0 {
            return None;
        }
        let task = bpf_get_current_task() as usize;
        let mm = read_pointer(task, read_volatile(&TASK_MM_OFFSET))?;
        let file = read_pointer(mm, read_volatile(&MM_EXE_FILE_OFFSET))?;
        let inode = read_pointer(file, read_volatile(&FILE_INODE_OFFSET))?;
        let sb = read_pointer(inode, read_volatile(&INODE_SB_OFFSET))?;
        let ino = bpf_probe_read_kernel((inode + read_volatile(&INODE_INO_OFFSET) as usize) as *const u64).ok()?;
        let dev = bpf_probe_read_kernel((sb + read_volatile(&SB_DEV_OFFSET) as usize) as *const u32).ok()?;
        let generation =
            bpf_probe_read_kernel((inode + read_volatile(&INODE_GENERATION_OFFSET) as usize) as *const u32).ok()?;
        Some(ExeId { ino, dev, generation })
    }
}

/// # Safety
/// As [`read_exe`].
unsafe fn read_pointer(base: usize, offset: u32) -> Option<usize> {
    let pointer = unsafe { bpf_probe_read_kernel((base + offset as usize) as *const usize) }.ok()?;
    (pointer != 0).then_some(pointer)
}

/// Lets the connect out as it is if the agent allowed the same one before
/// and is still listening; returns whether it did.
pub fn fast_connect(ctx: &SockAddrContext, caller: &Caller, destination: SockAddrKey, exe: ExeId, v4: bool) -> bool {
    if exe.ino == 0 {
        return false;
    }
    // SAFETY: helper without pointer arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let key = FastKey { cgroup_id, exe, destination, fast_generation: caller.fast_generation };
    let Some(decision) = FAST_DECISIONS.get_ptr(&key) else { return false };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer is the map value's; fields are copied out.
    let (expires_ns, policy) = unsafe { ((*decision).expires_ns, (*decision).policy) };
    if expires_ns <= now || !agent_listening(ctx, caller.listen_port, v4) {
        return false;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let socket = FastSocket {
        started_ns: now,
        sandbox_cgroup_id: caller.sandbox_cgroup_id,
        cgroup_id,
        exe,
        destination,
        tgid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        states: 0,
        fast_generation: caller.fast_generation,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        policy,
        _pad: 0,
    };
    FAST_SOCKETS.insert(&socket_cookie(ctx), &socket, u64::from(BPF_ANY)).is_ok()
}

/// Whether the agent's listener for this sandbox is up in the caller's
/// network namespace: once the agent is gone, every connect is redirected
/// to where nothing listens (fail closed).
fn agent_listening(ctx: &SockAddrContext, listen_port: u16, v4: bool) -> bool {
    // SAFETY: a plain-data union, all zero.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v4 {
        tuple.__bindgen_anon_1.ipv4.saddr = LOOPBACK_V4_BE;
        tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK_V4_BE;
        tuple.__bindgen_anon_1.ipv4.dport = listen_port.to_be();
        12
    } else {
        tuple.__bindgen_anon_1.ipv6.saddr = LOOPBACK_V6_BE;
        tuple.__bindgen_anon_1.ipv6.daddr = LOOPBACK_V6_BE;
        tuple.__bindgen_anon_1.ipv6.dport = listen_port.to_be();
        36
    };
    // SAFETY: the tuple lives on the stack for the call; a socket found is released at once.
    unsafe {
        let sk = bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, CURRENT_NETNS, 0);
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// A socket redirected after all (a reconnect of a fast one) is no longer fast.
pub fn forget_socket(cookie: u64) {
    let _ = FAST_SOCKETS.remove(&cookie);
}

/// Whether the socket of `cookie` went out by the fast path.
pub fn is_fast(cookie: u64) -> bool {
    FAST_SOCKETS.get_ptr(&cookie).is_some()
}

/// sock_ops state callback of a fast socket: notes the states it goes
/// through; at close, reports it and forgets it.
pub fn state_changed(cookie: u64, old_state: u32, new_state: u32, bytes_acked: u64, bytes_received: u64) {
    let Some(socket) = FAST_SOCKETS.get_ptr_mut(&cookie) else { return };
    if new_state < 32 {
        // SAFETY: the pointer is the map value's.
        unsafe { (*socket).states |= 1 << new_state };
    }
    if new_state != tcp_state::CLOSE {
        return;
    }
    match FAST_CLOSES.reserve::<FastClose>(0) {
        Some(mut entry) => {
            // SAFETY: the pointer is the map value's; helper without arguments.
            let close = unsafe {
                FastClose {
                    socket: *socket,
                    bytes_acked,
                    bytes_received,
                    closed_ns: bpf_ktime_get_ns(),
                    closed_from: old_state,
                    _pad: 0,
                }
            };
            entry.write(close);
            entry.submit(0);
        }
        None => {
            if let Some(lost) = FAST_CLOSES_LOST.get_ptr_mut(0) {
                // SAFETY: this CPU's counter.
                unsafe { *lost += 1 };
            }
        }
    }
    let _ = FAST_SOCKETS.remove(&cookie);
}
