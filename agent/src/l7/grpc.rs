//! gRPC in its own terms: a call is `POST /package.Service/Method` with
//! `content-type: application/grpc`, decided as that request; a refusal is
//! a trailers-only response (HTTP 200, `grpc-status`, `grpc-message`), so
//! the client library prints the reason instead of a transport error.

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use crate::{conn::refuse::Response, http1::RequestHead};

/// gRPC's PERMISSION_DENIED: what a policy or credential refusal becomes.
pub const PERMISSION_DENIED: u32 = 7;
/// gRPC's UNAVAILABLE: the origin cannot be reached, or cannot speak HTTP/2.
pub const UNAVAILABLE: u32 = 14;

/// `grpc-message` is percent-encoded outside visible ASCII (and `%`
/// itself), per the gRPC over HTTP/2 spec.
const MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// The call a gRPC request makes, named from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    /// `package.Service`.
    pub service: String,
    pub method: String,
}

/// Whether a `content-type` is gRPC's (`application/grpc`, `+proto`,
/// `+json`...). gRPC-Web (`application/grpc-web`) is not: it works over
/// HTTP/1.1.
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    value.get(..GRPC.len()).is_some_and(|start| start.eq_ignore_ascii_case(GRPC))
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// Whether a request is a gRPC call, by its `content-type`.
pub fn is_grpc(head: &RequestHead) -> bool {
    head.headers.iter().any(|(name, value)| name.eq_ignore_ascii_case("content-type") && is_grpc_content_type(value))
}

/// The call of a gRPC request whose canonical path is `path`
/// (`/package.Service/Method`); `None` when it is not a gRPC request or
/// its path names no method. Names are the sandbox's: escaped when logged.
pub fn call(head: &RequestHead, path: &str) -> Option<GrpcCall> {
    if !is_grpc(head) {
        return None;
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some(GrpcCall { service: service.escape_debug().to_string(), method: method.escape_debug().to_string() })
}

/// The gRPC status a refusal's HTTP status stands for.
pub fn status_for(http_status: u16) -> u32 {
    match http_status {
        400 => 3,  // INVALID_ARGUMENT
        401 => 16, // UNAUTHENTICATED
        403 => PERMISSION_DENIED,
        404 => 12,      // UNIMPLEMENTED
        413 | 429 => 8, // RESOURCE_EXHAUSTED
        502 | 503 => UNAVAILABLE,
        504 => 4, // DEADLINE_EXCEEDED
        _ => 13,  // INTERNAL
    }
}

/// A trailers-only response: one HEADERS frame ending the stream.
pub fn trailers_only(status: u32, message: &str) -> Response {
    Response {
        status: 200,
        headers: vec![
            ("content-type", "application/grpc".to_owned()),
            ("grpc-status", status.to_string()),
            ("grpc-message", utf8_percent_encode(message, MESSAGE).to_string()),
        ],
        body: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::TargetForm;

    fn head(content_type: &str) -> RequestHead {
        RequestHead {
            method: "POST".into(),
            target: "/demo.Repo/Get".into(),
            version: 1,
            headers: vec![("content-type".into(), content_type.as_bytes().to_vec())],
            head_len: 0,
            authority: None,
            form: TargetForm::Origin,
        }
    }

    #[test]
    fn grpc_content_types_but_not_grpc_web() {
        for grpc in ["application/grpc", "application/grpc+proto", "Application/GRPC+json", "application/grpc;x=1"] {
            assert!(is_grpc_content_type(grpc.as_bytes()), "{grpc}");
        }
        for other in ["application/grpc-web", "application/grpc-web+proto", "application/json", "application/grp", ""] {
            assert!(!is_grpc_content_type(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn a_call_is_named_by_its_two_path_segments() {
        let call = call(&head("application/grpc"), "/demo.Repo/Get").unwrap();
        assert_eq!((call.service.as_str(), call.method.as_str()), ("demo.Repo", "Get"));
        for path in ["/demo.Repo", "/demo.Repo/", "//Get", "/a/b/c", "demo.Repo/Get"] {
            assert_eq!(super::call(&head("application/grpc"), path), None, "{path}");
        }
        assert_eq!(super::call(&head("application/json"), "/demo.Repo/Get"), None);
        let escaped = super::call(&head("application/grpc"), "/demo\n.Repo/G\"et").unwrap();
        assert_eq!((escaped.service.as_str(), escaped.method.as_str()), ("demo\\n.Repo", "G\\\"et"));
    }

    #[test]
    fn a_refusal_is_trailers_only_with_a_percent_encoded_message() {
        let response = trailers_only(status_for(403), "policy 'dé%mo'\n");
        assert_eq!(response.status, 200);
        assert!(response.body.is_empty());
        assert_eq!(
            response.headers,
            [
                ("content-type", "application/grpc".to_owned()),
                ("grpc-status", "7".to_owned()),
                ("grpc-message", "policy 'd%C3%A9%25mo'%0A".to_owned()),
            ]
        );
        let statuses: Vec<u32> = [400, 413, 502, 504, 500].into_iter().map(status_for).collect();
        assert_eq!(statuses, [3, 8, UNAVAILABLE, 4, 13]);
    }
}
