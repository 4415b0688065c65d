//! The relay after the 101: client frames through [`ClientFrames`] and the
//! inspector to the origin, the origin's bytes copied to the client, and
//! the closes the relay sends itself.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    sync::{watch, Notify},
    time::{sleep_until, timeout, Instant},
};

use super::{
    client::{ClientFrames, Step},
    frame::{self, Boundaries},
    Close, Deflate, Inspector, Limits, TextVerdict,
};
use crate::relay::{self as byte_relay, Prefill};

/// Bytes read at once from either side.
const READ_SIZE: usize = 64 * 1024;
/// How long the origin's frame in flight may take to end before the relay's
/// close goes to the client (it cannot go in the middle of a frame); past
/// it the client gets no close frame, only the end of the connection.
const FRAME_END_WAIT: Duration = Duration::from_secs(2);
/// After sending its closes, how long the relay waits for both peers to
/// close (their close frames are read and dropped): closing a socket with
/// unread bytes resets it, and a reset can destroy the close frame just
/// sent before the peer reads it.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How a relay went.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes both ways and a transport error, as the byte relays report them.
    pub relayed: byte_relay::Outcome,
    pub ended: Ended,
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The peers ended it: a close handshake, or either side's connection
    /// ending; or a transport error or the idle limit (`relayed.error`).
    Closed,
    /// The inspector refused a text message: both sides got its close.
    Policy(Close),
    /// The client broke a rule or a limit: both sides got this close
    /// (1002, 1007 or 1009).
    Refused(Close),
    /// A new policy generation: both sides got 1012.
    Reload,
}

impl Ended {
    /// The close the relay sends both sides, if it ends the session itself.
    fn close(&self) -> Option<Close> {
        match self {
            Ended::Closed => None,
            Ended::Policy(close) | Ended::Refused(close) => Some(close.clone()),
            Ended::Reload => Some(Close { code: frame::SERVICE_RESTART, reason: "policy reloaded".into() }),
        }
    }
}

/// Relays a WebSocket session until either side closes, fails, idles out
/// for `idle` (both directions quiet), or `reload` changes past the value
/// it last saw (both sides then get 1012). Client frames are read, their
/// messages assembled and text inspected (see the module docs); the
/// origin's bytes are copied unchanged. `prefill` holds what was already
/// read on each side past the heads; `deflate` is what [`super::accept`]
/// returned.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, U, I>(
    client: C,
    upstream: U,
    prefill: Prefill,
    deflate: Option<Deflate>,
    inspector: &mut I,
    mut reload: watch::Receiver<u64>,
    limits: Limits,
    idle: Duration,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    I: Inspector,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let activity = Activity::new(idle);
    let mut up = Up {
        frames: ClientFrames::new(deflate.as_ref(), &limits),
        limits,
        client: client_read,
        upstream: upstream_write,
        input: Input::new(prefill.to_upstream),
        sent: 0,
        client_closed: false,
    };
    let mut down = Down {
        upstream: upstream_read,
        client: client_write,
        prefill: prefill.to_client,
        boundaries: Boundaries::default(),
        sent: 0,
        writing: false,
        shut: false,
    };
    let stop = Notify::new();
    let mut error = None;
    let mut ended = Ended::Closed;
    {
        let up_run = up.run(inspector, &mut reload, &activity);
        let down_run = down.run(&stop, &activity);
        tokio::pin!(up_run, down_run);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                end = &mut up_run, if !up_done => {
                    up_done = true;
                    match end {
                        Ok(None) => {}
                        Ok(Some(end)) => {
                            ended = end;
                            // The origin's frame in flight ends before the client's close.
                            stop.notify_one();
                            if !down_done {
                                if let Ok(Err(failed)) = timeout(FRAME_END_WAIT, &mut down_run).await {
                                    error = Some(failed);
                                }
                            }
                            break;
                        }
                        Err(failed) => {
                            error = Some(failed);
                            break;
                        }
                    }
                }
                end = &mut down_run, if !down_done => {
                    down_done = true;
                    if let Err(failed) = end {
                        error = Some(failed);
                        break;
                    }
                }
                () = activity.expired() => {
                    let reason = format!("idle for {idle:?} in both directions");
                    error = Some(io::Error::new(io::ErrorKind::TimedOut, reason));
                    break;
                }
            }
            if up_done && down_done {
                break;
            }
        }
    }
    if let Some(close) = ended.close().filter(|_| error.is_none()) {
        finish(&mut up, &mut down, &close).await;
    }
    let relayed = byte_relay::Outcome { bytes_up: up.sent, bytes_down: down.sent, error };
    Outcome { relayed, ended }
}

