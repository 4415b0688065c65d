//! `sandbox-egress exec --sandbox NAME [--user U] -- CMD [ARGS...]`: runs a
//! program in a sandbox the daemon serves, closed where no cgroup hook
//! reaches, and trusting the agent's CA in every common runtime.
//!
//! In order, in this process, then `execve` (so CMD's exit status and
//! signals are exec's): ask the daemon for the sandbox (control socket); make
//! the trust files; enter the sandbox's network namespace (checked against
//! the one its listener is in); join its cgroup, so every socket the program
//! creates is covered; drop to the user with its groups; set no_new_privs;
//! install the socket-family filter (`seccomp`); set the trust variables.
//! Any failure before `execve` runs nothing.
//!
//! - `user`: USER or UID[:GID] to credentials;
//! - `seccomp`: the filter refusing every socket family but unix, inet,
//!   inet6 and netlink;
//! - `trust_files`: the bundle and truststore the variables point at.

mod seccomp;
mod trust_files;
mod user;

use std::{
    ffi::OsString,
    fmt,
    fs::OpenOptions,
    io::Write,
    os::{
        fd::{AsFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use serde_json::Value;

pub use self::trust_files::DEFAULT_TRUST_DIR;
use self::{trust_files::TrustFiles, user::TargetUser};
use crate::{
    control::{self, ControlRequest, DEFAULT_CONTROL_SOCKET},
    proxy, tls,
};

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The sandbox to run in, by name (`sandbox-egress sandbox list`).
    #[arg(long)]
    sandbox: String,
    /// Run as this user (a name from the passwd database, or a number) with
    /// its groups, or as UID:GID (no passwd entry needed; GID as its only
    /// group). Default: the caller, root, who can leave the sandbox.
    #[arg(long, value_name = "USER|UID[:GID]")]
    user: Option<String>,
    /// The daemon's control socket (its `run --control-socket`).
    #[arg(long, visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// Leave the TLS trust variables as they are: no bundle, no truststore.
    #[arg(long)]
    no_ca_env: bool,
    /// Where the bundle and truststore are written, one directory per agent
    /// CA below it (root's, readable by everyone).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_TRUST_DIR)]
    trust_dir: PathBuf,
    /// A PEM file of the roots trusted besides the agent's CA. Default: the
    /// system's (SSL_CERT_FILE or SSL_CERT_DIR when set, else the
    /// distribution's store).
    #[arg(long, value_name = "FILE")]
    system_roots: Option<PathBuf>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// The variables that name a PEM bundle of trusted roots, one runtime or tool each.
const BUNDLE_VARIABLES: [&str; 7] = [
    "SSL_CERT_FILE",       // OpenSSL (and Python's ssl, Ruby, ...), Go
    "REQUESTS_CA_BUNDLE",  // Python requests
    "CURL_CA_BUNDLE",      // curl
    "NODE_EXTRA_CA_CERTS", // Node.js (added to its own roots)
    "GIT_SSL_CAINFO",      // git
    "PIP_CERT",            // pip
    "AWS_CA_BUNDLE",       // AWS CLI and SDKs
];

/// CMD could not be executed: exits 127 when it was not found, else 126, as shells do.
#[derive(Debug)]
pub struct CannotRun {
    program: OsString,
    error: std::io::Error,
}

impl CannotRun {
    pub fn exit_code(&self) -> u8 {
        if self.error.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        }
    }
}

impl fmt::Display for CannotRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot run {}: {}", self.program.to_string_lossy(), self.error)
    }
}

impl std::error::Error for CannotRun {}

/// What the daemon says of the sandbox.
struct SandboxInfo {
    cgroup: PathBuf,
    netns: Option<PathBuf>,
    netns_cookie: u64,
    agent_ca: String,
}

/// Returns only on failure: on success this process is CMD.
pub fn run(args: ExecArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`sandbox-egress exec` must run as root: it joins the sandbox's cgroup and network namespace and uses \
             the daemon's control socket"
        );
    }
    let user = args.user.as_deref().map(TargetUser::resolve).transpose()?;
    if user.is_none() {
        tracing::warn!("exec without --user runs CMD as root, who can leave the sandbox: give --user");
    }
    let info = ask_daemon(&args.control_socket, &args.sandbox)?;
    let trust = if args.no_ca_env {
        None
    } else {
        let roots = tls::load_system_roots(args.system_roots.as_deref())?;
        let bundle = tls::TrustBundle::new(&roots, &info.agent_ca)?;
        Some(TrustFiles::ensure(&args.trust_dir, &bundle)?)
    };
    let filter = seccomp::socket_family_filter()?;
    let mut command = Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    if let Some(user) = &user {
        command.envs(user.login_variables());
    }
    if let Some(trust) = &trust {
        command.envs(trust.variables(std::env::var_os("JAVA_TOOL_OPTIONS")));
    }

    let procs = OpenOptions::new()
        .write(true)
        .open(info.cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", info.cgroup.display()))?;
    enter_network_namespace(&args.sandbox, info.netns.as_deref(), info.netns_cookie)?;
    // From here on every socket this process (and so CMD) creates is the sandbox's.
    (&procs).write_all(b"0\n").with_context(|| format!("join the cgroup {}", info.cgroup.display()))?;
    drop(procs);
    if let Some(user) = &user {
        user.become_it()?;
    }
    nix::sys::prctl::set_no_new_privs().context("prctl(PR_SET_NO_NEW_PRIVS)")?;
    seccompiler::apply_filter(&filter).context("install the socket-family filter (seccomp)")?;
    let error = command.exec();
    Err(CannotRun { program: args.command[0].clone(), error }.into())
}

fn ask_daemon(socket: &Path, name: &str) -> Result<SandboxInfo> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = runtime.block_on(control::request(socket, &ControlRequest::SandboxGet { name: name.to_owned() }))?;
    drop(runtime);
    let sandbox = &reply["sandbox"];
    let path = |value: &Value| value.as_str().map(PathBuf::from);
    Ok(SandboxInfo {
        cgroup: path(&sandbox["cgroup"]).context("the daemon's reply names no cgroup")?,
        netns: path(&sandbox["netns"]),
        netns_cookie: reply["netns_cookie"].as_u64().context("the daemon's reply has no netns_cookie")?,
        agent_ca: reply["agent_ca"].as_str().context("the daemon's reply has no agent_ca")?.to_owned(),
    })
}

/// Enters `netns` (when the sandbox has one), then checks that this process
/// is in the namespace of the sandbox's listener: a `/proc/PID/ns/net` whose
/// process is gone may name another namespace by now, and a caller in
/// another namespace than the daemon's would have every connect refused.
fn enter_network_namespace(sandbox: &str, netns: Option<&Path>, expected_cookie: u64) -> Result<()> {
    if let Some(netns) = netns {
        let file =
            std::fs::File::open(netns).with_context(|| format!("open the network namespace {}", netns.display()))?;
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("enter the network namespace {}", netns.display()))?;
    }
    // SAFETY: socket() returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("a socket to read the network namespace's cookie");
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let probe = unsafe { OwnedFd::from_raw_fd(fd) };
    if proxy::netns_cookie(&probe)? != expected_cookie {
        match netns {
            Some(netns) => bail!(
                "{} is no longer the network namespace sandbox {sandbox}'s listener is in (was its process \
                 replaced?): register the sandbox again",
                netns.display()
            ),
            None => bail!(
                "sandbox {sandbox} is served in the daemon's network namespace, and this process is in another: run \
                 exec in the daemon's network namespace"
            ),
        }
    }
    Ok(())
}
