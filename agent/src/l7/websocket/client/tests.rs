use super::*;
use crate::l7::websocket::{
    frame::{INVALID_DATA, PING, PONG, TOO_BIG},
    testing::{client_frame, compressed_frame, frames, raw_frame, Deflater, Frame},
};

const CONTEXT_TAKEOVER: Deflate = Deflate { client_no_context_takeover: false };
const NO_CONTEXT_TAKEOVER: Deflate = Deflate { client_no_context_takeover: true };

/// What the client's bytes give, fed in pieces of `piece` bytes; the error
/// that ended it, if one did.
fn read_in_pieces(
    deflate: Option<&Deflate>,
    limits: &Limits,
    input: &[u8],
    piece: usize,
) -> (Vec<Step>, Option<Close>) {
    let mut frames = ClientFrames::new(deflate, limits);
    let mut steps = Vec::new();
    let mut buffered = Vec::new();
    for chunk in input.chunks(piece.max(1)) {
        buffered.extend_from_slice(chunk);
        loop {
            match frames.step(&buffered) {
                Ok(Progress { consumed, step }) => {
                    buffered.drain(..consumed);
                    match step {
                        Some(step) => steps.push(step),
                        None => break,
                    }
                }
                Err(close) => return (steps, Some(close)),
            }
        }
    }
    (steps, None)
}

fn read(deflate: Option<&Deflate>, input: &[u8]) -> Vec<Step> {
    let (steps, error) = read_in_pieces(deflate, &Limits::default(), input, input.len());
    assert_eq!(error, None);
    steps
}

fn refusal(deflate: Option<&Deflate>, limits: &Limits, input: &[u8]) -> Close {
    read_in_pieces(deflate, limits, input, input.len()).1.expect("refused")
}

/// The frames the origin gets from `steps`, and the text messages.
fn upstream(steps: &[Step]) -> Vec<Frame> {
    steps
        .iter()
        .flat_map(|step| match step {
            Step::Upstream(bytes) | Step::Close(bytes) => frames(bytes),
            Step::Text(_) => Vec::new(),
        })
        .collect()
}

fn text(message: &str) -> Step {
    Step::Text(message.to_owned())
}

#[test]
fn a_text_message_is_handed_over_whole_and_control_frames_pass_before_it() {
    let input = [
        client_frame(false, TEXT, b"hel"),
        client_frame(true, PING, b"are you there"),
        client_frame(false, CONTINUATION, b""),
        client_frame(true, PONG, b""),
        client_frame(true, CONTINUATION, "lo, wörld".as_bytes()),
        client_frame(true, TEXT, b""),
    ]
    .concat();
    for piece in [1, 2, 5, input.len()] {
        let (steps, error) = read_in_pieces(None, &Limits::default(), &input, piece);
        assert_eq!(error, None, "piece {piece}");
        assert_eq!(steps[2..], [text("hello, wörld"), text("")], "piece {piece}");
        let control = upstream(&steps);
        assert_eq!(control.iter().map(|frame| frame.opcode).collect::<Vec<_>>(), [PING, PONG]);
        assert_eq!(control[0].payload, b"are you there");
        assert!(control.iter().all(|frame| frame.masked && frame.fin && frame.rsv == 0));
    }
}

#[test]
fn binary_messages_go_on_frame_by_frame_unmasked_and_remasked() {
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let input = [
        client_frame(false, BINARY, b"\x00\x01"),
        client_frame(true, CONTINUATION, b"\x02"),
        client_frame(true, BINARY, &big),
    ]
    .concat();
    for piece in [3, 1000, input.len()] {
        let (steps, error) = read_in_pieces(None, &Limits::default(), &input, piece);
        assert_eq!(error, None);
        let sent = upstream(&steps);
        assert!(sent.iter().all(|frame| frame.masked && frame.rsv == 0));
        assert_eq!((sent[0].fin, sent[0].opcode, &sent[0].payload[..]), (false, BINARY, &b"\x00\x01"[..]));
        assert_eq!((sent[1].fin, sent[1].opcode, &sent[1].payload[..]), (true, CONTINUATION, &b"\x02"[..]));
        // The big frame goes on in pieces as it arrives: a message all the same.
        let rest = &sent[2..];
        assert_eq!(rest[0].opcode, BINARY);
        assert!(rest[1..].iter().all(|frame| frame.opcode == CONTINUATION));
        assert!(rest.iter().all(|frame| frame.payload.len() <= PIECE + piece));
        assert_eq!(rest.iter().map(|frame| frame.fin).filter(|&fin| fin).count(), 1);
        assert!(rest.last().unwrap().fin);
        assert_eq!(rest.iter().flat_map(|frame| frame.payload.clone()).collect::<Vec<_>>(), big);
    }
}

