//! Byte relay between the sandboxed client and the upstream.
//!
//! Each direction copies until EOF and then half-closes its writer, so a FIN
//! travels end to end. Byte counts survive errors: the close log always says
//! how much went each way. Two plain TCP sockets are joined with splice(2)
//! through a pipe, so the payload never enters userspace; a direction holds
//! a pipe only while data flows, taken from a small pool of empty ones. When one side fails (reset, idle
//! timeout), the other is reset too, once what it was sent is acknowledged:
//! a FIN would let a truncated close-delimited response pass for complete.

use std::{
    future::Future,
    io,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use nix::{
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf},
    net::TcpStream,
};

/// Bytes a caller already read from one side, sent before anything relayed.
#[derive(Debug, Default)]
pub struct Prefill {
    /// Read from the client (e.g. a sniffed request head).
    pub to_upstream: Vec<u8>,
    /// Read from the upstream (e.g. bytes past an HTTP 101 response head).
    pub to_client: Vec<u8>,
}

/// A raw relay a route leaves to the end of its connection
/// ([`crate::conn::CloseLog::relay_after`]), to run once the route's own
/// state is freed: an idle relayed connection then holds little more than
/// the relay.
pub struct Later {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub prefill: Prefill,
    pub idle_timeout: Duration,
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

/// Relays two TCP sockets with splice(2), prefill first, until both
/// directions reach EOF, either fails, or neither moves a byte for
/// `idle_timeout` (a stalled peer must not hold the connection forever).
///
/// Both directions and the idle timer are polled by hand in one future: an
/// idle relay (most of a proxy's connections) holds a few hundred bytes, not
/// a future per direction and per wait.
///
/// Takes its sockets boxed: an async fn keeps its arguments apart from its
/// locals for its whole life.
pub async fn relay(sockets: Box<Later>) -> Outcome {
    let Later { client, upstream, prefill, idle_timeout } = *sockets;
    let idle = Idle::new(idle_timeout);
    let mut up = Direction::new(prefill.to_upstream);
    let mut down = Direction::new(prefill.to_client);
    let timer = tokio::time::sleep_until(idle.expires().into());
    tokio::pin!(timer);
    let result = std::future::poll_fn(|cx| {
        let up_done = match up.poll(cx, &client, &upstream, &idle) {
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            polled => polled.is_ready(),
        };
        let down_done = match down.poll(cx, &upstream, &client, &idle) {
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            polled => polled.is_ready(),
        };
        if up_done && down_done {
            return Poll::Ready(Ok(()));
        }
        // Activity moves the deadline; the timer is re-armed only when it fires.
        while timer.as_mut().poll(cx).is_ready() {
            let expires = idle.expires();
            if expires <= Instant::now() {
                return Poll::Ready(Err(idle.timed_out()));
            }
            timer.as_mut().reset(expires.into());
        }
        Poll::Pending
    })
    .await;
    let mut outcome = Outcome { bytes_up: up.delivered, bytes_down: down.delivered, error: None };
    if let Err(error) = result {
        // Boxed: the relay's own state is sized by its largest wait.
        Box::pin(async { tokio::join!(reset_when_flushed(&client), reset_when_flushed(&upstream)) }).await;
        outcome.error = Some(error);
    }
    outcome
}

/// [`relay`] for streams that cannot splice (TLS the agent terminated, after
/// a 101): copied through a buffer, with the same idle limit and counts.
pub async fn copy<C, U>(client: C, upstream: U, prefill: Prefill, idle: Duration) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let idle = Idle::new(idle);
    let mut outcome = Outcome::default();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let result = tokio::select! {
        result = async {
            tokio::try_join!(
                copy_until_eof(&mut client_read, &mut upstream_write, prefill.to_upstream, &mut outcome.bytes_up, &idle),
                copy_until_eof(&mut upstream_read, &mut client_write, prefill.to_client, &mut outcome.bytes_down, &idle),
            )
        } => result.map(drop),
        error = idle.expired() => Err(error),
    };
    outcome.error = result.err();
    outcome
}

/// Buffer of one direction of [`copy`]: a TLS record's worth.
const COPY_BUFFER: usize = 16 * 1024;

async fn copy_until_eof<R, W>(
    from: &mut R,
    to: &mut W,
    prefill: Vec<u8>,
    delivered: &mut u64,
    idle: &Idle,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    write_all_counted(to, &prefill, delivered).await?;
    drop(prefill);
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            return to.shutdown().await;
        }
        idle.touch();
        write_all_counted(to, &buffer[..read], delivered).await?;
        idle.touch();
    }
}

