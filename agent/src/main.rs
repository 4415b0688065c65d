//! sandbox-egress: transparent egress proxy for sandbox cgroups.

use std::{num::NonZeroUsize, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sandbox_egress::{credentials, dns, inference, logging, policy, preflight, proxy, redirect, sniff, tls};

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
    /// Redirect every TCP connect of a cgroup v2 to this agent and relay it.
    Run(RunArgs),
    /// Show or change the inference.local route of the running agent.
    #[command(subcommand)]
    Inference(inference::cli::InferenceCommand),
    /// Validate or try out a policy file offline.
    #[command(subcommand)]
    Policy(policy::cli::PolicyCommand),
    /// Credentials kept out of the sandbox: the placeholders it holds instead.
    #[command(subcommand)]
    Credentials(credentials::cli::CredentialsCommand),
    /// The agent's certificate authority, which sandboxes trust for inference.local.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Remove the agent's programs from a cgroup (its connects go direct again).
    Detach {
        /// The sandbox's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM) for sandbox trust stores, creating the CA on first use.
    Export {
        #[arg(long, default_value = tls::DEFAULT_CA_DIR)]
        ca_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The sandbox's cgroup v2 directory.
    #[arg(long)]
    cgroup: PathBuf,
    /// Network policy file (OpenShell schema; see policies/). Reloaded on SIGHUP and on change.
    #[arg(long)]
    policy: PathBuf,
    /// Port of the loopback listener connects are redirected to (0: any free port).
    #[arg(long, default_value_t = 15001)]
    listen_port: u16,
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
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Connections relayed at once for one sandbox: the attached cgroup or
    /// any cgroup below it (each counts apart); beyond this they are refused.
    #[arg(long, default_value_t = 1024)]
    max_connections_per_sandbox: usize,
    /// Time allowed to connect to the original destination.
    #[arg(long, value_parser = parse_millis, default_value = "10000", value_name = "MS")]
    connect_timeout: Duration,
    /// Providers and route of inference.local (see README); without it, inference.local is refused.
    #[arg(long, value_name = "FILE")]
    inference_config: Option<PathBuf>,
    /// Credential providers (YAML, see README "Credentials"): endpoints with
    /// `credential_binding` get their secrets, which the sandbox never holds.
    /// Read at start-up; secret files are read again on every use.
    #[arg(long, value_name = "FILE")]
    credentials: Option<PathBuf>,
    /// Control socket for `sandbox-egress inference set|get|update` (root only, 0600).
    #[arg(long, default_value = inference::DEFAULT_CONTROL_SOCKET)]
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
}

fn parse_millis(value: &str) -> Result<Duration, String> {
    value.parse::<u64>().map(Duration::from_millis).map_err(|e| format!("expected milliseconds: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let outcome = match cli.command {
        Command::Run(args) => run(args),
        Command::Policy(command) => policy::cli::run(command),
        Command::Credentials(command) => credentials::cli::run(command),
        Command::Inference(command) => inference::cli::run(command),
        Command::Ca(CaCommand::Export { ca_dir }) => export_ca(&ca_dir),
        Command::Detach { cgroup } => detach(&cgroup),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    preflight::require_root("run")?;
    let cgroup = preflight::cgroup_v2_dir(&args.cgroup)?;
    let open_files = preflight::raise_fd_limit()?;
    if (open_files as usize) < args.max_connections * 6 {
        tracing::warn!(
            open_files,
            max_connections = args.max_connections,
            "the open-file limit may not cover --max-connections (about 6 fds each while relaying)"
        );
    }
    let credentials = match &args.credentials {
        None => credentials::Credentials::default(),
        Some(path) => {
            // Secrets live in this process's memory: no core dump may hold
            // them (it also keeps other users' ptrace and /proc/PID/mem out).
            nix::sys::prctl::set_dumpable(false).context("prctl(PR_SET_DUMPABLE, 0)")?;
            credentials::Credentials::load(path)?
        }
    };
    let providers = credentials.provider_names().map(str::to_owned).collect();
    let policies = proxy::PolicyStore::load(&args.policy, providers)?;
    let ca = tls::AgentCa::load_or_create(&args.ca_dir)?;
    let inference = match &args.inference_config {
        None => None,
        Some(path) => Some(proxy::InferenceRoute {
            inference: std::sync::Arc::new(inference::Inference::load(path)?),
            tls: ca.acceptor(dns::INFERENCE_HOST)?,
        }),
    };
    let leaf_certs = tls::LeafCache::new(ca, args.leaf_cache_size)?;
    let upstream_tls = tls::UpstreamTls::new(tls::system_roots(), args.upstream_ca.as_deref(), args.connect_timeout)
        .context("--upstream-ca")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Bind before touching the cgroup, so a taken port fails without side effects.
        let listeners = proxy::Listeners::bind(args.listen_port).await?;
        let limits = dns::DnsLimits {
            max_in_flight: args.dns_max_in_flight as usize,
            max_in_flight_per_sandbox: args.dns_max_in_flight_per_sandbox as usize,
            queries_per_second: args.dns_queries_per_second,
        };
        anyhow::ensure!(
            args.dns_record_min_ttl <= args.dns_record_max_ttl,
            "--dns-record-min-ttl ({}) exceeds --dns-record-max-ttl ({})",
            args.dns_record_min_ttl,
            args.dns_record_max_ttl
        );
        let records = dns::RecordLimits {
            min_ttl: Duration::from_secs(args.dns_record_min_ttl.into()),
            max_ttl: Duration::from_secs(args.dns_record_max_ttl.into()),
            per_sandbox: dns::RECORDS_PER_SANDBOX,
        };
        let dns = std::sync::Arc::new(dns::DnsResponder::new(args.dns_server, policies.clone(), limits, records)?);
        preflight::ensure_bpffs()?;
        preflight::ensure_tracefs()?;
        let redirect =
            redirect::Redirect::attach(&cgroup, listeners.port(), args.ebpf_log_level, &args.allow_abstract_unix)?;
        let config = proxy::Config {
            listen_port: listeners.port(),
            max_connections: args.max_connections,
            max_connections_per_sandbox: args.max_connections_per_sandbox,
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            sniff: sniff::Limits { first_byte_timeout: args.first_byte_timeout, head_timeout: args.head_timeout },
            leaf_certs,
            upstream_tls,
        };
        if let Some(route) = &inference {
            let control = route.inference.clone();
            let socket = args.control_socket.clone();
            tokio::spawn(async move {
                if let Err(error) = control.serve_control(&socket).await {
                    tracing::error!("inference control socket {}: {error:#}", socket.display());
                }
            });
        }
        let parts = proxy::Parts { redirect, config, policies, dns, inference, credentials };
        proxy::serve(listeners, parts, &cgroup).await
    })
}

fn export_ca(ca_dir: &std::path::Path) -> Result<()> {
    preflight::require_root("ca export")?;
    print!("{}", tls::AgentCa::load_or_create(ca_dir)?.cert_pem());
    Ok(())
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
