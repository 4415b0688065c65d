//! What inference.local answers when the agent itself refuses or fails a
//! request. One shape everywhere, in responses and in SSE error events:
//!
//! ```json
//! {"error":{"type":"no_route","message":"..."}}
//! ```
//!
//! It is the shape of OpenAI's errors, and close to Anthropic's, so SDKs
//! of both show the message.

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::http1::linger;

/// The command that configures a route, for the 503 hint.
pub const SET_ROUTE_HINT: &str = "sandbox-egress inference set --provider NAME --model MODEL";

#[derive(Serialize)]
struct ErrorDocument<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

pub fn error_json(kind: &str, message: &str) -> String {
    serde_json::to_string(&ErrorDocument { error: ErrorDetail { kind, message } }).unwrap_or_default()
}

/// A request the agent answers itself, ending the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// Machine-readable, the `type` of the error document.
    pub kind: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { status, kind, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(400, "bad_request", message)
    }

    pub fn no_route() -> Refusal {
        Refusal::new(
            503,
            "no_route",
            format!("no inference route is configured; an administrator sets one with `{SET_ROUTE_HINT}`"),
        )
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        413 => "Content Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes the refusal as a complete `Connection: close` response, then
/// closes the write side and drains what the client still sends, bounded.
/// Returns the bytes written. Write failures are not worth reporting: the
/// connection ends either way.
pub async fn write_refusal<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, refusal: &Refusal) -> u64 {
    let json = error_json(refusal.kind, &refusal.message);
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        refusal.status,
        status_text(refusal.status),
        json.len()
    );
    if client.write_all(response.as_bytes()).await.is_err() || client.shutdown().await.is_err() {
        return 0;
    }
    linger(client).await;
    response.len() as u64
}

/// The event that ends a relayed event stream the provider failed to finish.
pub fn sse_error_event(kind: &str, message: &str) -> Vec<u8> {
    format!("event: error\ndata: {}\n\n", error_json(kind, message)).into_bytes()
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt};

    use super::*;

    #[test]
    fn error_documents_have_one_shape() {
        assert_eq!(error_json("no_route", "say \"hi\""), r#"{"error":{"type":"no_route","message":"say \"hi\""}}"#);
        assert_eq!(
            sse_error_event("stream_idle_timeout", "x"),
            b"event: error\ndata: {\"error\":{\"type\":\"stream_idle_timeout\",\"message\":\"x\"}}\n\n"
        );
        assert!(Refusal::no_route().message.contains(SET_ROUTE_HINT));
    }

    #[tokio::test]
    async fn refusal_is_a_complete_closing_response() {
        let (mut client, mut server) = duplex(4096);
        let written =
            tokio::spawn(
                async move { write_refusal(&mut server, &Refusal::new(413, "request_too_large", "big")).await },
            );
        let mut received = String::new();
        client.read_to_string(&mut received).await.unwrap();
        drop(client);
        let body = r#"{"error":{"type":"request_too_large","message":"big"}}"#;
        assert_eq!(
            received,
            format!(
                "HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        );
        assert_eq!(written.await.unwrap(), received.len() as u64);
    }
}
