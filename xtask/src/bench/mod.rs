//! `cargo xtask bench`: the same workloads, in one run on this machine,
//! direct (the limit), through the agent (transparent redirect and explicit
//! CONNECT, and the kernel fast path of a `protocol: tcp` endpoint, clients
//! inside the sandbox cgroup) and through peer proxies
//! (squid and tinyproxy by CONNECT, haproxy in TCP mode) on loopback; then
//! workloads with columns of their own (TLS termination, keep-alive HTTP,
//! server-first and letter-first streams, inference.local, uploads with
//! `Expect: 100-continue`), each in a small table.
//!
//! Servers run in the harness's network namespace (e2e::TestNet), so nothing
//! leaves the machine; clients and servers are `bench-peer` (release build).
//! Every process, namespace, cgroup and pin is released on drop, Ctrl-C included.

mod grpc;
mod inference;
mod keepalive;
mod process;
mod proxies;
mod report;
mod sandboxes;
mod stalls;
mod tls;
mod upload;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use e2e::{PolicyFile, Sandbox, TestNet};
use serde_json::{json, Value};

use process::{cpu_seconds, rss_bytes, AgentProcess, Client};
use proxies::HaproxyMode;
use report::{Column, Metric, Results, Row, Sizes, Table};

#[derive(clap::Args)]
pub struct Args {
    /// Runs of every workload; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Bulk transfer size, each direction.
    #[arg(long, default_value_t = 1024)]
    bulk_mib: u64,
    /// Sequential short HTTP requests (a new connection each).
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// Short HTTP requests made `--concurrency` at a time.
    #[arg(long, default_value_t = 10_000)]
    concurrent_requests: usize,
    /// Requests in flight at once in the concurrent workload.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Idle connections held open for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// TLS connections made one after another per figure.
    #[arg(long, default_value_t = 500)]
    tls_connections: usize,
    /// Keep-alive requests on each TLS connection.
    #[arg(long, default_value_t = 10)]
    tls_requests: usize,
    /// gRPC unary calls per figure (new connection, open channel).
    #[arg(long, default_value_t = 300)]
    grpc_calls: usize,
    /// Size of the gRPC server stream.
    #[arg(long, default_value_t = 256)]
    grpc_stream_mib: u64,
    /// Connections one after another per server-greeting and letter-first figure.
    #[arg(long, default_value_t = 1000)]
    stall_connections: usize,
    /// Seconds each wrk run of the keep-alive HTTP workload lasts.
    #[arg(long, default_value_t = 3)]
    wrk_secs: u64,
    /// Size of each upload with `Expect: 100-continue`.
    #[arg(long, default_value_t = 10)]
    upload_mib: u64,
    /// Uploads one after another per figure.
    #[arg(long, default_value_t = 30)]
    uploads: usize,
    /// Sandboxes on one daemon in the "1,000 sandboxes" table.
    #[arg(long, default_value_t = 1000)]
    sandboxes: usize,
    /// Only the "1,000 sandboxes" table (and its targets).
    #[arg(long)]
    only_sandboxes: bool,
}

/// How a client reaches the server.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Way {
    Direct,
    Transparent,
    /// Through the agent's kernel fast path: a `protocol: tcp` endpoint,
    /// each executable's first stream to a destination relayed by the agent
    /// (a one-byte touch before the timed workloads), the rest direct.
    Kernel,
    AgentConnect,
    Squid,
    Tinyproxy,
    Haproxy,
}

impl Way {
    pub const ALL: [Way; 7] =
        [Way::Direct, Way::Transparent, Way::Kernel, Way::AgentConnect, Way::Squid, Way::Tinyproxy, Way::Haproxy];

    pub fn key(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Transparent => "agent_transparent",
            Way::Kernel => "agent_kernel",
            Way::AgentConnect => "agent_connect",
            Way::Squid => "squid_connect",
            Way::Tinyproxy => "tinyproxy_connect",
            Way::Haproxy => "haproxy_tcp",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Transparent => "agent transparent",
            Way::Kernel => "agent kernel fast path",
            Way::AgentConnect => "agent CONNECT",
            Way::Squid => "squid CONNECT",
            Way::Tinyproxy => "tinyproxy CONNECT",
            Way::Haproxy => "haproxy TCP",
        }
    }

    fn column(self) -> Column {
        Column { key: self.key(), title: self.title() }
    }

    fn through_agent(self) -> bool {
        matches!(self, Way::Transparent | Way::Kernel | Way::AgentConnect)
    }
}

