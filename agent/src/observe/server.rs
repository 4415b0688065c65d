//! `--metrics-listen`: Prometheus text at `GET /metrics`, nothing else.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};

use super::{Observer, Scrape};

/// Scrapers served at once; more wait in the backlog.
const MAX_SCRAPERS: usize = 8;
const MAX_REQUEST_HEAD: usize = 8192;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon reports at scrape time.
pub type Gauges = Arc<dyn Fn() -> Scrape + Send + Sync>;

/// The metrics endpoint served in the background.
pub struct MetricsServer {
    /// A duplicate of the listening socket, for an upgrade to hand over.
    socket: OwnedFd,
    stop: watch::Sender<bool>,
}

impl MetricsServer {
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Stops accepting; scrapes under way finish.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Binds `address` (so a taken port fails the start), or takes the socket
/// an upgrade handed over (`inherited`), and serves it.
pub async fn serve_metrics(
    address: SocketAddr,
    observer: Arc<Observer>,
    gauges: Gauges,
    inherited: Option<OwnedFd>,
) -> Result<MetricsServer> {
    let listener = match inherited {
        Some(fd) => {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)?
        }
        None => TcpListener::bind(address).await.with_context(|| format!("cannot serve metrics on {address}"))?,
    };
    let bound = listener.local_addr()?;
    let socket = listener.as_fd().try_clone_to_owned().context("duplicate the metrics socket")?;
    observer.set_metrics_address(bound);
    tracing::info!(event = "metrics_listening", address = %bound, "metrics at http://{bound}/metrics");
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // A handle dropped without `stop` leaves it serving.
                Ok(_) = stopped.wait_for(|stop| *stop) => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (observer, gauges) = (observer.clone(), gauges.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(stream, &observer, &gauges)).await;
                drop(slot);
            });
        }
    });
    Ok(MetricsServer { socket, stop })
}

async fn scrape(mut stream: TcpStream, observer: &Observer, gauges: &Gauges) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 || head.len() + read > MAX_REQUEST_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(&head).is_ok_and(|status| status.is_complete());
    let path = request.path.map(|path| path.split('?').next().unwrap_or(path));
    let (status, content_type, body) = match (parsed, request.method, path) {
        (true, Some("GET"), Some("/metrics")) => {
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", observer.encode(&gauges()))
        }
        (true, Some("GET"), Some(_)) => ("404 Not Found", "text/plain", "only /metrics is served\n".to_owned()),
        _ => ("400 Bad Request", "text/plain", "GET /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
