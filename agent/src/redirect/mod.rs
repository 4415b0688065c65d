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
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use agent_common::{
    event_kind, AbstractName, ConnectRecord, KernelEvent, ProcessTimes, SockAddrKey, ABSTRACT_NAME_MAX,
    BY_CLIENT_MAX_ENTRIES, DNS_CLIENTS_MAX_ENTRIES, GLOBAL_AGENT_NETNS_COOKIE, GLOBAL_LISTEN_PORT,
    GLOBAL_SANDBOX_CGROUP_ID, GLOBAL_SANDBOX_CGROUP_LEVEL, MAP_ABSTRACT_UNIX_ALLOWED, MAP_BY_CLIENT, MAP_BY_COOKIE,
    MAP_DNS_CLIENTS, MAP_DNS_SERVER_BY_COOKIE, MAP_EVENTS, MAP_PROCESS_TIMES, PROCESS_TIMES_MAX_ENTRIES,
};
use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt, SockOps,
        TracePoint,
    },
    Ebpf, EbpfLoader,
};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::Instrument;

mod abstract_unix;
mod raw_bpf;

use crate::preflight::{Cgroup, BPFFS};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

/// Where a program runs: its kernel hook.
#[derive(Clone, Copy)]
enum Hook {
    SockAddr,
    SockOps,
    SockCreate,
    Sockopt,
    Skb(CgroupSkbAttachType),
    TracePoint(&'static str, &'static str),
}

/// The links of the agent's own unix socket programs (abstract_unix.rs).
const ABSTRACT_UNIX_PINS: [&str; 2] = ["refuse_abstract_unix_connect", "refuse_abstract_unix_sendmsg"];

/// Every link the agent pins, by pin name: the program and where it runs.
/// One program may have several links (exec attempts come by two syscalls).
const LINKS: [(&str, &str, Hook); 14] = [
    ("redirect_connect4", "redirect_connect4", Hook::SockAddr),
    ("redirect_connect6", "redirect_connect6", Hook::SockAddr),
    ("rekey_by_client", "rekey_by_client", Hook::SockOps),
    ("redirect_dns_sendmsg4", "redirect_dns_sendmsg4", Hook::SockAddr),
    ("redirect_dns_sendmsg6", "redirect_dns_sendmsg6", Hook::SockAddr),
    ("restore_dns_source4", "restore_dns_source4", Hook::SockAddr),
    ("restore_dns_source6", "restore_dns_source6", Hook::SockAddr),
    ("restrict_inet_sockets", "restrict_inet_sockets", Hook::SockCreate),
    ("refuse_device_binding", "refuse_device_binding", Hook::Sockopt),
    ("contain_egress", "contain_egress", Hook::Skb(CgroupSkbAttachType::Egress)),
    ("contain_ingress", "contain_ingress", Hook::Skb(CgroupSkbAttachType::Ingress)),
    ("track_fork", "track_fork", Hook::TracePoint("task", "task_newtask")),
    ("track_exec-execve", "track_exec", Hook::TracePoint("syscalls", "sys_enter_execve")),
    ("track_exec-execveat", "track_exec", Hook::TracePoint("syscalls", "sys_enter_execveat")),
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
    process_times: HashMap<MapData, u32, ProcessTimes>,
    /// Keeps the programs and the log ring buffer alive.
    _ebpf: Ebpf,
    /// Dropped with the redirect: its trace and event drains end.
    _drains: watch::Sender<()>,
}

fn pin_dir(cgroup: &Cgroup) -> PathBuf {
    Path::new(BPFFS).join("sandbox-egress").join(cgroup.id.to_string())
}

