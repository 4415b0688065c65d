//! Forwarding a message body exactly as received, while parsing its framing
//! to find where the message ends.

use std::{io, time::Duration};

use httparse::{Status, EMPTY_HEADER};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    time::timeout,
};

use super::head::{MAX_HEADERS, MAX_HEAD_BYTES};
use super::{reader::HeadReader, BodyFraming};

/// 16 hex digits fit in a u64 exactly; more (leading zeros included) are
/// refused rather than truncated, as some parsers do.
const MAX_CHUNK_SIZE_DIGITS: usize = 16;
/// A chunk-size line with its extensions and CRLF. Extensions are rare and
/// short; the bound keeps an endless line from being buffered.
pub const MAX_CHUNK_LINE_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// The most body bytes forwarded, chunk framing included; `None`: no cap.
    pub max_body: Option<u64>,
    /// The longest wait for the next body bytes.
    pub idle: Duration,
}

/// Forwards one body from `from` (buffered bytes first) to `to`, verbatim and
/// piece by piece as it arrives, flushing `to` before every wait so streamed
/// bodies (SSE, chunked progress) are not held back; whatever was written to
/// `to` before the call (the head) goes out with the first flush. Returns the
/// bytes forwarded, chunk framing included. Bytes past the body stay in
/// `from`'s buffer.
///
/// Errors: a stall longer than `limits.idle` is `TimedOut`; EOF before the
/// end of a Length or Chunked body is `UnexpectedEof`; malformed chunk
/// framing and exceeding `limits.max_body` are `InvalidData`. Part of the
/// body may have been forwarded by then, so both connections must be closed.
pub async fn copy_body<S, W>(
    from: &mut HeadReader<S>,
    to: &mut W,
    framing: BodyFraming,
    limits: &BodyLimits,
) -> io::Result<u64>
where
    S: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidData, reason);
    let exceeded = |max: u64| invalid(format!("body exceeds the limit of {max} bytes"));
    let mut body = match framing {
        BodyFraming::Empty => Body::Length { remaining: 0 },
        BodyFraming::Length(length) => {
            // Refused before a byte is forwarded, so the caller can still answer.
            if let Some(max) = limits.max_body.filter(|&max| length > max) {
                return Err(exceeded(max));
            }
            Body::Length { remaining: length }
        }
        BodyFraming::Chunked => Body::Chunked(ChunkedDecoder::default()),
        BodyFraming::UntilClose => Body::UntilClose,
    };
    let mut forwarded = 0u64;
    loop {
        let (body_len, complete) = body.advance(from.buffered()).map_err(invalid)?;
        if body_len > 0 {
            forwarded = forwarded.saturating_add(body_len as u64);
            if let Some(max) = limits.max_body.filter(|&max| forwarded > max) {
                return Err(exceeded(max));
            }
            to.write_all(&from.buffered()[..body_len]).await?;
            from.consume(body_len);
        }
        to.flush().await?;
        if complete {
            return Ok(forwarded);
        }
        match timeout(limits.idle, from.read_more(body.read_limit())).await {
            Err(_elapsed) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no body bytes for {:?} after {forwarded} bytes", limits.idle),
                ))
            }
            Ok(Ok(0)) if matches!(body, Body::UntilClose) => return Ok(forwarded),
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed {forwarded} bytes into a body"),
                ))
            }
            Ok(result) => result?,
        };
    }
}

enum Body {
    Length { remaining: u64 },
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl Body {
    /// How many bytes at the start of `buf` belong to the body, and whether
    /// the body ends with them.
    fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), String> {
        match self {
            Body::Length { remaining } => {
                let len = usize::try_from(*remaining).map_or(buf.len(), |remaining| remaining.min(buf.len()));
                *remaining -= len as u64;
                Ok((len, *remaining == 0))
            }
            Body::Chunked(decoder) => decoder.advance(buf),
            Body::UntilClose => Ok((buf.len(), false)),
        }
    }

    /// The most the next read may take: a Length body is never read past its
    /// end, so pipelined bytes after it stay unread until their turn.
    fn read_limit(&self) -> usize {
        match self {
            Body::Length { remaining } => usize::try_from(*remaining).unwrap_or(usize::MAX),
            Body::Chunked(_) | Body::UntilClose => usize::MAX,
        }
    }
}

