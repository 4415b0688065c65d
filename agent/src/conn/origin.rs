//! Who connected where: the kernel's connect record, made readable, with
//! the process's identity checked against the times the kernel recorded.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{LazyLock, Mutex, PoisonError},
};

use agent_common::{ConnectRecord, ExeId, ProcessTimes};
use lru::LruCache;

use crate::redirect::fast::user_dev;

/// Ancestors looked at for `binaries` rules; deeper chains are cut here.
const MAX_ANCESTORS: usize = 16;
/// Executables whose path is kept by their kernel identity.
const EXE_PATHS: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

pub struct Origin {
    /// The destination the sandboxed process asked for.
    pub destination: SocketAddr,
    /// The sandboxed socket's address, as the agent's listener sees it.
    pub client: SocketAddr,
    pub pid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    /// The executable that connected, by the kernel's identity of it
    /// (device and inode, read at connect) and the path known for it; else
    /// `/proc/<pid>/exe` at accept time. `None` if the process already exited.
    pub exe: Option<PathBuf>,
    /// The kernel's identity of the executable (zero if unknown).
    pub exe_id: ExeId,
    /// Executables of the parent, grandparent... (nearest first), up to but
    /// excluding pid 1, when the policy matches binaries or `exe` is not
    /// known (empty otherwise).
    /// An ancestor counts only with the executable it had when it forked
    /// the next one down. The pid comes from the kernel's record, never from
    /// anything the sandbox sends.
    pub ancestors: Vec<PathBuf>,
    /// Set when `exe` may not be what connected: the process tried to exec,
    /// or its pid went to another process, after the connect. Such a
    /// connection is refused.
    pub identity_lost: Option<&'static str>,
}

impl Origin {
    /// Read at accept time for the connection from `client`; `times_of`
    /// gives the kernel's process times.
    pub fn from_record(
        record: &ConnectRecord,
        client: SocketAddr,
        with_ancestors: bool,
        times_of: impl Fn(u32) -> Option<ProcessTimes>,
    ) -> Self {
        let ip = Ipv6Addr::from(record.original_dst.addr);
        // IPv4 destinations are stored v4-mapped; show and connect them as IPv4.
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        let comm_len = record.comm.iter().position(|&b| b == 0).unwrap_or(record.comm.len());
        // The executable first, the times after: an exec is stamped before
        // it swaps the executable, so unchanged times vouch for what was read.
        let exe = exe_of_record(record);
        // Without its own executable, a process can match `binaries` only by an ancestor's.
        let ancestors = if with_ancestors || exe.is_none() { ancestors_of(record.tgid, &times_of) } else { Vec::new() };
        let identity_lost = identity_lost(record.times, times_of(record.tgid));
        Self {
            destination: SocketAddr::new(ip, record.original_dst.port),
            client,
            pid: record.tgid,
            uid: record.uid,
            cgroup_id: record.cgroup_id,
            comm: String::from_utf8_lossy(&record.comm[..comm_len]).into_owned(),
            exe,
            exe_id: record.exe,
            ancestors,
            identity_lost,
        }
    }
}

/// Why the process's times now (`None`: untracked) no longer vouch for
/// what connected, as recorded at connect time.
fn identity_lost(at_connect: ProcessTimes, now: Option<ProcessTimes>) -> Option<&'static str> {
    match now {
        Some(now) if now == at_connect => None,
        Some(now) if now.forked_ns != at_connect.forked_ns => {
            Some("the process's pid went to another process after it connected")
        }
        Some(_) => Some("the process tried to exec another program after it connected"),
        None => Some("the process is no longer tracked, so what connected cannot be told"),
    }
}

/// Whether a parent's current executable is the one it had when it forked
/// `child`: `None` when it cannot be the child's parent at all (forked
/// after it: the real parent died and its pid was reused).
fn ancestor_counts(parent: ProcessTimes, child: ProcessTimes) -> Option<bool> {
    if parent.forked_ns > child.forked_ns {
        return None;
    }
    Some(parent.exec_ns <= child.forked_ns)
}

/// Paths of executables by their kernel identity, filled only with a path
/// that names that very file.
static KNOWN_EXES: LazyLock<Mutex<LruCache<ExeId, PathBuf>>> = LazyLock::new(|| Mutex::new(LruCache::new(EXE_PATHS)));

/// The path of the executable the kernel saw connect, if one was known
/// and still names that very file (an inode number freed and used again
/// is another file: the path then names something else, or nothing).
pub fn known_exe(exe: ExeId) -> Option<PathBuf> {
    if exe.ino == 0 {
        return None;
    }
    let known = KNOWN_EXES.lock().unwrap_or_else(PoisonError::into_inner).get(&exe).cloned()?;
    if is_file(&known, exe) {
        return Some(known);
    }
    KNOWN_EXES.lock().unwrap_or_else(PoisonError::into_inner).pop(&exe);
    None
}

