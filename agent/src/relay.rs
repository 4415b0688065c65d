//! Byte relay between the sandboxed client and the upstream.
//!
//! Each direction copies until EOF and then half-closes its writer, so a FIN
//! travels end to end. Byte counts survive errors: the close log always says
//! how much went each way.

use std::io;

use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

const BUFFER_SIZE: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Outcome {
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
    /// The first error of either direction; the relay stops at it.
    pub error: Option<io::Error>,
}

pub async fn relay(client: TcpStream, upstream: TcpStream) -> Outcome {
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let mut outcome = Outcome::default();
    let result = tokio::try_join!(
        copy_until_eof(client_read, upstream_write, &mut outcome.bytes_up),
        copy_until_eof(upstream_read, client_write, &mut outcome.bytes_down),
    );
    outcome.error = result.err();
    outcome
}

async fn copy_until_eof(from: OwnedReadHalf, mut to: OwnedWriteHalf, copied: &mut u64) -> io::Result<()> {
    // The buffer is allocated on first data: idle connections cost no buffer.
    let mut buffer = Vec::new();
    loop {
        from.ready(Interest::READABLE).await?;
        if buffer.is_empty() {
            buffer = vec![0u8; BUFFER_SIZE];
        }
        let read = match from.try_read(&mut buffer) {
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        if read == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..read]).await?;
        *copied += read as u64;
    }
}
