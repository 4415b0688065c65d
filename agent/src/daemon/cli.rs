//! `sandbox-egress sandbox add|remove|list` and `sandbox-egress status`:
//! the running daemon, through its control socket (root only).

use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use crate::control::{self, ControlRequest, SandboxSpec, DEFAULT_CONTROL_SOCKET};

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// Serve a sandbox: redirect its cgroup to the daemon under its own policy
    Add {
        /// 1 to 64 of A-Z a-z 0-9 . _ -
        name: String,
        /// Its cgroup v2 directory (and every cgroup below it).
        #[arg(long)]
        cgroup: PathBuf,
        /// Its policy file (reloaded on change and on SIGHUP).
        #[arg(long)]
        policy: PathBuf,
        /// Its own network namespace: /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Its inference.local providers and route.
        #[arg(long, value_name = "FILE")]
        inference_config: Option<PathBuf>,
        /// Port of its loopback listener; 0: the daemon's shared listener (with
        /// --netns, one of its own on any free port).
        #[arg(long, default_value_t = 0)]
        listen_port: u16,
        /// Connections of one of its cgroups relayed at once (default: the
        /// daemon's --max-connections-per-sandbox).
        #[arg(long)]
        max_connections: Option<usize>,
        /// The daemon's control socket (`--socket` is an alias).
        #[arg(long = "control-socket", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Stop serving a sandbox; its cgroup stays closed unless --detach
    Remove {
        name: String,
        /// Also remove the redirect: the cgroup's connects go direct again.
        /// Refused while processes remain in the cgroup, unless --force.
        #[arg(long)]
        detach: bool,
        #[arg(long, requires = "detach")]
        force: bool,
        /// The daemon's control socket (`--socket` is an alias).
        #[arg(long = "control-socket", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// The sandboxes served
    List {
        #[arg(long)]
        json: bool,
        /// The daemon's control socket (`--socket` is an alias).
        #[arg(long = "control-socket", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
}

pub fn run(command: SandboxCommand) -> Result<()> {
    let (socket, request, json) = match command {
        SandboxCommand::Add { name, cgroup, policy, netns, inference_config, listen_port, max_connections, socket } => {
            let spec = SandboxSpec { name, cgroup, policy, netns, inference_config, listen_port, max_connections };
            (socket, ControlRequest::SandboxAdd { spec }, false)
        }
        SandboxCommand::Remove { name, detach, force, socket } => {
            (socket, ControlRequest::SandboxRemove { name, detach, force }, false)
        }
        SandboxCommand::List { json, socket } => (socket, ControlRequest::SandboxList, json),
    };
    let reply = ask(&socket, &request)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply["sandboxes"])?);
        return Ok(());
    }
    match request {
        ControlRequest::SandboxAdd { .. } => println!("added: {}", line(&reply["sandbox"])),
        ControlRequest::SandboxRemove { name, detach, .. } => {
            let how = if detach { "its cgroup is detached" } else { "its cgroup stays closed" };
            println!("removed {name}: {how}");
        }
        _ => {
            let sandboxes = reply["sandboxes"].as_array().cloned().unwrap_or_default();
            if sandboxes.is_empty() {
                println!("no sandboxes");
            }
            for sandbox in &sandboxes {
                println!("{}", line(sandbox));
            }
        }
    }
    Ok(())
}

/// `sandbox-egress status [--json]`.
pub fn status(socket: &std::path::Path, json: bool) -> Result<()> {
    let mut reply = ask(socket, &ControlRequest::Status)?;
    if json {
        if let Value::Object(fields) = &mut reply {
            fields.remove("ok");
        }
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!("connections in flight: {} of {}", reply["connections_in_flight"], reply["max_connections"]);
    for sandbox in reply["sandboxes"].as_array().into_iter().flatten() {
        println!("{}", line(sandbox));
    }
    let denials = reply["recent_denials"].as_array().cloned().unwrap_or_default();
    println!("most frequent recent denials:{}", if denials.is_empty() { " none" } else { "" });
    // Hosts, binaries and reasons come from sandboxes: escaped for the terminal.
    let text = |value: &Value, default: &'static str| value.as_str().unwrap_or(default).escape_debug().to_string();
    for denial in &denials {
        println!(
            "  {:>6}  {} {}:{} by {}  ({})",
            denial["count"],
            text(&denial["sandbox"], ""),
            text(&denial["host"], ""),
            denial["port"],
            text(&denial["binary"], "unknown binary"),
            text(&denial["last_reason"], "")
        );
    }
    Ok(())
}

fn ask(socket: &std::path::Path, request: &ControlRequest) -> Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(control::request(socket, request))
}

fn line(sandbox: &Value) -> String {
    let text = |key: &str| sandbox[key].as_str().unwrap_or("-").to_owned();
    format!(
        "{} cgroup={} netns={} port={} policy={} generation={} active={}",
        text("name"),
        text("cgroup"),
        text("netns"),
        sandbox["listen_port"],
        text("policy"),
        sandbox["policy_generation"],
        sandbox["connections_active"]
    )
}