impl Redirect {
    /// Loads and attaches the programs to `cgroup`, replacing (without a gap)
    /// any left pinned by an earlier agent, and starts draining eBPF traces.
    /// `netns_cookie`: the network namespace the sandbox's listener is in
    /// (its sockets elsewhere are refused).
    pub fn attach(
        cgroup: &Cgroup,
        listen_port: u16,
        netns_cookie: u64,
        log_level: EbpfLogLevel,
        abstract_unix: &[String],
    ) -> Result<Self> {
        remove_pins_of_removed_cgroups(cgroup);
        let dir = pin_dir(cgroup);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let pins = LINKS.iter().map(|(pin, _, _)| *pin).chain(ABSTRACT_UNIX_PINS);
        let previous: Vec<PinnedLink> = pins.filter_map(|pin| PinnedLink::from_pin(dir.join(pin)).ok()).collect();

        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_LISTEN_PORT, &listen_port, true)
            .override_global(GLOBAL_AGENT_NETNS_COOKIE, &netns_cookie, true)
            .override_global(GLOBAL_SANDBOX_CGROUP_ID, &cgroup.id, true)
            .override_global(GLOBAL_SANDBOX_CGROUP_LEVEL, &cgroup.level, true)
            .override_global(aya_log::LEVEL, &(log_level as u8), false)
            .map_pin_path(MAP_BY_COOKIE, dir.join(MAP_BY_COOKIE))
            .map_pin_path(MAP_BY_CLIENT, dir.join(MAP_BY_CLIENT))
            .map_pin_path(MAP_DNS_SERVER_BY_COOKIE, dir.join(MAP_DNS_SERVER_BY_COOKIE))
            .map_pin_path(MAP_DNS_CLIENTS, dir.join(MAP_DNS_CLIENTS))
            .map_pin_path(MAP_PROCESS_TIMES, dir.join(MAP_PROCESS_TIMES))
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading the eBPF programs failed: is BPF available (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, not locked down)? \
                     If maps pinned under {} come from another agent version, run `sandbox-egress detach --cgroup {}`",
                    dir.display(),
                    cgroup.path.display()
                )
            })?;
        let (drains, stopped) = watch::channel(());
        start_ebpf_log_drain(&mut ebpf, stopped.clone());
        start_event_drain(take_map(&mut ebpf, MAP_EVENTS)?, stopped)?;
        allow_abstract_unix(&mut ebpf, abstract_unix)?;

        for (_, program, hook) in LINKS {
            load_program(&mut ebpf, program, hook).with_context(|| format!("load {program}"))?;
        }
        let cgroup_dir = std::fs::File::open(&cgroup.path)?;
        for (pin, program, hook) in LINKS {
            let link = attach_program(&mut ebpf, program, hook, &cgroup_dir).with_context(|| {
                let limit = if matches!(hook, Hook::TracePoint(..)) {
                    " (the kernel allows 64 programs per tracepoint: each sandbox attaches its own)"
                } else {
                    ""
                };
                format!("attach {program} ({pin}) for {}{limit}", cgroup.path.display())
            })?;
            pin_over(link, &dir, pin)?;
        }
        let allowed = ebpf.map(MAP_ABSTRACT_UNIX_ALLOWED).context("map missing from the eBPF object")?;
        let aya::maps::Map::HashMap(allowed) = allowed else { bail!("{MAP_ABSTRACT_UNIX_ALLOWED} is not a hash map") };
        for (attach_type, pin, program) in abstract_unix::load(allowed.fd().as_fd())? {
            let link = raw_bpf::link_create(program.as_fd(), cgroup_dir.as_fd(), attach_type).with_context(|| {
                format!(
                    "attach {pin} to {}: abstract unix sockets are contained with Linux 6.7+",
                    cgroup.path.display()
                )
            })?;
            pin_over(Link::Raw(link), &dir, pin)?;
        }
        if previous.is_empty() {
            warn_about_earlier_members(cgroup);
        } else {
            tracing::info!(replaced = previous.len(), "replaced the links of a previous agent");
        }
        drop(previous); // Their pins are gone: closing the fds detaches them.

        let by_client = HashMap::try_from(take_map(&mut ebpf, MAP_BY_CLIENT)?)?;
        let dns_clients = HashMap::try_from(take_map(&mut ebpf, MAP_DNS_CLIENTS)?)?;
        let process_times = HashMap::try_from(take_map(&mut ebpf, MAP_PROCESS_TIMES)?)?;
        tracing::info!(cgroup = %cgroup.path.display(), pins = %dir.display(), "redirect attached");
        Ok(Self { by_client: Mutex::new(by_client), dns_clients, process_times, _ebpf: ebpf, _drains: drains })
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

    /// When the sandboxed process `pid` was forked and last tried to exec;
    /// `None` if it is not tracked (not in a sandbox, or evicted).
    pub fn process_times(&self, pid: u32) -> Option<ProcessTimes> {
        self.process_times.get(&pid, 0).ok()
    }

    /// Entries in the maps the agent reads, with their capacity: (name, entries, capacity).
    pub fn map_fill(&self) -> Vec<(&'static str, usize, u32)> {
        let by_client = self.by_client.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).keys().count();
        vec![
            ("connects_by_client", by_client, BY_CLIENT_MAX_ENTRIES),
            ("dns_clients", self.dns_clients.keys().count(), DNS_CLIENTS_MAX_ENTRIES),
            ("process_times", self.process_times.keys().count(), PROCESS_TIMES_MAX_ENTRIES),
        ]
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))
}

