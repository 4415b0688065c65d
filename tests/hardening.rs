//! Hardening, end to end through the real eBPF redirect: hostile clients
//! (oversized, trickled, smuggling, malformed and garbage first bytes) and
//! faulty upstreams (refusing, resetting, half-closing, stalling, a dead
//! DNS server). Every case is a real process in the sandbox cgroup; each
//! test checks what the client saw, what the agent logged, and that the
//! agent still serves a normal request afterwards.

use std::{
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::{json, Value};

/// Ports of the misbehaving servers (FAULT_SERVERS) in the test namespace.
const ECHO_PORT: u16 = 9100;
const BANNER_PORT: u16 = 9101;
const RESET_PORT: u16 = 9102;
const HTTP_RESET_PORT: u16 = 9103;
const DRAIN_PORT: u16 = 9104;
const STALL_PORT: u16 = 9105;
/// Allowed by the policy, but nothing listens there.
const CLOSED_PORT: u16 = 9106;
/// Not allowed by the policy; an echo server listens there, so an answer
/// could only come from a connection the agent should not have made.
const DENIED_PORT: u16 = 9107;
/// UDP: swallows every datagram (a DNS server that never answers).
const SILENT_UDP_PORT: u16 = 9153;

const BANNER: &str = "220 hardening-test ESMTP ready\r\n";
/// What the reset server sends before it resets.
const RESET_AFTER: usize = 1000;
/// What the HTTP reset server sends before it resets.
const HTTP_RESET_HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
const HTTP_RESET_BODY: usize = 1000;
/// What the drain server sends after the client's EOF, after its count line.
const DRAIN_ANSWER: usize = 100_000;

const HEAD_TIMEOUT_MS: u64 = 1000;
const FIRST_BYTE_TIMEOUT_MS: u64 = 300;

/// Misbehaving servers, IPv4, one thread per connection; one JSON line per
/// finished connection. argv[1]: the ports, as JSON.
const FAULT_SERVERS: &str = r#"
import json, socket, struct, sys, threading, time

def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()

def recv_line(conn):
    line = b""
    while not line.endswith(b"\n") and len(line) < 4096:
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line

def read_to_eof(conn):
    """Bytes read until the peer closes (a reset ends it too: the agent
    resets an upstream when its client fails)."""
    total = 0
    while True:
        try:
            data = conn.recv(65536)
        except ConnectionResetError:
            return total
        if not data:
            return total
        total += len(data)

def reset(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()

def echo(conn, port):
    total = 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
        total += len(data)
    conn.shutdown(socket.SHUT_WR)
    emit(kind="echo", port=port, received=total)

def banner(conn, port):
    conn.sendall(BANNER)
    emit(kind="banner", port=port, received=read_to_eof(conn))

def reset_midway(conn, port):
    first = recv_line(conn)
    conn.sendall(b"r" * RESET_AFTER)
    ack = recv_line(conn)
    reset(conn)
    emit(kind="reset", port=port, first=first.decode("latin-1"), ack=ack.decode("latin-1"))

def http_reset(conn, port):
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        data = conn.recv(4096)
        if not data:
            break
        head += data
    conn.sendall(HTTP_RESET_HEAD + b"h" * HTTP_RESET_BODY)
    # Long enough for the agent to forward what was sent before the RST.
    time.sleep(0.5)
    reset(conn)
    emit(kind="http_reset", port=port, request=head.split(b"\r\n")[0].decode("latin-1"))

def drain(conn, port):
    total = read_to_eof(conn)
    conn.sendall(f"received {total}\n".encode() + b"d" * DRAIN_ANSWER)
    conn.close()
    emit(kind="drain", port=port, received=total)

def stall(conn, port):
    # Accepts, reads, never answers; reports when the peer gives up.
    emit(kind="stall_closed", port=port, received=read_to_eof(conn))

def serve(port, handler):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(64)
    def loop():
        while True:
            conn, _ = listener.accept()
            def run(conn=conn):
                try:
                    handler(conn, port)
                except OSError as error:
                    emit(kind="server_error", port=port, error=str(error))
                finally:
                    conn.close()
            threading.Thread(target=run, daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

def swallow_udp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    def loop():
        while True:
            data, _ = sock.recvfrom(4096)
            emit(kind="udp_swallowed", port=port, received=len(data))
    threading.Thread(target=loop, daemon=True).start()

config = json.loads(sys.argv[1])
BANNER = config["banner_text"].encode()
RESET_AFTER = config["reset_after"]
HTTP_RESET_HEAD = config["http_reset_head"].encode()
HTTP_RESET_BODY = config["http_reset_body"]
DRAIN_ANSWER = config["drain_answer"]
for name, handler in [("echo", echo), ("banner", banner), ("reset", reset_midway), ("http_reset", http_reset),
                      ("drain", drain), ("stall", stall), ("denied", echo)]:
    serve(config[name], handler)
swallow_udp(config["silent_udp"])
emit(kind="ready")
threading.Event().wait()
"#;

/// A raw TCP client run in the sandbox. argv[1]: a JSON plan
/// `{"host", "port", "timeout", "steps"}`; steps are `["send", hex]`,
/// `["drip", hex, seconds]` (a byte at a time, stopping as soon as an answer
/// arrives), `["shut_wr"]`, `["recv", n]` (exactly n bytes), `["recv_all"]`
/// (until EOF). Prints what arrived (latin-1), how the connection ended
/// (done, eof, reset, broken_pipe, timeout, refused), when the first byte
/// arrived and how long it all took, in seconds from before the connect.
const RAW_CLIENT: &str = r#"
import json, select, socket, sys, time
plan = json.loads(sys.argv[1])
sock = socket.socket(socket.AF_INET6 if ":" in plan["host"] else socket.AF_INET, socket.SOCK_STREAM)
sock.settimeout(plan.get("timeout", 10))
start = time.monotonic()
received = bytearray()
first = None
sent = 0

def now():
    return round(time.monotonic() - start, 3)

def recv(limit=65536):
    global first
    data = sock.recv(min(limit, 65536))
    if data and first is None:
        first = now()
    received.extend(data)
    return data

end = "done"
try:
    sock.connect((plan["host"], plan["port"]))
    for step in plan["steps"]:
        op = step[0]
        if op == "send":
            data = bytes.fromhex(step[1])
            sock.sendall(data)
            sent += len(data)
        elif op == "drip":
            data, interval = bytes.fromhex(step[1]), step[2]
            for i in range(len(data)):
                sock.sendall(data[i:i + 1])
                sent += 1
                if select.select([sock], [], [], interval)[0]:
                    break
        elif op == "shut_wr":
            sock.shutdown(socket.SHUT_WR)
        elif op == "recv":
            want = len(received) + step[1]
            while len(received) < want:
                if not recv(want - len(received)):
                    raise EOFError
        elif op == "recv_all":
            while recv():
                pass
            raise EOFError
except EOFError:
    end = "eof"
except ConnectionResetError:
    end = "reset"
except BrokenPipeError:
    end = "broken_pipe"
except socket.timeout:
    end = "timeout"
except ConnectionRefusedError:
    end = "refused"
if end not in ("eof", "timeout", "refused"):
    # What arrived before a reset is still readable.
    try:
        sock.setblocking(False)
        while recv():
            pass
    except OSError:
        pass
print(json.dumps({"received": received.decode("latin-1"), "end": end, "first": first, "elapsed": now(), "sent": sent}))
"#;

/// A DNS A query from the sandbox, over `udp` or `tcp`, to `server` port 53
/// (the agent answers whatever the address). Prints the response code (or
/// "timeout") and the seconds it took; the client gives up after argv[4] s.
const DNS_CLIENT: &str = r#"
import json, socket, struct, sys, time
transport, server, name, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
query = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00" + struct.pack(">HH", 1, 1)
start = time.monotonic()
try:
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        sock.sendto(query, (server, 53))
        reply = sock.recv(4096)
    else:
        sock = socket.create_connection((server, 53), timeout=timeout)
        sock.sendall(struct.pack(">H", len(query)) + query)
        length = struct.unpack(">H", sock.recv(2))[0]
        reply = b""
        while len(reply) < length:
            reply += sock.recv(length - len(reply))
    assert reply[:2] == b"\x42\x42", "reply id differs"
    rcode = reply[3] & 0x0F
except socket.timeout:
    rcode = "timeout"
print(json.dumps({"rcode": rcode, "elapsed": round(time.monotonic() - start, 3)}))
"#;

/// Where the agent sends DNS (its resolver and the sandbox's forwarded queries).
#[derive(Clone, Copy, PartialEq)]
enum DnsUpstream {
    /// dnsmasq in the namespace, knowing no names.
    Running,
    /// Port 53 of the test host, where nothing listens (ICMP port unreachable).
    Refusing,
    /// A UDP port of the test host that swallows queries.
    Silent,
}

/// A test host with the usual servers and the misbehaving ones, a sandbox
/// and an agent with short timeouts. Fields drop in order: the agent first.
struct Setup {
    agent: Agent,
    _policy: PolicyFile,
    sandbox: Sandbox,
    _dns: Option<Dns>,
    faults: Servers,
    servers: Servers,
    net: TestNet,
}

/// Paths of the "still serving" requests, unique across the file's tests.
static NEXT_PROBE: AtomicU32 = AtomicU32::new(1);

impl Setup {
    fn new(test: &str, extra_args: &[&str]) -> Result<Self> {
        Self::with_dns(test, DnsUpstream::Running, extra_args)
    }

    fn with_dns(test: &str, dns_upstream: DnsUpstream, extra_args: &[&str]) -> Result<Self> {
        require_root();
        let net = TestNet::new()?;
        let servers = net.start_servers()?;
        let faults = net.start_python_servers(FAULT_SERVERS, &[&fault_config().to_string()])?;
        let (dns, dns_server) = match dns_upstream {
            DnsUpstream::Running => {
                let dns = net.start_dns(&[])?;
                let server = dns.server.to_string();
                (Some(dns), server)
            }
            DnsUpstream::Refusing => (None, format!("{}:53", net.v4)),
            DnsUpstream::Silent => (None, format!("{}:{SILENT_UDP_PORT}", net.v4)),
        };
        let sandbox = Sandbox::new(&format!("hardening-{test}"))?;
        let policy = PolicyFile::new(&policy(&net))?;
        let (head_timeout, first_byte_timeout) = (HEAD_TIMEOUT_MS.to_string(), FIRST_BYTE_TIMEOUT_MS.to_string());
        let defaults = [
            ("--dns-server", dns_server.as_str()),
            ("--connect-timeout", "2000"),
            ("--first-byte-timeout", &first_byte_timeout),
            ("--head-timeout", &head_timeout),
        ];
        // A flag in `extra_args` replaces its default above.
        let mut args: Vec<&str> = defaults
            .iter()
            .filter(|(flag, _)| !extra_args.contains(flag))
            .flat_map(|(flag, value)| [*flag, *value])
            .collect();
        args.extend_from_slice(extra_args);
        let agent = Agent::start(&sandbox, &policy, &args)?;
        Ok(Self { agent, _policy: policy, sandbox, _dns: dns, faults, servers, net })
    }

    fn v4(&self) -> String {
        self.net.v4.to_string()
    }

    fn private(&self) -> String {
        self.net.private_v4.to_string()
    }

    /// Runs RAW_CLIENT in the sandbox against host:port with `steps`.
    fn raw(&self, host: &str, port: u16, timeout_s: f64, steps: Value) -> Result<RawResult> {
        raw_result(self.spawn_raw(host, port, timeout_s, steps)?)
    }

    fn spawn_raw(&self, host: &str, port: u16, timeout_s: f64, steps: Value) -> Result<Child> {
        let plan = json!({ "host": host, "port": port, "timeout": timeout_s, "steps": steps });
        let mut command = self.sandbox.command(PYTHON);
        command.args(["-c", RAW_CLIENT, &plan.to_string()]);
        Ok(command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
    }

    /// A plain HTTP request to the private address, by the agent's normal
    /// path: 200, the whole body, a `relayed` log line.
    fn assert_still_serving(&self) -> Result<()> {
        let size = 1000 + NEXT_PROBE.fetch_add(1, Ordering::Relaxed);
        let url = format!("http://{}:{HTTP_PORT}/bytes/{size}", self.net.private_v4);
        let (pid, output) = curl(Some(&self.sandbox), &url)?;
        ensure!(output.status.success(), "normal request failed: {}", String::from_utf8_lossy(&output.stderr));
        let fields: Vec<u64> =
            String::from_utf8_lossy(&output.stdout).split_whitespace().filter_map(|f| f.parse().ok()).collect();
        assert_eq!(fields.get(..2), Some(&[200, u64::from(size)][..]), "normal request after the hostile one");
        let log = self.agent.wait_connection_of(pid)?;
        assert_eq!(log["verdict"], "relayed", "{log}");
        Ok(())
    }
}

fn fault_config() -> Value {
    json!({
        "echo": ECHO_PORT, "banner": BANNER_PORT, "reset": RESET_PORT, "http_reset": HTTP_RESET_PORT,
        "drain": DRAIN_PORT, "stall": STALL_PORT, "denied": DENIED_PORT, "silent_udp": SILENT_UDP_PORT,
        "banner_text": BANNER, "reset_after": RESET_AFTER, "http_reset_head": HTTP_RESET_HEAD,
        "http_reset_body": HTTP_RESET_BODY, "drain_answer": DRAIN_ANSWER,
    })
}

/// The public address by IP literal (TLS, opaque), the private one with
/// allowed_ips (plain HTTP), and one name for the SNI checks. DENIED_PORT
/// is allowed nowhere.
fn policy(net: &TestNet) -> String {
    format!(
        "version: 1\nnetwork_policies:\n  hardening:\n    endpoints:\n\
         \x20     - host: \"{v4}\"\n        ports: [{TLS_PORT}, {ECHO_PORT}, {BANNER_PORT}, {RESET_PORT}, {DRAIN_PORT}, {STALL_PORT}, {CLOSED_PORT}]\n\
         \x20     - host: \"{private}\"\n        ports: [{HTTP_PORT}, {HTTP_RESET_PORT}, {STALL_PORT}, {CLOSED_PORT}]\n        allowed_ips: [\"{private}/32\"]\n\
         \x20     - host: down.test\n        port: {TLS_PORT}\n    binaries: [{{ path: \"/**\" }}]\n",
        v4 = net.v4,
        private = net.private_v4,
    )
}

#[derive(Debug)]
struct RawResult {
    pid: u32,
    received: Vec<u8>,
    end: String,
    /// Seconds from before the connect to the first byte received.
    first: Option<f64>,
    elapsed: f64,
}

impl RawResult {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }

    /// The status of the HTTP response at the start of what arrived.
    fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// The JSON body of the first response (the agent's error bodies).
    fn json(&self) -> Value {
        let text = self.text();
        let Some((head, body)) = text.split_once("\r\n\r\n") else { return Value::Null };
        let length: usize = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(body.len());
        serde_json::from_str(body.get(..length).unwrap_or(body)).unwrap_or(Value::Null)
    }

    /// The first response's head (as text) and everything after it (bytes).
    fn head_and_rest(&self) -> Option<(String, &[u8])> {
        let at = self.received.windows(4).position(|w| w == b"\r\n\r\n")?;
        Some((String::from_utf8_lossy(&self.received[..at]).into_owned(), &self.received[at + 4..]))
    }

    fn closed(&self) -> bool {
        matches!(self.end.as_str(), "eof" | "reset" | "broken_pipe")
    }
}

fn raw_result(child: Child) -> Result<RawResult> {
    let pid = child.id();
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "raw client failed: {}", String::from_utf8_lossy(&output.stderr));
    let value: Value = serde_json::from_slice(&output.stdout).context("raw client output")?;
    Ok(RawResult {
        pid,
        received: value["received"].as_str().unwrap_or_default().chars().map(|c| c as u32 as u8).collect(),
        end: value["end"].as_str().unwrap_or_default().to_owned(),
        first: value["first"].as_f64(),
        elapsed: value["elapsed"].as_f64().unwrap_or_default(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn send(bytes: &[u8]) -> Value {
    json!(["send", hex(bytes)])
}

/// Asserts a 400 `bad_request` JSON answer whose reason contains `reason`,
/// and the matching `denied` log line.
fn assert_bad_request(setup: &Setup, result: &RawResult, reason: &str) -> Result<Value> {
    assert_eq!(result.status(), Some(400), "expected a 400, got {:?} (end {})", result.text(), result.end);
    let text = result.text();
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    assert!(head.contains("content-type: application/json") && head.contains("connection: close"), "{head}");
    let body = result.json();
    assert_eq!(body["error"], "bad_request", "{text}");
    assert_eq!(body["detail"], "malformed HTTP request", "{text}");
    let body_reason = body["reason"].as_str().unwrap_or_default();
    assert!(body_reason.contains(reason), "reason {body_reason:?} lacks {reason:?}");
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!(log["verdict"], "denied", "{log}");
    assert_eq!(log["reason"], body_reason, "{log}");
    assert!(log["upstream"].is_null(), "a bad request went upstream: {log}");
    Ok(log)
}

/// No request with one of `paths` reached the HTTP server.
fn assert_server_saw_none(setup: &Setup, what: &str, paths: &[String]) {
    let seen = setup.servers.events.matching(|e| e["kind"] == "http" && paths.iter().any(|p| e["path"] == p.as_str()));
    assert!(seen.is_empty(), "{what} reached the server: {seen:?}");
}

fn http_head(path: &str, host: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").into_bytes()
}

// ---------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------

#[test]
fn oversized_headers_and_too_many_headers_get_a_400() -> Result<()> {
    let setup = Setup::new("big-head", &[])?;
    let host = format!("{}:{HTTP_PORT}", setup.private());

    // The request line fits; a header takes the head past 32 KiB.
    let big = http_head("/bytes/101", &host, &format!("X-Big: {}\r\n", "a".repeat(40 * 1024)));
    let result = setup.raw(&setup.private(), HTTP_PORT, 10.0, json!([send(&big), ["recv_all"]]))?;
    assert!(result.closed(), "{result:?}");
    let log = assert_bad_request(&setup, &result, "request head exceeds 32768 bytes")?;
    assert_eq!(log["protocol"], "http");

    let headers: String = (0..101).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let many = http_head("/bytes/102", &host, &headers);
    let result = setup.raw(&setup.private(), HTTP_PORT, 10.0, json!([send(&many), ["recv_all"]]))?;
    assert_bad_request(&setup, &result, "more than 100 headers")?;

    assert_server_saw_none(&setup, "an oversized head", &["/bytes/101".into(), "/bytes/102".into()]);
    setup.assert_still_serving()
}

#[test]
fn oversized_request_line_gets_a_400_and_is_never_forwarded() -> Result<()> {
    let setup = Setup::new("big-line", &[])?;
    let path = format!("/bytes/103?{}", "a".repeat(40 * 1024));
    let request = http_head(&path, &format!("{}:{HTTP_PORT}", setup.private()), "");
    let result = setup.raw(&setup.private(), HTTP_PORT, 10.0, json!([send(&request), ["recv_all"]]))?;
    let log = assert_bad_request(&setup, &result, "request head exceeds 32768 bytes")?;
    assert_eq!(log["protocol"], "http");
    let seen = setup
        .servers
        .events
        .matching(|e| e["kind"] == "http" && e["path"].as_str().is_some_and(|p| p.starts_with("/bytes/103")));
    assert!(seen.is_empty(), "an oversized request line reached the server");
    setup.assert_still_serving()
}

#[test]
fn slowloris_head_is_cut_off_at_the_head_timeout_while_others_are_served() -> Result<()> {
    // A longer head timeout than elsewhere, so the concurrent request surely
    // runs while the trickle is still going.
    let setup = Setup::new("slowloris", &["--head-timeout", "2000"])?;
    let host = format!("{}:{HTTP_PORT}", setup.private());
    let line = b"GET /bytes/104 HTTP/1.1\r\n";
    // At most 40 bytes at 5 a second: 8 s if the agent never cuts it off.
    let trickle = format!("Host: {host}\r\nX-Slow: {}", "a".repeat(40));
    let mut slow = setup.spawn_raw(
        &setup.private(),
        HTTP_PORT,
        12.0,
        json!([send(line), ["drip", hex(&trickle.as_bytes()[..40]), 0.2], ["recv_all"]]),
    )?;

    let started = Instant::now();
    setup.assert_still_serving()?;
    let served_in = started.elapsed();
    assert!(served_in < Duration::from_millis(1500), "a normal request took {served_in:?} during a slowloris");
    assert!(slow.try_wait()?.is_none(), "the slowloris client ended before the normal request was served");

    let result = raw_result(slow)?;
    let log = assert_bad_request(&setup, &result, "request head not complete after 2s")?;
    assert_eq!(log["protocol"], "http");
    let first = result.first.context("no answer")?;
    assert!((2.0..4.0).contains(&first), "400 after {first} s, expected just after the 2 s head timeout");
    assert_server_saw_none(&setup, "a trickled head", &["/bytes/104".into()]);
    setup.assert_still_serving()
}

#[test]
fn slowloris_from_the_first_byte_gets_a_400() -> Result<()> {
    let setup = Setup::new("slowloris-line", &[])?;
    let request = http_head("/bytes/105", &format!("{}:{HTTP_PORT}", setup.private()), "");
    // A byte every 200 ms: only "GET /" is in when the 1 s head timeout fires.
    let result = setup.raw(&setup.private(), HTTP_PORT, 12.0, json!([["drip", hex(&request), 0.2], ["recv_all"]]))?;
    let log = assert_bad_request(&setup, &result, "request head not complete after 1s")?;
    assert_eq!(log["protocol"], "http");
    let first = result.first.context("no answer")?;
    assert!((1.0..3.0).contains(&first), "400 after {first} s, expected just after the 1 s head timeout");
    assert_server_saw_none(&setup, "a trickled request", &["/bytes/105".into()]);
    setup.assert_still_serving()
}

#[test]
fn silent_stream_is_relayed_when_allowed_and_closed_when_denied() -> Result<()> {
    let setup = Setup::new("silent", &[])?;
    let first_byte_timeout = FIRST_BYTE_TIMEOUT_MS as f64 / 1000.0;

    // Server speaks first: the client says nothing until the banner arrives.
    let result = setup.raw(
        &setup.v4(),
        BANNER_PORT,
        10.0,
        json!([["recv", BANNER.len()], send(b"QUIT\r\n"), ["shut_wr"], ["recv_all"]]),
    )?;
    assert_eq!((result.text().as_str(), result.end.as_str()), (BANNER, "eof"), "{result:?}");
    // The address alone allows it, so the agent does not wait out the silence
    // (no_protocol_waits_on_the_sniffer_when_the_address_decides measures that).
    let first = result.first.context("no banner")?;
    assert!(first < 3.0, "banner after {first} s");
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("silent")), "{log}");
    assert_eq!((log["bytes_up"].as_u64(), log["bytes_down"].as_u64()), (Some(6), Some(BANNER.len() as u64)));
    setup.faults.events.wait_for("banner server saw QUIT", |e| e["kind"] == "banner" && e["received"] == 6)?;

    let result = setup.raw(&setup.v4(), DENIED_PORT, 10.0, json!([["recv_all"]]))?;
    assert!(result.closed() && result.received.is_empty(), "{result:?}");
    assert!(result.elapsed >= first_byte_timeout && result.elapsed < 3.0, "closed after {} s", result.elapsed);
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("denied"), Some("silent")), "{log}");
    assert_eq!(log["reason"], format!("endpoint {}:{DENIED_PORT} is not allowed by any policy", setup.net.v4));
    assert!(log["upstream"].is_null(), "{log}");
    setup.assert_still_serving()
}

#[test]
fn no_protocol_waits_on_the_sniffer_when_the_address_decides() -> Result<()> {
    // Timeouts far above what an exchange takes: waiting on the sniffer
    // would show as whole seconds.
    let setup = Setup::new("no-stalls", &["--first-byte-timeout", "2000", "--head-timeout", "20000"])?;

    // Server speaks first: the banner comes while the client sends nothing.
    let steps = json!([["recv", BANNER.len()], send(b"QUIT\r\n"), ["shut_wr"], ["recv_all"]]);
    let result = setup.raw(&setup.v4(), BANNER_PORT, 10.0, steps)?;
    assert_eq!((result.text().as_str(), result.end.as_str()), (BANNER, "eof"), "{result:?}");
    let first = result.first.context("no banner")?;
    assert!(first < 1.0, "banner after {first} s: the agent waited out the 2 s first-byte timeout");
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("silent")), "{log}");

    // Letters that end no line, and the client waits for the echo.
    let result =
        setup.raw(&setup.v4(), ECHO_PORT, 10.0, json!([send(b"xxxx"), ["recv", 4], ["shut_wr"], ["recv_all"]]))?;
    assert_eq!((result.received.as_slice(), result.end.as_str()), (&b"xxxx"[..], "eof"), "{result:?}");
    let first = result.first.context("no echo")?;
    assert!(first < 1.0, "echo after {first} s: the agent waited for a line end");
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("opaque")), "{log}");

    // A request head that stops mid-way: refused after the first-byte
    // timeout, not the head timeout.
    let host = format!("{}:{HTTP_PORT}", setup.private());
    let steps = json!([send(format!("GET /bytes/106 HTTP/1.1\r\nHost: {host}\r\nX-Half").as_bytes()), ["recv_all"]]);
    let result = setup.raw(&setup.private(), HTTP_PORT, 15.0, steps)?;
    assert_bad_request(&setup, &result, "request head stopped mid-way for 2s")?;
    let first = result.first.context("no answer")?;
    assert!((2.0..10.0).contains(&first), "400 after {first} s, expected just after the 2 s first-byte timeout");
    assert_server_saw_none(&setup, "a stalled head", &["/bytes/106".into()]);
    setup.assert_still_serving()
}

