//! One request relayed in full duplex: its body goes upstream while the
//! responses come back, so an interim response (`100 Continue`, `103 Early
//! Hints`) reaches the client as it arrives, and a final response sent
//! before the body ends (a 401, a 413, a redirect) is not held back by it.
//!
//! - A client waiting for `100 Continue` gets the server's, or the agent's
//!   own after `continue_wait` (RFC 9110 §10.1.1 lets a proxy send one: an
//!   HTTP/1.0 server never will), so it never waits for its own timeout.
//! - After an early final response the body goes on to the server only if
//!   both sides keep the connection: a server that does not close reads
//!   the rest of the body (§10.1.1). Otherwise nothing more is sent, both
//!   connections end after the response, and the client's remaining bytes
//!   are drained before the close ([`super::linger()`]). A body not forwarded whole
//!   always ends both connections: its rest is never read as a next request.

use std::{
    error::Error,
    fmt, io,
    pin::{pin, Pin},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

use super::{
    body::{copy_body, BodyLimits},
    expect::waits_for_continue,
    forward::{forward_responses, ResponseLimits, ResponseOutcome},
    linger::linger,
    reader::HeadReader,
    request::RequestHead,
    request_framing,
};

#[derive(Debug, Clone, Copy)]
pub struct ExchangeLimits {
    pub request_body: BodyLimits,
    pub response: ResponseLimits,
    /// How long a client's `Expect: 100-continue` waits for the server's
    /// answer before the agent sends its own `100 Continue`.
    pub continue_wait: Duration,
}

/// Sends `forwarded_head` (the rewritten head of `request`) and the body
/// from `client` (or `body`, when the agent read it already) to
/// `upstream`, and at the same time the responses from `upstream` to
/// `client`; the writers are the two connections' write halves
/// ([`HeadReader::split`]).
///
/// `Complete { close: false }` only when the body was forwarded whole and
/// the response went out whole: both connections can carry the next
/// request. Errors are those of reading the client's body (the request
/// cannot be completed) or of the response ([`forward_responses`]); a
/// server that stops taking the body is no error while its response comes.
#[allow(clippy::too_many_arguments)]
pub async fn exchange<CR, CW, UR, UW>(
    client: &mut HeadReader<CR>,
    to_client: &mut CW,
    upstream: &mut HeadReader<UR>,
    to_upstream: &mut UW,
    request: &RequestHead,
    forwarded_head: &[u8],
    body: Option<&[u8]>,
    via: &str,
    limits: &ExchangeLimits,
) -> io::Result<ResponseOutcome>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    // Flushed by the body copy, before it first waits.
    to_upstream.write_all(forwarded_head).await?;
    // A body the agent read was asked for already.
    let continue_at = (body.is_none() && waits_for_continue(request)).then(|| Instant::now() + limits.continue_wait);
    let (outcome, forwarded) = {
        let mut to_upstream = Tagged(to_upstream);
        let mut upload = pin!(async {
            match body {
                Some(body) => {
                    to_upstream.write_all(body).await?;
                    to_upstream.flush().await
                }
                None => {
                    copy_body(client, &mut to_upstream, request_framing(request), &limits.request_body).await.map(drop)
                }
            }
        });
        let mut responses = pin!(forward_responses(upstream, to_client, request, via, &limits.response, continue_at));
        // Some(true): the body went upstream whole; Some(false): the server stopped taking it.
        let mut uploaded = None;
        let outcome = loop {
            tokio::select! {
                biased;
                outcome = &mut responses => break outcome?,
                result = &mut upload, if uploaded.is_none() => match result {
                    Ok(_) => uploaded = Some(true),
                    // Its response (or its failure) tells the client why.
                    Err(error) if is_upstream_write(&error) => uploaded = Some(false),
                    Err(error) => return Err(error),
                },
            }
        };
        let forwarded = match (uploaded, &outcome) {
            (Some(whole), _) => whole,
            // The new protocol starts after the body: it must go first.
            (None, ResponseOutcome::SwitchingProtocols { .. }) => {
                upload.await?;
                true
            }
            // An early response on a connection both keep: the server reads the rest.
            (None, ResponseOutcome::Complete { close: false, .. }) => upload.await.is_ok(),
            (None, ResponseOutcome::Complete { close: true, .. }) => false,
        };
        (outcome, forwarded)
    };
    match outcome {
        ResponseOutcome::SwitchingProtocols { .. } if !forwarded => Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the server switched protocols but did not take the whole request body",
        )),
        ResponseOutcome::Complete { status, head_bytes, body_bytes, .. } if !forwarded => {
            let _ = to_client.shutdown().await;
            linger(client.get_mut()).await;
            Ok(ResponseOutcome::Complete { status, close: true, head_bytes, body_bytes })
        }
        outcome => Ok(outcome),
    }
}

/// The server's side of the body copy: its write errors are told apart
/// from the client's read errors.
struct Tagged<'a, W>(&'a mut W);

#[derive(Debug)]
struct UpstreamWriteFailed(io::Error);

impl fmt::Display for UpstreamWriteFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sending the request body upstream failed: {}", self.0)
    }
}

