//! Server-first streams: a client that has sent nothing yet may be waiting
//! for the server (SSH, SMTP, MySQL). If the address alone allows the
//! stream, the agent connects early and lets whichever side speaks first
//! go, instead of waiting on the sniffer.
//!
//! A connection the server accepted is seen there even if it is reset at
//! once, so the agent connects before the client's bytes are decided only
//! for a client silent at accept that stays silent for [`CLIENT_GRACE`]
//! (at once, to a destination whose server spoke first recently). A client
//! that speaks before is decided on its bytes, then connected: a server
//! never sees a connection for a stream those bytes deny. An early
//! connection that is not used is reset, never closed with a FIN nor relayed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    net::{TcpSocket, TcpStream},
    time::{sleep_until, timeout, Instant},
};

use crate::conn::{Context, Origin, Verdict};

/// How long a client silent at accept is waited for before the agent
/// connects early. Clients that speak first do so at once (a TLS
/// ClientHello takes about a millisecond to build), while the server of a
/// server-first protocol is waited for by its client.
pub const CLIENT_GRACE: Duration = Duration::from_millis(50);

/// How long a destination whose server spoke first is connected at once.
const GREETER_MEMORY: Duration = Duration::from_secs(600);

/// Destinations remembered per sandbox; more are waited for as unknown ones.
const MAX_GREETERS: usize = 256;

/// An upstream connected before the client spoke, with the decision (on the
/// address alone) that allowed it. Until it is taken for relaying, dropping
/// it resets the connection (zero linger): the server sees no FIN, and no
/// byte was written to it.
pub struct Early {
    upstream: TcpStream,
    pub verdict: Verdict,
}

impl Early {
    /// The allowed upstream address it is connected to.
    pub fn address(&self) -> SocketAddr {
        self.verdict.outcome.as_ref().map(|allowed| allowed.upstream).expect("only allowed ones connect")
    }

    /// The decision and the connection, to be relayed: closed normally from now on.
    pub fn adopt(self) -> (Verdict, TcpStream) {
        // Linger off again (None never blocks), so the relay's end is a FIN.
        #[allow(deprecated)]
        let _ = self.upstream.set_linger(None);
        (self.verdict, self.upstream)
    }
}

/// Who spoke first on a stream connected early.
pub enum FirstSpeaker {
    /// The server (or nobody within the first-byte timeout): relay at once.
    Server(Early),
    /// The client: sniff its bytes, keeping the connection for the route.
    Client(Early),
}

/// The destinations of one sandbox whose server spoke first (a greeting),
/// and when: those are connected without waiting for the client.
#[derive(Default)]
pub struct Greeters {
    seen: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Greeters {
    fn greeted_recently(&self, destination: SocketAddr) -> bool {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(&destination).is_some_and(|at| at.elapsed() < GREETER_MEMORY)
    }

    fn greeted(&self, destination: SocketAddr) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= MAX_GREETERS && !seen.contains_key(&destination) {
            seen.retain(|_, at| at.elapsed() < GREETER_MEMORY);
            if seen.len() >= MAX_GREETERS {
                return;
            }
        }
        seen.insert(destination, Instant::now());
    }
}

/// For a client that has not spoken, the early connection and who spoke
/// first on it; `None` when the client speaks before the agent connects (its
/// bytes are decided first), the address alone does not allow the stream,
/// or the connect failed (the usual path then reports it).
pub async fn race(client: &TcpStream, origin: &Origin, context: &Context, greeters: &Greeters) -> Option<FirstSpeaker> {
    if has_bytes_or_end(client) {
        return None;
    }
    let started = Instant::now();
    let destination = origin.destination;
    let verdict = context.decider.stream(origin, None, destination).await;
    // An inspected endpoint's bytes are never relayed raw, whoever speaks first.
    let address = verdict.outcome.as_ref().ok().filter(|allowed| allowed.inspect.is_none())?.upstream;
    if !greeters.greeted_recently(destination) && timeout(CLIENT_GRACE, spoke(client)).await.is_ok() {
        return None;
    }
    // A client that speaks while the connect is under way is not kept
    // waiting for it: its bytes are decided first (and the half-made
    // connection dropped, reset if it completed).
    let upstream = tokio::select! {
        biased;
        () = spoke(client) => return None,
        connected = timeout(context.config.connect_timeout, connect_resetting(address)) => connected.ok()?.ok()?,
    };
    let connected = Early { upstream, verdict };
    let server_first = tokio::select! {
        biased;
        () = spoke(client) => false,
        () = spoke(&connected.upstream) => {
            greeters.greeted(destination);
            true
        }
        () = sleep_until(started + context.config.sniff.first_byte_timeout) => true,
    };
    Some(if server_first { FirstSpeaker::Server(connected) } else { FirstSpeaker::Client(connected) })
}

/// A connection to `address` that is reset, not closed, if dropped before
/// [`Early::adopt`] (including while it is being made).
async fn connect_resetting(address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_zero_linger()?;
    socket.set_nodelay(true)?;
    socket.connect(address).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeters_are_remembered_up_to_the_bound() {
        let greeters = Greeters::default();
        let at = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
        assert!(!greeters.greeted_recently(at(1)));
        for port in 1..=MAX_GREETERS as u16 {
            greeters.greeted(at(port));
        }
        assert!(greeters.greeted_recently(at(1)) && greeters.greeted_recently(at(MAX_GREETERS as u16)));
        // Full of recent ones: a new destination is not remembered, a known one is refreshed.
        greeters.greeted(at(MAX_GREETERS as u16 + 1));
        assert!(!greeters.greeted_recently(at(MAX_GREETERS as u16 + 1)));
        greeters.greeted(at(1));
        assert!(greeters.greeted_recently(at(1)));
    }
}
