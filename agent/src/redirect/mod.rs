//! The kernel side: loads the embedded eBPF programs once for the host,
//! attaches the cgroup programs to each sandbox's cgroup as pinned links,
//! and reads the records they write.
//!
//! Every sandbox shares the programs and maps; the SANDBOXES map says, per
//! sandbox cgroup, where its connects go (its listener's port and network
//! namespace) and whether it is served. The tracepoints that track process
//! times are attached once for the host and keep only the processes of
//! those cgroups.
//!
//! Pins: the maps and the tracepoint links under
//! /sys/fs/bpf/sandbox-egress/host/, each sandbox's links under
//! /sys/fs/bpf/sandbox-egress/<cgroup-id>/. Pinned links keep redirecting
//! after the agent dies, so a sandbox's connects are refused rather than
//! going direct (fail closed); a removed sandbox's entry is marked closed,
//! so its connects are refused too. A restarting agent attaches its new
//! links before dropping the old ones and shares the pinned maps with them,
//! so no connect slips through or loses its record.

mod abstract_unix;
mod drains;
mod exe_offsets;
pub mod fast;
mod pins;
mod raw_bpf;

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::{Mutex, MutexGuard, PoisonError},
};

use agent_common::{
    AbstractName, ClientKey, ConnectRecord, DnsClient, FastDecision, FastKey, ProcessTimes, SandboxEntry, SockAddrKey,
    ABSTRACT_NAME_MAX, BY_CLIENT_MAX_ENTRIES, DNS_CLIENTS_MAX_ENTRIES, FAST_DECISIONS_MAX_ENTRIES,
    MAP_ABSTRACT_UNIX_ALLOWED, MAP_BY_CLIENT, MAP_BY_COOKIE, MAP_DNS_CLIENTS, MAP_DNS_SERVER_BY_COOKIE, MAP_EVENTS,
    MAP_FAST_DECISIONS, MAP_FAST_SOCKETS, MAP_PROCESS_TIMES, MAP_SANDBOXES, MAX_CGROUP_LEVEL,
    PROCESS_TIMES_MAX_ENTRIES, SANDBOXES_MAX_ENTRIES,
};
use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt,
        SockOps, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use tokio::sync::watch;

pub use pins::{count_processes, detach};

use crate::preflight::Cgroup;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

/// Where a program runs: its kernel hook.
#[derive(Clone, Copy)]
enum Hook {
    SockAddr,
    SockOps,
    SockCreate,
    Sockopt,
    Skb(CgroupSkbAttachType),
}

/// The links of the agent's own unix socket programs (abstract_unix.rs).
const ABSTRACT_UNIX_PINS: [&str; 2] = ["refuse_abstract_unix_connect", "refuse_abstract_unix_sendmsg"];

/// The links pinned per sandbox cgroup: (pin and program name, hook).
const CGROUP_LINKS: [(&str, Hook); 11] = [
    ("redirect_connect4", Hook::SockAddr),
    ("redirect_connect6", Hook::SockAddr),
    ("rekey_by_client", Hook::SockOps),
    ("redirect_dns_sendmsg4", Hook::SockAddr),
    ("redirect_dns_sendmsg6", Hook::SockAddr),
    ("restore_dns_source4", Hook::SockAddr),
    ("restore_dns_source6", Hook::SockAddr),
    ("restrict_inet_sockets", Hook::SockCreate),
    ("refuse_device_binding", Hook::Sockopt),
    ("contain_egress", Hook::Skb(CgroupSkbAttachType::Egress)),
    ("contain_ingress", Hook::Skb(CgroupSkbAttachType::Ingress)),
];

/// The links pinned once for the host: (pin name, program, tracepoint).
/// Exec attempts come by two syscalls.
const HOST_LINKS: [(&str, &str, (&str, &str)); 3] = [
    ("track_fork", "track_fork", ("task", "task_newtask")),
    ("track_exec-execve", "track_exec", ("syscalls", "sys_enter_execve")),
    ("track_exec-execveat", "track_exec", ("syscalls", "sys_enter_execveat")),
];