/// Server ports inside the namespace. HTTP and idle get one port per way
/// and run: the proxy that closes an upstream connection first keeps its
/// TIME_WAIT for a minute, and distinct ports keep those from exhausting
/// the ephemeral range towards any one server port.
const BULK_PORT: u16 = 5201;
/// The bulk stream of the kernel fast path's `protocol: tcp` endpoint.
const BULK_KERNEL_PORT: u16 = 5202;
const HTTP_PORT_BASE: u16 = 8000;
const IDLE_PORT_BASE: u16 = 9000;
/// The servers from here on close first (TIME_WAIT on their side), so one port each will do.
const KEEPALIVE_PORT: u16 = 7000;
const GREETING_PORT: u16 = 7100;
const ECHO_PORT: u16 = 7101;
/// The same, in the kernel fast path's `protocol: tcp` endpoint.
const GREETING_KERNEL_PORT: u16 = 7102;
const ECHO_KERNEL_PORT: u16 = 7103;
/// The streaming provider inference.local is routed to.
const SSE_PORT: u16 = 7200;
/// Takes uploads with `Expect: 100-continue`.
const UPLOAD_PORT: u16 = 7300;
/// One host and port cannot be both passthrough and inspected: two TLS ports.
const TLS_PORT: u16 = 4430;
const TLS_INSPECTED_PORT: u16 = 4431;
/// The same server behind an MCP endpoint.
const TLS_MCP_PORT: u16 = 4432;
/// gRPC over HTTP/2 and TLS: passthrough, and an inspected endpoint.
const GRPC_PORT: u16 = 4440;
const GRPC_INSPECTED_PORT: u16 = 4441;
/// Enough for the idle workload: client, agent and squid (two per connection), server.
const NOFILE: u64 = 65_536;
/// Idle connections opened and closed before the memory baseline, so lazy
/// start-up allocations are not counted per connection.
const MEMORY_WARMUP: usize = 64;
/// The longest any single client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    crate::require_root("bench")?;
    ensure!(
        args.runs > 0 && args.bulk_mib > 0 && args.requests > 0 && args.concurrent_requests > 0,
        "sizes must be positive"
    );
    ensure!(args.concurrency > 0 && args.idle > 0, "sizes must be positive");
    ensure!(args.runs <= 50, "at most 50 runs (one server port per way and run)");
    ensure!(args.tls_connections > 0 && args.tls_requests > 1, "at least one TLS connection and two requests on each");
    ensure!(args.stall_connections > 0 && args.grpc_calls > 0 && args.grpc_stream_mib > 0, "sizes must be positive");
    ensure!((2..=4096).contains(&args.sandboxes), "--sandboxes: from 2 to 4096");
    ensure!((1..=60).contains(&args.wrk_secs), "--wrk-secs: from 1 to 60");
    ensure!(
        (1..=1024).contains(&args.upload_mib) && args.uploads > 0,
        "--upload-mib: from 1 to 1024; --uploads: at least 1"
    );
    crate::setup::run()?;
    crate::setup::ensure_packages(&proxies::PACKAGES)?;
    proxies::stop_distro_services();
    let agent_bin = crate::build_agent(true)?;
    let peer_bin = build_peer()?;
    // For e2e::detach, which the agent guard calls.
    std::env::set_var("SANDBOX_EGRESS_BIN", &agent_bin);
    let nofile = raise_nofile()?;
    let idle = args.idle.min(idle_capacity(nofile));
    ensure!(idle > 0, "RLIMIT_NOFILE is {nofile}: too low to hold idle connections");
    let idle_note = (idle < args.idle).then(|| {
        format!(
            "RLIMIT_NOFILE cannot exceed {nofile} here (no CAP_SYS_RESOURCE), so a proxy holds at most {idle} idle connections \
             (two sockets each): the memory workload uses {idle}, not {}.",
            args.idle
        )
    });
    if let Some(note) = &idle_note {
        eprintln!("bench: {note}");
    }
    interrupt::install();
    refuse_concurrent_run()?;

    let machine = machine();
    let work = WorkDir::new()?;
    // cargo hard-links its outputs: a copy with one link, an executable the
    // kernel fast path can identify (see README, "The kernel fast path").
    let peer_bin = {
        let copy = work.0.join("bench-peer");
        std::fs::copy(&peer_bin, &copy).with_context(|| format!("copy {}", peer_bin.display()))?;
        copy
    };
    let net = TestNet::new()?;
    let bench = Bench::new(args, Limits { nofile, idle }, agent_bin, peer_bin, &net, &work)?;
    let mut results = Results::default();
    if !args.only_sandboxes {
        bench.throughput_and_latency(&mut results)?;
        bench.tls_requests(&mut results)?;
        bench.mcp_calls(&mut results)?;
        bench.grpc_calls(&mut results)?;
        bench.keepalive(&mut results)?;
        bench.stalls(&mut results)?;
        bench.inference_stream(&mut results)?;
        bench.upload(&mut results)?;
        bench.memory(&mut results)?;
    }
    bench.sandboxes(&mut results)?;
    bench.netns.check_alone()?;
    drop(bench);

    let sizes = Sizes {
        reps: args.runs,
        bulk_mib: args.bulk_mib,
        requests: args.requests,
        concurrent_requests: args.concurrent_requests,
        concurrency: args.concurrency,
        idle,
        idle_note,
        tls_connections: args.tls_connections,
        tls_requests: args.tls_requests,
        wrk_secs: args.wrk_secs,
        stall_connections: args.stall_connections,
        upload_mib: args.upload_mib,
        uploads: args.uploads,
    };
    let header = format!(
        "## Benchmark ({}; Linux {}, {} CPUs, load average {} at the start; {:.0} s in all)",
        machine["date"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["load_average_at_start"].as_str().unwrap_or("?"),
        started.elapsed().as_secs_f64()
    );
    let out_dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let markdown_path = out_dir.join("bench.md");
    let json_path = out_dir.join("bench.json");
    std::fs::write(&markdown_path, report::markdown(&results, &sizes, &header, true))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report::json(&results, &sizes, machine))? + "\n")?;
    println!("\n{}", report::markdown(&results, &sizes, &header, false));
    println!("Every run: {} and {}", markdown_path.display(), json_path.display());
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("not UTF-8: {}", path.display()))
}