/// Fills the map of abstract unix names sandboxes may reach (`@` optional).
fn allow_abstract_unix(ebpf: &mut Ebpf, names: &[String]) -> Result<()> {
    let mut allowed: HashMap<_, AbstractName, u8> =
        HashMap::try_from(ebpf.map_mut(MAP_ABSTRACT_UNIX_ALLOWED).context("map missing from the eBPF object")?)?;
    for name in names {
        let bytes = name.strip_prefix('@').unwrap_or(name).as_bytes();
        if bytes.is_empty() || bytes.len() > ABSTRACT_NAME_MAX {
            bail!("--allow-abstract-unix {name:?}: a name has 1 to {ABSTRACT_NAME_MAX} bytes");
        }
        let mut key = AbstractName { len: bytes.len() as u8, name: [0; ABSTRACT_NAME_MAX] };
        key.name[..bytes.len()].copy_from_slice(bytes);
        allowed.insert(key, 1, 0).with_context(|| format!("--allow-abstract-unix {name:?}"))?;
    }
    Ok(())
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
pub fn count_processes(dir: &Path) -> usize {
    let members = std::fs::read_to_string(dir.join("cgroup.procs")).map_or(0, |procs| procs.lines().count());
    let children = std::fs::read_dir(dir).into_iter().flatten().flatten();
    members + children.filter(|entry| entry.path().is_dir()).map(|entry| count_processes(&entry.path())).sum::<usize>()
}

fn load_program(ebpf: &mut Ebpf, name: &str, hook: Hook) -> Result<()> {
    let program = ebpf.program_mut(name).context("program missing from eBPF object")?;
    if program.fd().is_ok() {
        return Ok(()); // Loaded for an earlier link.
    }
    match hook {
        Hook::SockAddr => <&mut CgroupSockAddr>::try_from(program)?.load()?,
        Hook::SockOps => <&mut SockOps>::try_from(program)?.load()?,
        Hook::SockCreate => <&mut CgroupSock>::try_from(program)?.load()?,
        Hook::Sockopt => <&mut CgroupSockopt>::try_from(program)?.load()?,
        Hook::Skb(_) => <&mut CgroupSkb>::try_from(program)?.load()?,
        Hook::TracePoint(..) => <&mut TracePoint>::try_from(program)?.load()?,
    }
    Ok(())
}

/// Pins beside the old link, then renames over it: the pin path is never
/// empty. (bpffs reserves dots in names.)
fn pin_over(link: Link, dir: &Path, pin: &str) -> Result<()> {
    let staged = dir.join(format!("{pin}-staged"));
    let _ = std::fs::remove_file(&staged);
    link.pin(&staged).with_context(|| format!("pin {}", staged.display()))?;
    std::fs::rename(&staged, dir.join(pin))?;
    Ok(())
}

/// A link to pin: aya's own, or one made here where aya cannot hand it out.
enum Link {
    Aya(FdLink),
    Raw(OwnedFd),
}

impl Link {
    fn pin(self, path: &Path) -> Result<()> {
        match self {
            Self::Aya(link) => drop(link.pin(path)?),
            Self::Raw(fd) => raw_bpf::pin(fd.as_fd(), path)?,
        }
        Ok(())
    }
}

fn attach_program(ebpf: &mut Ebpf, name: &str, hook: Hook, cgroup_dir: &std::fs::File) -> Result<Link> {
    let program = ebpf.program_mut(name).context("program missing from eBPF object")?;
    let mode = CgroupAttachMode::Single;
    let link = match hook {
        Hook::SockAddr => {
            let program = <&mut CgroupSockAddr>::try_from(program)?;
            let id = program.attach(cgroup_dir, mode)?;
            FdLink::try_from(program.take_link(id)?)?
        }
        Hook::SockOps => {
            let program = <&mut SockOps>::try_from(program)?;
            let id = program.attach(cgroup_dir, mode)?;
            FdLink::try_from(program.take_link(id)?)?
        }
        Hook::SockCreate => {
            let program = <&mut CgroupSock>::try_from(program)?;
            let id = program.attach(cgroup_dir, mode)?;
            FdLink::try_from(program.take_link(id)?)?
        }
        Hook::Sockopt => {
            // aya 0.14 cannot hand out a setsockopt program's link to pin.
            let program = <&mut CgroupSockopt>::try_from(program)?;
            return Ok(Link::Raw(raw_bpf::link_create(
                program.fd()?.as_fd(),
                cgroup_dir.as_fd(),
                raw_bpf::BPF_CGROUP_SETSOCKOPT,
            )?));
        }
        Hook::Skb(attach_type) => {
            let program = <&mut CgroupSkb>::try_from(program)?;
            let id = program.attach(cgroup_dir, attach_type, mode)?;
            FdLink::try_from(program.take_link(id)?)?
        }
        Hook::TracePoint(category, event) => {
            let program = <&mut TracePoint>::try_from(program)?;
            let id = program.attach(category, event)?;
            FdLink::try_from(program.take_link(id)?)?
        }
    };
    Ok(Link::Aya(link))
}

/// Logs the kernel side's refusals and drops as they arrive.
fn start_event_drain(map: aya::maps::Map, mut stopped: watch::Receiver<()>) -> Result<()> {
    let ring = aya::maps::RingBuf::try_from(map)?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|error| error.into_parts().1)?;
    let drain = async move {
        while let Ok(mut ready) = ring.readable_mut().await {
            while let Some(item) = ready.get_inner_mut().next() {
                if item.len() >= std::mem::size_of::<KernelEvent>() {
                    // SAFETY: the kernel side writes whole KernelEvents, a repr(C) plain-data type.
                    log_kernel_event(&unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<KernelEvent>()) });
                }
            }
            ready.clear_ready();
        }
    };
    tokio::spawn(
        async move {
            tokio::select! {
                () = drain => {}
                _ = stopped.changed() => {}
            }
        }
        .in_current_span(),
    );
    Ok(())
}