#[test]
fn garbage_first_bytes_are_opaque_and_decided_on_the_destination() -> Result<()> {
    let setup = Setup::new("garbage", &[])?;
    // Neither TLS nor HTTP; the second starts with a letter (like an SSH
    // client banner) but is no request line.
    for garbage in [&b"\x00\xff\x13\x37\xfe\x80garbage\r\n\r\n"[..], b"SSH-2.0-garbage\x00\xff\r\n"] {
        let n = garbage.len();
        let result =
            setup.raw(&setup.v4(), ECHO_PORT, 10.0, json!([send(garbage), ["recv", n], ["shut_wr"], ["recv_all"]]))?;
        assert_eq!((result.received.as_slice(), result.end.as_str()), (garbage, "eof"), "{result:?}");
        let log = setup.agent.wait_connection_of(result.pid)?;
        assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("opaque")), "{log}");
        assert_eq!((log["bytes_up"].as_u64(), log["bytes_down"].as_u64()), (Some(n as u64), Some(n as u64)));
        assert!(log["host"].is_null(), "{log}");

        let result = setup.raw(&setup.v4(), DENIED_PORT, 10.0, json!([send(garbage), ["recv_all"]]))?;
        assert_eq!((result.received.len(), result.end.as_str()), (0, "reset"), "{result:?}");
        let log = setup.agent.wait_connection_of(result.pid)?;
        assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("denied"), Some("opaque")), "{log}");
    }
    assert!(
        setup.faults.events.matching(|e| e["port"] == DENIED_PORT).is_empty(),
        "a denied stream reached its server"
    );
    setup.assert_still_serving()
}