fn build_peer() -> Result<PathBuf> {
    crate::status(crate::cargo().args(["build", "--release", "--package", "xtask", "--bin", "bench-peer"]))?;
    Ok(crate::target_dir().join("release/bench-peer"))
}

/// Raises RLIMIT_NOFILE, which children inherit, as far as this process
/// may; returns the limit in force. Without CAP_SYS_RESOURCE (as in some
/// containers) the current hard limit is the ceiling.
fn raise_nofile() -> Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read or write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        }
        let wanted = libc::rlimit { rlim_cur: NOFILE, rlim_max: NOFILE.max(limit.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return Ok(NOFILE);
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit(RLIMIT_NOFILE, {}): {}", limit.rlim_max, std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_max)
}

/// Idle connections a proxy can relay within `nofile` descriptors: two
/// sockets each, with room for warm-up stragglers and for its listeners,
/// maps, logs and runtime.
fn idle_capacity(nofile: u64) -> usize {
    ((nofile.saturating_sub(200) / 2) as usize).saturating_sub(2 * MEMORY_WARMUP)
}

/// The harness names its namespaces se-test-N from 1 in every process and
/// deletes a leftover of the same name: an end-to-end test run beside the
/// bench would replace our namespace and skew or break both.
fn refuse_concurrent_run() -> Result<()> {
    if let Some(name) = test_namespaces()?.first() {
        bail!(
            "network namespace {name} exists: an end-to-end test run seems active (or crashed: `ip netns del {name}`)"
        );
    }
    Ok(())
}

fn test_namespaces() -> Result<Vec<String>> {
    let output = e2e::run("ip", &["netns", "list"])?;
    let names = String::from_utf8_lossy(&output.stdout);
    Ok(names.split_whitespace().filter(|name| name.starts_with("se-test-")).map(str::to_owned).collect())
}

/// Our namespace, to notice a test run that started after us and took it over.
struct Netns {
    name: String,
    inode: u64,
}

impl Netns {
    fn of(net: &TestNet) -> Result<Self> {
        Ok(Self { name: net.netns.clone(), inode: Self::inode(&net.netns)? })
    }

    fn inode(name: &str) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(format!("/run/netns/{name}")).with_context(|| format!("network namespace {name}"))?.ino())
    }

    /// Fails when another run's namespace exists or ours was replaced: its
    /// figures would not be ours.
    fn check_alone(&self) -> Result<()> {
        let others: Vec<String> = test_namespaces()?.into_iter().filter(|name| *name != self.name).collect();
        let replaced = Self::inode(&self.name).map_or(true, |inode| inode != self.inode);
        if replaced || !others.is_empty() {
            bail!("an end-to-end test run started during the bench (namespaces {others:?}, ours replaced: {replaced}): stopping");
        }
        Ok(())
    }
}

