//! One sandbox as every route and room sees it: how to decide, which
//! credentials to apply, the limits, and where its metrics go. What only the
//! proxy needs (listeners, kernel records, connection counts) stays there.

use std::sync::Arc;

use tokio::sync::watch;

use super::{config::Config, decide::Decider};
use crate::{credentials::Credentials, observe::SandboxMetrics};

pub struct Context {
    pub config: Arc<Config>,
    pub decider: Decider,
    /// Empty when the agent runs without `--credentials`.
    pub credentials: Arc<Credentials>,
    pub observed: Arc<SandboxMetrics>,
    /// Turns true when the agent stops serving the sandbox: connections
    /// that hold many requests (HTTP/2) say GOAWAY then.
    pub stopping: watch::Receiver<bool>,
}
