//! Reading successive heads from one stream, keeping what was read past them.

use std::{io, time::Duration};

use tokio::{
    io::{split, AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf},
    time::{timeout, timeout_at, Instant},
};

use super::{
    head::MAX_HEAD_BYTES,
    request::{parse_request_head, RequestHead},
    response::{parse_response_head, ResponseHead},
};
use crate::wire::Parse;

/// The most bytes one read takes: a few TLS records, and a bound on what a
/// body read leaves buffered past the end of its message.
pub(super) const READ_CHUNK: usize = 16 * 1024;

/// A stream plus the bytes read from it but not yet consumed: heads are read
/// in chunks, so the start of a body or of the next message may already be
/// here. Body copying consumes this buffer before reading the stream again.
pub struct HeadReader<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S> HeadReader<S> {
    pub fn new(stream: S) -> Self {
        Self::with_buffered(stream, Vec::new())
    }

    /// Continues a stream of which `buffered` was already read: for the
    /// client, the sniffed bytes after the first request head.
    pub fn with_buffered(stream: S, buffered: Vec<u8>) -> Self {
        Self { stream, buf: buffered }
    }

    /// The stream, for writing: reading it directly would skip buffered bytes.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The stream and the bytes read past the last head or body, e.g. the
    /// first bytes of the new protocol after a 101.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub fn consume(&mut self, len: usize) {
        self.buf.drain(..len.min(self.buf.len()));
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HeadReader<S> {
    /// Reads and writes the stream at once (a request body going up while
    /// the responses come down), until the [`Split`] is dropped.
    pub fn split(&mut self) -> Split<'_, S> {
        let buffered = std::mem::take(&mut self.buf);
        let (read_half, writer) = split(&mut self.stream);
        Split { reader: HeadReader::with_buffered(read_half, buffered), writer, home: &mut self.buf }
    }
}

/// A [`HeadReader`]'s stream in two halves: `reader` reads it, the bytes
/// already buffered first, while `writer` writes it. What `reader` holds
/// when this is dropped goes back to the [`HeadReader`] it came from.
pub struct Split<'a, S> {
    pub reader: HeadReader<ReadHalf<&'a mut S>>,
    pub writer: WriteHalf<&'a mut S>,
    home: &'a mut Vec<u8>,
}

impl<S> Drop for Split<'_, S> {
    fn drop(&mut self) {
        *self.home = std::mem::take(&mut self.reader.buf);
    }
}

