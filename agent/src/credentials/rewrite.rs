//! What a request carries to an endpoint: the bound provider's placeholders
//! replaced by its secret and its `inject` applied, or a refusal. Nothing
//! with a placeholder is forwarded anywhere.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use zeroize::{Zeroize, Zeroizing};

use super::{
    placeholder::{basic_credentials, find_in_head, names_in, placeholder, split_scheme, Found},
    Credentials, Inject, Provider, Secret,
};
use crate::http1::RequestHead;

/// Everything but RFC 3986's unreserved characters: a secret placed in a
/// path segment or a query value reads back as itself.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Why a request or stream was not forwarded. Never holds a secret.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 403 for a placeholder where its provider is not bound, 502 when a
    /// bound provider's credential cannot be applied.
    pub status: u16,
    /// `credential_not_bound` or `credential_unavailable`: the JSON `error`.
    pub kind: &'static str,
    /// The provider the placeholder named, or the bound one.
    pub provider: String,
    pub detail: String,
    pub reason: String,
}

impl Refusal {
    pub(super) fn not_bound(found: &Found, host: &str, reason: String) -> Self {
        Refusal {
            status: 403,
            kind: "credential_not_bound",
            provider: found.provider.clone(),
            detail: format!(
                "credential placeholder of provider '{}' in {}, sent to {host}",
                found.provider, found.place
            ),
            reason,
        }
    }

    pub(super) fn unavailable(provider: &str, host: &str, reason: String) -> Self {
        Refusal {
            status: 502,
            kind: "credential_unavailable",
            provider: provider.to_owned(),
            detail: format!("the credential of provider '{provider}' for {host} cannot be applied"),
            reason,
        }
    }
}

/// A request head with a secret in it, for building the forwarded head:
/// its strings are overwritten when it is dropped.
pub struct CredentialedHead {
    head: RequestHead,
    provider: String,
}

impl CredentialedHead {
    pub fn head(&self) -> &RequestHead {
        &self.head
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }
}

impl Drop for CredentialedHead {
    fn drop(&mut self) {
        self.head.target.zeroize();
        for (_, value) in &mut self.head.headers {
            value.zeroize();
        }
    }
}

impl Credentials {
    /// The head to forward for a request that `host`'s endpoint allowed.
    /// `bound`: that endpoint's provider; `tls`: whether the request goes
    /// to the origin over TLS (credentials never go in plain text).
    ///
    /// `Ok(None)`: forward `head` as it is (no placeholder, and nothing to
    /// inject). A placeholder of another provider, or any with no bound
    /// provider or without TLS, is a 403; a secret that cannot be read, or a
    /// placeholder where it cannot be replaced, a 502.
    pub fn apply(
        &self,
        head: &RequestHead,
        bound: Option<&str>,
        host: &str,
        tls: bool,
    ) -> Result<Option<CredentialedHead>, Refusal> {
        let found = find_in_head(head);
        let bound = match bound {
            Some(name) if tls => Some(name),
            Some(_) => {
                let reason = "credentials are only sent over TLS to the origin, and this request is plain HTTP";
                return refuse_any(&found, host, reason).map(|()| None);
            }
            None => {
                return refuse_any(&found, host, &format!("{host} is bound to no credential provider")).map(|()| None)
            }
        };
        if let Some(other) = found.iter().find(|found| Some(found.provider.as_str()) != bound) {
            let reason = format!("{host} is bound to credential provider '{}'", bound.unwrap_or_default());
            return Err(Refusal::not_bound(other, host, reason));
        }
        let name = bound.unwrap_or_default();
        let Some(provider) = self.provider(name) else {
            let reason = format!("no credential provider '{name}' is configured (--credentials)");
            return Err(Refusal::unavailable(name, host, reason));
        };
        if found.is_empty() && provider.inject.is_none() {
            return Ok(None);
        }
        let secret = provider.secret().map_err(|reason| Refusal::unavailable(name, host, reason))?;
        let rewritten = rewrite(head, provider, &secret);
        // Fail closed: a placeholder the rewrite could not reach (percent-
        // encoded in the query, in a header name) is never forwarded.
        if let Some(left) = find_in_head(rewritten.head()).first() {
            let reason = format!(
                "a placeholder in {} cannot be replaced there: send it as `sandbox-egress credentials placeholder` \
                 prints it, in a header value, the path or the query",
                left.place
            );
            return Err(Refusal::unavailable(name, host, reason));
        }
        Ok(Some(rewritten))
    }
}