/// The chunked transfer coding of RFC 9112 §7.1, followed through a body
/// that arrives in pieces. Chunk-size lines and the trailer section are only
/// consumed once complete; chunk data as soon as it arrives.
#[derive(Default)]
struct ChunkedDecoder {
    state: ChunkState,
    /// How much of the pending line or trailer section was already searched
    /// for a line end: a trickled line is not rescanned from its start.
    scanned: usize,
}

#[derive(Default, Clone, Copy)]
enum ChunkState {
    #[default]
    SizeLine,
    Data {
        remaining: u64,
    },
    /// The CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

impl ChunkedDecoder {
    fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), String> {
        let mut position = 0;
        loop {
            let rest = buf.get(position..).unwrap_or_default();
            match self.state {
                ChunkState::SizeLine => {
                    let Some(line_len) = self.line_end(rest)? else {
                        return Ok((position, false));
                    };
                    let size = parse_chunk_size_line(rest.get(..line_len).unwrap_or_default())?;
                    position += line_len;
                    self.state = if size == 0 { ChunkState::Trailers } else { ChunkState::Data { remaining: size } };
                }
                ChunkState::Data { remaining } => {
                    let len = usize::try_from(remaining).map_or(rest.len(), |remaining| remaining.min(rest.len()));
                    position += len;
                    let remaining = remaining - len as u64;
                    if remaining > 0 {
                        self.state = ChunkState::Data { remaining };
                        return Ok((position, false));
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        position += 2;
                        self.state = ChunkState::SizeLine;
                    }
                    [] | [b'\r'] => return Ok((position, false)),
                    _ => return Err("chunk data not followed by CRLF".into()),
                },
                ChunkState::Trailers => {
                    // httparse finishes or fails only at a line end; the
                    // field count bounds how often that happens.
                    let has_new_line_end = rest.get(self.scanned..).unwrap_or_default().contains(&b'\n');
                    self.scanned = rest.len();
                    if !has_new_line_end && rest.len() < MAX_HEAD_BYTES {
                        return Ok((position, false));
                    }
                    return match parse_trailer_section(rest)? {
                        Some(len) => Ok((position + len, true)),
                        None => Ok((position, false)),
                    };
                }
            }
        }
    }

    /// The length of the line at the start of `rest` up to its LF, if
    /// complete.
    fn line_end(&mut self, rest: &[u8]) -> Result<Option<usize>, String> {
        let searchable = rest.get(..MAX_CHUNK_LINE_BYTES).unwrap_or(rest);
        if let Some(offset) = searchable.get(self.scanned..).unwrap_or_default().iter().position(|&b| b == b'\n') {
            let line_len = self.scanned + offset + 1;
            self.scanned = 0;
            return Ok(Some(line_len));
        }
        if rest.len() >= MAX_CHUNK_LINE_BYTES {
            return Err(format!("chunk-size line longer than {MAX_CHUNK_LINE_BYTES} bytes"));
        }
        self.scanned = rest.len();
        Ok(None)
    }
}

/// `chunk-size [ chunk-ext ] CRLF` (RFC 9112 §7.1): the size in hex.
pub fn parse_chunk_size_line(line: &[u8]) -> Result<u64, String> {
    let shown = || String::from_utf8_lossy(line).into_owned();
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(format!("chunk-size line {:?} does not end in CRLF", shown()));
    };
    let digits_len = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (digits, extensions) = line.split_at(digits_len);
    if digits.is_empty() {
        return Err(format!("chunk size {:?} is not hexadecimal", shown()));
    }
    if digits.len() > MAX_CHUNK_SIZE_DIGITS {
        return Err(format!("chunk size has more than {MAX_CHUNK_SIZE_DIGITS} hex digits"));
    }
    if !valid_chunk_extensions(extensions) {
        return Err(format!("malformed chunk extension in {:?}", shown()));
    }
    // At most 16 digits: no overflow.
    Ok(digits
        .iter()
        .fold(0u64, |size, &digit| size << 4 | u64::from(char::from(digit).to_digit(16).unwrap_or_default())))
}

