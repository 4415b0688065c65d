//! Message bodies read as data, chunk framing removed: request bodies the
//! agent reads to decide or rewrite are re-serialised, and a relayed
//! response can be re-chunked so the agent can always end it with a
//! well-framed last chunk. The chunk grammar itself is `body`'s; this only
//! walks it.

use std::{io, time::Duration};

use tokio::{io::AsyncRead, time::timeout};

use super::{
    body::{parse_chunk_size_line, parse_trailer_section, MAX_CHUNK_LINE_BYTES},
    BodyFraming, HeadReader,
};

/// Reads one body, piece by piece, from a [`HeadReader`] (its buffered bytes
/// first). Bytes past the body stay in the reader.
pub struct BodySource {
    state: State,
}

enum State {
    Length {
        remaining: u64,
    },
    UntilClose,
    ChunkSize,
    ChunkData {
        remaining: u64,
    },
    /// The CRLF after chunk data.
    ChunkDataEnd,
    Trailers,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Body data as it arrived; never empty.
    Data(Vec<u8>),
    /// The body is complete. For a chunked body, the trailer section with
    /// its final CRLF, exactly as received.
    End { trailers: Vec<u8> },
}

#[derive(Debug)]
pub enum BodyError {
    /// Nothing arrived for this long.
    Idle(Duration),
    /// The peer closed before the body's end.
    Closed,
    Malformed(String),
    Io(io::Error),
}

/// What the buffered bytes allow next.
enum Step {
    NeedMore,
    /// Framing bytes to drop.
    Skip(usize),
    Data(usize),
    End(usize),
}

impl BodySource {
    pub fn new(framing: BodyFraming) -> BodySource {
        let state = match framing {
            BodyFraming::Empty => State::Length { remaining: 0 },
            BodyFraming::Length(length) => State::Length { remaining: length },
            BodyFraming::Chunked => State::ChunkSize,
            BodyFraming::UntilClose => State::UntilClose,
        };
        BodySource { state }
    }

    /// The next piece; waits at most `idle` for each read.
    pub async fn next<S: AsyncRead + Unpin>(
        &mut self,
        from: &mut HeadReader<S>,
        idle: Duration,
    ) -> Result<Piece, BodyError> {
        loop {
            match self.step(from.buffered()).map_err(BodyError::Malformed)? {
                Step::Skip(len) => from.consume(len),
                Step::Data(len) => {
                    let data = from.buffered().get(..len).unwrap_or_default().to_vec();
                    from.consume(len);
                    return Ok(Piece::Data(data));
                }
                Step::End(len) => {
                    let trailers = from.buffered().get(..len).unwrap_or_default().to_vec();
                    from.consume(len);
                    self.state = State::Done;
                    return Ok(Piece::End { trailers });
                }
                Step::NeedMore => {
                    let read_limit = match self.state {
                        // Never past the body: what follows is the next message's.
                        State::Length { remaining } => usize::try_from(remaining).unwrap_or(usize::MAX),
                        _ => usize::MAX,
                    };
                    match timeout(idle, from.read_more(read_limit)).await {
                        Err(_elapsed) => return Err(BodyError::Idle(idle)),
                        Ok(Ok(0)) if matches!(self.state, State::UntilClose) => {
                            self.state = State::Done;
                            return Ok(Piece::End { trailers: Vec::new() });
                        }
                        Ok(Ok(0)) => return Err(BodyError::Closed),
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Err(BodyError::Io(error)),
                    }
                }
            }
        }
    }

