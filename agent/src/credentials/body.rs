//! `request_body_credential_rewrite`: the bound provider's placeholders in a
//! request body the agent read whole, replaced by its secret. JSON and
//! text bodies are rewritten in place (a JSON string gets the secret
//! escaped as JSON requires), form bodies field by field. A placeholder that
//! cannot be replaced fails closed: in a compressed body, in a body that is
//! not UTF-8, in a form field's name, of another provider, or left over.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use zeroize::Zeroizing;

use super::{
    placeholder::{names_in, placeholder, Found},
    rewrite::Refusal,
    Credentials,
};
use crate::http1::{field_values, RequestHead};

/// The most of a body the agent reads to rewrite it, as OpenShell.
pub const MAX_REWRITTEN_BODY: usize = 256 * 1024;

/// `application/x-www-form-urlencoded` values: unreserved characters and
/// `*` stay, a space becomes `+` (done apart), the rest percent-encoded.
const FORM_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'*').remove(b' ');

/// How placeholders are replaced in a text.
#[derive(Clone, Copy)]
enum Form {
    /// Inside JSON strings: the secret escaped as JSON requires.
    Json,
    /// Each `application/x-www-form-urlencoded` value decoded, replaced, encoded again.
    Urlencoded,
    Text,
}

impl Credentials {
    /// `body` with `bound`'s placeholders replaced, for an endpoint with
    /// `request_body_credential_rewrite` (JSON, form and text bodies, by
    /// `head`'s Content-Type). A body without placeholders comes back as it
    /// is.
    pub fn rewrite_body(
        &self,
        head: &RequestHead,
        body: &[u8],
        bound: Option<&str>,
        host: &str,
        tls: bool,
    ) -> Result<Zeroizing<Vec<u8>>, Refusal> {
        let coding = field_values(&head.headers, "content-encoding")
            .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
        if let (Some(name), true, Some(coding)) = (bound, tls, coding) {
            // A placeholder inside cannot be seen, let alone replaced.
            let reason = format!(
                "the body is {}-encoded: placeholders in it cannot be replaced (send it uncompressed)",
                String::from_utf8_lossy(coding).escape_debug()
            );
            return Err(Refusal::unavailable(name, host, reason));
        }
        let Some(name) = self.bound_with_placeholders(body, bound, host, tls, "the request body")? else {
            return Ok(Zeroizing::new(body.to_vec()));
        };
        let Ok(text) = std::str::from_utf8(body) else {
            return Err(Refusal::unavailable(name, host, "a body with a placeholder must be UTF-8 text".into()));
        };
        let form = match media_type(head).as_deref() {
            Some("application/json") => Form::Json,
            Some("application/x-www-form-urlencoded") => Form::Urlencoded,
            Some(media) if media.starts_with("text/") => Form::Text,
            _ => {
                let reason = "placeholders are replaced in JSON, form and text bodies only (Content-Type)".to_owned();
                return Err(Refusal::unavailable(name, host, reason));
            }
        };
        let rewritten = self.replace(text, form, name, host)?;
        Ok(Zeroizing::new(rewritten.as_bytes().to_vec()))
    }

    /// A WebSocket client text message with `bound`'s placeholders replaced
    /// (`websocket_credential_rewrite`): inside JSON strings when the
    /// message is JSON, as text otherwise.
    pub fn rewrite_text(
        &self,
        text: &str,
        bound: Option<&str>,
        host: &str,
        tls: bool,
    ) -> Result<Zeroizing<String>, Refusal> {
        let Some(name) = self.bound_with_placeholders(text.as_bytes(), bound, host, tls, "a WebSocket message")? else {
            return Ok(Zeroizing::new(text.to_owned()));
        };
        let form = if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() { Form::Json } else { Form::Text };
        self.replace(text, form, name, host)
    }

