//! The request target as L7 rules see it, and as the origin then receives
//! it: one canonical path, so that no spelling of a path (`/a/../b`, `//b`,
//! `/b;x`, `%62`) is decided as one path and served as another.
//!
//! Percent-encoded octets are decoded and re-encoded only where RFC 3986
//! requires it; `;params` are dropped from every segment before dot segments
//! are resolved (so `..;x` is still `..`); repeated slashes collapse; a `..`
//! above the root, control bytes, raw non-ASCII, fragments and an encoded
//! slash (`%2F`, unless the endpoint sets `allow_encoded_slash`) are refused.

use std::collections::BTreeMap;

/// Longest path accepted, in bytes as sent.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// A request target split for L7 rules: the canonical path, and the query
/// both as sent (forwarded unchanged) and parsed (for `query` matchers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalTarget {
    pub path: String,
    /// After the `?`, as the client sent it.
    pub raw_query: Option<String>,
    /// Decoded names to their decoded values, in order of appearance.
    pub query: BTreeMap<String, Vec<String>>,
}

impl CanonicalTarget {
    /// The origin-form target forwarded upstream.
    pub fn origin_form(&self) -> String {
        match &self.raw_query {
            Some(query) => format!("{}?{query}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Stands for a decoded `%2F` while segments are split; raw control bytes
/// are refused first, so no input byte collides with it.
const ENCODED_SLASH: u8 = 0x01;

/// `target` is origin-form (`/a/b?q`); an absolute-form target is reduced
/// to its path first by the caller.
pub fn canonicalize(target: &str, allow_encoded_slash: bool) -> Result<CanonicalTarget, String> {
    if let Some(byte) = target.bytes().find(|&b| b < 0x20 || b == 0x7f) {
        return Err(format!("the request target holds the control byte 0x{byte:02x}"));
    }
    if !target.is_ascii() {
        return Err("the request target holds raw non-ASCII bytes (they must be percent-encoded)".into());
    }
    if target.contains('#') {
        return Err("the request target holds a fragment".into());
    }
    let (path, raw_query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(format!("'{path}' is not an origin-form path"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("the path is longer than {MAX_PATH_LEN} bytes"));
    }
    let decoded = decode_path(path.as_bytes(), allow_encoded_slash)?;
    let segments = resolve_dot_segments(&decoded)?;
    let query = raw_query.as_deref().map(parse_query).unwrap_or_default();
    Ok(CanonicalTarget { path: encode_path(&segments), raw_query, query })
}

fn decode_path(path: &[u8], allow_encoded_slash: bool) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(path.len());
    let mut at = 0;
    while at < path.len() {
        if path[at] != b'%' {
            out.push(path[at]);
            at += 1;
            continue;
        }
        let byte = path
            .get(at + 1..at + 3)
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .ok_or("the path holds an invalid percent-encoding")?;
        match byte {
            b'/' if !allow_encoded_slash => {
                return Err("the path holds an encoded slash (%2F), which this endpoint does not allow \
                            (allow_encoded_slash)"
                    .into())
            }
            b'/' => out.push(ENCODED_SLASH),
            byte if byte < 0x20 || byte == 0x7f => {
                return Err(format!("the path holds the encoded control byte 0x{byte:02x}"))
            }
            byte => out.push(byte),
        }
        at += 3;
    }
    Ok(out)
}

/// Segments after `;params` are dropped, `.` and `..` resolved and empty
/// segments collapsed; a final empty segment keeps a trailing slash.
fn resolve_dot_segments(decoded: &[u8]) -> Result<Vec<&[u8]>, String> {
    let parts: Vec<&[u8]> = decoded[1..].split(|&b| b == b'/').collect();
    let last = parts.len() - 1;
    let mut stack: Vec<&[u8]> = Vec::with_capacity(parts.len());
    for (index, part) in parts.into_iter().enumerate() {
        let segment = part.split(|&b| b == b';').next().unwrap_or_default();
        match segment {
            b".." => {
                if stack.pop().is_none() {
                    return Err("the path climbs above its root with `..`".into());
                }
                if index == last {
                    stack.push(b"");
                }
            }
            b"." if index == last => stack.push(b""),
            b"." => {}
            b"" if index != last => {}
            segment => stack.push(segment),
        }
    }
    // An encoded slash keeps `..` inside its segment: refuse what could turn
    // into a dot segment on a server that decodes it.
    let hides_dots = stack
        .iter()
        .filter(|segment| segment.contains(&ENCODED_SLASH))
        .flat_map(|segment| segment.split(|&b| b == ENCODED_SLASH))
        .any(|part| part == b"." || part == b"..");
    if hides_dots {
        return Err("the path hides a dot segment behind an encoded slash".into());
    }
    Ok(stack)
}

fn encode_path(segments: &[&[u8]]) -> String {
    let mut out = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum::<usize>().max(1));
    if segments.is_empty() {
        out.push('/');
    }
    for segment in segments {
        out.push('/');
        for &byte in *segment {
            match byte {
                ENCODED_SLASH => out.push_str("%2F"),
                byte if is_path_char(byte) => out.push(char::from(byte)),
                byte => out.push_str(&format!("%{byte:02X}")),
            }
        }
    }
    out
}

/// RFC 3986 `pchar` less `%`: unreserved, sub-delims, `:` and `@`.
fn is_path_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte)
}

/// `a=1&b=x%20y&a=2` as form-urlencoded (`+` is a space): names to values.
fn parse_query(query: &str) -> BTreeMap<String, Vec<String>> {
    let mut parsed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        parsed.entry(decode_query_part(name)).or_default().push(decode_query_part(value));
    }
    parsed
}

fn decode_query_part(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes.get(at + 1..at + 3).and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (bytes[at], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                at += 1;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(target: &str) -> Result<String, String> {
        canonicalize(target, false).map(|canonical| canonical.path)
    }

    #[test]
    fn spellings_of_one_path_become_that_path() {
        for (target, expected) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("//a///b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a;x=1/b;jsessionid=2", "/a/b"),
            ("/a/..;x/b", "/b"),
            ("/%61/%2e%2E/b", "/b"),
            ("/a%20b", "/a%20b"),
            ("/%7euser", "/~user"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/x%3Fy", "/x%3Fy"),
        ] {
            assert_eq!(path(target).as_deref(), Ok(expected), "{target}");
        }
    }

    #[test]
    fn ambiguous_or_hostile_targets_are_refused() {
        for target in [
            "/..", "/a/../..", "/%2e%2e", "/a%2Fb", "/a%2fb", "/a\tb", "/a%00", "/a%0d%0a", "/é", "/a#b", "a/b",
            "/%zz", "/%4",
        ] {
            assert!(path(target).is_err(), "{target} was accepted");
        }
    }

    #[test]
    fn an_encoded_slash_is_kept_where_the_endpoint_allows_it() {
        assert_eq!(canonicalize("/@scope%2Fname", true).unwrap().path, "/@scope%2Fname");
        assert!(canonicalize("/a%2F..%2Fb", true).is_err(), "a dot segment behind %2F");
    }

    #[test]
    fn the_query_is_kept_as_sent_and_parsed_for_matchers() {
        let target = canonicalize("/a/../s?tag=v1.2&tag=x+y&empty&n%61me=%41", false).unwrap();
        assert_eq!(target.origin_form(), "/s?tag=v1.2&tag=x+y&empty&n%61me=%41");
        assert_eq!(target.query["tag"], ["v1.2", "x y"]);
        assert_eq!(target.query["empty"], [""]);
        assert_eq!(target.query["name"], ["A"]);
    }
}
