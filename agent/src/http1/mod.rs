//! HTTP/1.1 message framing (RFC 9112) for a proxy that relays messages byte
//! for byte: where each message ends, which fields of a head a proxy must
//! drop or add, and the response side of one request/response exchange.
//!
//! Heads are parsed strictly and re-serialised; bodies are forwarded exactly
//! as received, chunk framing included, but parsed on the way so the proxy
//! knows where each message ends. Every rule that two parsers could apply
//! differently is refused: a disagreement over where a message ends is how a
//! second request gets smuggled past the policy.
//!
//! Request heads come from [`parse_request_head`], which
//! already refuses ambiguous request framing with the rules in [`head`].
//! One request and its responses are relayed in full duplex ([`duplex`]);
//! [`expect`] is `Expect: 100-continue` for bodies the agent reads itself.

pub mod body;
pub mod duplex;
pub mod expect;
pub mod forward;
pub mod head;
mod linger;
mod reader;
mod request;
mod response;
mod source;
#[cfg(test)]
mod testing;

pub use self::{
    body::{copy_body, BodyLimits},
    duplex::ExchangeLimits,
    forward::{forward_request_head, ResponseLimits, ResponseOutcome},
    head::{MAX_HEADERS, MAX_HEAD_BYTES},
    linger::linger,
    reader::{HeadReader, Split},
    request::{parse_request_head, RequestHead, TargetForm},
    response::ResponseHead,
    source::{BodyError, BodySource, Piece},
};

/// Header fields as the parsers keep them: names as spelled, values trimmed.
pub type Fields = [(String, Vec<u8>)];

/// How the end of a message body is found (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
    /// The body ends when the sender closes the connection (responses only).
    UntilClose,
}

/// RFC 9112 §6.3: chunked Transfer-Encoding, else Content-Length, else no
/// body (rule 6: a request never reads until close).
pub fn request_framing(head: &RequestHead) -> BodyFraming {
    framing_from_fields(&head.headers).unwrap_or(BodyFraming::Empty)
}

/// Whether a body follows the request head: a length of 0 is none.
pub fn has_request_body(head: &RequestHead) -> bool {
    !matches!(request_framing(head), BodyFraming::Empty | BodyFraming::Length(0))
}

/// RFC 9112 §6.3 rules 1 to 7 for a response to `request_method`. A 2xx
/// answer to CONNECT (rule 2: the connection becomes a tunnel) is left to the
/// caller, which does not relay CONNECT through this module.
pub fn response_framing(request_method: &str, response: &ResponseHead) -> BodyFraming {
    let has_no_content = matches!(response.status, 100..=199 | 204 | 304);
    if request_method == "HEAD" || has_no_content {
        return BodyFraming::Empty;
    }
    framing_from_fields(&response.headers).unwrap_or(BodyFraming::UntilClose)
}

/// The framing the fields declare, `None` if they declare none. Ambiguous
/// combinations were refused by [`head::check_framing`].
fn framing_from_fields(fields: &Fields) -> Option<BodyFraming> {
    if let Some(last_coding) = list_elements(fields, "transfer-encoding").last() {
        // Rule 4: a final coding other than chunked can only end at close.
        return Some(if last_coding.eq_ignore_ascii_case(b"chunked") {
            BodyFraming::Chunked
        } else {
            BodyFraming::UntilClose
        });
    }
    let content_length = field_values(fields, "content-length").next()?;
    // Unparseable only for a head that skipped the parsers' checks; reading
    // to close never invents a message boundary.
    Some(parse_content_length(content_length).map_or(BodyFraming::UntilClose, BodyFraming::Length))
}

/// Digits only, at most 18 of them: what every parser reads the same way
/// (a sign, spaces or a list are read differently by different servers, and
/// 19 digits overflow a signed 64-bit length).
fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 {
        return None;
    }
    value.iter().try_fold(0u64, |length, &digit| digit.is_ascii_digit().then(|| length * 10 + u64::from(digit - b'0')))
}

