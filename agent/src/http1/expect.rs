//! `Expect: 100-continue` (RFC 9110 §10.1.1): a client that sends it waits
//! for a `100 Continue` before it sends the request body, so whoever reads
//! that body must say "continue" first.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{has_element, has_request_body, request::RequestHead};

/// The interim response the agent sends itself (no Via: it forwards nothing).
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Whether the client waits for a `100 Continue` before sending the body
/// of `head`: an HTTP/1.1 request (HTTP/1.0 ones must be ignored) with the
/// 100-continue expectation and a body.
pub fn waits_for_continue(head: &RequestHead) -> bool {
    head.version == 1 && has_element(&head.headers, "expect", "100-continue") && has_request_body(head)
}

/// Sends the `100 Continue` a client waits for before a body the agent is
/// about to read itself (inference.local rewrites it; a body-aware rule
/// decides on it). Call it once the head alone has been allowed: a request
/// the head refuses gets its refusal instead, and its body is never sent.
/// Writes nothing when the client waits for no 100; returns the bytes written.
pub async fn continue_before_reading<W: AsyncWrite + Unpin>(client: &mut W, head: &RequestHead) -> io::Result<u64> {
    if !waits_for_continue(head) {
        return Ok(0);
    }
    client.write_all(CONTINUE).await?;
    client.flush().await?;
    Ok(CONTINUE.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http1::parse_request_head, wire::Parse};

    fn request(raw: &str) -> RequestHead {
        match parse_request_head(raw.as_bytes()) {
            Parse::Done(head) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn continue_goes_out_only_to_a_client_that_waits_for_it() {
        for (raw, waits) in [
            ("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", true),
            ("PUT / HTTP/1.1\r\nHost: a\r\nEXPECT: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n", true),
            ("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", false),
            // No body to wait for.
            ("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n", false),
            ("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", false),
            // RFC 9110 §10.1.1: ignored in HTTP/1.0.
            ("PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", false),
        ] {
            let head = request(raw);
            assert_eq!(waits_for_continue(&head), waits, "{raw:?}");
            let mut client = Vec::new();
            let written = continue_before_reading(&mut client, &head).await.unwrap();
            let expected: &[u8] = if waits { CONTINUE } else { b"" };
            assert_eq!((client.as_slice(), written), (expected, expected.len() as u64), "{raw:?}");
        }
    }
}
