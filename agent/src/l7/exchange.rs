//! One HTTP/1 request and its responses between a client and an upstream,
//! in full duplex ([`http1::duplex`]): the step the plain-HTTP gate and the
//! inspected session share once a request is allowed.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    conn::{refuse, CloseLog},
    http1::{self, BodyLimits, ExchangeLimits, HeadReader, RequestHead, ResponseHead, ResponseLimits, ResponseOutcome},
};

pub const VIA: &str = "sandbox-egress";
/// How long a keep-alive connection may sit between requests.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);
/// Longest wait for the next bytes of a body.
const BODY_IDLE: Duration = Duration::from_secs(60);
/// Longest wait for a response head: servers may think (or long-poll) a while.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a client's `Expect: 100-continue` waits for the server's own
/// `100 Continue` (or final response) before the agent sends one: longer
/// than a server's round trip takes, far shorter than clients wait (curl
/// 1 s, .NET 350 ms, botocore 1 s) before sending the body anyway.
const CONTINUE_WAIT: Duration = Duration::from_millis(100);

pub enum Exchanged {
    /// The response went out whole; `close`: the connection ends with it.
    Complete { close: bool },
    /// A 101 went out: raw bytes both ways from now on, starting with what
    /// both readers hold.
    Switched {
        /// The server's 101.
        response: Box<ResponseHead>,
    },
    /// The exchange failed after part of a response reached the client:
    /// only an abortive close tells it the response is incomplete.
    FailedMidResponse,
    /// The exchange failed before any response byte reached the client,
    /// which was told why (502 or 504).
    Failed,
}

/// Sends `forwarded_head` and the request's body upstream (`body` if the
/// agent read it already, else copied from the client) while relaying
/// the responses. Waits are bounded by `idle` too: a stalled server gets the
/// client a 504. `what` names the request in error bodies (`GET h:p`).
#[allow(clippy::too_many_arguments)]
pub async fn exchange<C, U>(
    client: &mut HeadReader<C>,
    upstream: &mut HeadReader<U>,
    head: &RequestHead,
    forwarded_head: &[u8],
    body: Option<&[u8]>,
    idle: Duration,
    what: &str,
    log: &mut CloseLog,
) -> Exchanged
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let body_limits = BodyLimits { max_body: None, idle: BODY_IDLE.min(idle) };
    let limits = ExchangeLimits {
        request_body: body_limits,
        response: ResponseLimits { head_timeout: RESPONSE_TIMEOUT.min(idle), body: body_limits },
        continue_wait: CONTINUE_WAIT,
    };
    let (mut sent_up, mut sent_down) = (0, 0);
    let result = {
        let (mut client, mut upstream) = (client.split(), upstream.split());
        let mut to_client = Counted { inner: &mut client.writer, count: &mut sent_down };
        let mut to_upstream = Counted { inner: &mut upstream.writer, count: &mut sent_up };
        http1::duplex::exchange(
            &mut client.reader,
            &mut to_client,
            &mut upstream.reader,
            &mut to_upstream,
            head,
            forwarded_head,
            body,
            VIA,
            &limits,
        )
        .await
    };
    log.bytes_up += sent_up;
    log.bytes_down += sent_down;
    log.verdict = "relayed";
    match result {
        Ok(ResponseOutcome::Complete { close, .. }) => Exchanged::Complete { close },
        Ok(ResponseOutcome::SwitchingProtocols { response, .. }) => Exchanged::Switched { response },
        Err(error) => {
            log.error = Some(error.to_string());
            if sent_down > 0 {
                return Exchanged::FailedMidResponse;
            }
            let (status, kind) = match error.kind() {
                std::io::ErrorKind::TimedOut => (504, "upstream_timeout"),
                _ => (502, "upstream_failed"),
            };
            let reason = error.to_string();
            refuse::error(client.get_mut(), status, &refuse::ErrorBody::new(kind, what, &reason)).await;
            // The client may still be sending the body: let it see the answer.
            if http1::has_request_body(head) {
                http1::linger(client.get_mut()).await;
            }
            Exchanged::Failed
        }
    }
}

/// Counts bytes as each write lands, so an exchange that fails part-way
/// still logs what got through.
struct Counted<'a, W> {
    inner: &'a mut W,
    count: &'a mut u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<'_, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            *this.count += n as u64;
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
