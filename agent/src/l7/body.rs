//! A request body read whole, bounded, for a room that decides on it or a
//! rewrite: the client is told to send it (`100 Continue`) if it waits for
//! that, chunk framing is removed, and the head is re-framed with the
//! `Content-Length` of what will be forwarded.

use std::{fmt, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::http1::{
    expect::continue_before_reading, request_framing, BodyError, BodyFraming, BodySource, HeadReader, Piece,
    RequestHead,
};

pub use crate::credentials::MAX_REWRITTEN_BODY;

#[derive(Debug)]
pub enum ReadError {
    /// Over the limit (bytes): refused, the rest never read.
    TooLarge(usize),
    /// Malformed, stalled, or cut short.
    Unreadable(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::TooLarge(limit) => write!(f, "the request body is over the {limit}-byte limit of this endpoint"),
            ReadError::Unreadable(reason) => write!(f, "the request body cannot be read: {reason}"),
        }
    }
}

/// Reads the body of `head`'s request, at most `limit` bytes of data, each
/// read waiting at most `idle`; then frames `head` for forwarding it whole.
pub async fn read<C>(
    client: &mut HeadReader<C>,
    head: &mut RequestHead,
    limit: usize,
    idle: Duration,
) -> Result<Vec<u8>, ReadError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let framing = request_framing(head);
    if let BodyFraming::Length(length) = framing {
        if length > limit as u64 {
            return Err(ReadError::TooLarge(limit));
        }
    }
    // The head was allowed as far as a head decides: the client may send.
    continue_before_reading(client.get_mut(), head).await.map_err(|error| ReadError::Unreadable(error.to_string()))?;
    let mut body = Vec::new();
    let mut source = BodySource::new(framing);
    loop {
        match source.next(client, idle).await {
            Ok(Piece::Data(data)) => {
                if body.len() + data.len() > limit {
                    return Err(ReadError::TooLarge(limit));
                }
                body.extend_from_slice(&data);
            }
            Ok(Piece::End { trailers }) if trailers.len() > 2 => {
                return Err(ReadError::Unreadable("chunked trailers are not supported on a body read whole".into()));
            }
            Ok(Piece::End { .. }) => break,
            Err(BodyError::Idle(idle)) => return Err(ReadError::Unreadable(format!("no byte for {idle:?}"))),
            Err(BodyError::Closed) => return Err(ReadError::Unreadable("the client closed inside it".into())),
            Err(BodyError::Malformed(reason)) => return Err(ReadError::Unreadable(reason)),
            Err(BodyError::Io(error)) => return Err(ReadError::Unreadable(error.to_string())),
        }
    }
    reframe(head, body.len());
    Ok(body)
}

/// The head as forwarded with a body of `length` bytes: its own framing and
/// the expectation (answered already) replaced by a `Content-Length`.
pub fn reframe(head: &mut RequestHead, length: usize) {
    head.headers.retain(|(name, _)| {
        !["content-length", "transfer-encoding", "trailer", "expect"].iter().any(|drop| name.eq_ignore_ascii_case(drop))
    });
    head.headers.push(("Content-Length".to_owned(), length.to_string().into_bytes()));
}
