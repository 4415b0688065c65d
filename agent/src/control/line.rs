//! One JSON message per line, both ways, each line bounded.

use std::io;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// One line without its end, at most `max` bytes; `None` at EOF.
pub async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    (&mut *reader).take(max as u64 + 1).read_until(b'\n', &mut line).await?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("line longer than {max} bytes")));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

pub fn reply_line(reply: &Value) -> String {
    format!("{reply}\n")
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut reader = BufReader::new(&b"short\r\nnext"[..]);
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), Some(b"short".to_vec()));
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), Some(b"next".to_vec()));
        assert_eq!(read_line(&mut reader, 16).await.unwrap(), None);
        let long = [b'x'; 100];
        let error = read_line(&mut BufReader::new(&long[..]), 16).await.unwrap_err();
        assert!(error.to_string().contains("longer than 16 bytes"), "{error}");
    }
}
