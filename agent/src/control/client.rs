//! The CLI's end: one request, one reply.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::UnixStream,
    time::timeout,
};

use super::{line::read_line, ControlRequest};

/// Replies list every sandbox: up to 1024 spec files of a few hundred bytes each.
const MAX_REPLY_LINE: usize = 4 * 1024 * 1024;
/// How long the CLI waits for the agent.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request to the agent's control socket; the reply when it says
/// `"ok": true`, its error otherwise.
pub async fn request(path: &Path, request: &ControlRequest) -> Result<Value> {
    request_within(path, request, CLIENT_TIMEOUT).await
}

/// [`request`], waiting up to `within` for the reply.
pub async fn request_within(path: &Path, request: &ControlRequest, within: Duration) -> Result<Value> {
    let shown = path.display();
    let exchange = async {
        let stream = UnixStream::connect(path).await.with_context(|| {
            format!("cannot connect to the agent's control socket {shown} (is the agent running, and are you root?)")
        })?;
        let (read, mut write) = stream.into_split();
        let sent = write.write_all(format!("{}\n", serde_json::to_string(request)?).as_bytes()).await;
        // A refused peer gets its reply at once and the connection closed,
        // possibly before the request was written: the reply still counts.
        match (read_line(&mut BufReader::new(read), MAX_REPLY_LINE).await?, sent) {
            (Some(line), _) => Ok(line),
            (None, Err(error)) => Err(error).context("sending the request failed"),
            (None, Ok(())) => bail!("the agent closed the control connection without a reply"),
        }
    };
    let line = timeout(within, exchange).await.with_context(|| format!("no reply on {shown} within {within:?}"))??;
    let reply: Value = serde_json::from_slice(&line).context("the agent's reply is not JSON")?;
    if reply["ok"] == Value::Bool(true) {
        Ok(reply)
    } else {
        bail!("{}", reply["error"].as_str().unwrap_or("the agent refused the request"))
    }
}
