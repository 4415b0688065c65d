//! HTTP/1.x request head (RFC 9112) via httparse, plus what a policy proxy
//! needs on top: one unambiguous destination and one unambiguous body
//! framing, since the upstream server parses the same bytes after us. The
//! checks a response head gets too are in [`super::head`].

use httparse::{Request, EMPTY_HEADER};

use super::head::{self, Kind};
use crate::wire::{host::Authority, Parse};

const HTTP_SCHEME: &str = "http://";
const HTTP_DEFAULT_PORT: u16 = 80;

/// The request-target forms of RFC 9112 §3.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`, destination in Host.
    Origin,
    /// `http://host:port/path`, sent to explicit proxies.
    Absolute,
    /// `host:port`, CONNECT only.
    Authority,
    /// `*`, OPTIONS only, destination in Host.
    Asterisk,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// In the order sent, names as spelled, values without surrounding whitespace.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head, blank line included: the body starts here.
    pub head_len: usize,
    /// Where the request goes: the CONNECT target, the absolute-form URI's
    /// authority (port 80 if none) or else Host. `None` only for an HTTP/1.0
    /// request without Host.
    pub authority: Option<Authority>,
    pub form: TargetForm,
}

impl RequestHead {
    /// The target in origin-form, for forwarding an absolute-form request to
    /// the origin server: `http://h/p?q#f` becomes `/p?q`, `http://h` becomes
    /// `/`, or `*` for OPTIONS (RFC 9112 §3.2.4). Other forms are returned as
    /// they are.
    pub fn origin_form_target(&self) -> String {
        if self.form != TargetForm::Absolute {
            return self.target.clone();
        }
        let after_scheme = self.target.get(HTTP_SCHEME.len()..).unwrap_or_default();
        let path_and_query = after_scheme
            .find(['/', '?', '#'])
            .and_then(|at| after_scheme.get(at..))
            .unwrap_or_default()
            .split('#')
            .next()
            .unwrap_or_default();
        if path_and_query.is_empty() && self.method == "OPTIONS" {
            "*".to_string()
        } else if path_and_query.starts_with('/') {
            path_and_query.to_string()
        } else {
            format!("/{path_and_query}")
        }
    }
}

/// Parses the request head at the start of `buf`, which holds the stream's
/// bytes so far; body bytes after the head are left alone.
pub fn parse_request_head(buf: &[u8]) -> Parse<RequestHead> {
    match parse_head(buf) {
        Ok(Some(head)) => Parse::Done(head),
        Ok(None) => Parse::NeedMore,
        Err(reason) => Parse::Invalid(reason),
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, String> {
    let mut headers = [EMPTY_HEADER; head::MAX_HEADERS];
    let mut request = Request::new(&mut headers);
    let Some(head_len) = head::parse(buf, Kind::Request, |buf| request.parse(buf))? else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(version)) = (request.method, request.path, request.version) else {
        return Err("incomplete request line".into());
    };
    let headers = head::fields(request.headers);

    let host = head::single_value(&headers, "Host")?
        .map(|value| Authority::parse(value).map_err(|reason| format!("invalid Host header: {reason}")))
        .transpose()?;
    let (form, target_authority) = classify_target(method, target)?;
    let authority = match target_authority {
        Some(target_authority) => {
            if let Some(host) = &host {
                check_host_matches(host, &target_authority)?;
            }
            Some(target_authority)
        }
        None if host.is_none() && version == 1 => return Err("HTTP/1.1 request without Host header".into()),
        None => host,
    };
    head::check_framing(&headers, version, Kind::Request)?;

    Ok(Some(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        version,
        headers,
        head_len,
        authority,
        form,
    }))
}