/// How long a failed relay waits for a peer to acknowledge what it was sent
/// before resetting it anyway (a stalled peer may never do so).
const FLUSH_BEFORE_RESET: Duration = Duration::from_secs(1);

/// Makes the coming close of `socket` a reset, once its peer acknowledged
/// everything sent (a reset discards unsent data), or after FLUSH_BEFORE_RESET.
pub async fn reset_when_flushed(socket: &TcpStream) {
    let deadline = Instant::now() + FLUSH_BEFORE_RESET;
    while unacknowledged_bytes(socket) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Deprecated because a non-zero linger blocks on drop; zero resets at once.
    #[allow(deprecated)]
    let _ = socket.set_linger(Some(Duration::ZERO));
}

/// Bytes sent on `socket` but not yet acknowledged (SIOCOUTQ); 0 if unknown.
fn unacknowledged_bytes(socket: &TcpStream) -> i32 {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for TCP) writes one int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        queued
    } else {
        0
    }
}

/// When a relay last moved a byte, in either direction: one timer for the
/// whole relay, re-armed only when it fires, rather than one per read.
struct Idle {
    started: Instant,
    /// Milliseconds after `started`; atomic so the relay future stays `Send`.
    last_active_ms: AtomicU64,
    limit: Duration,
}

impl Idle {
    fn new(limit: Duration) -> Self {
        Self { started: Instant::now(), last_active_ms: AtomicU64::new(0), limit }
    }

    fn touch(&self) {
        self.last_active_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn expires(&self) -> Instant {
        self.started + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed)) + self.limit
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, format!("idle for {:?} in both directions", self.limit))
    }

    /// `TimedOut` once nothing has moved for the limit: what ends a relay
    /// whose peers stalled.
    async fn expired(&self) -> io::Error {
        let timer = tokio::time::sleep_until(self.expires().into());
        tokio::pin!(timer);
        loop {
            timer.as_mut().await;
            let expires = self.expires();
            if expires <= Instant::now() {
                return self.timed_out();
            }
            timer.as_mut().reset(expires.into());
        }
    }
}

/// One direction of [`relay`]: socket -> pipe -> socket until EOF, then a
/// half-close of the writer.
struct Direction {
    /// Bytes read before the relay, sent first; freed once sent.
    prefill: Vec<u8>,
    prefill_sent: usize,
    /// Taken only once data (or EOF) is there and given back when the
    /// socket runs dry, so an idle direction holds none.
    pipe: Option<Pipe>,
    /// Bytes in the pipe: drained fully before reading again, which keeps a
    /// WouldBlock on the read unambiguous and leaves nothing behind at EOF.
    in_pipe: usize,
    /// Bytes written to the writer, counted as they land, so the count is
    /// right when the relay fails or is dropped part-way.
    delivered: u64,
    done: bool,
}

impl Direction {
    fn new(prefill: Vec<u8>) -> Self {
        Self { prefill, prefill_sent: 0, pipe: None, in_pipe: 0, delivered: 0, done: false }
    }

