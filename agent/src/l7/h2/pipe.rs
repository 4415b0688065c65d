//! One direction of an HTTP/2 stream relayed to another stream as its DATA
//! arrives: a frame is passed on once the receiving peer's window has room
//! for it, and only then is the sender's window opened again by as much,
//! so at most one window of a stream's data is held here.

use std::future::poll_fn;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;

/// How a direction of a stream ended.
pub enum Piped {
    /// END_STREAM, after trailers if `Some`: already sent on.
    Ended(Option<HeaderMap>),
    /// The receiving side failed (a reset, a connection error), and `send`
    /// was reset with its reason; or `send`'s peer reset it.
    Failed(h2::Error),
}

/// Relays `recv` to `send` until END_STREAM (trailers included), counting
/// bytes into `count`. Returns when either side is reset; a reset of
/// `recv` resets `send` with the same reason.
pub async fn pipe(recv: &mut RecvStream, send: &mut SendStream<Bytes>, count: &mut u64) -> Piped {
    loop {
        let next = tokio::select! {
            data = recv.data() => data,
            reset = poll_fn(|cx| send.poll_reset(cx)) => return reset_by_peer(reset),
        };
        match next {
            Some(Ok(data)) => {
                let length = data.len();
                if let Err(error) = send_all(send, data).await {
                    return Piped::Failed(error);
                }
                *count += length as u64;
                // Released only now: what the sender may send next is what left.
                if let Err(error) = recv.flow_control().release_capacity(length) {
                    return failed(send, error);
                }
            }
            Some(Err(error)) => return failed(send, error),
            None => break,
        }
    }
    let sent = match recv.trailers().await {
        Ok(Some(trailers)) => send.send_trailers(trailers.clone()).map(|()| Some(trailers)),
        Ok(None) => send.send_data(Bytes::new(), true).map(|()| None),
        Err(error) => return failed(send, error),
    };
    match sent {
        Ok(trailers) => Piped::Ended(trailers),
        Err(error) => Piped::Failed(error),
    }
}

/// Sends `data` as the peer's window allows, without ending the stream.
pub async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
        };
        if granted > 0 {
            send.send_data(data.split_to(granted.min(data.len())), false)?;
        }
    }
    Ok(())
}

fn reset_by_peer(reset: Result<Reason, h2::Error>) -> Piped {
    Piped::Failed(reset.map_or_else(|error| error, h2::Error::from))
}

/// `recv` failed: `send` is reset with its reason (CANCEL for a connection
/// error), so the other peer learns it.
fn failed(send: &mut SendStream<Bytes>, error: h2::Error) -> Piped {
    send.send_reset(error.reason().unwrap_or(Reason::CANCEL));
    Piped::Failed(error)
}