/// The form of the request target and the authority it names, if any.
fn classify_target(method: &str, target: &str) -> Result<(TargetForm, Option<Authority>), String> {
    if method == "CONNECT" {
        let authority = Authority::parse(target.as_bytes())
            .map_err(|reason| format!("CONNECT target {target:?} is not host:port: {reason}"))?;
        if authority.port.is_none() {
            return Err(format!("CONNECT target {target:?} has no port"));
        }
        return Ok((TargetForm::Authority, Some(authority)));
    }
    if target.starts_with('/') {
        return Ok((TargetForm::Origin, None));
    }
    if target == "*" {
        if method != "OPTIONS" {
            return Err(format!("asterisk-form target with method {method}"));
        }
        return Ok((TargetForm::Asterisk, None));
    }
    let scheme_len = HTTP_SCHEME.len();
    if target.get(..scheme_len).is_some_and(|scheme| scheme.eq_ignore_ascii_case(HTTP_SCHEME)) {
        let after_scheme = target.get(scheme_len..).unwrap_or_default();
        let authority_text = after_scheme.split(['/', '?', '#']).next().unwrap_or_default();
        let mut authority = Authority::parse(authority_text.as_bytes())
            .map_err(|reason| format!("absolute-form target has a bad authority: {reason}"))?;
        authority.port.get_or_insert(HTTP_DEFAULT_PORT);
        return Ok((TargetForm::Absolute, Some(authority)));
    }
    if target.contains("://") {
        return Err(format!("unsupported scheme in absolute-form target {target:?} (only http)"));
    }
    Err(format!("request target {target:?} is in no form allowed for {method}"))
}

