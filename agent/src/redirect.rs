//! The kernel side: loads the embedded eBPF programs, attaches them to a
//! sandbox cgroup as pinned links, and reads the connect records they write.
//!
//! Pins live under /sys/fs/bpf/sandbox-egress/<cgroup-id>/. Pinned links keep
//! redirecting to the listener after the agent dies, so a sandbox's connects
//! are refused rather than going direct (fail closed). A restarting agent
//! attaches its new links before dropping the old ones and shares the pinned
//! record maps with them, so no connect slips through or loses its record.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use agent_common::{
    ConnectRecord, SockAddrKey, GLOBAL_AGENT_NETNS_COOKIE, GLOBAL_LISTEN_PORT, MAP_BY_CLIENT, MAP_BY_COOKIE,
    MAP_DNS_CLIENTS, MAP_DNS_SERVER_BY_COOKIE,
};
use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SockOps,
    },
    Ebpf, EbpfLoader,
};
use tokio::io::unix::AsyncFd;

use crate::preflight::{Cgroup, BPFFS};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

const PROGRAMS: [&str; 7] = [
    "redirect_connect4",
    "redirect_connect6",
    "rekey_by_client",
    "redirect_dns_sendmsg4",
    "redirect_dns_sendmsg6",
    "restore_dns_source4",
    "restore_dns_source6",
];

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EbpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

pub struct Redirect {
    by_client: Mutex<HashMap<MapData, SockAddrKey, ConnectRecord>>,
    dns_clients: HashMap<MapData, SockAddrKey, u64>,
    /// Keeps the programs and the log ring buffer alive.
    _ebpf: Ebpf,
}

fn pin_dir(cgroup: &Cgroup) -> PathBuf {
    Path::new(BPFFS).join("sandbox-egress").join(cgroup.id.to_string())
}

impl Redirect {
    /// Loads and attaches the programs to `cgroup`, replacing (without a gap)
    /// any left pinned by an earlier agent, and starts draining eBPF traces.
    pub fn attach(cgroup: &Cgroup, listen_port: u16, log_level: EbpfLogLevel) -> Result<Self> {
        let dir = pin_dir(cgroup);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let previous: Vec<PinnedLink> =
            PROGRAMS.iter().filter_map(|name| PinnedLink::from_pin(dir.join(name)).ok()).collect();

        let netns_cookie = own_netns_cookie()?;
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_LISTEN_PORT, &listen_port, true)
            .override_global(GLOBAL_AGENT_NETNS_COOKIE, &netns_cookie, true)
            .override_global(aya_log::LEVEL, &(log_level as u8), false)
            .map_pin_path(MAP_BY_COOKIE, dir.join(MAP_BY_COOKIE))
            .map_pin_path(MAP_BY_CLIENT, dir.join(MAP_BY_CLIENT))
            .map_pin_path(MAP_DNS_SERVER_BY_COOKIE, dir.join(MAP_DNS_SERVER_BY_COOKIE))
            .map_pin_path(MAP_DNS_CLIENTS, dir.join(MAP_DNS_CLIENTS))
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading the eBPF programs failed: is BPF available (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, not locked down)? \
                     If maps pinned under {} come from another agent version, run `sandbox-egress detach --cgroup {}`",
                    dir.display(),
                    cgroup.path.display()
                )
            })?;
        start_ebpf_log_drain(&mut ebpf);

        let cgroup_dir = std::fs::File::open(&cgroup.path)?;
        for name in PROGRAMS {
            let link = attach_program(&mut ebpf, name, &cgroup_dir)
                .with_context(|| format!("attach {name} to {}", cgroup.path.display()))?;
            // Pin beside the old link, then rename over it: the pin path is never empty.
            // (bpffs reserves dots in names.)
            let staged = dir.join(format!("{name}-staged"));
            let _ = std::fs::remove_file(&staged);
            link.pin(&staged).with_context(|| format!("pin {}", staged.display()))?;
            std::fs::rename(&staged, dir.join(name))?;
        }
        if previous.is_empty() {
            warn_about_earlier_members(cgroup);
        } else {
            tracing::info!(replaced = previous.len(), "replaced the links of a previous agent");
        }
        drop(previous); // Their pins are gone: closing the fds detaches them.

        let by_client = HashMap::try_from(ebpf.take_map(MAP_BY_CLIENT).context("map missing from eBPF object")?)?;
        let dns_clients = HashMap::try_from(ebpf.take_map(MAP_DNS_CLIENTS).context("map missing from eBPF object")?)?;
        tracing::info!(cgroup = %cgroup.path.display(), pins = %dir.display(), "redirect attached");
        Ok(Self { by_client: Mutex::new(by_client), dns_clients, _ebpf: ebpf })
    }

    /// Takes the record the kernel wrote for the connection whose client end
    /// is `client`. Each record is handed out once.
    pub fn take_record(&self, client: SocketAddr) -> Option<ConnectRecord> {
        let key = key_of(client);
        let mut map = self.by_client.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let record = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(record)
    }
}

