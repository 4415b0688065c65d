//! gRPC over HTTP/2 and TLS (ALPN `h2`), with the h2 crate on both ends:
//! the server answers `/bench.Peer/Unary` with one 2-byte message and
//! `grpc-status: 0`, and `/bench.Peer/Stream` with the requested number of
//! bytes in 64 KiB messages; the client times unary calls on a new
//! connection each and on one open connection, then one stream's throughput.

use std::{future::poll_fn, net::SocketAddr, sync::Arc, time::Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::{Buf, Bytes};
use h2::{server::SendResponse, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use super::{accept_loop, percentile_us, STEP_TIMEOUT};

/// One server-streaming message's payload.
const STREAM_MESSAGE: usize = 64 * 1024;
/// Flow-control windows: large enough that neither end is the limit.
const WINDOW: u32 = 4 << 20;

/// Serves gRPC on `listener` over TLS with `config` (ALPN set to `h2` here).
pub async fn serve(listener: TcpListener, mut config: rustls::ServerConfig) -> Result<()> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    accept_loop(listener, move |stream| {
        let accepting = acceptor.accept(stream);
        async move {
            let tls = accepting.await.context("TLS handshake")?;
            let mut builder = h2::server::Builder::new();
            builder.initial_window_size(WINDOW).initial_connection_window_size(WINDOW);
            let mut connection = builder.handshake::<_, Bytes>(tls).await?;
            while let Some(accepted) = connection.accept().await {
                let (request, respond) = accepted?;
                tokio::spawn(async move {
                    if let Err(error) = answer(request, respond).await {
                        eprintln!("bench-peer: gRPC stream: {error:#}");
                    }
                });
            }
            Ok(())
        }
    })
    .await
}

async fn answer(request: Request<RecvStream>, mut respond: SendResponse<Bytes>) -> Result<()> {
    let (parts, mut body) = request.into_parts();
    let received = read_all(&mut body).await?;
    let head = Response::builder().header("content-type", "application/grpc").body(())?;
    let mut send = respond.send_response(head, false)?;
    if parts.uri.path() == "/bench.Peer/Stream" {
        ensure!(received.len() >= 13, "a Stream request carries a u64 byte count");
        let mut total = (&received[5..13]).get_u64();
        let message = frame(&vec![b's'; STREAM_MESSAGE]);
        while total > 0 {
            send_all(&mut send, message.clone()).await?;
            total = total.saturating_sub(STREAM_MESSAGE as u64);
        }
    } else {
        send_all(&mut send, frame(b"ok")).await?;
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    send.send_trailers(trailers)?;
    Ok(())
}

/// A gRPC message: uncompressed flag, big-endian length, payload.
fn frame(payload: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + payload.len());
    framed.push(0);
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(payload);
    framed.into()
}

async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = poll_fn(|cx| send.poll_capacity(cx)).await.context("stream closed")??;
        send.send_data(data.split_to(granted.min(data.len())), false)?;
    }
    Ok(())
}

/// Reads a stream's DATA to its end, then its trailers; returns the DATA.
async fn read_all(body: &mut RecvStream) -> Result<Vec<u8>> {
    let mut read = Vec::new();
    while let Some(data) = body.data().await {
        let data = data?;
        body.flow_control().release_capacity(data.len())?;
        read.extend_from_slice(&data);
    }
    body.trailers().await?;
    Ok(read)
}

/// Counts a stream's DATA to its end; checks its `grpc-status`.
async fn drain(body: &mut RecvStream) -> Result<u64> {
    let mut count = 0;
    while let Some(data) = body.data().await {
        let data = data?;
        body.flow_control().release_capacity(data.len())?;
        count += data.len() as u64;
    }
    let status = body.trailers().await?.and_then(|trailers| trailers.get("grpc-status").cloned());
    if status.as_ref().map(HeaderValue::as_bytes) != Some(b"0") {
        bail!("grpc-status {status:?}");
    }
    Ok(count)
}

type Channel = h2::client::SendRequest<Bytes>;

/// A TLS connection agreeing on `h2`, and its HTTP/2 handshake.
async fn channel(to: SocketAddr, connector: &tokio_rustls::TlsConnector, name: &str) -> Result<Channel> {
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(to)).await??;
    tcp.set_nodelay(true)?;
    let tls = connector.connect(ServerName::try_from(name.to_owned())?, tcp).await?;
    ensure!(tls.get_ref().1.alpn_protocol() == Some(b"h2"), "the server did not agree on h2");
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(WINDOW).initial_connection_window_size(WINDOW);
    let (channel, connection) = builder.handshake::<_, Bytes>(tls).await?;
    tokio::spawn(connection);
    Ok(channel)
}

/// One call of `method` with `payload`; returns the bytes of its response.
async fn call(channel: &mut Channel, name: &str, method: &str, payload: &[u8]) -> Result<u64> {
    poll_fn(|cx| channel.poll_ready(cx)).await?;
    let request = Request::post(format!("https://{name}/bench.Peer/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (response, mut send) = channel.send_request(request, false)?;
    send.send_data(frame(payload), true)?;
    let response = tokio::time::timeout(STEP_TIMEOUT, response).await??;
    ensure!(response.status() == 200, "status {}", response.status());
    let (_, mut body) = response.into_parts();
    drain(&mut body).await
}

/// `calls` unary calls on a new connection each, `calls` more on one open
/// connection, then one server-streaming call of `stream_bytes`.
/// `config` trusts the server's CA.
pub async fn client(
    to: SocketAddr,
    name: &str,
    calls: usize,
    stream_bytes: u64,
    mut config: rustls::ClientConfig,
) -> Result<()> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut new = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        let mut channel = channel(to, &connector, name).await?;
        call(&mut channel, name, "Unary", b"hi").await?;
        new.push(started.elapsed());
    }
    let mut channel = channel(to, &connector, name).await?;
    let mut open = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        call(&mut channel, name, "Unary", b"hi").await?;
        open.push(started.elapsed());
    }
    let started = Instant::now();
    let received = call(&mut channel, name, "Stream", &stream_bytes.to_be_bytes()).await?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(received >= stream_bytes, "streamed {received} of {stream_bytes} bytes");
    new.sort();
    open.sort();
    println!(
        "{}",
        json!({
            "new_p50_us": percentile_us(&new, 0.5),
            "open_p50_us": percentile_us(&open, 0.5),
            "stream_mib_s": received as f64 / seconds / (1 << 20) as f64,
        })
    );
    Ok(())
}
