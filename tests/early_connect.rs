//! When the agent connects upstream: a stream whose first bytes are denied
//! never reaches the server (it accepts no connection), even to an address
//! the policy allows by itself and from a client a few milliseconds slow to
//! speak; an allowed stream to the same address arrives intact. A client
//! silent past the grace is connected early (server-first protocols): if its
//! bytes are then denied, the server sees that connection reset with no byte.
//! No descriptor of the agent outlives the denied streams.

use std::{collections::HashSet, net::IpAddr, thread, time::Duration};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

/// TLS by address (and by name for allowed.test), on the public address.
const TLS_PORT: u16 = 9101;
/// Plain HTTP through the private-IP gate, on the private address.
const HTTP_PORT: u16 = 9102;
/// No endpoint lists it.
const DENIED_PORT: u16 = 9103;
/// Opaque streams allowed by address.
const OPAQUE_PORT: u16 = 9104;
/// Allowed by address, for a client slower than the grace.
const SLOW_PORT: u16 = 9105;
/// A server that speaks first (a greeting), allowed by address.
const GREETING_PORT: u16 = 9106;

/// The agent's `--first-byte-timeout`.
const FIRST_BYTE_TIMEOUT_MS: u64 = 2000;
/// How long the slow client is silent: past the 50 ms grace, well within
/// the first-byte timeout.
const SLOW_CLIENT_MS: u64 = 500;

/// Resolves (by the test's DNS) elsewhere than the test host.
const ELSEWHERE: &str = "198.51.100.7";

struct Setup {
    agent: Agent,
    sandbox: Sandbox,
    server: Servers,
    net: TestNet,
    _policy: PolicyFile,
    _dns: Dns,
}

impl Setup {
    fn new(name: &str) -> Result<Self> {
        let net = TestNet::new()?;
        let elsewhere: IpAddr = ELSEWHERE.parse()?;
        let dns = net.start_dns(&[("allowed.test", net.v4.into()), ("mismatch.test", elsewhere)])?;
        let ports = [TLS_PORT, HTTP_PORT, DENIED_PORT, OPAQUE_PORT, SLOW_PORT, GREETING_PORT].map(|p| p.to_string());
        let server = net.start_support_server(
            "accept_counter.py",
            &[
                "--ports",
                &ports.join(","),
                "--greeting-ports",
                &GREETING_PORT.to_string(),
                "--http-ports",
                &HTTP_PORT.to_string(),
            ],
        )?;
        let (v4, private) = (net.v4, net.private_v4);
        let policy = PolicyFile::new(&format!(
            r#"version: 1
network_policies:
  early:
    binaries: [{{ path: "/**" }}]
    endpoints:
      - host: "{v4}"
        ports: [{TLS_PORT}, {OPAQUE_PORT}, {SLOW_PORT}, {GREETING_PORT}]
      - host: "{private}"
        ports: [{HTTP_PORT}]
        allowed_ips: ["{private}/32"]
      - host: allowed.test
        port: {TLS_PORT}
      - host: mismatch.test
        ports: [{TLS_PORT}, {HTTP_PORT}]
        allowed_ips: ["{private}/32"]
"#
        ))?;
        let sandbox = Sandbox::new(name)?;
        let dns_args = dns.agent_args();
        // A first-byte timeout far above the grace: a slow client's delay falls between them.
        let args =
            [dns_args[0].as_str(), dns_args[1].as_str(), "--first-byte-timeout", &FIRST_BYTE_TIMEOUT_MS.to_string()];
        let agent = Agent::start(&sandbox, &policy, &args)?;
        Ok(Self { agent, sandbox, server, net, _policy: policy, _dns: dns })
    }

    /// One stream from the sandbox (tests/support/stream_client.py): its
    /// pid and report.
    fn stream(&self, to: &str, what: &[&str], delay_ms: u64) -> Result<(u32, Value)> {
        let script = support_file("stream_client.py");
        let delay = delay_ms.to_string();
        let args = [&[script.to_str().context("utf-8 path")?, "--to", to, "--delay-ms", &delay][..], what].concat();
        let (pid, output) = run_in(&self.sandbox, PYTHON, &args)?;
        ensure!(output.status.success(), "client failed: {}", String::from_utf8_lossy(&output.stderr));
        Ok((pid, serde_json::from_slice(&output.stdout).context("client report")?))
    }

