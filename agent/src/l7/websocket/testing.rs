//! Frames as a client builds them, and frames read back, for the tests.

use flate2::{Compress, Compression, FlushCompress};

use super::frame::{self, apply_mask, parse_header};

/// The key the test clients mask with: any key works, a fixed one keeps
/// failures reproducible.
pub const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// A masked client frame; `first` is the first byte (FIN, RSV, opcode).
pub fn raw_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![first];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&KEY);
    let start = frame.len();
    frame.extend_from_slice(payload);
    apply_mask(&mut frame[start..], KEY, 0);
    frame
}

/// A masked client frame without RSV bits.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { 0x80 } else { 0 } | opcode, payload)
}

/// A compressed message's first (or only) frame: RSV1 set.
pub fn compressed_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { 0xC0 } else { 0x40 } | opcode, payload)
}

/// A client's compressor (RFC 7692 §7.2.1): raw DEFLATE, each message
/// flushed and its trailing empty block removed.
pub struct Deflater(Compress);

impl Deflater {
    pub fn new() -> Self {
        Self(Compress::new(Compression::default(), false))
    }

    pub fn compress(&mut self, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(message.len() / 2 + 64);
        let mut input = message;
        loop {
            out.reserve(64 * 1024);
            let before = self.0.total_in();
            self.0.compress_vec(input, &mut out, FlushCompress::Sync).expect("compress");
            input = &input[(self.0.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]), "a sync flush ends with an empty stored block");
        out.truncate(out.len() - 4);
        out
    }

    /// One message as a final DEFLATE stream (BFINAL), as RFC 7692 §7.2.3.4
    /// allows; the next message starts a new stream.
    pub fn compress_final(&mut self, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(message.len() + 64);
        self.0.compress_vec(message, &mut out, FlushCompress::Finish).expect("compress");
        self.0.reset();
        out
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }
}

/// A frame as the other side reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("UTF-8 payload")
    }

    /// A close frame's code and reason.
    pub fn close(&self) -> (u16, &str) {
        assert_eq!(self.opcode, frame::CLOSE, "{self:?}");
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        (code, std::str::from_utf8(&self.payload[2..]).expect("UTF-8 reason"))
    }
}

/// Splits `bytes` into whole frames, payloads unmasked.
pub fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let header = parse_header(bytes).expect("a valid header").expect("a whole header");
        let end = header.header_len + header.len as usize;
        let mut payload = bytes[header.header_len..end].to_vec();
        if let Some(key) = header.mask {
            apply_mask(&mut payload, key, 0);
        }
        frames.push(Frame {
            fin: header.fin,
            rsv: (bytes[0] >> 4) & 0x7,
            opcode: header.opcode,
            masked: header.mask.is_some(),
            payload,
        });
        bytes = &bytes[end..];
    }
    frames
}

/// The next whole frame from `stream`.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(stream: &mut R) -> Frame {
    use tokio::io::AsyncReadExt;
    let mut header = vec![0u8; 2];
    stream.read_exact(&mut header).await.expect("a frame header");
    let extended = match header[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if header[1] & 0x80 != 0 { 4 } else { 0 };
    let mut rest = vec![0u8; extended + mask];
    stream.read_exact(&mut rest).await.expect("the rest of the header");
    header.extend(rest);
    let len = parse_header(&header).expect("a valid header").expect("a whole header").len;
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.expect("the payload");
    frames(&[header, payload].concat()).remove(0)
}