impl Error for UpstreamWriteFailed {}

fn is_upstream_write(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<UpstreamWriteFailed>())
}

fn tag<T>(result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    result.map_err(|error| io::Error::new(error.kind(), UpstreamWriteFailed(error)))
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tagged<'_, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        tag(Pin::new(&mut *self.get_mut().0).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tag(Pin::new(&mut *self.get_mut().0).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tag(Pin::new(&mut *self.get_mut().0).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{duplex, AsyncReadExt, DuplexStream},
        task::JoinHandle,
        time::timeout,
    };

    use super::*;
    use crate::{
        http1::{expect::CONTINUE, forward_request_head, parse_request_head},
        wire::Parse,
    };

    const PATIENT: Duration = Duration::from_secs(10);
    const CONTINUE_WAIT: Duration = Duration::from_millis(30);
    const LIMITS: ExchangeLimits = ExchangeLimits {
        request_body: BodyLimits { max_body: None, idle: PATIENT },
        response: ResponseLimits { head_timeout: PATIENT, body: BodyLimits { max_body: None, idle: PATIENT } },
        continue_wait: CONTINUE_WAIT,
    };
    const PUT: &str = "PUT /up HTTP/1.1\r\nHost: a.example\r\nContent-Length: 10\r\n\r\n";
    const PUT_EXPECTING: &str =
        "PUT /up HTTP/1.1\r\nHost: a.example\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n";
    const BODY: &[u8] = b"0123456789";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    /// The agent's side of one exchange, run as a task: the test plays the
    /// client and the server on the other ends. The task returns the
    /// outcome and its reader of the client, for the next request.
    struct Exchange {
        agent: JoinHandle<(io::Result<ResponseOutcome>, HeadReader<DuplexStream>)>,
        client: DuplexStream,
        server: DuplexStream,
    }

    impl Exchange {
        fn start(request_raw: &str) -> Self {
            let Parse::Done(head) = parse_request_head(request_raw.as_bytes()) else { panic!("{request_raw:?}") };
            let (client, agent_client) = duplex(1 << 16);
            let (agent_upstream, server) = duplex(1 << 16);
            let agent = tokio::spawn(async move {
                let mut client = HeadReader::new(agent_client);
                let mut upstream = HeadReader::new(agent_upstream);
                let forwarded = forward_request_head(&head, true, "egress");
                let outcome = {
                    let (mut client, mut upstream) = (client.split(), upstream.split());
                    exchange(
                        &mut client.reader,
                        &mut client.writer,
                        &mut upstream.reader,
                        &mut upstream.writer,
                        &head,
                        &forwarded,
                        None,
                        "egress",
                        &LIMITS,
                    )
                    .await
                };
                (outcome, client)
            });
            Self { agent, client, server }
        }

        async fn outcome(self) -> (io::Result<ResponseOutcome>, HeadReader<DuplexStream>) {
            timeout(PATIENT, self.agent).await.expect("the exchange ends").unwrap()
        }
    }

    /// Reads `stream` until what arrived ends with `end`; all of it.
    async fn read_until(stream: &mut DuplexStream, end: &[u8]) -> String {
        let mut received = Vec::new();
        while !received.ends_with(end) {
            let mut byte = [0u8];
            let read = timeout(PATIENT, stream.read(&mut byte)).await.expect("bytes held back").unwrap();
            assert_eq!(read, 1, "closed after {:?}", String::from_utf8_lossy(&received));
            received.push(byte[0]);
        }
        String::from_utf8(received).unwrap()
    }

    fn complete(outcome: io::Result<ResponseOutcome>) -> (u16, bool) {
        match outcome {
            Ok(ResponseOutcome::Complete { status, close, .. }) => (status, close),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_interim_response_reaches_the_client_before_the_body_is_sent() {
        let mut exchange = Exchange::start(PUT);
        read_until(&mut exchange.server, b"\r\n\r\n").await;
        exchange.server.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n").await.unwrap();
        // The client sends its body only once it has the 103.
        let early = read_until(&mut exchange.client, b"\r\n\r\n").await;
        assert_eq!(early, "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nVia: 1.1 egress\r\n\r\n");
        exchange.client.write_all(BODY).await.unwrap();
        let mut body = [0u8; 10];
        exchange.server.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, BODY);
        exchange.server.write_all(OK).await.unwrap();
        assert_eq!(
            read_until(&mut exchange.client, b"ok").await,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 egress\r\n\r\nok"
        );
        assert_eq!(complete(exchange.outcome().await.0), (200, false));
    }

    #[tokio::test]
    async fn the_servers_100_continue_is_relayed_and_none_of_the_agents_own() {
        let mut exchange = Exchange::start(PUT_EXPECTING);
        read_until(&mut exchange.server, b"\r\n\r\n").await;
        exchange.server.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        let interim = read_until(&mut exchange.client, b"\r\n\r\n").await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\nVia: 1.1 egress\r\n\r\n");
        // Well past the wait: the agent says nothing more of its own.
        tokio::time::sleep(CONTINUE_WAIT * 3).await;
        exchange.client.write_all(BODY).await.unwrap();
        let mut body = [0u8; 10];
        exchange.server.read_exact(&mut body).await.unwrap();
        exchange.server.write_all(OK).await.unwrap();
        assert_eq!(
            read_until(&mut exchange.client, b"ok").await,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 egress\r\n\r\nok"
        );
        assert_eq!(complete(exchange.outcome().await.0), (200, false));
    }

    #[tokio::test]
    async fn a_server_that_never_says_continue_gets_the_body_after_the_agents_own() {
        let mut exchange = Exchange::start(PUT_EXPECTING);
        let forwarded = read_until(&mut exchange.server, b"\r\n\r\n").await;
        assert!(forwarded.contains("\r\nExpect: 100-continue\r\n"), "{forwarded:?}");
        let started = Instant::now();
        assert_eq!(read_until(&mut exchange.client, b"\r\n\r\n").await.as_bytes(), CONTINUE);
        assert!(started.elapsed() >= CONTINUE_WAIT / 2, "only after the wait");
        exchange.client.write_all(BODY).await.unwrap();
        let mut body = [0u8; 10];
        exchange.server.read_exact(&mut body).await.unwrap();
        // A late 100 from the server is not relayed: the client had one.
        exchange.server.write_all(&[b"HTTP/1.1 100 Continue\r\n\r\n", OK].concat()).await.unwrap();
        assert_eq!(
            read_until(&mut exchange.client, b"ok").await,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 egress\r\n\r\nok"
        );
        assert_eq!(complete(exchange.outcome().await.0), (200, false));
    }

    #[tokio::test]
    async fn an_early_final_response_that_closes_ends_both_without_the_rest_of_the_body() {
        let request = "PUT /up HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1000000\r\n\r\n";
        let mut exchange = Exchange::start(request);
        exchange.client.write_all(b"first part").await.unwrap();
        read_until(&mut exchange.server, b"first part").await;
        exchange
            .server
            .write_all(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut exchange.client, b"\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 413 Content Too Large\r\n"), "{answer:?}");
        assert!(answer.contains("\r\nConnection: close\r\n"), "{answer:?}");
        // The agent closes its side, and waits for the client's close.
        let mut rest = Vec::new();
        exchange.client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        exchange.client.write_all(b"more of the body").await.unwrap();
        let Exchange { agent, client, mut server } = exchange;
        drop(client);
        let (outcome, _) = Exchange { agent, client: duplex(1).0, server: duplex(1).0 }.outcome().await;
        assert_eq!(complete(outcome), (413, true));
        let mut after = Vec::new();
        server.read_to_end(&mut after).await.unwrap();
        assert!(
            after.is_empty(),
            "nothing after the early response went upstream: {:?}",
            String::from_utf8_lossy(&after)
        );
    }

    #[tokio::test]
    async fn an_early_response_on_a_kept_connection_lets_the_body_follow() {
        let next = "GET /next HTTP/1.1\r\nHost: a.example\r\n\r\n";
        let mut exchange = Exchange::start(PUT_EXPECTING);
        read_until(&mut exchange.server, b"\r\n\r\n").await;
        // A server that answers before reading, and keeps the connection: it reads the rest.
        exchange.server.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n").await.unwrap();
        let answer = read_until(&mut exchange.client, b"\r\n\r\n").await;
        assert_eq!(answer, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nVia: 1.1 egress\r\n\r\n");
        exchange.client.write_all(&[BODY, next.as_bytes()].concat()).await.unwrap();
        let mut body = [0u8; 10];
        exchange.server.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, BODY);
        let (outcome, mut client) = exchange.outcome().await;
        assert_eq!(complete(outcome), (401, false));
        let head = client.read_request_head(PATIENT, PATIENT).await.unwrap().expect("the next request");
        assert_eq!(head.target, "/next", "read as a request of its own");
    }

    #[tokio::test]
    async fn a_server_that_stops_taking_the_body_still_has_its_response_relayed() {
        let request = "PUT /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut exchange = Exchange::start(request);
        read_until(&mut exchange.server, b"\r\n\r\n").await;
        exchange
            .server
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
            .await
            .unwrap();
        let Exchange { agent, mut client, server } = exchange;
        drop(server);
        let sender = tokio::spawn(async move {
            let chunk = [b"4000\r\n".as_slice(), &[b'x'; 0x4000], b"\r\n"].concat();
            while client.write_all(&chunk).await.is_ok() {}
        });
        let (outcome, _) = Exchange { agent, client: duplex(1).0, server: duplex(1).0 }.outcome().await;
        assert_eq!(complete(outcome), (403, true));
        sender.abort();
    }

    #[tokio::test]
    async fn a_client_that_breaks_off_its_body_fails_the_exchange() {
        let mut exchange = Exchange::start(PUT);
        exchange.client.write_all(b"01234").await.unwrap();
        read_until(&mut exchange.server, b"01234").await;
        let Exchange { agent, client, server } = exchange;
        drop(client);
        let (outcome, _) = Exchange { agent, client: duplex(1).0, server }.outcome().await;
        assert_eq!(outcome.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