/// The maps shared by every sandbox and every agent run, pinned in the host
/// directory: (map, pin name). A map whose layout changed gets a new pin
/// name, so agents of both layouts can run side by side. The ring of
/// fast-path closes is not among them: each daemon's programs report to its
/// own, so agents side by side never read each other's closes.
const SHARED_MAPS: [(&str, &str); 8] = [
    (MAP_BY_COOKIE, "CONNECTS_BY_COOKIE_2"),
    (MAP_BY_CLIENT, "CONNECTS_BY_CLIENT_2"),
    (MAP_DNS_SERVER_BY_COOKIE, MAP_DNS_SERVER_BY_COOKIE),
    (MAP_DNS_CLIENTS, MAP_DNS_CLIENTS),
    (MAP_PROCESS_TIMES, MAP_PROCESS_TIMES),
    (MAP_SANDBOXES, MAP_SANDBOXES),
    (MAP_FAST_DECISIONS, MAP_FAST_DECISIONS),
    (MAP_FAST_SOCKETS, MAP_FAST_SOCKETS),
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

/// How the programs are loaded, once per agent.
pub struct KernelOptions {
    pub log_level: EbpfLogLevel,
    pub abstract_unix: Vec<String>,
    /// The mark on the agent's TCP listeners (nonzero): the fast path takes
    /// only a listener with it for the agent's.
    pub listener_mark: u32,
}

/// Where a sandbox's connects go.
#[derive(Clone, Copy)]
pub struct Destination {
    pub listen_port: u16,
    /// The network namespace the listener is in (its sockets elsewhere are refused).
    pub netns_cookie: u64,
    /// The generation of the fast-path decisions that hold for it.
    pub fast_generation: u32,
}

/// The programs and maps, loaded once and shared by every sandbox.
pub struct Redirect {
    /// Loaded programs, attached to each sandbox cgroup in turn.
    ebpf: Mutex<Ebpf>,
    abstract_unix: [(u32, &'static str, OwnedFd); 2],
    sandboxes: Mutex<HashMap<MapData, u64, SandboxEntry>>,
    by_client: Mutex<HashMap<MapData, ClientKey, ConnectRecord>>,
    dns_clients: HashMap<MapData, ClientKey, DnsClient>,
    process_times: HashMap<MapData, u32, ProcessTimes>,
    fast_decisions: Mutex<HashMap<MapData, FastKey, FastDecision>>,
    /// The ring of fast-path closes, until the daemon takes it to read.
    fast_closes: Mutex<Option<fast::Closes>>,
    /// Whether the programs read the executable (and so may fast-path).
    exe_known: bool,
    /// Dropped with the redirect: its trace and event drains end.
    _drains: watch::Sender<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Redirect {
    /// Loads the programs, attaches the process-tracking tracepoints for
    /// the host (replacing, without a gap, any left by an earlier agent),
    /// and starts draining eBPF traces and events.
    pub fn load(options: &KernelOptions) -> Result<Self> {
        let host = pins::host_dir();
        std::fs::create_dir_all(&host).with_context(|| format!("create {}", host.display()))?;
        // Agents starting side by side would race to pin the shared maps.
        let _loading = pins::lock_host_dir()?;
        let log_level = options.log_level as u8;
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &log_level, false);
        let exe_offsets = exe_offsets::ExeOffsets::read()
            .inspect_err(|error| {
                tracing::warn!(
                    "the kernel's BTF does not say where a task's executable is ({error:#}): connections are \
                     attributed from /proc/PID/exe, and the kernel fast path is off"
                )
            })
            .ok();
        if let Some(offsets) = &exe_offsets {
            offsets.set(&mut loader);
        }
        loader.override_global("LISTENER_MARK", &options.listener_mark, true);
        for (map, pin) in SHARED_MAPS {
            loader.map_pin_path(map, host.join(pin));
        }
        let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
            format!(
                "loading the eBPF programs failed: is BPF available (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, not \
                 locked down)? If the maps pinned under {} come from another agent version, detach every sandbox \
                 (`sandbox-egress detach --cgroup DIR`) and remove that directory",
                host.display()
            )
        })?;
        let (drains, stopped) = watch::channel(());
        drains::start_ebpf_log_drain(&mut ebpf, stopped.clone());
        drains::start_event_drain(take_map(&mut ebpf, MAP_EVENTS)?, stopped)?;
        allow_abstract_unix(&mut ebpf, &options.abstract_unix)?;
        for (program, hook) in CGROUP_LINKS {
            load_program(&mut ebpf, program, hook).with_context(|| format!("load {program}"))?;
        }
        let allowed = ebpf.map(MAP_ABSTRACT_UNIX_ALLOWED).context("map missing from the eBPF object")?;
        let aya::maps::Map::HashMap(allowed) = allowed else { bail!("{MAP_ABSTRACT_UNIX_ALLOWED} is not a hash map") };
        let abstract_unix = abstract_unix::load(allowed.fd().as_fd())?;

        let mut sandboxes = take_shared_map(&mut ebpf, MAP_SANDBOXES, SANDBOXES_MAX_ENTRIES)?;
        pins::forget_removed_cgroups(&mut sandboxes);
        attach_tracepoints(&mut ebpf)?;

        let by_client = take_shared_map(&mut ebpf, MAP_BY_CLIENT, BY_CLIENT_MAX_ENTRIES)?;
        let dns_clients = take_shared_map(&mut ebpf, MAP_DNS_CLIENTS, DNS_CLIENTS_MAX_ENTRIES)?;
        let process_times = take_shared_map(&mut ebpf, MAP_PROCESS_TIMES, PROCESS_TIMES_MAX_ENTRIES)?;
        let mut fast_decisions = take_shared_map(&mut ebpf, MAP_FAST_DECISIONS, FAST_DECISIONS_MAX_ENTRIES)?;
        // Decisions no sandbox's current generation matches (of earlier
        // runs, removed sandboxes, replaced policies): never used again.
        // Other agents' live ones stay.
        fast::forget(&mut fast_decisions, |key, decision| {
            let entry = sandboxes.get(&decision.sandbox_cgroup_id, 0).ok();
            entry.is_none_or(|entry| entry.fast_generation != key.fast_generation || entry.open == 0)
        });
        let fast_closes = fast::Closes::take(&mut ebpf)?;
        tracing::info!(
            pins = %host.display(),
            "eBPF programs loaded once for every sandbox; process tracking attached for the host"
        );
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            abstract_unix,
            sandboxes: Mutex::new(sandboxes),
            by_client: Mutex::new(by_client),
            dns_clients,
            process_times,
            fast_decisions: Mutex::new(fast_decisions),
            fast_closes: Mutex::new(Some(fast_closes)),
            exe_known: exe_offsets.is_some(),
            _drains: drains,
        })
    }

    /// Serves `cgroup`: its entry says where its connects go, then the
    /// programs are attached to it, replacing (without a gap) any links left
    /// pinned by an earlier agent.
    pub fn attach(&self, cgroup: &Cgroup, destination: Destination) -> Result<()> {
        if cgroup.level == 0 || cgroup.level > MAX_CGROUP_LEVEL {
            bail!(
                "cgroup {} is at level {}: a sandbox cgroup is below the root, at most {MAX_CGROUP_LEVEL} levels deep",
                cgroup.path.display(),
                cgroup.level
            );
        }
        let entry = SandboxEntry {
            netns_cookie: destination.netns_cookie,
            listen_port: destination.listen_port,
            open: 1,
            fast_generation: destination.fast_generation,
        };
        self.set_entry(cgroup.id, entry)?;
        self.forget_fast(cgroup.id, Some(destination.fast_generation));
        let dir = pins::cgroup_dir(cgroup);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let previous = pins::pinned_links(&dir, CGROUP_LINKS.iter().map(|(pin, _)| *pin).chain(ABSTRACT_UNIX_PINS));
        let cgroup_dir = std::fs::File::open(&cgroup.path)?;
        {
            let mut ebpf = lock(&self.ebpf);
            for (program, hook) in CGROUP_LINKS {
                let link = attach_to_cgroup(&mut ebpf, program, hook, &cgroup_dir)
                    .with_context(|| format!("attach {program} to {}", cgroup.path.display()))?;
                pins::pin_over(link, &dir, program)?;
            }
        }
        for (attach_type, pin, program) in &self.abstract_unix {
            let link = raw_bpf::link_create(program.as_fd(), cgroup_dir.as_fd(), *attach_type).with_context(|| {
                format!(
                    "attach {pin} to {}: abstract unix sockets are contained with Linux 6.7+",
                    cgroup.path.display()
                )
            })?;
            pins::pin_over(Link::Raw(link), &dir, pin)?;
        }
        if previous.is_empty() {
            pins::warn_about_earlier_members(cgroup);
        } else {
            tracing::info!(replaced = previous.len(), "replaced the links of a previous agent");
            pins::remove_old_map_pins(&dir);
        }
        drop(previous); // Their pins are gone: closing the fds detaches them.
        tracing::info!(cgroup = %cgroup.path.display(), pins = %dir.display(), "redirect attached");
        Ok(())
    }

    /// A removed sandbox: its cgroup stays attached, and its connects and
    /// datagrams are refused (fail closed) until it is served again or detached.
    pub fn close(&self, cgroup: &Cgroup) {
        {
            let mut sandboxes = lock(&self.sandboxes);
            if let Ok(entry) = sandboxes.get(&cgroup.id, 0) {
                if let Err(error) = sandboxes.insert(cgroup.id, SandboxEntry { open: 0, ..entry }, 0) {
                    tracing::error!(%error, cgroup = %cgroup.path.display(), "cannot mark the sandbox closed");
                }
            }
        }
        self.forget_fast(cgroup.id, None);
    }

    /// Removes the redirect of `cgroup`: its entry, then its links.
    pub fn detach(&self, cgroup: &Cgroup) -> Result<bool> {
        let _ = lock(&self.sandboxes).remove(&cgroup.id);
        self.forget_fast(cgroup.id, None);
        pins::detach(cgroup)
    }

    /// A policy reload of the sandbox of `cgroup_id`: one update of its
    /// entry, and the fast-path decisions of earlier generations stop
    /// matching at once (they are deleted after).
    pub fn set_fast_generation(&self, cgroup_id: u64, fast_generation: u32) {
        {
            let mut sandboxes = lock(&self.sandboxes);
            let Ok(entry) = sandboxes.get(&cgroup_id, 0) else { return };
            if let Err(error) = sandboxes.insert(cgroup_id, SandboxEntry { fast_generation, ..entry }, 0) {
                tracing::error!(%error, cgroup_id, "cannot change the sandbox's fast-path generation");
            }
        }
        self.forget_fast(cgroup_id, Some(fast_generation));
    }

    /// Deletes the fast-path decisions of the sandbox of `cgroup_id` (but
    /// those of `keep`).
    fn forget_fast(&self, cgroup_id: u64, keep: Option<u32>) {
        fast::forget(&mut lock(&self.fast_decisions), |key, decision| {
            decision.sandbox_cgroup_id == cgroup_id && Some(key.fast_generation) != keep
        });
    }

    /// Whether the programs read the caller's executable: without it there
    /// is no kernel identity and no fast path.
    pub fn exe_known(&self) -> bool {
        self.exe_known
    }

    /// Lets the kernel connect `key` directly from now on, by `decision`.
    pub fn allow_fast(&self, key: FastKey, decision: FastDecision) {
        if let Err(error) = lock(&self.fast_decisions).insert(key, decision, 0) {
            tracing::warn!(%error, "cannot cache a fast-path decision");
        }
    }

    /// The ring of fast-path closes, for the one reader that logs them.
    pub fn take_fast_closes(&self) -> Option<fast::Closes> {
        lock(&self.fast_closes).take()
    }

    fn set_entry(&self, cgroup_id: u64, entry: SandboxEntry) -> Result<()> {
        let mut sandboxes = lock(&self.sandboxes);
        let known = sandboxes.get(&cgroup_id, 0).is_ok();
        let full = |sandboxes: &HashMap<MapData, u64, SandboxEntry>| {
            sandboxes.keys().count() >= SANDBOXES_MAX_ENTRIES as usize
        };
        if !known && full(&sandboxes) {
            // Cgroups deleted since they were served hold entries no one needs.
            pins::forget_removed_cgroups(&mut sandboxes);
        }
        if !known && full(&sandboxes) {
            bail!(
                "the kernel's sandbox map is full: it holds {SANDBOXES_MAX_ENTRIES} sandbox cgroups of this host's \
                 agents, served or removed without --detach; detach removed ones (`sandbox remove --detach`, \
                 `sandbox-egress detach`)"
            );
        }
        sandboxes.insert(cgroup_id, entry, 0).context("write the sandbox's entry in the kernel's sandbox map")
    }

    /// Takes the record the kernel wrote for the connection whose client end
    /// is `client`, to the listener on `listen_port` in the network namespace
    /// `netns_cookie`. Each record is handed out once.
    pub fn take_record(&self, netns_cookie: u64, listen_port: u16, client: SocketAddr) -> Option<ConnectRecord> {
        let key = ClientKey::new(netns_cookie, listen_port, key_of(client));
        let mut map = lock(&self.by_client);
        let record = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(record)
    }

    /// Who sent a DNS query from `client` to the socket on `listen_port` in
    /// the network namespace `netns_cookie` (as that socket saw it), if a
    /// sandbox sent it.
    pub fn dns_client(&self, netns_cookie: u64, listen_port: u16, client: SocketAddr) -> Option<DnsClient> {
        self.dns_clients.get(&ClientKey::new(netns_cookie, listen_port, key_of(client)), 0).ok()
    }

    /// When the sandboxed process `pid` was forked and last tried to exec;
    /// `None` if it is not tracked (not in a sandbox, or evicted).
    pub fn process_times(&self, pid: u32) -> Option<ProcessTimes> {
        self.process_times.get(&pid, 0).ok()
    }

    /// Entries in the maps, with their capacity: (name, entries, capacity).
    pub fn map_fill(&self) -> Vec<(&'static str, usize, u32)> {
        let by_client = lock(&self.by_client).keys().count();
        let sandboxes = lock(&self.sandboxes).keys().count();
        let fast_decisions = lock(&self.fast_decisions).keys().count();
        vec![
            ("sandboxes", sandboxes, SANDBOXES_MAX_ENTRIES),
            ("fast_decisions", fast_decisions, FAST_DECISIONS_MAX_ENTRIES),
            ("connects_by_client", by_client, BY_CLIENT_MAX_ENTRIES),
            ("dns_clients", self.dns_clients.keys().count(), DNS_CLIENTS_MAX_ENTRIES),
            ("process_times", self.process_times.keys().count(), PROCESS_TIMES_MAX_ENTRIES),
        ]
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))
}

