//! The HTTP/2 request mapping the agent owns: a stream's request (method,
//! `:authority`, `:path`, fields) as the request decision reads it, its
//! canonical path, its gRPC call, and the request forwarded to the origin.
//!
//! Input: a control byte (bit 0: the forwarded request carries a
//! credential), then lines: the method, the authority, the path, then
//! `name: value` fields. Inputs the `http` crate refuses (as the h2 crate
//! would) are skipped. Asserts: an accepted request keeps its method and
//! target, an origin-form target starts with `/`; the forwarded request has
//! no connection-specific field nor `host`, `te` only as `trailers` (in
//! lower case, whatever the client's case), the
//! target and method given, and maps back to the same head less the fields
//! dropped; a gRPC call names the canonical path's two segments.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sandbox_egress::{
    http1::TargetForm,
    l7::{self, grpc, h2},
    policy::{Inspection, Policy, Request},
};

const POLICY: &str = r#"
version: 1
network_policies:
  fuzz:
    endpoints:
      - { host: grpc.test, port: 443, protocol: rest, rules: [{ allow: { method: POST, path: "/demo.Repo/*" } }] }
    binaries: [{ path: /usr/bin/curl }]
"#;

static INSPECTION: LazyLock<Inspection> = LazyLock::new(|| {
    let policy = Policy::from_yaml(POLICY).expect("the fuzz policy loads");
    let request = Request {
        host: Some("grpc.test"),
        ip: None,
        port: 443,
        binary: Some(std::path::Path::new("/usr/bin/curl")),
        ancestors: &[],
        uid: 0,
        cgroup_id: 1,
    };
    policy.evaluate(&request).expect("evaluates").inspect.expect("inspected")
});

const DROPPED: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"];

fuzz_target!(|input: &[u8]| {
    let Some((&control, text)) = input.split_first() else { return };
    let mut lines = text.split(|&byte| byte == b'\n');
    let (Some(method), Some(authority), Some(path)) = (lines.next(), lines.next(), lines.next()) else { return };
    let Ok(uri) = http::Uri::builder().scheme("https").authority(authority).path_and_query(path).build() else {
        return;
    };
    let mut builder = http::Request::builder().method(method).uri(uri);
    for line in lines {
        let Some(colon) = line.iter().position(|&byte| byte == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else { return };
    let (parts, ()) = request.into_parts();
    let Ok(head) = h2::request_head(&parts) else { return };
    assert_eq!(head.method, parts.method.as_str());
    if head.form == TargetForm::Origin {
        assert!(head.target.starts_with('/'), "origin-form target {:?}", head.target);
        assert_eq!(head.target, parts.uri.path_and_query().unwrap().as_str());
    }
    if let Ok((canonical, _, _)) = l7::classify_request(&INSPECTION, &head, b"") {
        assert!(canonical.path.starts_with('/'), "canonical path {:?}", canonical.path);
        if let Some(call) = grpc::call(&head, &canonical.path) {
            assert!(!call.service.is_empty() && !call.method.is_empty());
            assert_eq!(canonical.path.matches('/').count(), 2, "{:?} is not /service/method", canonical.path);
        }
    }
    let Ok(forwarded) = h2::forward_request(&head, authority_text(authority), control & 1 != 0) else { return };
    assert_eq!(forwarded.method().as_str(), head.method);
    assert_eq!(forwarded.uri().path_and_query().map(|path| path.as_str()), Some(head.target.as_str()));
    for (name, value) in forwarded.headers() {
        assert!(!DROPPED.contains(&name.as_str()), "{name} was forwarded");
        assert!(name != "te" || value == "trailers", "te: {value:?} was forwarded");
        assert_eq!(value.is_sensitive(), control & 1 != 0);
    }
    let (back, ()) = forwarded.into_parts();
    let again = h2::request_head(&back).expect("a forwarded request maps back");
    let kept: Vec<(String, Vec<u8>)> = head
        .headers
        .iter()
        .filter(|(name, value)| {
            !DROPPED.contains(&name.as_str()) && (name != "te" || value.eq_ignore_ascii_case(b"trailers"))
        })
        .map(|(name, value)| (name.clone(), if name == "te" { b"trailers".to_vec() } else { value.clone() }))
        .collect();
    assert_eq!(again.headers, kept);
    assert_eq!((again.method, again.target), (head.method, head.target));
});

fn authority_text(authority: &[u8]) -> &str {
    std::str::from_utf8(authority).expect("the http crate accepted it as an authority")
}