#[test]
fn malformed_or_truncated_client_hello_is_reset_with_the_reason() -> Result<()> {
    let setup = Setup::new("bad-hello", &[])?;
    let mut garbage_inside = b"\x16\x03\x01\x00\x24\x01\x00\x00\x20".to_vec();
    garbage_inside.extend([0xaa; 32]);
    let mut cut_short = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec();
    cut_short.extend([0x55; 16]);
    let cases: [(&[u8], bool, &str); 3] = [
        // A valid record and handshake header around a body too short for its fields.
        (&garbage_inside, false, "invalid TLS ClientHello: "),
        // A hello announcing 508 bytes, cut after 16, then EOF.
        (&cut_short, true, "invalid TLS ClientHello: connection closed before the ClientHello was complete"),
        (
            b"\x16\x07\x01\x00\x10garbage-garbage!",
            false,
            "invalid TLS ClientHello: TLS record version major 7 is not 3",
        ),
    ];
    for (hello, eof, reason) in cases {
        let mut steps = vec![send(hello)];
        if eof {
            steps.push(json!(["shut_wr"]));
        }
        steps.push(json!(["recv_all"]));
        let result = setup.raw(&setup.v4(), TLS_PORT, 10.0, Value::Array(steps))?;
        assert_eq!((result.received.len(), result.end.as_str()), (0, "reset"), "{reason}: {result:?}");
        assert!(result.elapsed < 3.0, "{reason}: reset after {} s", result.elapsed);
        let log = setup.agent.wait_connection_of(result.pid)?;
        assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("denied"), Some("tls")), "{log}");
        let logged = log["reason"].as_str().unwrap_or_default();
        assert!(logged.starts_with(reason), "reason {logged:?}, expected {reason:?}");
        assert!(log["upstream"].is_null(), "a malformed hello went upstream: {log}");
    }
    setup.assert_still_serving()
}

