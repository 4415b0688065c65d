//! The sandbox cgroups, served or closed: one map for every sandbox, since
//! the programs are loaded once and attached to each sandbox's cgroup.
//! A process belongs to the sandbox of its deepest ancestor cgroup (or its
//! own) found in the map.

use agent_common::{SandboxEntry, MAX_CGROUP_LEVEL, SANDBOXES_MAX_ENTRIES};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC, helpers::generated::bpf_get_current_ancestor_cgroup_id, macros::map, maps::HashMap,
};

/// A hash map, not an LRU: an entry is never evicted, and one too many is
/// refused. Entries are allocated as they come, so its size costs nothing
/// until used.
#[map]
pub static SANDBOXES: HashMap<u64, SandboxEntry> = HashMap::with_max_entries(SANDBOXES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// The calling process's sandbox: its cgroup id and entry.
pub fn current_sandbox() -> Option<(u64, SandboxEntry)> {
    let mut level = MAX_CGROUP_LEVEL;
    while level > 0 {
        // SAFETY: helper without pointer arguments; 0 above the process's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id != 0 {
            // SAFETY: the value is copied out at once.
            if let Some(entry) = unsafe { SANDBOXES.get(&id) } {
                return Some((id, *entry));
            }
        }
        level -= 1;
    }
    None
}
