//! `bench-peer`: the benchmark's servers and clients, built in release mode
//! by `cargo xtask bench` so neither end is the bottleneck. Every client
//! prints one JSON line with its measurements on stdout.
//!
//! A client connects to `--to`; with `--connect AUTHORITY` it first asks the
//! proxy there for a tunnel (`CONNECT AUTHORITY`), so one client covers
//! direct, transparent (the same connect, made inside the sandbox cgroup),
//! CONNECT proxies and TCP forwarders.
//!
//! The other clients connect to `--to` only: `tls` (keep-alive HTTP over
//! TLS), `grpc` (unary and streaming calls over HTTP/2, `peer_grpc`), `greeting`
//! and `echo` (the first bytes of a stream, either side first).

mod peer_grpc;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// First byte of bulk and idle streams: neither TLS nor HTTP, so the agent
/// relays them as opaque TCP without waiting for more.
const OPAQUE: u8 = 0;
/// Bulk request: `OPAQUE`, then the upload and download sizes (big-endian u64).
const BULK_HEADER: usize = 17;
const CHUNK: usize = 1 << 20;
/// Bounds every single step (connect, tunnel, request, echo).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a bulk transfer may take (1 GiB at a crawling 20 MB/s).
const BULK_TIMEOUT: Duration = Duration::from_secs(60);
/// Sent on each idle connection at the end: the server then closes first, so
/// TIME_WAIT lands on its side and not on the proxy's upstream socket (a
/// proxy that binds before it connects, like squid, would run out of ports).
const IDLE_CLOSE: u8 = 1;
/// Longest the idle client holds its connections waiting to be told to stop.
const HOLD_LIMIT: Duration = Duration::from_secs(120);
/// Connections being opened at once by the idle client.
const OPENING_AT_ONCE: usize = 64;
const HTTP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
const KEEPALIVE_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// What the greeting server says on accept, as an SMTP or FTP server would.
const GREETING: &[u8] = b"220 bench-peer ready\r\n";
/// What the echo client sends: letters that cannot start an HTTP request
/// line, so a sniffer must not wait for a line end.
const ECHO: &[u8] = b"xxxx";
/// Largest request or response head the keep-alive ends accept.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the serve variant is no cost.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve every workload until killed; prints `{"ready":true}`.
    Serve(Servers),
    /// One stream: upload `bytes`, then download `bytes`.
    Bulk {
        #[command(flatten)]
        route: Route,
        #[arg(long)]
        bytes: u64,
    },
    /// One connection that sends a single opaque byte and closes: an
    /// executable's first stream to a destination, which the agent relays
    /// and then lets the kernel fast path repeat (a `protocol: tcp` endpoint).
    Touch {
        #[command(flatten)]
        route: Route,
    },
    /// Short HTTP/1.1 requests, a new connection each.
    Http {
        #[command(flatten)]
        route: Route,
        /// The Host header (the server's authority).
        #[arg(long)]
        host: String,
        #[arg(long)]
        requests: usize,
        #[arg(long)]
        concurrency: usize,
    },
    /// Open `count` connections, echo a byte on each, hold them until stdin closes.
    Idle {
        #[command(flatten)]
        route: Route,
        #[arg(long)]
        count: usize,
    },
    /// `connections` TLS connections one after another, `requests`
    /// keep-alive requests on each (the last asks the server to close).
    Tls {
        #[arg(long)]
        to: SocketAddr,
        /// PEM file of the CA the server's certificate must chain to.
        #[arg(long)]
        ca: PathBuf,
        /// SNI, and the Host of every request.
        #[arg(long)]
        name: String,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        requests: usize,
        /// Send each request as a JSON `POST` to `--path` with this file as its body.
        #[arg(long)]
        post: Option<PathBuf>,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// gRPC: `calls` unary calls on a new TLS connection each, as many on
    /// one open connection, then one server-streaming call of `stream_mib`.
    Grpc {
        #[arg(long)]
        to: SocketAddr,
        /// PEM file of the CA the server's certificate must chain to.
        #[arg(long)]
        ca: PathBuf,
        /// SNI and `:authority`.
        #[arg(long)]
        name: String,
        #[arg(long)]
        calls: usize,
        #[arg(long)]
        stream_mib: u64,
    },
    /// Connections one after another, each timed from connect to the server's greeting.
    Greeting {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
    },
    /// Connections one after another, each timed from connect to the echo of `xxxx`.
    Echo {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
    },
    /// Streamed chat completions one after another, a new connection each,
    /// each timed from connect to the first event's bytes.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        /// The Host header: the provider's authority, or inference.local.
        #[arg(long)]
        host: String,
        #[arg(long)]
        connections: usize,
    },
}

