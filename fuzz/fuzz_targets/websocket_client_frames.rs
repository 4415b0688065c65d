//! The WebSocket relay's reading of a client's frames: parsed, assembled,
//! inflated (permessage-deflate with and without context takeover) and
//! held to the protocol's rules and limits, as the live relay reads them.
//!
//! Input: a control byte (bits 0-1: no deflate, deflate, deflate without
//! context takeover; bits 2-4: the size of the pieces the bytes arrive in;
//! bit 5: small limits, so they are reached), then the client's bytes.
//! Asserts: never panics; what comes out does not depend on how the bytes
//! arrive; every frame for the origin is a valid masked frame with RSV bits
//! clear, a control frame whole and short; text is within its limit; after
//! an error or the client's close nothing more comes out; the origin's
//! frame boundaries are followed the same in pieces as whole.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox_egress::l7::websocket::{
    frame::{self, Boundaries},
    ClientFrames, Close, Deflate, Limits, Progress, Step,
};

/// What the origin would see, independent of how the input was cut: data
/// messages whole, control frames and text messages as they come.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Binary(Vec<u8>),
    Control(u8, Vec<u8>),
    Text(String),
    Closed(Vec<u8>),
    Error(Close),
}

fn read(input: &[u8], piece: usize, deflate: Option<&Deflate>, limits: &Limits) -> Vec<Seen> {
    let mut frames = ClientFrames::new(deflate, limits);
    let mut seen = Vec::new();
    let mut binary: Option<Vec<u8>> = None;
    let mut buffered = Vec::new();
    for chunk in input.chunks(piece) {
        buffered.extend_from_slice(chunk);
        loop {
            let Progress { consumed, step } = match frames.step(&buffered) {
                Ok(progress) => progress,
                Err(close) => {
                    seen.push(Seen::Error(close));
                    return seen;
                }
            };
            assert!(consumed <= buffered.len());
            buffered.drain(..consumed);
            let Some(step) = step else { break };
            match step {
                Step::Text(text) => {
                    assert!(text.len() <= limits.max_text);
                    seen.push(Seen::Text(text));
                }
                Step::Upstream(bytes) | Step::Close(bytes) => {
                    let (header, payload) = parse_own_frame(&bytes);
                    match header.opcode {
                        frame::BINARY | frame::CONTINUATION => {
                            assert_eq!(header.opcode == frame::BINARY, binary.is_none(), "binary frames out of order");
                            let data = binary.get_or_insert_with(Vec::new);
                            data.extend_from_slice(&payload);
                            assert!(data.len() as u64 <= limits.max_binary);
                            if header.fin {
                                seen.push(Seen::Binary(binary.take().unwrap_or_default()));
                            }
                        }
                        frame::CLOSE => {
                            frame::check_close_payload(&payload).expect("only valid closes are forwarded");
                            seen.push(Seen::Closed(payload));
                        }
                        opcode => {
                            assert!(frame::is_control(opcode), "text goes to the inspector, not straight on");
                            seen.push(Seen::Control(opcode, payload));
                        }
                    }
                }
            }
        }
    }
    seen
}

/// A frame the relay built: one whole, valid, masked frame, RSV clear.
fn parse_own_frame(bytes: &[u8]) -> (frame::Header, Vec<u8>) {
    let header = frame::parse_header(bytes).expect("a valid header").expect("a whole header");
    assert!(!header.rsv1 && !header.rsv23, "RSV bits go to the origin clear");
    assert_eq!(bytes.len() as u64, header.header_len as u64 + header.len, "exactly one frame");
    let key = header.mask.expect("frames to the origin are masked");
    let mut payload = bytes[header.header_len..].to_vec();
    frame::apply_mask(&mut payload, key, 0);
    (header, payload)
}

fuzz_target!(|input: &[u8]| {
    let Some((&control, bytes)) = input.split_first() else { return };
    let deflate = match control & 3 {
        1 => Some(Deflate { client_no_context_takeover: false }),
        2 | 3 => Some(Deflate { client_no_context_takeover: true }),
        _ => None,
    };
    let piece = [1, 2, 3, 7, 64, 1000, 4096, usize::MAX][usize::from((control >> 2) & 7)];
    let limits = if control & 0x20 != 0 {
        Limits { max_text: 64, max_binary: 256, max_fragments: 4, ..Limits::default() }
    } else {
        Limits::default()
    };
    let whole = read(bytes, usize::MAX, deflate.as_ref(), &limits);
    let pieces = read(bytes, piece, deflate.as_ref(), &limits);
    assert_eq!(whole, pieces, "the result depends on how the bytes arrive");
    if let Some(end) = whole.iter().position(|seen| matches!(seen, Seen::Closed(_) | Seen::Error(_))) {
        assert!(end + 1 == whole.len() || matches!(whole[end + 1..], [Seen::Error(_)]), "nothing after the close");
    }

    // The same bytes as the origin's: followed to the same place either way.
    let mut at_once = Boundaries::default();
    assert_eq!(at_once.follow(bytes, false), bytes.len());
    let mut bit_by_bit = Boundaries::default();
    for chunk in bytes.chunks(piece) {
        assert_eq!(bit_by_bit.follow(chunk, false), chunk.len());
    }
    assert_eq!((at_once.at_boundary(), at_once.closed), (bit_by_bit.at_boundary(), bit_by_bit.closed));
});
