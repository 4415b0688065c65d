//! sandbox-egress: transparent egress proxy for sandbox cgroups.

use std::{num::NonZeroUsize, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sandbox_egress::{
    cli, conn, control, credentials, daemon, dns, exec, inference, logging, observe, preflight, proxy, redirect, sniff,
    tls, upgrade,
};

#[derive(Parser)]
#[command(name = "sandbox-egress", version, about = "Transparent egress proxy for sandbox cgroups")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve sandboxes: redirect every TCP connect and DNS query of their
    /// cgroups to this agent and relay them under each one's policy.
    Run(Box<RunArgs>),
    /// Add, remove or list the sandboxes of the running daemon.
    #[command(subcommand)]
    Sandbox(daemon::cli::SandboxCommand),
    /// The running daemon's sandboxes, connections in flight and most
    /// frequent recent denials.
    Status {
        #[arg(long)]
        json: bool,
        /// The daemon's control socket (`--socket` is an alias).
        #[arg(long = "control-socket", visible_alias = "socket", value_name = "PATH", default_value = control::DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Show or change the inference.local route of the running agent.
    #[command(subcommand)]
    Inference(inference::cli::InferenceCommand),
    /// Validate or try out a policy file offline, or suggest rules from the
    /// running daemon's recent denials.
    #[command(subcommand)]
    Policy(cli::policy::PolicyCommand),
    /// Credentials kept out of the sandbox: the placeholders it holds instead.
    #[command(subcommand)]
    Credentials(credentials::cli::CredentialsCommand),
    /// Run a program in a sandbox: in its cgroup and network namespace, as a
    /// user, with only unix, inet, inet6 and netlink sockets, trusting the
    /// agent's CA.
    Exec(exec::ExecArgs),
    /// The agent's certificate authority, and the trust bundle and Java
    /// truststore of sandboxed programs.
    #[command(subcommand)]
    Ca(tls::cli::CaCommand),
    /// Hand the running daemon's sockets and state to a new binary without
    /// refusing a connect; the old daemon then drains. Prints the new pid.
    Upgrade(upgrade::cli::UpgradeArgs),
    /// Remove the agent's programs from a cgroup (its connects go direct again).
    Detach {
        /// The sandbox's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// One sandbox served from the start (named by --name): its cgroup v2
    /// directory. Without it (and --sandboxes) the daemon starts empty.
    #[arg(long, requires = "policy")]
    cgroup: Option<PathBuf>,
    /// The --cgroup sandbox's policy file (OpenShell schema; see policies/).
    /// Reloaded on SIGHUP and on change.
    #[arg(long, requires = "cgroup")]
    policy: Option<PathBuf>,
    /// Name of the --cgroup sandbox.
    #[arg(long, default_value = "default", requires = "cgroup")]
    name: String,
    /// The --cgroup sandbox's network namespace, if it has its own
    /// (/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, requires = "cgroup")]
    netns: Option<PathBuf>,
    /// Port of the --cgroup sandbox's loopback listener; 0: the daemon's
    /// shared listener on any free port (with --netns, one of its own).
    #[arg(long, default_value_t = 15001)]
    listen_port: u16,
    /// A directory of sandbox specs (one YAML file each, see README):
    /// loaded at start and followed (files added, changed, removed).
    #[arg(long, value_name = "DIR")]
    sandboxes: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default).
    /// Never reachable from a sandbox.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// DNS server the agent asks when it checks host names, and forwards the
    /// sandbox's queries to (default: /etc/resolv.conf).
    #[arg(long, value_name = "IP:PORT")]
    dns_server: Option<std::net::SocketAddr>,
    /// DNS queries of all sandboxes forwarded at once; beyond this they get REFUSED.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    dns_max_in_flight: u32,
    /// DNS queries of one sandbox (cgroup) forwarded at once; beyond this they get REFUSED.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    dns_max_in_flight_per_sandbox: u32,
    /// DNS queries one sandbox may send per second, in bursts of as many;
    /// beyond this they get REFUSED.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    dns_queries_per_second: u32,
    /// Least time an answer the sandbox got is kept for deciding its
    /// connections by name, whatever its TTL (a TTL of 0 must still cover
    /// the connect after the lookup).
    #[arg(long, default_value_t = 5, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..))]
    dns_record_min_ttl: u32,
    /// Most time an answer is kept; longer TTLs in the answers to the
    /// sandbox are lowered to this.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..))]
    dns_record_max_ttl: u32,
    /// Connections relayed at once; beyond this new connections are refused.
    /// Default: 4096, or fewer when the open-file limit cannot be raised to
    /// cover them (about 6 descriptors each).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections relayed at once for one sandbox: the attached cgroup or
    /// any cgroup below it (each counts apart); beyond this they are refused.
    #[arg(long, default_value_t = 1024)]
    max_connections_per_sandbox: usize,
    /// Time allowed to connect to the original destination.
    #[arg(long, value_parser = parse_millis, default_value = "10000", value_name = "MS")]
    connect_timeout: Duration,
    /// The --cgroup sandbox's providers and route of inference.local (see
    /// README); without it, inference.local is refused.
    #[arg(long, value_name = "FILE", requires = "cgroup")]
    inference_config: Option<PathBuf>,
    /// Credential providers (YAML, see README "Credentials"): endpoints with
    /// `credential_binding` get their secrets, which the sandbox never holds.
    /// Read at start-up; secret files are read again on every use.
    #[arg(long, value_name = "FILE")]
    credentials: Option<PathBuf>,
    /// Control socket for `sandbox-egress sandbox|status|inference` (root only, 0600).
    #[arg(long, visible_alias = "socket", value_name = "PATH", default_value = control::DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// Where the agent's CA lives (created on first run): it signs the
    /// certificates of inference.local and of TLS-terminated (L7) endpoints.
    #[arg(long, default_value = tls::DEFAULT_CA_DIR)]
    ca_dir: PathBuf,
    /// Certificates for TLS-terminated (L7) endpoints kept at once, by name;
    /// past this the least recently used is dropped (and made anew if needed).
    #[arg(long, default_value = "1024", value_name = "N")]
    leaf_cache_size: NonZeroUsize,
    /// PEM bundle of CA certificates trusted, besides the system's, when the
    /// agent connects over TLS to the origin of a TLS-terminated (L7) endpoint.
    #[arg(long, value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// A relayed connection with no byte either way for this long is closed.
    #[arg(long, value_parser = parse_millis, default_value = "3600000", value_name = "MS")]
    idle_timeout: Duration,
    /// Silence longer than this makes a stream "server speaks first" (SSH, SMTP...)
    /// where the address alone does not decide it; a ClientHello or request head
    /// that stops for longer than this is refused.
    #[arg(long, value_parser = parse_millis, default_value = "300", value_name = "MS")]
    first_byte_timeout: Duration,
    /// Time for a whole TLS ClientHello or HTTP request head, from its first byte.
    #[arg(long, value_parser = parse_millis, default_value = "10000", value_name = "MS")]
    head_timeout: Duration,
    /// An abstract unix socket name sandboxes may connect or send to (with or
    /// without the leading `@`); repeatable. Every other abstract name is refused.
    #[arg(long, value_name = "NAME")]
    allow_abstract_unix: Vec<String>,
    /// Level of the eBPF programs' own traces (redirect decisions are `debug`).
    #[arg(long, value_enum, default_value_t = redirect::EbpfLogLevel::Info)]
    ebpf_log_level: redirect::EbpfLogLevel,
    /// On SIGTERM/SIGINT, how long the connections in flight may run on
    /// once the daemon stops accepting; then the rest are reset (e.g. 30s, 10m).
    #[arg(long, default_value = upgrade::DEFAULT_DRAIN_TIMEOUT, value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Sandboxes served at once; a `sandbox add` (or spec file) beyond it is refused.
    #[arg(long, default_value_t = daemon::DEFAULT_MAX_SANDBOXES, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(agent_common::SANDBOXES_MAX_ENTRIES)))]
    max_sandboxes: u32,
}

/// About 6 descriptors per relayed connection (two sockets, two pipes
/// while data flows), and some for the agent itself.
const FDS_PER_CONNECTION: u64 = 6;
const FDS_OF_THE_AGENT: u64 = 1024;
const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Raises the open-file limit for `--max-connections` and returns the
/// number to use: the flag's, with a warning if the limit cannot cover it;
/// without the flag, 4096 or as many as the limit covers (logged).
fn connection_budget(asked: Option<usize>) -> Result<usize> {
    anyhow::ensure!(asked != Some(0), "--max-connections must be at least 1");
    let wanted = asked.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let needed = wanted as u64 * FDS_PER_CONNECTION + FDS_OF_THE_AGENT;
    let open_files = preflight::raise_fd_limit(needed)?;
    if open_files >= needed {
        return Ok(wanted);
    }
    let covered = (open_files.saturating_sub(FDS_OF_THE_AGENT) / FDS_PER_CONNECTION).max(1) as usize;
    match asked {
        Some(asked) => tracing::warn!(
            open_files,
            max_connections = asked,
            "the open-file limit ({open_files}) covers about {covered} connections, fewer than --max-connections \
             {asked}: raise the hard limit (LimitNOFILE=, ulimit -Hn) or lower --max-connections"
        ),
        None => tracing::info!(
            open_files,
            max_connections = covered,
            "--max-connections defaults to {covered}, what the open-file limit ({open_files}) covers"
        ),
    }
    Ok(asked.unwrap_or(covered))
}

fn parse_millis(value: &str) -> Result<Duration, String> {
    value.parse::<u64>().map(Duration::from_millis).map_err(|e| format!("expected milliseconds: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let outcome = match cli.command {
        Command::Run(args) => run(*args),
        Command::Sandbox(command) => daemon::cli::run(command),
        Command::Status { json, socket } => daemon::cli::status(&socket, json),
        Command::Policy(command) => cli::policy::run(command),
        Command::Credentials(command) => credentials::cli::run(command),
        Command::Inference(command) => inference::cli::run(command),
        Command::Exec(args) => exec::run(args),
        Command::Ca(command) => tls::cli::run(command),
        Command::Upgrade(args) => upgrade::cli::run(args),
        Command::Detach { cgroup } => detach(&cgroup),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            error.downcast_ref::<exec::CannotRun>().map_or(ExitCode::FAILURE, |cannot| cannot.exit_code().into())
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    preflight::require_root("run")?;
    // Started by `upgrade`: the running daemon's sockets and state, before anything binds.
    let handed = upgrade::Predecessor::receive().context("taking over from the running daemon")?;
    let shorthand = match (&args.cgroup, &args.policy) {
        (Some(cgroup), Some(policy)) => Some(control::SandboxSpec {
            name: args.name.clone(),
            cgroup: cgroup.clone(),
            policy: policy.clone(),
            netns: args.netns.clone(),
            inference_config: args.inference_config.clone(),
            listen_port: args.listen_port,
            max_connections: None,
        }),
        _ => None,
    };
    if let Some(spec) = &shorthand {
        spec.check_name().context("--name")?;
    }
    let max_connections = connection_budget(args.max_connections)?;
    let credentials = match &args.credentials {
        None => credentials::Credentials::default(),
        Some(path) => {
            // Secrets live in this process's memory: no core dump may hold
            // them (it also keeps other users' ptrace and /proc/PID/mem out).
            nix::sys::prctl::set_dumpable(false).context("prctl(PR_SET_DUMPABLE, 0)")?;
            credentials::Credentials::load(path)?
        }
    };
    let credential_providers = credentials.provider_names().map(str::to_owned).collect();
    let ca = tls::AgentCa::load_or_create(&args.ca_dir)?;
    let ca_cert_pem = ca.cert_pem().to_owned();
    let inference_tls = ca.acceptor(dns::INFERENCE_HOST)?;
    let leaf_certs = tls::LeafCache::new(ca, args.leaf_cache_size)?;
    let upstream_tls = tls::UpstreamTls::new(tls::system_roots(), args.upstream_ca.as_deref(), args.connect_timeout)
        .context("--upstream-ca")?;
    anyhow::ensure!(
        args.dns_record_min_ttl <= args.dns_record_max_ttl,
        "--dns-record-min-ttl ({}) exceeds --dns-record-max-ttl ({})",
        args.dns_record_min_ttl,
        args.dns_record_max_ttl
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let limits = dns::DnsLimits {
            max_in_flight: args.dns_max_in_flight as usize,
            max_in_flight_per_sandbox: args.dns_max_in_flight_per_sandbox as usize,
            queries_per_second: args.dns_queries_per_second,
        };
        let records = dns::RecordLimits {
            min_ttl: Duration::from_secs(args.dns_record_min_ttl.into()),
            max_ttl: Duration::from_secs(args.dns_record_max_ttl.into()),
            per_sandbox: dns::RECORDS_PER_SANDBOX,
        };
        let resolver = Arc::new(dns::Resolver::new(args.dns_server, records.max_ttl)?);
        let records = Arc::new(dns::DnsRecords::new(records));
        let dns = Arc::new(dns::DnsResponder::new(resolver.clone(), records.clone(), limits));
        preflight::ensure_bpffs()?;
        preflight::ensure_tracefs()?;
        let config = conn::Config {
            max_connections,
            max_connections_per_sandbox: args.max_connections_per_sandbox,
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            sniff: sniff::Limits { first_byte_timeout: args.first_byte_timeout, head_timeout: args.head_timeout },
            leaf_certs,
            upstream_tls,
        };
        let common = proxy::Common {
            config: Arc::new(config),
            stats: Arc::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            dns,
            records,
            resolver,
            credentials: Arc::new(credentials),
            observer: Arc::new(observe::Observer::default()),
        };
        let observer = common.observer.clone();
        let options = daemon::Options {
            kernel: redirect::KernelOptions {
                log_level: args.ebpf_log_level,
                abstract_unix: args.allow_abstract_unix.clone(),
            },
            max_sandboxes: args.max_sandboxes as usize,
            credential_providers,
            inference_tls,
            ca_cert_pem,
            binary: std::env::current_exe().context("this daemon's binary")?,
            args: std::env::args_os().skip(1).collect(),
        };
        let daemon = Arc::new(daemon::Daemon::new(common, options)?);
        let (predecessor, inventory, mut sockets) = match handed {
            Some((predecessor, inventory, sockets)) => (Some(predecessor), Some(inventory), sockets),
            None => (None, None, upgrade::HandedSockets::default()),
        };
        let metrics = match args.metrics_listen {
            Some(address) => {
                let gauges_of = daemon.clone();
                let gauges: observe::Gauges = Arc::new(move || gauges_of.gauges());
                let server = observe::serve_metrics(address, observer, gauges, sockets.metrics.take()).await?;
                daemon.hand_over_also(upgrade::SocketRole::Metrics, server.socket().try_clone_to_owned()?);
                Some(server)
            }
            None => None,
        };
        let control = daemon.serve_control(&args.control_socket, sockets.control.take()).await?;
        // A daemon taking over owns the file only once it has.
        let mut control_socket = RemovedOnExit { path: args.control_socket.clone(), armed: predecessor.is_none() };
        // Installed before "ready": a signal right after it must not kill the agent.
        let shutdown_signal = shutdown_signal()?;
        if let Some(inventory) = inventory {
            daemon.take_over(inventory, sockets.shared, sockets.sandboxes)?;
        }
        if let Some(spec) = shorthand.filter(|spec| !daemon.serves(&spec.name)) {
            daemon.add(spec)?;
        }
        if let Some(dir) = &args.sandboxes {
            daemon::follow_dir(daemon.clone(), dir.clone()).await?;
        }
        let upgraded_from = predecessor.as_ref().map(|predecessor| predecessor.pid);
        if let Some(predecessor) = predecessor {
            take_over(&daemon, predecessor).await?;
            control_socket.armed = true;
        } else {
            notify_systemd(&[sd_notify::NotifyState::Ready]);
        }
        daemon.log_fast_closes();
        tracing::info!(
            event = "ready",
            sandboxes = daemon.list().len(),
            listen_port = daemon.common_listen_port(),
            control_socket = %args.control_socket.display(),
            upgraded_from,
            "agent ready"
        );
        let drain = tokio::select! {
            () = shutdown_signal => {
                notify_systemd(&[sd_notify::NotifyState::Stopping]);
                args.drain_timeout
            }
            drain = daemon.handed_over() => {
                // The new daemon owns the control socket's file now.
                control_socket.armed = false;
                if let Some(metrics) = &metrics {
                    metrics.stop();
                }
                control.stop(CONTROL_STOP_WAIT).await;
                drain
            }
        };
        daemon.shutdown(drain).await;
        Ok(())
    })
}

/// How long a daemon that handed over waits for the control clients it is
/// answering (the `upgrade` that asked reads its reply).
const CONTROL_STOP_WAIT: Duration = Duration::from_secs(10);

/// The new daemon's last steps of an upgrade: ready (the old one sends what
/// it recorded meanwhile), systemd told this is the main process now, and
/// the old one told it may drain.
async fn take_over(daemon: &Arc<daemon::Daemon>, predecessor: upgrade::Predecessor) -> Result<()> {
    let (predecessor, state) = tokio::task::spawn_blocking(move || {
        let state = predecessor.ready();
        (predecessor, state)
    })
    .await?;
    daemon.take_final_state(state.context("the running daemon's final state")?);
    notify_systemd(&[sd_notify::NotifyState::MainPid(std::process::id()), sd_notify::NotifyState::Ready]);
    predecessor.taken_over()
}

/// Tells systemd (Type=notify, NotifyAccess=all) when `NOTIFY_SOCKET` is set.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(false, state) {
        tracing::warn!("cannot notify systemd: {error}");
    }
}

/// The control socket's file, removed when the agent stops (or fails to
/// start) while it is this daemon's.
struct RemovedOnExit {
    path: PathBuf,
    armed: bool,
}

impl Drop for RemovedOnExit {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

fn detach(cgroup: &std::path::Path) -> Result<()> {
    preflight::require_root("detach")?;
    let cgroup = preflight::cgroup_v2_dir(cgroup)?;
    preflight::ensure_bpffs()?;
    if redirect::detach(&cgroup)? {
        tracing::info!(cgroup = %cgroup.path.display(), "detached: the cgroup's connects are no longer redirected");
    } else {
        tracing::info!(cgroup = %cgroup.path.display(), "nothing attached to this cgroup");
    }
    Ok(())
}
