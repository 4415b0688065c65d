//! HTTP/1.x response head (RFC 9112 §4) via httparse, with the checks of
//! [`super::head`] that request heads get too: the client parses the same
//! bytes after us.

use httparse::{Response, EMPTY_HEADER};

use super::head::MAX_HEADERS;
use super::head::{self, Kind};
use crate::wire::Parse;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub status: u16,
    /// Empty when absent, or when it held obs-text (httparse only returns
    /// ASCII reasons; the phrase carries no meaning, RFC 9112 §4).
    pub reason: String,
    /// In the order received, names as spelled, values without surrounding whitespace.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head, blank line included: the body starts here.
    pub head_len: usize,
}

/// Parses the response head at the start of `buf`, which holds the stream's
/// bytes so far; bytes after the head are left alone.
pub fn parse_response_head(buf: &[u8]) -> Parse<ResponseHead> {
    match parse_head(buf) {
        Ok(Some(head)) => Parse::Done(head),
        Ok(None) => Parse::NeedMore,
        Err(reason) => Parse::Invalid(reason),
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut headers = [EMPTY_HEADER; MAX_HEADERS];
    let mut response = Response::new(&mut headers);
    let Some(head_len) = head::parse(buf, Kind::Response, |buf| response.parse(buf))? else {
        return Ok(None);
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err("incomplete status line".into());
    };
    // Three digits outside the classes of RFC 9110 §15 have no defined
    // framing (is 099 informational?).
    if !(100..=599).contains(&status) {
        return Err(format!("status code {status:03} outside 100-599"));
    }
    let headers = head::fields(response.headers);
    head::check_framing(&headers, version, Kind::Response)?;
    Ok(Some(ResponseHead {
        version,
        status,
        reason: response.reason.unwrap_or_default().to_string(),
        headers,
        head_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::{super::testing::fields, *};
    use crate::http1::MAX_HEAD_BYTES;

    fn done(raw: &[u8]) -> ResponseHead {
        match parse_response_head(raw) {
            Parse::Done(head) => head,
            other => panic!("{:?}: expected Done, got {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    fn assert_invalid(raw: &[u8], reason_part: &str) {
        match parse_response_head(raw) {
            Parse::Invalid(reason) => assert!(reason.contains(reason_part), "{reason:?} lacks {reason_part:?}"),
            other => panic!("{:?}: expected Invalid({reason_part:?}), got {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn valid_head_is_parsed_and_the_body_left_alone() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            done(raw),
            ResponseHead {
                version: 1,
                status: 200,
                reason: "OK".into(),
                headers: fields(&[("Content-Type", "text/plain"), ("Content-Length", "5")]),
                head_len: raw.len() - b"hello".len(),
            }
        );
        let head = done(b"HTTP/1.0 404 Not  Found \r\n\r\n");
        assert_eq!((head.version, head.status, head.reason.as_str()), (0, 404, "Not  Found "));
        assert_eq!(done(b"HTTP/1.1 204\r\n\r\n").reason, "");
        assert_eq!(done(b"HTTP/1.1 200 caf\xc3\xa9\r\n\r\n").reason, "", "obs-text reason is dropped");
    }

    #[test]
    fn header_count_is_bounded() {
        let with_headers = |count: usize| {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for index in 0..count {
                raw.extend(format!("X-{index}: v\r\n").as_bytes());
            }
            raw.extend(b"\r\n");
            raw
        };
        assert_eq!(done(&with_headers(MAX_HEADERS)).headers.len(), MAX_HEADERS);
        assert_invalid(&with_headers(MAX_HEADERS + 1), "more than 100 headers");
    }

    #[test]
    fn head_size_is_bounded() {
        let head_of = |len: usize| {
            let mut raw = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
            raw.resize(len - 4, b'a');
            raw.extend(b"\r\n\r\n");
            raw
        };
        assert_eq!(done(&head_of(MAX_HEAD_BYTES)).head_len, MAX_HEAD_BYTES);
        let over = head_of(MAX_HEAD_BYTES + 1);
        assert_invalid(&over, "response head exceeds 32768 bytes");
        assert_eq!(parse_response_head(&over[..MAX_HEAD_BYTES - 1]), Parse::NeedMore);
        assert_invalid(&over[..MAX_HEAD_BYTES], "response head exceeds 32768 bytes");
    }

    #[test]
    fn ambiguous_framing_is_invalid() {
        let with = |headers: &str| format!("HTTP/1.1 200 OK\r\n{headers}\r\n").into_bytes();
        for (headers, reason) in [
            ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "both Content-Length and Transfer-Encoding"),
            ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "both Content-Length and Transfer-Encoding"),
            ("Content-Length: 5\r\nContent-Length: 5\r\n", "multiple Content-Length headers"),
            ("Content-Length: 5\r\ncontent-length: 6\r\n", "multiple Content-Length headers"),
            ("Content-Length: 5, 5\r\n", "invalid Content-Length"),
            ("Content-Length: +5\r\n", "invalid Content-Length"),
            ("Content-Length: 1234567890123456789\r\n", "invalid Content-Length"),
            ("Transfer-Encoding: chunked, gzip\r\n", "chunked before the last"),
            ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "chunked before the last"),
            ("Transfer-Encoding: gzip,,chunked\r\n", "empty element"),
        ] {
            assert_invalid(&with(headers), reason);
        }
        assert_invalid(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding in an HTTP/1.0");
        for headers in ["Transfer-Encoding: gzip\r\n", "Transfer-Encoding: gzip\r\nTransfer-Encoding: CHUNKED\r\n"] {
            assert!(matches!(parse_response_head(&with(headers)), Parse::Done(_)), "{headers:?}");
        }
    }

    #[test]
    fn line_breaks_must_be_crlf() {
        assert_invalid(b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", "bare LF");
        assert_invalid(b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 9\r\n\r\n", "bare LF");
        assert_invalid(b"HTTP/1.1 200 OK\n\n", "bare LF");
        assert_invalid(b"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 9\r\n\r\n", "malformed response head");
        assert_invalid(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "malformed response head");
        assert_invalid(b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n", "malformed response head");
        assert_invalid(b"\r\nHTTP/1.1 200 OK\r\n\r\n", "empty line before the status line");
    }

    #[test]
    fn status_line_must_be_http_1_with_a_known_class() {
        assert_invalid(b"HTTP/2.0 200 OK\r\n\r\n", "not an HTTP/1.0 or HTTP/1.1 response");
        assert_invalid(b"ICY 200 OK\r\n\r\n", "not an HTTP/1.0 or HTTP/1.1 response");
        assert_invalid(b"HTTP/1.1 099 Odd\r\n\r\n", "status code 099 outside 100-599");
        assert_invalid(b"HTTP/1.1 600 Odd\r\n\r\n", "status code 600 outside 100-599");
        assert_invalid(b"HTTP/1.1 20 OK\r\n\r\n", "malformed response head");
        assert_eq!(done(b"HTTP/1.1 599 Edge\r\n\r\n").status, 599);
    }

    #[test]
    fn every_prefix_needs_more_and_the_whole_is_done() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello";
        let whole = done(raw);
        for len in 0..whole.head_len {
            assert_eq!(parse_response_head(&raw[..len]), Parse::NeedMore, "prefix of {len} bytes");
        }
        for len in whole.head_len..=raw.len() {
            assert_eq!(parse_response_head(&raw[..len]), Parse::Done(whole.clone()), "prefix of {len} bytes");
        }
    }
}
