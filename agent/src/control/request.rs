//! The requests the control socket carries, and what answers them.

use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SandboxSpec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    Get {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
    },
    Set {
        provider: String,
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
    },
    Update {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provider: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
    },
    SandboxAdd {
        spec: SandboxSpec,
    },
    SandboxRemove {
        name: String,
        #[serde(default)]
        detach: bool,
        #[serde(default)]
        force: bool,
    },
    SandboxList,
    /// What `exec` needs to start a program in a sandbox: its cgroup and
    /// network namespace, and the agent's CA.
    SandboxGet {
        name: String,
    },
    Status,
    /// The most frequent recent denials, whole (denied requests too): what
    /// `policy suggest` writes allow rules from.
    RecentDenials {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
        /// Only those seen in the last this many seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_seconds: Option<u64>,
    },
    /// Hand over to a new daemon (`binary`, default the running one's
    /// path), then drain for at most `drain_timeout_ms`.
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
        drain_timeout_ms: u64,
    },
}

/// What serves the control socket's requests (the daemon): the reply's
/// fields besides `ok`, or the error.
pub trait Answer: Send + Sync + 'static {
    fn answer(self: Arc<Self>, request: ControlRequest) -> BoxFuture<Result<Value>>;
}

pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let parse = |text: &str| serde_json::from_str::<ControlRequest>(text);
        assert_eq!(parse(r#"{"op":"get"}"#).unwrap(), ControlRequest::Get { sandbox: None });
        assert_eq!(
            parse(r#"{"op":"update","model":"m","sandbox":"web"}"#).unwrap(),
            ControlRequest::Update { provider: None, model: Some("m".into()), sandbox: Some("web".into()) }
        );
        assert_eq!(
            parse(r#"{"op":"sandbox_remove","name":"web"}"#).unwrap(),
            ControlRequest::SandboxRemove { name: "web".into(), detach: false, force: false }
        );
        assert_eq!(
            parse(r#"{"op":"sandbox_get","name":"web"}"#).unwrap(),
            ControlRequest::SandboxGet { name: "web".into() }
        );
        assert!(parse(r#"{"op":"set","provider":"p"}"#).unwrap_err().to_string().contains("model"));
        assert!(parse(r#"{"op":"set","provider":"p","model":"m","extra":1}"#)
            .unwrap_err()
            .to_string()
            .contains("extra"));
        assert!(parse(r#"{"op":"delete"}"#).is_err());
        assert_eq!(
            parse(r#"{"op":"recent_denials","sandbox":"web","since_seconds":600}"#).unwrap(),
            ControlRequest::RecentDenials { sandbox: Some("web".into()), since_seconds: Some(600) }
        );
    }
}