/// A shared hash map, checked against this agent's layout: a map pinned by
/// another agent version is reused as it is, so it must be the same.
fn take_shared_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    max_entries: u32,
) -> Result<HashMap<MapData, K, V>> {
    let map = take_map(ebpf, name)?;
    let (aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data)) = &map else {
        bail!("{name} is not a hash map")
    };
    let info = data.info()?;
    let expected = (size_of::<K>() as u32, size_of::<V>() as u32, max_entries);
    if (info.key_size(), info.value_size(), info.max_entries()) != expected {
        bail!(
            "the map {name} pinned under {} comes from another agent version: detach every sandbox \
             (`sandbox-egress detach --cgroup DIR`), remove that directory, and start again",
            pins::host_dir().display()
        );
    }
    Ok(HashMap::try_from(map)?)
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

fn load_program(ebpf: &mut Ebpf, name: &str, hook: Hook) -> Result<()> {
    let program = ebpf.program_mut(name).context("program missing from eBPF object")?;
    match hook {
        Hook::SockAddr => <&mut CgroupSockAddr>::try_from(program)?.load()?,
        Hook::SockOps => <&mut SockOps>::try_from(program)?.load()?,
        Hook::SockCreate => <&mut CgroupSock>::try_from(program)?.load()?,
        Hook::Sockopt => <&mut CgroupSockopt>::try_from(program)?.load()?,
        Hook::Skb(_) => <&mut CgroupSkb>::try_from(program)?.load()?,
    }
    Ok(())
}