/// The values of every field called `name` (case-insensitive), in order.
pub fn field_values<'f>(fields: &'f Fields, name: &'f str) -> impl Iterator<Item = &'f [u8]> + 'f {
    fields.iter().filter(move |(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_slice())
}

/// The comma-separated elements of every field called `name`, trimmed, empty
/// ones included (RFC 9110 §5.6.1): lines of one field form a single list.
pub fn list_elements<'f>(fields: &'f Fields, name: &'f str) -> impl Iterator<Item = &'f [u8]> + 'f {
    field_values(fields, name).flat_map(|value| value.split(|&b| b == b',')).map(<[u8]>::trim_ascii)
}

/// Whether the `name` list has `element`, case-insensitively: connection
/// options and transfer codings are case-insensitive tokens.
fn has_element(fields: &Fields, name: &str, element: &str) -> bool {
    list_elements(fields, name).any(|candidate| candidate.eq_ignore_ascii_case(element.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::{testing::fields, *};
    use crate::wire::Parse;

    fn request(raw: &str) -> RequestHead {
        match parse_request_head(raw.as_bytes()) {
            Parse::Done(head) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHead {
        ResponseHead { version: 1, status, reason: String::new(), headers: fields(headers), head_len: 0 }
    }

    #[test]
    fn request_framing_is_chunked_then_length_then_empty() {
        for (headers, expected) in [
            ("Transfer-Encoding: chunked\r\n", BodyFraming::Chunked),
            ("Transfer-Encoding: gzip, Chunked\r\n", BodyFraming::Chunked),
            ("Content-Length: 42\r\n", BodyFraming::Length(42)),
            ("Content-Length: 0\r\n", BodyFraming::Length(0)),
            ("Content-Length: 000000000000000007\r\n", BodyFraming::Length(7)),
            ("", BodyFraming::Empty),
        ] {
            let head = request(&format!("POST / HTTP/1.1\r\nHost: a.example\r\n{headers}\r\n"));
            assert_eq!(request_framing(&head), expected, "{headers:?}");
        }
    }

    #[test]
    fn response_framing_table() {
        let chunked = [("Transfer-Encoding", "chunked")];
        let length = [("Content-Length", "5")];
        for (method, status, headers, expected) in [
            ("HEAD", 200, &length[..], BodyFraming::Empty),
            ("HEAD", 200, &chunked[..], BodyFraming::Empty),
            ("GET", 100, &[][..], BodyFraming::Empty),
            ("GET", 103, &length[..], BodyFraming::Empty),
            ("GET", 204, &[][..], BodyFraming::Empty),
            ("GET", 304, &length[..], BodyFraming::Empty),
            ("GET", 200, &length[..], BodyFraming::Length(5)),
            ("POST", 404, &length[..], BodyFraming::Length(5)),
            ("GET", 200, &chunked[..], BodyFraming::Chunked),
            ("GET", 200, &[("Transfer-Encoding", "gzip")][..], BodyFraming::UntilClose),
            ("GET", 200, &[][..], BodyFraming::UntilClose),
            ("GET", 205, &[][..], BodyFraming::UntilClose),
        ] {
            assert_eq!(response_framing(method, &response(status, headers)), expected, "{method} {status} {headers:?}");
        }
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"999999999999999999"), Some(999_999_999_999_999_999));
        for bad in [&b""[..], b"1234567890123456789", b"+5", b"-1", b"5 ", b"0x10", b"5,5"] {
            assert_eq!(parse_content_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn list_elements_span_lines_and_ignore_case() {
        let headers = fields(&[("Connection", "keep-alive, X-A"), ("connection", " Upgrade ,,"), ("Other", "close")]);
        let elements: Vec<&[u8]> = list_elements(&headers, "CONNECTION").collect();
        assert_eq!(elements, [&b"keep-alive"[..], b"X-A", b"Upgrade", b"", b""]);
        assert!(has_element(&headers, "connection", "upgrade"));
        assert!(!has_element(&headers, "connection", "close"));
    }
}
