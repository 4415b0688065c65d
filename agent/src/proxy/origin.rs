//! Who connected where: the kernel's connect record, made readable.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use agent_common::ConnectRecord;

pub struct Origin {
    /// The destination the sandboxed process asked for.
    pub destination: SocketAddr,
    pub pid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    /// `/proc/<pid>/exe` at accept time; `None` if the process already exited.
    pub exe: Option<PathBuf>,
}

impl Origin {
    pub fn from_record(record: &ConnectRecord) -> Self {
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
            exe: std::fs::read_link(format!("/proc/{}/exe", record.tgid)).ok(),
        }
    }
}