    fn accepted_on(&self, port: u16) -> usize {
        self.server.events.matching(|e| e["kind"] == "accepted" && e["port"] == port).len()
    }

    /// The agent's close line for `pid`, checked to be a denial that relayed nothing.
    fn denied(&self, pid: u32, what: &str) -> Result<Value> {
        let line = self.agent.wait_connection_of(pid)?;
        ensure!(line["verdict"] == "denied", "{what}: not denied: {line}");
        ensure!(line["bytes_up"] == 0 && line["bytes_down"] == 0, "{what}: bytes relayed: {line}");
        ensure!(line.get("upstream").is_none_or(Value::is_null), "{what}: an upstream in the close line: {line}");
        ensure!(line.get("error").is_none_or(Value::is_null), "{what}: an error in the close line: {line}");
        Ok(line)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn a_denied_stream_never_reaches_the_server() -> Result<()> {
    require_root();
    let setup = Setup::new("early-denied")?;
    let (v4, private) = (setup.net.v4, setup.net.private_v4);
    let tls = format!("{v4}:{TLS_PORT}");
    let http = format!("{private}:{HTTP_PORT}");
    let empty_line = hex(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let denied: Vec<(&str, String, Vec<String>)> = vec![
        (
            "TLS, SNI the policy denies, to an address it allows",
            tls.clone(),
            vec!["--sni".into(), "denied.example".into()],
        ),
        ("TLS, SNI that resolves elsewhere", tls.clone(), vec!["--sni".into(), "mismatch.test".into()]),
        (
            "plain HTTP, Host the policy denies",
            http.clone(),
            vec!["--send-hex".into(), hex(b"GET / HTTP/1.1\r\nHost: denied.example\r\n\r\n")],
        ),
        (
            "plain HTTP, Host the gate denies (resolves elsewhere)",
            http.clone(),
            vec!["--send-hex".into(), hex(b"GET / HTTP/1.1\r\nHost: mismatch.test\r\n\r\n")],
        ),
        ("opaque, denied destination", format!("{v4}:{DENIED_PORT}"), vec!["--send-hex".into(), hex(b"\x00opaque")]),
        (
            "a stream that starts with an empty line",
            format!("{v4}:{OPAQUE_PORT}"),
            vec!["--send-hex".into(), empty_line],
        ),
    ];
    // At once, and a few milliseconds late (as a client building a
    // ClientHello is): the agent has accepted a silent client then.
    for delay_ms in [0, 5] {
        for (what, to, args) in &denied {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (pid, report) = setup.stream(to, &args, delay_ms)?;
            // Plain HTTP gets its 403; nothing else gets a byte back.
            let answered = to == &http;
            ensure!(answered || report["received"] == 0, "{what}: the client got bytes back: {report}");
            setup.denied(pid, what)?;
        }
    }

    // Allowed streams to the same addresses: every byte arrives.
    let (_, hello) = setup.stream(&tls, &["--sni", "allowed.test"], 5)?;
    let opaque = hex(b"\x00allowed opaque bytes");
    let (_, bytes) = setup.stream(&format!("{v4}:{OPAQUE_PORT}"), &["--send-hex", &opaque], 5)?;
    let request = hex(format!("GET / HTTP/1.1\r\nHost: {private}\r\nConnection: close\r\n\r\n").as_bytes());
    let (_, answer) = setup.stream(&http, &["--send-hex", &request], 5)?;
    ensure!(
        answer["received"].as_u64() > Some(0) && answer["end"] == "eof",
        "no answer to the allowed request: {answer}"
    );
    for (port, sent) in [(TLS_PORT, &hello), (OPAQUE_PORT, &bytes)] {
        let what = format!("the allowed stream's bytes, intact, on port {port}");
        setup.server.events.wait_for(&what, |e| {
            e["kind"] == "closed" && e["port"] == port && e["received"] == sent["sent"] && e["sha256"] == sent["sha256"]
        })?;
    }
    setup.server.events.wait_for("the allowed request's end", |e| e["kind"] == "closed" && e["port"] == HTTP_PORT)?;

    // Each denied stream's connect came before its client's reset, so
    // before these allowed ones: had any reached the server, it is counted.
    for (port, allowed) in [(TLS_PORT, 1), (HTTP_PORT, 1), (DENIED_PORT, 0), (OPAQUE_PORT, 1)] {
        let accepted = setup.accepted_on(port);
        ensure!(accepted == allowed, "port {port}: the server accepted {accepted} connections, {allowed} allowed");
    }
    Ok(())
}

#[test]
fn a_client_silent_past_the_grace_is_connected_early_and_reset_if_denied() -> Result<()> {
    require_root();
    let setup = Setup::new("early-slow")?;
    let v4 = setup.net.v4;
    let slow = format!("{v4}:{SLOW_PORT}");
    // Warm up (the agent's first connections allocate what it keeps), then count.
    setup.stream(&slow, &["--send-hex", &hex(b"\x00warm")], 0)?;
    setup.server.events.wait_for("the warm-up's end", |e| e["kind"] == "closed" && e["port"] == SLOW_PORT)?;
    let before = open_fds(setup.agent.pid())?;

    // Silent past the grace: connected early on the address alone, then
    // denied on its SNI.
    const SLOW: usize = 5;
    let mut pids = HashSet::new();
    for _ in 0..SLOW {
        let (pid, report) = setup.stream(&slow, &["--sni", "denied.example"], SLOW_CLIENT_MS)?;
        ensure!(report["received"] == 0, "the client got bytes back: {report}");
        setup.denied(pid, "a slow client's denied SNI")?;
        pids.insert(pid);
    }
    // The server saw each of those connections end at once, reset, with no byte.
    let closed = setup
        .server
        .events
        .wait_for_count("the early connections' ends", SLOW + 1, |e| e["kind"] == "closed" && e["port"] == SLOW_PORT)?;
    for end in &closed[1..] {
        ensure!(end["received"] == 0 && end["how"] == "reset", "an early connection was not reset unused: {end}");
    }
    ensure!(setup.accepted_on(SLOW_PORT) == SLOW + 1, "accepted: {}", setup.accepted_on(SLOW_PORT));

    // No descriptor outlives them (closing is asynchronous: a bounded wait).
    let mut now = open_fds(setup.agent.pid())?;
    for _ in 0..50 {
        if now <= before {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        now = open_fds(setup.agent.pid())?;
    }
    ensure!(now <= before, "the agent holds {now} descriptors after the denied streams, {before} before");
    Ok(())
}

#[test]
fn a_server_that_speaks_first_is_relayed_without_waiting_for_the_client() -> Result<()> {
    require_root();
    let setup = Setup::new("early-greeting")?;
    let to = format!("{}:{GREETING_PORT}", setup.net.v4);
    // The client sends nothing until it has read the greeting.
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', {GREETING_PORT}), timeout=10)\n\
         greeting = s.recv(100)\ns.sendall(b'QUIT\\r\\n')\ns.shutdown(socket.SHUT_WR)\n\
         while s.recv(100): pass\nprint(greeting.decode())\n",
        setup.net.v4
    );
    for _ in 0..3 {
        let (pid, output) = run_in(&setup.sandbox, PYTHON, &["-c", &script])?;
        let said = String::from_utf8_lossy(&output.stdout);
        ensure!(said.starts_with("220 accept-counter ready"), "no greeting through {to}: {said}");
        let line = setup.agent.wait_connection_of(pid)?;
        ensure!(line["verdict"] == "relayed" && line["protocol"] == "silent", "{line}");
    }
    let ends = setup
        .server
        .events
        .wait_for_count("the greeted streams' ends", 3, |e| e["kind"] == "closed" && e["port"] == GREETING_PORT)?;
    ensure!(ends.iter().all(|end| end["received"] == 6), "the client's QUIT did not arrive: {ends:?}");
    Ok(())
}