#[test]
fn client_hello_without_sni_is_decided_like_opaque() -> Result<()> {
    let setup = Setup::new("no-sni", &[])?;
    // curl sends no SNI for an IP literal (RFC 6066 §3).
    let https = |ip: String, path: &str| {
        run_in(
            &setup.sandbox,
            "curl",
            &[
                "-sS",
                "-k",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://{ip}:{TLS_PORT}{path}"),
            ],
        )
    };

    let (pid, output) = https(setup.v4(), "/bytes/106")?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200", "{}", String::from_utf8_lossy(&output.stderr));
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("tls")), "{log}");
    assert!(log["host"].is_null(), "{log}");
    setup.servers.events.wait_for("TLS request without SNI", |e| e["path"] == "/bytes/106")?;

    // The private address is listed for other ports only.
    let (pid, output) = https(setup.private(), "/bytes/107")?;
    assert!(!output.status.success(), "TLS without SNI to an unlisted endpoint succeeded");
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("denied"), Some("tls")), "{log}");
    assert_eq!(log["reason"], format!("endpoint {}:{TLS_PORT} is not allowed by any policy", setup.net.private_v4));
    assert_server_saw_none(&setup, "a denied TLS stream", &["/bytes/107".into()]);
    setup.assert_still_serving()
}