impl<S: AsyncRead + Unpin> HeadReader<S> {
    /// The next request head on a persistent connection, `None` if the
    /// client closed it cleanly instead. `idle` bounds the wait for the first
    /// byte (expiry: `TimedOut`); `head_timeout` bounds the whole head from
    /// then on, so trickling bytes cannot extend it. An invalid head is
    /// `InvalidData` with the reason; EOF inside a head is `UnexpectedEof`.
    pub async fn read_request_head(
        &mut self,
        idle: Duration,
        head_timeout: Duration,
    ) -> io::Result<Option<RequestHead>> {
        if self.buf.is_empty() {
            match timeout(idle, self.read_more(MAX_HEAD_BYTES)).await {
                Err(_elapsed) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no request within {idle:?}")))
                }
                Ok(Ok(0)) => return Ok(None),
                Ok(result) => result?,
            };
        }
        self.read_head(Instant::now() + head_timeout, head_timeout).await.map(Some)
    }

    /// The next response head. `head_timeout` counts from this call, so it
    /// covers the server's time to answer as well.
    pub async fn read_response_head(&mut self, head_timeout: Duration) -> io::Result<ResponseHead> {
        self.read_head(Instant::now() + head_timeout, head_timeout).await
    }

    /// Reads until a head is parsed, then consumes it from the buffer.
    async fn read_head<H: Head>(&mut self, deadline: Instant, head_timeout: Duration) -> io::Result<H> {
        let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidData, reason);
        let mut worth_parsing = true;
        loop {
            if worth_parsing {
                match H::parse(&self.buf) {
                    Parse::Done(head) => {
                        self.consume(head.head_len());
                        return Ok(head);
                    }
                    Parse::Invalid(reason) => return Err(invalid(reason)),
                    Parse::NeedMore => {}
                }
            }
            // The parsers refuse a head at MAX_HEAD_BYTES; this only keeps the
            // read below from mistaking a full buffer for EOF.
            let room = MAX_HEAD_BYTES.saturating_sub(self.buf.len());
            if room == 0 {
                return Err(invalid(format!("{} exceeds {MAX_HEAD_BYTES} bytes", H::NAME)));
            }
            let before = self.buf.len();
            let stream_end = match timeout_at(deadline, self.read_more(room)).await {
                Err(_elapsed) => {
                    io::Error::new(io::ErrorKind::TimedOut, format!("{} not complete after {head_timeout:?}", H::NAME))
                }
                Ok(Ok(0)) => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed before the {} was complete", H::NAME),
                ),
                Ok(Err(error)) => error,
                Ok(Ok(_)) => {
                    // A head completes only at a line end, and the header count
                    // bounds the lines: re-parsing only then keeps a trickled
                    // head from costing quadratic time. httparse can fail
                    // mid-line; that is noticed at the next line end, or below.
                    worth_parsing = self.buf.get(before..).unwrap_or_default().contains(&b'\n');
                    continue;
                }
            };
            // Bytes skipped as unable to complete the head may still have made
            // it invalid: that is the reason to give, not the stream's end.
            if !worth_parsing {
                if let Parse::Invalid(reason) = H::parse(&self.buf) {
                    return Err(invalid(reason));
                }
            }
            return Err(stream_end);
        }
    }

    /// One read of at most `max_len` (and [`READ_CHUNK`]) bytes appended to
    /// the buffer; `Ok(0)` at EOF.
    pub async fn read_more(&mut self, max_len: usize) -> io::Result<usize> {
        let len = max_len.min(READ_CHUNK);
        self.buf.reserve(len);
        (&mut self.stream).take(len as u64).read_buf(&mut self.buf).await
    }
}

/// What [`HeadReader::read_head`] needs of a head type.
trait Head: Sized {
    const NAME: &'static str;
    fn parse(buf: &[u8]) -> Parse<Self>;
    fn head_len(&self) -> usize;
}

impl Head for RequestHead {
    const NAME: &'static str = "request head";

    fn parse(buf: &[u8]) -> Parse<Self> {
        parse_request_head(buf)
    }

    fn head_len(&self) -> usize {
        self.head_len
    }
}

impl Head for ResponseHead {
    const NAME: &'static str = "response head";

    fn parse(buf: &[u8]) -> Parse<Self> {
        parse_response_head(buf)
    }

    fn head_len(&self) -> usize {
        self.head_len
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, empty, AsyncReadExt, AsyncWriteExt};

    use super::{super::testing::Trickle, *};

    const PATIENT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_head_broken_mid_line_is_refused_as_such_when_the_stream_ends() {
        // As in sniff: the bytes after "G" hold no line end, so they are only
        // parsed again when the stream ends.
        let pieces: [&[u8]; 2] = [b"G", b"ET /\x01"];
        let mut reader = HeadReader::new(pieces[0].chain(pieces[1]));
        let error = reader.read_request_head(PATIENT, PATIENT).await.expect_err("a malformed head");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(error.to_string().contains("malformed request head"), "{error}");
    }

    #[tokio::test]
    async fn a_split_reads_buffered_bytes_first_and_gives_back_what_it_leaves() {
        let (mut peer, stream) = duplex(64);
        peer.write_all(b"stream").await.unwrap();
        let mut reader = HeadReader::with_buffered(stream, b"buffered ".to_vec());
        {
            let mut split = reader.split();
            split.writer.write_all(b"reply").await.unwrap();
            split.reader.read_more(64).await.unwrap();
            assert_eq!(split.reader.buffered(), b"buffered stream");
            split.reader.consume(b"buffered ".len());
        }
        assert_eq!(reader.buffered(), b"stream");
        let mut reply = [0u8; 5];
        peer.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
    }

