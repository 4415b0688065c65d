//! RFC 6455 §5 frames: the client's headers parsed strictly, the frames the
//! relay sends built, close payloads checked and made, and the boundaries
//! of the origin's frames followed (they are copied unparsed, but the
//! relay's own close frame must go in between two of them).

use super::Close;

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// Close codes (RFC 6455 §7.4.1).
pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_DATA: u16 = 1007;
pub const POLICY_VIOLATION: u16 = 1008;
pub const TOO_BIG: u16 = 1009;
pub const SERVICE_RESTART: u16 = 1012;

/// A control frame's payload limit (§5.5); a close reason gets what the
/// 2-byte code leaves of it.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// The longest header: 2 bytes, a 64-bit length, a masking key.
const MAX_HEADER: usize = 14;

/// One frame's header, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub rsv1: bool,
    /// RSV2 or RSV3: no extension the relay accepts defines them.
    pub rsv23: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes of the header itself; the payload follows.
    pub header_len: usize,
}

pub fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// The header at the start of `buf`: `Ok(None)` while more bytes are
/// needed, `Err` with the reason for a header no endpoint may send (§5.2,
/// §5.5): a reserved opcode, a fragmented or long control frame, a length
/// not in its shortest form or with the most significant bit set.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    let [first, second, ..] = *buf else { return Ok(None) };
    let opcode = first & 0x0F;
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err("reserved opcode");
    }
    let fin = first & 0x80 != 0;
    let masked = second & 0x80 != 0;
    let (len, mut header_len) = match second & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else { return Ok(None) };
            let len = u64::from(u16::from_be_bytes([bytes[0], bytes[1]]));
            if len < 126 {
                return Err("16-bit length not in its shortest form");
            }
            (len, 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else { return Ok(None) };
            let len = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err("64-bit length with the most significant bit set");
            }
            if len <= u64::from(u16::MAX) {
                return Err("64-bit length not in its shortest form");
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    if is_control(opcode) && !fin {
        return Err("fragmented control frame");
    }
    if is_control(opcode) && len > MAX_CONTROL_PAYLOAD as u64 {
        return Err("control frame payload over 125 bytes");
    }
    let mask = if masked {
        let Some(key) = buf.get(header_len..header_len + 4) else { return Ok(None) };
        header_len += 4;
        Some(key.try_into().expect("4 bytes"))
    } else {
        None
    };
    Ok(Some(Header { fin, rsv1: first & 0x40 != 0, rsv23: first & 0x30 != 0, opcode, mask, len, header_len }))
}

/// XORs `data` with `key` (§5.3), `offset` bytes into the frame's payload:
/// masks and unmasks alike.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let key = u32::from_ne_bytes(key).rotate_right(8 * (offset % 4) as u32).to_ne_bytes();
    let mut words = data.chunks_exact_mut(4);
    let word_key = u32::from_ne_bytes(key);
    for word in &mut words {
        let masked = u32::from_ne_bytes((&*word).try_into().expect("4 bytes")) ^ word_key;
        word.copy_from_slice(&masked.to_ne_bytes());
    }
    for (byte, key_byte) in words.into_remainder().iter_mut().zip(key) {
        *byte ^= key_byte;
    }
}

