//! The first-byte classifier, `classify_first_byte`, and `sniff`, which reads
//! a stream and hands it to the parser the first byte picked, as TCP segments
//! arrive.
//!
//! Input: one byte for the segment length (1 to 256), then the stream's bytes.

#![no_main]

use std::{
    io,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use sandbox_egress::{
    http1::{parse_request_head, MAX_HEAD_BYTES},
    sniff::{
        classify_first_byte, sniff,
        tls::{parse_client_hello, MAX_CLIENT_HELLO_WIRE},
        FirstByte, Limits, StreamKind,
    },
    wire::Parse,
};
use tokio::{
    io::{AsyncRead, ReadBuf},
    runtime::{Builder, Runtime},
};

/// Built once: a runtime per input would cost more than the sniffing.
static RUNTIME: LazyLock<Runtime> =
    LazyLock::new(|| Builder::new_current_thread().enable_time().build().expect("tokio runtime"));

/// Never reached: the stream below never makes sniff() wait.
const LIMITS: Limits = Limits { first_byte_timeout: Duration::from_secs(60), head_timeout: Duration::from_secs(60) };

fuzz_target!(|input: &[u8]| {
    let Some((&segment_len, stream)) = input.split_first() else {
        return;
    };
    let first_byte = stream.first().map(|&b| {
        // The rule README.md documents, spelled independently.
        let documented = match b {
            0x14..=0x18 => FirstByte::Tls,
            b'A'..=b'Z' | b'a'..=b'z' => FirstByte::Http,
            _ => FirstByte::Other,
        };
        assert_eq!(classify_first_byte(b), documented, "first byte {b:#04x}");
        documented
    });

    let segment_len = usize::from(segment_len) + 1;
    let mut segments = Segments { rest: stream, segment_len };
    let sniffed = RUNTIME.block_on(sniff(&mut segments, &LIMITS));
    let buffered = sniffed.buffered.as_slice();
    assert!(stream.starts_with(buffered), "buffered bytes are not the stream's first {}", buffered.len());
    let reached_end = buffered.len() == stream.len();

    match (first_byte, sniffed.kind) {
        (None, StreamKind::Closed) => {}
        (Some(FirstByte::Other), StreamKind::Opaque) => {
            assert_eq!(buffered.len(), segment_len.min(stream.len()), "read past the first segment");
        }
        (Some(FirstByte::Http), StreamKind::Opaque) => {
            assert_eq!(buffered.len(), segment_len.min(stream.len()), "read past the first segment");
            assert!(!could_be_request_line(buffered), "a possible request line start sniffed as opaque");
        }
        (Some(FirstByte::Tls), StreamKind::Tls(hello)) => {
            assert!(buffered.len() <= MAX_CLIENT_HELLO_WIRE, "buffered {} bytes", buffered.len());
            assert_eq!(parse_client_hello(buffered), Parse::Done(hello));
        }
        (Some(FirstByte::Tls), StreamKind::Invalid { protocol: "tls", reason }) => {
            assert!(buffered.len() <= MAX_CLIENT_HELLO_WIRE, "buffered {} bytes", buffered.len());
            check_refusal(parse_client_hello(buffered), &reason, reached_end);
        }
        (Some(FirstByte::Http), StreamKind::Http(head)) => {
            let first_segment = &stream[..segment_len.min(stream.len())];
            assert!(could_be_request_line(first_segment), "HTTP whose first segment the README's rule calls opaque");
            assert!(buffered.len() <= MAX_HEAD_BYTES, "buffered {} bytes", buffered.len());
            assert_eq!(parse_request_head(buffered), Parse::Done(head));
        }
        (Some(FirstByte::Http), StreamKind::Invalid { protocol: "http", reason }) => {
            let first_segment = &stream[..segment_len.min(stream.len())];
            assert!(could_be_request_line(first_segment), "refused as HTTP what the README's rule calls opaque");
            assert!(buffered.len() <= MAX_HEAD_BYTES, "buffered {} bytes", buffered.len());
            check_refusal(parse_request_head(buffered), &reason, reached_end);
        }
        (first_byte, kind) => panic!("first byte {first_byte:?} sniffed as {kind:?}"),
    }
});

/// The README's rule, spelled independently: a method of A-Z and `-` (1 to
/// 31 bytes), a space, then `/`, `*`, the start of `http://` or `https://`,
/// or anything after `CONNECT`.
fn could_be_request_line(bytes: &[u8]) -> bool {
    let (method, rest) = match bytes.iter().position(|&b| b == b' ') {
        Some(space) => (&bytes[..space], Some(&bytes[space + 1..])),
        None => (bytes, None),
    };
    let method_ok = (1..=31).contains(&method.len()) && method.iter().all(|b| matches!(b, b'A'..=b'Z' | b'-'));
    let target_ok = match rest {
        None => true,
        Some(_) if method == b"CONNECT" => true,
        Some(target) => {
            let start: Vec<u8> = target.iter().copied().take(8).collect();
            let agrees = |scheme: &[u8]| scheme.starts_with(&start) || start.starts_with(scheme);
            start.is_empty() || start[0] == b'/' || start[0] == b'*' || agrees(b"http://") || agrees(b"https://")
        }
    };
    method_ok && target_ok
}

/// sniff() refused what it buffered with `reason`: the parser must refuse it
/// for the same reason, or need bytes the stream did not have.
fn check_refusal<T: std::fmt::Debug>(parsed: Parse<T>, reason: &str, reached_end: bool) {
    match parsed {
        Parse::Invalid(parser_reason) => assert_eq!(parser_reason, reason),
        Parse::NeedMore => assert!(reached_end, "refused ({reason}) before the stream ended"),
        Parse::Done(parsed) => panic!("refused ({reason}) what the parser accepts: {parsed:?}"),
    }
}

/// The stream in segments of `segment_len` bytes, one per read, then EOF.
struct Segments<'a> {
    rest: &'a [u8],
    segment_len: usize,
}

impl AsyncRead for Segments<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let len = self.segment_len.min(self.rest.len()).min(buf.remaining());
        let (segment, rest) = self.rest.split_at(len);
        buf.put_slice(segment);
        self.rest = rest;
        Poll::Ready(Ok(()))
    }
}