fn machine() -> Value {
    let command = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "date": command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "kernel": command("uname", &["-r"]),
        "cpus": thread::available_parallelism().map_or(0, |n| n.get()),
        // Other work on the machine skews every figure: say how busy it was.
        "load_average_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// Configs, logs and pid files of this run; removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("se-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What this machine allows.
struct Limits {
    /// RLIMIT_NOFILE of every process started.
    nofile: u64,
    /// Idle connections to hold: `--idle`, or fewer if `nofile` is short.
    idle: usize,
}

struct Bench<'a> {
    args: &'a Args,
    limits: Limits,
    agent_bin: PathBuf,
    peer_bin: PathBuf,
    work: &'a Path,
    server_ip: Ipv4Addr,
    netns: Netns,
    /// Numbers the agents' log files.
    agents_started: std::cell::Cell<usize>,
    tls_ca: tls::TestCa,
    // Dropped in declaration order: clients are gone by then, the servers
    // go before the namespace, the policy after the agents that read it.
    _server: Client,
    /// Answers tls::NAME with the server's address, for the agent's SNI check.
    dns: e2e::Dns,
    sandbox: Sandbox,
    policy: PolicyFile,
}

impl<'a> Bench<'a> {
    fn new(
        args: &'a Args,
        limits: Limits,
        agent_bin: PathBuf,
        peer_bin: PathBuf,
        net: &TestNet,
        work: &'a WorkDir,
    ) -> Result<Self> {
        let server_ip = net.private_v4;
        let ways = Way::ALL.len() * args.runs;
        let http: Vec<String> = (0..ways).map(|i| format!("0.0.0.0:{}", HTTP_PORT_BASE + i as u16)).collect();
        let idle: Vec<String> = (0..ways).map(|i| format!("0.0.0.0:{}", IDLE_PORT_BASE + i as u16)).collect();
        let tls_ca = tls::TestCa::create(&work.0, server_ip.into())?;
        let any = |port: u16| format!("0.0.0.0:{port}");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.netns]).arg(&peer_bin);
        let bulk = format!("{},{}", any(BULK_PORT), any(BULK_KERNEL_PORT));
        command.args(["serve", "--bulk", &bulk, "--http", &http.join(","), "--idle", &idle.join(",")]);
        command.args([
            "--keepalive",
            &any(KEEPALIVE_PORT),
            "--greeting",
            &format!("{},{}", any(GREETING_PORT), any(GREETING_KERNEL_PORT)),
            "--echo",
            &format!("{},{}", any(ECHO_PORT), any(ECHO_KERNEL_PORT)),
            "--sse",
            &any(SSE_PORT),
            "--upload",
            &any(UPLOAD_PORT),
        ]);
        command.args(["--tls", &format!("{},{},{}", any(TLS_PORT), any(TLS_INSPECTED_PORT), any(TLS_MCP_PORT))]);
        command.args(["--grpc", &format!("{},{}", any(GRPC_PORT), any(GRPC_INSPECTED_PORT))]);
        command.args(["--cert", path_str(&tls_ca.cert)?, "--key", path_str(&tls_ca.key)?]);
        let mut server = Client::spawn(command, "bench servers".into())?;
        server.next_json(e2e::WAIT)?;
        let dns = net.start_dns(&[(tls::NAME, server_ip.into())])?;
        // Plain HTTP through the agent must go to a private address listed
        // in allowed_ips; one endpoint with every port serves all workloads
        // but TLS, whose endpoints are by name (the SNI), one of them inspected.
        // The kernel fast path's ports are in an endpoint of their own, `protocol: tcp`.
        let kernel = Way::ALL.iter().position(|&way| way == Way::Kernel).expect("a way") * args.runs;
        let kernel = (kernel..kernel + args.runs).map(|i| i as u16).collect::<Vec<_>>();
        let ports: Vec<String> = [BULK_PORT, KEEPALIVE_PORT, GREETING_PORT, ECHO_PORT, UPLOAD_PORT]
            .into_iter()
            .chain(
                (0..ways as u16).filter(|i| !kernel.contains(i)).flat_map(|i| [HTTP_PORT_BASE + i, IDLE_PORT_BASE + i]),
            )
            .map(|p| p.to_string())
            .collect();
        let l4_ports: Vec<String> = [BULK_KERNEL_PORT, GREETING_KERNEL_PORT, ECHO_KERNEL_PORT]
            .into_iter()
            .chain(kernel.iter().flat_map(|i| [HTTP_PORT_BASE + i, IDLE_PORT_BASE + i]))
            .map(|p| p.to_string())
            .collect();
        let policy = PolicyFile::new(&format!(
            r#"version: 1
network_policies:
  bench:
    endpoints:
      - host: "{server_ip}"
        ports: [{ports}]
        allowed_ips: ["{server_ip}/32"]
    binaries:
      - path: "/**"
  bench-l4:
    endpoints:
      - host: "{server_ip}"
        ports: [{l4_ports}]
        allowed_ips: ["{server_ip}/32"]
        protocol: tcp
    binaries:
      - path: "/**"
  bench-tls:
    endpoints:
      - host: {name}
        port: {TLS_PORT}
      - host: {name}
        port: {TLS_INSPECTED_PORT}
        protocol: rest
        access: full
        enforcement: enforce
      - host: {name}
        port: {TLS_MCP_PORT}
        protocol: mcp
        enforcement: enforce
        rules:
          - allow: {{ method: tools/call, tool: search }}
      - host: {name}
        port: {GRPC_PORT}
      - host: {name}
        port: {GRPC_INSPECTED_PORT}
        protocol: rest
        enforcement: enforce
        rules:
          - allow: {{ method: POST, path: "/bench.Peer/*" }}
    binaries:
      - path: "/**"
"#,
            ports = ports.join(", "),
            l4_ports = l4_ports.join(", "),
            name = tls::NAME,
        ))?;
        Ok(Self {
            args,
            limits,
            agent_bin,
            peer_bin,
            work: &work.0,
            server_ip,
            netns: Netns::of(net)?,
            agents_started: Default::default(),
            tls_ca,
            _server: server,
            dns,
            sandbox: Sandbox::new("bench")?,
            policy,
        })
    }

    fn bulk_target(&self, way: Way) -> SocketAddr {
        SocketAddr::from((self.server_ip, if way == Way::Kernel { BULK_KERNEL_PORT } else { BULK_PORT }))
    }

    fn http_target(&self, way: Way, run: usize) -> SocketAddr {
        SocketAddr::from((self.server_ip, HTTP_PORT_BASE + self.port_index(way, run)))
    }

    fn idle_target(&self, way: Way, run: usize) -> SocketAddr {
        SocketAddr::from((self.server_ip, IDLE_PORT_BASE + self.port_index(way, run)))
    }

    fn port_index(&self, way: Way, run: usize) -> u16 {
        (Way::ALL.iter().position(|&w| w == way).expect("a way") * self.args.runs + run) as u16
    }

    /// Every server address haproxy forwards to.
    fn haproxy_targets(&self) -> Vec<SocketAddr> {
        let runs = 0..self.args.runs;
        std::iter::once(self.bulk_target(Way::Haproxy))
            .chain(runs.clone().map(|run| self.http_target(Way::Haproxy, run)))
            .chain(runs.map(|run| self.idle_target(Way::Haproxy, run)))
            .collect()
    }

    /// The agents' CA, in the work directory rather than the system's.
    fn ca_dir(&self) -> PathBuf {
        self.work.join("ca")
    }

    fn start_agent(&self, extra_args: &[&str]) -> Result<AgentProcess> {
        let n = self.agents_started.get() + 1;
        self.agents_started.set(n);
        let ca_dir = self.ca_dir();
        AgentProcess::start(
            &self.agent_bin,
            &self.sandbox,
            &self.policy,
            &[&["--ca-dir", path_str(&ca_dir)?], extra_args].concat(),
            &self.work.join(format!("agent-{n}.log")),
        )
    }

    /// Bulk throughput and short-request rate/latency, every way in turn in
    /// each run, against one agent and one instance of each peer.
    fn throughput_and_latency(&self, results: &mut Results) -> Result<()> {
        let mut agent = self.start_agent(&[])?;
        let squid = proxies::squid(self.work, self.limits.nofile)?;
        let tinyproxy = proxies::tinyproxy(self.work, self.args.concurrency * 2)?;
        let haproxy_targets = self.haproxy_targets();
        let (haproxy, haproxy_ports) =
            proxies::haproxy(self.work, &haproxy_targets, self.args.concurrency * 2, HaproxyMode::Tcp)?;
        let routes = Routes {
            agent_port: agent.port,
            squid: squid.port,
            tinyproxy: tinyproxy.port,
            haproxy: haproxy_targets.into_iter().zip(haproxy_ports).collect(),
        };
        let bytes = (self.args.bulk_mib << 20).to_string();
        // Upload and download.
        let relayed_gib = 2.0 * self.args.bulk_mib as f64 / 1024.0;
        let mut cpu = Table::new(
            "bulk_cpu",
            format!("Bulk relay CPU: the bulk stream above, {} MiB each way", self.args.bulk_mib),
            "User plus system CPU time of the proxy's processes and threads (/proc/PID/stat) over the bulk \
             transfer, per GiB relayed (upload and download counted). Direct has no proxy. Packet processing \
             in softirq context may be charged to other processes."
                .into(),
            &Way::ALL[1..].iter().map(|way| way.column()).collect::<Vec<_>>(),
        );
        let cpu_row = Row { key: "cpu_seconds_per_gib", title: "proxy CPU-seconds per GiB relayed", decimals: 2 };
        for run in 0..self.args.runs {
            for way in Way::ALL {
                self.netns.check_alone()?;
                let mut summary = Vec::new();
                let relayed_before = agent.relayed()?;

                let proxy = match way {
                    Way::Direct => None,
                    Way::Transparent | Way::Kernel | Way::AgentConnect => Some(agent.pid()),
                    Way::Squid => Some(squid.pid()),
                    Way::Tinyproxy => Some(tinyproxy.pid()),
                    Way::Haproxy => Some(haproxy.pid()),
                };
                // Connections the agent must have logged relayed: the bulk one and every successful request.
                let mut expected = 1;
                if way == Way::Kernel {
                    // Each destination's first stream, relayed by the agent; the timed ones go direct.
                    for target in [self.bulk_target(way), self.http_target(way, run)] {
                        self.client(way, "touch", &routes.route(way, target), &[])?;
                        expected += 1;
                    }
                }
                let cpu_before = proxy.map(cpu_seconds).transpose()?;
                let out = self.client(way, "bulk", &routes.route(way, self.bulk_target(way)), &["--bytes", &bytes])?;
                for (metric, key) in [(Metric::UploadGbps, "upload_gbps"), (Metric::DownloadGbps, "download_gbps")] {
                    let value = number(&out, key)?;
                    results.add(metric, way, value);
                    summary.push(format!("{} {value:.2} Gbit/s", key.trim_end_matches("_gbps")));
                }
                if let Some((pid, before)) = proxy.zip(cpu_before) {
                    let per_gib = (cpu_seconds(pid)? - before) / relayed_gib;
                    cpu.add(cpu_row, way.column(), per_gib);
                    summary.push(format!("{per_gib:.2} CPU-s/GiB"));
                }

                let target = self.http_target(way, run);
                let host = target.to_string();
                for (count, concurrency, metrics) in [
                    (self.args.requests, 1, [Metric::SequentialP50, Metric::SequentialP99, Metric::SequentialRate]),
                    (
                        self.args.concurrent_requests,
                        self.args.concurrency,
                        [Metric::ConcurrentP50, Metric::ConcurrentP99, Metric::ConcurrentRate],
                    ),
                ] {
                    let (count_arg, concurrency_arg) = (count.to_string(), concurrency.to_string());
                    let out = self.client(
                        way,
                        "http",
                        &routes.route(way, target),
                        &["--host", &host, "--requests", &count_arg, "--concurrency", &concurrency_arg],
                    )?;
                    for (metric, key) in metrics.into_iter().zip(["p50_us", "p99_us", "conn_per_s"]) {
                        results.add(metric, way, number(&out, key)?);
                    }
                    let errors = out["errors"].as_u64().unwrap_or_default();
                    expected += count - errors as usize;
                    if errors > 0 {
                        let first = out["first_error"].as_str().unwrap_or_default();
                        results.add_errors(metrics[2], way, errors, first);
                        summary.push(format!("{errors} failed requests, e.g. {first}"));
                    }
                    summary.push(format!(
                        "{concurrency}-way p50 {:.0} µs p99 {:.0} µs {:.0} conn/s",
                        number(&out, "p50_us")?,
                        number(&out, "p99_us")?,
                        number(&out, "conn_per_s")?
                    ));
                }
                if way.through_agent() {
                    agent.expect_relayed(relayed_before + expected)?;
                }
                eprintln!("bench: run {}/{} {}: {}", run + 1, self.args.runs, way.title(), summary.join("; "));
            }
        }
        drop((squid, tinyproxy, haproxy));
        results.tables.push(cpu);
        Ok(())
    }

    /// Idle connections held through each proxy, a fresh instance per
    /// measurement: RSS with them open minus RSS before, per connection.
    fn memory(&self, results: &mut Results) -> Result<()> {
        // Room for warm-up connections still closing, within what the
        // descriptor limit allows (haproxy refuses to start otherwise).
        let capacity = self.limits.idle + 2 * MEMORY_WARMUP;
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        for run in 0..self.args.runs {
            for way in Way::ALL {
                self.netns.check_alone()?;
                let target = self.idle_target(way, run);
                let (mut proxy, route) = match way {
                    Way::Direct => continue,
                    Way::Transparent | Way::Kernel => (
                        Proxy::Agent(self.start_agent(&[
                            "--max-connections",
                            &capacity.to_string(),
                            "--max-connections-per-sandbox",
                            &capacity.to_string(),
                        ])?),
                        Route { to: target, connect: None },
                    ),
                    Way::AgentConnect => {
                        let agent = self.start_agent(&[
                            "--max-connections",
                            &capacity.to_string(),
                            "--max-connections-per-sandbox",
                            &capacity.to_string(),
                        ])?;
                        let route = Route { to: loopback(agent.port), connect: Some(target) };
                        (Proxy::Agent(agent), route)
                    }
                    Way::Squid | Way::Tinyproxy => {
                        let daemon = if way == Way::Squid {
                            proxies::squid(self.work, self.limits.nofile)?
                        } else {
                            proxies::tinyproxy(self.work, capacity)?
                        };
                        let route = Route { to: loopback(daemon.port), connect: Some(target) };
                        (Proxy::Peer(daemon), route)
                    }
                    Way::Haproxy => {
                        let (daemon, ports) = proxies::haproxy(self.work, &[target], capacity, HaproxyMode::Tcp)?;
                        (Proxy::Peer(daemon), Route { to: loopback(ports[0]), connect: None })
                    }
                };
                results.add(Metric::IdleBytes, way, self.measure_idle(way, proxy.pid(), &route)?);
                if let Proxy::Agent(agent) = &mut proxy {
                    agent.expect_relayed(MEMORY_WARMUP + self.limits.idle)?;
                }
            }
        }
        Ok(())
    }

    /// Warm up, take the baseline, open the idle connections, measure; bytes per connection.
    fn measure_idle(&self, way: Way, pid: u32, route: &Route) -> Result<f64> {
        self.hold_idle(way, route, MEMORY_WARMUP, || Ok(()))?;
        // Let the proxy finish closing the warm-up connections.
        thread::sleep(Duration::from_millis(300));
        let before = rss_bytes(pid)?;
        let mut after = 0;
        let secs = self.hold_idle(way, route, self.limits.idle, || {
            after = rss_bytes(pid)?;
            Ok(())
        })?;
        let per_connection = after.saturating_sub(before) as f64 / self.limits.idle as f64;
        eprintln!(
            "bench: {}: {} idle connections opened in {secs:.1} s; RSS {} -> {} KiB: {:.1} KiB per connection",
            way.title(),
            self.limits.idle,
            before / 1024,
            after / 1024,
            per_connection / 1024.0
        );
        Ok(per_connection)
    }

    /// Opens `count` idle connections, calls `measure` while they are all
    /// open, then closes them; returns how long opening took.
    fn hold_idle(&self, way: Way, route: &Route, count: usize, measure: impl FnOnce() -> Result<()>) -> Result<f64> {
        let mut client = self.spawn_client(way, "idle", route, &["--count", &count.to_string()])?;
        let established = client.next_json(CLIENT_TIMEOUT)?;
        measure()?;
        client.close_stdin();
        client.finish(CLIENT_TIMEOUT)?;
        number(&established, "secs")
    }

    /// Runs one client to completion; its JSON line.
    fn client(&self, way: Way, workload: &str, route: &Route, args: &[&str]) -> Result<Value> {
        let mut client = self.spawn_client(way, workload, route, args)?;
        let out = client.next_json(CLIENT_TIMEOUT)?;
        client.finish(CLIENT_TIMEOUT)?;
        Ok(out)
    }

    fn spawn_client(&self, way: Way, workload: &str, route: &Route, args: &[&str]) -> Result<Client> {
        // Through the agent, the client runs in the sandbox cgroup; every other way outside it.
        let mut command = self.peer_command(way.through_agent());
        command.arg(workload).args(["--to", &route.to.to_string()]);
        if let Some(authority) = route.connect {
            command.args(["--connect", &authority.to_string()]);
        }
        command.args(args);
        Client::spawn(command, format!("{workload} client via {}", way.title()))
    }

    fn peer_command(&self, sandboxed: bool) -> Command {
        if sandboxed {
            self.sandbox.command(&self.peer_bin)
        } else {
            Command::new(&self.peer_bin)
        }
    }

    /// Runs a client of the small tables' workloads to completion; its JSON line.
    fn peer(&self, sandboxed: bool, workload: &str, column: Column, args: &[&str]) -> Result<Value> {
        let mut command = self.peer_command(sandboxed);
        command.arg(workload).args(args);
        let mut client = Client::spawn(command, format!("{workload} client via {}", column.title))?;
        let out = client.next_json(CLIENT_TIMEOUT)?;
        client.finish(CLIENT_TIMEOUT)?;
        Ok(out)
    }
}