#[derive(clap::Args)]
struct Servers {
    /// Bulk streams (one for the agent's fast path, on a port of its own).
    #[arg(long, value_delimiter = ',', required = true)]
    bulk: Vec<SocketAddr>,
    /// HTTP responders (one per way and run, so TIME_WAITs never run out of ports).
    #[arg(long, value_delimiter = ',', required = true)]
    http: Vec<SocketAddr>,
    /// Echo one byte, then hold the connection open.
    #[arg(long, value_delimiter = ',', required = true)]
    idle: Vec<SocketAddr>,
    /// Keep-alive HTTP/1.1: `200` with a 2-byte body to every request.
    #[arg(long)]
    keepalive: SocketAddr,
    /// The same over TLS, with `--cert` and `--key`.
    #[arg(long, value_delimiter = ',', required = true)]
    tls: Vec<SocketAddr>,
    /// gRPC over HTTP/2 and TLS (ALPN `h2`), with `--cert` and `--key`.
    #[arg(long, value_delimiter = ',', required = true)]
    grpc: Vec<SocketAddr>,
    /// PEM certificate chain of the TLS servers.
    #[arg(long)]
    cert: PathBuf,
    /// PEM private key of the TLS servers.
    #[arg(long)]
    key: PathBuf,
    /// Says `GREETING` on accept, then closes.
    #[arg(long, value_delimiter = ',', required = true)]
    greeting: Vec<SocketAddr>,
    /// Echoes the client's `ECHO`, then closes.
    #[arg(long, value_delimiter = ',', required = true)]
    echo: Vec<SocketAddr>,
    /// A streaming chat-completions provider: the first server-sent event at
    /// once, the rest after [`SSE_PAUSE`].
    #[arg(long)]
    sse: SocketAddr,
    /// Takes one upload per connection, `100 Continue` first when asked.
    #[arg(long)]
    upload: SocketAddr,
}

#[derive(clap::Args, Clone)]
struct Route {
    /// The address connected to.
    #[arg(long)]
    to: SocketAddr,
    /// Send `CONNECT <authority>` first and expect a 200.
    #[arg(long)]
    connect: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Serve(servers) => runtime(2).and_then(|rt| rt.block_on(serve(servers))),
        Command::Bulk { route, bytes } => bulk(&route, bytes),
        Command::Touch { route } => touch(&route),
        // One client thread: enough to outrun any proxy here, and it leaves
        // the other core to the proxy and the server.
        Command::Http { route, host, requests, concurrency } => {
            runtime(1).and_then(|rt| rt.block_on(http(route, host, requests, concurrency)))
        }
        Command::Idle { route, count } => runtime(1).and_then(|rt| rt.block_on(idle(route, count))),
        Command::Tls { to, ca, name, connections, requests, post, path } => runtime(1).and_then(|rt| {
            let body = post.map(std::fs::read).transpose()?;
            rt.block_on(tls(to, &ca, name, connections, requests, Request { path, body }))
        }),
        Command::Grpc { to, ca, name, calls, stream_mib } => runtime(1)
            .and_then(|rt| rt.block_on(peer_grpc::client(to, &name, calls, stream_mib << 20, client_config(&ca)?))),
        Command::Greeting { to, connections } => {
            runtime(1).and_then(|rt| rt.block_on(first_bytes(to, connections, b"", GREETING)))
        }
        Command::Echo { to, connections } => {
            runtime(1).and_then(|rt| rt.block_on(first_bytes(to, connections, ECHO, ECHO)))
        }
        Command::Stream { to, host, connections } => {
            runtime(1).and_then(|rt| rt.block_on(first_event(to, &host, connections)))
        }
    };
    if let Err(error) = outcome {
        eprintln!("bench-peer: {error:#}");
        std::process::exit(1);
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    Ok(builder.enable_all().build()?)
}

