//! The relay between a real client and a real server: Python's
//! `websockets` (both ends, compression on) on loopback, the upgrade
//! negotiated through [`offer`] and [`accept`] as the session does it.

use std::{process::Stdio, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, ChildStdout, Command},
    sync::watch,
    time::timeout,
};

use super::*;
use crate::{
    http1::{forward::forward_response_head, forward_request_head, HeadReader},
    relay::Prefill,
};

const PYTHON: &str = "/usr/bin/python3";
const SCRIPT: &str = include_str!("interop.py");
const WAIT: Duration = Duration::from_secs(60);
const DENIAL: &str = "WEBSOCKET_TEXT /chat not permitted by policy";

/// Denies messages saying "deny", replaces PLACEHOLDER, allows the rest.
struct TestPolicy;

impl Inspector for TestPolicy {
    fn text(&mut self, message: &str) -> TextVerdict {
        if message.contains("deny") {
            return TextVerdict::Close { code: POLICY_VIOLATION, reason: DENIAL.into() };
        }
        TextVerdict::Forward(message.replace("PLACEHOLDER", "secret"))
    }
}

fn python(args: &[&str]) -> Command {
    let mut command = Command::new(PYTHON);
    command.arg("-c").arg(SCRIPT).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).kill_on_drop(true);
    command
}

/// Accepts one client, relays its upgrade to `origin` and then its session.
async fn relay_one(listener: &TcpListener, origin: u16) -> (Option<Deflate>, Outcome) {
    let (client, _) = listener.accept().await.expect("the client connects");
    let mut client = HeadReader::new(client);
    let mut head = client.read_request_head(WAIT, WAIT).await.expect("read the upgrade").expect("an upgrade");
    let offer = offer(&mut head);
    let mut upstream = HeadReader::new(TcpStream::connect(("127.0.0.1", origin)).await.expect("connect the origin"));
    upstream.get_mut().write_all(&forward_request_head(&head, true, "test")).await.expect("send the upgrade");
    let response = upstream.read_response_head(WAIT).await.expect("the origin answers");
    assert_eq!(response.status, 101);
    let deflate = accept(&offer, &response).expect("the origin's extensions answer the offer");
    client.get_mut().write_all(&forward_response_head(&response, false, "test")).await.expect("send the 101");
    let (client, to_upstream) = client.into_parts();
    let (upstream, to_client) = upstream.into_parts();
    let (_reload, reload) = watch::channel(0);
    let prefill = Prefill { to_upstream, to_client };
    let outcome =
        relay(client, upstream, prefill, deflate.clone(), &mut TestPolicy, reload, Limits::default(), WAIT).await;
    (deflate, outcome)
}

/// The server, what it prints after its port, and the port.
async fn start_server() -> (Child, BufReader<ChildStdout>, u16) {
    let mut server = python(&["server"]).spawn().expect("run python3");
    let mut printed = BufReader::new(server.stdout.take().expect("piped"));
    let mut first = String::new();
    timeout(WAIT, printed.read_line(&mut first)).await.expect("the server starts").expect("read its port");
    let port: Value = serde_json::from_str(&first)
        .unwrap_or_else(|_| panic!("the server printed {first:?}: is PyPI websockets installed (cargo xtask setup)?"));
    (server, printed, port["port"].as_u64().expect("a port") as u16)
}

#[tokio::test]
async fn python_websockets_through_the_relay_with_compression() {
    let (mut server, mut server_output, port) = start_server().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let url = format!("ws://127.0.0.1:{}/chat", listener.local_addr().unwrap().port());
    for (mode, client_no_context_takeover) in [("takeover", false), ("no-takeover", true)] {
        let client = python(&["client", &url, mode]).output();
        let ((deflate, outcome), output) = tokio::join!(relay_one(&listener, port), timeout(WAIT, client));
        let output = output.expect("the client finishes").expect("run python3");
        assert!(output.status.success(), "{mode}: {}", String::from_utf8_lossy(&output.stderr));
        let report: Value = serde_json::from_slice(&output.stdout).expect("the client's report");
        assert_eq!(deflate, Some(Deflate { client_no_context_takeover }), "{mode}: {report}");
        let line = "a compressible line of text, over and over; ";
        let big = format!("{} ({})", &line.repeat(2)[..60], line.len() * 5000);
        let echoes = ["hello (5)", &big, "bytes:00012062696e617279 (9)", "fragmented (10)", "key secret (10)", &big];
        assert_eq!(report["echoes"], serde_json::json!(echoes), "{mode}");
        assert_eq!(report["close"], serde_json::json!({"code": 1008, "reason": DENIAL}), "{mode}");
        assert_eq!(outcome.ended, Ended::Policy(Close { code: POLICY_VIOLATION, reason: DENIAL.into() }));
        assert!(outcome.relayed.error.is_none(), "{mode}: {:?}", outcome.relayed.error);
    }
    server.start_kill().expect("stop the server");
    let mut printed = String::new();
    server_output.read_to_string(&mut printed).await.expect("the server's log");
    let lines: Vec<Value> = printed.lines().map(|line| serde_json::from_str(line).expect("JSON")).collect();
    let received: Vec<&str> = lines.iter().filter_map(|line| line["received"].as_str()).collect();
    assert_eq!(received.len(), 12, "six messages a session: {received:?}");
    assert!(!received.iter().any(|message| message.contains("deny")), "a denied message reached the server");
    assert!(received.contains(&"key secret"));
    let closes: Vec<&Value> = lines.iter().filter(|line| line.get("closed").is_some()).collect();
    assert_eq!(closes, [&serde_json::json!({"closed": 1008, "reason": DENIAL}); 2]);
}
