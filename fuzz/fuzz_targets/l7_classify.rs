//! The L7 rooms that read request bodies: JSON-RPC, MCP and GraphQL
//! (documents parsed by apollo-parser), classified as the live session
//! classifies them, then each call decided by the policy.
//!
//! Input: a control byte picking the endpoint (its protocol), the method,
//! an SSE `Accept` and whether Rego decides the calls (it is slow next to
//! the parsers, so only such inputs reach it), then the body. Asserts:
//! classification is deterministic, never panics, refuses a JSON-RPC body
//! that is not JSON, and every GraphQL operation's root fields are sorted
//! and unique; each classified call gets a decision from Rego.

#![no_main]

use std::{path::Path, sync::LazyLock};

use libfuzzer_sys::fuzz_target;
use sandbox_egress::{
    http1::{RequestHead, TargetForm},
    l7,
    policy::{HttpRequest, Inspection, Message, Policy, Request},
};

const POLICY: &str = r#"
version: 1
network_policies:
  fuzz:
    endpoints:
      - { host: rpc.test, port: 443, path: /rpc, protocol: json-rpc, enforcement: enforce,
          rules: [{ allow: { method: initialize } }], deny_rules: [{ method: "tools/delete" }] }
      - { host: rpc.test, port: 443, path: /mcp, protocol: mcp, enforcement: enforce,
          rules: [{ allow: { method: tools/call, tool: "search*" } }, { allow: { method: tools/list } }] }
      - { host: rpc.test, port: 443, path: /graphql, protocol: graphql, enforcement: audit,
          persisted_queries: allow_registered,
          graphql_persisted_queries: { abc: { operation_type: query, fields: [viewer] } },
          rules: [{ allow: { operation_type: query, fields: ["view*", __typename] } }],
          deny_rules: [{ operation_type: mutation, fields: [delete*] }] }
    binaries: [{ path: /usr/bin/curl }]
"#;

static POLICY_LOADED: LazyLock<(Policy, Inspection)> = LazyLock::new(|| {
    let policy = Policy::from_yaml(POLICY).expect("the fuzz policy loads");
    let inspection = policy.evaluate(&request()).expect("evaluates").inspect.expect("inspected");
    (policy, inspection)
});

fn request() -> Request<'static> {
    Request {
        host: Some("rpc.test"),
        ip: None,
        port: 443,
        binary: Some(Path::new("/usr/bin/curl")),
        ancestors: &[],
        uid: 0,
        cgroup_id: 1,
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&control, body)) = input.split_first() else { return };
    let path = ["/rpc", "/mcp", "/graphql", "/graphql?query=%7Bviewer%7D"][usize::from(control & 3)];
    let method = ["POST", "GET", "DELETE", "PUT"][usize::from((control >> 2) & 3)];
    let mut headers = vec![("Content-Length".to_owned(), body.len().to_string().into_bytes())];
    if control & 0x10 != 0 {
        headers.push(("Accept".to_owned(), b"application/json, text/event-stream".to_vec()));
    }
    let head = RequestHead {
        method: method.into(),
        target: path.into(),
        version: 1,
        headers,
        head_len: 0,
        authority: None,
        form: TargetForm::Origin,
    };
    let (policy, inspection) = &*POLICY_LOADED;
    let first = l7::classify_request(inspection, &head, body);
    let again = l7::classify_request(inspection, &head, body);
    assert_eq!(first.is_ok(), again.is_ok(), "classification is not deterministic");
    let Ok((canonical, selected, classified)) = first else {
        return;
    };
    let messages: Vec<&Message> = classified.calls.iter().map(|call| &call.message).collect();
    let repeated: Vec<&Message> = again.as_ref().unwrap().2.calls.iter().map(|call| &call.message).collect();
    assert_eq!(messages, repeated, "classification is not deterministic");
    assert!(!classified.calls.is_empty(), "a classified request decides at least one call");
    if selected.protocol == "json-rpc" && method == "POST" {
        assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok(), "a body that is not JSON was classified");
    }
    for message in messages {
        if let Message::GraphQl(operation) = message {
            assert!(operation.fields.windows(2).all(|pair| pair[0] < pair[1]), "fields {:?}", operation.fields);
        }
        if control & 0x20 == 0 {
            continue;
        }
        let http = HttpRequest { method, path: &canonical.path, query: &canonical.query, message, via_gate: false };
        policy.evaluate_request(&request(), &http).expect("Rego decides every classified call");
    }
});