    #[tokio::test]
    async fn sniffed_leftovers_are_read_before_the_stream() {
        let mut reader =
            HeadReader::with_buffered(Trickle::new(b"ost: a.example\r\n\r\nNEXT", 4), b"GET / HTTP/1.1\r\nH".to_vec());
        let head = reader.read_request_head(PATIENT, PATIENT).await.unwrap().expect("request");
        assert_eq!(head.headers, [("Host".to_string(), b"a.example".to_vec())]);
        let (stream, buffered) = reader.into_parts();
        assert_eq!([buffered, stream.unread().to_vec()].concat(), b"NEXT");
    }

    #[tokio::test]
    async fn eof_between_requests_is_none_and_inside_one_is_an_error() {
        let mut reader = HeadReader::new(empty());
        assert!(reader.read_request_head(PATIENT, PATIENT).await.unwrap().is_none());

        let mut reader = HeadReader::new(Trickle::new(b"GET / HTTP/1.1\r\nHo", 5));
        let error = reader.read_request_head(PATIENT, PATIENT).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(error.to_string().contains("before the request head was complete"), "{error}");
    }

    #[tokio::test]
    async fn idle_connection_times_out() {
        let (_client, server) = duplex(64);
        let mut reader = HeadReader::new(server);
        let idle = Duration::from_millis(30);
        let started = Instant::now();
        let error = reader.read_request_head(idle, PATIENT).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("no request within 30ms"), "{error}");
        assert!(started.elapsed() >= idle && started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn trickled_head_is_cut_off_by_the_total_deadline() {
        let (mut client, server) = duplex(64);
        // A byte every 5 ms: far more often than the deadline.
        let drip = tokio::spawn(async move {
            for byte in b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Slow: ".iter().chain([b'a'; 1000].iter()) {
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let mut reader = HeadReader::new(server);
        let head_timeout = Duration::from_millis(100);
        let started = Instant::now();
        let error = reader.read_request_head(PATIENT, head_timeout).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("request head not complete after 100ms"), "{error}");
        assert!(started.elapsed() >= head_timeout && started.elapsed() < Duration::from_secs(2));
        drip.abort();
    }

    #[tokio::test]
    async fn invalid_head_is_invalid_data_with_the_reason() {
        let mut reader = HeadReader::new(Trickle::new(b"GET / HTTP/1.1\r\nX-A: 1\nHost: b\r\n\r\n", 3));
        let error = reader.read_request_head(PATIENT, PATIENT).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("bare LF"), "{error}");

        let mut reader =
            HeadReader::new(Trickle::new(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 7));
        let error = reader.read_response_head(PATIENT).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("multiple Content-Length"), "{error}");
    }

    #[tokio::test]
    async fn response_head_read_a_byte_at_a_time_keeps_the_body() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody";
        let mut reader = HeadReader::new(Trickle::new(raw, 1));
        let head = reader.read_response_head(PATIENT).await.unwrap();
        assert_eq!((head.status, head.head_len), (200, raw.len() - 4));
        let (stream, buffered) = reader.into_parts();
        assert_eq!([buffered, stream.unread().to_vec()].concat(), b"body");
    }

    #[tokio::test]
    async fn reads_stop_at_the_head_bound() {
        let mut oversized = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        oversized.resize(MAX_HEAD_BYTES + 8 * 1024, b'a');
        let mut reader = HeadReader::new(Trickle::new(&oversized, READ_CHUNK));
        let error = reader.read_response_head(PATIENT).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("response head exceeds 32768 bytes"), "{error}");
        assert_eq!(reader.buffered().len(), MAX_HEAD_BYTES);
    }
}
