//! Heads rewritten for the next hop, and the response side of one exchange.

use std::{io, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    time::{timeout_at, Instant},
};

use super::request::RequestHead;
use super::{
    body::{copy_body, BodyLimits},
    expect::CONTINUE,
    field_values, has_element, list_elements,
    reader::HeadReader,
    response::ResponseHead,
    response_framing, BodyFraming, Fields,
};

/// Fields about one connection rather than the message (RFC 9110 §7.6.1),
/// and proxy credentials meant for us, not the origin (§11.7). Upgrade is
/// hop-by-hop too, but kept for a protocol switch. Trailer is end-to-end and
/// stays: the trailer section is forwarded as received. Transfer-Encoding
/// stays too: bodies are forwarded undecoded.
const HOP_BY_HOP: [&str; 6] =
    ["connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te"];

/// Fields kept even when named in Connection: dropping them would change
/// where the next hop ends the message, or which host it serves.
const NEVER_DROPPED: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// Whether the client asks to switch protocols (RFC 9110 §7.8): Upgrade plus
/// the "upgrade" connection option, in HTTP/1.1 (servers ignore Upgrade in
/// HTTP/1.0 requests).
pub fn is_upgrade_request(head: &RequestHead) -> bool {
    head.version == 1
        && field_values(&head.headers, "upgrade").next().is_some()
        && has_element(&head.headers, "connection", "upgrade")
}

/// Whether the connection ends after this message (RFC 9112 §9.3): the
/// "close" option, or HTTP/1.0 without the "keep-alive" option.
pub fn wants_close(version: u8, headers: &[(String, Vec<u8>)]) -> bool {
    has_element(headers, "connection", "close") || (version == 0 && !has_element(headers, "connection", "keep-alive"))
}

/// `head` as sent to the origin server: the target in origin-form if
/// `origin_form` (an absolute-form target is meant for proxies), hop-by-hop
/// fields dropped (Upgrade kept on an upgrade request), this hop's own
/// connection options, and `Via: 1.x <via>` appended to any received Via.
/// `via` must be a token (it is written as is).
pub fn forward_request_head(head: &RequestHead, origin_form: bool, via: &str) -> Vec<u8> {
    let target = if origin_form { head.origin_form_target() } else { head.target.clone() };
    let mut out = Vec::with_capacity(head.head_len + via.len() + 32);
    for part in [head.method.as_bytes(), b" ", target.as_bytes(), b" ", http_version(head.version), b"\r\n"] {
        out.extend_from_slice(part);
    }
    let close = wants_close(head.version, &head.headers);
    push_fields(&mut out, head.version, &head.headers, is_upgrade_request(head), close, via);
    out
}

/// `head` as sent to the client, rewritten like [`forward_request_head`];
/// Upgrade is kept on a 101 only. `close`: the proxy ends the connection
/// after this response, whatever the server said.
pub fn forward_response_head(head: &ResponseHead, close: bool, via: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.head_len + via.len() + 32);
    let status = format!("{:03}", head.status);
    // RFC 9112 §4: the space before the reason is required even without one.
    for part in [http_version(head.version), b" ", status.as_bytes(), b" ", head.reason.as_bytes(), b"\r\n"] {
        out.extend_from_slice(part);
    }
    push_fields(&mut out, head.version, &head.headers, head.status == 101, close, via);
    out
}

fn http_version(minor: u8) -> &'static [u8] {
    if minor == 0 {
        b"HTTP/1.0"
    } else {
        b"HTTP/1.1"
    }
}