#[test]
fn explicit_connect_with_a_bad_authority_gets_a_400() -> Result<()> {
    let setup = Setup::new("bad-connect", &[])?;
    let cases = [
        ("down.test", "CONNECT target \"down.test\" has no port"),
        ("down.test:0", "port 0 out of range 1..=65535"),
        ("down.test:99999", "port 99999 out of range 1..=65535"),
        ("user@down.test:443", "userinfo ('@') in authority"),
        ("down$test:443", "host name has a character other than a letter, digit, '-' or '.'"),
        (":443", "empty host in authority"),
        ("[::1:443", "unclosed '[' in authority"),
        ("down.test:443:1", "more than one ':' in authority"),
    ];
    for (target, reason) in cases {
        let request = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
        let result = setup.raw("127.0.0.1", setup.agent.port, 10.0, json!([send(request.as_bytes()), ["recv_all"]]))?;
        let log = assert_bad_request(&setup, &result, reason).with_context(|| format!("CONNECT {target}"))?;
        assert_eq!(log["protocol"], "http");
    }
    // Absolute-form proxy requests with a bad authority or scheme, likewise.
    let cases = [
        ("http://user@down.test/", "absolute-form target has a bad authority: userinfo ('@') in authority"),
        ("http://down.test:0/", "absolute-form target has a bad authority: port 0 out of range 1..=65535"),
        ("https://down.test/", "unsupported scheme in absolute-form target"),
    ];
    for (target, reason) in cases {
        let request = format!("GET {target} HTTP/1.1\r\n\r\n");
        let result = setup.raw("127.0.0.1", setup.agent.port, 10.0, json!([send(request.as_bytes()), ["recv_all"]]))?;
        assert_bad_request(&setup, &result, reason).with_context(|| format!("GET {target}"))?;
    }
    setup.assert_still_serving()
}

