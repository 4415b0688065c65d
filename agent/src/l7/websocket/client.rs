//! The client's side of a WebSocket connection, without I/O: bytes in,
//! frames for the origin and complete text messages for the inspector out.
//! Every frame rule and limit of the relay is enforced here (the timed ones
//! are the relay's), so the fuzz target reaches all of it.
//!
//! Text messages are assembled whole (after inflation), since the inspector
//! decides on a complete message. Binary messages are never held: each
//! frame goes on as its payload arrives, in frames of at most [`PIECE`]
//! bytes, inflated if the client compressed it.

use flate2::{Decompress, FlushDecompress, Status};

use super::{
    frame::{self, Header, BINARY, CLOSE, CONTINUATION, TEXT},
    Close, Deflate, Limits,
};

/// Payload bytes handled at once, and the most a binary frame sent on holds
/// before the rest of its client frame arrives.
pub const PIECE: usize = 64 * 1024;
/// Output of one call of the inflater.
const INFLATE_STEP: usize = 16 * 1024;
/// What RFC 7692 §7.2.2 has the sender strip from the end of each message.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];
/// A compressed message may take more bytes than it inflates to (stored
/// blocks, a poor compressor) but not without bound.
const COMPRESSED_SLACK: u64 = 2;

/// What the client's bytes call for next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A frame for the origin, masked.
    Upstream(Vec<u8>),
    /// A complete text message, for the inspector.
    Text(String),
    /// The client's close frame, for the origin: no frame may follow it.
    Close(Vec<u8>),
}

/// How far one call of [`ClientFrames::step`] got.
#[derive(Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input it used; the caller drops them.
    pub consumed: usize,
    /// `None` when it needs more bytes than the input has.
    pub step: Option<Step>,
}

/// The client's frames, read as they arrive.
pub struct ClientFrames {
    limits: Limits,
    /// Present when permessage-deflate was negotiated.
    inflater: Option<Inflater>,
    /// The data frame whose payload is being read.
    frame: Option<DataFrame>,
    message: Message,
    /// The client sent its close frame.
    closed: bool,
    /// One piece of payload, unmasked.
    scratch: Vec<u8>,
}

#[derive(Clone, Copy)]
struct DataFrame {
    fin: bool,
    mask: [u8; 4],
    remaining: u64,
    /// Payload bytes read so far: where the masking key stands.
    offset: u64,
}

enum Message {
    None,
    Text(TextMessage),
    Binary(BinaryMessage),
}

struct TextMessage {
    compressed: bool,
    fragments: usize,
    /// Payload bytes as received (compressed or not).
    received: u64,
    data: Vec<u8>,
}

struct BinaryMessage {
    compressed: bool,
    fragments: usize,
    received: u64,
    /// Bytes of the message sent on or waiting in `piece`.
    delivered: u64,
    /// A frame of it went to the origin already: the next is a continuation.
    started: bool,
    piece: Vec<u8>,
}

