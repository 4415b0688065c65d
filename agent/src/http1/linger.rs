//! The last step before closing a connection whose client may still be
//! sending (the rest of a body after an early response or a refusal).

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    time::{timeout_at, Instant},
};

/// Longest the agent keeps reading from a client it is closing on...
const LINGER_TIME: Duration = Duration::from_secs(2);
/// ...and the most it reads: about what the socket buffers on the way hold.
const LINGER_BYTES: u64 = 16 << 20;

/// Call once the response is written and the write side shut down: closing
/// with unread bytes would reset the connection, and a reset can destroy
/// the response before the client reads it (RFC 9112 §9.6). So the client's
/// bytes are read and dropped until it closes, for at most [`LINGER_TIME`]
/// and [`LINGER_BYTES`].
pub async fn linger<R: AsyncRead + Unpin>(client: &mut R) {
    drain(client, LINGER_TIME, LINGER_BYTES).await;
}

async fn drain<R: AsyncRead + Unpin>(client: &mut R, time: Duration, max_bytes: u64) {
    let deadline = Instant::now() + time;
    let mut drained = 0u64;
    let mut buffer = vec![0u8; 16 * 1024];
    while drained < max_bytes {
        match timeout_at(deadline, client.read(&mut buffer)).await {
            Ok(Ok(read)) if read > 0 => drained += read as u64,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_until_the_client_closes() {
        let (mut client, mut agent) = duplex(1024);
        let sender = tokio::spawn(async move {
            for _ in 0..64 {
                client.write_all(&[b'x'; 512]).await.unwrap();
            }
        });
        let started = Instant::now();
        linger(&mut agent).await;
        assert!(started.elapsed() < LINGER_TIME, "ended by the close, not the deadline");
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_never_closes_or_never_stops_is_left_at_a_bound() {
        let time = Duration::from_millis(50);
        let (_client, mut agent) = duplex(1024);
        let started = Instant::now();
        drain(&mut agent, time, LINGER_BYTES).await;
        assert!(started.elapsed() >= time && started.elapsed() < Duration::from_secs(2));

        let (mut client, mut agent) = duplex(1 << 16);
        client.write_all(&[b'x'; 1 << 16]).await.unwrap();
        let started = Instant::now();
        drain(&mut agent, Duration::from_secs(10), 1024).await;
        assert!(started.elapsed() < Duration::from_secs(2), "stopped at the byte bound");
    }
}