#[test]
fn smuggling_and_header_injection_get_a_400_and_are_never_forwarded() -> Result<()> {
    let setup = Setup::new("smuggling", &[])?;
    let host = format!("{}:{HTTP_PORT}", setup.private());
    let cases: [(&str, &[u8], &str); 11] = [
        (
            "/bytes/110",
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "both Content-Length and Transfer-Encoding",
        ),
        ("/bytes/111", b"Content-Length: 5\r\nContent-Length: 6\r\n", "multiple Content-Length headers"),
        ("/bytes/112", b"Content-Length: 5\r\nContent-Length: 5\r\n", "multiple Content-Length headers"),
        ("/bytes/113", b"Content-Length: +5\r\n", "invalid Content-Length \"+5\""),
        ("/bytes/114", b"Transfer-Encoding: chunked, identity\r\n", "chunked before the last Transfer-Encoding"),
        ("/bytes/123", b"Transfer-Encoding: gzip\r\n", "Transfer-Encoding does not end in chunked"),
        ("/bytes/115", b"X-A: a\rContent-Length: 5\r\n", "malformed request head: invalid header value"),
        ("/bytes/116", b"X-A: a\nContent-Length: 5\r\n", "bare LF line ending in request head"),
        ("/bytes/117", b"X-A: a\r\n Content-Length: 5\r\n", "malformed request head: invalid header name"),
        ("/bytes/118", b"Content-Length : 5\r\n", "malformed request head: invalid header name"),
        ("/bytes/119", b"Host: other.test\r\n", "multiple Host headers"),
    ];
    for (path, extra, reason) in cases {
        let request = [format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n").as_bytes(), extra, b"\r\n"].concat();
        let result = setup.raw(&setup.private(), HTTP_PORT, 10.0, json!([send(&request), ["recv_all"]]))?;
        assert_bad_request(&setup, &result, reason)
            .with_context(|| format!("{path}: {:?}", String::from_utf8_lossy(extra)))?;
    }
    // Invalid UTF-8 in Host.
    let request = b"GET /bytes/120 HTTP/1.1\r\nHost: ex\xffample.test\r\n\r\n";
    let result = setup.raw(&setup.private(), HTTP_PORT, 10.0, json!([send(request), ["recv_all"]]))?;
    assert_bad_request(&setup, &result, "invalid Host header: authority is not ASCII")?;

    // Smuggled into the second request of a keep-alive connection: the first
    // is answered, the second refused.
    let pipelined = [
        http_head("/bytes/121", &host, ""),
        http_head("/bytes/122", &host, "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
    ]
    .concat();
    let result = setup.raw(&setup.private(), HTTP_PORT, 10.0, json!([send(&pipelined), ["recv_all"]]))?;
    let (head, rest) = result.head_and_rest().context("no response")?;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head:?}");
    // The 121 bytes of /bytes/121, then the 400.
    let second = String::from_utf8_lossy(rest.get(121..).unwrap_or_default()).into_owned();
    assert!(second.starts_with("HTTP/1.1 400 Bad Request\r\n"), "no 400 right after the 200: {second:?}");
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!(log["verdict"], "denied", "{log}");
    assert_eq!(log["reason"], "both Content-Length and Transfer-Encoding", "{log}");
    setup.servers.events.wait_for("the first pipelined request", |e| e["path"] == "/bytes/121")?;

    let paths: Vec<String> = (110..=120).chain([122, 123]).map(|n| format!("/bytes/{n}")).collect();
    assert_server_saw_none(&setup, "a smuggling attempt", &paths);
    setup.assert_still_serving()
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

#[test]
fn upstream_refusal_is_a_502_for_http_and_a_close_for_streams() -> Result<()> {
    let setup = Setup::new("refused", &[])?;
    let response = curl_i(&setup.sandbox, &[&format!("http://{}:{CLOSED_PORT}/x", setup.private())])?;
    assert_eq!(response.status, 502, "{}", response.body);
    assert!(response.headers.to_ascii_lowercase().contains("content-type: application/json"), "{}", response.headers);
    let upstream = format!("{}:{CLOSED_PORT}", setup.net.private_v4);
    let reason = format!("connect to {upstream} failed: Connection refused (os error 111)");
    assert_eq!(
        response.json(),
        json!({ "error": "upstream_failed", "detail": format!("GET {upstream}"), "reason": reason })
    );
    let log = setup.agent.wait_connection_of(response.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("upstream_failed"), Some("http")), "{log}");
    assert_eq!(log["reason"], reason.as_str());

    // Opaque: the client's connect already succeeded, so it sees the connection end.
    let upstream = format!("{}:{CLOSED_PORT}", setup.net.v4);
    let result = setup.raw(&setup.v4(), CLOSED_PORT, 10.0, json!([send(b"\x00hello"), ["recv_all"]]))?;
    assert!(result.closed() && result.received.is_empty(), "{result:?}");
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("upstream_failed"), Some("opaque")), "{log}");
    assert_eq!(log["reason"], format!("connect to {upstream} failed: Connection refused (os error 111)"));

    // TLS (no SNI: an IP literal).
    let (pid, output) = run_in(&setup.sandbox, "curl", &["-sS", "-k", "-m", "10", &format!("https://{upstream}/")])?;
    assert!(!output.status.success(), "TLS to a refusing upstream succeeded");
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("upstream_failed"), Some("tls")), "{log}");
    setup.assert_still_serving()
}

#[test]
fn upstream_reset_mid_stream_resets_the_client_and_logs_the_counts() -> Result<()> {
    let setup = Setup::new("reset", &[])?;
    let (hello, ack) = (b"\x00hello\n", b"\x00ack\n");
    let result = setup.raw(
        &setup.v4(),
        RESET_PORT,
        10.0,
        json!([send(hello), ["recv", RESET_AFTER], send(ack), ["recv_all"]]),
    )?;
    assert_eq!(result.received.len(), RESET_AFTER, "{result:?}");
    assert_eq!(result.end, "reset", "the upstream's reset is passed on, not turned into a clean close: {result:?}");
    setup.faults.events.wait_for("the server reset", |e| e["kind"] == "reset")?;
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("opaque")), "{log}");
    assert_eq!(log["bytes_up"].as_u64(), Some((hello.len() + ack.len()) as u64), "{log}");
    assert_eq!(log["bytes_down"].as_u64(), Some(RESET_AFTER as u64), "{log}");
    let error = log["error"].as_str().unwrap_or_default();
    assert!(error.contains("Connection reset by peer"), "error {error:?}");
    setup.assert_still_serving()
}