    fn step(&mut self, buffered: &[u8]) -> Result<Step, String> {
        match self.state {
            State::Length { remaining: 0 } => Ok(Step::End(0)),
            State::Length { remaining } => {
                let len = usize::try_from(remaining).map_or(buffered.len(), |remaining| remaining.min(buffered.len()));
                if len == 0 {
                    return Ok(Step::NeedMore);
                }
                self.state = State::Length { remaining: remaining - len as u64 };
                Ok(Step::Data(len))
            }
            State::UntilClose if buffered.is_empty() => Ok(Step::NeedMore),
            State::UntilClose => Ok(Step::Data(buffered.len())),
            State::ChunkSize => {
                let searchable = buffered.get(..MAX_CHUNK_LINE_BYTES).unwrap_or(buffered);
                let Some(line_end) = searchable.iter().position(|&b| b == b'\n') else {
                    if buffered.len() >= MAX_CHUNK_LINE_BYTES {
                        return Err(format!("chunk-size line longer than {MAX_CHUNK_LINE_BYTES} bytes"));
                    }
                    return Ok(Step::NeedMore);
                };
                let line_len = line_end + 1;
                let size = parse_chunk_size_line(buffered.get(..line_len).unwrap_or_default())?;
                self.state = if size == 0 { State::Trailers } else { State::ChunkData { remaining: size } };
                Ok(Step::Skip(line_len))
            }
            State::ChunkData { remaining } => {
                let len = usize::try_from(remaining).map_or(buffered.len(), |remaining| remaining.min(buffered.len()));
                if len == 0 {
                    return Ok(Step::NeedMore);
                }
                let remaining = remaining - len as u64;
                self.state = if remaining == 0 { State::ChunkDataEnd } else { State::ChunkData { remaining } };
                Ok(Step::Data(len))
            }
            State::ChunkDataEnd => match buffered {
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkSize;
                    Ok(Step::Skip(2))
                }
                [] | [b'\r'] => Ok(Step::NeedMore),
                _ => Err("chunk data not followed by CRLF".into()),
            },
            State::Trailers => Ok(parse_trailer_section(buffered)?.map_or(Step::NeedMore, Step::End)),
            State::Done => Ok(Step::End(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::io::{duplex, AsyncWriteExt, ReadBuf};

    use super::*;

    const PATIENT: Duration = Duration::from_secs(5);

    /// Hands out at most `step` bytes per read, then EOF.
    struct Dribble {
        data: Vec<u8>,
        step: usize,
    }

    impl AsyncRead for Dribble {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let len = self.data.len().min(self.step).min(buf.remaining());
            let taken: Vec<u8> = self.data.drain(..len).collect();
            buf.put_slice(&taken);
            Poll::Ready(Ok(()))
        }
    }

    /// Every piece of a body, and what the reader kept after it.
    async fn read_all(raw: &[u8], step: usize, framing: BodyFraming) -> (Result<Vec<Piece>, BodyError>, Vec<u8>) {
        let mut reader = HeadReader::new(Dribble { data: raw.to_vec(), step });
        let mut source = BodySource::new(framing);
        let mut pieces = Vec::new();
        let result = loop {
            match source.next(&mut reader, PATIENT).await {
                Ok(Piece::End { trailers }) => {
                    pieces.push(Piece::End { trailers });
                    break Ok(pieces);
                }
                Ok(piece) => pieces.push(piece),
                Err(error) => break Err(error),
            }
        };
        let (rest, buffered) = reader.into_parts();
        (result, [buffered, rest.data].concat())
    }

    fn data_of(pieces: &[Piece]) -> Vec<u8> {
        pieces
            .iter()
            .filter_map(|piece| if let Piece::Data(data) = piece { Some(data.as_slice()) } else { None })
            .collect::<Vec<_>>()
            .concat()
    }

    #[tokio::test]
    async fn chunked_body_is_decoded_whatever_the_read_sizes() {
        let raw = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 42\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 64, 4096] {
            let (result, rest) = read_all(raw, step, BodyFraming::Chunked).await;
            let pieces = result.unwrap();
            assert_eq!(data_of(&pieces), b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(pieces.last(), Some(&Piece::End { trailers: b"X-Sum: 42\r\n\r\n".to_vec() }), "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
    }

    #[tokio::test]
    async fn length_body_stops_at_its_end_and_until_close_at_eof() {
        let (result, rest) = read_all(b"abcdefNEXT", 4, BodyFraming::Length(6)).await;
        assert_eq!(data_of(&result.unwrap()), b"abcdef");
        assert_eq!(rest, b"NEXT");
        let (result, _) = read_all(b"all of it", 4, BodyFraming::UntilClose).await;
        assert_eq!(data_of(&result.unwrap()), b"all of it");
        let (result, rest) = read_all(b"NEXT", 4, BodyFraming::Empty).await;
        assert_eq!(result.unwrap(), [Piece::End { trailers: Vec::new() }]);
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn truncated_and_malformed_bodies_are_errors() {
        let (result, _) = read_all(b"abc", 4, BodyFraming::Length(6)).await;
        assert!(matches!(result, Err(BodyError::Closed)), "{result:?}");
        let (result, _) = read_all(b"5\r\nhelloX\r\n0\r\n\r\n", 4, BodyFraming::Chunked).await;
        assert!(
            matches!(&result, Err(BodyError::Malformed(reason)) if reason.contains("not followed by CRLF")),
            "{result:?}"
        );
        let (result, _) = read_all(b"zz\r\n", 4, BodyFraming::Chunked).await;
        assert!(
            matches!(&result, Err(BodyError::Malformed(reason)) if reason.contains("not hexadecimal")),
            "{result:?}"
        );
        let (result, _) = read_all(&[b'1'; MAX_CHUNK_LINE_BYTES + 1], 4096, BodyFraming::Chunked).await;
        assert!(matches!(&result, Err(BodyError::Malformed(reason)) if reason.contains("longer than")), "{result:?}");
    }

    #[tokio::test]
    async fn a_silent_peer_is_an_idle_error() {
        let (mut writer, reader) = duplex(64);
        writer.write_all(b"5\r\nhel").await.unwrap();
        let mut reader = HeadReader::new(reader);
        let mut source = BodySource::new(BodyFraming::Chunked);
        let idle = Duration::from_millis(50);
        assert_eq!(source.next(&mut reader, idle).await.unwrap(), Piece::Data(b"hel".to_vec()));
        assert!(matches!(source.next(&mut reader, idle).await, Err(BodyError::Idle(limit)) if limit == idle));
    }
}