/// Host names the origin server may route by: it must agree with the target
/// the policy saw. A Host without port matches any target port.
fn check_host_matches(host: &Authority, target: &Authority) -> Result<(), String> {
    if host.host == target.host && host.port.is_none_or(|port| Some(port) == target.port) {
        Ok(())
    } else {
        Err(format!("Host header {host} does not match request target {target}"))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::{
        super::head::{MAX_HEADERS, MAX_HEAD_BYTES},
        *,
    };
    use crate::wire::host::Host;

    fn done(raw: &[u8]) -> RequestHead {
        match parse_request_head(raw) {
            Parse::Done(head) => head,
            other => panic!("{:?}: expected Done, got {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    fn assert_invalid(raw: &[u8], reason_part: &str) {
        match parse_request_head(raw) {
            Parse::Invalid(reason) => assert!(reason.contains(reason_part), "{reason:?} lacks {reason_part:?}"),
            other => panic!("{:?}: expected Invalid({reason_part:?}), got {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    fn authority(host: &str, port: Option<u16>) -> Option<Authority> {
        Some(Authority { host: Host::Name(host.into()), port })
    }

    #[test]
    fn origin_form_takes_the_host_header() {
        let raw = b"GET /a?b=c HTTP/1.1\r\nHost: API.Example.com\r\nAccept: */*\r\n\r\nbody";
        let head = done(raw);
        assert_eq!((head.method.as_str(), head.target.as_str(), head.version), ("GET", "/a?b=c", 1));
        assert_eq!(head.form, TargetForm::Origin);
        assert_eq!(head.authority, authority("api.example.com", None));
        assert_eq!(head.head_len, raw.len() - b"body".len());
        assert_eq!(head.headers, [("Host".into(), b"API.Example.com".to_vec()), ("Accept".into(), b"*/*".to_vec())]);
        assert_eq!(head.origin_form_target(), "/a?b=c");
    }

    #[test]
    fn absolute_form_defaults_to_port_80_and_rewrites_to_origin_form() {
        let head = done(b"GET HTTP://Example.com/p/q?x=1#frag HTTP/1.1\r\nHost: example.com\r\n\r\n");
        assert_eq!(head.form, TargetForm::Absolute);
        assert_eq!(head.authority, authority("example.com", Some(80)));
        assert_eq!(head.origin_form_target(), "/p/q?x=1");

        let head = done(b"GET http://example.com:8080?x HTTP/1.1\r\n\r\n");
        assert_eq!(head.authority, authority("example.com", Some(8080)));
        assert_eq!(head.origin_form_target(), "/?x");
        assert_eq!(done(b"GET http://[::1] HTTP/1.0\r\n\r\n").origin_form_target(), "/");
        assert_eq!(done(b"OPTIONS http://a.example HTTP/1.1\r\n\r\n").origin_form_target(), "*");
        assert_eq!(done(b"OPTIONS http://a.example/ HTTP/1.1\r\n\r\n").origin_form_target(), "/");
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        assert_eq!(
            done(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example:80\r\n\r\n").authority,
            authority("a.example", Some(80))
        );
        assert_invalid(b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n", "does not match request target");
        assert_invalid(
            b"GET http://a.example/ HTTP/1.1\r\nHost: a.example:81\r\n\r\n",
            "does not match request target",
        );
        assert_invalid(b"GET http://allowed.example@evil.example/ HTTP/1.1\r\n\r\n", "userinfo");
        assert_invalid(b"GET http://evil.example\\@allowed.example/ HTTP/1.1\r\n\r\n", "userinfo");
        assert_invalid(b"GET http:///path HTTP/1.1\r\n\r\n", "empty host");
        assert_invalid(b"GET https://a.example/ HTTP/1.1\r\n\r\n", "unsupported scheme");
        assert_invalid(b"GET a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "in no form allowed");
    }

    #[test]
    fn connect_takes_an_authority_with_port() {
        let head = done(b"CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert_eq!(head.form, TargetForm::Authority);
        assert_eq!(head.authority, authority("example.com", Some(443)));
        assert_eq!(head.origin_form_target(), "Example.com:443");

        let head = done(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n");
        assert_eq!(
            head.authority,
            Some(Authority { host: Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)), port: Some(443) })
        );
        let head = done(b"CONNECT 192.0.2.7:22 HTTP/1.0\r\n\r\n");
        assert_eq!(head.authority, Some(Authority { host: Host::Ip([192, 0, 2, 7].into()), port: Some(22) }));
    }

    #[test]
    fn connect_without_a_valid_port_is_invalid() {
        assert_invalid(b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", "has no port");
        assert_invalid(b"CONNECT [::1] HTTP/1.1\r\n\r\n", "has no port");
        assert_invalid(b"CONNECT example.com: HTTP/1.1\r\n\r\n", "empty port");
        assert_invalid(b"CONNECT example.com:0 HTTP/1.1\r\n\r\n", "out of range");
        assert_invalid(b"CONNECT example.com:65536 HTTP/1.1\r\n\r\n", "out of range");
        assert_invalid(b"CONNECT example.com:https HTTP/1.1\r\n\r\n", "invalid port");
        assert_invalid(b"CONNECT user@example.com:443 HTTP/1.1\r\n\r\n", "userinfo");
        assert_invalid(b"CONNECT :443 HTTP/1.1\r\n\r\n", "empty host");
        assert_invalid(b"CONNECT /path HTTP/1.1\r\n\r\n", "is not host:port");
        assert_invalid(b"CONNECT a.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n", "does not match");
    }

    #[test]
    fn host_is_required_once_on_http_1_1() {
        assert_invalid(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "without Host header");
        assert_invalid(b"OPTIONS * HTTP/1.1\r\n\r\n", "without Host header");
        assert_eq!(done(b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n").form, TargetForm::Asterisk);
        assert_invalid(b"GET * HTTP/1.1\r\nHost: a.example\r\n\r\n", "asterisk-form target with method GET");
        assert_eq!(done(b"GET / HTTP/1.0\r\n\r\n").authority, None);
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n", "multiple Host headers");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a.example\r\nHOST: a.example\r\n\r\n", "multiple Host headers");
    }

    #[test]
    fn host_must_be_a_hostname_or_ip_literal() {
        assert_eq!(
            done(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n").authority.unwrap().to_string(),
            "[2001:db8::1]:8443"
        );
        assert_eq!(done(b"GET / HTTP/1.1\r\nHost: example.com.\r\n\r\n").authority, authority("example.com", None));
        assert_invalid(b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n", "not ASCII");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n", "not ASCII");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: \r\n\r\n", "empty host");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a b.example\r\n\r\n", "invalid host");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a.example/x\r\n\r\n", "invalid host");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: 2130706433\r\n\r\n", "IP address in disguise");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", "IPv6 literals need brackets");
    }

    #[test]
    fn body_framing_must_be_unambiguous() {
        let post = |headers: &str| format!("POST / HTTP/1.1\r\nHost: a\r\n{headers}\r\n").into_bytes();
        for (headers, reason) in [
            ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "both Content-Length and Transfer-Encoding"),
            ("Content-Length: 5\r\nContent-Length: 5\r\n", "multiple Content-Length headers"),
            ("Content-Length: 5\r\ncontent-length: 6\r\n", "multiple Content-Length headers"),
            ("Content-Length: 5, 5\r\n", "invalid Content-Length"),
            ("Content-Length: -1\r\n", "invalid Content-Length"),
            ("Content-Length: 1234567890123456789\r\n", "invalid Content-Length"),
            ("Transfer-Encoding: gzip\r\n", "does not end in chunked"),
            ("Transfer-Encoding: chunked;x=1\r\n", "does not end in chunked"),
            ("Transfer-Encoding: chunked, gzip\r\n", "chunked before the last"),
            ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "chunked before the last"),
            ("Transfer-Encoding: ,chunked\r\n", "empty element"),
        ] {
            assert_invalid(&post(headers), reason);
        }
        for headers in [
            "Content-Length: 0005\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: Chunked \r\n",
        ] {
            assert!(matches!(parse_request_head(&post(headers)), Parse::Done(_)), "{headers:?}");
        }
        assert_invalid(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding in an HTTP/1.0");
    }

    #[test]
    fn cr_lf_injection_is_refused() {
        // A bare CR inside a value, a header smuggled behind a bare LF, a line break in the target.
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a.example\rHost: b.example\r\n\r\n", "malformed request head");
        assert_invalid(b"GET / HTTP/1.1\r\nX-A: 1\nHost: evil.example\r\n\r\n", "bare LF");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-A: 1\nX-B: 2\r\n\r\n", "bare LF");
        assert_invalid(b"GET / HTTP/1.1\nHost: a.example\n\n", "bare LF");
        assert_invalid(b"GET /\r\nHost: evil HTTP/1.1\r\nHost: a.example\r\n\r\n", "malformed request head");
        assert_invalid(b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", "malformed request head");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a.example\r\n folded\r\n\r\n", "malformed request head");
        assert_invalid(b"GET / HTTP/1.1\r\nHost: a.ex\0ample\r\n\r\n", "malformed request head");
        assert_invalid(b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "empty line before the request line");
    }

    #[test]
    fn header_count_is_bounded() {
        let with_headers = |count: usize| {
            let mut raw = b"GET / HTTP/1.1\r\nHost: a.example\r\n".to_vec();
            for index in 1..count {
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
            let mut raw = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: ".to_vec();
            raw.resize(len - 4, b'a');
            raw.extend(b"\r\n\r\n");
            raw
        };
        assert_eq!(done(&head_of(MAX_HEAD_BYTES)).head_len, MAX_HEAD_BYTES);
        let over = head_of(MAX_HEAD_BYTES + 1);
        assert_invalid(&over, "request head exceeds 32768 bytes");
        // Without its end in sight: refused once the bound is reached, not before.
        assert_eq!(parse_request_head(&over[..MAX_HEAD_BYTES - 1]), Parse::NeedMore);
        assert_invalid(&over[..MAX_HEAD_BYTES], "request head exceeds 32768 bytes");
    }

    #[test]
    fn other_versions_are_refused() {
        assert_invalid(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "not an HTTP/1.0 or HTTP/1.1 request");
        assert_invalid(b"GET / HTTP/0.9\r\n\r\n", "not an HTTP/1.0 or HTTP/1.1 request");
    }

    #[test]
    fn every_prefix_needs_more_and_the_whole_is_done() {
        for raw in [
            &b"POST http://a.example:8080/submit HTTP/1.1\r\nHost: a.example:8080\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"CONNECT [2001:db8::2]:443 HTTP/1.1\r\nHost: [2001:db8::2]:443\r\nProxy-Connection: keep-alive\r\n\r\n",
        ] {
            let whole = done(raw);
            for len in 0..whole.head_len {
                assert_eq!(parse_request_head(&raw[..len]), Parse::NeedMore, "prefix of {len} bytes");
            }
            for len in whole.head_len..=raw.len() {
                assert_eq!(parse_request_head(&raw[..len]), Parse::Done(whole.clone()), "prefix of {len} bytes");
            }
        }
    }
}