#[test]
fn framing_errors_close_with_1002() {
    let limits = Limits::default();
    let unmasked = [0x81, 0x02, b'h', b'i'];
    let text_start = client_frame(false, TEXT, b"a");
    for (input, reason) in [
        (unmasked.to_vec(), "unmasked client frame"),
        (raw_frame(0xA1, b"x"), "RSV2 or RSV3 set"),
        (raw_frame(0x91, b"x"), "RSV2 or RSV3 set"),
        (raw_frame(0xC1, b"x"), "RSV1 set without permessage-deflate"),
        (raw_frame(0xC9, b""), "RSV1 set on a control frame"),
        (raw_frame(0x83, b""), "reserved opcode"),
        (raw_frame(0x8F, b""), "reserved opcode"),
        (raw_frame(0x09, b""), "fragmented control frame"),
        (raw_frame(0x89, &[0; 126]), "control frame payload over 125 bytes"),
        (vec![0x82, 0xFE, 0x00, 0x05], "16-bit length not in its shortest form"),
        ([&[0x82, 0xFF][..], &[0, 0, 0, 0, 0, 0, 0x10, 0]].concat(), "64-bit length not in its shortest form"),
        ([&[0x82, 0xFF][..], &[0x80, 0, 0, 0, 0, 0, 0, 0]].concat(), "64-bit length with the most significant bit set"),
        (client_frame(true, CONTINUATION, b"x"), "continuation frame without a message"),
        ([&text_start[..], &client_frame(true, TEXT, b"b")].concat(), "a new data frame inside a fragmented message"),
        ([&text_start[..], &client_frame(true, BINARY, b"b")].concat(), "a new data frame inside a fragmented message"),
        (
            [client_frame(true, CLOSE, b""), client_frame(true, PING, b"")].concat(),
            "a frame after the client's close frame",
        ),
        (client_frame(true, CLOSE, &[0x03]), "close frame with a 1-byte payload"),
        (client_frame(true, CLOSE, &1005u16.to_be_bytes()), "close code 1005 may not be sent"),
        (client_frame(true, CLOSE, &2000u16.to_be_bytes()), "close code 2000 may not be sent"),
    ] {
        assert_eq!(refusal(None, &limits, &input), Close::protocol(reason), "{input:02x?}");
    }
    // With permessage-deflate, RSV1 belongs to a message's first frame only.
    let continuation_rsv1 = [compressed_frame(false, TEXT, b""), raw_frame(0xC0, b"")].concat();
    assert_eq!(
        refusal(Some(&CONTEXT_TAKEOVER), &limits, &continuation_rsv1),
        Close::protocol("RSV1 set on a continuation frame")
    );
}

#[test]
fn a_close_frame_is_checked_then_forwarded() {
    let payload = [&1000u16.to_be_bytes()[..], "bye ✓".as_bytes()].concat();
    let steps = read(None, &client_frame(true, CLOSE, &payload));
    let [Step::Close(bytes)] = &steps[..] else { panic!("{steps:?}") };
    assert_eq!(frames(bytes)[0].close(), (1000, "bye ✓"));
    assert!(matches!(&read(None, &client_frame(true, CLOSE, b""))[..], [Step::Close(_)]));
    let bad_reason = [&1000u16.to_be_bytes()[..], b"\xC3"].concat();
    let refused = refusal(None, &Limits::default(), &client_frame(true, CLOSE, &bad_reason));
    assert_eq!(refused.code, INVALID_DATA);
}

#[test]
fn fragments_beyond_the_limit_close_with_1002() {
    let limits = Limits { max_fragments: 4096, ..Limits::default() };
    let message = |fragments: usize| {
        let mut input = client_frame(false, TEXT, b"a");
        for _ in 2..fragments {
            input.extend(client_frame(false, CONTINUATION, b"a"));
        }
        input.extend(client_frame(true, CONTINUATION, b"a"));
        input
    };
    let (steps, error) = read_in_pieces(None, &limits, &message(4096), usize::MAX);
    assert_eq!((steps, error), (vec![text(&"a".repeat(4096))], None));
    assert_eq!(refusal(None, &limits, &message(4097)), Close::protocol("more than 4096 fragments in one message"));
}

