//! Who connected where: the kernel's connect record, made readable.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use agent_common::ConnectRecord;

/// Ancestors looked at for `binaries` rules; deeper chains are cut here.
const MAX_ANCESTORS: usize = 16;

pub struct Origin {
    /// The destination the sandboxed process asked for.
    pub destination: SocketAddr,
    pub pid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    /// `/proc/<pid>/exe` at accept time; `None` if the process already exited.
    pub exe: Option<PathBuf>,
    /// Executables of the parent, grandparent... (nearest first), up to but
    /// excluding pid 1, when the policy matches binaries (empty otherwise).
    /// The pid comes from the kernel's record, never from anything the
    /// sandbox sends.
    pub ancestors: Vec<PathBuf>,
}

impl Origin {
    /// Read at accept time, while the process most likely still runs.
    pub fn from_record(record: &ConnectRecord, with_ancestors: bool) -> Self {
        let ip = Ipv6Addr::from(record.original_dst.addr);
        // IPv4 destinations are stored v4-mapped; show and connect them as IPv4.
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        let comm_len = record.comm.iter().position(|&b| b == 0).unwrap_or(record.comm.len());
        Self {
            destination: SocketAddr::new(ip, record.original_dst.port),
            pid: record.tgid,
            uid: record.uid,
            cgroup_id: record.cgroup_id,
            comm: String::from_utf8_lossy(&record.comm[..comm_len]).into_owned(),
            exe: exe_of(record.tgid),
            ancestors: if with_ancestors { ancestors_of(record.tgid) } else { Vec::new() },
        }
    }
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

fn ancestors_of(pid: u32) -> Vec<PathBuf> {
    let mut ancestors = Vec::new();
    let mut current = pid;
    while ancestors.len() < MAX_ANCESTORS {
        match parent_of(current) {
            Some(parent) if parent > 1 => {
                if let Some(exe) = exe_of(parent) {
                    ancestors.push(exe);
                }
                current = parent;
            }
            _ => break,
        }
    }
    ancestors
}
