//! The kernel fast path's maps as the agent sees them: the decisions it
//! caches, and the ring of fast sockets' closes with its count of losses.

use agent_common::{FastClose, FastDecision, FastKey, MAP_FAST_CLOSES, MAP_FAST_CLOSES_LOST};
use anyhow::Result;
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use tokio::io::unix::AsyncFd;

use super::take_map;

/// Closes read in one go; the rest wait for the next read.
const MAX_BATCH: usize = 256;

/// The ring of fast-path closes (pinned: a daemon taking over reads the
/// closes of sockets opened under the one before), and its lost count.
pub struct Closes {
    ring: AsyncFd<RingBuf<MapData>>,
    lost: PerCpuArray<MapData, u64>,
}

impl Closes {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let ring = RingBuf::try_from(take_map(ebpf, MAP_FAST_CLOSES)?)?;
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|error| error.into_parts().1)?;
        let lost = PerCpuArray::try_from(take_map(ebpf, MAP_FAST_CLOSES_LOST)?)?;
        Ok(Self { ring, lost })
    }

    /// The next closes, waiting for one if there is none.
    pub async fn read(&mut self) -> std::io::Result<Vec<FastClose>> {
        loop {
            let mut ready = self.ring.readable_mut().await?;
            let mut closes = Vec::new();
            while closes.len() < MAX_BATCH {
                let Some(item) = ready.get_inner_mut().next() else {
                    ready.clear_ready();
                    break;
                };
                if item.len() >= size_of::<FastClose>() {
                    // SAFETY: the kernel side writes whole FastCloses, a repr(C) plain-data type.
                    closes.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FastClose>()) });
                }
            }
            if !closes.is_empty() {
                return Ok(closes);
            }
        }
    }

    /// Closes the kernel could not report (its ring was full), since the
    /// maps were first pinned.
    pub fn lost(&self) -> u64 {
        self.lost.get(&0, 0).map_or(0, |per_cpu| per_cpu.iter().sum())
    }
}

/// Deletes the decisions `stale` picks.
pub(super) fn forget(
    decisions: &mut HashMap<MapData, FastKey, FastDecision>,
    stale: impl Fn(&FastKey, &FastDecision) -> bool,
) {
    let keys: Vec<FastKey> =
        decisions.iter().flatten().filter(|(key, decision)| stale(key, decision)).map(|(key, _)| key).collect();
    for key in &keys {
        let _ = decisions.remove(key);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes into the timespec passed; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// A device number as the kernel keeps it (major << 20 | minor), as
/// `stat` gives it to user space.
pub fn user_dev(kernel_dev: u32) -> u64 {
    libc::makedev(kernel_dev >> 20, kernel_dev & 0xf_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_device_numbers_read_as_stat_gives_them() {
        // 8:1 (sda1) and 259:65539 (a large nvme minor).
        assert_eq!(user_dev(8 << 20 | 1), libc::makedev(8, 1));
        assert_eq!(user_dev(259 << 20 | 65539), libc::makedev(259, 65539));
        use std::os::unix::fs::MetadataExt;
        // This process's own executable: its st_dev, as the kernel would encode it, comes back.
        let dev = std::fs::metadata("/proc/self/exe").unwrap().dev();
        let kernel = ((libc::major(dev) << 20) | libc::minor(dev)) as u32;
        assert_eq!(user_dev(kernel), dev);
    }
}