/// Attaches the tracepoints once for the host, pinned so that tracking
/// goes on across an agent's restart; replaces those of an earlier agent.
fn attach_tracepoints(ebpf: &mut Ebpf) -> Result<()> {
    let host = pins::host_dir();
    let previous = pins::pinned_links(&host, HOST_LINKS.iter().map(|(pin, _, _)| *pin));
    for (pin, program, (category, event)) in HOST_LINKS {
        let tracepoint = <&mut TracePoint>::try_from(ebpf.program_mut(program).context("program missing")?)?;
        if tracepoint.fd().is_err() {
            tracepoint.load().with_context(|| format!("load {program}"))?;
        }
        let id =
            tracepoint.attach(category, event).with_context(|| format!("attach {program} to {category}/{event}"))?;
        pins::pin_over(Link::Aya(FdLink::try_from(tracepoint.take_link(id)?)?), &host, pin)?;
    }
    drop(previous);
    Ok(())
}

/// A link to pin: aya's own, or one made here where aya cannot hand it out.
enum Link {
    Aya(FdLink),
    Raw(OwnedFd),
}

impl Link {
    fn pin(self, path: &std::path::Path) -> Result<()> {
        match self {
            Self::Aya(link) => drop(link.pin(path)?),
            Self::Raw(fd) => raw_bpf::pin(fd.as_fd(), path)?,
        }
        Ok(())
    }
}

fn attach_to_cgroup(ebpf: &mut Ebpf, name: &str, hook: Hook, cgroup_dir: &std::fs::File) -> Result<Link> {
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
    };
    Ok(Link::Aya(link))
}
