//! Requests through `serve` / `serve_connection` to the fake provider.

use std::{collections::BTreeSet, time::Instant};

use serde_json::json;

use super::{super::respond::sse_error_event, *};
use crate::{http1::parse_request_head, http1::BodyFraming, wire::Parse};

const CHAT: &str = "/v1/chat/completions";

/// Headers a client may send that must never reach the provider.
const CLIENT_CREDENTIALS: &str = "Authorization: Bearer client-secret\r\nX-Api-Key: client-key\r\n\
     Cookie: session=1\r\nOpenAI-Organization: org-other\r\nX-Custom: 1\r\n";

#[tokio::test]
async fn openai_request_gets_the_credential_the_model_and_the_prefix() {
    let world = World::start(ROUTED_OPENAI).await;
    let body = r#"{"model":"whatever-the-client-says","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let headers = format!("{CLIENT_CREDENTIALS}User-Agent: test-sdk/1.0\r\nAccept: application/json\r\n");
    let (response, log) = world.exchange(&post(&format!("{CHAT}?trace=1"), &headers, body)).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.json()["model"], "gpt-routed");
    assert_eq!(response.header("x-request-id").as_deref(), Some("req-1"), "end-to-end headers pass");
    assert_eq!(response.header("keep-alive"), None, "hop-by-hop headers do not");
    let seen = world.fake.seen();
    let [request] = seen.as_slice() else { panic!("{seen:?}") };
    assert_eq!(request.target, "/api/v1/chat/completions?trace=1");
    assert_eq!(request.header("authorization"), Some(format!("Bearer {OPENAI_KEY}").as_str()));
    assert_eq!(request.header("host"), Some(format!("127.0.0.1:{}", world.fake.address.port()).as_str()));
    assert_eq!(request.header("openai-project"), Some("proj_test"), "configured header");
    assert_eq!(request.header("user-agent"), Some("test-sdk/1.0"));
    let names: BTreeSet<String> = request.header_names().into_iter().collect();
    let expected =
        ["host", "authorization", "openai-project", "user-agent", "accept", "content-type", "content-length"];
    assert_eq!(names, expected.iter().map(|name| name.to_string()).collect(), "allowlisted headers only");
    assert_eq!(
        request.json(),
        json!({"model": "gpt-routed", "messages": [{"role": "user", "content": "hi"}], "stream": false})
    );
    assert_eq!(request.header("content-length"), Some(request.body.len().to_string().as_str()));

    assert_eq!((log.requests, log.last_status), (1, Some(200)));
    assert_eq!((log.provider.as_deref(), log.model.as_deref()), (Some("openai"), Some("gpt-routed")));
    assert_eq!(log.endpoint, Some("POST /v1/chat/completions"));
    assert!(log.bytes_up > request.body.len() as u64 && log.bytes_down > response.body.len() as u64);
    assert_eq!(log.error, None);
}