async fn serve(config: Servers) -> Result<()> {
    let mut servers = JoinSet::new();
    for address in config.bulk {
        servers.spawn(accept_loop(bind(address).await?, serve_bulk));
    }
    for address in config.http {
        servers.spawn(accept_loop(bind(address).await?, serve_http));
    }
    for address in config.idle {
        servers.spawn(accept_loop(bind(address).await?, serve_idle));
    }
    servers.spawn(accept_loop(bind(config.keepalive).await?, serve_keepalive));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&config.cert, &config.key)?));
    for address in config.tls {
        let acceptor = acceptor.clone();
        servers.spawn(accept_loop(bind(address).await?, move |stream| {
            let accepting = acceptor.accept(stream);
            async move { serve_keepalive(accepting.await.context("TLS handshake")?).await }
        }));
    }
    for address in config.grpc {
        servers.spawn(peer_grpc::serve(bind(address).await?, server_config(&config.cert, &config.key)?));
    }
    for address in config.greeting {
        servers.spawn(accept_loop(bind(address).await?, serve_greeting));
    }
    for address in config.echo {
        servers.spawn(accept_loop(bind(address).await?, serve_echo));
    }
    servers.spawn(accept_loop(bind(config.sse).await?, serve_sse));
    servers.spawn(accept_loop(bind(config.upload).await?, serve_upload));
    println!("{}", json!({ "ready": true }));
    while let Some(done) = servers.join_next().await {
        done??;
    }
    Ok(())
}

async fn bind(address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address).await.with_context(|| format!("bind {address}"))
}

async fn accept_loop<F, Fut>(listener: TcpListener, handler: F) -> Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        // A client's failure is its own to report; the server carries on.
        tokio::spawn(handler(stream));
    }
}

async fn serve_bulk(mut stream: TcpStream) -> Result<()> {
    let mut header = [0u8; BULK_HEADER];
    stream.read_exact(&mut header).await?;
    ensure!(header[0] == OPAQUE, "not a bulk request");
    let upload = u64::from_be_bytes(header[1..9].try_into()?);
    let download = u64::from_be_bytes(header[9..17].try_into()?);
    let mut buffer = vec![0u8; CHUNK];
    let mut left = upload;
    while left > 0 {
        let n = stream.read(&mut buffer).await?;
        ensure!(n > 0, "upload ended {left} bytes early");
        left = left.saturating_sub(n as u64);
    }
    let mut left = download;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&buffer[..n]).await?;
        left -= n as u64;
    }
    // The client closes first, once it has everything.
    let _ = stream.read(&mut buffer).await;
    Ok(())
}

/// Answers one request and closes first, so TIME_WAIT stays on this side.
async fn serve_http(mut stream: TcpStream) -> Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buffer).await?;
        ensure!(n > 0 && head.len() < 16 * 1024, "bad request head");
        head.extend_from_slice(&buffer[..n]);
    }
    stream.write_all(HTTP_RESPONSE).await?;
    Ok(())
}

/// What a streaming provider sends: the head, then server-sent events as
/// chunks; a relay that buffered the response would hold the first event
/// for [`SSE_PAUSE`].
const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
const SSE_FIRST: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
const SSE_DONE: &[u8] = b"data: [DONE]\n\n";
const SSE_PAUSE: Duration = Duration::from_millis(20);

fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

