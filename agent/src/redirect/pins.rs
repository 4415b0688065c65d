//! The pins under /sys/fs/bpf/sandbox-egress/: the shared maps and the
//! host's tracepoint links in `host/`, each sandbox cgroup's links in a
//! directory named by its cgroup id; and what is left of removed cgroups.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use agent_common::{SandboxEntry, MAP_SANDBOXES};
use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::links::PinnedLink,
};

use super::Link;
use crate::preflight::{Cgroup, BPFFS};

/// Map pins of the agents that loaded programs per sandbox, left in a
/// cgroup's directory once its links are replaced.
const OLD_MAP_PINS: [&str; 5] =
    ["CONNECTS_BY_COOKIE", "CONNECTS_BY_CLIENT", "DNS_SERVER_BY_COOKIE", "DNS_CLIENTS", "PROCESS_TIMES"];

fn root() -> PathBuf {
    Path::new(BPFFS).join("sandbox-egress")
}

pub(super) fn host_dir() -> PathBuf {
    root().join("host")
}

pub(super) fn cgroup_dir(cgroup: &Cgroup) -> PathBuf {
    root().join(cgroup.id.to_string())
}

/// Holds an exclusive lock on the host directory until dropped (closed).
pub(super) fn lock_host_dir() -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(host_dir()).with_context(|| format!("open {}", host_dir().display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).context("lock the pins' host directory");
    }
    Ok(dir)
}

/// The links pinned in `dir` under `names`, kept open until the new ones replace them.
pub(super) fn pinned_links<'a>(dir: &Path, names: impl Iterator<Item = &'a str>) -> Vec<PinnedLink> {
    names.filter_map(|pin| PinnedLink::from_pin(dir.join(pin)).ok()).collect()
}

/// Pins beside the old link, then renames over it: the pin path is never
/// empty. (bpffs reserves dots in names.)
pub(super) fn pin_over(link: Link, dir: &Path, pin: &str) -> Result<()> {
    let staged = dir.join(format!("{pin}-staged-{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    link.pin(&staged).with_context(|| format!("pin {}", staged.display()))?;
    std::fs::rename(&staged, dir.join(pin))?;
    Ok(())
}

pub(super) fn remove_old_map_pins(dir: &Path) {
    for map in OLD_MAP_PINS {
        let _ = std::fs::remove_file(dir.join(map));
    }
}

/// Forgets the sandbox entries and pins of cgroups that no longer exist:
/// a sandbox cgroup removed without `detach` keeps them, and they would in
/// time fill the sandbox map.
pub(super) fn forget_removed_cgroups(sandboxes: &mut HashMap<MapData, u64, SandboxEntry>) {
    let Some(cgroup_fs) = cgroup2_mount().and_then(|mount| std::fs::File::open(mount).ok()) else { return };
    let gone: Vec<u64> = sandboxes.keys().flatten().filter(|id| !cgroup_exists(&cgroup_fs, *id)).collect();
    for id in &gone {
        let _ = sandboxes.remove(id);
    }
    let Ok(dirs) = std::fs::read_dir(root()) else { return };
    for entry in dirs.flatten() {
        let Some(id) = entry.file_name().to_str().and_then(|name| name.parse::<u64>().ok()) else { continue };
        if cgroup_exists(&cgroup_fs, id) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => tracing::info!(cgroup_id = id, "removed the pins of a cgroup that no longer exists"),
            Err(error) => tracing::warn!(cgroup_id = id, %error, "cannot remove the pins of a removed cgroup"),
        }
    }
}

/// Where the cgroup v2 filesystem is mounted, from /proc/self/mounts.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, mount, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// Whether the cgroup with inode `id` exists on the cgroup v2 filesystem
/// `cgroup_fs` is on: cgroup ids are kernfs file handles. Only a stale
/// handle means gone; any other error counts as present.
fn cgroup_exists(cgroup_fs: &std::fs::File, id: u64) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd};
    /// `struct file_handle` holding a kernfs id (FILEID_KERNFS).
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }
    const FILEID_KERNFS: i32 = 0xfe;
    let mut handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id };
    // SAFETY: the handle is a valid file_handle of 8 bytes; the fd returned is owned below.
    let fd = unsafe {
        libc::open_by_handle_at(cgroup_fs.as_raw_fd(), (&raw mut handle).cast(), libc::O_RDONLY | libc::O_CLOEXEC)
    };
    if fd >= 0 {
        // SAFETY: fd was just opened and is owned by nothing else.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ESTALE)
}

/// Connections opened before the first attach, and sockets created before
/// their process joined the cgroup, are never seen by the programs: the
/// kernel checks a socket's cgroup at connect time, and a socket keeps the
/// cgroup it was created in. Sandboxes must start inside the cgroup after
/// the agent is ready; say so when processes were there first.
pub(super) fn warn_about_earlier_members(cgroup: &Cgroup) {
    let processes = count_processes(&cgroup.path);
    if processes > 0 {
        tracing::warn!(
            processes,
            cgroup = %cgroup.path.display(),
            "processes were in the cgroup before the agent attached: connections they already opened, \
             and sockets created before they joined the cgroup, are not intercepted; start sandboxes inside the cgroup once the agent is ready"
        );
    }
}

/// Processes in `dir` and its descendant cgroups.
pub fn count_processes(dir: &Path) -> usize {
    let members = std::fs::read_to_string(dir.join("cgroup.procs")).map_or(0, |procs| procs.lines().count());
    let children = std::fs::read_dir(dir).into_iter().flatten().flatten();
    members + children.filter(|entry| entry.path().is_dir()).map(|entry| count_processes(&entry.path())).sum::<usize>()
}

/// Removes the redirect of `cgroup` (`sandbox-egress detach`, or a daemon's
/// `sandbox remove --detach`): its entry in the pinned sandbox map, then its
/// pinned links. Returns whether anything was attached.
pub fn detach(cgroup: &Cgroup) -> Result<bool> {
    if let Ok(map) = MapData::from_pin(host_dir().join(MAP_SANDBOXES)) {
        if let Ok(mut sandboxes) = HashMap::<MapData, u64, SandboxEntry>::try_from(aya::maps::Map::HashMap(map)) {
            let _ = sandboxes.remove(&cgroup.id);
        }
    }
    let dir = cgroup_dir(cgroup);
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(true)
}