fn log_kernel_event(event: &KernelEvent) {
    let comm_len = event.comm.iter().position(|&b| b == 0).unwrap_or(event.comm.len());
    // Raw, like every sandbox-given string: the log formatters escape it.
    let comm = String::from_utf8_lossy(&event.comm[..comm_len]).into_owned();
    let (pid, cgroup_id, suppressed) = (event.pid, event.cgroup_id, event.suppressed);
    match event.kind {
        event_kind::OTHER_NETNS => tracing::warn!(
            event = "kernel_refusal",
            kind = "other_netns",
            pid,
            comm,
            cgroup_id,
            suppressed,
            "refused pid={pid} comm={comm}: it is in another network namespace than its sandbox's listener; register \
             the namespace with the sandbox (--netns) ({suppressed} similar suppressed)"
        ),
        event_kind::ABSTRACT_UNIX => tracing::warn!(
            event = "kernel_refusal",
            kind = "abstract_unix",
            pid,
            comm,
            cgroup_id,
            suppressed,
            "refused pid={pid} comm={comm}: abstract unix sockets are out of a sandbox's reach unless listed with \
             --allow-abstract-unix ({suppressed} similar suppressed)"
        ),
        kind @ (event_kind::PACKET_EGRESS | event_kind::PACKET_INGRESS) => {
            let direction = if kind == event_kind::PACKET_EGRESS { "leaving" } else { "arriving" };
            tracing::warn!(
                event = "kernel_refusal",
                kind = if kind == event_kind::PACKET_EGRESS { "packet_egress" } else { "packet_ingress" },
                cgroup_id,
                ifindex = event.ifindex,
                suppressed,
                "dropped a packet of sandbox cgroup {cgroup_id} {direction} over device ifindex {}: sandboxes talk \
                 only to the agent, over loopback ({suppressed} similar suppressed)",
                event.ifindex
            )
        }
        kind => tracing::warn!(kind, cgroup_id, "unknown kernel event"),
    }
}

/// Forwards aya-log records to `tracing` (via the log bridge) as they arrive.
fn start_ebpf_log_drain(ebpf: &mut Ebpf, mut stopped: watch::Receiver<()>) {
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
    let drain = async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    };
    tokio::spawn(
        async move {
            tokio::select! {
                () = drain => {}
                _ = stopped.changed() => {}
            }
        }
        .in_current_span(),
    );
}

/// Removes the pins left for cgroups that no longer exist: a sandbox cgroup
/// removed without `detach` keeps its links pinned, and its tracepoint
/// programs count against the kernel's limit per tracepoint (64 programs,
/// then E2BIG), which would in time keep any agent from attaching.
fn remove_pins_of_removed_cgroups(cgroup: &Cgroup) {
    let (Ok(cgroup_fs), Ok(entries)) =
        (std::fs::File::open(&cgroup.path), std::fs::read_dir(Path::new(BPFFS).join("sandbox-egress")))
    else {
        return;
    };
    for entry in entries.flatten() {
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

/// Removes the pinned links and maps of `cgroup`. Returns whether anything was attached.
pub fn detach(cgroup: &Cgroup) -> Result<bool> {
    let dir = pin_dir(cgroup);
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(true)
}