/// `*( BWS ";" BWS ext-name [ BWS "=" BWS ext-value ] )` with token names
/// and token or quoted-string values (RFC 9112 §7.1.1). Forwarded verbatim,
/// so anything a server could split differently (a bare CR, a stray quote)
/// is refused.
fn valid_chunk_extensions(mut rest: &[u8]) -> bool {
    while !rest.is_empty() {
        let Some(after_semicolon) = skip_whitespace(rest).strip_prefix(b";") else {
            return false;
        };
        let Some(after_name) = skip_token(skip_whitespace(after_semicolon)) else {
            return false;
        };
        rest = match skip_whitespace(after_name).strip_prefix(b"=") {
            Some(after_equals) => {
                let value = skip_whitespace(after_equals);
                let after_value = if value.starts_with(b"\"") { skip_quoted_string(value) } else { skip_token(value) };
                let Some(after_value) = after_value else {
                    return false;
                };
                after_value
            }
            None => after_name,
        };
    }
    true
}

fn skip_whitespace(text: &[u8]) -> &[u8] {
    let len = text.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    text.get(len..).unwrap_or_default()
}

/// The text after a non-empty token (RFC 9110 §5.6.2).
fn skip_token(text: &[u8]) -> Option<&[u8]> {
    let is_tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let len = text.iter().take_while(|b| is_tchar(b)).count();
    (len > 0).then(|| text.get(len..).unwrap_or_default())
}

/// The text after the quoted-string `text` starts with (RFC 9110 §5.6.4).
fn skip_quoted_string(text: &[u8]) -> Option<&[u8]> {
    let is_text = |b: u8| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80;
    let mut bytes = text.strip_prefix(b"\"")?.iter().enumerate();
    while let Some((index, &b)) = bytes.next() {
        match b {
            b'"' => return text.get(index + 2..),
            b'\\' => {
                let (_, &escaped) = bytes.next()?;
                if !is_text(escaped) {
                    return None;
                }
            }
            b if is_text(b) => {}
            _ => return None,
        }
    }
    None
}