#[test]
fn text_over_the_limit_closes_with_1009_before_its_payload_is_read() {
    let limits = Limits { max_text: 10, ..Limits::default() };
    let exactly = client_frame(true, TEXT, b"0123456789");
    assert_eq!(read_in_pieces(None, &limits, &exactly, 100), (vec![text("0123456789")], None));
    let over = client_frame(true, TEXT, b"0123456789a");
    // The header alone is enough to refuse.
    let (_, error) = read_in_pieces(None, &limits, &over[..6], 100);
    assert_eq!(error.map(|close| close.code), Some(TOO_BIG));
    let cumulative = [client_frame(false, TEXT, b"01234"), client_frame(true, CONTINUATION, b"567890")].concat();
    assert_eq!(refusal(None, &limits, &cumulative).code, TOO_BIG);
    let binary_limits = Limits { max_binary: 10, ..Limits::default() };
    let binary = [client_frame(false, BINARY, b"01234"), client_frame(true, CONTINUATION, b"567890")].concat();
    assert_eq!(refusal(None, &binary_limits, &binary), Close { code: TOO_BIG, reason: "message over 10 bytes".into() });
}

#[test]
fn text_that_is_not_utf8_closes_with_1007_even_split_across_fragments() {
    let check_mark = "✓".as_bytes();
    let split =
        [client_frame(false, TEXT, &check_mark[..1]), client_frame(true, CONTINUATION, &check_mark[1..])].concat();
    assert_eq!(read(None, &split), [text("✓")]);
    let invalid = [client_frame(false, TEXT, &check_mark[..2]), client_frame(true, CONTINUATION, b"x")].concat();
    assert_eq!(refusal(None, &Limits::default(), &invalid).code, INVALID_DATA);
    // Binary is not text: any bytes go.
    assert_eq!(upstream(&read(None, &client_frame(true, BINARY, b"\xFF")))[0].payload, b"\xFF");
}

#[test]
fn compressed_messages_share_one_context_unless_the_client_resets_it() {
    let message = "the same words again and again, the same words again and again".repeat(4);
    let mut deflater = Deflater::new();
    let first = deflater.compress(message.as_bytes());
    let second = deflater.compress(message.as_bytes());
    assert!(second.len() < first.len() / 2, "the second refers to the first");
    let binary = deflater.compress(b"\x00\x01\x02 binary in the same context");
    let third = deflater.compress(message.as_bytes());
    let input = [
        compressed_frame(true, TEXT, &first),
        compressed_frame(false, TEXT, &second[..3]),
        client_frame(true, PING, b""),
        client_frame(false, CONTINUATION, &second[3..5]),
        client_frame(true, CONTINUATION, &second[5..]),
        compressed_frame(true, BINARY, &binary),
        client_frame(true, TEXT, b"uncompressed in between"),
        compressed_frame(true, TEXT, &third),
    ]
    .concat();
    for piece in [1, 7, input.len()] {
        let (steps, error) = read_in_pieces(Some(&CONTEXT_TAKEOVER), &Limits::default(), &input, piece);
        assert_eq!(error, None, "piece {piece}");
        let texts: Vec<&Step> = steps.iter().filter(|step| matches!(step, Step::Text(_))).collect();
        assert_eq!(texts, [&text(&message), &text(&message), &text("uncompressed in between"), &text(&message)]);
        let sent = upstream(&steps);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!((sent[0].opcode, sent[1].opcode), (PING, BINARY));
        assert_eq!(sent[1].payload, b"\x00\x01\x02 binary in the same context", "inflated, sent uncompressed");
        assert!(sent.iter().all(|frame| frame.rsv == 0 && frame.fin));
    }
}