/// The client's close (the origin got its own from [`Up`]), then both
/// connections closed once the peers close theirs or [`CLOSE_WAIT`] passes.
async fn finish<C, U>(up: &mut Up<C, U>, down: &mut Down<C, U>, close: &Close)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let _ = timeout(CLOSE_WAIT, async {
        if down.may_send_close() {
            let _ = write_counted(&mut down.client, &frame::encode_close(close, false), &mut down.sent).await;
        }
        let _ = tokio::join!(down.client.shutdown(), up.upstream.shutdown());
        tokio::join!(drain(&mut up.client), drain(&mut down.upstream));
    })
    .await;
}

/// Reads and drops until EOF or an error.
async fn drain<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut buffer = [0u8; 4096];
    while reader.read(&mut buffer).await.is_ok_and(|read| read > 0) {}
}

/// Client to origin.
struct Up<C, U> {
    frames: ClientFrames,
    limits: Limits,
    client: ReadHalf<C>,
    upstream: WriteHalf<U>,
    input: Input,
    /// Bytes written to the origin.
    sent: u64,
    /// The client's close frame went to the origin.
    client_closed: bool,
}

impl<C: AsyncRead + Unpin, U: AsyncWrite + Unpin> Up<C, U> {
    /// Until the client's connection ends (`None`, the origin's then
    /// half-closed), or the relay must close both sides: the origin got
    /// its close already.
    async fn run<I: Inspector>(
        &mut self,
        inspector: &mut I,
        reload: &mut watch::Receiver<u64>,
        activity: &Activity,
    ) -> io::Result<Option<Ended>> {
        let mut reload_alive = true;
        // When the text message being assembled began, and its last byte came.
        let mut text_started: Option<Instant> = None;
        let mut last_read = Instant::now();
        loop {
            if let Some(end) = self.forward_buffered(inspector, activity).await? {
                return self.close_upstream(end).await;
            }
            text_started = match (self.frames.assembling_text(), text_started) {
                (true, None) => Some(last_read),
                (true, started) => started,
                (false, _) => None,
            };
            let text_deadline = text_started
                .map(|started| (started + self.limits.text_total).min(last_read + self.limits.text_idle))
                .unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                changed = reload.changed(), if reload_alive => match changed {
                    Ok(()) => return self.close_upstream(Ended::Reload).await,
                    // No policy store any more: nothing can change.
                    Err(_) => reload_alive = false,
                },
                () = sleep_until(text_deadline), if text_started.is_some() => {
                    let late = text_started.is_some_and(|started| Instant::now() >= started + self.limits.text_total);
                    let reason = match late {
                        true => format!("text message not complete within {:?}", self.limits.text_total),
                        false => format!("no byte of the text message for {:?}", self.limits.text_idle),
                    };
                    return self.close_upstream(Ended::Refused(Close::protocol(reason))).await;
                }
                read = self.input.read_from(&mut self.client) => {
                    if read? == 0 {
                        self.upstream.shutdown().await?;
                        return Ok(None);
                    }
                    last_read = Instant::now();
                    activity.touch();
                }
            }
        }
    }

    /// Handles every complete unit of the buffered input; `Some` when the
    /// relay must close both sides.
    async fn forward_buffered<I: Inspector>(
        &mut self,
        inspector: &mut I,
        activity: &Activity,
    ) -> io::Result<Option<Ended>> {
        loop {
            let progress = match self.frames.step(self.input.data()) {
                Ok(progress) => progress,
                Err(close) => return Ok(Some(Ended::Refused(close))),
            };
            self.input.consume(progress.consumed);
            let frame = match progress.step {
                None => return Ok(None),
                Some(Step::Upstream(frame)) => frame,
                Some(Step::Close(frame)) => {
                    self.client_closed = true;
                    frame
                }
                Some(Step::Text(message)) => match inspector.text(&message) {
                    TextVerdict::Forward(message) => frame::encode(true, frame::TEXT, message.as_bytes(), true),
                    TextVerdict::Close { code, reason } => return Ok(Some(Ended::Policy(Close { code, reason }))),
                },
            };
            write_counted(&mut self.upstream, &frame, &mut self.sent).await?;
            activity.touch();
        }
    }

    /// Sends the origin the close of `end`, unless the client's own close
    /// went there already.
    async fn close_upstream(&mut self, end: Ended) -> io::Result<Option<Ended>> {
        if let (Some(close), false) = (end.close(), self.client_closed) {
            write_counted(&mut self.upstream, &frame::encode_close(&close, true), &mut self.sent).await?;
        }
        Ok(Some(end))
    }
}