/// `*( field-line CRLF ) CRLF` after the last chunk (RFC 9112 §7.1.2),
/// bounded like a head: its length once complete.
pub fn parse_trailer_section(section: &[u8]) -> Result<Option<usize>, String> {
    let too_large = || format!("trailer section exceeds {MAX_HEAD_BYTES} bytes");
    let mut fields = [EMPTY_HEADER; MAX_HEADERS];
    let len = match httparse::parse_headers(section, &mut fields) {
        Ok(Status::Complete((len, _))) if len > MAX_HEAD_BYTES => return Err(too_large()),
        Ok(Status::Complete((len, _))) => len,
        Ok(Status::Partial) if section.len() >= MAX_HEAD_BYTES => return Err(too_large()),
        Ok(Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(format!("more than {MAX_HEADERS} trailer fields")),
        Err(error) => return Err(format!("malformed trailer section: {error}")),
    };
    // httparse takes a lone LF as a line end, as in heads; the section
    // follows the last-chunk line's LF, so one at its start is lone too.
    let section = section.get(..len).unwrap_or_default();
    if section.first() == Some(&b'\n')
        || section.windows(2).any(|pair| matches!(pair, [before, b'\n'] if *before != b'\r'))
    {
        return Err("bare LF line ending in trailer section".into());
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, empty, AsyncReadExt, BufWriter};

    use super::{super::testing::Trickle, *};

    const PATIENT: BodyLimits = BodyLimits { max_body: None, idle: Duration::from_secs(10) };

    /// Copies `buffered` then `stream` as one body; returns the result, what
    /// was written, and the bytes left for the next message (buffered plus
    /// unread).
    async fn copy(
        buffered: &[u8],
        stream: Trickle,
        framing: BodyFraming,
        limits: &BodyLimits,
    ) -> (io::Result<u64>, Vec<u8>, Vec<u8>) {
        let mut reader = HeadReader::with_buffered(stream, buffered.to_vec());
        let mut written = Vec::new();
        let result = copy_body(&mut reader, &mut written, framing, limits).await;
        let (stream, buffered) = reader.into_parts();
        (result, written, [buffered, stream.unread().to_vec()].concat())
    }

    async fn copy_chunked(wire: &[u8]) -> io::Result<u64> {
        copy(b"", Trickle::new(wire, 7), BodyFraming::Chunked, &PATIENT).await.0
    }

    fn assert_invalid_data(result: io::Result<u64>, reason_part: &str) {
        let error = result.expect_err("expected an error");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(error.to_string().contains(reason_part), "{error} lacks {reason_part:?}");
    }

    const CHUNKED: &[u8] = b"5;name=value;quoted=\"a \\\"b\\\" c\"\r\nhello\r\n\
        1A\r\nabcdefghijklmnopqrstuvwxyz\r\n\
        0 ; last\r\nExpires: never\r\nX-Checksum: 42\r\n\r\n";
    const NEXT: &[u8] = b"GET /next HTTP/1.1\r\n";

    #[tokio::test]
    async fn chunked_body_is_forwarded_verbatim_up_to_its_end() {
        let (result, written, left) =
            copy(b"", Trickle::new(&[CHUNKED, NEXT].concat(), 1 << 20), BodyFraming::Chunked, &PATIENT).await;
        assert_eq!(result.unwrap(), CHUNKED.len() as u64);
        assert_eq!(written, CHUNKED);
        assert_eq!(left, NEXT);

        let minimal = b"0\r\n\r\n";
        let (result, written, _) = copy(minimal, Trickle::new(b"", 1), BodyFraming::Chunked, &PATIENT).await;
        assert_eq!((result.unwrap(), written.as_slice()), (5, &minimal[..]));
    }

    #[tokio::test]
    async fn chunked_body_split_anywhere_and_read_a_byte_at_a_time() {
        let wire = [CHUNKED, NEXT].concat();
        for split in 0..=wire.len() {
            let (result, written, left) =
                copy(&wire[..split], Trickle::new(&wire[split..], 1), BodyFraming::Chunked, &PATIENT).await;
            assert_eq!(result.unwrap(), CHUNKED.len() as u64, "split at {split}");
            assert_eq!(written, CHUNKED, "split at {split}");
            assert_eq!(left, NEXT, "split at {split}");
        }
    }

    #[tokio::test]
    async fn malformed_chunk_sizes_are_refused() {
        for (wire, reason) in [
            (&b"g\r\n"[..], "is not hexadecimal"),
            (b"\r\n", "is not hexadecimal"),
            (b"-5\r\nhello\r\n0\r\n\r\n", "is not hexadecimal"),
            (b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"5 \r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"5_0\r\n", "malformed chunk extension"),
            (b"10000000000000000\r\n", "more than 16 hex digits"),
            (b"00000000000000005\r\nhello\r\n0\r\n\r\n", "more than 16 hex digits"),
            (b"5\nhello\r\n0\r\n\r\n", "does not end in CRLF"),
            (b"5;a=b\rc\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"5;\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"5;a=\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"5;a=\"open\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"5;a=\"x\"y\r\nhello\r\n0\r\n\r\n", "malformed chunk extension"),
            (b"5\r\nhelloX\r\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"5\r\nhello\r\n0\r\nX-A: 1\nX-B: 2\r\n\r\n", "bare LF line ending in trailer section"),
            (b"5\r\nhello\r\n0\r\n\n", "bare LF line ending in trailer section"),
            (b"5\r\nhello\r\n0\r\nX-A : 1\r\n\r\n", "malformed trailer section"),
            (b"5\r\nhello\r\n0\r\n folded\r\n\r\n", "malformed trailer section"),
        ] {
            assert_invalid_data(copy_chunked(wire).await, reason);
        }
        // The largest size is accepted (the body then ends early at EOF).
        let error = copy_chunked(b"FFFFFFFFFFFFFFFF\r\nabc").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn chunk_lines_and_trailers_are_bounded() {
        let mut long_line = b"1;x=".to_vec();
        long_line.resize(MAX_CHUNK_LINE_BYTES, b'a');
        assert_invalid_data(copy_chunked(&long_line).await, "chunk-size line longer than 4096 bytes");
        long_line.truncate(MAX_CHUNK_LINE_BYTES - 2);
        long_line.extend(b"\r\nx\r\n0\r\n\r\n");
        assert_eq!(copy_chunked(&long_line).await.unwrap(), long_line.len() as u64);

        let mut many_trailers = b"0\r\n".to_vec();
        for index in 0..=MAX_HEADERS {
            many_trailers.extend(format!("X-{index}: v\r\n").as_bytes());
        }
        many_trailers.extend(b"\r\n");
        assert_invalid_data(copy_chunked(&many_trailers).await, "more than 100 trailer fields");

        let mut huge_trailer = b"0\r\nX-Big: ".to_vec();
        huge_trailer.resize(MAX_HEAD_BYTES + 10, b'a');
        assert_invalid_data(copy_chunked(&huge_trailer).await, "trailer section exceeds 32768 bytes");
    }

    #[tokio::test]
    async fn max_body_is_enforced_for_every_framing() {
        let limits = BodyLimits { max_body: Some(10), ..PATIENT };
        let (result, written, _) = copy(b"", Trickle::new(&[b'x'; 11], 4), BodyFraming::Length(11), &limits).await;
        assert_invalid_data(result, "body exceeds the limit of 10 bytes");
        assert!(written.is_empty(), "a declared length over the limit is refused up front");

        let (result, written, _) = copy(b"", Trickle::new(&[b'x'; 11], 4), BodyFraming::UntilClose, &limits).await;
        assert_invalid_data(result, "body exceeds the limit of 10 bytes");
        assert_eq!(written, b"xxxxxxxx", "only whole pieces within the limit are forwarded");

        // Framing counts: 3 + 5 + 2 bytes fit, the last chunk does not.
        let (result, written, _) =
            copy(b"", Trickle::new(b"5\r\nhello\r\n0\r\n\r\n", 1), BodyFraming::Chunked, &limits).await;
        assert_invalid_data(result, "body exceeds the limit of 10 bytes");
        assert_eq!(written, b"5\r\nhello\r\n");

        let (result, _, _) = copy(b"", Trickle::new(&[b'x'; 10], 3), BodyFraming::UntilClose, &limits).await;
        assert_eq!(result.unwrap(), 10);
    }

    #[tokio::test]
    async fn length_body_takes_leftovers_first_and_never_reads_past_its_end() {
        let mut reader = HeadReader::with_buffered(Trickle::new(b"lo world", 100), b"hel".to_vec());
        let mut written = Vec::new();
        assert_eq!(copy_body(&mut reader, &mut written, BodyFraming::Length(5), &PATIENT).await.unwrap(), 5);
        let (stream, buffered) = reader.into_parts();
        assert_eq!(
            (written.as_slice(), buffered.as_slice(), stream.unread()),
            (&b"hello"[..], &b""[..], &b" world"[..])
        );

        // The whole body and more already buffered: the stream is not read.
        let mut reader = HeadReader::with_buffered(Trickle::new(b"unread", 100), b"hello NEXT".to_vec());
        let mut written = Vec::new();
        assert_eq!(copy_body(&mut reader, &mut written, BodyFraming::Length(5), &PATIENT).await.unwrap(), 5);
        let (stream, buffered) = reader.into_parts();
        assert_eq!(
            (written.as_slice(), buffered.as_slice(), stream.unread()),
            (&b"hello"[..], &b" NEXT"[..], &b"unread"[..])
        );

        let (result, written, left) = copy(b"rest", Trickle::new(b"", 1), BodyFraming::Empty, &PATIENT).await;
        assert_eq!((result.unwrap(), written.len(), left.as_slice()), (0, 0, &b"rest"[..]));
    }

    #[tokio::test]
    async fn until_close_copies_to_eof() {
        let (result, written, _) = copy(b"ab", Trickle::new(b"cdefg", 2), BodyFraming::UntilClose, &PATIENT).await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(written, b"abcdefg");
    }

    #[tokio::test]
    async fn eof_inside_a_framed_body_is_unexpected() {
        for (wire, framing) in [(&b"abc"[..], BodyFraming::Length(5)), (b"5\r\nhel", BodyFraming::Chunked)] {
            let (result, written, _) = copy(b"", Trickle::new(wire, 2), framing, &PATIENT).await;
            let error = result.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{framing:?}");
            assert_eq!(written, wire, "{framing:?}");
        }
    }

    #[tokio::test]
    async fn stalled_body_times_out() {
        let limits = BodyLimits { idle: Duration::from_millis(30), ..PATIENT };
        let started = tokio::time::Instant::now();
        let (result, written, _) =
            copy(b"", Trickle::new(b"5\r\nhel", 100).then_pending(), BodyFraming::Chunked, &limits).await;
        assert!(started.elapsed() >= limits.idle && started.elapsed() < Duration::from_secs(2));
        let error = result.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("no body bytes for 30ms"), "{error}");
        assert_eq!(written, b"5\r\nhel", "what arrived was forwarded before the wait");
    }

    #[tokio::test]
    async fn streamed_chunks_are_relayed_as_they_arrive() {
        let (mut server, upstream) = duplex(1024);
        let (proxy_side, mut client) = duplex(1024);
        // Buffered like a TLS stream: nothing reaches the client unflushed.
        let mut proxy_side = BufWriter::new(proxy_side);
        let relay = tokio::spawn(async move {
            let mut reader = HeadReader::new(upstream);
            copy_body(&mut reader, &mut proxy_side, BodyFraming::Chunked, &PATIENT).await
        });
        let events: [&[u8]; 3] = [b"d\r\ndata: first\n\n\r\n", b"e\r\ndata: second\n\n\r\n", b"0\r\n\r\n"];
        for event in events {
            server.write_all(event).await.unwrap();
            // The next event is only sent once this one came through.
            let mut received = vec![0; event.len()];
            timeout(Duration::from_secs(5), client.read_exact(&mut received)).await.expect("event held back").unwrap();
            assert_eq!(received, event);
        }
        assert_eq!(relay.await.unwrap().unwrap(), events.concat().len() as u64);
    }

    #[test]
    fn chunk_size_values() {
        for (line, size) in [
            (&b"0\r\n"[..], 0),
            (b"a\r\n", 10),
            (b"Ff\r\n", 255),
            (b"FFFFFFFFFFFFFFFF\r\n", u64::MAX),
            (b"0000000000000010\r\n", 16),
            (b"1 ;a ; b = c\t;d=\"\"\r\n", 1),
        ] {
            assert_eq!(parse_chunk_size_line(line), Ok(size), "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[tokio::test]
    async fn empty_body_of_an_empty_stream_is_done_without_reading() {
        let mut reader = HeadReader::new(empty());
        let mut written = Vec::new();
        assert_eq!(copy_body(&mut reader, &mut written, BodyFraming::Empty, &PATIENT).await.unwrap(), 0);
        assert!(written.is_empty());
    }

    #[tokio::test]
    async fn pipelined_requests_come_out_one_after_the_other() {
        let first = b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n";
        let second = b"POST /two HTTP/1.1\r\nHost: b.example\r\nContent-Length: 3\r\n\r\n";
        let buffered = [&first[..], second, b"abc"].concat();
        let mut reader = HeadReader::with_buffered(empty(), buffered);

        let head = reader.read_request_head(PATIENT.idle, PATIENT.idle).await.unwrap().expect("first request");
        assert_eq!((head.target.as_str(), head.head_len), ("/one", first.len()));
        assert_eq!(reader.buffered(), [&second[..], b"abc"].concat());

        let head = reader.read_request_head(PATIENT.idle, PATIENT.idle).await.unwrap().expect("second request");
        assert_eq!((head.method.as_str(), head.target.as_str(), head.head_len), ("POST", "/two", second.len()));
        assert_eq!(reader.buffered(), b"abc");
        let mut body = Vec::new();
        assert_eq!(copy_body(&mut reader, &mut body, super::super::request_framing(&head), &PATIENT).await.unwrap(), 3);
        assert_eq!(body, b"abc");
        assert!(reader.read_request_head(PATIENT.idle, PATIENT.idle).await.unwrap().is_none());
    }
}