/// Refuses the first placeholder found, if any.
fn refuse_any(found: &[Found], host: &str, reason: &str) -> Result<(), Refusal> {
    match found.first() {
        Some(found) => Err(Refusal::not_bound(found, host, reason.to_owned())),
        None => Ok(()),
    }
}

/// A request forwarded with no credential (plain HTTP decided on its host
/// alone): any placeholder in it is refused.
pub fn check_unbound(head: &RequestHead, host: &str, reason: &str) -> Result<(), Refusal> {
    refuse_any(&find_in_head(head), host, reason)
}

/// The first bytes of a stream relayed as they are (opaque, TLS
/// passthrough, a CONNECT tunnel): a placeholder there is refused.
pub fn check_stream(bytes: &[u8], host: &str, protocol: &str) -> Result<(), Refusal> {
    let place = format!("the first bytes of the stream ({protocol})");
    let found: Vec<Found> =
        names_in(bytes).into_iter().map(|provider| Found { provider, place: place.clone() }).collect();
    let reason = format!(
        "placeholders are replaced only in HTTP requests to endpoints bound to their provider; \
         this {protocol} stream would be relayed as it is"
    );
    refuse_any(&found, host, &reason)
}

/// `head` with `provider`'s placeholders replaced (percent-encoded in the
/// target; inside Basic credentials decoded and encoded again) and its
/// injection applied.
fn rewrite(head: &RequestHead, provider: &Provider, secret: &Secret) -> CredentialedHead {
    let mut rewritten = CredentialedHead { head: head.clone(), provider: provider.name.clone() };
    let placeholder = placeholder(&provider.name);
    let head = &mut rewritten.head;
    if head.target.contains(&placeholder) {
        let encoded = Zeroizing::new(utf8_percent_encode(secret.expose(), COMPONENT).to_string());
        head.target = head.target.replace(&placeholder, &encoded);
    }
    for (name, value) in &mut head.headers {
        let basic = basic_credentials(name, value).filter(|decoded| contains(decoded, placeholder.as_bytes()));
        if let Some(decoded) = basic {
            let replaced = Zeroizing::new(replace(&decoded, placeholder.as_bytes(), secret.expose().as_bytes()));
            let scheme = split_scheme(value).map(|(scheme, _)| scheme.to_vec()).unwrap_or_default();
            let encoded = Zeroizing::new(BASE64.encode(&*replaced));
            *value = [&scheme, &b" "[..], encoded.as_bytes()].concat();
        } else if contains(value, placeholder.as_bytes()) {
            *value = replace(value, placeholder.as_bytes(), secret.expose().as_bytes());
        }
    }
    match &provider.inject {
        None => {}
        Some(Inject::Header { name, prefix, suffix }) => {
            let value = [prefix.as_bytes(), secret.expose().as_bytes(), suffix.as_bytes()].concat();
            set_header(head, name, value);
        }
        Some(Inject::Basic { user }) => {
            let pair = Zeroizing::new(format!("{user}:{}", secret.expose()));
            let value = format!("Basic {}", BASE64.encode(pair.as_bytes())).into_bytes();
            set_header(head, "Authorization", value);
        }
        Some(Inject::Query { name }) => {
            let target = set_query_parameter(&head.target, name, secret.expose());
            head.target.zeroize();
            head.target = target;
        }
    }
    // Room for the forwarded head (request line, fields, Connection and
    // Via), so it is built without reallocating: no stray copy of the secret.
    head.head_len = head.method.len()
        + head.target.len()
        + head.headers.iter().map(|(name, value)| name.len() + value.len() + 4).sum::<usize>()
        + 128;
    rewritten
}