impl ClientFrames {
    pub fn new(deflate: Option<&Deflate>, limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            inflater: deflate.map(Inflater::new),
            frame: None,
            message: Message::None,
            closed: false,
            scratch: Vec::new(),
        }
    }

    /// Whether a text message has begun and not ended (its assembly is
    /// bounded in time by the relay).
    pub fn assembling_text(&self) -> bool {
        matches!(self.message, Message::Text(_))
    }

    /// Reads what it can of `input` until it has a step to return or
    /// needs more bytes; `Err` is the close both sides get.
    pub fn step(&mut self, input: &[u8]) -> Result<Progress, Close> {
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            let Some(mut frame) = self.frame else {
                let Some(header) = frame::parse_header(rest).map_err(Close::protocol)? else {
                    return Ok(Progress { consumed, step: None });
                };
                if frame::is_control(header.opcode) {
                    return match self.control(&header, rest)? {
                        Some((len, step)) => Ok(Progress { consumed: consumed + len, step: Some(step) }),
                        None => Ok(Progress { consumed, step: None }),
                    };
                }
                self.start_data_frame(&header)?;
                consumed += header.header_len;
                continue;
            };
            if frame.remaining > 0 {
                if rest.is_empty() {
                    return Ok(Progress { consumed, step: None });
                }
                let take = frame.remaining.min(rest.len() as u64).min(PIECE as u64) as usize;
                self.scratch.clear();
                self.scratch.extend_from_slice(&rest[..take]);
                frame::apply_mask(&mut self.scratch, frame.mask, frame.offset);
                let used = self.absorb()?;
                consumed += used;
                frame.remaining -= used as u64;
                frame.offset += used as u64;
                self.frame = Some(frame);
                if let Message::Binary(binary) = &mut self.message {
                    if binary.piece.len() >= PIECE {
                        return Ok(Progress { consumed, step: Some(Step::Upstream(binary.send(false))) });
                    }
                }
                continue;
            }
            self.frame = None;
            if let Some(step) = self.end_data_frame(frame.fin)? {
                return Ok(Progress { consumed, step: Some(step) });
            }
        }
    }

    /// A control frame, once all of it is in `input` (at most 131 bytes):
    /// its length and what it calls for.
    fn control(&mut self, header: &Header, input: &[u8]) -> Result<Option<(usize, Step)>, Close> {
        self.check_frame(header)?;
        if header.rsv1 {
            return Err(Close::protocol("RSV1 set on a control frame"));
        }
        let len = header.header_len + header.len as usize;
        let Some(payload) = input.get(header.header_len..len) else { return Ok(None) };
        let mut payload = payload.to_vec();
        frame::apply_mask(&mut payload, header.mask.unwrap_or_default(), 0);
        let forwarded = frame::encode(true, header.opcode, &payload, true);
        if header.opcode == CLOSE {
            frame::check_close_payload(&payload)?;
            self.closed = true;
            return Ok(Some((len, Step::Close(forwarded))));
        }
        Ok(Some((len, Step::Upstream(forwarded))))
    }

    /// The rules every frame's header meets, whatever its kind.
    fn check_frame(&self, header: &Header) -> Result<(), Close> {
        if self.closed {
            return Err(Close::protocol("a frame after the client's close frame"));
        }
        if header.mask.is_none() {
            return Err(Close::protocol("unmasked client frame"));
        }
        if header.rsv23 {
            return Err(Close::protocol("RSV2 or RSV3 set"));
        }
        Ok(())
    }

    fn start_data_frame(&mut self, header: &Header) -> Result<(), Close> {
        self.check_frame(header)?;
        let limits = &self.limits;
        match (header.opcode, &mut self.message) {
            (CONTINUATION, Message::None) => return Err(Close::protocol("continuation frame without a message")),
            (CONTINUATION, _) if header.rsv1 => {
                return Err(Close::protocol("RSV1 set on a continuation frame"));
            }
            (CONTINUATION, Message::Text(text)) => {
                text.fragments += 1;
                check_fragments(text.fragments, limits)?;
                check_size(
                    text.received + header.len,
                    text.data.len() as u64,
                    text.compressed,
                    limits.max_text as u64,
                )?;
                text.received += header.len;
            }
            (CONTINUATION, Message::Binary(binary)) => {
                binary.fragments += 1;
                check_fragments(binary.fragments, limits)?;
                check_size(binary.received + header.len, binary.delivered, binary.compressed, limits.max_binary)?;
                binary.received += header.len;
            }
            (_, Message::Text(_) | Message::Binary(_)) => {
                return Err(Close::protocol("a new data frame inside a fragmented message"));
            }
            (opcode, Message::None) => {
                let compressed = header.rsv1;
                match &mut self.inflater {
                    Some(inflater) if compressed => inflater.begin_message(),
                    None if compressed => return Err(Close::protocol("RSV1 set without permessage-deflate")),
                    _ => {}
                }
                self.message = if opcode == TEXT {
                    check_size(header.len, 0, compressed, limits.max_text as u64)?;
                    Message::Text(TextMessage { compressed, fragments: 1, received: header.len, data: Vec::new() })
                } else {
                    check_size(header.len, 0, compressed, limits.max_binary)?;
                    Message::Binary(BinaryMessage {
                        compressed,
                        fragments: 1,
                        received: header.len,
                        delivered: 0,
                        started: false,
                        piece: Vec::new(),
                    })
                };
            }
        }
        let mask = header.mask.expect("checked: client frames are masked");
        self.frame = Some(DataFrame { fin: header.fin, mask, remaining: header.len, offset: 0 });
        Ok(())
    }

    /// Takes in what it can of `scratch`, the unmasked payload just read:
    /// all of it, but for a compressed binary message only until a piece's
    /// worth is inflated. Returns how many bytes it took.
    fn absorb(&mut self) -> Result<usize, Close> {
        let (max_text, max_binary) = (self.limits.max_text, self.limits.max_binary);
        match &mut self.message {
            Message::Text(text) if text.compressed => {
                let inflater = self.inflater.as_mut().expect("compressed only with permessage-deflate");
                inflater.inflate(&self.scratch, false, &mut text.data, max_text, usize::MAX)
            }
            Message::Text(text) => {
                text.data.extend_from_slice(&self.scratch);
                Ok(self.scratch.len())
            }
            Message::Binary(binary) => {
                let before = binary.piece.len();
                let used = if binary.compressed {
                    let inflater = self.inflater.as_mut().expect("compressed only with permessage-deflate");
                    let room = (max_binary - binary.delivered) as usize + before;
                    inflater.inflate(&self.scratch, false, &mut binary.piece, room, PIECE)?
                } else {
                    binary.piece.extend_from_slice(&self.scratch);
                    self.scratch.len()
                };
                binary.delivered += (binary.piece.len() - before) as u64;
                Ok(used)
            }
            Message::None => unreachable!("a data frame's payload belongs to a message"),
        }
    }

    /// After a data frame's last payload byte: a complete text message, or
    /// what the origin gets of the binary one so far.
    fn end_data_frame(&mut self, fin: bool) -> Result<Option<Step>, Close> {
        let max_text = self.limits.max_text;
        let max_binary = self.limits.max_binary;
        match &mut self.message {
            Message::Text(text) if fin => {
                if text.compressed {
                    let inflater = self.inflater.as_mut().expect("compressed only with permessage-deflate");
                    inflater.inflate(&DEFLATE_TAIL, true, &mut text.data, max_text, usize::MAX)?;
                }
                let data = std::mem::take(&mut text.data);
                self.message = Message::None;
                let text = String::from_utf8(data)
                    .map_err(|_| Close { code: frame::INVALID_DATA, reason: "text message is not UTF-8".into() })?;
                Ok(Some(Step::Text(text)))
            }
            Message::Text(_) => Ok(None),
            Message::Binary(binary) => {
                if binary.compressed {
                    // What the inflater still holds of this frame comes out
                    // now: the client may wait for an answer to it.
                    let inflater = self.inflater.as_mut().expect("compressed only with permessage-deflate");
                    let before = binary.piece.len();
                    let room = (max_binary - binary.delivered) as usize + before;
                    let tail: &[u8] = if fin { &DEFLATE_TAIL } else { &[] };
                    inflater.inflate(tail, fin, &mut binary.piece, room, usize::MAX)?;
                    binary.delivered += (binary.piece.len() - before) as u64;
                }
                if fin {
                    let last = binary.send(true);
                    self.message = Message::None;
                    return Ok(Some(Step::Upstream(last)));
                }
                // The client may wait for an answer before its next frame.
                Ok((!binary.piece.is_empty()).then(|| Step::Upstream(binary.send(false))))
            }
            Message::None => unreachable!("a data frame belongs to a message"),
        }
    }
}