#[test]
fn without_context_takeover_each_message_inflates_alone() {
    let message = b"no context takeover, no context takeover";
    let mut deflater = Deflater::new();
    let mut input = Vec::new();
    for _ in 0..3 {
        input.extend(compressed_frame(true, TEXT, &deflater.compress(message)));
        deflater.reset();
    }
    let steps = read(Some(&NO_CONTEXT_TAKEOVER), &input);
    assert_eq!(steps, vec![text("no context takeover, no context takeover"); 3]);
    // The relay's inflater really starts afresh each message: a client that
    // keeps its context although it agreed not to refers to bytes it no
    // longer has (miniz_oxide reads them as zeros; what is inspected is
    // still exactly what the origin gets).
    let mut keeping = Deflater::new();
    let first = keeping.compress(message);
    let second = keeping.compress(message);
    let input = [compressed_frame(true, TEXT, &first), compressed_frame(true, TEXT, &second)].concat();
    let mut steps = read(Some(&NO_CONTEXT_TAKEOVER), &input);
    assert_eq!(steps.remove(0), text("no context takeover, no context takeover"));
    assert_ne!(steps, [text("no context takeover, no context takeover")]);
    let with_takeover = read(Some(&CONTEXT_TAKEOVER), &input);
    assert_eq!(with_takeover, vec![text("no context takeover, no context takeover"); 2]);
}

#[test]
fn a_message_ending_its_deflate_stream_is_read_and_the_next_starts_anew() {
    let mut deflater = Deflater::new();
    let input = [
        compressed_frame(true, TEXT, &deflater.compress_final(b"final block")),
        compressed_frame(true, TEXT, &deflater.compress(b"a new stream")),
    ]
    .concat();
    assert_eq!(read(Some(&CONTEXT_TAKEOVER), &input), [text("final block"), text("a new stream")]);
}

#[test]
fn compressed_data_that_is_not_deflate_or_inflates_too_far_is_refused() {
    let limits = Limits { max_text: 1000, max_binary: 2000, ..Limits::default() };
    let garbage = compressed_frame(true, TEXT, b"\xFF\xFF\xFF\xFF not deflate");
    assert_eq!(refusal(Some(&CONTEXT_TAKEOVER), &limits, &garbage), Close::protocol("invalid compressed data"));
    let mut deflater = Deflater::new();
    let bomb = deflater.compress(&[b'a'; 1001]);
    assert!(bomb.len() < 30);
    let refused = refusal(Some(&CONTEXT_TAKEOVER), &limits, &compressed_frame(true, TEXT, &bomb));
    assert_eq!(refused, Close { code: TOO_BIG, reason: "message over 1000 bytes".into() });
    let binary_bomb = deflater.compress(&[0; 2001]);
    let refused = refusal(Some(&CONTEXT_TAKEOVER), &limits, &compressed_frame(true, BINARY, &binary_bomb));
    assert_eq!(refused.code, TOO_BIG);
    let fits = Deflater::new().compress(&[b'a'; 1000]);
    assert_eq!(read_in_pieces(Some(&CONTEXT_TAKEOVER), &limits, &compressed_frame(true, TEXT, &fits), 3).1, None);
    // A compressed message is bounded on the wire too: empty blocks inflate to nothing.
    let empty_blocks = [0x00, 0x00, 0x00, 0xFF, 0xFF].repeat(500);
    let refused = refusal(Some(&CONTEXT_TAKEOVER), &limits, &compressed_frame(true, TEXT, &empty_blocks));
    assert_eq!(refused.code, TOO_BIG);
}

#[test]
fn a_big_compressed_binary_message_goes_on_in_bounded_pieces() {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i / 1000) as u8).collect();
    let compressed = Deflater::new().compress(&data);
    let input = compressed_frame(true, BINARY, &compressed);
    let sent = upstream(&read(Some(&CONTEXT_TAKEOVER), &input));
    assert!(sent.len() > 2);
    assert!(sent.iter().all(|frame| frame.payload.len() <= 2 * PIECE && frame.rsv == 0), "pieces are bounded");
    assert_eq!(sent.iter().flat_map(|frame| frame.payload.clone()).collect::<Vec<_>>(), data);
}

/// Found by the fuzz target: output over the limit, then invalid data in
/// the same frame was 1002 read at once and 1009 read in pieces.
#[test]
fn compressed_text_over_the_limit_then_invalid_is_1009_however_it_arrives() {
    let limits = Limits { max_text: 64, ..Limits::default() };
    let payload = [Deflater::new().compress(&[b'a'; 100]), vec![0xFF; 8]].concat();
    let input = compressed_frame(true, TEXT, &payload);
    for piece in [2, input.len()] {
        let (_, error) = read_in_pieces(Some(&NO_CONTEXT_TAKEOVER), &limits, &input, piece);
        assert_eq!(error, Some(Close { code: TOO_BIG, reason: "message over 64 bytes".into() }), "piece {piece}");
    }
}
