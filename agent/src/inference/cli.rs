//! `sandbox-egress inference ...`: reads and changes the running agent's
//! inference route through its control socket (root only).

use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use crate::{
    control::{self, ControlRequest, DEFAULT_CONTROL_SOCKET},
    dns::INFERENCE_HOST,
};

#[derive(clap::Subcommand)]
pub enum InferenceCommand {
    /// Route inference.local to a provider and model
    Set {
        /// A provider named in the agent's inference config.
        #[arg(long)]
        provider: String,
        /// The model every request is sent with.
        #[arg(long)]
        model: String,
        /// The daemon's control socket (`--socket` is an alias).
        #[arg(long = "control-socket", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// The sandbox whose route it is; needed only when more than one
        /// sandbox has an inference config.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Show the current route
    Get {
        /// The daemon's control socket (`--socket` is an alias).
        #[arg(long = "control-socket", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// The sandbox whose route it is; needed only when more than one
        /// sandbox has an inference config.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Change the provider or the model of the route, keeping the other
    Update {
        #[arg(long, required_unless_present = "model")]
        provider: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// The daemon's control socket (`--socket` is an alias).
        #[arg(long = "control-socket", visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// The sandbox whose route it is; needed only when more than one
        /// sandbox has an inference config.
        #[arg(long)]
        sandbox: Option<String>,
    },
}

/// Prints the route after the request.
pub fn run(command: InferenceCommand) -> Result<()> {
    let (socket, request) = match command {
        InferenceCommand::Set { provider, model, socket, sandbox } => {
            (socket, ControlRequest::Set { provider, model, sandbox })
        }
        InferenceCommand::Get { socket, sandbox } => (socket, ControlRequest::Get { sandbox }),
        InferenceCommand::Update { provider, model, socket, sandbox } => {
            (socket, ControlRequest::Update { provider, model, sandbox })
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = runtime.block_on(control::request(&socket, &request))?;
    println!("{}", describe(&reply));
    Ok(())
}

fn describe(reply: &Value) -> String {
    let providers: Vec<&str> = reply["providers"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let route = match (reply["route"]["provider"].as_str(), reply["route"]["model"].as_str()) {
        (Some(provider), Some(model)) => format!("{INFERENCE_HOST} -> provider {provider}, model {model}"),
        _ => format!("{INFERENCE_HOST}: no route (requests get 503); set one with: {}", super::respond::SET_ROUTE_HINT),
    };
    format!("{route}\nproviders: {}", providers.join(", "))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: InferenceCommand,
    }

    #[test]
    fn update_needs_a_provider_or_a_model() {
        assert!(Cli::try_parse_from(["x", "update"]).is_err());
        let Cli { command: InferenceCommand::Update { provider, model, socket, sandbox: None } } =
            Cli::try_parse_from(["x", "update", "--model", "m"]).unwrap()
        else {
            panic!("not an update");
        };
        assert_eq!((provider, model, socket), (None, Some("m".into()), PathBuf::from(DEFAULT_CONTROL_SOCKET)));
        assert!(Cli::try_parse_from(["x", "set", "--provider", "p"]).is_err(), "set needs both");
    }

    #[test]
    fn routes_are_described() {
        let routed = json!({"ok": true, "route": {"provider": "openai", "model": "gpt-4o"}, "providers": ["anthropic", "openai"]});
        assert_eq!(describe(&routed), "inference.local -> provider openai, model gpt-4o\nproviders: anthropic, openai");
        let unrouted = json!({"ok": true, "route": null, "providers": ["openai"]});
        assert!(describe(&unrouted).contains("inference set --provider NAME --model MODEL"));
    }
}
