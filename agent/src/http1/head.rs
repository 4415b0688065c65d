//! The rules request and response heads share (RFC 9112): one bound on size
//! and header count, CRLF line endings only, and one unambiguous body
//! framing. The request head is parsed in [`super::request`], the
//! response head in [`super::response`]; both go through here so the two
//! cannot drift apart.

use std::fmt;

use httparse::{Header, Status};

use super::{field_values, list_elements, parse_content_length, Fields};

pub const MAX_HEADERS: usize = 100;
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Which head is parsed: named in error texts, and a request's body framing
/// is stricter than a response's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Response,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Request => "request",
            Kind::Response => "response",
        })
    }
}

/// Runs `parser` (httparse's request or response parser) over `buf` with
/// the checks every head gets: the head's length once complete, `None` while
/// more bytes are needed.
pub fn parse<'b>(
    buf: &'b [u8],
    kind: Kind,
    parser: impl FnOnce(&'b [u8]) -> httparse::Result<usize>,
) -> Result<Option<usize>, String> {
    // httparse skips empty lines before the start line; refusing them keeps
    // the number of re-parses of a trickled head bounded by the line count.
    if buf.first().is_some_and(|&b| b == b'\r' || b == b'\n') {
        let start_line = match kind {
            Kind::Request => "request line",
            Kind::Response => "status line",
        };
        return Err(format!("empty line before the {start_line}"));
    }
    let too_large = || format!("{kind} head exceeds {MAX_HEAD_BYTES} bytes");
    let head_len = match parser(buf) {
        Ok(Status::Complete(len)) if len > MAX_HEAD_BYTES => return Err(too_large()),
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(too_large()),
        Ok(Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(format!("more than {MAX_HEADERS} headers")),
        Err(httparse::Error::Version) => return Err(format!("not an HTTP/1.0 or HTTP/1.1 {kind}")),
        Err(error) => return Err(format!("malformed {kind} head: {error}")),
    };
    // httparse takes a lone LF as a line end; a recipient that does not would
    // see other headers than we checked.
    let head = buf.get(..head_len).unwrap_or_default();
    if head.windows(2).any(|pair| matches!(pair, [before, b'\n'] if *before != b'\r')) {
        return Err(format!("bare LF line ending in {kind} head"));
    }
    Ok(Some(head_len))
}

/// The parsed headers as the heads keep them: in order, names as spelled.
pub fn fields(headers: &[Header<'_>]) -> Vec<(String, Vec<u8>)> {
    headers.iter().map(|header| (header.name.to_string(), header.value.to_vec())).collect()
}

/// The value of a field that must not be repeated, if present.
pub fn single_value<'f>(fields: &'f Fields, name: &'f str) -> Result<Option<&'f [u8]>, String> {
    let mut values = field_values(fields, name);
    let first = values.next();
    if values.next().is_some() {
        return Err(format!("multiple {name} headers"));
    }
    Ok(first)
}

/// Refuses every body framing the recipient could read differently from us
/// (RFC 9112 §6).
pub fn check_framing(fields: &Fields, version: u8, kind: Kind) -> Result<(), String> {
    let content_length = single_value(fields, "Content-Length")?;
    if let Some(value) = content_length {
        if parse_content_length(value).is_none() {
            return Err(format!("invalid Content-Length {:?}", String::from_utf8_lossy(value)));
        }
    }
    let codings: Vec<&[u8]> = list_elements(fields, "transfer-encoding").collect();
    let Some((last, earlier)) = codings.split_last() else {
        return Ok(());
    };
    // §6.3 rule 3: a possible request-smuggling or response-splitting attempt.
    if content_length.is_some() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    // §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    if version == 0 {
        return Err(format!("Transfer-Encoding in an HTTP/1.0 {kind}"));
    }
    if codings.iter().any(|coding| coding.is_empty()) {
        return Err("empty element in Transfer-Encoding".into());
    }
    // §6.1: chunked is applied once, last; anything else is ambiguous.
    if earlier.iter().any(|coding| coding.eq_ignore_ascii_case(b"chunked")) {
        return Err(format!("chunked before the last Transfer-Encoding (last is {:?})", String::from_utf8_lossy(last)));
    }
    // §6.3 rule 4: a response whose last coding is not chunked ends at close,
    // but a request cannot, so its length is unknown.
    if kind == Kind::Request && !last.eq_ignore_ascii_case(b"chunked") {
        return Err(format!("Transfer-Encoding does not end in chunked (ends in {:?})", String::from_utf8_lossy(last)));
    }
    Ok(())
}