impl BinaryMessage {
    /// The waiting piece as a masked frame, uncompressed.
    fn send(&mut self, fin: bool) -> Vec<u8> {
        let opcode = if self.started { CONTINUATION } else { BINARY };
        self.started = true;
        let frame = frame::encode(fin, opcode, &self.piece, true);
        self.piece.clear();
        frame
    }
}

fn check_fragments(fragments: usize, limits: &Limits) -> Result<(), Close> {
    if fragments > limits.max_fragments {
        return Err(Close::protocol(format!("more than {} fragments in one message", limits.max_fragments)));
    }
    Ok(())
}

/// A message's bytes as received, and as delivered so far: over the limit
/// is 1009. A compressed message is bounded on the wire too, more loosely.
fn check_size(received: u64, delivered: u64, compressed: bool, limit: u64) -> Result<(), Close> {
    let wire_limit = if compressed { limit.saturating_mul(COMPRESSED_SLACK) } else { limit };
    if received > wire_limit || delivered > limit {
        return Err(too_big(limit));
    }
    Ok(())
}

fn too_big(limit: u64) -> Close {
    Close { code: frame::TOO_BIG, reason: format!("message over {limit} bytes") }
}

/// The client's compression context (RFC 7692 §7.2.2): raw DEFLATE, kept
/// from message to message unless `client_no_context_takeover`.
struct Inflater {
    decompress: Decompress,
    reset_each_message: bool,
    /// The stream ended (a block with BFINAL): nothing more may follow in
    /// this message, and the next starts a new stream.
    ended: bool,
}