    /// The provider whose placeholders `bytes` holds, `None` when it holds
    /// none; refused when one is of another provider, or of any with none
    /// bound or without TLS to the origin.
    fn bound_with_placeholders<'a>(
        &self,
        bytes: &[u8],
        bound: Option<&'a str>,
        host: &str,
        tls: bool,
        place: &str,
    ) -> Result<Option<&'a str>, Refusal> {
        let found: Vec<Found> =
            names_in(bytes).into_iter().map(|provider| Found { provider, place: place.to_owned() }).collect();
        let name = match bound {
            Some(_) if !tls => {
                let reason = "credentials are only sent over TLS to the origin, and this request is plain HTTP";
                return found.first().map_or(Ok(None), |found| Err(Refusal::not_bound(found, host, reason.into())));
            }
            Some(name) => name,
            None => {
                let reason = format!("{host} is bound to no credential provider");
                return found.first().map_or(Ok(None), |found| Err(Refusal::not_bound(found, host, reason)));
            }
        };
        if let Some(other) = found.iter().find(|found| found.provider != name) {
            return Err(Refusal::not_bound(other, host, format!("{host} is bound to credential provider '{name}'")));
        }
        Ok((!found.is_empty()).then_some(name))
    }

    /// `text` with provider `name`'s placeholder replaced as `form` says;
    /// one left over fails closed.
    fn replace(&self, text: &str, form: Form, name: &str, host: &str) -> Result<Zeroizing<String>, Refusal> {
        let provider = self.provider(name).ok_or_else(|| {
            Refusal::unavailable(name, host, format!("no credential provider '{name}' is configured (--credentials)"))
        })?;
        let secret = provider.secret().map_err(|reason| Refusal::unavailable(name, host, reason))?;
        let marker = placeholder(name);
        let rewritten = match form {
            Form::Json => {
                let escaped = Zeroizing::new(serde_json::to_string(secret.expose()).unwrap_or_default());
                // Inside a JSON string: the secret as JSON escapes it, without its quotes.
                let inner = &escaped[1..escaped.len().saturating_sub(1)];
                Zeroizing::new(text.replace(&marker, inner))
            }
            Form::Urlencoded => rewrite_form(text, &marker, secret.expose())
                .map_err(|reason| Refusal::unavailable(name, host, reason))?,
            Form::Text => Zeroizing::new(text.replace(&marker, secret.expose())),
        };
        if !names_in(rewritten.as_bytes()).is_empty() {
            let reason = "a placeholder could not be replaced".to_owned();
            return Err(Refusal::unavailable(name, host, reason));
        }
        Ok(rewritten)
    }
}

/// The body's media type, lower-cased, without parameters.
fn media_type(head: &RequestHead) -> Option<String> {
    let value = field_values(&head.headers, "content-type").next()?;
    let media = value.split(|&b| b == b';').next()?.trim_ascii();
    Some(String::from_utf8_lossy(media).to_ascii_lowercase())
}

/// A form body: each value decoded, the placeholder replaced, encoded
/// again; other fields untouched. A placeholder in a name is refused.
fn rewrite_form(text: &str, marker: &str, secret: &str) -> Result<Zeroizing<String>, String> {
    let mut fields = Vec::new();
    for field in text.split('&') {
        let (name, value) = field.split_once('=').unwrap_or((field, ""));
        let decode = |part: &str| percent_decode_str(&part.replace('+', " ")).decode_utf8_lossy().into_owned();
        if decode(name).contains(marker) {
            return Err("a placeholder in a form field's name cannot be replaced".into());
        }
        let decoded = Zeroizing::new(decode(value));
        if !decoded.contains(marker) {
            fields.push(Zeroizing::new(field.to_owned()));
            continue;
        }
        let replaced = Zeroizing::new(decoded.replace(marker, secret));
        let encoded = utf8_percent_encode(&replaced, FORM_VALUE).to_string().replace(' ', "+");
        fields.push(Zeroizing::new(format!("{name}={encoded}")));
    }
    let joined: Vec<&str> = fields.iter().map(|field| field.as_str()).collect();
    Ok(Zeroizing::new(joined.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_decoded_replaced_and_encoded_again() {
        let marker = placeholder("gh");
        let body = format!("a=1&token=x%20{marker}&c=d+e");
        let rewritten = rewrite_form(&body, &marker, "s3cr&t =").unwrap();
        assert_eq!(rewritten.as_str(), "a=1&token=x+s3cr%26t+%3D&c=d+e");
        assert!(rewrite_form(&format!("{marker}=1"), &marker, "s").is_err());
    }
}
