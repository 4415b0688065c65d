//! Address classes a sandbox must not reach by accident (SSRF): loopback,
//! link-local, cloud metadata, unspecified, multicast/broadcast. They are
//! reachable only when an endpoint's `allowed_ips` lists a range inside the
//! class itself: `0.0.0.0/0` does not count as listing 127.0.0.1.

use std::{net::IpAddr, sync::LazyLock};

use ipnet::IpNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    /// A cloud instance metadata service (checked before link-local, which contains it).
    Metadata,
    LinkLocal,
    Unspecified,
    Multicast,
    /// RFC 1918 or IPv6 unique local (fc00::/7).
    Private,
    Public,
}

/// Each class's ranges, most specific class first.
const CLASS_RANGES: [(AddressClass, &[&str]); 6] = [
    (AddressClass::Metadata, &["169.254.169.254/32", "fd00:ec2::254/128"]),
    (AddressClass::Loopback, &["127.0.0.0/8", "::1/128"]),
    (AddressClass::LinkLocal, &["169.254.0.0/16", "fe80::/10"]),
    (AddressClass::Unspecified, &["0.0.0.0/8", "::/128"]),
    (AddressClass::Multicast, &["224.0.0.0/4", "255.255.255.255/32", "ff00::/8"]),
    (AddressClass::Private, &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]),
];

/// [`CLASS_RANGES`] parsed once: every connection classes its address.
static PARSED_RANGES: LazyLock<Vec<(AddressClass, IpNet)>> = LazyLock::new(|| {
    CLASS_RANGES
        .iter()
        .flat_map(|(class, ranges)| ranges.iter().map(|range| (*class, range.parse().expect("valid built-in range"))))
        .collect()
});

fn ranges(class: AddressClass) -> impl Iterator<Item = IpNet> {
    PARSED_RANGES.iter().filter(move |(c, _)| *c == class).map(|(_, range)| *range)
}

impl AddressClass {
    /// v4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are classed as the IPv4 address.
    pub fn of(ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        CLASS_RANGES
            .iter()
            .find(|(class, _)| ranges(*class).any(|range| range.contains(&ip)))
            .map_or(AddressClass::Public, |(class, _)| *class)
    }

    pub fn is_sensitive(self) -> bool {
        !matches!(self, AddressClass::Private | AddressClass::Public)
    }

    pub fn name(self) -> &'static str {
        match self {
            AddressClass::Loopback => "loopback",
            AddressClass::Metadata => "cloud metadata",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Multicast => "multicast/broadcast",
            AddressClass::Private => "private",
            AddressClass::Public => "public",
        }
    }
}

/// Whether `ip` may be reached given an endpoint's `allowed_ips`: always for
/// private and public addresses (the policy decides those); for a sensitive
/// class only if one of `allowed_ips` contains `ip` and lies inside the class.
pub fn sensitive_address_allowed(ip: IpAddr, allowed_ips: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    let class = AddressClass::of(ip);
    if !class.is_sensitive() {
        return true;
    }
    allowed_ips.iter().any(|listed| {
        let listed = listed.trunc();
        listed.contains(&ip) && ranges(class).any(|range| range.contains(&listed))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn addresses_fall_in_their_class() {
        let cases = [
            ("127.0.0.1", AddressClass::Loopback),
            ("127.255.0.9", AddressClass::Loopback),
            ("::1", AddressClass::Loopback),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("169.254.169.254", AddressClass::Metadata),
            ("::ffff:169.254.169.254", AddressClass::Metadata),
            ("fd00:ec2::254", AddressClass::Metadata),
            ("169.254.1.1", AddressClass::LinkLocal),
            ("fe80::1", AddressClass::LinkLocal),
            ("0.0.0.0", AddressClass::Unspecified),
            ("::", AddressClass::Unspecified),
            ("224.0.0.1", AddressClass::Multicast),
            ("255.255.255.255", AddressClass::Multicast),
            ("ff02::1", AddressClass::Multicast),
            ("10.1.2.3", AddressClass::Private),
            ("172.16.0.1", AddressClass::Private),
            ("172.31.255.255", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("fd12:3456::1", AddressClass::Private),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("172.32.0.1", AddressClass::Public),
            ("198.18.1.2", AddressClass::Public),
            ("8.8.8.8", AddressClass::Public),
            ("2001:db8::1", AddressClass::Public),
        ];
        for (text, class) in cases {
            assert_eq!(AddressClass::of(ip(text)), class, "{text}");
        }
    }

    #[test]
    fn sensitive_addresses_need_an_explicit_listing_inside_their_class() {
        assert!(!sensitive_address_allowed(ip("127.0.0.1"), &[]));
        assert!(!sensitive_address_allowed(ip("127.0.0.1"), &nets(&["0.0.0.0/0"])));
        assert!(!sensitive_address_allowed(ip("::ffff:127.0.0.1"), &nets(&["::/0", "0.0.0.0/0"])));
        assert!(sensitive_address_allowed(ip("127.0.0.1"), &nets(&["127.0.0.1/32"])));
        assert!(sensitive_address_allowed(ip("::ffff:127.0.0.1"), &nets(&["127.0.0.0/8"])));
        assert!(!sensitive_address_allowed(ip("169.254.169.254"), &nets(&["169.254.0.0/16"])));
        assert!(sensitive_address_allowed(ip("169.254.169.254"), &nets(&["169.254.169.254/32"])));
        assert!(sensitive_address_allowed(ip("169.254.3.4"), &nets(&["169.254.0.0/16"])));
        assert!(!sensitive_address_allowed(ip("fe80::1"), &nets(&["fe00::/7"])));
        assert!(!sensitive_address_allowed(ip("224.0.0.1"), &nets(&["10.0.0.0/8"])));
    }

    #[test]
    fn ordinary_addresses_are_left_to_the_policy() {
        assert!(sensitive_address_allowed(ip("10.0.0.1"), &[]));
        assert!(sensitive_address_allowed(ip("198.18.1.2"), &[]));
    }
}