impl Inflater {
    fn new(deflate: &Deflate) -> Self {
        // Raw DEFLATE with the largest window reads any smaller window.
        Self {
            decompress: Decompress::new(false),
            reset_each_message: deflate.client_no_context_takeover,
            ended: false,
        }
    }

    fn begin_message(&mut self) {
        if self.reset_each_message || self.ended {
            self.decompress.reset(false);
            self.ended = false;
        }
    }

    /// Inflates `input` onto `out`, failing once `out` would pass `limit`
    /// (1009) or the data is not DEFLATE (1002), and stopping once it
    /// reaches `enough`; returns the input bytes used. `tail`: the end of
    /// the message (RFC 7692's empty block, flushed).
    fn inflate(
        &mut self,
        input: &[u8],
        tail: bool,
        out: &mut Vec<u8>,
        limit: usize,
        enough: usize,
    ) -> Result<usize, Close> {
        if self.ended {
            return match tail || input.is_empty() {
                true => Ok(input.len()),
                false => Err(Close::protocol("compressed data after the end of its stream")),
            };
        }
        let mut rest = input;
        let flush = if tail { FlushDecompress::Sync } else { FlushDecompress::None };
        let mut step = [0u8; INFLATE_STEP];
        loop {
            let (in_before, out_before) = (self.decompress.total_in(), self.decompress.total_out());
            let status = self.decompress.decompress(rest, &mut step, flush);
            let read = (self.decompress.total_in() - in_before) as usize;
            let produced = (self.decompress.total_out() - out_before) as usize;
            rest = &rest[read..];
            // Checked before the data's validity, which comes later in the
            // stream: the same message fails the same way however it arrives.
            if out.len() + produced > limit {
                return Err(too_big(limit as u64));
            }
            let status = status.map_err(|_| Close::protocol("invalid compressed data"))?;
            out.extend_from_slice(&step[..produced]);
            if status == Status::StreamEnd {
                self.ended = true;
                return match rest.is_empty() || tail {
                    true => Ok(input.len()),
                    false => Err(Close::protocol("compressed data after the end of its stream")),
                };
            }
            // Done once the input is used and the output had room to spare.
            if rest.is_empty() && produced < step.len() {
                return Ok(input.len());
            }
            if out.len() >= enough {
                return Ok(input.len() - rest.len());
            }
            if read == 0 && produced == 0 {
                return Err(Close::protocol("invalid compressed data"));
            }
        }
    }
}

#[cfg(test)]
mod tests;
