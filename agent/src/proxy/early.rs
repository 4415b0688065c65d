//! Server-first streams: a client that has sent nothing yet may be waiting
//! for the server (SSH, SMTP, MySQL). If the address alone allows the
//! stream, the agent connects at once and lets whichever side speaks first
//! go, instead of waiting on the sniffer.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::conn::{Context, Origin, Verdict};

/// An upstream connected before the client spoke, with the decision (on the
/// address alone) that allowed it.
pub struct Early {
    pub upstream: TcpStream,
    pub verdict: Verdict,
}

impl Early {
    pub fn into_stream(self) -> (SocketAddr, TcpStream) {
        let address = self.verdict.outcome.as_ref().map(|allowed| allowed.upstream).expect("only allowed ones connect");
        (address, self.upstream)
    }
}

/// Who spoke first on a stream connected early.
pub enum FirstSpeaker {
    /// The server (or nobody within the first-byte timeout): relay at once.
    Server(Early),
    /// The client: sniff its bytes, keeping the connection for the route.
    Client(Early),
}

/// For a client that has not spoken, the early connection and who spoke
/// first on it; `None` when the client spoke already, the address alone does
/// not allow the stream, or the connect failed (the usual path then reports it).
pub async fn race(client: &TcpStream, origin: &Origin, context: &Context) -> Option<FirstSpeaker> {
    if has_bytes_or_end(client) {
        return None;
    }
    let connected = connect_early(origin, context).await?;
    let first_byte_timeout = context.config.sniff.first_byte_timeout;
    let server_first = tokio::select! {
        biased;
        () = spoke(client) => false,
        () = spoke(&connected.upstream) => true,
        _ = tokio::time::sleep(first_byte_timeout) => true,
    };
    Some(if server_first { FirstSpeaker::Server(connected) } else { FirstSpeaker::Client(connected) })
}

/// Connects to the destination if the address alone allows the stream
/// (an IP-literal or `allowed_ips` endpoint, or a name this sandbox
/// resolved); `None` otherwise, or if the connect fails.
async fn connect_early(origin: &Origin, context: &Context) -> Option<Early> {
    let verdict = context.decider.stream(origin, None, origin.destination).await;
    // An inspected endpoint's bytes are never relayed raw, whoever speaks first.
    let address = verdict.outcome.as_ref().ok().filter(|allowed| allowed.inspect.is_none())?.upstream;
    let connect = TcpStream::connect(address);
    let upstream = tokio::time::timeout(context.config.connect_timeout, connect).await.ok()?.ok()?;
    let _ = upstream.set_nodelay(true);
    Some(Early { upstream, verdict })
}

/// Whether the client has sent a byte (or closed) already.
fn has_bytes_or_end(client: &TcpStream) -> bool {
    !matches!(peek(client), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
}

/// Returns once the peer has sent a byte or closed. (Readiness alone can be
/// spurious, notably on a socket just accepted.)
async fn spoke(stream: &TcpStream) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_io(tokio::io::Interest::READABLE, || peek(stream)) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            _ => return,
        }
    }
}

/// A peek at one byte that does not wait: `WouldBlock` if none is there.
fn peek(stream: &TcpStream) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`; MSG_PEEK leaves it queued.
    let received =
        unsafe { libc::recv(stream.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if received < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(received as usize)
}
