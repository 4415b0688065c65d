//! Byte relay between the sandboxed client and the upstream.
//!
//! Each direction copies until EOF and then half-closes its writer, so a FIN
//! travels end to end. Byte counts survive errors: the close log always says
//! how much went each way. Two plain TCP sockets are joined with splice(2)
//! through a pipe, so the payload never enters userspace; any other stream
//! (e.g. TLS terminated by the agent) goes through a userspace buffer.

use std::{
    future::poll_fn,
    io,
    os::fd::OwnedFd,
    pin::Pin,
    task::Poll,
};

use nix::{
    fcntl::{splice, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

const BUFFER_SIZE: usize = 64 * 1024;

/// Bytes a caller already read from one side, sent before anything relayed.
#[derive(Debug, Default)]
pub struct Prefill {
    /// Read from the client (e.g. a sniffed request head).
    pub to_upstream: Vec<u8>,
    /// Read from the upstream (e.g. bytes past an HTTP 101 response head).
    pub to_client: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
    /// The first error of either direction; the relay stops at it.
    pub error: Option<io::Error>,
}

/// Relays two TCP sockets with splice(2), prefill first.
pub async fn relay(client: TcpStream, upstream: TcpStream, prefill: Prefill) -> Outcome {
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let mut outcome = Outcome::default();
    let result = tokio::try_join!(
        splice_until_eof(client_read, upstream_write, prefill.to_upstream, &mut outcome.bytes_up),
        splice_until_eof(upstream_read, client_write, prefill.to_client, &mut outcome.bytes_down),
    );
    outcome.error = result.err();
    outcome
}

/// Relays any two streams through a userspace buffer, prefill first.
#[cfg_attr(not(test), expect(dead_code, reason = "for TLS-terminated streams; the proxy does not terminate TLS yet"))]
pub async fn relay_streams<C, U>(client: C, upstream: U, prefill: Prefill) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let mut outcome = Outcome::default();
    let result = tokio::try_join!(
        copy_until_eof(client_read, upstream_write, prefill.to_upstream, &mut outcome.bytes_up),
        copy_until_eof(upstream_read, client_write, prefill.to_client, &mut outcome.bytes_down),
    );
    outcome.error = result.err();
    outcome
}

/// One direction of `relay`: socket -> pipe -> socket until EOF.
///
/// `delivered` counts bytes spliced out of the pipe into `to`, updated as they
/// go, so it stays right when this future fails or is dropped part-way.
async fn splice_until_eof(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    prefill: Vec<u8>,
    delivered: &mut u64,
) -> io::Result<()> {
    write_all_counted(&mut to, &prefill, delivered).await?;
    drop(prefill);
    loop {
        // Take a pipe only once data (or EOF) is really there and give it back
        // when the socket runs dry, so an idle connection holds none. Readiness
        // alone proves nothing: tokio reports an accepted socket readable
        // before anything has arrived.
        if from.peek(&mut [0u8; 1]).await? == 0 {
            return to.shutdown().await;
        }
        let pipe = Pipe::new()?;
        loop {
            // The pipe is empty here (drained below), so WouldBlock can only
            // mean that the socket has nothing more to read.
            let mut in_pipe = match from.as_ref().try_io(Interest::READABLE, || pipe.fill_from(from.as_ref())) {
                Ok(0) => return to.shutdown().await,
                Ok(spliced) => spliced,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            };
            // Drain fully before reading again: this keeps the WouldBlock above
            // unambiguous and guarantees nothing is left behind at EOF.
            while in_pipe > 0 {
                to.writable().await?;
                match to.as_ref().try_io(Interest::WRITABLE, || pipe.drain_to(to.as_ref(), in_pipe)) {
                    Ok(spliced) => {
                        in_pipe -= spliced;
                        *delivered += spliced as u64;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }
}

/// A pipe carrying one direction of a relay. Dropping it closes both ends.
struct Pipe {
    read_end: OwnedFd,
    write_end: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read_end, write_end) = pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        if let Some(size) = std::env::var("SE_RELAY_PIPE_SIZE").ok().and_then(|v| v.parse::<i32>().ok()) {
            let _ = nix::fcntl::fcntl(&write_end, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size));
        }
        Ok(Self { read_end, write_end })
    }

    /// Moves what `socket` has ready into the pipe, up to the pipe's capacity.
    fn fill_from(&self, socket: &TcpStream) -> io::Result<usize> {
        // The pipe, not `len`, bounds each call: the kernel stops when the pipe is full.
        Ok(splice(socket, None, &self.write_end, None, SPLICE_MAX_LEN, SPLICE_FLAGS)?)
    }

    /// Moves up to `len` bytes from the pipe into `socket`.
    fn drain_to(&self, socket: &TcpStream, len: usize) -> io::Result<usize> {
        Ok(splice(&self.read_end, None, socket, None, len, SPLICE_FLAGS)?)
    }
}

/// Larger than any pipe; the kernel clamps it anyway (MAX_RW_COUNT).
const SPLICE_MAX_LEN: usize = 1 << 30;

/// NONBLOCK: never wait on the pipe (the sockets are non-blocking already).
/// MOVE: hand over socket pages instead of copying where the kernel can.
const SPLICE_FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// One direction of `relay_streams`: read -> buffer -> write until EOF.
async fn copy_until_eof<R, W>(mut from: R, mut to: W, prefill: Vec<u8>, delivered: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    write_all_counted(&mut to, &prefill, delivered).await?;
    drop(prefill);
    // A generic stream has no readiness to wait on, so the first read takes a
    // single byte and the buffer is allocated once that byte arrives: an idle
    // connection holds no buffer.
    let mut first_byte = [0u8; 1];
    if from.read(&mut first_byte).await? == 0 {
        return to.shutdown().await;
    }
    let mut buffer = vec![0u8; BUFFER_SIZE];
    buffer[0] = first_byte[0];
    let mut filled = 1 + read_without_waiting(&mut from, &mut buffer[1..]).await?;
    loop {
        write_all_counted(&mut to, &buffer[..filled], delivered).await?;
        filled = from.read(&mut buffer).await?;
        if filled == 0 {
            return to.shutdown().await;
        }
    }
}

/// Reads what `from` has ready now; 0 if nothing is (EOF shows on the next read).
async fn read_without_waiting<R: AsyncRead + Unpin>(from: &mut R, buffer: &mut [u8]) -> io::Result<usize> {
    let mut buffer = ReadBuf::new(buffer);
    poll_fn(|context| match Pin::new(&mut *from).poll_read(context, &mut buffer) {
        Poll::Ready(result) => Poll::Ready(result),
        Poll::Pending => Poll::Ready(Ok(())),
    })
    .await?;
    Ok(buffer.filled().len())
}

/// `write_all` that counts each write as it lands, so the count stays right
/// when it fails or is dropped part-way.
async fn write_all_counted<W: AsyncWrite + Unpin>(to: &mut W, mut bytes: &[u8], delivered: &mut u64) -> io::Result<()> {
    while !bytes.is_empty() {
        let written = to.write(bytes).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *delivered += written as u64;
        bytes = &bytes[written..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, time::Duration};

    use tokio::{
        io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
        task::JoinHandle,
        time::{sleep, timeout},
    };

    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Tests that count this process's pipes and sockets hold it exclusively;
    /// every other test that opens any holds it shared.
    static FD_COUNTING: RwLock<()> = RwLock::const_new(());

    async fn shared_fds() -> RwLockReadGuard<'static, ()> {
        FD_COUNTING.read().await
    }

    async fn exclusive_fds() -> RwLockWriteGuard<'static, ()> {
        FD_COUNTING.write().await
    }

    /// Distinct open pipes or sockets (`kind` "pipe:" or "socket:"). Counted by
    /// inode, not fd: each tokio runtime dups one global signal socket, so the
    /// fd count moves as other tests' runtimes come and go.
    fn count_open(kind: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("list /proc/self/fd")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with(kind))
            .collect::<HashSet<_>>()
            .len()
    }

    #[derive(Clone, Copy)]
    enum Relay {
        Splice,
        Streams,
    }

    impl Relay {
        async fn run(self, client: TcpStream, upstream: TcpStream, prefill: Prefill) -> Outcome {
            match self {
                Relay::Splice => relay(client, upstream, prefill).await,
                Relay::Streams => relay_streams(client, upstream, prefill).await,
            }
        }
    }

    /// A connected loopback pair: (connecting end, accepted end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let address = listener.local_addr().expect("listener address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    struct Relayed {
        client_app: TcpStream,
        upstream_app: TcpStream,
        relay: JoinHandle<Outcome>,
    }

    impl Relayed {
        async fn start(relay: Relay, prefill: Prefill) -> Self {
            let (client_app, client_agent) = tcp_pair().await;
            let (upstream_agent, upstream_app) = tcp_pair().await;
            let relay = tokio::spawn(relay.run(client_agent, upstream_agent, prefill));
            Self { client_app, upstream_app, relay }
        }
    }

    async fn finish(relay: JoinHandle<Outcome>) -> Outcome {
        timeout(Duration::from_secs(30), relay)
            .await
            .expect("relay finished in time")
            .expect("relay task did not panic")
    }

    /// Deterministic pseudo-random bytes repeating with a prime period, so a
    /// chunk lost, repeated or reordered at any page-sized boundary shows up
    /// as a mismatch at a known offset.
    struct Pattern {
        period: Vec<u8>,
    }

    impl Pattern {
        const PERIOD: usize = 65_521;

        fn new(seed: u64) -> Self {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let period = (0..Self::PERIOD)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 56) as u8
                })
                .collect();
            Self { period }
        }

        fn at(&self, offset: u64, len: usize) -> &[u8] {
            let start = (offset % Self::PERIOD as u64) as usize;
            &self.period[start..(start + len).min(Self::PERIOD)]
        }

        /// Sends `len` bytes of the pattern, then half-closes.
        async fn send(&self, to: &mut (impl AsyncWrite + Unpin), len: u64) {
            let mut sent = 0;
            while sent < len {
                let chunk = self.at(sent, (len - sent).min(Self::PERIOD as u64) as usize);
                to.write_all(chunk).await.expect("send pattern");
                sent += chunk.len() as u64;
            }
            to.shutdown().await.expect("half-close after pattern");
        }

        /// Reads to EOF checking every byte; returns how many arrived.
        async fn receive(&self, from: &mut (impl AsyncRead + Unpin)) -> u64 {
            let mut buffer = vec![0u8; 64 * 1024];
            let mut received = 0u64;
            loop {
                let read = from.read(&mut buffer).await.expect("receive pattern");
                if read == 0 {
                    return received;
                }
                let mut checked = 0;
                while checked < read {
                    let expected = self.at(received, read - checked);
                    assert!(
                        buffer[checked..checked + expected.len()] == *expected,
                        "pattern mismatch within {} bytes from offset {received}",
                        expected.len()
                    );
                    checked += expected.len();
                    received += expected.len() as u64;
                }
            }
        }
    }

    async fn check_large_transfer_both_ways(relay: Relay) {
        let _fds = shared_fds().await;
        const LEN: u64 = 64 * MIB;
        let relayed = Relayed::start(relay, Prefill::default()).await;
        let (mut client_read, mut client_write) = relayed.client_app.into_split();
        let (mut upstream_read, mut upstream_write) = relayed.upstream_app.into_split();
        let (up, down) = (Pattern::new(1), Pattern::new(2));
        let ((), (), arrived_up, arrived_down) = tokio::join!(
            up.send(&mut client_write, LEN),
            down.send(&mut upstream_write, LEN),
            up.receive(&mut upstream_read),
            down.receive(&mut client_read),
        );
        assert_eq!((arrived_up, arrived_down), (LEN, LEN));
        let outcome = finish(relayed.relay).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!((outcome.bytes_up, outcome.bytes_down), (LEN, LEN));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_carries_64_mib_each_way_at_once_intact() {
        check_large_transfer_both_ways(Relay::Splice).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_streams_carries_64_mib_each_way_at_once_intact() {
        check_large_transfer_both_ways(Relay::Streams).await;
    }

    async fn check_prefill_goes_first_and_counts(relay: Relay) {
        let _fds = shared_fds().await;
        let prefill = Prefill {
            to_upstream: b"GET / HTTP/1.1\r\n".to_vec(),
            to_client: b"bytes past the 101 head|".to_vec(),
        };
        let mut relayed = Relayed::start(relay, prefill).await;
        relayed.client_app.write_all(b"Host: example\r\n\r\n").await.expect("client sends");
        relayed.client_app.shutdown().await.expect("client half-closes");
        relayed.upstream_app.write_all(b"then the upstream's own").await.expect("upstream sends");
        relayed.upstream_app.shutdown().await.expect("upstream half-closes");

        let mut at_upstream = Vec::new();
        relayed.upstream_app.read_to_end(&mut at_upstream).await.expect("upstream reads");
        let mut at_client = Vec::new();
        relayed.client_app.read_to_end(&mut at_client).await.expect("client reads");
        assert_eq!(at_upstream, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n");
        assert_eq!(at_client, b"bytes past the 101 head|then the upstream's own");

        let outcome = finish(relayed.relay).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.bytes_up, at_upstream.len() as u64);
        assert_eq!(outcome.bytes_down, at_client.len() as u64);
    }

    #[tokio::test]
    async fn relay_sends_prefill_first_and_counts_it() {
        check_prefill_goes_first_and_counts(Relay::Splice).await;
    }

    #[tokio::test]
    async fn relay_streams_sends_prefill_first_and_counts_it() {
        check_prefill_goes_first_and_counts(Relay::Streams).await;
    }

    /// One side half-closes; the other must see EOF while its own direction
    /// keeps flowing until it closes too.
    async fn check_half_close(relay: Relay, client_closes_first: bool) {
        let _fds = shared_fds().await;
        let relayed = Relayed::start(relay, Prefill::default()).await;
        let (mut closer, mut other) = if client_closes_first {
            (relayed.client_app, relayed.upstream_app)
        } else {
            (relayed.upstream_app, relayed.client_app)
        };
        closer.write_all(b"last words").await.expect("closer sends");
        closer.shutdown().await.expect("closer half-closes");
        let mut heard = Vec::new();
        other.read_to_end(&mut heard).await.expect("other side reads to EOF");
        assert_eq!(heard, b"last words");

        let reply = Pattern::new(3);
        let ((), arrived) = tokio::join!(reply.send(&mut other, 4 * MIB), reply.receive(&mut closer));
        assert_eq!(arrived, 4 * MIB);

        let outcome = finish(relayed.relay).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        let (from_closer, to_closer) = if client_closes_first {
            (outcome.bytes_up, outcome.bytes_down)
        } else {
            (outcome.bytes_down, outcome.bytes_up)
        };
        assert_eq!((from_closer, to_closer), (10, 4 * MIB));
    }

    #[tokio::test]
    async fn relay_client_half_close_reaches_upstream_while_downstream_flows() {
        check_half_close(Relay::Splice, true).await;
    }

    #[tokio::test]
    async fn relay_upstream_half_close_reaches_client_while_upstream_flows() {
        check_half_close(Relay::Splice, false).await;
    }

    #[tokio::test]
    async fn relay_streams_client_half_close_reaches_upstream_while_downstream_flows() {
        check_half_close(Relay::Streams, true).await;
    }

    #[tokio::test]
    async fn relay_streams_upstream_half_close_reaches_client_while_upstream_flows() {
        check_half_close(Relay::Streams, false).await;
    }

    #[tokio::test]
    async fn relay_streams_relays_in_memory_streams() {
        let (mut client_app, client_agent) = duplex(16 * 1024);
        let (upstream_agent, mut upstream_app) = duplex(16 * 1024);
        let prefill = Prefill { to_upstream: b"head|".to_vec(), to_client: Vec::new() };
        let relay = tokio::spawn(relay_streams(client_agent, upstream_agent, prefill));

        client_app.write_all(b"body").await.expect("client sends");
        client_app.shutdown().await.expect("client half-closes");
        let mut at_upstream = Vec::new();
        upstream_app.read_to_end(&mut at_upstream).await.expect("upstream reads to EOF");
        assert_eq!(at_upstream, b"head|body");

        let reply = Pattern::new(4);
        let ((), arrived) = tokio::join!(reply.send(&mut upstream_app, 8 * MIB), reply.receive(&mut client_app));
        assert_eq!(arrived, 8 * MIB);
        let outcome = finish(relay).await;
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!((outcome.bytes_up, outcome.bytes_down), (9, 8 * MIB));
    }

    /// Both directions carry `len` bytes (so both hold a pipe), then the
    /// upstream resets. Returns the outcome and what the client sent in all.
    async fn reset_upstream_after_exchange(len: u64) -> (Outcome, u64) {
        let relayed = Relayed::start(Relay::Splice, Prefill::default()).await;
        let (_client_read, mut client_write) = relayed.client_app.into_split();
        let mut upstream = relayed.upstream_app;
        // The client keeps sending until the relay drops its socket.
        let client_sender = tokio::spawn(async move {
            let pattern = Pattern::new(5);
            let mut sent = 0u64;
            loop {
                let chunk = pattern.at(sent, 16 * 1024);
                match client_write.write(chunk).await {
                    Ok(written) => sent += written as u64,
                    Err(_) => return sent,
                }
            }
        });
        upstream.write_all(&vec![7u8; len as usize]).await.expect("upstream sends");
        let mut heard = vec![0u8; len as usize];
        upstream.read_exact(&mut heard).await.expect("upstream hears the client");
        upstream.set_zero_linger().expect("SO_LINGER 0");
        drop(upstream);

        let outcome = finish(relayed.relay).await;
        let client_sent = timeout(Duration::from_secs(10), client_sender)
            .await
            .expect("client sender stopped once the relay ended")
            .expect("client sender did not panic");
        (outcome, client_sent)
    }

    #[tokio::test]
    async fn relay_ends_with_error_when_upstream_resets_mid_stream() {
        let _fds = shared_fds().await;
        let (outcome, client_sent) = reset_upstream_after_exchange(MIB).await;
        assert!(outcome.error.is_some(), "a reset must end the relay with an error");
        assert!(
            (MIB..=client_sent).contains(&outcome.bytes_up),
            "bytes_up {} outside [what the upstream read, what the client sent {client_sent}]",
            outcome.bytes_up
        );
        assert!(outcome.bytes_down <= MIB, "bytes_down {} > sent", outcome.bytes_down);
    }

    #[tokio::test]
    async fn relay_closes_its_pipes_and_sockets_after_many_relays() {
        let _fds = exclusive_fds().await;
        let (pipes_before, sockets_before) = (count_open("pipe:"), count_open("socket:"));
        for _ in 0..16 {
            let (outcome, _) = reset_upstream_after_exchange(256 * 1024).await;
            assert!(outcome.error.is_some());

            let mut relayed = Relayed::start(Relay::Splice, Prefill::default()).await;
            relayed.client_app.write_all(b"ping").await.expect("client sends");
            relayed.client_app.shutdown().await.expect("client half-closes");
            relayed.upstream_app.write_all(b"pong").await.expect("upstream sends");
            relayed.upstream_app.shutdown().await.expect("upstream half-closes");
            let outcome = finish(relayed.relay).await;
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
        }
        assert_eq!(count_open("pipe:"), pipes_before, "pipes leaked");
        assert_eq!(count_open("socket:"), sockets_before, "sockets leaked");
    }

    #[tokio::test]
    async fn idle_relay_holds_no_pipe_before_or_after_data() {
        let _fds = exclusive_fds().await;
        let pipes_before = count_open("pipe:");
        let mut relayed = Relayed::start(Relay::Splice, Prefill::default()).await;
        sleep(Duration::from_millis(100)).await;
        assert_eq!(count_open("pipe:"), pipes_before, "an idle relay opened a pipe");

        relayed.client_app.write_all(b"x").await.expect("client sends");
        let mut heard = [0u8; 1];
        relayed.upstream_app.read_exact(&mut heard).await.expect("upstream hears it");
        sleep(Duration::from_millis(100)).await;
        assert_eq!(count_open("pipe:"), pipes_before, "a relay kept its pipe after going idle");

        drop(relayed.client_app);
        drop(relayed.upstream_app);
        finish(relayed.relay).await;
        assert_eq!(count_open("pipe:"), pipes_before, "pipe left open after the relay");
    }
}