/// One streamed request: reads the head and its Content-Length body, sends
/// the first event at once and the rest after a pause.
async fn serve_sse(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let (mut request, end, length) = read_request_head(&mut stream).await?;
    ensure!(length <= MAX_HEAD as u64, "request body too long");
    let mut buffer = [0u8; 4096];
    while request.len() < end + length as usize {
        let n = stream.read(&mut buffer).await?;
        ensure!(n > 0, "request body cut short");
        request.extend_from_slice(&buffer[..n]);
    }
    stream.write_all(&[SSE_HEAD, &chunk(SSE_FIRST)].concat()).await?;
    tokio::time::sleep(SSE_PAUSE).await;
    // The client may have gone after the first event: that is what it measures.
    let _ = stream.write_all(&[&chunk(SSE_DONE)[..], b"0\r\n\r\n"].concat()).await;
    Ok(())
}

/// A request head read from `stream`: the bytes read (the head and what
/// followed it), where the head ends, and its Content-Length (0 if none).
async fn read_request_head(stream: &mut TcpStream) -> Result<(Vec<u8>, usize, u64)> {
    let mut request = Vec::with_capacity(1024);
    let mut buffer = [0u8; 4096];
    let end = loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buffer).await?;
        ensure!(n > 0 && request.len() + n <= MAX_HEAD, "bad request head");
        request.extend_from_slice(&buffer[..n]);
    };
    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    Ok((request, end, length))
}

/// One upload: answers `100 Continue` at once when the client waits for
/// it (as nginx does), reads the Content-Length body, answers 200 and
/// closes first (TIME_WAIT on this side).
async fn serve_upload(mut stream: TcpStream) -> Result<()> {
    let (request, end, length) = read_request_head(&mut stream).await?;
    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
    if head.contains("\r\nexpect: 100-continue\r\n") {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let mut left = length.saturating_sub((request.len() - end) as u64);
    let mut buffer = vec![0u8; CHUNK];
    while left > 0 {
        let n = stream.read(&mut buffer).await?;
        ensure!(n > 0, "upload ended {left} bytes early");
        left = left.saturating_sub(n as u64);
    }
    stream.write_all(HTTP_RESPONSE).await?;
    Ok(())
}

/// Keep-alive HTTP/1.1 (plain or over TLS): answers every request head in
/// order, pipelined ones too (bodies are not expected). After a request
/// with `Connection: close` it closes first, so TIME_WAIT stays on this side.
async fn serve_keepalive<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Result<()> {
    let mut pending = Vec::with_capacity(1024);
    let mut buffer = [0u8; 4096];
    // Body bytes of the last request still to arrive and be dropped.
    let mut body_left = 0usize;
    loop {
        let dropped = body_left.min(pending.len());
        pending.drain(..dropped);
        body_left -= dropped;
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n").filter(|_| body_left == 0) {
            let head = pending[..end].to_ascii_lowercase();
            let close = head.windows(17).any(|w| w == b"connection: close");
            body_left = content_length(&head)?;
            pending.drain(..end + 4);
            let dropped = body_left.min(pending.len());
            pending.drain(..dropped);
            body_left -= dropped;
            if close {
                stream.write_all(HTTP_RESPONSE).await?;
                stream.shutdown().await?;
                return Ok(());
            }
            stream.write_all(KEEPALIVE_RESPONSE).await?;
        }
        // TLS holds written records until flushed.
        stream.flush().await?;
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        ensure!(pending.len() + n <= MAX_HEAD + buffer.len(), "request head too long");
        pending.extend_from_slice(&buffer[..n]);
    }
}

/// The Content-Length of a lower-cased request head; 0 without one.
fn content_length(head: &[u8]) -> Result<usize> {
    let text = String::from_utf8_lossy(head);
    let Some(value) = text.lines().find_map(|line| line.strip_prefix("content-length:")) else { return Ok(0) };
    let length: usize = value.trim().parse().context("bad Content-Length")?;
    ensure!(length <= 1 << 20, "request body too long");
    Ok(length)
}