/// Origin to client: bytes copied as they come, frame boundaries followed.
struct Down<C, U> {
    upstream: ReadHalf<U>,
    client: WriteHalf<C>,
    prefill: Vec<u8>,
    boundaries: Boundaries,
    /// Bytes written to the client.
    sent: u64,
    /// A write to the client was under way when the run stopped.
    writing: bool,
    /// The client's side was half-closed (the origin's ended).
    shut: bool,
}

impl<C: AsyncWrite + Unpin, U: AsyncRead + Unpin> Down<C, U> {
    /// Until the origin's connection ends (the client's then half-closed),
    /// or, once `stop` is notified, until the origin's frames stand at a
    /// boundary.
    async fn run(&mut self, stop: &Notify, activity: &Activity) -> io::Result<()> {
        let prefill = std::mem::take(&mut self.prefill);
        self.copy(&prefill, false, activity).await?;
        let mut buffer = vec![0u8; READ_SIZE];
        let mut stopping = false;
        loop {
            if stopping && self.boundaries.at_boundary() {
                return Ok(());
            }
            let read = tokio::select! {
                () = stop.notified(), if !stopping => {
                    stopping = true;
                    continue;
                }
                read = self.upstream.read(&mut buffer) => read?,
            };
            if read == 0 {
                if !stopping {
                    self.shut = true;
                    self.client.shutdown().await?;
                }
                return Ok(());
            }
            activity.touch();
            self.copy(&buffer[..read], stopping, activity).await?;
        }
    }

    /// Copies `bytes`, or with `stopping` only up to the next boundary.
    async fn copy(&mut self, bytes: &[u8], stopping: bool, activity: &Activity) -> io::Result<()> {
        let followed = self.boundaries.follow(bytes, stopping);
        self.writing = true;
        write_counted(&mut self.client, &bytes[..followed], &mut self.sent).await?;
        self.writing = false;
        activity.touch();
        Ok(())
    }

    /// Whether a close frame from the relay can go to the client now: between
    /// two whole frames, none of them the origin's close.
    fn may_send_close(&self) -> bool {
        !self.writing && !self.shut && self.boundaries.at_boundary() && !self.boundaries.closed
    }
}

/// The client's bytes not yet handled; what is left between reads is at
/// most an incomplete header or control frame.
struct Input {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    fn new(prefill: Vec<u8>) -> Self {
        let end = prefill.len();
        let mut buffer = prefill;
        buffer.resize(end.max(READ_SIZE), 0);
        Self { buffer, start: 0, end }
    }

    fn data(&self) -> &[u8] {
        &self.buffer[self.start..self.end]
    }

    fn consume(&mut self, len: usize) {
        self.start += len;
    }

    /// Reads more after what is kept, moving that to the front first.
    async fn read_from<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> io::Result<usize> {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buffer.len() {
            // Only a prefill larger than a read fills it; grow once for it.
            self.buffer.resize(self.buffer.len() + READ_SIZE, 0);
        }
        let read = reader.read(&mut self.buffer[self.end..]).await?;
        self.end += read;
        Ok(read)
    }
}

/// `write_all` counting each write as it lands.
async fn write_counted<W: AsyncWrite + Unpin>(to: &mut W, mut bytes: &[u8], sent: &mut u64) -> io::Result<()> {
    while !bytes.is_empty() {
        let written = to.write(bytes).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *sent += written as u64;
        bytes = &bytes[written..];
    }
    to.flush().await
}

/// When the relay last moved a byte, either way.
struct Activity {
    started: Instant,
    /// Milliseconds after `started`; atomic so the relay future stays `Send`.
    last_ms: AtomicU64,
    limit: Duration,
}

impl Activity {
    fn new(limit: Duration) -> Self {
        Self { started: Instant::now(), last_ms: AtomicU64::new(0), limit }
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn expires(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + self.limit
    }

    /// Resolves once nothing moved for the limit.
    async fn expired(&self) {
        while Instant::now() < self.expires() {
            sleep_until(self.expires()).await;
        }
    }
}

#[cfg(test)]
mod tests;