#[test]
fn upstream_reset_mid_http_response_resets_the_client_and_logs_the_counts() -> Result<()> {
    let setup = Setup::new("http-reset", &[])?;
    let request = http_head("/reset", &format!("{}:{HTTP_RESET_PORT}", setup.private()), "");
    let result = setup.raw(&setup.private(), HTTP_RESET_PORT, 10.0, json!([send(&request), ["recv_all"]]))?;
    assert_eq!(result.end, "reset", "a truncated response must not end like a complete one: {result:?}");
    let (head, body) = result.head_and_rest().context("no response head")?;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n"), "{head}");
    assert_eq!(body.len(), HTTP_RESET_BODY, "the body forwarded before the reset");
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("http")), "{log}");
    let error = log["error"].as_str().unwrap_or_default();
    assert!(error.contains("reset"), "error {error:?}");
    assert_eq!(
        log["bytes_down"].as_u64(),
        Some(result.received.len() as u64),
        "bytes forwarded before the reset: {log}"
    );
    setup.assert_still_serving()
}

#[test]
fn client_half_close_first_still_gets_the_whole_answer() -> Result<()> {
    let setup = Setup::new("half-close", &[])?;

    // Opaque: the drain server answers only after the client's FIN.
    let data = [&b"\x00"[..], &[b'c'; 50_000]].concat();
    let result = setup.raw(&setup.v4(), DRAIN_PORT, 10.0, json!([send(&data), ["shut_wr"], ["recv_all"]]))?;
    assert_eq!(result.end, "eof", "{}", result.end);
    let header = format!("received {}\n", data.len());
    assert!(result.text().starts_with(&header), "{:?}", &result.text()[..result.text().len().min(80)]);
    assert_eq!(result.received.len(), header.len() + DRAIN_ANSWER);
    setup
        .faults
        .events
        .wait_for("drain server saw the FIN", |e| e["kind"] == "drain" && e["received"] == data.len())?;
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("opaque")), "{log}");
    assert_eq!(
        (log["bytes_up"].as_u64(), log["bytes_down"].as_u64()),
        (Some(data.len() as u64), Some(result.received.len() as u64))
    );
    assert!(log["error"].is_null(), "{log}");

    // Plain HTTP: the request, then FIN, then the whole response.
    let request = http_head("/bytes/40000", &format!("{}:{HTTP_PORT}", setup.private()), "");
    let result = setup.raw(&setup.private(), HTTP_PORT, 10.0, json!([send(&request), ["shut_wr"], ["recv_all"]]))?;
    assert_eq!(result.end, "eof");
    let (head, body) = result.head_and_rest().context("no response")?;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body.len(), 40_000);
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("http")), "{log}");
    assert_eq!(log["bytes_down"].as_u64(), Some(result.received.len() as u64));
    setup.assert_still_serving()
}

#[test]
fn stalled_upstream_is_cut_off_after_the_idle_timeout() -> Result<()> {
    let setup = Setup::new("stall", &["--idle-timeout", "1000"])?;
    let result = setup.raw(&setup.v4(), STALL_PORT, 6.0, json!([send(b"\x00hello?"), ["recv_all"]]))?;
    assert!(result.closed(), "the client was left waiting on a stalled upstream: {result:?}");
    assert!(result.elapsed >= 1.0 && result.elapsed < 4.0, "closed after {} s", result.elapsed);
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("opaque")), "{log}");
    assert!(log["error"].as_str().unwrap_or_default().contains("idle"), "{log}");
    // The upstream side is released too.
    setup.faults.events.wait_for("the agent closed the stalled upstream", |e| e["kind"] == "stall_closed")?;
    setup.assert_still_serving()
}

#[test]
fn stalled_http_upstream_gets_a_504() -> Result<()> {
    let setup = Setup::new("http-stall", &["--idle-timeout", "1000"])?;
    let request = http_head("/stall", &format!("{}:{STALL_PORT}", setup.private()), "");
    let result = setup.raw(&setup.private(), STALL_PORT, 6.0, json!([send(&request), ["recv_all"]]))?;
    assert_eq!(result.status(), Some(504), "{result:?}");
    assert!(result.elapsed < 4.0, "504 after {} s", result.elapsed);
    assert!(result.json()["error"].is_string(), "{}", result.text());
    let log = setup.agent.wait_connection_of(result.pid)?;
    assert!(log["error"].is_string() || log["reason"].is_string(), "the timeout is not logged: {log}");
    setup.faults.events.wait_for("the agent closed the stalled upstream", |e| e["kind"] == "stall_closed")?;
    setup.assert_still_serving()
}