/// A complete frame with RSV bits clear: masked with a fresh key for the
/// origin (§5.3: unpredictable, so the client cannot choose what the bytes
/// on the wire look like), unmasked for the client.
pub fn encode(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut frame = Vec::with_capacity(MAX_HEADER + payload.len());
    frame.push(if fin { 0x80 } else { 0 } | opcode);
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => frame.push(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        let key: [u8; 4] = rand::random();
        frame.extend_from_slice(&key);
        let start = frame.len();
        frame.extend_from_slice(payload);
        apply_mask(&mut frame[start..], key, 0);
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// A close frame with `close`'s code and reason, the reason cut to fit a
/// control frame (at a character boundary, so it stays UTF-8).
pub fn encode_close(close: &Close, masked: bool) -> Vec<u8> {
    let mut end = close.reason.len().min(MAX_CLOSE_REASON);
    while !close.reason.is_char_boundary(end) {
        end -= 1;
    }
    let payload = [&close.code.to_be_bytes()[..], &close.reason.as_bytes()[..end]].concat();
    encode(true, CLOSE, &payload, masked)
}

/// Checks a client's close payload (§5.5.1, §7.4): empty, or a code an
/// endpoint may send and a UTF-8 reason.
pub fn check_close_payload(payload: &[u8]) -> Result<(), Close> {
    let code = match payload {
        [] => return Ok(()),
        [_] => return Err(Close::protocol("close frame with a 1-byte payload")),
        [high, low, ..] => u16::from_be_bytes([*high, *low]),
    };
    // 1004-1006 and 1015 are reserved for reports, never sent; 1016-2999
    // are unassigned or for extensions the relay does not accept.
    let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if !sendable {
        return Err(Close::protocol(format!("close code {code} may not be sent")));
    }
    if std::str::from_utf8(&payload[2..]).is_err() {
        return Err(Close { code: INVALID_DATA, reason: "close reason is not UTF-8".into() });
    }
    Ok(())
}

/// Follows the origin's frames through the bytes copied to the client,
/// without judging them, to know where one ends.
#[derive(Debug, Default)]
pub struct Boundaries {
    header: [u8; MAX_HEADER],
    header_have: usize,
    remaining: u64,
    /// The origin sent a close frame: the client must get no other.
    pub closed: bool,
}

impl Boundaries {
    /// Whether the bytes followed so far end with a whole frame.
    pub fn at_boundary(&self) -> bool {
        self.header_have == 0 && self.remaining == 0
    }

    /// Follows `bytes`, or with `stop` only up to the first boundary;
    /// returns how many it followed.
    pub fn follow(&mut self, bytes: &[u8], stop: bool) -> usize {
        let mut followed = 0;
        while followed < bytes.len() {
            if stop && self.at_boundary() {
                break;
            }
            if self.remaining > 0 {
                let take = self.remaining.min((bytes.len() - followed) as u64);
                self.remaining -= take;
                followed += take as usize;
                continue;
            }
            self.header[self.header_have] = bytes[followed];
            self.header_have += 1;
            followed += 1;
            let header = &self.header[..self.header_have];
            if let Some((len, opcode)) = lenient_header(header) {
                self.remaining = len;
                self.header_have = 0;
                self.closed |= opcode == CLOSE;
            }
        }
        followed
    }
}

/// The payload length and opcode of a complete header (as long as it
/// says, whatever it says), `None` while it is incomplete.
fn lenient_header(header: &[u8]) -> Option<(u64, u8)> {
    let [first, second, ..] = *header else { return None };
    let (extended, len_bytes) = match second & 0x7F {
        126 => (true, 2),
        127 => (true, 8),
        _ => (false, 0),
    };
    let mask_len = if second & 0x80 != 0 { 4 } else { 0 };
    if header.len() < 2 + len_bytes + mask_len {
        return None;
    }
    let len = if extended {
        header[2..2 + len_bytes].iter().fold(0u64, |len, &byte| (len << 8) | u64::from(byte))
    } else {
        u64::from(second & 0x7F)
    };
    Some((len, first & 0x0F))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> Result<Option<Header>, &'static str> {
        parse_header(bytes)
    }

    #[test]
    fn headers_parse_with_each_length_form_and_wait_for_their_bytes() {
        let short = header(&[0x81, 0x85, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!(
            short,
            Header {
                fin: true,
                rsv1: false,
                rsv23: false,
                opcode: TEXT,
                mask: Some([1, 2, 3, 4]),
                len: 5,
                header_len: 6
            }
        );
        let medium = header(&[0x02, 0xFE, 0x01, 0x00, 9, 9, 9, 9]).unwrap().unwrap();
        assert_eq!((medium.fin, medium.opcode, medium.len, medium.header_len), (false, BINARY, 256, 8));
        let long = [&[0xC1, 0xFF][..], &0x1_0000u64.to_be_bytes(), &[0; 4]].concat();
        let long_header = header(&long).unwrap().unwrap();
        assert_eq!((long_header.rsv1, long_header.len, long_header.header_len), (true, 0x1_0000, 14));
        for cut in 0..long.len() {
            assert_eq!(header(&long[..cut]), Ok(None), "{cut} bytes");
        }
        let unmasked = header(&[0x89, 0x00]).unwrap().unwrap();
        assert_eq!((unmasked.mask, unmasked.header_len), (None, 2));
        assert!(header(&[0xB1, 0x80, 0, 0, 0, 0]).unwrap().unwrap().rsv23);
    }

    #[test]
    fn headers_no_endpoint_may_send_are_refused() {
        for (bytes, reason) in [
            (vec![0x83, 0x80], "reserved opcode"),
            (vec![0x8B, 0x80], "reserved opcode"),
            (vec![0x09, 0x80], "fragmented control frame"),
            (vec![0x88, 0xFE, 0x00, 0x7E], "control frame payload over 125 bytes"),
            (vec![0x82, 0xFE, 0x00, 0x7D], "16-bit length not in its shortest form"),
            ([&[0x82, 0xFF][..], &0xFFFFu64.to_be_bytes()].concat(), "64-bit length not in its shortest form"),
            (
                [&[0x82, 0xFF][..], &(1u64 << 63).to_be_bytes()].concat(),
                "64-bit length with the most significant bit set",
            ),
        ] {
            assert_eq!(header(&bytes), Err(reason), "{bytes:02x?}");
        }
    }

    #[test]
    fn masking_twice_at_any_offset_is_the_identity_and_matches_the_rfc() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut hello = *b"Hello";
        apply_mask(&mut hello, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(hello, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        let data: Vec<u8> = (0..=255).collect();
        let key = [0xA5, 0x01, 0x7F, 0xC3];
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        // Unmasking in pieces that start at any offset gives the same bytes.
        let mut pieces = whole.clone();
        let mut offset = 0;
        for len in [1, 2, 3, 5, 7, 11, 13, 214] {
            apply_mask(&mut pieces[offset..offset + len], key, offset as u64);
            offset += len;
        }
        assert_eq!(pieces, data);
    }

    #[test]
    fn encoded_frames_parse_back_with_their_payload() {
        for len in [0, 125, 126, 0xFFFF, 0x1_0000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for masked in [true, false] {
                let frame = encode(len % 2 == 0, BINARY, &payload, masked);
                let parsed = parse_header(&frame).unwrap().unwrap();
                assert_eq!((parsed.fin, parsed.rsv1, parsed.len), (len % 2 == 0, false, len as u64));
                let mut body = frame[parsed.header_len..].to_vec();
                if let Some(key) = parsed.mask {
                    apply_mask(&mut body, key, 0);
                }
                assert_eq!(parsed.mask.is_some(), masked);
                assert_eq!(body, payload);
            }
        }
    }

    #[test]
    fn close_reasons_are_cut_to_fit_at_a_character_boundary() {
        let close = Close { code: 1008, reason: "é".repeat(100) };
        let frame = encode_close(&close, false);
        assert_eq!(frame.len(), 2 + 2 + 122, "122 bytes of reason: 61 two-byte characters");
        assert_eq!(&frame[2..4], &1008u16.to_be_bytes());
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
        assert_eq!(check_close_payload(&frame[2..]), Ok(()));
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(check_close_payload(b""), Ok(()));
        assert_eq!(check_close_payload(&[0x03, 0xE8]), Ok(()));
        for code in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert_eq!(check_close_payload(&code.to_be_bytes()), Ok(()), "{code}");
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert_eq!(check_close_payload(&code.to_be_bytes()).unwrap_err().code, PROTOCOL_ERROR, "{code}");
        }
        assert_eq!(check_close_payload(&[0x03]).unwrap_err().code, PROTOCOL_ERROR);
        assert_eq!(check_close_payload(&[0x03, 0xE8, 0xFF]).unwrap_err().code, INVALID_DATA);
    }

    #[test]
    fn boundaries_are_followed_across_any_split() {
        let frames = [
            encode(false, TEXT, b"first", false),
            encode(true, PING, b"", false),
            encode(true, CONTINUATION, &[7; 300], false),
            encode(true, BINARY, &[1; 70_000], false),
            encode(true, CLOSE, &[3, 232], false),
        ];
        let stream = frames.concat();
        let ends: Vec<usize> =
            frames.iter().scan(0, |end, frame| Some(*end + frame.len()).inspect(|&e| *end = e)).collect();
        for step in [1, 2, 3, 13, 1000, stream.len()] {
            let mut boundaries = Boundaries::default();
            let mut seen_ends = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let piece = &stream[at..(at + step).min(stream.len())];
                // Stopping at each boundary finds every frame end in order.
                let mut taken = 0;
                while taken < piece.len() {
                    let followed = boundaries.follow(&piece[taken..], true);
                    taken += followed;
                    if boundaries.at_boundary() {
                        seen_ends.push(at + taken);
                        if followed == 0 {
                            // At a boundary already: move one byte on.
                            taken += boundaries.follow(&piece[taken..taken + 1], false);
                        }
                    }
                }
                at += piece.len();
            }
            seen_ends.retain(|&end| end > 0);
            seen_ends.dedup();
            assert_eq!(seen_ends, ends, "step {step}");
            assert!(boundaries.closed && boundaries.at_boundary());
        }
        let mut unstopped = Boundaries::default();
        assert_eq!(unstopped.follow(&stream[..10], false), 10);
        assert!(!unstopped.closed);
    }
}
