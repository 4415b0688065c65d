//! Refusals in one place: a reset for TLS and opaque clients, and the
//! responses the agent writes itself to HTTP/1 clients (errors and denials
//! with a JSON body).

use serde::Serialize;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{ledger::CloseLog, verdict::Denial};

/// Names the policy that decided, on L7 denials.
pub const POLICY_HEADER: &str = "X-Sandbox-Egress-Policy";

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    /// Machine-readable: `policy_denied`, `ssrf_denied`, `host_mismatch`,
    /// `bad_request`, `upstream_failed`, `upstream_timeout`, `upstream_tls_failed`,
    /// `credential_not_bound`, `credential_unavailable`, `upstream_http1_only`,
    /// `grpc_needs_http2`.
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

    /// As a JSON response with `status`, naming the policy in a header.
    pub fn response(&self, status: u16) -> Response {
        let mut headers = vec![("Content-Type", "application/json".to_owned())];
        if let Some(policy) = self.policy {
            headers.push((POLICY_HEADER, header_safe(policy)));
        }
        Response { status, headers, body: serde_json::to_vec(self).unwrap_or_default() }
    }
}

/// A response the agent writes itself: the HTTP/1 writer here adds the
/// framing (Content-Length, Connection); an L7 room fills it in its own
/// protocol's terms.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
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
    let _ = client.write_all(&render(&body.response(status), true)).await;
    let _ = client.shutdown().await;
}

/// A 502 for `what` (e.g. `GET h:p`): the upstream could not be reached.
pub async fn upstream_failed<W: AsyncWrite + Unpin>(client: &mut W, what: &str, reason: &str) {
    error(client, 502, &ErrorBody::new("upstream_failed", what, reason)).await;
}

/// A refusal (403, or 502 for a credential) of one request of a keep-alive
/// connection; with `close`, the connection ends after it. Returns whether
/// it was written.
pub async fn refused<W: AsyncWrite + Unpin>(client: &mut W, response: &Response, close: bool) -> bool {
    let written = client.write_all(&render(response, close)).await.is_ok() && client.flush().await.is_ok();
    if close {
        let _ = client.shutdown().await;
    }
    written
}

fn render(response: &Response, close: bool) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", response.status, status_text(response.status));
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&response.body);
    bytes
}

/// A policy name is any YAML key: only visible ASCII goes into a header as
/// is, the rest percent-encoded.
pub fn header_safe(value: &str) -> String {
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

/// A 400 for a request the agent cannot parse, logged as a denial.
pub async fn bad_request<W: AsyncWrite + Unpin>(mut client: W, log: &mut CloseLog, reason: String) {
    log.verdict = "denied";
    log.denial = Some("bad_request");
    let body = ErrorBody::new("bad_request", "malformed HTTP request", &reason);
    error(&mut client, 400, &body).await;
    log.reason = Some(reason);
}

/// A 403 with the decision's reason; `what` is e.g. `CONNECT h:p` or `GET h:p`.
pub async fn deny_http<W: AsyncWrite + Unpin>(mut client: W, what: &str, denial: &Denial) {
    let detail = format!("{what} not permitted by policy");
    let body =
        ErrorBody { address_class: denial.address_class, ..ErrorBody::new(denial.kind, &detail, &denial.reason) };
    error(&mut client, 403, &body).await;
}

/// Closes with a reset: a TLS or opaque client gets no readable answer, and
/// a RST tells it at once that the connection was refused.
pub fn reset(client: TcpStream) {
    // Deprecated because a non-zero linger blocks on drop; zero resets at once.
    #[allow(deprecated)]
    let _ = client.set_linger(Some(std::time::Duration::ZERO));
}

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
        let text = String::from_utf8(render(&body.response(403), false)).unwrap();
        assert!(text.contains("\r\nX-Sandbox-Egress-Policy: api%0D%0AX-Evil: 1\r\n"), "{text}");
        assert!(!text.contains("Connection: close"), "{text}");
        let json: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["policy"], "api\r\nX-Evil: 1");
        assert_eq!(json["rule"], "rules[0]");
    }
}