/// Runs DNS_CLIENT in the sandbox; returns (rcode, seconds).
fn dns_query(setup: &Setup, transport: &str, name: &str, timeout_s: f64) -> Result<(Value, f64)> {
    let (_, output) =
        run_in(&setup.sandbox, PYTHON, &["-c", DNS_CLIENT, transport, &setup.v4(), name, &timeout_s.to_string()])?;
    ensure!(output.status.success(), "DNS client failed: {}", String::from_utf8_lossy(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout)?;
    Ok((result["rcode"].clone(), result["elapsed"].as_f64().unwrap_or_default()))
}

const SERVFAIL: u64 = 2;

#[test]
fn dns_upstream_down_gives_servfail_at_once_and_an_unresolvable_sni_is_denied() -> Result<()> {
    let setup = Setup::with_dns("dns-down", DnsUpstream::Refusing, &[])?;
    for transport in ["udp", "tcp"] {
        let (rcode, elapsed) = dns_query(&setup, transport, "down.test", 5.0)?;
        assert_eq!(rcode, SERVFAIL, "{transport}");
        assert!(elapsed < 2.0, "{transport}: SERVFAIL after {elapsed} s");
    }
    setup.agent.log.wait_for("the upstream failure logged", |e| e["message"] == "DNS: upstream resolver failed")?;

    // The system resolver, as a program would use it: with a 2 s per-try
    // timeout of its own, it must fail well before that.
    let started = Instant::now();
    let mut getent = setup.sandbox.command("getent");
    getent.args(["ahostsv4", "down.test"]).env("RES_OPTIONS", "timeout:2 attempts:1");
    let output = getent.output()?;
    let took = started.elapsed();
    assert!(!output.status.success(), "down.test resolved: {}", String::from_utf8_lossy(&output.stdout));
    assert!(took < Duration::from_millis(1500), "getent failed after {took:?}: the SERVFAIL did not come at once");

    // The policy allows down.test by name; the agent cannot check the name.
    // (How long that takes: `unresolvable_sni_is_denied_without_waiting_out_resolver_timeouts`.)
    let (pid, took) = unresolvable_sni(&setup, "/bytes/130")?;
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(
        (log["verdict"].as_str(), log["protocol"].as_str(), log["host"].as_str()),
        (Some("denied"), Some("tls"), Some("down.test")),
        "{log}"
    );
    let reason = log["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("cannot resolve down.test: "), "reason {reason:?} (after {took:?})");
    assert_server_saw_none(&setup, "an unresolvable SNI", &["/bytes/130".into()]);
    setup.assert_still_serving()
}

/// TLS from the sandbox to down.test (allowed by name) at the test host's
/// address; returns curl's pid and how long until the agent refused it.
fn unresolvable_sni(setup: &Setup, path: &str) -> Result<(u32, Duration)> {
    let started = Instant::now();
    let (pid, output) = run_in(
        &setup.sandbox,
        "curl",
        &[
            "-sS",
            "-k",
            "-m",
            "20",
            "--resolve",
            &format!("down.test:{TLS_PORT}:{}", setup.net.v4),
            &format!("https://down.test:{TLS_PORT}{path}"),
        ],
    )?;
    let took = started.elapsed();
    ensure!(!output.status.success(), "TLS with an unresolvable SNI succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!stderr.contains("timed out"), "curl gave up before the agent decided: {stderr}");
    Ok((pid, took))
}

#[test]
fn unresolvable_sni_is_denied_without_waiting_out_resolver_timeouts() -> Result<()> {
    let setup = Setup::with_dns("sni-dns-down", DnsUpstream::Refusing, &[])?;
    let (pid, took) = unresolvable_sni(&setup, "/bytes/131")?;
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "denied", "{log}");
    // The forwarder answers the sandbox's own queries SERVFAIL at once from
    // the same dead server; the agent's own check should fail as fast.
    assert!(took < Duration::from_secs(2), "denied after {took:?}: {log}");
    setup.assert_still_serving()
}

#[test]
fn dns_upstream_that_never_answers_gets_servfail_before_the_client_gives_up() -> Result<()> {
    let setup = Setup::with_dns("dns-silent", DnsUpstream::Silent, &[])?;
    // glibc's default per-try timeout.
    // A policy host: other names never reach the upstream.
    let (rcode, elapsed) = dns_query(&setup, "udp", "down.test", 5.0)?;
    setup.faults.events.wait_for("the query reached the silent server", |e| e["kind"] == "udp_swallowed")?;
    assert_eq!(rcode, SERVFAIL, "no SERVFAIL within the client's 5 s (after {elapsed} s)");
    assert!(elapsed < 3.0, "SERVFAIL after {elapsed} s");
    setup.assert_still_serving()
}

/// Opens `count` connections (argv), holds them silent until a line on
/// stdin, then runs a small exchange on each; prints how many answered.
const HOLDING_CLIENT: &str = r#"
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(count):
    try:
        held.append(socket.create_connection((host, port), timeout=10))
    except OSError:  # the agent's reset can beat connect() home on loopback
        pass
    time.sleep(0.05)
print(json.dumps({"held": count}), flush=True)
sys.stdin.readline()
answered = 0
for sock in held:
    try:
        sock.sendall(b"SEND 0 RECV 10\n")
        data = b""
        while chunk := sock.recv(100):
            data += chunk
        answered += len(data) == 10
    except OSError:
        pass
print(json.dumps({"answered": answered}), flush=True)
"#;

struct Holder {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Holder {
    fn start(sandbox: &Sandbox, host: &str, count: u32) -> Result<Self> {
        let mut child = sandbox
            .command(PYTHON)
            .args(["-c", HOLDING_CLIENT, host, &EXCHANGE_PORT.to_string(), &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut holder = Self { child, stdout };
        ensure!(holder.line()?["held"] == count, "holding client did not open its connections");
        Ok(holder)
    }

    fn line(&mut self) -> Result<Value> {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stdout, &mut line)?;
        serde_json::from_str(&line).with_context(|| format!("holding client said {line:?}"))
    }

    /// Lets it run its exchanges; returns how many connections answered.
    fn release(mut self) -> Result<u64> {
        std::io::Write::write_all(self.child.stdin.as_mut().unwrap(), b"go\n")?;
        let answered = self.line()?["answered"].as_u64().context("no count")?;
        self.child.wait()?;
        Ok(answered)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn connections_beyond_the_per_sandbox_and_total_limits_are_refused_and_logged() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    // One agent on a parent cgroup serves two sandboxes below it.
    let parent = Sandbox::new("limits")?;
    let (first, second) = (parent.child("first")?, parent.child("second")?);
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&parent, &policy, &["--max-connections", "6", "--max-connections-per-sandbox", "4"])?;
    let host = net.v4.to_string();
    let refusal = |limit: &'static str| {
        move |e: &Value| {
            e["event"] == "connection"
                && e["verdict"] == "denied"
                && e["reason"].as_str().is_some_and(|r| r.contains(limit))
        }
    };

    let first_holder = Holder::start(&first, &host, 5)?;
    let refused = agent.log.wait_for("the per-sandbox refusal", refusal("--max-connections-per-sandbox 4"))?;
    assert_eq!(refused["cgroup_id"], std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&first.path)?));
    let second_holder = Holder::start(&second, &host, 3)?;
    let refused = agent.log.wait_for("the total refusal", refusal("--max-connections 6"))?;
    assert_eq!(refused["cgroup_id"], std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&second.path)?));
    agent.log.wait_for("the refusals' warnings", |e| {
        e["level"] == "WARN" && e["message"].as_str().is_some_and(|m| m.starts_with("connection refused: too many"))
    })?;

    assert_eq!(second_holder.release()?, 2, "the second sandbox's connections within the total");
    assert_eq!(first_holder.release()?, 4, "the first sandbox's connections within its own limit");
    let denied = agent.log.matching(|e| e["event"] == "connection" && e["verdict"] == "denied");
    assert_eq!(denied.len(), 2, "exactly the two over the limits: {denied:?}");
    servers.events.wait_for_count("the six exchanges", 6, |e| e["kind"] == "exchange")?;

    // Slots come back when connections close.
    let (pid, output) = exchange(Some(&first), "inet", &host, 10, 10)?;
    ensure!(output.status.success(), "exchange after the limits: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(agent.wait_connection_of(pid)?["verdict"], "relayed");
    Ok(())
}