/// Speaks first, then closes first (TIME_WAIT on this side).
async fn serve_greeting(mut stream: TcpStream) -> Result<()> {
    stream.write_all(GREETING).await?;
    Ok(())
}

async fn serve_echo(mut stream: TcpStream) -> Result<()> {
    let mut bytes = [0u8; ECHO.len()];
    stream.read_exact(&mut bytes).await?;
    stream.write_all(&bytes).await?;
    Ok(())
}

fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect)
        .with_context(|| format!("read {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Trusts `ca` only. No session resumption: every connection makes a full
/// handshake, as a new client process (curl, a script) does.
fn client_config(ca: &Path) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("read {}", ca.display()))? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Echoes one byte, then holds the connection until the client sends
/// `IDLE_CLOSE` (or closes).
async fn serve_idle(mut stream: TcpStream) -> Result<()> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    stream.write_all(&byte).await?;
    let _ = stream.read(&mut byte).await?;
    Ok(())
}

fn touch(route: &Route) -> Result<()> {
    let mut stream = std::net::TcpStream::connect_timeout(&route.to, STEP_TIMEOUT)
        .with_context(|| format!("connect {}", route.to))?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.write_all(&[OPAQUE])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    // The server refuses the byte and closes (or the agent resets): either ends it.
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    println!("{}", json!({ "touched": route.to.to_string() }));
    Ok(())
}

/// Blocking, one stream: the simplest fastest loop.
fn bulk(route: &Route, bytes: u64) -> Result<()> {
    let mut stream = std::net::TcpStream::connect_timeout(&route.to, STEP_TIMEOUT)
        .with_context(|| format!("connect {}", route.to))?;
    stream.set_read_timeout(Some(BULK_TIMEOUT))?;
    stream.set_write_timeout(Some(BULK_TIMEOUT))?;
    if let Some(authority) = &route.connect {
        stream.write_all(connect_request(authority).as_bytes())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        // Byte by byte, so nothing past the head is consumed; outside the timed part.
        while !head.ends_with(b"\r\n\r\n") {
            ensure!(stream.read(&mut byte)? == 1 && head.len() < 16 * 1024, "proxy closed during CONNECT");
            head.push(byte[0]);
        }
        check_connect_response(&head)?;
    }
    let deadline = Instant::now() + BULK_TIMEOUT;
    let mut header = [0u8; BULK_HEADER];
    header[0] = OPAQUE;
    header[1..9].copy_from_slice(&bytes.to_be_bytes());
    header[9..17].copy_from_slice(&bytes.to_be_bytes());
    let buffer = vec![0u8; CHUNK];
    let started = Instant::now();
    stream.write_all(&header)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&buffer[..n])?;
        left -= n as u64;
        ensure!(Instant::now() < deadline, "upload took over {BULK_TIMEOUT:?}");
    }
    // The upload is done when the server has read it all, i.e. when it starts answering.
    let mut buffer = buffer;
    let mut left = bytes;
    let first = stream.read(&mut buffer)?;
    ensure!(first > 0, "server closed before the download");
    let uploaded = started.elapsed();
    left -= first as u64;
    while left > 0 {
        let n = stream.read(&mut buffer)?;
        ensure!(n > 0, "download ended {left} bytes early");
        left = left.saturating_sub(n as u64);
        ensure!(Instant::now() < deadline, "download took over {BULK_TIMEOUT:?}");
    }
    let downloaded = started.elapsed() - uploaded;
    let gbps = |elapsed: Duration| bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9;
    println!("{}", json!({ "upload_gbps": gbps(uploaded), "download_gbps": gbps(downloaded) }));
    Ok(())
}