/// Replaces every `name` field (any case) with one `name: value`.
fn set_header(head: &mut RequestHead, name: &str, value: Vec<u8>) {
    for (_, old) in head.headers.iter_mut().filter(|(field, _)| field.eq_ignore_ascii_case(name)) {
        old.zeroize();
    }
    head.headers.retain(|(field, _)| !field.eq_ignore_ascii_case(name));
    head.headers.push((name.to_owned(), value));
}

/// `target` with every `name` parameter (compared decoded, `+` a space)
/// replaced by one `name=value` at the end of the query.
fn set_query_parameter(target: &str, name: &str, value: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let decoded_name = |pair: &str| {
        let raw = pair.split('=').next().unwrap_or_default().replace('+', " ");
        percent_decode_str(&raw).decode_utf8_lossy().into_owned()
    };
    let kept = query.split('&').filter(|pair| !pair.is_empty() && decoded_name(pair) != name);
    let pair =
        Zeroizing::new(format!("{}={}", utf8_percent_encode(name, COMPONENT), utf8_percent_encode(value, COMPONENT)));
    let pairs: Vec<&str> = kept.chain([pair.as_str()]).collect();
    format!("{path}?{}", pairs.join("&"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len() + with.len() * 4);
    let mut at = 0;
    while at < haystack.len() {
        if haystack[at..].starts_with(needle) {
            out.extend_from_slice(with);
            at += needle.len();
        } else {
            out.push(haystack[at]);
            at += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{super::SecretSource, *};
    use crate::{http1::parse_request_head, wire::Parse};

    const SECRET: &str = "tok/en+1 x";

    fn credentials(providers: &[(&str, Option<Inject>)]) -> Credentials {
        let providers = providers
            .iter()
            .map(|(name, inject)| {
                let secret = SecretSource::Env(Arc::new(Secret::new(SECRET).unwrap()));
                (name.to_string(), Provider { name: name.to_string(), secret, inject: inject.clone() })
            })
            .collect();
        Credentials { providers }
    }

    fn head(raw: &str) -> RequestHead {
        match parse_request_head(raw.as_bytes()) {
            Parse::Done(head) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn request(target: &str, headers: &str) -> RequestHead {
        head(&format!("GET {target} HTTP/1.1\r\nHost: api.test\r\n{headers}\r\n"))
    }

    fn header<'h>(head: &'h RequestHead, name: &str) -> Vec<&'h str> {
        head.headers
            .iter()
            .filter(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| std::str::from_utf8(value).unwrap())
            .collect()
    }

    fn applied(credentials: &Credentials, head: &RequestHead, bound: &str) -> CredentialedHead {
        credentials.apply(head, Some(bound), "api.test", true).unwrap().expect("rewritten")
    }

    #[test]
    fn placeholders_are_replaced_in_headers_basic_credentials_path_and_query() {
        let credentials = credentials(&[("gh", None)]);
        let basic = BASE64.encode("x-access-token:SANDBOX_EGRESS_PLACEHOLDER_gh");
        let original = request(
            "/repos/SANDBOX_EGRESS_PLACEHOLDER_gh/x?token=SANDBOX_EGRESS_PLACEHOLDER_gh&a=1",
            &format!(
                "Authorization: Bearer SANDBOX_EGRESS_PLACEHOLDER_gh\r\nX-Both: SANDBOX_EGRESS_PLACEHOLDER_gh,\
                 SANDBOX_EGRESS_PLACEHOLDER_gh\r\nProxy-Authorization: Basic {basic}\r\nAccept: */*\r\n"
            ),
        );
        let rewritten = applied(&credentials, &original, "gh");
        assert_eq!(rewritten.provider(), "gh");
        let head = rewritten.head();
        assert_eq!(head.target, "/repos/tok%2Fen%2B1%20x/x?token=tok%2Fen%2B1%20x&a=1");
        assert_eq!(header(head, "authorization"), [format!("Bearer {SECRET}")]);
        assert_eq!(header(head, "x-both"), [format!("{SECRET},{SECRET}")]);
        let basic = BASE64.encode(format!("x-access-token:{SECRET}"));
        assert_eq!(header(head, "proxy-authorization"), [format!("Basic {basic}")]);
        assert_eq!(header(head, "accept"), ["*/*"]);
        assert!(head.head_len >= crate::http1::forward_request_head(head, true, "v").len());
        // The original is untouched: it is what the exchange frames and logs.
        assert!(original.target.contains("SANDBOX_EGRESS_PLACEHOLDER_gh"));
    }

    #[test]
    fn basic_credentials_keep_their_scheme_spelling_and_user() {
        let credentials = credentials(&[("git", None)]);
        let basic = BASE64.encode("me:SANDBOX_EGRESS_PLACEHOLDER_git");
        let rewritten =
            applied(&credentials, &request("/r.git/info/refs", &format!("authorization: basic {basic}\r\n")), "git");
        let value = header(rewritten.head(), "authorization")[0].to_owned();
        let (scheme, token) = value.split_once(' ').unwrap();
        assert_eq!(scheme, "basic");
        assert_eq!(BASE64.decode(token).unwrap(), format!("me:{SECRET}").as_bytes());
    }

    #[test]
    fn injection_replaces_what_the_sandbox_sent() {
        let bearer = Inject::Header { name: "Authorization".into(), prefix: "Bearer ".into(), suffix: String::new() };
        let credentials = credentials(&[
            ("bearer", Some(bearer)),
            ("basic", Some(Inject::Basic { user: "x-access-token".into() })),
            ("query", Some(Inject::Query { name: "api key".into() })),
        ]);
        let sent =
            request("/x?api+key=wrong&b=2&api%20key=again", "authorization: Bearer wrong\r\nAuthorization: x\r\n");
        let rewritten = applied(&credentials, &sent, "bearer");
        assert_eq!(header(rewritten.head(), "authorization"), [format!("Bearer {SECRET}")]);
        let rewritten = applied(&credentials, &request("/x", ""), "basic");
        let basic = BASE64.encode(format!("x-access-token:{SECRET}"));
        assert_eq!(header(rewritten.head(), "authorization"), [format!("Basic {basic}")]);
        let rewritten = applied(&credentials, &sent, "query");
        assert_eq!(rewritten.head().target, "/x?b=2&api%20key=tok%2Fen%2B1%20x");
        assert_eq!(header(rewritten.head(), "authorization"), ["Bearer wrong", "x"], "only the query is injected");
        let rewritten = applied(&credentials, &request("/x", ""), "query");
        assert_eq!(rewritten.head().target, "/x?api%20key=tok%2Fen%2B1%20x");
    }

    #[test]
    fn nothing_to_apply_forwards_the_request_as_it_is() {
        let credentials = credentials(&[("gh", None)]);
        let plain = request("/x", "Authorization: Bearer mine\r\n");
        assert!(credentials.apply(&plain, Some("gh"), "api.test", true).unwrap().is_none());
        assert!(credentials.apply(&plain, None, "api.test", true).unwrap().is_none());
        assert!(credentials.apply(&plain, Some("gh"), "api.test", false).unwrap().is_none());
    }

    #[test]
    fn placeholders_where_their_provider_is_not_bound_are_refused() {
        let credentials = credentials(&[("gh", None), ("other", None)]);
        let sent = request("/x", "Authorization: Bearer SANDBOX_EGRESS_PLACEHOLDER_gh\r\n");
        for (bound, tls, reason) in [
            (None, true, "api.test is bound to no credential provider"),
            (Some("other"), true, "api.test is bound to credential provider 'other'"),
            (Some("gh"), false, "only sent over TLS"),
        ] {
            let refusal = credentials.apply(&sent, bound, "api.test", tls).err().expect("refused");
            assert_eq!((refusal.status, refusal.kind, refusal.provider.as_str()), (403, "credential_not_bound", "gh"));
            assert_eq!(
                refusal.detail,
                "credential placeholder of provider 'gh' in header Authorization, sent to api.test"
            );
            assert!(refusal.reason.contains(reason), "{bound:?}: {}", refusal.reason);
        }
        // A placeholder of another provider next to the bound one's.
        let both = request("/SANDBOX_EGRESS_PLACEHOLDER_other", "X: SANDBOX_EGRESS_PLACEHOLDER_gh\r\n");
        let refusal = credentials.apply(&both, Some("gh"), "api.test", true).err().unwrap();
        assert_eq!((refusal.provider.as_str(), refusal.status), ("other", 403));
        let refusal = check_unbound(&sent, "h.test", "plain HTTP").err().unwrap();
        assert_eq!((refusal.kind, refusal.reason.as_str()), ("credential_not_bound", "plain HTTP"));
        assert!(check_unbound(&request("/x", ""), "h.test", "plain HTTP").is_ok());
    }

    #[test]
    fn a_placeholder_that_cannot_be_replaced_fails_closed() {
        let credentials = credentials(&[("gh", None)]);
        for sent in
            [request("/x?t=%53ANDBOX_EGRESS_PLACEHOLDER_gh", ""), request("/x", "SANDBOX_EGRESS_PLACEHOLDER_gh: 1\r\n")]
        {
            let refusal = credentials.apply(&sent, Some("gh"), "api.test", true).err().expect("refused");
            assert_eq!((refusal.status, refusal.kind), (502, "credential_unavailable"));
            assert!(refusal.reason.contains("cannot be replaced there"), "{}", refusal.reason);
        }
        let sent = request("/x", "X: SANDBOX_EGRESS_PLACEHOLDER_absent\r\n");
        let refusal = credentials.apply(&sent, Some("absent"), "api.test", true).err().unwrap();
        assert_eq!(
            (refusal.status, refusal.reason.as_str()),
            (502, "no credential provider 'absent' is configured (--credentials)")
        );
    }

    #[test]
    fn an_unreadable_secret_file_fails_closed_without_quoting_anything() {
        let dir = std::env::temp_dir().join(format!("se-unit-{}-unreadable", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "file-secret").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let file = super::super::source::SecretFile::open(&path).unwrap();
        let provider = Provider { name: "f".into(), secret: SecretSource::File(file), inject: None };
        let credentials = Credentials { providers: [("f".to_owned(), provider)].into() };
        std::fs::remove_file(&path).unwrap();
        let sent = request("/x", "Authorization: Bearer SANDBOX_EGRESS_PLACEHOLDER_f\r\n");
        let refusal = credentials.apply(&sent, Some("f"), "api.test", true).err().unwrap();
        assert_eq!((refusal.status, refusal.kind), (502, "credential_unavailable"));
        assert!(
            refusal.reason.starts_with(&format!("cannot read credential file {}", path.display())),
            "{}",
            refusal.reason
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_placeholder_in_the_first_bytes_of_a_stream_is_refused() {
        let refusal = check_stream(b"\x00\x01SANDBOX_EGRESS_PLACEHOLDER_gh\n", "10.0.0.1", "opaque").err().unwrap();
        assert_eq!((refusal.status, refusal.provider.as_str()), (403, "gh"));
        assert_eq!(
            refusal.detail,
            "credential placeholder of provider 'gh' in the first bytes of the stream (opaque), sent to 10.0.0.1"
        );
        assert!(check_stream(b"SSH-2.0-OpenSSH\r\n", "10.0.0.1", "opaque").is_ok());
    }
}