/// The field lines and the blank line ending a forwarded head.
fn push_fields(out: &mut Vec<u8>, version: u8, fields: &Fields, keep_upgrade: bool, close: bool, via: &str) {
    let connection_options: Vec<&[u8]> = list_elements(fields, "connection").collect();
    let is_hop_by_hop = |name: &str| {
        if name.eq_ignore_ascii_case("upgrade") {
            return !keep_upgrade;
        }
        let named = |list: &[&str]| list.iter().any(|listed| listed.eq_ignore_ascii_case(name));
        let in_connection = connection_options.iter().any(|option| option.eq_ignore_ascii_case(name.as_bytes()));
        !named(&NEVER_DROPPED) && (named(&HOP_BY_HOP) || in_connection)
    };
    let mut via_list: Vec<&[u8]> = Vec::new();
    for (name, value) in fields {
        if name.eq_ignore_ascii_case("via") {
            via_list.push(value);
        } else if !is_hop_by_hop(name) {
            push_field(out, name.as_bytes(), value);
        }
    }
    // The received Connection is replaced by this hop's own options (RFC 9110
    // §7.6.1): "close" so the next hop does not wait for a message that will
    // not come, "keep-alive" because HTTP/1.0 persists only with it (RFC 9112
    // §9.3), "upgrade" to keep a protocol switch meaningful.
    let options: Vec<&[u8]> =
        [(close, &b"close"[..]), (version == 0 && !close, b"keep-alive"), (keep_upgrade, b"upgrade")]
            .into_iter()
            .filter_map(|(wanted, option)| wanted.then_some(option))
            .collect();
    if !options.is_empty() {
        push_field(out, b"Connection", &options.join(&b", "[..]));
    }
    // RFC 9110 §7.6.3: the protocol this hop received, then its name, after
    // the earlier hops'.
    let own_via = [&http_version(version)[b"HTTP/".len()..], b" ", via.as_bytes()].concat();
    via_list.push(&own_via);
    push_field(out, b"Via", &via_list.join(&b", "[..]));
    out.extend_from_slice(b"\r\n");
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for part in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(part);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ResponseLimits {
    /// Per response head, counted from when it is awaited: covers the
    /// server's time to answer.
    pub head_timeout: Duration,
    pub body: BodyLimits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseOutcome {
    /// A 101 was forwarded: relay raw bytes both ways from now on, starting
    /// with the bytes both readers hold ([`HeadReader::into_parts`]).
    SwitchingProtocols {
        /// Bytes of the heads written to the client, interim ones included.
        head_bytes: u64,
        /// The 101 as the server sent it (its negotiated extensions).
        response: Box<ResponseHead>,
    },
    /// A final response was forwarded whole.
    Complete {
        status: u16,
        /// The connection must end: the request or the response asked, or
        /// the body ended at close.
        close: bool,
        /// Bytes of the heads written to the client, interim ones included.
        head_bytes: u64,
        /// Body bytes forwarded, chunk framing included.
        body_bytes: u64,
    },
}

/// Forwards the responses to `request` from `upstream` to `client`:
/// interim 1xx responses as they arrive, then the final response or a 101.
///
/// `continue_at`: when the client waits for a `100 Continue` before sending
/// the body, the time to send it one of our own unless the server has sent
/// its 100 (or its final response) by then; the server's 100 after ours is
/// not relayed.
///
/// A 101 answering a request that asked for no upgrade is `InvalidData`: the
/// raw relaying that follows a switch escapes per-request policy, so only a
/// switch the client asked for, and the policy saw, is honoured.
pub(super) async fn forward_responses<U, C>(
    upstream: &mut HeadReader<U>,
    client: &mut C,
    request: &RequestHead,
    via: &str,
    limits: &ResponseLimits,
    mut continue_at: Option<Instant>,
) -> io::Result<ResponseOutcome>
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    let mut head_bytes = 0u64;
    let mut sent_own_continue = false;
    loop {
        let next = upstream.read_response_head(limits.head_timeout);
        let response = match continue_at {
            // Cancelling the read loses nothing: the bytes read stay buffered.
            Some(deadline) => match timeout_at(deadline, next).await {
                Ok(response) => response?,
                Err(_elapsed) => {
                    client.write_all(CONTINUE).await?;
                    client.flush().await?;
                    head_bytes += CONTINUE.len() as u64;
                    (continue_at, sent_own_continue) = (None, true);
                    continue;
                }
            },
            None => next.await?,
        };
        match response.status {
            101 if !is_upgrade_request(request) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "101 Switching Protocols to a request that asked for no upgrade",
                ))
            }
            101 => {
                head_bytes += write_head(client, &response, false, via).await?;
                client.flush().await?;
                return Ok(ResponseOutcome::SwitchingProtocols { head_bytes, response: Box::new(response) });
            }
            // The client already has the one it waited for.
            100 if sent_own_continue => {}
            // RFC 9110 §15.2: a proxy forwards 1xx responses, except to an
            // HTTP/1.0 client, which knows none.
            100..=199 => {
                if response.status == 100 {
                    continue_at = None;
                }
                if request.version == 1 {
                    head_bytes += write_head(client, &response, false, via).await?;
                    client.flush().await?;
                }
            }
            status => {
                let framing = response_framing(&request.method, &response);
                let close = framing == BodyFraming::UntilClose
                    || wants_close(response.version, &response.headers)
                    || wants_close(request.version, &request.headers);
                head_bytes += write_head(client, &response, close, via).await?;
                // Flushes the head too, with the first piece of the body.
                let body_bytes = copy_body(upstream, client, framing, &limits.body).await?;
                return Ok(ResponseOutcome::Complete { status, close, head_bytes, body_bytes });
            }
        }
    }
}