async fn http(route: Route, host: String, requests: usize, concurrency: usize) -> Result<()> {
    ensure!(requests > 0 && concurrency > 0, "requests and concurrency must be positive");
    let request: Arc<[u8]> = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes().into();
    let next = Arc::new(AtomicUsize::new(0));
    let route = Arc::new(route);
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(requests) {
        let (next, route, request) = (next.clone(), route.clone(), request.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                match tokio::time::timeout(STEP_TIMEOUT, one_request(&route, &request)).await {
                    Ok(Ok(latency)) => latencies.push(latency),
                    Ok(Err(error)) => errors.push(format!("{error:#}")),
                    Err(_) => errors.push(format!("request timed out after {STEP_TIMEOUT:?}")),
                }
            }
            (latencies, errors)
        });
    }
    let (mut latencies, mut errors) = (Vec::with_capacity(requests), Vec::new());
    while let Some(done) = workers.join_next().await {
        let (more, failed) = done?;
        latencies.extend(more);
        errors.extend(failed);
    }
    let elapsed = started.elapsed();
    if latencies.is_empty() {
        bail!("all {requests} requests failed, e.g.: {}", errors.first().map_or("", String::as_str));
    }
    latencies.sort_unstable();
    println!(
        "{}",
        json!({
            "p50_us": percentile_us(&latencies, 0.50),
            "p99_us": percentile_us(&latencies, 0.99),
            "conn_per_s": latencies.len() as f64 / elapsed.as_secs_f64(),
            "errors": errors.len(),
            "first_error": errors.first(),
        })
    );
    Ok(())
}

/// `sorted[p]`, in µs.
fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
}

/// Connect (and tunnel), send the request, read the whole response: the
/// latency. Then read on to the server's close, so TIME_WAIT lands there.
async fn one_request(route: &Route, request: &[u8]) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = open(route).await?;
    stream.write_all(request).await?;
    read_response(&mut stream).await?;
    let complete = started.elapsed();
    let mut buffer = [0u8; 4096];
    while stream.read(&mut buffer).await? > 0 {}
    Ok(complete)
}

/// Reads one whole 200 response, and not a byte more.
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Result<()> {
    let mut response = Vec::with_capacity(512);
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer).await?;
        ensure!(n > 0, "connection closed before a complete response ({} bytes)", response.len());
        response.extend_from_slice(&buffer[..n]);
        if let Some(length) = complete_response_len(&response)? {
            ensure!(response.len() == length, "bytes past the response");
            return Ok(());
        }
        ensure!(response.len() <= MAX_HEAD, "response head too long");
    }
}

/// The length of a complete 200 response with a Content-Length body, `None` while incomplete.
fn complete_response_len(response: &[u8]) -> Result<Option<usize>> {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4) else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&response[..head_end]).context("response head is not UTF-8")?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    ensure!(status == "200", "HTTP {status}: {}", String::from_utf8_lossy(response));
    let length: usize = head
        .lines()
        .find_map(|line| line.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("content-length")))
        .context("response without Content-Length")?
        .1
        .trim()
        .parse()?;
    Ok((response.len() >= head_end + length).then_some(head_end + length))
}

async fn open(route: &Route) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(route.to).await.with_context(|| format!("connect {}", route.to))?;
    stream.set_nodelay(true)?;
    if let Some(authority) = &route.connect {
        stream.write_all(connect_request(authority).as_bytes()).await?;
        read_head(&mut stream).await?;
    }
    Ok(stream)
}

fn connect_request(authority: &str) -> String {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
}

/// Reads the proxy's answer to CONNECT, up to the end of its head, and checks it.
async fn read_head(stream: &mut TcpStream) -> Result<()> {
    let mut head = Vec::with_capacity(128);
    let mut buffer = [0u8; 1024];
    loop {
        let n = stream.read(&mut buffer).await?;
        ensure!(n > 0, "proxy closed during CONNECT: {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buffer[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            check_connect_response(&head)?;
            // Our servers never speak first: more bytes would be the proxy's own.
            ensure!(end + 4 == head.len(), "proxy sent bytes past its CONNECT response: {}", head.escape_ascii());
            return Ok(());
        }
        ensure!(head.len() < 16 * 1024, "CONNECT response head too long");
    }
}

