//! A provider's response body relayed to the client as it arrives: every
//! piece is written and flushed before the next read, never collected.
//!
//! A chunked body is re-chunked (one chunk per piece received), so the
//! agent is always at a chunk boundary and can end a failed event stream
//! with a well-framed error event and last chunk. A Content-Length or
//! read-until-close body is forwarded byte for byte.
//!
//! When the provider stalls longer than `stream_idle_timeout`, sends more
//! than `max_response_bytes`, or breaks off:
//! - an event stream (`text/event-stream`, not content-encoded) that is
//!   chunked or read until close gets a final `event: error` (after a blank
//!   line if an event was cut short) and, when chunked, the last chunk;
//! - any other body cannot be ended honestly (its length is promised, or a
//!   compressed stream cannot take an appended event): the connection is
//!   closed and the client sees a truncated response.
//!
//! The caller closes the connection after any failure either way: the
//! provider connection is in an unknown state.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{config::Limits, respond::sse_error_event};
use crate::http1::{BodyError, BodyFraming, BodySource, HeadReader, Piece, ResponseHead};

#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    Complete,
    /// The provider failed the stream; `notified`: the client got an error event.
    Failed {
        kind: &'static str,
        message: String,
        notified: bool,
    },
    /// Writing to the client failed: it went away.
    ClientGone(String),
}

#[derive(Debug)]
pub struct Relayed {
    /// Bytes written to the client, chunk framing and error event included.
    pub bytes: u64,
    pub end: StreamEnd,
}

/// Whether the response is an event stream the agent may append an event to.
pub fn is_event_stream(response: &ResponseHead) -> bool {
    let header = |name: &str| {
        response.headers.iter().find(|(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_slice())
    };
    let is_sse = header("content-type").is_some_and(|value| {
        let media_type = value.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
        media_type.eq_ignore_ascii_case(b"text/event-stream")
    });
    let is_encoded = header("content-encoding").is_some_and(|value| !value.eq_ignore_ascii_case(b"identity"));
    is_sse && !is_encoded
}

/// Relays one response body from `upstream` to `client`, whose head was
/// written before the call (it goes out with the first flush).
pub async fn relay_body<U, C>(
    upstream: &mut HeadReader<U>,
    client: &mut C,
    framing: BodyFraming,
    event_stream: bool,
    limits: &Limits,
) -> Relayed
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    let mut source = BodySource::new(framing);
    let mut out = ClientBody { client, chunked: framing == BodyFraming::Chunked, bytes: 0, tail: Tail::default() };
    let mut data_bytes = 0u64;
    let (kind, message) = loop {
        let written = match source.next(upstream, limits.stream_idle_timeout).await {
            Ok(Piece::Data(data)) => {
                data_bytes = data_bytes.saturating_add(data.len() as u64);
                if data_bytes > limits.max_response_bytes {
                    break (
                        "response_too_large",
                        format!("the response exceeded max_response_bytes ({} bytes)", limits.max_response_bytes),
                    );
                }
                out.data(&data).await
            }
            Ok(Piece::End { trailers }) => match out.end(&trailers).await {
                Ok(()) => return Relayed { bytes: out.bytes, end: StreamEnd::Complete },
                Err(error) => Err(error),
            },
            Err(error) => break describe(error),
        };
        if let Err(error) = written {
            return Relayed { bytes: out.bytes, end: StreamEnd::ClientGone(error.to_string()) };
        }
    };
    let can_notify = event_stream && matches!(framing, BodyFraming::Chunked | BodyFraming::UntilClose);
    let notified = can_notify && out.error_event(kind, &message).await.is_ok();
    Relayed { bytes: out.bytes, end: StreamEnd::Failed { kind, message, notified } }
}

fn describe(error: BodyError) -> (&'static str, String) {
    match error {
        BodyError::Idle(idle) => ("stream_idle_timeout", format!("the provider sent nothing for {idle:?}")),
        BodyError::Closed => {
            ("upstream_closed", "the provider closed the connection before the response was complete".into())
        }
        BodyError::Malformed(reason) => {
            ("upstream_failed", format!("malformed response body from the provider: {reason}"))
        }
        BodyError::Io(error) => ("upstream_failed", format!("reading the provider's response failed: {error}")),
    }
}

/// The last two bytes of data sent, to know whether an event was cut short.
#[derive(Default)]
struct Tail {
    last: [u8; 2],
    written: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        for &byte in data.iter().rev().take(2).rev() {
            self.last = [self.last[1], byte];
        }
        self.written = self.written.saturating_add(data.len());
    }

    /// Blank lines that end a partial event. Extra blank lines dispatch
    /// nothing in SSE, so erring towards one is harmless.
    fn separator(&self) -> &'static [u8] {
        if self.written == 0 || self.last == *b"\n\n" || self.last == *b"\r\r" {
            b""
        } else {
            b"\n\n"
        }
    }
}

struct ClientBody<'c, C> {
    client: &'c mut C,
    chunked: bool,
    bytes: u64,
    tail: Tail,
}

impl<C: AsyncWrite + Unpin> ClientBody<'_, C> {
    async fn data(&mut self, data: &[u8]) -> std::io::Result<()> {
        let framed = if self.chunked {
            [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
        } else {
            data.to_vec()
        };
        self.write(&framed).await?;
        self.tail.push(data);
        Ok(())
    }

    async fn end(&mut self, trailers: &[u8]) -> std::io::Result<()> {
        if self.chunked {
            let trailers: &[u8] = if trailers.is_empty() { b"\r\n" } else { trailers };
            self.write(&[b"0\r\n", trailers].concat()).await?;
        } else {
            self.client.flush().await?;
        }
        Ok(())
    }

    async fn error_event(&mut self, kind: &str, message: &str) -> std::io::Result<()> {
        let event = [self.tail.separator(), &sse_error_event(kind, message)].concat();
        self.data(&event).await?;
        self.end(b"").await
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.client.write_all(bytes).await?;
        self.client.flush().await?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> ResponseHead {
        ResponseHead {
            version: 1,
            status: 200,
            reason: "OK".into(),
            headers: headers.iter().map(|(name, value)| (name.to_string(), value.as_bytes().to_vec())).collect(),
            head_len: 0,
        }
    }

    #[test]
    fn event_streams_are_recognised_unless_encoded() {
        assert!(is_event_stream(&head(&[("Content-Type", "text/event-stream; charset=utf-8")])));
        assert!(is_event_stream(&head(&[("content-type", "Text/Event-Stream"), ("Content-Encoding", "identity")])));
        assert!(!is_event_stream(&head(&[("Content-Type", "text/event-stream"), ("Content-Encoding", "gzip")])));
        assert!(!is_event_stream(&head(&[("Content-Type", "application/json")])));
        assert!(!is_event_stream(&head(&[])));
    }

    #[test]
    fn separator_ends_a_partial_event_only() {
        let separator_after = |pieces: &[&[u8]]| {
            let mut tail = Tail::default();
            for piece in pieces {
                tail.push(piece);
            }
            tail.separator()
        };
        assert_eq!(separator_after(&[]), b"");
        assert_eq!(separator_after(&[b"data: 1\n\n"]), b"");
        assert_eq!(separator_after(&[b"data: 1\n", b"\n"]), b"");
        assert_eq!(separator_after(&[b"data: 1\r\r"]), b"");
        assert_eq!(separator_after(&[b"data: {\"par"]), b"\n\n");
        assert_eq!(separator_after(&[b"data: 1\n"]), b"\n\n");
    }
}
