//! A stream whose first bytes were already read (sniffed) and are served
//! again before the rest: what a TLS acceptor needs after the ClientHello
//! was peeked at by reading it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Rewound<S> {
    replay: Vec<u8>,
    replayed: usize,
    inner: S,
}

impl<S> Rewound<S> {
    pub fn new(replay: Vec<u8>, inner: S) -> Self {
        Self { replay, replayed: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let pending = &this.replay[this.replayed..];
            let n = pending.len().min(buf.remaining());
            buf.put_slice(&pending[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn replayed_bytes_come_first_then_the_stream_and_writes_pass_through() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut stream = Rewound::new(b"hello ".to_vec(), near);
        far.write_all(b"world").await.unwrap();
        far.shutdown().await.unwrap();
        let mut read = Vec::new();
        // A small buffer makes the replay span several reads.
        let mut chunk = [0u8; 4];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            read.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(read, b"hello world");
        stream.write_all(b"reply").await.unwrap();
        let mut echoed = [0u8; 5];
        far.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"reply");
    }
}
