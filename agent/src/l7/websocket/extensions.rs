//! `Sec-WebSocket-Extensions` in the upgrade (RFC 6455 §9.1): only
//! permessage-deflate (RFC 7692) is offered to the origin, as the client
//! offered it, and the origin's answer must accept one of those offers.

use crate::http1::{field_values, RequestHead, ResponseHead};

const HEADER: &str = "Sec-WebSocket-Extensions";
const PERMESSAGE_DEFLATE: &str = "permessage-deflate";
/// RFC 7692 §7.1.2: LZ77 window sizes an endpoint may name.
const WINDOW_BITS: std::ops::RangeInclusive<u8> = 8..=15;

/// The permessage-deflate offers the origin was sent, in the client's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    deflate: Vec<Params>,
}

/// What the origin agreed to, as far as the client's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deflate {
    /// The client compresses each message on its own: its inflater is
    /// reset at each message.
    pub client_no_context_takeover: bool,
}

/// One permessage-deflate offer or answer. `client_max_window_bits` may
/// come without a value in an offer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Params {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<Option<u8>>,
}

/// Keeps only the client's well-formed permessage-deflate offers in the
/// request `head` will forward (each rewritten in a canonical form; other
/// extensions dropped, the field removed if none is left), and returns
/// them for [`accept`].
pub fn offer(head: &mut RequestHead) -> Offer {
    let deflate: Vec<Params> = field_values(&head.headers, HEADER)
        .flat_map(split_list)
        .filter_map(|element| {
            let (name, params) = parse_extension(element)?;
            name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE).then(|| Params::parse(&params, true).ok()).flatten()
        })
        .collect();
    let position = head.headers.iter().position(|(name, _)| name.eq_ignore_ascii_case(HEADER));
    head.headers.retain(|(name, _)| !name.eq_ignore_ascii_case(HEADER));
    if let (Some(position), false) = (position, deflate.is_empty()) {
        let value = deflate.iter().map(Params::to_offer).collect::<Vec<_>>().join(", ");
        head.headers.insert(position, (HEADER.to_owned(), value.into_bytes()));
    }
    Offer { deflate }
}

/// Checks the extensions of the origin's 101 against `offer`: none, or one
/// permessage-deflate answer accepting one of the offers. `Err`: why the
/// 101 must not reach the client.
pub fn accept(offer: &Offer, response: &ResponseHead) -> Result<Option<Deflate>, String> {
    let elements: Vec<&[u8]> = field_values(&response.headers, HEADER).flat_map(split_list).collect();
    let element = match elements[..] {
        [] => return Ok(None),
        [element] => element,
        _ => return Err(format!("the origin answered with several WebSocket extensions: {}", shown(&elements))),
    };
    let Some((name, params)) = parse_extension(element) else {
        return Err(format!("the origin's WebSocket extension is malformed: {}", shown(&[element])));
    };
    if !name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
        return Err(format!(
            "the origin answered with a WebSocket extension that was not offered: {}",
            shown(&[element])
        ));
    }
    if offer.deflate.is_empty() {
        return Err("the origin answered with permessage-deflate, which was not offered".into());
    }
    let answer = Params::parse(&params, false)
        .map_err(|reason| format!("the origin's permessage-deflate answer is invalid: {reason}"))?;
    if !offer.deflate.iter().any(|offered| answer.accepts(offered)) {
        return Err(format!("the origin's permessage-deflate answer accepts no offer: {}", shown(&[element])));
    }
    Ok(Some(Deflate { client_no_context_takeover: answer.client_no_context_takeover }))
}

impl Params {
    /// RFC 7692 §7.1: known parameters, each at most once, with the values
    /// they allow. `offered`: an offer, where `client_max_window_bits` may
    /// have no value; an answer must give one.
    fn parse(params: &[(String, Option<String>)], offered: bool) -> Result<Self, String> {
        let mut parsed = Self::default();
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in params {
            let name = name.to_ascii_lowercase();
            let known = [
                "server_no_context_takeover",
                "client_no_context_takeover",
                "server_max_window_bits",
                "client_max_window_bits",
            ]
            .into_iter()
            .find(|known| *known == name)
            .ok_or_else(|| format!("unknown parameter {}", name.escape_debug()))?;
            if seen.contains(&known) {
                return Err(format!("{known} given twice"));
            }
            seen.push(known);
            let bits = || -> Result<u8, String> {
                let bits =
                    value.as_deref().and_then(|value| value.parse().ok()).filter(|bits| WINDOW_BITS.contains(bits));
                bits.ok_or_else(|| format!("{known} needs a value from 8 to 15"))
            };
            match known {
                "server_max_window_bits" => parsed.server_max_window_bits = Some(bits()?),
                "client_max_window_bits" if offered && value.is_none() => parsed.client_max_window_bits = Some(None),
                "client_max_window_bits" => parsed.client_max_window_bits = Some(Some(bits()?)),
                flag if value.is_some() => return Err(format!("{flag} takes no value")),
                "server_no_context_takeover" => parsed.server_no_context_takeover = true,
                _ => parsed.client_no_context_takeover = true,
            }
        }
        Ok(parsed)
    }

