//! Placeholders: what a sandbox holds instead of a secret, and where the
//! agent looks for them in what a sandbox sends.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use percent_encoding::percent_decode;
use zeroize::Zeroizing;

use crate::http1::RequestHead;

/// Distinctive, and made of characters that need no escaping in a URL, a
/// header or a shell: a placeholder survives env files and git config as is.
pub const PREFIX: &str = "SANDBOX_EGRESS_PLACEHOLDER_";
pub const MAX_NAME_LEN: usize = 64;

/// The placeholder for provider `name`: the same on every agent and across
/// restarts, so it can live in a sandbox's environment or git config.
pub fn placeholder(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len()) && name.bytes().all(is_name_byte)
}

fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

/// The provider each placeholder in `bytes` names: the longest run of name
/// characters after the prefix (empty, or longer than a name can be, for a
/// placeholder of no provider; cut at one past the longest name, so what a
/// sandbox wrote stays bounded in logs).
pub fn names_in(bytes: &[u8]) -> Vec<String> {
    let prefix = PREFIX.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(at) = bytes.get(from..).and_then(|rest| rest.windows(prefix.len()).position(|w| w == prefix)) {
        let start = from + at + prefix.len();
        let length = bytes[start..].iter().take_while(|&&b| is_name_byte(b)).count();
        let shown = &bytes[start..start + length.min(MAX_NAME_LEN + 1)];
        let name = String::from_utf8_lossy(shown).into_owned();
        if !names.contains(&name) {
            names.push(name);
        }
        from = start + length;
    }
    names
}

/// A placeholder in a request head, and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub provider: String,
    /// `the request target`, `header Authorization`, ...
    pub place: String,
}

/// Every placeholder in `head`: in the target (as sent and percent-decoded),
/// in header names and values, and inside `Basic` credentials.
pub fn find_in_head(head: &RequestHead) -> Vec<Found> {
    let mut found = Vec::new();
    let mut add = |names: Vec<String>, place: &dyn Fn() -> String| {
        for provider in names {
            let place = place();
            if !found.iter().any(|f: &Found| f.provider == provider && f.place == place) {
                found.push(Found { provider, place });
            }
        }
    };
    let target = head.target.as_bytes();
    add(names_in(target), &|| "the request target".to_owned());
    let decoded: Vec<u8> = percent_decode(target).collect();
    add(names_in(&decoded), &|| "the request target".to_owned());
    for (name, value) in &head.headers {
        add(names_in(name.as_bytes()), &|| "a header name".to_owned());
        add(names_in(value), &|| format!("header {name}"));
        if let Some(credentials) = basic_credentials(name, value) {
            add(names_in(&credentials), &|| format!("header {name} (Basic credentials)"));
        }
    }
    found
}

/// The decoded `user:password` of `Authorization: Basic ...` (or
/// Proxy-Authorization); `None` for any other field or value.
pub fn basic_credentials(name: &str, value: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if !name.eq_ignore_ascii_case("authorization") && !name.eq_ignore_ascii_case("proxy-authorization") {
        return None;
    }
    let (scheme, token) = split_scheme(value)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    BASE64.decode(token.trim_ascii()).ok().map(Zeroizing::new)
}

/// `Scheme token` split at its first space.
pub fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|&b| b == b' ')?;
    Some((&value[..space], &value[space + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http1::parse_request_head, wire::Parse};

    fn head(raw: &str) -> RequestHead {
        match parse_request_head(raw.as_bytes()) {
            Parse::Done(head) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn placeholders_are_stable_and_names_are_checked() {
        assert_eq!(placeholder("github"), "SANDBOX_EGRESS_PLACEHOLDER_github");
        for valid in ["a", "GitHub_token-2", &"x".repeat(64)] {
            assert!(is_valid_name(valid), "{valid}");
        }
        for invalid in ["", "a b", "a.b", "ä", &"x".repeat(65), "a/b"] {
            assert!(!is_valid_name(invalid), "{invalid}");
        }
    }

    #[test]
    fn names_are_the_longest_run_of_name_characters() {
        let text =
            b"x SANDBOX_EGRESS_PLACEHOLDER_gh@host /SANDBOX_EGRESS_PLACEHOLDER_a-b/c SANDBOX_EGRESS_PLACEHOLDER_gh";
        assert_eq!(names_in(text), ["gh", "a-b"]);
        assert_eq!(names_in(b"SANDBOX_EGRESS_PLACEHOLDER_"), [""]);
        assert_eq!(names_in(b"sandbox_egress_placeholder_gh SANDBOX_EGRESS_PLACEHOLDE"), Vec::<String>::new());
        let long = format!("{PREFIX}{}", "n".repeat(500));
        assert_eq!(names_in(long.as_bytes()), ["n".repeat(65)], "cut, and still no valid name");
    }

    #[test]
    fn heads_are_searched_in_target_headers_and_basic_credentials() {
        let basic = BASE64.encode("x-access-token:SANDBOX_EGRESS_PLACEHOLDER_git");
        let found = find_in_head(&head(&format!(
            "GET /a/SANDBOX_EGRESS_PLACEHOLDER_p?k=%53ANDBOX_EGRESS_PLACEHOLDER_q HTTP/1.1\r\nHost: h\r\n\
             X-Key: SANDBOX_EGRESS_PLACEHOLDER_h\r\nAuthorization: basic {basic}\r\n\r\n"
        )));
        let pairs: Vec<(&str, &str)> = found.iter().map(|f| (f.provider.as_str(), f.place.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("p", "the request target"),
                ("q", "the request target"),
                ("h", "header X-Key"),
                ("git", "header Authorization (Basic credentials)"),
            ]
        );
        assert!(find_in_head(&head("GET /x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer abc\r\n\r\n")).is_empty());
    }
}