impl Redirect {
    /// The cgroup id of the sandbox socket that sent a DNS query from
    /// `client` (as the agent's UDP socket saw it), if a sandbox sent it.
    pub fn dns_client_sandbox(&self, client: SocketAddr) -> Option<u64> {
        self.dns_clients.get(&key_of(client), 0).ok()
    }
}

fn key_of(client: SocketAddr) -> SockAddrKey {
    let ip = match client.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SockAddrKey::new(ip.octets(), client.port())
}

/// Connections opened before the first attach, and sockets created before
/// their process joined the cgroup, are never seen by the programs: the
/// kernel checks a socket's cgroup at connect time, and a socket keeps the
/// cgroup it was created in. Sandboxes must start inside the cgroup after
/// the agent is ready; say so when processes were there first.
fn warn_about_earlier_members(cgroup: &Cgroup) {
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
fn count_processes(dir: &Path) -> usize {
    let members = std::fs::read_to_string(dir.join("cgroup.procs")).map_or(0, |procs| procs.lines().count());
    let children = std::fs::read_dir(dir).into_iter().flatten().flatten();
    members + children.filter(|entry| entry.path().is_dir()).map(|entry| count_processes(&entry.path())).sum::<usize>()
}

/// The kernel's cookie for the agent's network namespace (SO_NETNS_COOKIE, Linux 5.14+).
fn own_netns_cookie() -> Result<u64> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14+)");
    }
    Ok(cookie)
}

fn attach_program(ebpf: &mut Ebpf, name: &str, cgroup_dir: &std::fs::File) -> Result<FdLink> {
    let program = ebpf.program_mut(name).context("program missing from eBPF object")?;
    let link = if let Ok(sock_ops) = <&mut SockOps>::try_from(&mut *program) {
        sock_ops.load()?;
        let id = sock_ops.attach(cgroup_dir, CgroupAttachMode::Single)?;
        FdLink::try_from(sock_ops.take_link(id)?)?
    } else {
        let sock_addr: &mut CgroupSockAddr = program.try_into()?;
        sock_addr.load()?;
        let id = sock_addr.attach(cgroup_dir, CgroupAttachMode::Single)?;
        FdLink::try_from(sock_addr.take_link(id)?)?
    };
    Ok(link)
}

/// Forwards aya-log records to `tracing` (via the log bridge) as they arrive.
fn start_ebpf_log_drain(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "eBPF traces unavailable");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(error) => {
            let (_, error) = error.into_parts();
            tracing::warn!(%error, "eBPF traces unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

/// Removes the pinned links and maps of `cgroup`. Returns whether anything was attached.
pub fn detach(cgroup: &Cgroup) -> Result<bool> {
    let dir = pin_dir(cgroup);
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(true)
}