    /// Whether this answer accepts `offered` (RFC 7692 §7.1.1, §7.1.2):
    /// what the client asked of the server granted, and no window limit
    /// put on a client that did not offer one.
    fn accepts(&self, offered: &Params) -> bool {
        let server_window = match (offered.server_max_window_bits, self.server_max_window_bits) {
            (Some(asked), Some(granted)) => granted <= asked,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let client_window = match (offered.client_max_window_bits, self.client_max_window_bits) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(None), Some(_)) => true,
            (Some(Some(limit)), Some(set)) => set.is_none_or(|set| set <= limit),
        };
        server_window && client_window && (!offered.server_no_context_takeover || self.server_no_context_takeover)
    }

    /// The offer as forwarded.
    fn to_offer(&self) -> String {
        let mut offer = PERMESSAGE_DEFLATE.to_owned();
        if self.server_no_context_takeover {
            offer.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            offer.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            offer.push_str(&format!("; server_max_window_bits={bits}"));
        }
        match self.client_max_window_bits {
            Some(Some(bits)) => offer.push_str(&format!("; client_max_window_bits={bits}")),
            Some(None) => offer.push_str("; client_max_window_bits"),
            None => {}
        }
        offer
    }
}

/// The elements of a comma-separated list, split outside quoted strings,
/// trimmed, empty ones dropped (RFC 9110 §5.6.1).
fn split_list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut quoted = false;
    let mut escaped = false;
    value
        .split(move |&byte| {
            match (quoted, escaped, byte) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (_, false, b'"') => quoted = !quoted,
                (false, _, b',') => return true,
                _ => {}
            }
            false
        })
        .map(<[u8]>::trim_ascii)
        .filter(|element| !element.is_empty())
}

/// An extension's parameters: names and values, unquoted.
type Parameters = Vec<(String, Option<String>)>;

