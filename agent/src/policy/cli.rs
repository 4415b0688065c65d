//! `sandbox-egress policy ...`: policy files checked and tried out offline.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Result;

use super::{Decision, Policy, Request};

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file
    Check { file: PathBuf },
    /// Evaluate one connection against a policy file, offline
    ///
    /// Prints the decision as JSON, then one readable line. The exit status
    /// is 0 whenever the evaluation ran, allowed or denied.
    Eval {
        file: PathBuf,
        /// Destination host name (SNI or HTTP Host).
        #[arg(long, required_unless_present = "ip")]
        host: Option<String>,
        #[arg(long)]
        port: u16,
        /// Executable of the connecting process.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Executable of an ancestor process, nearest first (repeatable).
        #[arg(long = "ancestor", value_name = "PATH")]
        ancestors: Vec<PathBuf>,
        /// Destination address.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// A name the sandbox resolved to --ip through the agent's DNS
        /// (repeatable, most recent first): decides a stream without a host
        /// of its own (opaque, silent, TLS without SNI) as the agent does.
        #[arg(long = "resolved", value_name = "NAME", requires = "ip", conflicts_with = "host")]
        resolved: Vec<String>,
    },
}

/// Prints the summary or the decision on stdout; load warnings go to the log.
pub fn run(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Check { file } => {
            let policy = Policy::from_file(&file)?;
            print!("{}: ok\n{}", file.display(), policy.summary());
        }
        PolicyCommand::Eval { file, host, port, binary, ancestors, ip, resolved } => {
            let policy = Policy::from_file(&file)?;
            let request = Request {
                host: host.as_deref(),
                ip,
                port,
                binary: binary.as_deref(),
                ancestors: &ancestors,
                uid: 0,
                cgroup_id: 0,
            };
            let (decision, resolved_host) = if resolved.is_empty() {
                (policy.evaluate(&request)?, None)
            } else {
                policy.evaluate_resolved(&request, &resolved)?
            };
            let output = Output { resolved_host: resolved_host.as_deref(), decision: &decision };
            println!("{}", serde_json::to_string_pretty(&output)?);
            let request = Request { host: resolved_host.as_deref().or(request.host), ..request };
            println!("{}", describe(&decision, &request));
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Output<'a> {
    /// The resolved name that allowed the stream, as the agent logs it in `host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved_host: Option<&'a str>,
    #[serde(flatten)]
    decision: &'a Decision,
}

fn describe(decision: &Decision, request: &Request) -> String {
    let destination = match (request.host, request.ip) {
        (Some(host), Some(ip)) => format!("{host}:{} ({ip})", request.port),
        (Some(host), None) => format!("{host}:{}", request.port),
        (None, Some(IpAddr::V6(ip))) => format!("[{ip}]:{}", request.port),
        (None, Some(ip)) => format!("{ip}:{}", request.port),
        (None, None) => format!("?:{}", request.port),
    };
    let process = request.binary.map_or_else(|| "(unknown)".into(), Path::to_string_lossy);
    let policy = decision.policy.as_deref().unwrap_or_default();
    let reason = decision.reason.as_deref().unwrap_or_default();
    if decision.allow {
        let entry = decision.matched_binary.as_deref().unwrap_or_default();
        let exe = decision.matched_exe.as_deref().unwrap_or_default();
        format!("allow: {process} -> {destination} by policy '{policy}', binary entry '{entry}' matched {exe}")
    } else {
        format!("deny: {process} -> {destination}: {reason}")
    }
}
