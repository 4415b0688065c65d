//! TLS ClientHello peek, without a TLS library: record layer (RFC 8446 §5.1),
//! ClientHello (§4.1.2), server_name (RFC 6066 §3), ALPN (RFC 7301 §3.1).

use std::borrow::Cow;

use crate::wire::{host::dns_name, Parse};

/// TLSPlaintext.length must not exceed 2^14 (RFC 8446 §5.1).
pub const MAX_RECORD_LEN: usize = 1 << 14;
/// Largest ClientHello handshake message accepted, 4-byte header included.
/// Real ones are well under 2 KiB, post-quantum key shares included.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// Records a ClientHello may be spread over. Clients fragment rarely, but
/// without a cap 1-byte records would inflate the bytes to buffer five-fold.
pub const MAX_CLIENT_HELLO_RECORDS: usize = 16;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Bytes the parser may need to see before it answers `Done` or `Invalid`.
pub const MAX_CLIENT_HELLO_WIRE: usize = MAX_CLIENT_HELLO + MAX_CLIENT_HELLO_RECORDS * RECORD_HEADER_LEN;

const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RANDOM_LEN: usize = 32;
const MAX_SESSION_ID_LEN: usize = 32;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const EXTENSION_SUPPORTED_VERSIONS: u16 = 43;
const EXTENSION_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The server_name host_name, lower-cased; `None` when the client sent none.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order of preference. Names are
    /// opaque bytes; non-UTF-8 ones (GREASE) show U+FFFD.
    pub alpn: Vec<String>,
    /// The ClientHello's legacy_version (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// The supported_versions extension (TLS 1.3 offers 0x0304); empty if absent.
    pub supported_versions: Vec<u16>,
    /// An encrypted_client_hello extension is present. With real ECH `sni` is
    /// only the public name of the client-facing server; but Chrome sends a
    /// GREASE one, indistinguishable on the wire, whenever ECH is not in use.
    pub ech: bool,
}

/// Parses the ClientHello at the start of `buf`, which holds the stream's
/// bytes so far. Bytes after the ClientHello (e.g. 0-RTT data) are ignored.
pub fn parse_client_hello(buf: &[u8]) -> Parse<ClientHello> {
    match reassemble_handshake(buf) {
        Ok(Some(message)) => match parse_client_hello_body(message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default()) {
            Ok(hello) => Parse::Done(hello),
            Err(reason) => Parse::Invalid(reason),
        },
        Ok(None) => Parse::NeedMore,
        Err(reason) => Parse::Invalid(reason),
    }
}

/// The first handshake message (header included) once all of it is in:
/// borrowed when one record holds it, as usual, copied when it spans several.
fn reassemble_handshake(buf: &[u8]) -> Result<Option<Cow<'_, [u8]>>, String> {
    let mut fragments: [&[u8]; MAX_CLIENT_HELLO_RECORDS] = [&[]; MAX_CLIENT_HELLO_RECORDS];
    let mut record_count = 0;
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut available = 0;
    let mut message_len = None;
    let mut rest = buf;
    while message_len.is_none_or(|len| available < len) {
        // Each check runs as soon as its byte is in: NeedMore never spans
        // more than MAX_CLIENT_HELLO_WIRE bytes, and garbage fails fast.
        let Some(&content_type) = rest.first() else {
            return Ok(None);
        };
        let Some(slot) = fragments.get_mut(record_count) else {
            return Err(format!("ClientHello spread over more than {MAX_CLIENT_HELLO_RECORDS} records"));
        };
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(if record_count == 0 {
                format!("first TLS record is not a handshake record (content type {content_type:#04x})")
            } else {
                format!("record of content type {content_type:#04x} inside the ClientHello")
            });
        }
        let Some((&[_, version_major, _, len_high, len_low], after_header)) =
            rest.split_first_chunk::<RECORD_HEADER_LEN>()
        else {
            return Ok(None);
        };
        if version_major != 3 {
            return Err(format!("TLS record version major {version_major} is not 3"));
        }
        let record_len = usize::from(u16::from_be_bytes([len_high, len_low]));
        if record_len == 0 {
            return Err("empty handshake record".into());
        }
        if record_len > MAX_RECORD_LEN {
            return Err(format!("TLS record length {record_len} exceeds {MAX_RECORD_LEN}"));
        }
        let (fragment, after_record) = after_header.split_at_checked(record_len).unwrap_or((after_header, &[]));
        *slot = fragment;
        record_count += 1;
        for (target, &byte) in header.iter_mut().skip(available).zip(fragment) {
            *target = byte;
        }
        available += fragment.len();

        let [message_type, len_high, len_middle, len_low] = header;
        if available >= 1 && message_type != HANDSHAKE_CLIENT_HELLO {
            return Err(format!("first handshake message is not a ClientHello (type {message_type})"));
        }
        if available >= HANDSHAKE_HEADER_LEN {
            let len = HANDSHAKE_HEADER_LEN + u32::from_be_bytes([0, len_high, len_middle, len_low]) as usize;
            if len > MAX_CLIENT_HELLO {
                return Err(format!("ClientHello of {len} bytes exceeds {MAX_CLIENT_HELLO}"));
            }
            message_len = Some(len);
        }
        if fragment.len() < record_len {
            // The rest of this record has not arrived yet.
            break;
        }
        rest = after_record;
    }
    let Some(message_len) = message_len.filter(|&len| available >= len) else {
        return Ok(None);
    };
    let fragments = fragments.get(..record_count).unwrap_or_default();
    Ok(Some(match fragments.first().and_then(|first| first.get(..message_len)) {
        Some(whole) => Cow::Borrowed(whole),
        None => Cow::Owned(fragments.iter().flat_map(|fragment| fragment.iter().copied()).take(message_len).collect()),
    }))
}