/// `name *(";" param ["=" (token / quoted-string)])` (RFC 6455 §9.1), the
/// values unquoted; `None` if it is not that.
fn parse_extension(element: &[u8]) -> Option<(String, Parameters)> {
    let element = std::str::from_utf8(element).ok()?;
    let mut parts = element.split(';').map(str::trim);
    let name = parts.next().filter(|name| is_token(name))?;
    let params = parts
        .map(|part| {
            let (name, value) = match part.split_once('=') {
                Some((name, value)) => (name.trim_end(), Some(unquote(value.trim_start())?)),
                None => (part, None),
            };
            is_token(name).then(|| (name.to_owned(), value))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((name.to_owned(), params))
}

/// A parameter value: a token, or a quoted string whose content is a token
/// (RFC 6455 §9.1).
fn unquote(value: &str) -> Option<String> {
    let inner = match value.strip_prefix('"') {
        Some(rest) => {
            let content = rest.strip_suffix('"')?;
            let mut unescaped = String::with_capacity(content.len());
            let mut chars = content.chars();
            while let Some(c) = chars.next() {
                unescaped.push(if c == '\\' { chars.next()? } else { c });
            }
            unescaped
        }
        None => value.to_owned(),
    };
    is_token(&inner).then_some(inner)
}

/// RFC 9110 §5.6.2.
fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

/// Elements from the origin, escaped for an error text.
fn shown(elements: &[&[u8]]) -> String {
    elements
        .iter()
        .map(|element| String::from_utf8_lossy(element).escape_debug().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http1::parse_request_head, wire::Parse};

    fn request(extensions: &[&str]) -> RequestHead {
        let mut raw = "GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".to_owned();
        for value in extensions {
            raw.push_str(&format!("Sec-WebSocket-Extensions: {value}\r\n"));
        }
        raw.push_str("Sec-WebSocket-Version: 13\r\n\r\n");
        match parse_request_head(raw.as_bytes()) {
            Parse::Done(head) => head,
            other => panic!("{other:?}"),
        }
    }

    fn forwarded(head: &RequestHead) -> Vec<String> {
        field_values(&head.headers, HEADER).map(|value| String::from_utf8_lossy(value).into_owned()).collect()
    }

    fn response(extensions: &[&str]) -> ResponseHead {
        let headers = extensions.iter().map(|value| (HEADER.to_owned(), value.as_bytes().to_vec())).collect();
        ResponseHead { version: 1, status: 101, reason: "Switching Protocols".into(), headers, head_len: 0 }
    }

    #[test]
    fn only_well_formed_deflate_offers_are_forwarded_in_the_clients_order() {
        let mut head = request(&[
            "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=\"10\"; client_no_context_takeover, \
             permessage-deflate; bogus=1, permessage-deflate; server_max_window_bits=16, foo; a=\"b,c\"",
            "PerMessage-Deflate;Server_No_Context_Takeover ; client_max_window_bits=9",
        ]);
        let offer = offer(&mut head);
        assert_eq!(offer.deflate.len(), 3);
        assert_eq!(
            forwarded(&head),
            ["permessage-deflate; client_max_window_bits, \
              permessage-deflate; client_no_context_takeover; server_max_window_bits=10, \
              permessage-deflate; server_no_context_takeover; client_max_window_bits=9"]
        );
        // Kept where the client put it: before Sec-WebSocket-Version.
        assert_eq!(head.headers.last().map(|(name, _)| name.as_str()), Some("Sec-WebSocket-Version"));
    }

    #[test]
    fn without_a_deflate_offer_the_field_is_removed() {
        for extensions in [&[][..], &["x-webkit-deflate-frame"], &["permessage-deflate; client_no_context_takeover=1"]]
        {
            let mut head = request(extensions);
            assert_eq!(offer(&mut head), Offer::default(), "{extensions:?}");
            assert!(forwarded(&head).is_empty(), "{extensions:?}");
        }
    }

    #[test]
    fn an_answer_without_extensions_means_no_deflate() {
        let offer = offer(&mut request(&["permessage-deflate"]));
        assert_eq!(accept(&offer, &response(&[])), Ok(None));
        assert_eq!(accept(&Offer::default(), &response(&[])), Ok(None));
    }

    #[test]
    fn answers_accepting_an_offer_give_the_clients_context_rule() {
        let offer = offer(&mut request(&[
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits",
            "permessage-deflate; server_no_context_takeover",
        ]));
        for (answer, client_no_context_takeover) in [
            ("permessage-deflate; server_max_window_bits=10", false),
            ("permessage-deflate; server_max_window_bits=12; client_max_window_bits=9", false),
            ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", true),
            ("permessage-deflate;server_no_context_takeover;server_max_window_bits=\"15\"", false),
        ] {
            assert_eq!(
                accept(&offer, &response(&[answer])),
                Ok(Some(Deflate { client_no_context_takeover })),
                "{answer}"
            );
        }
    }

    #[test]
    fn answers_that_accept_no_offer_are_refused() {
        let offer = offer(&mut request(&["permessage-deflate; server_max_window_bits=12"]));
        for (answers, error) in [
            (
                &["permessage-deflate", "x-foo"][..],
                "the origin answered with several WebSocket extensions: permessage-deflate, x-foo",
            ),
            (&["permessage-deflate, permessage-deflate"], "the origin answered with several WebSocket extensions"),
            (&["x-foo; bar"], "the origin answered with a WebSocket extension that was not offered: x-foo; bar"),
            (&["permessage-deflate; server_max_window_bits=13"], "accepts no offer"),
            (&["permessage-deflate"], "accepts no offer"),
            (&["permessage-deflate; server_max_window_bits=12; client_max_window_bits=10"], "accepts no offer"),
            (
                &["permessage-deflate; server_max_window_bits=12; client_max_window_bits"],
                "client_max_window_bits needs a value",
            ),
            (&["permessage-deflate; server_max_window_bits=7"], "server_max_window_bits needs a value from 8 to 15"),
            (&["permessage-deflate; mystery"], "unknown parameter mystery"),
            (&["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], "given twice"),
            (&["permessage-deflate; server_no_context_takeover=yes"], "takes no value"),
            (&["permessage-deflate; =x"], "malformed"),
            (&["perm\u{1b}[31m"], "malformed: perm\\u{1b}[31m"),
        ] {
            let refused = accept(&offer, &response(answers)).expect_err(answers[0]);
            assert!(refused.contains(error), "{answers:?}: {refused}");
        }
        let refused = accept(&Offer::default(), &response(&["permessage-deflate"])).unwrap_err();
        assert_eq!(refused, "the origin answered with permessage-deflate, which was not offered");
    }

    #[test]
    fn lists_split_outside_quoted_strings() {
        let elements: Vec<&[u8]> = split_list(br#" a; b="x,\"y", , c "#).collect();
        assert_eq!(elements, [&br#"a; b="x,\"y""#[..], b"c"]);
        assert_eq!(parse_extension(br#"a; b="x\yz""#), Some(("a".into(), vec![("b".into(), Some("xyz".into()))])));
        assert_eq!(parse_extension(b"a; b=\"x y\""), None);
    }
}
