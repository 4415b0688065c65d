//! Connections in flight per sandbox. The agent serves its cgroup and every
//! cgroup below it; each cgroup is a sandbox, and one must not take all of
//! the agent's `--max-connections` from the others.

use std::{collections::HashMap, sync::Mutex};

pub struct SandboxSlots {
    max_per_sandbox: usize,
    /// cgroup id -> connections in flight; an entry leaves at zero, so the
    /// map is never larger than the connections in flight.
    in_flight: Mutex<HashMap<u64, usize>>,
}

/// One connection's place in its sandbox's count, given back on drop.
pub struct SandboxSlot<'a> {
    slots: &'a SandboxSlots,
    cgroup_id: u64,
}

impl SandboxSlots {
    pub fn new(max_per_sandbox: usize) -> Self {
        Self { max_per_sandbox, in_flight: Mutex::new(HashMap::new()) }
    }

    pub fn max_per_sandbox(&self) -> usize {
        self.max_per_sandbox
    }

    /// A slot for one more connection of `cgroup_id`, unless it has the maximum in flight.
    pub fn try_acquire(&self, cgroup_id: u64) -> Option<SandboxSlot<'_>> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = in_flight.entry(cgroup_id).or_insert(0);
        if *count >= self.max_per_sandbox {
            return None;
        }
        *count += 1;
        Some(SandboxSlot { slots: self, cgroup_id })
    }
}

impl Drop for SandboxSlot<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.slots.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = in_flight.get_mut(&self.cgroup_id) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.cgroup_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sandbox_has_its_own_maximum_and_slots_come_back() {
        let slots = SandboxSlots::new(2);
        let a1 = slots.try_acquire(1).unwrap();
        let _a2 = slots.try_acquire(1).unwrap();
        assert!(slots.try_acquire(1).is_none(), "third connection of sandbox 1");
        let _b1 = slots.try_acquire(2).expect("another sandbox is not affected");
        drop(a1);
        assert!(slots.try_acquire(1).is_some(), "a closed connection gives its slot back");
    }

    #[test]
    fn sandboxes_without_connections_leave_the_map() {
        let slots = SandboxSlots::new(1);
        drop(slots.try_acquire(7).unwrap());
        drop(slots.try_acquire(8).unwrap());
        assert!(slots.in_flight.lock().unwrap().is_empty());
    }
}