fn check_connect_response(head: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(head);
    ensure!(text.split_whitespace().nth(1) == Some("200"), "CONNECT refused: {}", text.trim());
    Ok(())
}

async fn idle(route: Route, count: usize) -> Result<()> {
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    let mut opening = JoinSet::new();
    let route = Arc::new(route);
    let mut launched = 0;
    while held.len() < count {
        while launched < count && opening.len() < OPENING_AT_ONCE {
            let route = route.clone();
            opening.spawn(async move {
                tokio::time::timeout(STEP_TIMEOUT, async {
                    let mut stream = open(&route).await?;
                    stream.write_all(&[OPAQUE]).await?;
                    let mut echo = [0u8; 1];
                    stream.read_exact(&mut echo).await.context("no echo")?;
                    anyhow::Ok(stream)
                })
                .await
                .context("opening a connection timed out")?
            });
            launched += 1;
        }
        let opened = opening.join_next().await.context("no connection being opened")??;
        held.push(opened.with_context(|| format!("connection {} of {count}", held.len() + 1))?);
    }
    println!("{}", json!({ "established": held.len(), "secs": started.elapsed().as_secs_f64() }));
    // Until the caller has measured: it closes our stdin (or we give up).
    let mut line = String::new();
    let _ = tokio::time::timeout(HOLD_LIMIT, BufReader::new(tokio::io::stdin()).read_line(&mut line)).await;
    let mut closing = JoinSet::new();
    for mut stream in held {
        closing.spawn(async move {
            stream.write_all(&[IDLE_CLOSE]).await?;
            let mut rest = [0u8; 1];
            ensure!(stream.read(&mut rest).await? == 0, "the server sent more than its echo");
            anyhow::Ok(())
        });
    }
    tokio::time::timeout(STEP_TIMEOUT, async {
        while let Some(closed) = closing.join_next().await {
            closed??;
        }
        anyhow::Ok(())
    })
    .await
    .context("the servers did not close every idle connection")?
}

/// What the `tls` client sends: a `GET`, or a JSON `POST` with `body`.
struct Request {
    path: String,
    body: Option<Vec<u8>>,
}

impl Request {
    fn bytes(&self, name: &str, close: bool) -> Vec<u8> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let path = &self.path;
        match &self.body {
            None => format!("GET {path} HTTP/1.1\r\nHost: {name}\r\n{connection}\r\n").into_bytes(),
            Some(body) => [
                format!(
                    "POST {path} HTTP/1.1\r\nHost: {name}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n{connection}\r\n",
                    body.len()
                )
                .as_bytes(),
                body,
            ]
            .concat(),
        }
    }
}

async fn tls(
    to: SocketAddr,
    ca: &Path,
    name: String,
    connections: usize,
    requests: usize,
    request: Request,
) -> Result<()> {
    ensure!(connections > 0 && requests > 1, "at least one connection and two requests on each");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca)?));
    let server_name = ServerName::try_from(name.clone())?;
    let keep_alive = request.bytes(&name, false);
    let last = request.bytes(&name, true);
    let mut first = Vec::with_capacity(connections);
    let mut later = Vec::with_capacity(connections * (requests - 1));
    for n in 1..=connections {
        let connection = async {
            let started = Instant::now();
            let tcp = TcpStream::connect(to).await.with_context(|| format!("connect {to}"))?;
            tcp.set_nodelay(true)?;
            let mut stream = connector.connect(server_name.clone(), tcp).await.context("TLS handshake")?;
            for i in 0..requests {
                let sent = Instant::now();
                let request = if i + 1 == requests { &last } else { &keep_alive };
                stream.write_all(request).await?;
                stream.flush().await?;
                read_response(&mut stream).await.with_context(|| format!("request {}", i + 1))?;
                if i == 0 {
                    first.push(started.elapsed());
                } else {
                    later.push(sent.elapsed());
                }
            }
            // The server closes after the last response (TIME_WAIT on its side);
            // a relay may close without TLS's close_notify.
            let mut rest = [0u8; 64];
            match stream.read(&mut rest).await {
                Ok(0) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
                Ok(_) => bail!("bytes past the last response"),
                Err(error) => Err(error.into()),
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, connection)
            .await
            .context("timed out")
            .and_then(|done| done)
            .with_context(|| format!("TLS connection {n} of {connections}"))?;
    }
    first.sort_unstable();
    later.sort_unstable();
    println!(
        "{}",
        json!({
            "new_p50_us": percentile_us(&first, 0.50),
            "new_p99_us": percentile_us(&first, 0.99),
            "keepalive_p50_us": percentile_us(&later, 0.50),
            "keepalive_p99_us": percentile_us(&later, 0.99),
        })
    );
    Ok(())
}

