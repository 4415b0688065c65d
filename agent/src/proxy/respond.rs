//! Error responses the agent writes itself to HTTP clients, then closes.

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    /// Machine-readable: `policy_denied`, `ssrf_denied`, `host_mismatch`, `bad_request`, `upstream_failed`.
    pub error: &'a str,
    /// What was refused, e.g. `CONNECT h:p not permitted by policy`.
    pub detail: &'a str,
    pub reason: &'a str,
    /// For `ssrf_denied`: the class of the blocked address (loopback, link-local...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_class: Option<&'a str>,
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes a complete `Connection: close` response with a JSON body. Failure to
/// write is not worth reporting: the client is being turned away anyway.
pub async fn error<W: AsyncWrite + Unpin>(client: &mut W, status: u16, body: &ErrorBody<'_>) {
    let json = serde_json::to_string(body).unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        status_text(status),
        json.len()
    );
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

/// The answer to an allowed CONNECT, after which the tunnel starts.
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";