fn parse_client_hello_body(body: &[u8]) -> Result<ClientHello, String> {
    let mut reader = Reader(body);
    let legacy_version = reader.u16("legacy_version")?;
    reader.take(RANDOM_LEN, "random")?;
    if reader.vec8("legacy_session_id")?.len() > MAX_SESSION_ID_LEN {
        return Err("legacy_session_id longer than 32 bytes".into());
    }
    let cipher_suites = reader.vec16("cipher_suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(format!("cipher_suites of odd or zero length {}", cipher_suites.len()));
    }
    if reader.vec8("legacy_compression_methods")?.is_empty() {
        return Err("empty legacy_compression_methods".into());
    }
    let mut hello =
        ClientHello { sni: None, alpn: Vec::new(), legacy_version, supported_versions: Vec::new(), ech: false };
    // A TLS 1.2 ClientHello may end here, with no extensions at all.
    if reader.is_empty() {
        return Ok(hello);
    }
    let mut extensions = Reader(reader.vec16("extensions")?);
    reader.expect_end("ClientHello")?;
    // A second copy of an extension we read could be what the server reads.
    let (mut seen_server_name, mut seen_alpn, mut seen_versions) = (false, false, false);
    while !extensions.is_empty() {
        let extension_type = extensions.u16("extension type")?;
        let data = extensions.vec16("extension data")?;
        match extension_type {
            EXTENSION_SERVER_NAME => {
                reject_duplicate(&mut seen_server_name, "server_name")?;
                hello.sni = parse_server_name(data)?;
            }
            EXTENSION_ALPN => {
                reject_duplicate(&mut seen_alpn, "application_layer_protocol_negotiation")?;
                hello.alpn = parse_alpn(data)?;
            }
            EXTENSION_SUPPORTED_VERSIONS => {
                reject_duplicate(&mut seen_versions, "supported_versions")?;
                hello.supported_versions = parse_supported_versions(data)?;
            }
            EXTENSION_ENCRYPTED_CLIENT_HELLO => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

fn reject_duplicate(seen: &mut bool, extension: &str) -> Result<(), String> {
    if std::mem::replace(seen, true) {
        return Err(format!("duplicate {extension} extension"));
    }
    Ok(())
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, String> {
    let mut reader = Reader(data);
    let mut entries = Reader(reader.vec16("server_name list")?);
    reader.expect_end("server_name extension")?;
    if entries.is_empty() {
        return Err("empty server_name list".into());
    }
    let mut host_name = None;
    while !entries.is_empty() {
        let name_type = entries.u8("server_name entry")?;
        // RFC 6066 defines only host_name; other types are skipped as opaque
        // length-prefixed values, as common TLS stacks do.
        let name = entries.vec16("server_name entry")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host_name.is_some() {
            return Err("more than one host_name in server_name".into());
        }
        host_name = Some(dns_name(name).map_err(|reason| format!("SNI is not a DNS host name: {reason}"))?);
    }
    Ok(host_name)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<String>, String> {
    let mut reader = Reader(data);
    let mut names = Reader(reader.vec16("ALPN protocol list")?);
    reader.expect_end("ALPN extension")?;
    if names.is_empty() {
        return Err("empty ALPN protocol list".into());
    }
    let mut protocols = Vec::new();
    while !names.is_empty() {
        let name = names.vec8("ALPN protocol name")?;
        if name.is_empty() {
            return Err("empty ALPN protocol name".into());
        }
        protocols.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(protocols)
}

fn parse_supported_versions(data: &[u8]) -> Result<Vec<u16>, String> {
    let mut reader = Reader(data);
    let mut versions = Reader(reader.vec8("supported_versions list")?);
    reader.expect_end("supported_versions extension")?;
    if versions.is_empty() {
        return Err("empty supported_versions list".into());
    }
    let mut list = Vec::new();
    while !versions.is_empty() {
        list.push(versions.u16("supported_versions list")?);
    }
    Ok(list)
}

/// Bounds-checked big-endian cursor; `what` names the field in errors.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], String> {
        let (taken, rest) = self.0.split_at_checked(len).ok_or_else(|| format!("{what} is truncated"))?;
        self.0 = rest;
        Ok(taken)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        let (&[byte], rest) = self.0.split_first_chunk::<1>().ok_or_else(|| format!("{what} is truncated"))?;
        self.0 = rest;
        Ok(byte)
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let (&bytes, rest) = self.0.split_first_chunk::<2>().ok_or_else(|| format!("{what} is truncated"))?;
        self.0 = rest;
        Ok(u16::from_be_bytes(bytes))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    fn expect_end(&self, what: &str) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected bytes at the end of the {what}", self.0.len()))
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn vec8(data: &[u8]) -> Vec<u8> {
        [&[u8::try_from(data.len()).unwrap()][..], data].concat()
    }

    fn vec16(data: &[u8]) -> Vec<u8> {
        [&u16::try_from(data.len()).unwrap().to_be_bytes()[..], data].concat()
    }

    fn extension(extension_type: u16, data: &[u8]) -> Vec<u8> {
        [&extension_type.to_be_bytes()[..], &vec16(data)].concat()
    }

    fn server_name(host: &[u8]) -> Vec<u8> {
        extension(EXTENSION_SERVER_NAME, &vec16(&[&[NAME_TYPE_HOST_NAME][..], &vec16(host)].concat()))
    }

    fn alpn(protocols: &[&[u8]]) -> Vec<u8> {
        extension(EXTENSION_ALPN, &vec16(&protocols.iter().flat_map(|name| vec8(name)).collect::<Vec<_>>()))
    }

    fn supported_versions(versions: &[u16]) -> Vec<u8> {
        extension(
            EXTENSION_SUPPORTED_VERSIONS,
            &vec8(&versions.iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>()),
        )
    }

    /// A ClientHello handshake message, header included, with these extensions in order.
    fn handshake(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([0x5a; RANDOM_LEN]);
        body.extend(vec8(&[0x11; MAX_SESSION_ID_LEN]));
        body.extend(vec16(&[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]));
        body.extend(vec8(&[0]));
        body.extend(vec16(&extensions.concat()));
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        [&[HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]][..], &body].concat()
    }

    fn record(content_type: u8, fragment: &[u8]) -> Vec<u8> {
        [&[content_type, 0x03, 0x01][..], &vec16(fragment)].concat()
    }

    /// The handshake message cut into handshake records of the given fragment lengths, the rest in a last record.
    pub(in crate::sniff) fn records(message: &[u8], fragment_lens: &[usize]) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut rest = message;
        for &len in fragment_lens {
            let (fragment, after) = rest.split_at(len);
            wire.extend(record(CONTENT_TYPE_HANDSHAKE, fragment));
            rest = after;
        }
        if !rest.is_empty() {
            wire.extend(record(CONTENT_TYPE_HANDSHAKE, rest));
        }
        wire
    }

    pub(in crate::sniff) fn typical_message() -> Vec<u8> {
        handshake(&[
            server_name(b"Api.Example.COM"),
            alpn(&[b"h2", b"http/1.1"]),
            supported_versions(&[0x0304, 0x0303]),
            extension(0x0a0a, b""), // GREASE
        ])
    }

    pub(in crate::sniff) fn typical_expected() -> ClientHello {
        ClientHello {
            sni: Some("api.example.com".into()),
            alpn: vec!["h2".into(), "http/1.1".into()],
            legacy_version: 0x0303,
            supported_versions: vec![0x0304, 0x0303],
            ech: false,
        }
    }

    fn assert_invalid(result: Parse<ClientHello>, reason_part: &str) {
        match result {
            Parse::Invalid(reason) => assert!(reason.contains(reason_part), "{reason:?} lacks {reason_part:?}"),
            other => panic!("expected Invalid({reason_part:?}), got {other:?}"),
        }
    }

    // Offsets in a single-record typical hello (record header 5 + handshake header 4).
    const SESSION_ID_LEN_AT: usize = 9 + 2 + RANDOM_LEN;
    const CIPHER_SUITES_LEN_AT: usize = SESSION_ID_LEN_AT + 1 + MAX_SESSION_ID_LEN;
    const COMPRESSION_LEN_AT: usize = CIPHER_SUITES_LEN_AT + 2 + 6;
    const EXTENSIONS_LEN_AT: usize = COMPRESSION_LEN_AT + 2;
    const SERVER_NAME_DATA_LEN_AT: usize = EXTENSIONS_LEN_AT + 4;
    const SERVER_NAME_LIST_LEN_AT: usize = SERVER_NAME_DATA_LEN_AT + 2;
    const HOST_NAME_LEN_AT: usize = SERVER_NAME_LIST_LEN_AT + 3;
    const ALPN_DATA_LEN_AT: usize = HOST_NAME_LEN_AT + 2 + b"Api.Example.COM".len() + 2;
    const ALPN_LIST_LEN_AT: usize = ALPN_DATA_LEN_AT + 2;
    const ALPN_FIRST_NAME_LEN_AT: usize = ALPN_LIST_LEN_AT + 2;

    #[test]
    fn extracts_sni_alpn_and_versions() {
        let wire = records(&typical_message(), &[]);
        assert_eq!(wire.get(HOST_NAME_LEN_AT + 2..HOST_NAME_LEN_AT + 5), Some(&b"Api"[..]), "offsets");
        assert_eq!(wire.get(ALPN_FIRST_NAME_LEN_AT..ALPN_FIRST_NAME_LEN_AT + 3), Some(&b"\x02h2"[..]), "offsets");
        assert_eq!(parse_client_hello(&wire), Parse::Done(typical_expected()));
    }

    #[test]
    fn hello_without_sni_or_extensions_is_accepted() {
        let without_sni = records(&handshake(&[alpn(&[b"h2"])]), &[]);
        let Parse::Done(hello) = parse_client_hello(&without_sni) else { panic!("not Done") };
        assert_eq!((hello.sni, hello.alpn), (None, vec!["h2".to_string()]));

        // TLS 1.2 allows a ClientHello that ends after the compression methods.
        let mut bare = handshake(&[]);
        bare.truncate(bare.len() - 2);
        bare[3] -= 2;
        let Parse::Done(hello) = parse_client_hello(&records(&bare, &[])) else { panic!("not Done") };
        assert_eq!(hello.sni, None);
        assert!(hello.alpn.is_empty() && hello.supported_versions.is_empty());
    }

    #[test]
    fn other_name_types_are_skipped_and_ech_is_flagged() {
        let names = [&[7u8][..], &vec16(b"opaque"), &[NAME_TYPE_HOST_NAME], &vec16(b"public.example")].concat();
        let wire = records(
            &handshake(&[
                extension(EXTENSION_SERVER_NAME, &vec16(&names)),
                extension(EXTENSION_ENCRYPTED_CLIENT_HELLO, b"x"),
            ]),
            &[],
        );
        let Parse::Done(hello) = parse_client_hello(&wire) else { panic!("not Done") };
        assert_eq!(hello.sni.as_deref(), Some("public.example"));
        assert!(hello.ech);
    }

    #[test]
    fn every_prefix_needs_more_and_the_whole_is_done() {
        let wire = records(&typical_message(), &[]);
        for len in 0..wire.len() {
            assert_eq!(parse_client_hello(&wire[..len]), Parse::NeedMore, "prefix of {len} bytes");
        }
        assert_eq!(parse_client_hello(&wire), Parse::Done(typical_expected()));
    }

    #[test]
    fn hello_split_into_two_records_at_every_offset() {
        let message = typical_message();
        for split in 1..message.len() {
            let wire = records(&message, &[split]);
            assert_eq!(parse_client_hello(&wire), Parse::Done(typical_expected()), "split at {split}");
            // Also arriving in TCP segments: every prefix of the two records.
            if split % 16 == 0 {
                for len in 0..wire.len() {
                    assert_eq!(parse_client_hello(&wire[..len]), Parse::NeedMore, "split {split}, prefix {len}");
                }
            }
        }
    }

    #[test]
    fn record_count_is_bounded() {
        let message = typical_message();
        let at_limit = records(&message, &[1; MAX_CLIENT_HELLO_RECORDS - 1]);
        assert_eq!(parse_client_hello(&at_limit), Parse::Done(typical_expected()));
        let over_limit = records(&message, &[1; MAX_CLIENT_HELLO_RECORDS]);
        assert_invalid(parse_client_hello(&over_limit), "more than 16 records");
        // Refused on the first byte of the extra record, not after it.
        let first_extra = (RECORD_HEADER_LEN + 1) * MAX_CLIENT_HELLO_RECORDS + 1;
        assert_invalid(parse_client_hello(&over_limit[..first_extra]), "more than 16 records");
    }

    #[test]
    fn records_after_the_hello_are_ignored() {
        let mut wire = records(&typical_message(), &[]);
        wire.extend(record(0x17, b"early data"));
        assert_eq!(parse_client_hello(&wire), Parse::Done(typical_expected()));
    }

    #[test]
    fn truncated_hello_needs_more() {
        let wire = records(&typical_message(), &[40]);
        assert_eq!(parse_client_hello(&wire[..wire.len() - 1]), Parse::NeedMore);
        assert_eq!(parse_client_hello(&wire[..3]), Parse::NeedMore);
        assert_eq!(parse_client_hello(&[]), Parse::NeedMore);
    }

    #[test]
    fn corrupted_inner_lengths_are_invalid() {
        let wire = records(&typical_message(), &[]);
        let one_byte = [SESSION_ID_LEN_AT, COMPRESSION_LEN_AT, ALPN_FIRST_NAME_LEN_AT];
        let two_byte = [
            CIPHER_SUITES_LEN_AT,
            EXTENSIONS_LEN_AT,
            SERVER_NAME_DATA_LEN_AT,
            SERVER_NAME_LIST_LEN_AT,
            HOST_NAME_LEN_AT,
            ALPN_DATA_LEN_AT,
            ALPN_LIST_LEN_AT,
        ];
        let mut cases = 0;
        for at in one_byte {
            for value in [0, wire[at] - 1, wire[at] + 1, u8::MAX] {
                let mut corrupted = wire.clone();
                corrupted[at] = value;
                assert!(matches!(parse_client_hello(&corrupted), Parse::Invalid(_)), "byte {at} = {value}");
                cases += 1;
            }
        }
        for at in two_byte {
            let len = u16::from_be_bytes([wire[at], wire[at + 1]]);
            for value in [0, len - 1, len + 1, u16::MAX] {
                let mut corrupted = wire.clone();
                corrupted[at..at + 2].copy_from_slice(&value.to_be_bytes());
                assert!(matches!(parse_client_hello(&corrupted), Parse::Invalid(_)), "u16 at {at} = {value}");
                cases += 1;
            }
        }
        assert_eq!(cases, 40);
    }

    #[test]
    fn corrupted_outer_lengths_are_invalid_or_wait() {
        let wire = records(&typical_message(), &[]);
        // Handshake length one short: the extensions no longer fit.
        let mut short = wire.clone();
        short[8] -= 1;
        assert!(matches!(parse_client_hello(&short), Parse::Invalid(_)));
        // Record length one short: the last byte reads as the next record's content type.
        let mut short_record = wire.clone();
        short_record[4] -= 1;
        assert_invalid(parse_client_hello(&short_record), "inside the ClientHello");
        // Longer lengths just wait for bytes that are not there yet.
        let mut long = wire.clone();
        long[8] += 1;
        assert_eq!(parse_client_hello(&long), Parse::NeedMore);
    }

    #[test]
    fn malformed_records_are_invalid() {
        let message = typical_message();
        assert_invalid(parse_client_hello(&record(0x17, &message)), "not a handshake record");
        assert_invalid(parse_client_hello(&record(0x15, &[2, 40])), "not a handshake record");
        assert_invalid(parse_client_hello(&[0x14]), "not a handshake record");
        let mut interleaved = records(&message, &[10]);
        interleaved[RECORD_HEADER_LEN + 10] = 0x15;
        assert_invalid(parse_client_hello(&interleaved), "inside the ClientHello");
        assert_invalid(parse_client_hello(&[0x16, 0x02, 0x00, 0x00, 0x05]), "version major 2");
        assert_invalid(parse_client_hello(&[0x16, 0x03, 0x01, 0x00, 0x00]), "empty handshake record");
        assert_invalid(parse_client_hello(&[0x16, 0x03, 0x01, 0x40, 0x01]), "record length 16385");
    }

    #[test]
    fn non_client_hello_handshake_is_invalid() {
        let mut server_hello = typical_message();
        server_hello[0] = 2;
        assert_invalid(parse_client_hello(&records(&server_hello, &[])), "not a ClientHello");
        // Decided from the first handshake byte alone.
        assert_invalid(parse_client_hello(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x02]), "not a ClientHello");
    }

    #[test]
    fn size_bound_is_enforced() {
        let padded = |message_len: usize| {
            let unpadded = handshake(&[server_name(b"big.example"), extension(21, b"")]).len();
            handshake(&[server_name(b"big.example"), extension(21, &vec![0; message_len - unpadded])])
        };
        let largest = padded(MAX_CLIENT_HELLO);
        assert_eq!(largest.len(), MAX_CLIENT_HELLO);
        let Parse::Done(hello) = parse_client_hello(&records(&largest, &[])) else { panic!("not Done") };
        assert_eq!(hello.sni.as_deref(), Some("big.example"));

        let too_large = padded(MAX_CLIENT_HELLO + 1);
        let wire = records(&too_large, &[MAX_RECORD_LEN]);
        // Refused as soon as the handshake header is in.
        assert_invalid(parse_client_hello(&wire[..9]), "exceeds 16384");
        assert_eq!(parse_client_hello(&wire[..8]), Parse::NeedMore);
    }

    #[test]
    fn invalid_sni_is_refused() {
        let too_long = [b"a".repeat(63).as_slice(); 4].join(&b'.');
        for bad in [
            &b"exa mple.com"[..],
            b"evil.com\0.allowed.com",
            b"evil.com/x",
            b"under_score.example",
            b"example.com.",
            b"",
            b"10.0.0.1",
            b"caf\xc3\xa9.example",
            &too_long,
        ] {
            let wire = records(&handshake(&[server_name(bad)]), &[]);
            assert_invalid(parse_client_hello(&wire), "SNI is not a DNS host name");
        }
    }

    #[test]
    fn ambiguous_extensions_are_refused() {
        let twice = records(&handshake(&[server_name(b"a.example"), server_name(b"b.example")]), &[]);
        assert_invalid(parse_client_hello(&twice), "duplicate server_name");
        let names =
            [&[NAME_TYPE_HOST_NAME][..], &vec16(b"a.example"), &[NAME_TYPE_HOST_NAME], &vec16(b"b.example")].concat();
        let two_names = records(&handshake(&[extension(EXTENSION_SERVER_NAME, &vec16(&names))]), &[]);
        assert_invalid(parse_client_hello(&two_names), "more than one host_name");
        let empty_list = records(&handshake(&[extension(EXTENSION_SERVER_NAME, &vec16(b""))]), &[]);
        assert_invalid(parse_client_hello(&empty_list), "empty server_name list");
        let empty_alpn = records(&handshake(&[alpn(&[b""])]), &[]);
        assert_invalid(parse_client_hello(&empty_alpn), "empty ALPN protocol name");
    }

    /// xorshift64: deterministic, dependency-free pseudo-randomness.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, bound: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % bound as u64) as usize
        }
    }

    #[test]
    fn random_mutations_never_panic_nor_yield_bad_names() {
        let message = typical_message();
        let originals = [records(&message, &[]), records(&message, &[7, 30, 50])];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut done, mut need_more, mut invalid) = (0, 0, 0);
        for iteration in 0..5000 {
            let mut wire = originals[iteration % 2].clone();
            match rng.below(4) {
                0 => wire.truncate(rng.below(wire.len())),
                1 => {
                    let at = rng.below(wire.len());
                    wire.insert(at, rng.below(256) as u8);
                }
                _ => {
                    for _ in 0..=rng.below(3) {
                        let at = rng.below(wire.len());
                        wire[at] = rng.below(256) as u8;
                    }
                }
            }
            match parse_client_hello(&wire) {
                Parse::Done(hello) => {
                    done += 1;
                    if let Some(sni) = hello.sni {
                        assert_eq!(dns_name(sni.as_bytes()).as_deref(), Ok(sni.as_str()), "iteration {iteration}");
                    }
                }
                Parse::NeedMore => need_more += 1,
                Parse::Invalid(_) => invalid += 1,
            }
        }
        assert!(
            done > 100 && need_more > 100 && invalid > 100,
            "{done} done, {need_more} need more, {invalid} invalid"
        );
    }
}
