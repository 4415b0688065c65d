//! `sandbox-egress upgrade`: asks the running daemon to hand over to a new
//! binary; prints the new daemon's pid once it serves.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};

use super::DEFAULT_DRAIN_TIMEOUT;
use crate::control::{self, ControlRequest, DEFAULT_CONTROL_SOCKET};

/// How long the command waits for the answer: the new daemon's start
/// (its eBPF attach, sandbox by sandbox) is bounded by the old daemon.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// The running daemon's control socket.
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// The binary to run (default: the running daemon's own path, as it
    /// was started).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// How long the old daemon's connections may run on once the new one
    /// serves; then the rest are reset (e.g. 30s, 10m, 1h).
    #[arg(long, default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

pub fn run(args: UpgradeArgs) -> Result<()> {
    let binary = match args.binary {
        // The daemon runs elsewhere: a relative path means the caller's directory.
        Some(binary) => Some(std::path::absolute(&binary).with_context(|| format!("--binary {}", binary.display()))?),
        None => None,
    };
    let request = ControlRequest::Upgrade {
        binary,
        drain_timeout_ms: u64::try_from(args.drain_timeout.as_millis()).unwrap_or(u64::MAX),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = runtime.block_on(control::request_within(&args.control_socket, &request, ANSWER_TIMEOUT))?;
    let pid = reply["pid"].as_u64().context("the daemon's answer has no pid")?;
    println!("{pid}");
    tracing::info!(
        "upgraded: pid {pid} serves; pid {} drains its connections (at most {})",
        reply["previous_pid"],
        humantime::format_duration(args.drain_timeout)
    );
    Ok(())
}
