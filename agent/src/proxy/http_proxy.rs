//! Plain HTTP/1.x, request by request: every request on a keep-alive
//! connection is decided on its own Host (through the private-IP gate),
//! forwarded with hop-by-hop headers stripped and a Via added, and its
//! response relayed; a `101 Switching Protocols` turns the connection into a
//! raw splice, bytes already read past the 101 forwarded first.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    connection::{bad_request, connect_upstream, deny_http, CloseLog, Shared},
    decide::Denial,
    origin::Origin,
};
use crate::{
    http1::{self, BodyLimits, HeadReader, ResponseLimits, ResponseOutcome},
    relay::{self, Prefill},
    sniff::{
        host::Host,
        http::{RequestHead, TargetForm},
    },
};

const VIA: &str = "sandbox-egress";
/// How long a keep-alive connection may sit between requests.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);
/// Longest wait for the next bytes of a body.
const BODY_IDLE: Duration = Duration::from_secs(60);
/// Longest wait for a response head: servers may think (or long-poll) a while.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);

pub enum HttpMode {
    /// Redirected by the kernel: the upstream is the address the sandbox
    /// chose; `preconnected`, a connection to it made before the client spoke.
    Transparent { destination: SocketAddr, preconnected: Option<(SocketAddr, TcpStream)> },
    /// Sent to the agent's listener as a proxy request (absolute-form).
    Explicit,
}

/// [`HttpMode`] without its connection, for every request of the loop.
#[derive(Clone, Copy)]
enum Mode {
    Transparent { destination: SocketAddr },
    Explicit,
}

impl HttpMode {
    fn split(self) -> (Mode, Option<(SocketAddr, TcpStream)>) {
        match self {
            Self::Transparent { destination, preconnected } => (Mode::Transparent { destination }, preconnected),
            Self::Explicit => (Mode::Explicit, None),
        }
    }
}

struct Upstream {
    address: SocketAddr,
    reader: HeadReader<TcpStream>,
}

