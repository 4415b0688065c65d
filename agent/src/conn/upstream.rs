//! Connections the agent makes to the destinations it allowed.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{context::Context, ledger::CloseLog};

/// Connects within `--connect-timeout`; on failure the close record says
/// why and `None` comes back.
pub async fn connect_upstream(upstream: SocketAddr, context: &Context, log: &mut CloseLog) -> Option<TcpStream> {
    let timeout = context.config.connect_timeout;
    let reason = match tokio::time::timeout(timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            return Some(stream);
        }
        Ok(Err(error)) => format!("connect to {upstream} failed: {error}"),
        Err(_) => format!("connect to {upstream} timed out after {timeout:?}"),
    };
    log.upstream_failed(reason);
    None
}