    fn poll(&mut self, cx: &mut Context<'_>, from: &TcpStream, to: &TcpStream, idle: &Idle) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        while self.prefill_sent < self.prefill.len() {
            ready!(to.poll_write_ready(cx))?;
            match to.try_write(&self.prefill[self.prefill_sent..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(written) => {
                    self.prefill_sent += written;
                    self.delivered += written as u64;
                    idle.touch();
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        if self.prefill.capacity() > 0 {
            // The relay lives as long as the connection: free the prefill now.
            self.prefill = Vec::new();
        }
        loop {
            if self.pipe.is_none() {
                // Readiness alone proves nothing: tokio reports an accepted
                // socket readable before anything has arrived.
                let mut byte = [0u8; 1];
                if ready!(from.poll_peek(cx, &mut ReadBuf::new(&mut byte)))? == 0 {
                    return self.finish(to);
                }
                self.pipe = Some(Pipe::take()?);
            }
            let pipe = self.pipe.as_ref().expect("taken above");
            if self.in_pipe == 0 {
                // The pipe is empty, so WouldBlock can only mean that the
                // socket has nothing more to read.
                match from.try_io(Interest::READABLE, || pipe.fill_from(from)) {
                    Ok(0) => {
                        self.pipe.take().expect("taken above").give_back();
                        return self.finish(to);
                    }
                    Ok(spliced) => self.in_pipe = spliced,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        self.pipe.take().expect("taken above").give_back();
                        continue;
                    }
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
            ready!(to.poll_write_ready(cx))?;
            match to.try_io(Interest::WRITABLE, || pipe.drain_to(to, self.in_pipe)) {
                Ok(spliced) => {
                    self.in_pipe -= spliced;
                    self.delivered += spliced as u64;
                    idle.touch();
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }

    /// EOF from the reader: half-closes the writer, so the FIN travels on.
    fn finish(&mut self, to: &TcpStream) -> Poll<io::Result<()>> {
        self.done = true;
        // SAFETY: shutdown on a descriptor the caller holds open.
        let rc = unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) })
    }
}

/// A pipe carrying one direction of a relay. Dropping it closes both ends.
struct Pipe {
    read_end: OwnedFd,
    write_end: OwnedFd,
}

/// Pipe capacity asked for. Against the default 64 KiB it means far fewer
/// splice calls and measurably less agent CPU per byte; it costs nothing on
/// idle connections because they hold no pipe. 1 MiB is the default
/// /proc/sys/fs/pipe-max-size, so an unprivileged agent gets it too.
const PIPE_SIZE: i32 = 1024 * 1024;

/// Empty pipes kept for the next direction that needs one: a new pipe costs
/// pipe2, F_SETPIPE_SZ and two closes. Bounded, so a burst leaves at most
/// this many behind; an empty pipe holds no pages, only its descriptors and
/// the kernel's slot array.
const POOLED_PIPES: usize = 32;
/// A pooled pipe unused this long is closed, so a daemon without traffic
/// holds none.
const POOLED_FOR: Duration = Duration::from_secs(1);

struct Pool {
    /// Each with when it came back; the most recent last (taken first).
    pipes: Vec<(Pipe, Instant)>,
    /// Whether a task is closing the pipes unused for `POOLED_FOR`.
    trimming: bool,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { pipes: Vec::new(), trimming: false });

fn pool() -> MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Held by the pool's trimmer: the next pipe given back starts another
/// once it is dropped, however the trimmer ends (its runtime may stop
/// before it even runs).
struct Trimming;

impl Drop for Trimming {
    fn drop(&mut self) {
        pool().trimming = false;
    }
}

/// Closes the pooled pipes unused for `POOLED_FOR`, until none is left.
async fn trim_pool(_trimming: Trimming) {
    loop {
        tokio::time::sleep(POOLED_FOR).await;
        let unused: Vec<(Pipe, Instant)> = {
            let mut pool = pool();
            let fresh = pool.pipes.partition_point(|(_, since)| since.elapsed() >= POOLED_FOR);
            let unused = pool.pipes.drain(..fresh).collect();
            if pool.pipes.is_empty() {
                return;
            }
            unused
        };
        drop(unused);
    }
}

impl Pipe {
    /// An empty pipe: a pooled one, or a new one.
    fn take() -> io::Result<Self> {
        let pooled = pool().pipes.pop();
        pooled.map_or_else(Self::new, |(pipe, _)| Ok(pipe))
    }

    /// Pools the pipe if it is provably empty (bytes left in it would reach
    /// another connection's peer) and the pool has room; closes it otherwise.
    fn give_back(self) {
        if self.queued() != Some(0) {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        let start_trimmer = {
            let mut pool = pool();
            if pool.pipes.len() >= POOLED_PIPES || runtime.is_err() {
                return;
            }
            pool.pipes.push((self, Instant::now()));
            !std::mem::replace(&mut pool.trimming, true)
        };
        if let (true, Ok(runtime)) = (start_trimmer, runtime) {
            runtime.spawn(trim_pool(Trimming));
        }
    }

    /// Bytes waiting in the pipe (FIONREAD); `None` if that cannot be told.
    fn queued(&self) -> Option<usize> {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe writes one int.
        let rc = unsafe { libc::ioctl(self.read_end.as_raw_fd(), libc::FIONREAD, &mut queued) };
        (rc == 0).then_some(queued as usize)
    }

    fn new() -> io::Result<Self> {
        let (read_end, write_end) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Refused when pipe-max-size was lowered or the user's pipe quota is
        // used up: the default size still works, only with more splice calls.
        let _ = fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Self { read_end, write_end })
    }

    /// Moves what `socket` has ready into the pipe, up to the pipe's capacity.
    fn fill_from(&self, socket: &TcpStream) -> io::Result<usize> {
        // The pipe, not the length asked for, bounds each call: the kernel
        // stops when the pipe is full.
        Ok(splice(socket, None, &self.write_end, None, SPLICE_MAX_LEN, SPLICE_FLAGS)?)
    }

    /// Moves up to `len` bytes from the pipe into `socket`.
    fn drain_to(&self, socket: &TcpStream, len: usize) -> io::Result<usize> {
        Ok(splice(&self.read_end, None, socket, None, len, SPLICE_FLAGS)?)
    }
}

/// More than any pipe holds; the kernel clamps it anyway (MAX_RW_COUNT).
const SPLICE_MAX_LEN: usize = 1 << 30;

/// NONBLOCK: never wait on the pipe (the sockets are non-blocking already).
/// MOVE: only a hint, ignored by current kernels, which move socket data
/// through a pipe by page reference anyway.
const SPLICE_FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

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
    use std::{collections::HashSet, os::fd::AsRawFd, time::Duration};

    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
        task::JoinHandle,
        time::{sleep, timeout},
    };

    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Tests that check for leaked pipes hold it exclusively; every other test
    /// here that opens pipes holds it shared.
    static PIPE_ACCOUNTING: RwLock<()> = RwLock::const_new(());

    async fn shared_pipes() -> RwLockReadGuard<'static, ()> {
        PIPE_ACCOUNTING.read().await
    }

    async fn exclusive_pipes() -> RwLockWriteGuard<'static, ()> {
        PIPE_ACCOUNTING.write().await
    }

