//! An HTTP/2 request as the request decision reads it (the HTTP/1 head it
//! means: method, target, `:authority`, fields), and the head the decision
//! allowed back as an HTTP/2 request to the origin.

use http::{header::HeaderName, HeaderValue, Method, Request, Uri};

use crate::{
    http1::{RequestHead, TargetForm},
    wire::host::Authority,
};

/// Fields HTTP/2 forbids (RFC 9113 §8.2.2): never forwarded. `te` is
/// kept when it is `trailers`, which gRPC needs.
const CONNECTION_SPECIFIC: [&str; 5] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"];

/// The HTTP/1 head an HTTP/2 request stands for. `:authority` (or, without
/// it, `host`) names where it goes; the target is `:path`, or the
/// authority for CONNECT.
pub fn request_head(parts: &http::request::Parts) -> Result<RequestHead, String> {
    let host_field = parts.headers.get(http::header::HOST).map(HeaderValue::as_bytes);
    let authority = match parts.uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => host_field,
    };
    let authority =
        authority.map(Authority::parse).transpose().map_err(|reason| format!("invalid :authority: {reason}"))?;
    let (target, form) = if parts.method == Method::CONNECT {
        (
            parts.uri.authority().map(|authority| authority.as_str().to_owned()).unwrap_or_default(),
            TargetForm::Authority,
        )
    } else {
        let target = parts.uri.path_and_query().map(|path| path.as_str()).unwrap_or_default();
        let form = if target == "*" { TargetForm::Asterisk } else { TargetForm::Origin };
        (target.to_owned(), form)
    };
    if form == TargetForm::Origin && !target.starts_with('/') {
        return Err(format!("invalid :path {:?}", target.escape_debug().to_string()));
    }
    let headers =
        parts.headers.iter().map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())).collect();
    Ok(RequestHead {
        method: parts.method.as_str().to_owned(),
        target,
        version: 1,
        headers,
        head_len: 0,
        authority,
        form,
    })
}

/// The request to send the origin for an allowed `head` (credentials in
/// it), to `authority` over TLS: connection-specific fields and `host`
/// dropped (`:authority` says it), `te` only as `trailers`. `secret`: the
/// head carries a credential, so no field of it enters HPACK's tables.
pub fn forward_request(head: &RequestHead, authority: &str, secret: bool) -> Result<Request<()>, String> {
    let uri = Uri::builder()
        .scheme("https")
        .authority(authority)
        .path_and_query(head.target.as_str())
        .build()
        .map_err(|error| format!("cannot forward {}: {error}", head.target.escape_debug()))?;
    let method = Method::from_bytes(head.method.as_bytes()).map_err(|error| error.to_string())?;
    let mut request = Request::builder().method(method).uri(uri).body(()).map_err(|error| error.to_string())?;
    let fields = request.headers_mut();
    for (name, value) in &head.headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
        let forbidden = CONNECTION_SPECIFIC.contains(&name.as_str()) || name == http::header::HOST;
        if forbidden || (name == http::header::TE && !value.eq_ignore_ascii_case(b"trailers")) {
            continue;
        }
        // HTTP/2 allows `te` only as `trailers`, spelled so (the h2 crate refuses `Trailers`).
        let value: &[u8] = if name == http::header::TE { b"trailers" } else { value };
        let mut value = HeaderValue::from_bytes(value).map_err(|_| format!("field {name} has an invalid value"))?;
        value.set_sensitive(secret);
        fields.append(name, value);
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: http::request::Builder) -> http::request::Parts {
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_stream_maps_to_the_head_the_decision_reads_and_back() {
        let request = Request::builder()
            .method("POST")
            .uri("https://api.example.test:443/demo.Repo/Get?x=1")
            .header("content-type", "application/grpc")
            .header("te", "Trailers")
            .header("authorization", "Bearer p");
        let head = request_head(&parts(request)).unwrap();
        assert_eq!(
            (head.method.as_str(), head.target.as_str(), head.form),
            ("POST", "/demo.Repo/Get?x=1", TargetForm::Origin)
        );
        assert_eq!(head.authority.as_ref().unwrap().to_string(), "api.example.test:443");
        assert_eq!(head.headers[0], ("content-type".to_owned(), b"application/grpc".to_vec()));

        let forwarded = forward_request(&head, "api.example.test", true).unwrap();
        assert_eq!(forwarded.uri().to_string(), "https://api.example.test/demo.Repo/Get?x=1");
        assert_eq!(forwarded.headers().len(), 3);
        assert_eq!(forwarded.headers()["te"], "trailers", "the only te HTTP/2 allows, lower-cased");
        assert!(forwarded.headers().values().all(HeaderValue::is_sensitive));
        assert!(!forward_request(&head, "api.example.test", false).unwrap().headers()["authorization"].is_sensitive());
    }

    #[test]
    fn connection_specific_fields_and_host_are_not_forwarded() {
        let request = Request::builder()
            .uri("/a")
            .header("host", "api.example.test")
            .header("connection", "keep-alive")
            .header("keep-alive", "5")
            .header("proxy-connection", "x")
            .header("transfer-encoding", "chunked")
            .header("upgrade", "h2c")
            .header("te", "gzip")
            .header("accept", "*/*");
        let head = request_head(&parts(request)).unwrap();
        assert_eq!(head.authority.as_ref().unwrap().to_string(), "api.example.test", "host stands for :authority");
        let forwarded = forward_request(&head, "api.example.test", false).unwrap();
        let names: Vec<&str> = forwarded.headers().keys().map(|name| name.as_str()).collect();
        assert_eq!(names, ["accept"]);
    }

    #[test]
    fn connect_is_authority_form_and_a_bad_authority_is_refused() {
        let connect = request_head(&parts(Request::builder().method("CONNECT").uri("other.test:443"))).unwrap();
        assert_eq!((connect.form, connect.target.as_str()), (TargetForm::Authority, "other.test:443"));
        let asterisk = request_head(&parts(Request::builder().method("OPTIONS").uri("*"))).unwrap();
        assert_eq!(asterisk.form, TargetForm::Asterisk);
        let userinfo = request_head(&parts(Request::builder().uri("https://u@api.example.test/"))).unwrap_err();
        assert!(userinfo.starts_with("invalid :authority"), "{userinfo}");
    }
}