pub async fn serve(
    client: TcpStream,
    mut buffered: Vec<u8>,
    first: RequestHead,
    mode: HttpMode,
    origin: &Origin,
    shared: &Shared,
    log: &mut CloseLog,
) {
    let (mode, mut preconnected) = mode.split();
    let after_head = buffered.split_off(first.head_len);
    let mut client = HeadReader::with_buffered(client, after_head);
    let mut upstream: Option<Upstream> = None;
    let mut head = first;
    loop {
        if head.form == TargetForm::Authority {
            let reason = "CONNECT through another proxy is not allowed: this agent is the sandbox's proxy".to_owned();
            log.verdict = "denied";
            log.reason = Some(reason.clone());
            let denial = Denial { kind: "policy_denied", reason, address_class: None };
            return deny_http(client.into_parts().0, &format!("CONNECT {}", head.target), &denial).await;
        }
        let Some(authority) = head.authority.clone() else {
            return bad_request(client.into_parts().0, log, "request without Host".into()).await;
        };
        let host_text = authority.host.to_string();
        let (port, destination) = match mode {
            Mode::Transparent { destination } => (authority.port.unwrap_or(destination.port()), Some(destination.ip())),
            Mode::Explicit => (authority.port.unwrap_or(80), None),
        };
        let lookup_name = match &authority.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        };
        log.host = Some(host_text.clone());
        let verdict = shared.decider.plain_http(origin, &lookup_name, port, destination).await;
        let allowed = match log.decided(verdict) {
            Ok(allowed) => allowed,
            Err(denial) => {
                let (stream, _) = client.into_parts();
                return deny_http(stream, &format!("{} {host_text}:{port}", head.method), &denial).await;
            }
        };
        // A keep-alive request for another address needs another upstream.
        if upstream.as_ref().map(|u| u.address) != Some(allowed.upstream) {
            // A connection made before the client spoke serves the first request to its address.
            let ready =
                preconnected.take().filter(|(address, _)| *address == allowed.upstream).map(|(_, stream)| stream);
            let connected = match ready {
                Some(stream) => Some(stream),
                None => connect_upstream(allowed.upstream, shared, log).await,
            };
            let Some(stream) = connected else {
                let (mut stream, _) = client.into_parts();
                let reason = log.reason.clone().unwrap_or_default();
                let detail = format!("{} {host_text}:{port}", head.method);
                let body = super::respond::ErrorBody {
                    error: "upstream_failed",
                    detail: &detail,
                    reason: &reason,
                    address_class: None,
                };
                return super::respond::error(&mut stream, 502, &body).await;
            };
            upstream = Some(Upstream { address: allowed.upstream, reader: HeadReader::new(stream) });
        }
        let up = upstream.as_mut().expect("connected above");

        let forwarded_head = http1::forward_request_head(&head, matches!(mode, Mode::Explicit), VIA);
        // Waits are bounded by the idle timeout too: a stalled server is answered 504.
        let idle = shared.config.idle_timeout;
        let body_limits = BodyLimits { max_body: None, idle: BODY_IDLE.min(idle) };
        let response_limits = ResponseLimits { head_timeout: RESPONSE_TIMEOUT.min(idle), body: body_limits };
        let (mut sent_up, mut sent_down) = (0, 0);
        let exchange = async {
            {
                let mut to_upstream = Counted { inner: up.reader.get_mut(), count: &mut sent_up };
                to_upstream.write_all(&forwarded_head).await?;
                http1::copy_body(&mut client, &mut to_upstream, http1::request_framing(&head), &body_limits).await?;
            }
            let mut to_client = Counted { inner: client.get_mut(), count: &mut sent_down };
            http1::forward_responses(&mut up.reader, &mut to_client, &head, VIA, &response_limits).await
        };
        let result = exchange.await;
        log.bytes_up += sent_up;
        log.bytes_down += sent_down;
        log.verdict = "relayed";
        match result {
            Err(error) => {
                log.error = Some(error.to_string());
                // Nothing of a response has reached the client yet: tell it why.
                if sent_down == 0 {
                    let (status, kind) = match error.kind() {
                        std::io::ErrorKind::TimedOut => (504, "upstream_timeout"),
                        _ => (502, "upstream_failed"),
                    };
                    let detail = format!("{} {host_text}:{port}", head.method);
                    let body = super::respond::ErrorBody {
                        error: kind,
                        detail: &detail,
                        reason: &error.to_string(),
                        address_class: None,
                    };
                    super::respond::error(client.get_mut(), status, &body).await;
                } else {
                    // Part of a response went out: a reset, not a close, tells the
                    // client it is incomplete (a close-delimited body would pass).
                    relay::reset_when_flushed(client.get_mut()).await;
                }
                return;
            }
            Ok(ResponseOutcome::SwitchingProtocols { .. }) => {
                let upstream = upstream.take().expect("connected above");
                let (upstream_stream, to_client) = upstream.reader.into_parts();
                let (client_stream, to_upstream) = client.into_parts();
                log.protocol = "http-upgrade";
                return log.relayed(
                    relay::relay(
                        client_stream,
                        upstream_stream,
                        Prefill { to_upstream, to_client },
                        shared.config.idle_timeout,
                    )
                    .await,
                );
            }
            Ok(ResponseOutcome::Complete { close, .. }) => {
                if close {
                    return;
                }
            }
        }
        head = match client.read_request_head(KEEP_ALIVE_IDLE, shared.config.sniff.head_timeout).await {
            Ok(Some(next)) => next,
            // The client closed, or left a keep-alive connection idle: a normal end.
            Ok(None) => return,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => return,
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                return bad_request(client.into_parts().0, log, error.to_string()).await;
            }
            Err(error) => {
                log.error = Some(error.to_string());
                return;
            }
        };
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
