//! Responses the agent writes itself to HTTP clients: errors and denials
//! with a JSON body.

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Names the policy that decided, on L7 denials.
pub const POLICY_HEADER: &str = "X-Sandbox-Egress-Policy";

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    /// Machine-readable: `policy_denied`, `ssrf_denied`, `host_mismatch`,
    /// `bad_request`, `upstream_failed`, `upstream_timeout`, `upstream_tls_failed`,
    /// `credential_not_bound`, `credential_unavailable`.
    pub error: &'a str,
    /// What was refused, e.g. `CONNECT h:p not permitted by policy`.
    pub detail: &'a str,
    pub reason: &'a str,
    /// For `ssrf_denied`: the class of the blocked address (loopback, link-local...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_class: Option<&'a str>,
    /// For L7 denials: the policy whose endpoint decided...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'a str>,
    /// ...and its rule (`deny_rules[0]`, `access: read-only`, `3 rules`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
}

impl<'a> ErrorBody<'a> {
    pub fn new(error: &'a str, detail: &'a str, reason: &'a str) -> Self {
        Self { error, detail, reason, address_class: None, policy: None, rule: None }
    }
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
    let _ = client.write_all(&render(status, body, true)).await;
    let _ = client.shutdown().await;
}

/// A 502 for `what` (e.g. `GET h:p`): the upstream could not be reached.
pub async fn upstream_failed<W: AsyncWrite + Unpin>(client: &mut W, what: &str, reason: &str) {
    error(client, 502, &ErrorBody::new("upstream_failed", what, reason)).await;
}

/// A refusal (403, or 502 for a credential) of one request of a keep-alive
/// connection; with `close`, the connection ends after it. Returns whether
/// it was written.
pub async fn refused<W: AsyncWrite + Unpin>(client: &mut W, status: u16, body: &ErrorBody<'_>, close: bool) -> bool {
    let written = client.write_all(&render(status, body, close)).await.is_ok() && client.flush().await.is_ok();
    if close {
        let _ = client.shutdown().await;
    }
    written
}

fn render(status: u16, body: &ErrorBody<'_>, close: bool) -> Vec<u8> {
    let json = serde_json::to_string(body).unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        status_text(status),
        json.len()
    );
    if let Some(policy) = body.policy {
        head.push_str(&format!("{POLICY_HEADER}: {}\r\n", header_safe(policy)));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    response.extend_from_slice(json.as_bytes());
    response
}

/// A policy name is any YAML key: only visible ASCII goes into a header as
/// is, the rest percent-encoded.
fn header_safe(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'%' => "%25".to_owned(),
            0x20..=0x7e => char::from(byte).to_string(),
            byte => format!("%{byte:02X}"),
        })
        .collect()
}

/// The answer to an allowed CONNECT, after which the tunnel starts.
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_names_its_policy_in_a_header_safely() {
        let body = ErrorBody {
            policy: Some("api\r\nX-Evil: 1"),
            rule: Some("rules[0]"),
            ..ErrorBody::new("policy_denied", "d", "r")
        };
        let text = String::from_utf8(render(403, &body, false)).unwrap();
        assert!(text.contains("\r\nX-Sandbox-Egress-Policy: api%0D%0AX-Evil: 1\r\n"), "{text}");
        assert!(!text.contains("Connection: close"), "{text}");
        let json: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["policy"], "api\r\nX-Evil: 1");
        assert_eq!(json["rule"], "rules[0]");
    }
}
