//! Test doubles shared by the http1 tests.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

pub fn fields(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(name, value)| (name.to_string(), value.as_bytes().to_vec())).collect()
}

/// Hands out its bytes at most `step` per read, then reports EOF or, with
/// `then_pending`, stays pending like a peer that went quiet.
pub struct Trickle {
    data: Vec<u8>,
    position: usize,
    step: usize,
    pending_at_end: bool,
}

impl Trickle {
    pub fn new(data: &[u8], step: usize) -> Self {
        Self { data: data.to_vec(), position: 0, step, pending_at_end: false }
    }

    pub fn then_pending(mut self) -> Self {
        self.pending_at_end = true;
        self
    }

    /// Bytes never read.
    pub fn unread(&self) -> &[u8] {
        &self.data[self.position..]
    }
}

impl AsyncRead for Trickle {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let rest = &self.data[self.position..];
        if rest.is_empty() && self.pending_at_end {
            return Poll::Pending;
        }
        let len = rest.len().min(self.step).min(buf.remaining());
        buf.put_slice(&rest[..len]);
        self.position += len;
        Poll::Ready(Ok(()))
    }
}