/// Connections one after another: each connects, sends `send`, and is timed
/// until `expect` arrived; then reads on to the server's close (TIME_WAIT there).
/// Streamed requests one after another: p50/p99 from connect to the first
/// event's bytes (`data:` past the response head).
async fn first_event(to: SocketAddr, host: &str, connections: usize) -> Result<()> {
    ensure!(connections > 0, "connections must be positive");
    let body = r#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut latencies = Vec::with_capacity(connections);
    for n in 1..=connections {
        let connection = async {
            let started = Instant::now();
            let mut stream = TcpStream::connect(to).await.with_context(|| format!("connect {to}"))?;
            stream.set_nodelay(true)?;
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::with_capacity(1024);
            let mut buffer = [0u8; 4096];
            loop {
                let read = stream.read(&mut buffer).await?;
                ensure!(read > 0, "closed before the first event: {}", response.escape_ascii());
                response.extend_from_slice(&buffer[..read]);
                let head_end = response.windows(4).position(|w| w == b"\r\n\r\n");
                if head_end.is_some_and(|end| response[end..].windows(5).any(|w| w == b"data:")) {
                    break;
                }
                ensure!(response.len() <= MAX_HEAD, "no event in {} bytes", response.len());
            }
            let latency = started.elapsed();
            ensure!(response.starts_with(b"HTTP/1.1 200"), "not a 200: {}", response.escape_ascii());
            Ok(latency)
        };
        let latency = tokio::time::timeout(STEP_TIMEOUT, connection)
            .await
            .context("timed out")
            .and_then(|done| done)
            .with_context(|| format!("request {n} of {connections}"))?;
        latencies.push(latency);
    }
    latencies.sort_unstable();
    println!("{}", json!({ "p50_us": percentile_us(&latencies, 0.50), "p99_us": percentile_us(&latencies, 0.99) }));
    Ok(())
}

async fn first_bytes(to: SocketAddr, connections: usize, send: &[u8], expect: &[u8]) -> Result<()> {
    ensure!(connections > 0, "connections must be positive");
    let mut latencies = Vec::with_capacity(connections);
    for n in 1..=connections {
        let connection = async {
            let started = Instant::now();
            let mut stream = TcpStream::connect(to).await.with_context(|| format!("connect {to}"))?;
            stream.set_nodelay(true)?;
            stream.write_all(send).await?;
            let mut got = vec![0u8; expect.len()];
            stream.read_exact(&mut got).await.context("closed early")?;
            let latency = started.elapsed();
            ensure!(got == expect, "expected {}, got {}", expect.escape_ascii(), got.escape_ascii());
            let mut rest = [0u8; 64];
            ensure!(stream.read(&mut rest).await? == 0, "bytes past the expected ones");
            Ok(latency)
        };
        let latency = tokio::time::timeout(STEP_TIMEOUT, connection)
            .await
            .context("timed out")
            .and_then(|done| done)
            .with_context(|| format!("connection {n} of {connections}"))?;
        latencies.push(latency);
    }
    latencies.sort_unstable();
    println!("{}", json!({ "p50_us": percentile_us(&latencies, 0.50), "p99_us": percentile_us(&latencies, 0.99) }));
    Ok(())
}
