//! Checks that turn an unusable environment into a clear error before
//! anything is attached.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, TRACEFS_MAGIC},
};

pub const BPFFS: &str = "/sys/fs/bpf";
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn require_root(command: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`sandbox-egress {command}` must run as root: it loads eBPF programs and attaches them to cgroups");
    }
    Ok(())
}

/// A cgroup v2 directory and its id (the inode number, which is what
/// `bpf_get_current_cgroup_id()` reports for tasks inside it).
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
    /// Depth below the cgroup v2 root (the root is level 0).
    pub level: u32,
}

pub fn cgroup_v2_dir(path: &Path) -> Result<Cgroup> {
    let path = path.canonicalize().with_context(|| format!("cgroup {} does not exist", path.display()))?;
    let fs = statfs(&path).with_context(|| format!("statfs {}", path.display()))?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (filesystem type {:#x}); cgroup v2 is mounted at e.g. /sys/fs/cgroup/unified",
            path.display(),
            fs.filesystem_type().0
        );
    }
    let id = std::fs::metadata(&path)?.ino();
    let level = path
        .ancestors()
        .skip(1)
        .take_while(|ancestor| statfs(*ancestor).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC))
        .count() as u32;
    Ok(Cgroup { path, id, level })
}

/// Raises the open-file limit to cover `needed` descriptors: the soft limit
/// to the hard one, and the hard one too where it is lower (root with
/// CAP_SYS_RESOURCE may, up to /proc/sys/fs/nr_open). Returns the soft
/// limit in force; the caller warns if it is still below `needed`.
pub fn raise_fd_limit(needed: u64) -> Result<u64> {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(needed);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        let wanted = needed.min(nr_open);
        if limit.rlim_max < wanted {
            let raised = libc::rlimit { rlim_cur: wanted, rlim_max: wanted };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Ok(wanted);
            }
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// Tracepoints (process tracking) are found through tracefs.
pub fn ensure_tracefs() -> Result<()> {
    ensure_mounted(TRACEFS, "tracefs", TRACEFS_MAGIC)
}

/// Pins need a BPF filesystem; mount one at /sys/fs/bpf if there is none.
pub fn ensure_bpffs() -> Result<()> {
    std::fs::create_dir_all(BPFFS).with_context(|| format!("create {BPFFS}"))?;
    ensure_mounted(BPFFS, "bpf", BPF_FS_MAGIC)
}

fn ensure_mounted(dir: &str, fstype: &str, magic: nix::sys::statfs::FsType) -> Result<()> {
    let mounted = || statfs(dir).is_ok_and(|fs| fs.filesystem_type() == magic);
    if mounted() {
        return Ok(());
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(error) = mount(Some(fstype), dir, Some(fstype), flags, None::<&str>) {
        // Another agent starting at the same moment may have mounted it first (EBUSY).
        if mounted() {
            return Ok(());
        }
        return Err(error).with_context(|| format!("mount {fstype} at {dir}"));
    }
    tracing::info!("mounted {fstype} at {dir}");
    Ok(())
}