/// The executable that connected: its path known by the kernel's identity
/// of it, or read from `/proc/<pid>/exe` (and kept if the path names that
/// very file and its only name: not a replaced, deleted or hard-linked
/// one, nor one of another process that took the pid or exec'd since,
/// which the times check refuses).
fn exe_of_record(record: &ConnectRecord) -> Option<PathBuf> {
    if let Some(known) = known_exe(record.exe) {
        return Some(known);
    }
    let exe = exe_of(record.tgid)?;
    if record.exe.ino != 0 && is_file(&exe, record.exe) {
        KNOWN_EXES.lock().unwrap_or_else(PoisonError::into_inner).put(record.exe, exe.clone());
    }
    Some(exe)
}

/// Whether `path` is the file the kernel identifies as `exe`, and its only
/// name (a file with hard links elsewhere has as many paths).
fn is_file(path: &Path, exe: ExeId) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|file| file.dev() == user_dev(exe.dev) && file.ino() == exe.ino && file.nlink() == 1)
}

fn exe_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Untracked processes (outside the sandbox, or there before the agent)
/// have times of 0: "before anything tracked".
fn ancestors_of(pid: u32, times_of: &impl Fn(u32) -> Option<ProcessTimes>) -> Vec<PathBuf> {
    let mut ancestors = Vec::new();
    let mut child = (pid, times_of(pid).unwrap_or_default());
    for _ in 0..MAX_ANCESTORS {
        let Some(parent) = parent_of(child.0).filter(|&parent| parent > 1) else { break };
        let exe = exe_of(parent);
        let parent_times = times_of(parent).unwrap_or_default();
        let Some(counts) = ancestor_counts(parent_times, child.1) else { break };
        if let Some(exe) = exe.filter(|_| counts) {
            ancestors.push(exe);
        }
        child = (parent, parent_times);
    }
    ancestors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(forked_ns: u64, exec_ns: u64) -> ProcessTimes {
        ProcessTimes { forked_ns, exec_ns }
    }

    #[test]
    fn a_connection_keeps_its_identity_only_while_the_times_are_unchanged() {
        assert_eq!(identity_lost(times(10, 20), Some(times(10, 20))), None);
        assert_eq!(identity_lost(times(0, 0), Some(times(0, 0))), None, "there before tracking, never exec'd since");
        assert!(identity_lost(times(10, 20), Some(times(10, 30))).unwrap().contains("exec"));
        assert!(identity_lost(times(0, 0), Some(times(0, 30))).unwrap().contains("exec"));
        assert!(identity_lost(times(10, 20), Some(times(40, 0))).unwrap().contains("pid went to another process"));
        assert!(identity_lost(times(10, 20), None).unwrap().contains("no longer tracked"));
    }

    fn kernel_id(path: &Path) -> ExeId {
        let file = std::fs::metadata(path).unwrap();
        let dev = ((libc::major(file.dev()) << 20) | libc::minor(file.dev())) as u32;
        ExeId { ino: file.ino(), dev, generation: 7 }
    }

    #[test]
    fn a_known_path_counts_only_while_it_names_that_very_file() {
        let dir = std::env::temp_dir().join(format!("known-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tool");
        std::fs::write(&path, "v1").unwrap();
        let id = kernel_id(&path);
        KNOWN_EXES.lock().unwrap().put(id, path.clone());
        assert_eq!(known_exe(id), Some(path.clone()));
        // A second name: no longer the only path of that file.
        std::fs::hard_link(&path, dir.join("alias")).unwrap();
        assert_eq!(known_exe(id), None);
        KNOWN_EXES.lock().unwrap().put(id, path.clone());
        std::fs::remove_file(dir.join("alias")).unwrap();
        // Replaced: the path names another inode now.
        std::fs::write(dir.join("tool.new"), "v2").unwrap();
        std::fs::rename(dir.join("tool.new"), &path).unwrap();
        assert_eq!(known_exe(id), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_ancestor_counts_with_what_it_ran_when_it_forked_the_child() {
        // Exec'd curl, then forked the child: curl counts.
        assert_eq!(ancestor_counts(times(5, 8), times(10, 0)), Some(true));
        // Forked the child, then exec'd curl: curl does not count for the child.
        assert_eq!(ancestor_counts(times(5, 12), times(10, 0)), Some(false));
        // Never exec'd since tracking began (or untracked): its executable is what it had.
        assert_eq!(ancestor_counts(times(5, 0), times(10, 0)), Some(true));
        assert_eq!(ancestor_counts(times(0, 0), times(0, 0)), Some(true));
        // The child predates tracking, the ancestor exec'd since: not what forked the child.
        assert_eq!(ancestor_counts(times(0, 7), times(0, 0)), Some(false));
        // A "parent" forked after its child is a reused pid.
        assert_eq!(ancestor_counts(times(15, 0), times(10, 0)), None);
    }
}
