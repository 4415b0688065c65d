//! The HTTP/1.x request-head parser, `parse_request_head`, and the checks it
//! shares with response heads (http1::head): bounds, CRLF only, framing.
//!
//! Input: a big-endian u16 that picks where to cut, then the stream's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox_egress::{
    http1::{parse_request_head, TargetForm, MAX_HEADERS, MAX_HEAD_BYTES},
    wire::{
        host::{dns_name, Host},
        Parse,
    },
};

fuzz_target!(|input: &[u8]| {
    let Some((&cut, stream)) = input.split_first_chunk::<2>() else {
        return;
    };
    let cut = usize::from(u16::from_be_bytes(cut)) % (stream.len() + 1);
    let whole = parse_request_head(stream);

    // The stream in two TCP segments: sniff() stops at the first answer, so
    // an answer on the first segment must be the answer on both.
    let (first_segment, second_segment) = stream.split_at(cut);
    let early = parse_request_head(first_segment);
    if early != Parse::NeedMore {
        assert_eq!(early, whole, "answer on the first {cut} bytes changed with more");
    } else if !second_segment.contains(&b'\n') && stream.len() < MAX_HEAD_BYTES {
        // sniff() skips re-parsing after a read without a line end.
        assert!(!matches!(whole, Parse::Done(_)), "a head completed without a line end in the last bytes");
    }

    // sniff() buffers no more than MAX_HEAD_BYTES, relying on an answer by then.
    if stream.len() >= MAX_HEAD_BYTES {
        assert_ne!(whole, Parse::NeedMore, "no answer after {} bytes", stream.len());
    }
    let Parse::Done(head) = whole else {
        return;
    };
    assert!(head.head_len <= stream.len().min(MAX_HEAD_BYTES), "head of {} bytes", head.head_len);
    assert!(head.headers.len() <= MAX_HEADERS, "{} headers", head.headers.len());
    let head_bytes = &stream[..head.head_len];
    // The bytes after the head are body: the head alone gives the same answer.
    assert_eq!(parse_request_head(head_bytes), Parse::Done(head.clone()), "answer depends on bytes after the head");
    assert!(head_bytes.ends_with(b"\r\n\r\n"), "head does not end in an empty line");
    assert!(
        !head_bytes.starts_with(b"\n") && head_bytes.windows(2).all(|pair| pair[1] != b'\n' || pair[0] == b'\r'),
        "LF without CR in an accepted head"
    );
    // What the upstream server reads as the request line is what was checked.
    let request_line = format!("{} {} HTTP/1.{}\r\n", head.method, head.target, head.version);
    assert!(head_bytes.starts_with(request_line.as_bytes()), "request line differs from {request_line:?}");
    assert_eq!(head.form == TargetForm::Authority, head.method == "CONNECT", "{:?} for {}", head.form, head.method);
    match &head.authority {
        Some(authority) => {
            if let Host::Name(name) = &authority.host {
                assert_eq!(
                    dns_name(name.as_bytes()).as_deref(),
                    Ok(name.as_str()),
                    "host is not a lower-cased DNS name"
                );
            }
        }
        None => assert_eq!(head.version, 0, "an HTTP/1.1 head without a destination"),
    }
    if head.form == TargetForm::Absolute {
        let origin_form = head.origin_form_target();
        assert!(origin_form.starts_with('/') || origin_form == "*", "origin-form target {origin_form:?}");
    }
});