    /// Inodes behind this process's fds whose link reads `kind:[inode]`.
    fn open_inodes(kind: &str) -> HashSet<u64> {
        std::fs::read_dir("/proc/self/fd")
            .expect("list /proc/self/fd")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter_map(|target| {
                target.to_str()?.strip_prefix(kind)?.strip_prefix(":[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
    }

    /// Pipes opened since `before`, still open and not in the pool of empty ones.
    fn new_pipes(before: &HashSet<u64>) -> usize {
        let pooled = pool().pipes.len();
        open_inodes("pipe").difference(before).count().saturating_sub(pooled)
    }

    /// Closes the pooled pipes and returns the pipes open then: the baseline
    /// of a test that counts pipes (holding them exclusively).
    fn pipes_before() -> HashSet<u64> {
        pool().pipes.clear();
        open_inodes("pipe")
    }

    /// The inode of the socket behind `socket`'s fd: unlike the fd number, it
    /// is not reused, so it can be checked for after the socket should be gone.
    fn socket_inode(socket: &TcpStream) -> u64 {
        let target = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).expect("read socket fd link");
        let inode = target.to_str().and_then(|target| target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
        inode.expect("socket fd links to socket:[inode]")
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
        /// All four sockets, the relay's two included.
        socket_inodes: [u64; 4],
    }

    impl Relayed {
        async fn start(prefill: Prefill) -> Self {
            Self::start_with_idle_timeout(prefill, Duration::from_secs(3600)).await
        }

        async fn start_with_idle_timeout(prefill: Prefill, idle_timeout: Duration) -> Self {
            let (client_app, client_agent) = tcp_pair().await;
            let (upstream_agent, upstream_app) = tcp_pair().await;
            let socket_inodes = [&client_app, &client_agent, &upstream_agent, &upstream_app].map(socket_inode);
            let sockets = Later { client: client_agent, upstream: upstream_agent, prefill, idle_timeout };
            let relay = tokio::spawn(relay(Box::new(sockets)));
            Self { client_app, upstream_app, relay, socket_inodes }
        }
    }

    #[tokio::test]
    async fn a_relay_idle_both_ways_for_the_limit_ends_with_timed_out() {
        let relayed = Relayed::start_with_idle_timeout(Prefill::default(), Duration::from_millis(200)).await;
        let outcome = finish(relayed.relay).await;
        let error = outcome.error.expect("the idle relay ended with an error");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("idle"), "{error}");
    }

    #[tokio::test]
    async fn traffic_in_one_direction_keeps_the_relay_alive() {
        let mut relayed = Relayed::start_with_idle_timeout(Prefill::default(), Duration::from_millis(300)).await;
        // Only the client speaks, every 100 ms for a second: the upstream's
        // silence alone must not end the relay.
        let mut received = [0u8; 1];
        for _ in 0..10 {
            relayed.client_app.write_all(b"x").await.expect("client sends");
            relayed.upstream_app.read_exact(&mut received).await.expect("upstream receives");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!relayed.relay.is_finished(), "the relay ended while one direction was busy");
        drop((relayed.client_app, relayed.upstream_app));
        let outcome = finish(relayed.relay).await;
        assert_eq!(outcome.bytes_up, 10);
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

        /// Up to `len` pattern bytes from `offset`, stopping at the period's end.
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

    async fn check_large_transfer_both_ways() {
        let _pipes = shared_pipes().await;
        const LEN: u64 = 64 * MIB;
        let relayed = Relayed::start(Prefill::default()).await;
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
        check_large_transfer_both_ways().await;
    }

    async fn check_prefill_goes_first_and_counts() {
        let _pipes = shared_pipes().await;
        let prefill =
            Prefill { to_upstream: b"GET / HTTP/1.1\r\n".to_vec(), to_client: b"bytes past the 101 head|".to_vec() };
        let mut relayed = Relayed::start(prefill).await;
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
        check_prefill_goes_first_and_counts().await;
    }

    /// One side half-closes; the other must see EOF while its own direction
    /// keeps flowing until it closes too.
    async fn check_half_close(client_closes_first: bool) {
        let _pipes = shared_pipes().await;
        let relayed = Relayed::start(Prefill::default()).await;
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
        check_half_close(true).await;
    }

    #[tokio::test]
    async fn relay_upstream_half_close_reaches_client_while_upstream_flows() {
        check_half_close(false).await;
    }

    /// Both directions carry `len` bytes while the client keeps sending, then
    /// the upstream resets. Returns the outcome and what the client sent in all.
    async fn reset_upstream_mid_stream(relayed: Relayed, len: u64) -> (Outcome, u64) {
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
        let _pipes = shared_pipes().await;
        let relayed = Relayed::start(Prefill::default()).await;
        let (outcome, client_sent) = reset_upstream_mid_stream(relayed, MIB).await;
        assert!(outcome.error.is_some(), "a reset must end the relay with an error");
        assert!(
            (MIB..=client_sent).contains(&outcome.bytes_up),
            "bytes_up {} outside [what the upstream read, what the client sent {client_sent}]",
            outcome.bytes_up
        );
        assert!(outcome.bytes_down <= MIB, "bytes_down {} > sent", outcome.bytes_down);
    }

    /// Reads until the stream ends; returns the bytes and how it ended.
    async fn read_to_end_or_error(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
        let mut received = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => return (received, Ok(())),
                Ok(read) => received.extend_from_slice(&buffer[..read]),
                Err(error) => return (received, Err(error)),
            }
        }
    }

    #[tokio::test]
    async fn an_upstream_reset_reaches_the_client_as_a_reset_after_what_was_relayed() {
        let _pipes = shared_pipes().await;
        let Relayed { mut client_app, mut upstream_app, relay, .. } = Relayed::start(Prefill::default()).await;
        upstream_app.write_all(&[9u8; 200_000]).await.expect("upstream sends");
        let mut first = vec![0u8; 200_000];
        client_app.read_exact(&mut first).await.expect("client receives what was sent before the reset");
        upstream_app.set_zero_linger().expect("SO_LINGER 0");
        drop(upstream_app);
        let (rest, end) =
            timeout(Duration::from_secs(10), read_to_end_or_error(&mut client_app)).await.expect("client sees the end");
        assert!(rest.is_empty(), "{} unexpected bytes", rest.len());
        assert_eq!(end.map_err(|error| error.kind()), Err(io::ErrorKind::ConnectionReset), "a reset, not a clean FIN");
        let outcome = finish(relay).await;
        assert_eq!(outcome.bytes_down, 200_000);
        assert!(outcome.error.is_some());
    }

    #[tokio::test]
    async fn a_client_reset_reaches_the_upstream_as_a_reset() {
        let _pipes = shared_pipes().await;
        let Relayed { mut client_app, mut upstream_app, relay, .. } = Relayed::start(Prefill::default()).await;
        client_app.write_all(b"request").await.expect("client sends");
        let mut heard = [0u8; 7];
        upstream_app.read_exact(&mut heard).await.expect("upstream hears it");
        client_app.set_zero_linger().expect("SO_LINGER 0");
        drop(client_app);
        let (_, end) = timeout(Duration::from_secs(10), read_to_end_or_error(&mut upstream_app))
            .await
            .expect("upstream sees the end");
        assert_eq!(end.map_err(|error| error.kind()), Err(io::ErrorKind::ConnectionReset));
        assert!(finish(relay).await.error.is_some());
    }

    /// The upstream never reads, so client -> upstream stalls holding a full
    /// pipe; then the client resets and the upstream sends a byte whose
    /// delivery fails. The relay ends with that error, dropping the stalled
    /// direction mid-transfer.
    async fn fail_delivery_while_upstream_never_reads(relayed: Relayed) -> Outcome {
        let Relayed { mut client_app, mut upstream_app, relay, .. } = relayed;
        let chunk = vec![1u8; 64 * 1024];
        // Fill every buffer on the way until the client's writes stall.
        while let Ok(written) = timeout(Duration::from_millis(100), client_app.write(&chunk)).await {
            written.expect("client sends");
        }
        client_app.set_zero_linger().expect("SO_LINGER 0");
        drop(client_app);
        upstream_app.write_all(b"!").await.expect("upstream sends");
        finish(relay).await
    }

    #[tokio::test]
    async fn relay_closes_its_pipes_and_sockets_after_many_relays() {
        let _pipes = exclusive_pipes().await;
        let pipes_before = pipes_before();
        let mut sockets = HashSet::new();
        for _ in 0..4 {
            let mut relayed = Relayed::start(Prefill::default()).await;
            sockets.extend(relayed.socket_inodes);
            relayed.client_app.write_all(b"ping").await.expect("client sends");
            relayed.client_app.shutdown().await.expect("client half-closes");
            relayed.upstream_app.write_all(b"pong").await.expect("upstream sends");
            relayed.upstream_app.shutdown().await.expect("upstream half-closes");
            let outcome = finish(relayed.relay).await;
            assert!(outcome.error.is_none(), "{:?}", outcome.error);

            let relayed = Relayed::start(Prefill::default()).await;
            sockets.extend(relayed.socket_inodes);
            let (outcome, _) = reset_upstream_mid_stream(relayed, 256 * 1024).await;
            assert!(outcome.error.is_some());

            let relayed = Relayed::start(Prefill::default()).await;
            sockets.extend(relayed.socket_inodes);
            let outcome = fail_delivery_while_upstream_never_reads(relayed).await;
            assert!(outcome.error.is_some());
        }
        assert_eq!(new_pipes(&pipes_before), 0, "pipes leaked");
        assert_eq!(open_inodes("socket").intersection(&sockets).count(), 0, "sockets leaked");
    }

    #[tokio::test]
    async fn only_empty_pipes_go_back_to_the_pool_and_it_is_bounded() {
        let _pipes = exclusive_pipes().await;
        let before = pipes_before();
        let with_bytes = Pipe::new().expect("pipe");
        nix::unistd::write(&with_bytes.write_end, b"left over").expect("write into the pipe");
        with_bytes.give_back();
        assert_eq!(pool().pipes.len(), 0, "a pipe with bytes in it was pooled");
        for _ in 0..POOLED_PIPES + 3 {
            Pipe::new().expect("pipe").give_back();
        }
        assert_eq!(pool().pipes.len(), POOLED_PIPES);
        assert_eq!(new_pipes(&before), 0, "pipes beyond the pool's bound stay open");
        pool().pipes.clear();
    }

    #[tokio::test]
    async fn pooled_pipes_unused_for_a_while_are_closed() {
        let _pipes = exclusive_pipes().await;
        let before = pipes_before();
        Pipe::new().expect("pipe").give_back();
        assert_eq!(pool().pipes.len(), 1);
        let deadline = Instant::now() + 10 * POOLED_FOR;
        while open_inodes("pipe").difference(&before).count() > 0 && Instant::now() < deadline {
            sleep(POOLED_FOR / 10).await;
        }
        assert_eq!(open_inodes("pipe").difference(&before).count(), 0, "a pooled pipe stayed open unused");
    }

    #[tokio::test]
    async fn idle_relay_holds_no_pipe_before_or_after_data() {
        let _pipes = exclusive_pipes().await;
        let pipes_before = pipes_before();
        let mut relayed = Relayed::start(Prefill::default()).await;
        sleep(Duration::from_millis(100)).await;
        assert_eq!(new_pipes(&pipes_before), 0, "an idle relay opened a pipe");

        relayed.client_app.write_all(b"x").await.expect("client sends");
        let mut heard = [0u8; 1];
        relayed.upstream_app.read_exact(&mut heard).await.expect("upstream hears it");
        sleep(Duration::from_millis(100)).await;
        assert_eq!(new_pipes(&pipes_before), 0, "a relay kept its pipe after going idle");

        drop(relayed.client_app);
        drop(relayed.upstream_app);
        finish(relayed.relay).await;
        assert_eq!(new_pipes(&pipes_before), 0, "pipe left open after the relay");
    }
}
