//! `sandbox-egress inference ...`: reads and changes the running agent's
//! inference route through its control socket (root only).

use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use super::{control_request, ControlRequest, DEFAULT_CONTROL_SOCKET};
use crate::dns::INFERENCE_HOST;

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
        /// The agent's control socket.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Show the current route
    Get {
        /// The agent's control socket.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    /// Change the provider or the model of the route, keeping the other
    Update {
        #[arg(long, required_unless_present = "model")]
        provider: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// The agent's control socket.
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
}

/// Prints the route after the request.
pub fn run(command: InferenceCommand) -> Result<()> {
    let (socket, request) = match command {
        InferenceCommand::Set { provider, model, socket } => (socket, ControlRequest::Set { provider, model }),
        InferenceCommand::Get { socket } => (socket, ControlRequest::Get),
        InferenceCommand::Update { provider, model, socket } => (socket, ControlRequest::Update { provider, model }),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = runtime.block_on(control_request(&socket, &request))?;
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
        let Cli { command: InferenceCommand::Update { provider, model, socket } } =
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
