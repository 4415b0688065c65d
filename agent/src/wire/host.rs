//! Host names and `host[:port]` authorities, validated strictly: the policy
//! matches on them, so anything two parsers could read differently is refused.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Longest DNS name in text form without the trailing dot (RFC 1035 §3.1).
const MAX_DNS_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A lower-cased DNS name without trailing dot.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    pub host: Host,
    pub port: Option<u16>,
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

impl Authority {
    /// Parses `host[:port]`: a DNS name (one trailing dot tolerated and
    /// dropped), a dotted-quad IPv4 address or a bracketed IPv6 address.
    /// Userinfo, zone ids and empty ports are refused.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        if !text.is_ascii() {
            return Err("authority is not ASCII".into());
        }
        if text.contains(&b'@') {
            return Err("userinfo ('@') in authority".into());
        }
        if let Some(bracketed) = text.strip_prefix(b"[") {
            let (literal, after) = split_once(bracketed, b']').ok_or("unclosed '[' in authority")?;
            let ip = std::str::from_utf8(literal)
                .ok()
                .and_then(|literal| literal.parse::<Ipv6Addr>().ok())
                .ok_or("invalid IPv6 literal in authority")?;
            let port = match after {
                [] => None,
                [b':', port @ ..] => Some(parse_port(port)?),
                _ => return Err("unexpected characters after IPv6 literal".into()),
            };
            return Ok(Self { host: Host::Ip(IpAddr::V6(ip)), port });
        }
        let (host, port) = match split_once(text, b':') {
            Some((_, port)) if port.contains(&b':') => {
                return Err("more than one ':' in authority (IPv6 literals need brackets)".into())
            }
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        };
        if host.is_empty() {
            return Err("empty host in authority".into());
        }
        let port = port.map(parse_port).transpose()?;
        if let Some(ip) = std::str::from_utf8(host).ok().and_then(|host| host.parse::<Ipv4Addr>().ok()) {
            return Ok(Self { host: Host::Ip(IpAddr::V4(ip)), port });
        }
        // "example.com." names the same host as "example.com".
        let name = host.strip_suffix(b".").unwrap_or(host);
        let name = dns_name(name).map_err(|reason| format!("invalid host in authority: {reason}"))?;
        Ok(Self { host: Host::Name(name), port })
    }
}

/// The lower-cased name if `name` is an LDH DNS name: dot-separated labels of
/// ASCII letters, digits and inner hyphens, no trailing dot.
pub fn dns_name(name: &[u8]) -> Result<String, &'static str> {
    if name.is_empty() {
        return Err("empty host name");
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err("host name longer than 253 characters");
    }
    let mut last_label: &[u8] = &[];
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Err("empty label in host name");
        }
        if label.len() > MAX_LABEL_LEN {
            return Err("host name label longer than 63 characters");
        }
        if !label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err("host name has a character other than a letter, digit, '-' or '.'");
        }
        if label.starts_with(b"-") || label.ends_with(b"-") {
            return Err("host name label starts or ends with '-'");
        }
        last_label = label;
    }
    // Resolvers and URL parsers read a name ending in a numeric label as an
    // IPv4 address, also in decimal, octal or hex ("2130706433", "0x7f.1"):
    // as a name it would dodge IP rules.
    if is_numeric_label(last_label) {
        return Err("host name is an IP address in disguise (numeric last label)");
    }
    Ok(name.iter().map(|&b| char::from(b.to_ascii_lowercase())).collect())
}

fn is_numeric_label(label: &[u8]) -> bool {
    match label.strip_prefix(b"0x").or_else(|| label.strip_prefix(b"0X")) {
        Some(hex) => hex.iter().all(u8::is_ascii_hexdigit),
        None => label.iter().all(u8::is_ascii_digit),
    }
}

fn parse_port(digits: &[u8]) -> Result<u16, String> {
    if digits.is_empty() {
        return Err("empty port in authority".into());
    }
    // At most 5 digits so the sum below cannot overflow.
    if digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return Err("invalid port in authority".into());
    }
    let port = digits.iter().fold(0u32, |port, &digit| port * 10 + u32::from(digit - b'0'));
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("port {port} out of range 1..=65535")),
    }
}

fn split_once(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == separator)?;
    let (before, after) = bytes.split_at(at);
    Some((before, after.get(1..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str, port: Option<u16>) -> Authority {
        Authority { host: Host::Name(text.into()), port }
    }

    #[test]
    fn dns_names_are_lower_cased() {
        assert_eq!(dns_name(b"API.Example-1.COM"), Ok("api.example-1.com".into()));
        assert_eq!(dns_name(b"xn--bcher-kva.example"), Ok("xn--bcher-kva.example".into()));
    }

    #[test]
    fn malformed_dns_names_are_refused() {
        let too_long = [b"a".repeat(63).as_slice(); 4].join(&b'.');
        assert_eq!(too_long.len(), 255);
        let long_label = b"a".repeat(64);
        for bad in [
            &b""[..],
            b"example.com.",
            b".example.com",
            b"a..b",
            b"exa mple.com",
            b"under_score.com",
            b"-lead.com",
            b"trail-.com",
            b"nul\0.com",
            b"caf\xc3\xa9.com",
            b"1.2.3.4",
            b"2130706433",
            b"0x7f.1",
            b"host.0X1F",
            &too_long,
            &long_label,
        ] {
            assert!(dns_name(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(dns_name(b"1.2.3.example").is_ok(), "numeric labels are fine before the last");
        assert!(dns_name(b"0xdeadbeef.example").is_ok());
    }

    #[test]
    fn authorities_parse_names_ports_and_ip_literals() {
        assert_eq!(Authority::parse(b"Example.COM:8080"), Ok(name("example.com", Some(8080))));
        assert_eq!(Authority::parse(b"example.com."), Ok(name("example.com", None)));
        assert_eq!(
            Authority::parse(b"10.0.0.1:443"),
            Ok(Authority { host: Host::Ip([10, 0, 0, 1].into()), port: Some(443) })
        );
        let v6 = Authority::parse(b"[::1]:443").unwrap();
        assert_eq!(v6, Authority { host: Host::Ip(Ipv6Addr::LOCALHOST.into()), port: Some(443) });
        assert_eq!(v6.to_string(), "[::1]:443");
        assert_eq!(Authority::parse(b"[2001:DB8::1]").unwrap().to_string(), "[2001:db8::1]");
        assert_eq!(Authority::parse(b"a:65535").unwrap().port, Some(65535));
        assert_eq!(Authority::parse(b"a:00080").unwrap().port, Some(80));
    }

    #[test]
    fn bad_authorities_are_refused() {
        for bad in [
            &b""[..],
            b":80",
            b"a:",
            b"a:0",
            b"a:65536",
            b"a:123456",
            b"a:+80",
            b"a:80:80",
            b"a:8o",
            b"user@a",
            b"user:pw@a:80",
            b"::1",
            b"[::1",
            b"[::1]x",
            b"[::1]:",
            b"[fe80::1%25eth0]",
            b"[1.2.3.4]",
            b"01.2.3.4",
            b"a b",
            b"\xff",
        ] {
            assert!(Authority::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
