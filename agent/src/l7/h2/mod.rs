//! HTTP/2 on inspected connections (ALPN `h2`), with the `h2` crate on both
//! sides: every stream is one request, decided and relayed on its own
//! (`stream`), on one HTTP/2 connection to the origin; DATA is relayed as
//! it arrives within each peer's flow-control window (`pipe`); `head` maps
//! a stream's request to the head the request decision reads, and back.
//!
//! Limits: [`MAX_CONCURRENT_STREAMS`] streams at once, a header list of at
//! most [`MAX_HEADER_LIST_SIZE`] bytes, at most [`STREAM_WINDOW`] bytes of
//! a stream's data held here (its flow-control window) and
//! [`MAX_SEND_BUFFER`] queued to a peer; an idle connection (no stream for
//! [`KEEP_ALIVE_IDLE`]), or any when the agent stops, gets GOAWAY.

mod head;
mod pipe;
mod stream;

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};

pub use self::head::{forward_request, request_head};
use self::stream::Streams;
use super::{
    exchange::KEEP_ALIVE_IDLE,
    target::{Target, Unserved},
};
use crate::{
    conn::{CloseLog, Context, Origin},
    tls::Io,
};

pub const MAX_CONCURRENT_STREAMS: u32 = 100;
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// A connection's window: several streams at full speed.
const CONNECTION_WINDOW: u32 = 4 * STREAM_WINDOW;
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// How long the client has to finish its streams after GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(10);

/// The origin of an HTTP/2 connection: connected, its TLS having agreed on
/// `h2`; or why no request can reach it.
pub enum Upstream {
    Ready(Box<dyn Io>),
    Unserved(Unserved),
}

/// Serves the HTTP/2 connection `client` (its TLS agreed on `h2`), each
/// stream decided on its own, until the client closes it or it is idle.
pub async fn serve<C>(
    client: C,
    upstream: Upstream,
    target: Target,
    origin: &Origin,
    context: &Context,
    log: &mut CloseLog,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = match server_builder().handshake::<_, Bytes>(client).await {
        Ok(server) => server,
        Err(error) => {
            log.error = Some(format!("HTTP/2 handshake with the client failed: {error}"));
            return;
        }
    };
    let (upstream, mut connection) = match upstream {
        Upstream::Ready(io) => match client_builder().handshake::<_, Bytes>(io).await {
            Ok((sender, connection)) => (Ok(sender), Some(connection)),
            Err(error) => {
                let reason = format!("HTTP/2 handshake with {} failed: {error}", target.name);
                log.upstream_failed(reason.clone());
                (Err(Unserved { status: 502, kind: "upstream_failed", reason }), None)
            }
        },
        Upstream::Unserved(unserved) => (Err(unserved), None),
    };
    let streams = Streams { target: &target, origin, context, upstream };
    let mut running = FuturesUnordered::new();
    // Set once GOAWAY went out: the client has GOAWAY_GRACE to finish.
    let mut closing = false;
    let mut stopping = context.stopping.clone();
    loop {
        let wait = match (closing, running.is_empty()) {
            (true, _) => Some(GOAWAY_GRACE),
            (false, true) => Some(KEEP_ALIVE_IDLE),
            // A stream may stay quiet for long (a gRPC stream waiting for events).
            (false, false) => None,
        };
        tokio::select! {
            accepted = server.accept() => match accepted {
                Some(Ok((request, respond))) => running.push(streams.serve(request, respond)),
                Some(Err(error)) => {
                    if !error.is_go_away() && !error.is_io() {
                        log.error = Some(format!("HTTP/2 connection error: {error}"));
                    }
                    break;
                }
                None => break,
            },
            Some(part) = running.next() => log.absorb(part),
            ended = async { connection.as_mut().expect("polled only while open").await }, if connection.is_some() => {
                connection = None;
                if let Err(error) = ended {
                    log.error = Some(format!("the origin's HTTP/2 connection failed: {error}"));
                }
                // Open streams fail on their own; no new one can reach the origin.
                server.graceful_shutdown();
                closing = true;
            }
            // The agent is stopping (its sender gone counts too).
            _ = stopping.wait_for(|stop| *stop), if !closing => {
                server.graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                if closing {
                    break;
                }
                server.graceful_shutdown();
                closing = true;
            }
        }
    }
    // Streams still open end with the connection: each logs its line.
    let drain = async {
        while let Some(part) = running.next().await {
            log.absorb(part);
        }
    };
    let origin_io = async {
        if let Some(connection) = connection {
            let _ = connection.await;
        }
        std::future::pending::<()>().await
    };
    let _ = tokio::time::timeout(GOAWAY_GRACE, async {
        tokio::select! {
            () = drain => {}
            () = origin_io => {}
        }
    })
    .await;
}

/// The connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4),
/// up to the end of what reads as an HTTP/1 head.
pub const CLEARTEXT_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Why HTTP/2 in clear text is refused.
pub const CLEARTEXT_REFUSED: &str = "HTTP/2 in clear text (h2c) is not served: its requests would pass undecided; \
     use HTTP/1.1, or HTTP/2 over TLS";

/// Answers HTTP/2 with prior knowledge (`client` replays the preface) in
/// its own framing: each stream a 403 naming [`CLEARTEXT_REFUSED`] (a gRPC
/// call PERMISSION_DENIED), then GOAWAY. Nothing reaches any origin.
pub async fn refuse_cleartext<C>(client: C, log: &mut CloseLog)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    log.verdict = "denied";
    log.denial = Some("policy_denied");
    log.reason = Some(CLEARTEXT_REFUSED.to_owned());
    let Ok(Ok(mut server)) =
        tokio::time::timeout(KEEP_ALIVE_IDLE, server_builder().handshake::<_, Bytes>(client)).await
    else {
        return;
    };
    let refusal = async {
        while let Some(Ok((request, mut respond))) = server.accept().await {
            let is_grpc = stream::is_grpc_request(request.headers());
            let what = format!("{} {}", request.method(), request.uri().path());
            stream::answer(
                &mut respond,
                &stream::error_response(is_grpc, 403, "policy_denied", &what, CLEARTEXT_REFUSED),
            );
            server.graceful_shutdown();
        }
    };
    let _ = tokio::time::timeout(KEEP_ALIVE_IDLE, refusal).await;
}

fn server_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    builder
}

fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false);
    builder
}