/// Writes the forwarded `response` head, unflushed; returns its length.
async fn write_head<C: AsyncWrite + Unpin>(
    client: &mut C,
    response: &ResponseHead,
    close: bool,
    via: &str,
) -> io::Result<u64> {
    let head = forward_response_head(response, close, via);
    client.write_all(&head).await?;
    Ok(head.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::{
        super::{response::parse_response_head, testing::Trickle},
        *,
    };
    use crate::{http1::parse_request_head, wire::Parse};

    const PATIENT: ResponseLimits = ResponseLimits {
        head_timeout: Duration::from_secs(10),
        body: BodyLimits { max_body: None, idle: Duration::from_secs(10) },
    };

    fn request(raw: &str) -> RequestHead {
        match parse_request_head(raw.as_bytes()) {
            Parse::Done(head) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn response(raw: &str) -> ResponseHead {
        match parse_response_head(raw.as_bytes()) {
            Parse::Done(head) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn hop_by_hop_fields_and_those_named_in_connection_are_dropped() {
        let head = request(
            "GET / HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic c2VjcmV0\r\nTE: trailers\r\n\
             Upgrade: h2c\r\nX-Secret: s\r\nx-secret: t\r\nTrailer: Expires\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(
            text(forward_request_head(&head, true, "egress")),
            "GET / HTTP/1.1\r\nHost: a.example\r\nTrailer: Expires\r\nAccept: */*\r\nVia: 1.1 egress\r\n\r\n"
        );
        let head = response(
            "HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: 1\r\nProxy-Authenticate: Basic\r\n\
             Upgrade: h2c\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            text(forward_response_head(&head, false, "egress")),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVia: 1.1 egress\r\n\r\n"
        );
    }

    #[test]
    fn framing_and_host_survive_being_named_in_connection() {
        let head = request(
            "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nConnection: Host, Content-Length, Transfer-Encoding\r\n\r\n",
        );
        assert_eq!(
            text(forward_request_head(&head, true, "egress")),
            "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nVia: 1.1 egress\r\n\r\n"
        );
        let head = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n\r\n");
        assert!(text(forward_response_head(&head, false, "egress")).contains("\r\nTransfer-Encoding: chunked\r\n"));
    }

    #[test]
    fn upgrade_is_kept_only_for_a_protocol_switch() {
        let websocket = "GET /chat HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade, X-A\r\n\
                         X-A: 1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let head = request(websocket);
        assert!(is_upgrade_request(&head));
        assert_eq!(
            text(forward_request_head(&head, true, "egress")),
            "GET /chat HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Connection: upgrade\r\nVia: 1.1 egress\r\n\r\n"
        );
        // Without the connection option, or in HTTP/1.0, Upgrade means nothing.
        for raw in [
            "GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade, keep-alive\r\n\r\n",
        ] {
            let head = request(raw);
            assert!(!is_upgrade_request(&head), "{raw:?}");
            let forwarded = text(forward_request_head(&head, true, "egress"));
            assert!(!forwarded.to_ascii_lowercase().contains("upgrade"), "{forwarded:?}");
        }

        let switching =
            response("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
        assert_eq!(
            text(forward_response_head(&switching, false, "egress")),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nVia: 1.1 egress\r\n\r\n"
        );
        let required = response(
            "HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.2\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            text(forward_response_head(&required, false, "egress")),
            "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nVia: 1.1 egress\r\n\r\n"
        );
    }

    #[test]
    fn via_is_appended_to_the_received_list() {
        let head = request("GET / HTTP/1.1\r\nHost: a.example\r\nVia: 1.0 fred\r\nAccept: */*\r\nvia: 1.1 p.example (Apache/1.1)\r\n\r\n");
        assert_eq!(
            text(forward_request_head(&head, true, "egress")),
            "GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nVia: 1.0 fred, 1.1 p.example (Apache/1.1), 1.1 egress\r\n\r\n"
        );
        let head = response("HTTP/1.0 200 OK\r\nVia: 1.1 cdn\r\n\r\n");
        assert_eq!(
            text(forward_response_head(&head, true, "egress")),
            "HTTP/1.0 200 OK\r\nConnection: close\r\nVia: 1.1 cdn, 1.0 egress\r\n\r\n"
        );
    }

    #[test]
    fn target_is_rewritten_to_origin_form_on_request() {
        let head = request("GET http://a.example/p?q=1 HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert!(text(forward_request_head(&head, true, "egress")).starts_with("GET /p?q=1 HTTP/1.1\r\n"));
        assert!(
            text(forward_request_head(&head, false, "egress")).starts_with("GET http://a.example/p?q=1 HTTP/1.1\r\n")
        );
    }

    #[test]
    fn persistence_is_restated_for_the_next_hop() {
        for (raw, close, connection) in [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", false, None),
            ("GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", true, Some("close")),
            ("GET / HTTP/1.0\r\n\r\n", true, Some("close")),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", false, Some("keep-alive")),
            ("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", true, Some("close")),
        ] {
            let head = request(raw);
            assert_eq!(wants_close(head.version, &head.headers), close, "{raw:?}");
            let forwarded = text(forward_request_head(&head, true, "egress"));
            let connection_lines: Vec<&str> = forwarded.lines().filter(|line| line.starts_with("Connection")).collect();
            assert_eq!(
                connection_lines,
                connection.map(|options| format!("Connection: {options}")).as_slice(),
                "{raw:?}"
            );
        }
        // The proxy's decision, not the server's, goes to the client.
        let keep_alive = response("HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(
            text(forward_response_head(&keep_alive, false, "egress")),
            "HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\nVia: 1.0 egress\r\n\r\n"
        );
        assert_eq!(
            text(forward_response_head(&keep_alive, true, "egress")),
            "HTTP/1.0 204 No Content\r\nConnection: close\r\nVia: 1.0 egress\r\n\r\n"
        );
    }

    /// Runs [`forward_responses`] over `upstream_bytes` (read `step` at a
    /// time) for `request`; returns the outcome, what the client got and
    /// what is left upstream.
    async fn exchange(
        request_raw: &str,
        upstream_bytes: &[u8],
        step: usize,
    ) -> (io::Result<ResponseOutcome>, String, Vec<u8>) {
        let mut upstream = HeadReader::new(Trickle::new(upstream_bytes, step));
        let mut client = Vec::new();
        let outcome =
            forward_responses(&mut upstream, &mut client, &request(request_raw), "egress", &PATIENT, None).await;
        let (stream, buffered) = upstream.into_parts();
        (outcome, text(client), [buffered, stream.unread().to_vec()].concat())
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: a.example\r\n\r\n";

    #[tokio::test]
    async fn interim_responses_are_forwarded_in_order_before_the_final_one() {
        let upstream = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n\
                         HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        for step in [1, 5, upstream.len()] {
            let (outcome, client, left) = exchange(GET, upstream, step).await;
            let head_bytes = client.len() as u64 - 13;
            assert_eq!(
                outcome.unwrap(),
                ResponseOutcome::Complete { status: 200, close: false, head_bytes, body_bytes: 13 }
            );
            assert_eq!(
                client,
                "HTTP/1.1 100 Continue\r\nVia: 1.1 egress\r\n\r\n\
                 HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nVia: 1.1 egress\r\n\r\n\
                 HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nVia: 1.1 egress\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                "step {step}"
            );
            assert!(left.is_empty());
        }
    }

    #[tokio::test]
    async fn interim_responses_are_not_sent_to_http_1_0_clients() {
        let upstream = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (outcome, client, _) = exchange("GET / HTTP/1.0\r\n\r\n", upstream, 64).await;
        assert_eq!(client, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nVia: 1.1 egress\r\n\r\nok");
        let head_bytes = client.len() as u64 - 2;
        assert_eq!(outcome.unwrap(), ResponseOutcome::Complete { status: 200, close: true, head_bytes, body_bytes: 2 });
    }

    #[tokio::test]
    async fn switching_protocols_leaves_the_new_protocol_bytes_buffered() {
        let websocket = "GET /chat HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let frame = b"\x81\x05hello";
        // Head and frame arrive in the same read.
        let mut upstream = HeadReader::new(Trickle::new(&[&head[..], frame].concat(), 4096));
        let mut client = Vec::new();
        let outcome =
            forward_responses(&mut upstream, &mut client, &request(websocket), "egress", &PATIENT, None).await;
        assert_eq!(
            text(client.clone()),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nVia: 1.1 egress\r\n\r\n"
        );
        assert!(
            matches!(outcome.unwrap(), ResponseOutcome::SwitchingProtocols { head_bytes, .. } if head_bytes == client.len() as u64)
        );
        assert_eq!(upstream.into_parts().1, frame);
    }

    #[tokio::test]
    async fn unrequested_switching_protocols_is_refused() {
        let upstream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00";
        let (outcome, client, _) = exchange(GET, upstream, 4096).await;
        let error = outcome.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("asked for no upgrade"), "{error}");
        assert!(client.is_empty());
    }

    #[tokio::test]
    async fn response_to_head_has_no_body_whatever_its_length_says() {
        let upstream = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nHTTP/1.1 200 OK";
        let (outcome, client, left) = exchange("HEAD / HTTP/1.1\r\nHost: a.example\r\n\r\n", upstream, 4096).await;
        assert_eq!(client, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nVia: 1.1 egress\r\n\r\n");
        let head_bytes = client.len() as u64;
        assert_eq!(
            outcome.unwrap(),
            ResponseOutcome::Complete { status: 200, close: false, head_bytes, body_bytes: 0 }
        );
        assert_eq!(left, b"HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn close_is_reported_when_any_side_ends_the_connection() {
        let request_close = "GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n";
        for (request_raw, upstream, expected_status, expected_close, expected_body_bytes) in [
            (GET, &b"HTTP/1.1 200 OK\r\n\r\nuntil close"[..], 200, true, 11),
            (GET, b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 404, true, 0),
            (request_close, b"HTTP/1.1 204 No Content\r\n\r\n", 204, true, 0),
            (GET, b"HTTP/1.1 304 Not Modified\r\n\r\n", 304, false, 0),
        ] {
            let (outcome, client, _) = exchange(request_raw, upstream, 4096).await;
            let Ok(ResponseOutcome::Complete { status, close, body_bytes, .. }) = outcome else {
                panic!("{outcome:?}");
            };
            assert_eq!((status, close, body_bytes), (expected_status, expected_close, expected_body_bytes));
            assert_eq!(client.contains("\r\nConnection: close\r\n"), close, "{client:?}");
        }
    }

    #[tokio::test]
    async fn invalid_response_is_not_forwarded() {
        let upstream = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok";
        let (outcome, client, _) = exchange(GET, upstream, 4096).await;
        assert_eq!(outcome.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(client.is_empty());
    }
}