#[tokio::test]
async fn anthropic_request_gets_an_api_key_and_a_default_version() {
    let world = World::start(Setup { route: Some(("claude", "claude-routed")), ..ROUTED_OPENAI }).await;
    let (response, _) = world.exchange(&post("/v1/messages", CLIENT_CREDENTIALS, r#"{"max_tokens":5}"#)).await;
    assert_eq!(response.status(), 200);
    let (response, _) = world
        .exchange(&post(
            "/v1/messages",
            "anthropic-version: 2024-01-01\r\nanthropic-beta: tools-1\r\n",
            r#"{"model":"x","max_tokens":5}"#,
        ))
        .await;
    assert_eq!(response.status(), 200);

    let seen = world.fake.seen();
    let [defaulted, versioned] = seen.as_slice() else { panic!("{seen:?}") };
    for request in [defaulted, versioned] {
        assert_eq!(request.target, "/v1/messages");
        assert_eq!(request.header("x-api-key"), Some(ANTHROPIC_KEY));
        assert_eq!(request.header("authorization"), None);
        assert_eq!(request.json()["model"], "claude-routed", "model inserted or replaced");
        assert_eq!(request.header_names().iter().filter(|name| *name == "anthropic-version").count(), 1);
        assert!(!request.header_names().contains(&"cookie".to_string()));
    }
    assert_eq!(defaulted.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(versioned.header("anthropic-version"), Some("2024-01-01"), "the client's version wins");
    assert_eq!(versioned.header("anthropic-beta"), Some("tools-1"));
    assert_eq!(defaulted.header("x-custom"), None);
}

#[tokio::test]
async fn tls_provider_is_verified_with_its_ca_file() {
    let world = World::start(Setup { tls: true, ..ROUTED_OPENAI }).await;
    let (response, log) = world.exchange(&post(CHAT, "", r#"{"messages":[]}"#)).await;
    assert_eq!(response.status(), 200, "{:?}", log.error);
    let seen = world.fake.seen();
    assert_eq!(seen[0].header("authorization"), Some(format!("Bearer {OPENAI_KEY}").as_str()));
    assert_eq!(seen[0].header("host"), Some(format!("localhost:{}", world.fake.address.port()).as_str()));
    assert_eq!(seen[0].target, "/api/v1/chat/completions");
}

#[tokio::test]
async fn sse_events_reach_the_client_before_the_provider_sends_the_last() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    client.send(&post(CHAT, "", r#"{"fake":"sse","stream":true}"#)).await;
    let head = client.head().await;
    assert_eq!(head.status, 200);
    let mut source = BodySource::new(BodyFraming::Chunked);
    // The provider holds its other events back until the first one got here:
    // a relay that buffered would never deliver it.
    assert_eq!(client.piece(&mut source).await, Piece::Data(b"data: 1\n\n".to_vec()));
    world.fake.gate.notify_one();
    let mut rest = Vec::new();
    while let Piece::Data(data) = client.piece(&mut source).await {
        rest.extend(data);
    }
    assert_eq!(rest, b"data: 2\n\ndata: [DONE]\n\n");
    let log = client.finish().await;
    assert_eq!((log.last_status, log.error), (Some(200), None));
}

#[tokio::test]
async fn keep_alive_requests_share_one_provider_connection() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    client.send(&post(CHAT, "", r#"{"n":1}"#)).await;
    assert_eq!(client.response("POST").await.status(), 200);
    client.send(b"GET /v1/models HTTP/1.1\r\nHost: inference.local\r\n\r\n").await;
    let models = client.response("GET").await;
    assert_eq!(models.status(), 200);
    assert_eq!(models.json()["path"], "/api/v1/models");
    let log = client.finish().await;
    assert_eq!(log.requests, 2);
    let seen = world.fake.seen();
    assert_eq!(seen.iter().map(|request| request.connection).collect::<Vec<_>>(), [0, 0]);
    assert_eq!(world.fake.connections(), 1);
    assert!(seen[1].body.is_empty() && seen[1].header("content-length").is_none(), "GET goes without a body");
}

#[tokio::test]
async fn a_provider_connection_closed_while_idle_is_replaced() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    client.send(&post(CHAT, "", r#"{"fake":"json_then_vanish"}"#)).await;
    assert_eq!(client.response("POST").await.status(), 200);
    // Let the provider's close arrive before the next request.
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.send(&post(CHAT, "", r#"{"n":2}"#)).await;
    assert_eq!(client.response("POST").await.status(), 200);
    client.finish().await;
    assert_eq!(world.fake.connections(), 2);
    assert_eq!(world.fake.seen().len(), 2, "the second request was sent once, on the new connection");
}

#[tokio::test]
async fn chunked_request_body_is_sent_whole_with_a_length() {
    let world = World::start(ROUTED_OPENAI).await;
    let json_body = r#"{"model":"m","input":"chunked"}"#;
    let (first, second) = json_body.split_at(10);
    let raw = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: inference.local\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{first}\r\n{:x};ext=1\r\n{second}\r\n0\r\nX-Trailer: t\r\n\r\n",
        first.len(),
        second.len()
    );
    let (response, _) = world.exchange(raw.as_bytes()).await;
    assert_eq!(response.status(), 200);
    let seen = world.fake.seen();
    assert_eq!(seen[0].json(), json!({"model": "gpt-routed", "input": "chunked"}));
    assert_eq!(seen[0].header("transfer-encoding"), None);
    assert_eq!(seen[0].header("content-length"), Some(seen[0].body.len().to_string().as_str()));
}

#[tokio::test]
async fn ambiguous_framing_is_a_400_first_or_later() {
    let world = World::start(ROUTED_OPENAI).await;
    let cl_and_te = "POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nContent-Length: 2\r\n\
                     Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let (response, log) = world.exchange(cl_and_te.as_bytes()).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.header("connection").as_deref(), Some("close"));
    let (kind, message) = response.error();
    assert_eq!(kind, "bad_request");
    assert!(message.contains("both Content-Length and Transfer-Encoding"), "{message}");
    assert_eq!(log.last_status, Some(400));

    let mut client = world.connect();
    client.send(&post(CHAT, "", "{}")).await;
    assert_eq!(client.response("POST").await.status(), 200);
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}").await;
    let response = client.response("POST").await;
    assert_eq!(response.status(), 400);
    assert!(response.error().1.contains("multiple Content-Length"), "{:?}", response.error());
    assert!(client.rest().await.is_empty(), "the connection ends after the error");
    assert_eq!(world.fake.seen().len(), 1);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_before_or_while_reading() {
    let world = World::start(Setup { limits: "  max_request_body: 64\n", ..ROUTED_OPENAI }).await;
    // Declared too large: refused from the head alone, no body sent at all.
    let mut client = world.connect();
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nContent-Length: 65\r\n\r\n").await;
    let response = client.response("POST").await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.error().0, "request_too_large");
    client.finish().await;

    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(40));
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nTransfer-Encoding: chunked\r\n\r\n\
         {len:x}\r\n{big}\r\n{len:x}\r\n{big}\r\n0\r\n\r\n",
        len = big.len()
    );
    let (response, log) = world.exchange(raw.as_bytes()).await;
    assert_eq!(response.status(), 413);
    assert!(log.error.unwrap().contains("exceeds 64 bytes"));
    // Exactly at the limit is fine.
    let exact = format!("{{\"pad\":\"{}\"}}", "x".repeat(64 - 10));
    assert_eq!(exact.len(), 64);
    assert_eq!(world.exchange(&post(CHAT, "", &exact)).await.0.status(), 200);
    assert_eq!(world.fake.seen().len(), 1);
}

#[tokio::test]
async fn unknown_paths_and_other_hosts_are_403() {
    let world = World::start(ROUTED_OPENAI).await;
    for raw in [
        &b"GET /v1/files HTTP/1.1\r\nHost: inference.local\r\n\r\n"[..],
        b"DELETE /v1/models/m1 HTTP/1.1\r\nHost: inference.local\r\n\r\n",
        b"GET /v1/models/../../admin HTTP/1.1\r\nHost: inference.local\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: inference.local\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
        b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    ] {
        let mut client = world.connect();
        client.send(raw).await;
        let response = client.response("GET").await;
        assert_eq!(response.status(), 403, "{}", String::from_utf8_lossy(raw));
        assert_eq!(response.error().0, "forbidden");
        assert!(client.rest().await.is_empty(), "closed after the 403");
    }
    assert!(world.fake.seen().is_empty());
    // Absolute-form (explicit proxy) requests for inference.local are served.
    let (response, _) =
        world.exchange(b"GET http://inference.local/v1/models HTTP/1.1\r\nHost: inference.local\r\n\r\n").await;
    assert_eq!(response.status(), 200);
    assert_eq!(world.fake.seen()[0].target, "/api/v1/models");
}

#[tokio::test]
async fn a_credential_placeholder_is_refused_and_never_sent_to_the_provider() {
    let world = World::start(ROUTED_OPENAI).await;
    let headers = "User-Agent: SANDBOX_EGRESS_PLACEHOLDER_github\r\n";
    let (response, _) = world.exchange(&post(CHAT, headers, r#"{"messages":[]}"#)).await;
    assert_eq!(response.status(), 403);
    let (kind, message) = response.error();
    assert_eq!(kind, "credential_not_bound");
    assert_eq!(
        message,
        "credential placeholder of provider 'github' in header User-Agent, sent to inference.local: \
         inference.local is bound to no credential provider"
    );
    assert!(world.fake.seen().is_empty());
}

#[tokio::test]
async fn a_protocol_the_provider_does_not_speak_is_400() {
    let world = World::start(ROUTED_OPENAI).await;
    let (response, _) = world.exchange(&post("/v1/messages", "", r#"{"max_tokens":1}"#)).await;
    assert_eq!(response.status(), 400);
    let (kind, message) = response.error();
    assert_eq!(kind, "protocol_mismatch");
    assert!(message.contains("POST /v1/messages is the Anthropic Messages API"), "{message}");
    assert!(message.contains("'openai' (type openai) speaks the OpenAI API"), "{message}");
    assert!(world.fake.seen().is_empty());
}

#[tokio::test]
async fn without_a_route_requests_get_503_with_the_command_to_set_one() {
    let world = World::start(Setup { route: None, ..ROUTED_OPENAI }).await;
    let (response, log) = world.exchange(&post(CHAT, "", "{}")).await;
    assert_eq!(response.status(), 503);
    let (kind, message) = response.error();
    assert_eq!(kind, "no_route");
    assert!(message.contains("sandbox-egress inference set --provider NAME --model MODEL"), "{message}");
    assert_eq!((log.provider, log.last_status), (None, Some(503)));
    // A route set at runtime applies to the next request.
    world.inference.set_route("openai", "gpt-later").unwrap();
    let (response, _) = world.exchange(&post(CHAT, "", "{}")).await;
    assert_eq!((response.status(), response.json()["model"].as_str()), (200, Some("gpt-later")));
}

#[tokio::test]
async fn an_unreachable_provider_is_502_and_a_silent_one_504() {
    let world = World::start(ROUTED_OPENAI).await;
    let (response, log) = world.exchange(&post(CHAT, "", r#"{"fake":"silent"}"#)).await;
    assert_eq!(response.status(), 504);
    assert_eq!(response.error().0, "upstream_timeout");
    assert!(response.error().1.contains("no response within 500ms"), "{:?}", response.error());
    assert_eq!(log.last_status, Some(504));

    // A port nobody listens on: bound, then released.
    let closed_port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let temp = TempDir::new("refused");
    std::fs::write(temp.path().join("key"), OPENAI_KEY).unwrap();
    let config = temp.path().join("inference.yaml");
    std::fs::write(
        &config,
        format!(
            "providers:\n  - name: down\n    type: openai-compatible\n    base_url: http://127.0.0.1:{closed_port}\n    \
             credential: {{ file: {}/key }}\nroute: {{ provider: down, model: m }}\n",
            temp.path().display()
        ),
    )
    .unwrap();
    let world = World { inference: Arc::new(Inference::load(&config).unwrap()), ..world };
    let (response, log) = world.exchange(&post(CHAT, "", "{}")).await;
    assert_eq!(response.status(), 502);
    let (kind, message) = response.error();
    assert_eq!(kind, "upstream_unreachable");
    assert!(message.contains(&format!("cannot connect to 127.0.0.1:{closed_port}")), "{message}");
    assert_no_secret(&message);
    assert!(log.error.unwrap().contains("upstream_unreachable"));
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_event_and_the_last_chunk() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    let started = Instant::now();
    client.send(&post(CHAT, "", r#"{"fake":"stall","stream":true}"#)).await;
    let head = client.head().await;
    assert_eq!(head.status, 200);
    let body = client.rest().await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let event = sse_error_event("stream_idle_timeout", "the provider sent nothing for 300ms");
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&[chunk(b"data: 1\n\n"), chunk(&event), b"0\r\n\r\n".to_vec()].concat())
    );
    let log = client.finish().await;
    assert!(log.error.unwrap().starts_with("stream_idle_timeout"));
}

#[tokio::test]
async fn a_partial_event_is_ended_before_the_error_event() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    client.send(&post(CHAT, "", r#"{"fake":"stall_partial"}"#)).await;
    client.head().await;
    let body = client.rest().await;
    let event = [&b"\n\n"[..], &sse_error_event("stream_idle_timeout", "the provider sent nothing for 300ms")].concat();
    assert_eq!(body, [chunk(b"data: {\"par"), chunk(&event), b"0\r\n\r\n".to_vec()].concat());
}

#[tokio::test]
async fn a_stalled_body_that_is_not_an_event_stream_is_cut_by_closing() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    client.send(&post(CHAT, "", r#"{"fake":"stall_json"}"#)).await;
    let head = client.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(client.rest().await, b"{\"partial\"", "what arrived, then the close: no invented bytes");
    assert!(client.finish().await.error.unwrap().contains("connection closed"));
}

#[tokio::test]
async fn a_response_over_max_response_bytes_ends_with_an_error_event() {
    let world = World::start(Setup { limits: "  max_response_bytes: 3000\n", ..ROUTED_OPENAI }).await;
    let mut client = world.connect();
    client.send(&post(CHAT, "", r#"{"fake":"big"}"#)).await;
    client.head().await;
    let body = String::from_utf8(client.rest().await).unwrap();
    assert_eq!(body.matches("data: xxx").count(), 3, "three 1000-byte events fit in 3000 bytes");
    let event = String::from_utf8(sse_error_event(
        "response_too_large",
        "the response exceeded max_response_bytes (3000 bytes)",
    ))
    .unwrap();
    assert!(body.ends_with(&format!("{:x}\r\n{event}\r\n0\r\n\r\n", event.len())), "{body}");
}

#[tokio::test]
async fn serve_continues_after_a_head_read_by_the_caller() {
    let world = World::start(ROUTED_OPENAI).await;
    let raw = [post(CHAT, "", r#"{"n":1}"#), b"GET /v1/models/m1 HTTP/1.1\r\nHost: inference.local\r\n\r\n".to_vec()]
        .concat();
    let Parse::Done(first) = parse_request_head(&raw) else { panic!("head parses") };
    let (client, server) = tokio::io::duplex(64 * 1024);
    let inference = world.inference.clone();
    let after_head = raw[first.head_len..].to_vec();
    let session = tokio::spawn(async move {
        let mut log = InferenceLog::default();
        inference.serve(server, after_head, first, &test_dns(), &mut log).await;
        log
    });
    let mut client = Client { reader: HeadReader::new(client), session };
    assert_eq!(client.response("POST").await.json()["model"], "gpt-routed");
    assert_eq!(client.response("GET").await.json()["path"], "/api/v1/models/m1");
    assert_eq!(client.finish().await.requests, 2);
}

#[tokio::test]
async fn an_unreadable_credential_is_503_and_never_quoted() {
    let world = World::start(ROUTED_OPENAI).await;
    let key_file = world.temp.path().join("openai.key");
    std::fs::write(&key_file, format!("{OPENAI_KEY}\r\nX-Injected: yes")).unwrap();
    let (response, log) = world.exchange(&post(CHAT, "", "{}")).await;
    assert_eq!(response.status(), 503);
    let (kind, message) = response.error();
    assert_eq!(kind, "credential_unavailable");
    assert!(message.contains("has characters not allowed in an HTTP header"), "{message}");
    assert_no_secret(&message);
    assert_no_secret(&format!("{log:?}"));
    std::fs::remove_file(&key_file).unwrap();
    let (response, _) = world.exchange(&post(CHAT, "", "{}")).await;
    assert!(response.error().1.contains("cannot read credential file"), "{:?}", response.error());
    assert!(world.fake.seen().is_empty());
}

#[tokio::test]
async fn get_requests_carry_no_body_and_post_bodies_must_be_json_objects() {
    let world = World::start(ROUTED_OPENAI).await;
    let (response, _) =
        world.exchange(b"GET /v1/models HTTP/1.1\r\nHost: inference.local\r\nContent-Length: 2\r\n\r\n{}").await;
    assert_eq!((response.status(), response.error().0.as_str()), (400, "bad_request"));
    let (response, _) = world.exchange(&post(CHAT, "", "[1]")).await;
    assert_eq!(response.status(), 400);
    assert!(response.error().1.contains("not a JSON object"));
    let (response, _) = world.exchange(b"GET /v1/models HTTP/1.0\r\nHost: inference.local\r\n\r\n").await;
    assert!(response.error().1.contains("HTTP/1.1 only"));
    assert!(world.fake.seen().is_empty());
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_read() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").await;
    assert_eq!(client.head().await.status, 100);
    client.send(b"{}").await;
    assert_eq!(client.response("POST").await.status(), 200);
    client.finish().await;
    assert_eq!(world.fake.seen()[0].header("expect"), None);
}

#[tokio::test]
async fn a_providers_interim_responses_reach_the_client_before_its_answer() {
    let world = World::start(ROUTED_OPENAI).await;
    let mut client = world.connect();
    client.send(&post(CHAT, "", r#"{"fake":"hints"}"#)).await;
    let hints = client.head().await;
    assert_eq!(hints.status, 103);
    assert!(hints.headers.iter().any(|(name, value)| name == "Link" && value == b"</style.css>; rel=preload"));
    assert_eq!(client.response("POST").await.status(), 200);
    client.finish().await;
}

#[tokio::test]
async fn an_answer_before_the_provider_took_the_request_is_relayed_and_ends_its_connection() {
    let world =
        World::start(Setup { limits: "  max_request_body: 67108864\n  response_timeout: 2s\n", ..ROUTED_OPENAI }).await;
    let mut client = world.connect();
    // More than the sockets on the way hold: the provider never reads it.
    let big = format!(r#"{{"messages":"{}"}}"#, "x".repeat(32 << 20));
    client.send(&post(CHAT, &format!("User-Agent: {EARLY_401}\r\n"), &big)).await;
    let response = client.response("POST").await;
    assert_eq!((response.status(), response.error().1.as_str()), (401, "early"));
    // The provider connection is mid-request: the next request gets a new one.
    client.send(&post(CHAT, "", "{}")).await;
    assert_eq!(client.response("POST").await.status(), 200);
    client.finish().await;
    assert_eq!(world.fake.connections(), 2);
}
