//! The TLS ClientHello peek, `parse_client_hello`, which sniff() calls again
//! on the whole buffer each time more bytes arrive.
//!
//! Input: a big-endian u16 that picks where to cut, then the stream's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox_egress::{
    sniff::tls::{parse_client_hello, MAX_CLIENT_HELLO_WIRE, MAX_RECORD_LEN},
    wire::{host::dns_name, Parse},
};

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;

fuzz_target!(|input: &[u8]| {
    let Some((&cut, wire)) = input.split_first_chunk::<2>() else {
        return;
    };
    let cut = usize::from(u16::from_be_bytes(cut));
    let whole = parse_client_hello(wire);

    // The stream in two TCP segments: sniff() stops at the first answer, so
    // an answer on the first segment must be the answer on both.
    let first_segment = &wire[..cut % (wire.len() + 1)];
    let early = parse_client_hello(first_segment);
    if early != Parse::NeedMore {
        assert_eq!(early, whole, "answer on the first {} bytes changed with more", first_segment.len());
    }

    // sniff() buffers no more than this, relying on an answer by then.
    if wire.len() >= MAX_CLIENT_HELLO_WIRE {
        assert_ne!(whole, Parse::NeedMore, "no answer after {} bytes", wire.len());
    }

    if let Parse::Done(hello) = &whole {
        if let Some(sni) = &hello.sni {
            assert_eq!(dns_name(sni.as_bytes()).as_deref(), Ok(sni.as_str()), "SNI is not a lower-cased DNS name");
            let handshake = handshake_payload(wire);
            assert!(
                handshake.windows(sni.len()).any(|window| window.eq_ignore_ascii_case(sni.as_bytes())),
                "SNI {sni:?} is not in the handshake bytes"
            );
        }
    }

    // The same handshake bytes framed as two records instead of one.
    if let Some(refragmented) = split_first_record(wire, cut) {
        assert_eq!(parse_client_hello(&refragmented), whole, "answer changed with the hello split into two records");
    }
});

/// The payloads of the leading handshake records, concatenated: where a
/// ClientHello's fields come from, whichever records it was spread over.
fn handshake_payload(wire: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut rest = wire;
    while let Some((&[content_type, _, _, len_high, len_low], after_header)) = rest.split_first_chunk() {
        if content_type != CONTENT_TYPE_HANDSHAKE {
            break;
        }
        let len = usize::from(u16::from_be_bytes([len_high, len_low])).min(after_header.len());
        let (fragment, after_record) = after_header.split_at(len);
        payload.extend_from_slice(fragment);
        rest = after_record;
    }
    payload
}

/// When the first record is a complete handshake record holding a whole
/// handshake message, the wire with that record cut in two at a point
/// derived from `cut` (the rest unchanged); `None` otherwise.
fn split_first_record(wire: &[u8], cut: usize) -> Option<Vec<u8>> {
    let (&[content_type, version_major, version_minor, len_high, len_low], after_header) = wire.split_first_chunk()?;
    let record_len = usize::from(u16::from_be_bytes([len_high, len_low]));
    if content_type != CONTENT_TYPE_HANDSHAKE || version_major != 3 || record_len > MAX_RECORD_LEN {
        return None;
    }
    let (fragment, after_record) = after_header.split_at_checked(record_len)?;
    let &[_, message_len_high, message_len_middle, message_len_low] = fragment.first_chunk::<HANDSHAKE_HEADER_LEN>()?;
    let message_len =
        HANDSHAKE_HEADER_LEN + u32::from_be_bytes([0, message_len_high, message_len_middle, message_len_low]) as usize;
    if message_len > fragment.len() {
        return None;
    }
    // Both records non-empty: an empty one is refused on its own account.
    let (first, second) = fragment.split_at(1 + cut % (fragment.len() - 1));
    let mut refragmented = Vec::with_capacity(wire.len() + RECORD_HEADER_LEN);
    for part in [first, second] {
        refragmented.extend_from_slice(&[content_type, version_major, version_minor]);
        refragmented.extend_from_slice(&u16::try_from(part.len()).ok()?.to_be_bytes());
        refragmented.extend_from_slice(part);
    }
    refragmented.extend_from_slice(after_record);
    Some(refragmented)
}