/// Where a client connects, and what it asks a CONNECT proxy for.
struct Route {
    to: SocketAddr,
    connect: Option<SocketAddr>,
}

struct Routes {
    agent_port: u16,
    squid: u16,
    tinyproxy: u16,
    /// haproxy's listening port per server address.
    haproxy: std::collections::HashMap<SocketAddr, u16>,
}

impl Routes {
    fn route(&self, way: Way, target: SocketAddr) -> Route {
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        match way {
            // Transparent: the sandboxed client connects to the server; the kernel redirects.
            Way::Direct | Way::Transparent | Way::Kernel => Route { to: target, connect: None },
            Way::AgentConnect => Route { to: loopback(self.agent_port), connect: Some(target) },
            Way::Squid => Route { to: loopback(self.squid), connect: Some(target) },
            Way::Tinyproxy => Route { to: loopback(self.tinyproxy), connect: Some(target) },
            Way::Haproxy => Route { to: loopback(self.haproxy[&target]), connect: None },
        }
    }
}

fn number(value: &Value, key: &str) -> Result<f64> {
    value[key].as_f64().with_context(|| format!("no {key} in {value}"))
}

/// A proxy under the memory measurement.
enum Proxy {
    Agent(AgentProcess),
    Peer(proxies::Daemon),
}

impl Proxy {
    fn pid(&self) -> u32 {
        match self {
            Proxy::Agent(agent) => agent.pid(),
            Proxy::Peer(daemon) => daemon.pid(),
        }
    }
}

/// Ctrl-C and SIGTERM: the clients and daemons get the terminal's SIGINT
/// too; this process notices at its next check and unwinds, so every guard
/// above cleans up (namespace, cgroup, pins, routes, proxies).
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    use anyhow::{bail, Result};

    static INTERRUPTED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }

    pub fn install() {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        }
    }

    pub fn check() -> Result<()> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted: cleaning up");
        }
        Ok(())
    }
}
