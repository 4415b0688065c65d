//! L7 policy end to end: TLS to inspected endpoints terminated with the
//! agent's CA, each request decided by REST or WebSocket rules on its
//! canonical path, denials as 403 JSON; real clients (curl, Python urllib,
//! Node fetch) with no proxy variables, against a fake REST API over TLS in
//! the test namespace that prints every request it receives.

use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const BINARIES: &str = "    binaries:\n      - path: \"/**\"\n";

/// A test namespace serving the REST API as api.rest.test, and an agent
/// that trusts the API's CA upstream and whose own CA the clients trust.
struct Setup {
    // Dropped in this order: the agent detaches from the sandbox before its cgroup goes.
    agent: Agent,
    sandbox: Sandbox,
    api: Servers,
    policy: PolicyFile,
    agent_ca: String,
    rest_ca: String,
    net: TestNet,
    _dns: Dns,
    _dir: TempDir,
}

impl Setup {
    fn new(name: &str, endpoints: &str) -> Result<Self> {
        Self::with_args(name, endpoints, true)
    }

    fn with_args(name: &str, endpoints: &str, trust_api_ca: bool) -> Result<Self> {
        let net = TestNet::new()?;
        let dir = TempDir::new(name)?;
        let dns = net.start_dns(&[(REST_API_HOST, net.v4.into())])?;
        let (api, rest_ca) = net.start_rest_api(&dir)?;
        let rest_ca = rest_ca.to_str().context("utf-8 path")?.to_owned();
        let sandbox = Sandbox::new(name)?;
        let policy = PolicyFile::new(&policy_yaml(endpoints))?;
        let ca_dir = dir.file("ca");
        let dns_args = dns.agent_args();
        let mut args = vec![dns_args[0].as_str(), dns_args[1].as_str(), "--ca-dir", &ca_dir];
        if trust_api_ca {
            args.extend(["--upstream-ca", &rest_ca]);
        }
        let agent = Agent::start(&sandbox, &policy, &args)?;
        let exported = run(agent_bin().to_str().context("utf-8 path")?, &["ca", "export", "--ca-dir", &ca_dir])?;
        let agent_ca = dir.file("agent-ca.pem");
        std::fs::write(&agent_ca, &exported.stdout)?;
        Ok(Self { agent, sandbox, api, policy, agent_ca, rest_ca, net, _dns: dns, _dir: dir })
    }

    fn url(&self, path: &str) -> String {
        format!("https://{REST_API_HOST}:{REST_TLS_PORT}{path}")
    }

    /// `curl -i` in the sandbox, trusting the agent's CA.
    fn curl(&self, args: &[&str]) -> Result<HttpResponse> {
        curl_i(&self.sandbox, &[&["--noproxy", "*", "--cacert", &self.agent_ca], args].concat())
    }

    /// The requests the API received, in order.
    fn received(&self) -> Vec<Value> {
        self.api.events.matching(|e| e["kind"] == "request")
    }

    fn request_logs(&self) -> Vec<Value> {
        self.agent.log.matching(|e| e["event"] == "request")
    }
}

fn policy_yaml(endpoints: &str) -> String {
    format!("version: 1\nnetwork_policies:\n  rest:\n    endpoints:\n{endpoints}{BINARIES}")
}

fn rest_endpoint(extra: &str) -> String {
    format!("      - host: {REST_API_HOST}\n        port: {REST_TLS_PORT}\n        protocol: rest\n{extra}")
}

fn assert_denied(response: &HttpResponse, rule: &str, detail: &str) {
    assert_eq!(response.status, 403, "{}\n{}", response.headers, response.body);
    let lowered = response.headers.to_ascii_lowercase();
    assert!(lowered.contains("content-type: application/json"), "{}", response.headers);
    assert!(lowered.contains("x-sandbox-egress-policy: rest"), "{}", response.headers);
    let body = response.json();
    assert_eq!(body["error"], "policy_denied", "{body}");
    assert_eq!(body["policy"], "rest", "{body}");
    assert_eq!(body["rule"], rule, "{body}");
    assert_eq!(body["detail"], detail, "{body}");
}

#[test]
fn read_only_access_allows_reads_and_denies_writes_with_a_json_403() -> Result<()> {
    require_root();
    let setup = Setup::new(
        "l7-read-only",
        &rest_endpoint(
            "        access: read-only\n        deny_rules:\n          - method: GET\n            path: /private/**\n",
        ),
    )?;

    let read = setup.curl(&[&setup.url("/repos/o/r?per_page=2")])?;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.json()["target"], "/repos/o/r?per_page=2");
    ensure!(!read.headers.to_ascii_lowercase().contains("x-sandbox-egress-policy"), "{}", read.headers);

    let write = setup.curl(&["-X", "POST", "-d", "{\"title\":\"x\"}", &setup.url("/repos/o/r/issues")])?;
    assert_denied(&write, "access: read-only", "POST /repos/o/r/issues not permitted by policy");

    // Spellings of a denied path are decided on the canonical path.
    for trick in ["/public/../private/x", "//private//x", "/private;jsessionid=1/x", "/%70rivate/x"] {
        let response = setup.curl(&["--path-as-is", &setup.url(trick)])?;
        assert_denied(&response, "deny_rules[0]", "GET /private/x blocked by deny rule");
    }
    let encoded_slash = setup.curl(&[&setup.url("/private%2Fx")])?;
    assert_eq!(encoded_slash.status, 403, "{}", encoded_slash.body);
    ensure!(encoded_slash.json()["detail"].as_str().is_some_and(|d| d.contains("%2F")), "{}", encoded_slash.body);
    // An allowed request reaches the origin on its canonical path.
    let canonical = setup.curl(&["--path-as-is", &setup.url("/a/./b//c/../d")])?;
    assert_eq!(canonical.status, 200);
    assert_eq!(canonical.json()["path"], "/a/b/d");

    // Keep-alive: a denied request without a body leaves the connection
    // open for the next one, which is decided on its own.
    let (_, output) = run_in(
        &setup.sandbox,
        "curl",
        &[
            "-sS",
            "--noproxy",
            "*",
            "--cacert",
            &setup.agent_ca,
            "-w",
            "%{http_code} %{num_connects}\n",
            "-o",
            "/dev/null",
            &setup.url("/one"),
            "-o",
            "/dev/null",
            &setup.url("/private/two"),
            "-o",
            "/dev/null",
            &setup.url("/three"),
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200 1\n403 0\n200 0\n");

    let received: Vec<String> =
        setup.received().iter().map(|e| format!("{} {}", e["method"].as_str().unwrap(), e["path"])).collect();
    assert_eq!(
        received,
        ["GET \"/repos/o/r\"", "GET \"/a/b/d\"", "GET \"/one\"", "GET \"/three\""],
        "denied requests never reach the origin"
    );
    let logs = setup.request_logs();
    let denied_post = logs.iter().find(|e| e["method"] == "POST").context("the POST's log line")?;
    assert_eq!(denied_post["verdict"], "denied");
    assert_eq!(denied_post["path"], "/repos/o/r/issues");
    assert_eq!(denied_post["policy"], "rest");
    assert_eq!(denied_post["policy_generation"], 1);
    assert_eq!(denied_post["host"], REST_API_HOST);
    let connection = setup.agent.wait_connection_of(write.pid)?;
    assert_eq!(connection["protocol"], "tls-inspected");
    assert_eq!(connection["requests_denied"], 1);
    Ok(())
}

/// Python's urllib, trusting the agent CA; prints `STATUS METHOD PATH` per request.
const URLLIB_CLIENT: &str = r#"
import json, ssl, sys, urllib.request, urllib.error
context = ssl.create_default_context(cafile=sys.argv[1])
for line in sys.argv[3:]:
    method, path = line.split(' ', 1)
    request = urllib.request.Request(sys.argv[2] + path, method=method)
    try:
        status = urllib.request.urlopen(request, context=context, timeout=10).status
    except urllib.error.HTTPError as error:
        status = error.code
    print(status, method, path)
"#;

#[test]
fn deny_rules_beat_full_access_and_query_matchers_decide() -> Result<()> {
    require_root();
    let endpoints = rest_endpoint(
        "        path: /search/**\n        rules:\n          - allow:\n              method: GET\n              path: /search/*\n              query:\n                tag:\n                  any: [\"v1.*\", \"v2.*\"]\n",
    ) + &rest_endpoint(
        "        path: /api/**\n        access: full\n        deny_rules:\n          - method: DELETE\n            path: /api/**\n            query:\n              force: \"true\"\n          - method: \"*\"\n            path: /api/admin/**\n",
    );
    let setup = Setup::new("l7-rules", &endpoints)?;
    let requests = [
        "GET /search/x?tag=v1.2",
        "GET /search/x?tag=v3.0",
        "GET /search/x?tag=v1.2&tag=v9",
        "GET /search/x",
        "DELETE /api/thing",
        "DELETE /api/thing?force=true",
        "DELETE /api/thing?force=false&force=true",
        "PUT /api/admin/users",
        "GET /elsewhere",
    ];
    let base = format!("https://{REST_API_HOST}:{REST_TLS_PORT}");
    let args: Vec<&str> = [vec!["-c", URLLIB_CLIENT, &setup.agent_ca, &base], requests.to_vec()].concat();
    let (_, output) = run_in(&setup.sandbox, PYTHON, &args)?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let statuses: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
    let expected: Vec<String> = requests
        .iter()
        .zip([200, 403, 403, 403, 200, 403, 403, 403, 403])
        .map(|(request, status)| format!("{status} {request}"))
        .collect();
    assert_eq!(statuses, expected);
    let reached: Vec<String> = setup.received().iter().map(|e| format!("{} {}", e["method"], e["target"])).collect();
    assert_eq!(reached, ["\"GET\" \"/search/x?tag=v1.2\"", "\"DELETE\" \"/api/thing\""]);
    Ok(())
}

/// Node's fetch, trusting the agent CA through NODE_EXTRA_CA_CERTS.
const FETCH_CLIENT: &str = r#"
const [url] = process.argv.slice(1);
(async () => {
  for (const method of ['GET', 'POST']) {
    const response = await fetch(url, { method, body: method === 'POST' ? '{"a":1}' : undefined });
    console.log(response.status, method, (await response.json()).method);
  }
})().catch((error) => { console.error(error); process.exit(1); });
"#;

#[test]
fn audit_mode_allows_what_it_would_deny_and_logs_it() -> Result<()> {
    require_root();
    let setup = Setup::new("l7-audit", &rest_endpoint("        access: read-only\n        enforcement: audit\n"))?;
    let mut command = setup.sandbox.command("node");
    command.args(["-e", FETCH_CLIENT, &setup.url("/repos/o/r/issues")]);
    command.env("NODE_EXTRA_CA_CERTS", &setup.agent_ca);
    let output = command.output()?;
    ensure!(output.status.success(), "node: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200 GET GET\n200 POST POST\n");
    let logs = setup.request_logs();
    let verdicts: Vec<(&str, &str)> =
        logs.iter().map(|e| (e["method"].as_str().unwrap(), e["verdict"].as_str().unwrap())).collect();
    assert_eq!(verdicts, [("GET", "allowed"), ("POST", "audit")]);
    assert_eq!(logs[1]["reason"], "POST /repos/o/r/issues not permitted by policy");
    Ok(())
}

#[test]
fn a_passthrough_endpoint_shows_the_origins_own_certificate() -> Result<()> {
    require_root();
    let setup = Setup::new("l7-passthrough", &rest_endpoint("        access: read-only\n"))?;
    // An endpoint without L7 content, by IPv6 address (nothing resolves to it).
    let v6 = setup.net.v6;
    setup.policy.write(&policy_yaml(&format!(
        "{}      - host: \"{v6}\"\n        port: {REST_TLS_PORT}\n",
        rest_endpoint("        access: read-only\n")
    )))?;
    setup.agent.log.wait_for("policy reload", |e| e["event"] == "policy_reloaded" && e["generation"] == 2)?;
    let url = format!("https://[{v6}]:{REST_TLS_PORT}/x");
    let origin = curl_i(&setup.sandbox, &["--noproxy", "*", "--cacert", &setup.rest_ca, "-X", "POST", &url])?;
    assert_eq!(origin.status, 200, "POST is not decided on a passthrough endpoint: {}", origin.body);
    let (_, agents) = run_in(&setup.sandbox, "curl", &["-sS", "--noproxy", "*", "--cacert", &setup.agent_ca, &url])?;
    assert_eq!(
        agents.status.code(),
        Some(60),
        "the agent's CA does not vouch for the origin: the agent never terminated"
    );
    let log = setup.agent.wait_connection_of(origin.pid)?;
    assert_eq!(log["protocol"], "tls");
    assert_eq!(log["verdict"], "relayed");
    ensure!(setup.request_logs().is_empty(), "no request was inspected");
    Ok(())
}

#[test]
fn the_same_rules_apply_through_a_connect_tunnel() -> Result<()> {
    require_root();
    let setup = Setup::new("l7-connect", &rest_endpoint("        access: read-only\n"))?;
    let proxy = format!("http://127.0.0.1:{}", setup.agent.port);
    // `curl -i` prints the CONNECT response, then the tunnelled one.
    let tunnel = |extra: &[&str]| -> Result<(u16, Value)> {
        let url = setup.url("/r");
        let args = [&["--proxy", &proxy, "--cacert", &setup.agent_ca], extra, &[&url]].concat();
        let response = curl_i(&setup.sandbox, &args)?;
        ensure!(response.headers.contains(" 200 Connection Established"), "{}", response.headers);
        let (head, body) = response.body.split_once("\r\n\r\n").context("the tunnelled response")?;
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status")?;
        Ok((status, serde_json::from_str(body)?))
    };
    let (status, read) = tunnel(&[])?;
    assert_eq!((status, &read["method"]), (200, &Value::from("GET")), "{read}");
    let (status, write) = tunnel(&["-X", "PUT"])?;
    assert_eq!((status, &write["rule"]), (403, &Value::from("access: read-only")), "{write}");
    assert_eq!(setup.received().len(), 1, "only the GET reached the origin");
    Ok(())
}

#[test]
fn an_origin_that_fails_verification_is_a_502_never_a_downgrade() -> Result<()> {
    require_root();
    // The agent does not trust the API's test CA.
    let setup = Setup::with_args("l7-verify", &rest_endpoint("        access: read-only\n"), false)?;
    let response = setup.curl(&[&setup.url("/r")])?;
    assert_eq!(response.status, 502, "{}", response.body);
    let body = response.json();
    assert_eq!(body["error"], "upstream_tls_verify_failed", "{body}");
    ensure!(body["reason"].as_str().is_some_and(|r| r.contains(REST_API_HOST)), "{body}");
    assert!(setup.received().is_empty(), "nothing was sent to an unverified origin");
    Ok(())
}

/// One keep-alive connection: a request, then (after a line on stdin) another.
const KEEP_ALIVE_CLIENT: &str = r#"
import http.client, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[1])
connection = http.client.HTTPSConnection(sys.argv[2], int(sys.argv[3]), context=context, timeout=10)
for _ in range(2):
    connection.request('GET', '/data')
    response = connection.getresponse()
    response.read()
    print(response.status, flush=True)
    sys.stdin.readline()
"#;

#[test]
fn a_reload_decides_the_next_request_on_an_open_connection() -> Result<()> {
    require_root();
    let setup = Setup::new("l7-reload", &rest_endpoint("        access: read-only\n"))?;
    let port = REST_TLS_PORT.to_string();
    let mut client = setup
        .sandbox
        .command(PYTHON)
        .args(["-c", KEEP_ALIVE_CLIENT, &setup.agent_ca, REST_API_HOST, &port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = client.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(client.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    assert_eq!(line, "200\n");
    setup.policy.write(&policy_yaml(&rest_endpoint(
        "        access: read-only\n        deny_rules:\n          - method: GET\n            path: /data\n",
    )))?;
    setup.agent.log.wait_for("policy reload", |e| e["event"] == "policy_reloaded" && e["generation"] == 2)?;
    writeln!(stdin, "next")?;
    line.clear();
    stdout.read_line(&mut line)?;
    assert_eq!(line, "403\n", "the open connection's next request is decided by generation 2");
    writeln!(stdin, "done")?;
    ensure!(client.wait()?.success(), "client failed");
    let generations: Vec<Value> = setup.request_logs().iter().map(|e| e["policy_generation"].clone()).collect();
    assert_eq!(generations, [1, 2]);
    let connection = setup.agent.wait_connection_of(client.id())?;
    assert_eq!(connection["requests"], 2, "one connection carried both requests");
    Ok(())
}

/// A WebSocket client over TLS: the upgrade to PATH, then one masked text
/// frame; prints the status line and the echoed text.
const WEBSOCKET_CLIENT: &str = r#"
import base64, os, socket, ssl, struct, sys
ca, host, port, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
context = ssl.create_default_context(cafile=ca)
stream = context.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=host)
key = base64.b64encode(os.urandom(16)).decode()
stream.sendall(f'GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
               f'Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n'.encode())
head = b''
while b'\r\n\r\n' not in head:
    chunk = stream.recv(1)
    if not chunk:
        break
    head += chunk
print(head.split(b'\r\n')[0].decode())
if b' 101 ' not in head.split(b'\r\n')[0]:
    sys.exit(0)
payload, mask = b'hello', os.urandom(4)
stream.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
first = stream.recv(2)
print(stream.recv(first[1] & 0x7f).decode())
"#;

#[test]
fn a_websocket_upgrade_is_decided_by_the_rules_then_frames_flow() -> Result<()> {
    require_root();
    let endpoint = format!(
        "      - host: {REST_API_HOST}\n        port: {REST_TLS_PORT}\n        protocol: websocket\n        rules:\n          - allow:\n              method: GET\n              path: /ws/chat\n          - allow:\n              method: WEBSOCKET_TEXT\n              path: /ws/chat\n"
    );
    let setup = Setup::new("l7-websocket", &endpoint)?;
    let port = REST_TLS_PORT.to_string();
    for (path, expected) in
        [("/ws/chat", "HTTP/1.1 101 Switching Protocols\nhello\n"), ("/ws/admin", "HTTP/1.1 403 Forbidden\n")]
    {
        let (_, output) =
            run_in(&setup.sandbox, PYTHON, &["-c", WEBSOCKET_CLIENT, &setup.agent_ca, REST_API_HOST, &port, path])?;
        ensure!(output.status.success(), "{path}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected, "{path}");
    }
    let messages = setup.api.events.matching(|e| e["kind"] == "ws_message");
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["text"], "hello");
    Ok(())
}

/// Three requests written at once on one TLS connection; prints each status.
const PIPELINING_CLIENT: &str = r#"
import socket, ssl, sys
ca, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
stream = context.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=host)
request = lambda method, path: f'{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n'.encode()
stream.sendall(request('GET', '/first') + request('POST', '/second') + request('GET', '/third'))
reader = stream.makefile('rb')
for _ in range(3):
    status = reader.readline().split()[1].decode()
    length = 0
    while (line := reader.readline()) not in (b'\r\n', b''):
        name, _, value = line.decode().partition(':')
        if name.lower() == 'content-length':
            length = int(value)
    reader.read(length)
    print(status)
"#;

#[test]
fn pipelined_requests_are_each_decided() -> Result<()> {
    require_root();
    let setup = Setup::new("l7-pipelined", &rest_endpoint("        access: read-only\n"))?;
    let port = REST_TLS_PORT.to_string();
    let (_, output) =
        run_in(&setup.sandbox, PYTHON, &["-c", PIPELINING_CLIENT, &setup.agent_ca, REST_API_HOST, &port])?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200\n403\n200\n");
    let reached: Vec<Value> = setup.received().iter().map(|e| e["path"].clone()).collect();
    assert_eq!(reached, ["/first", "/third"]);
    Ok(())
}

#[test]
fn plain_http_to_an_inspected_endpoint_is_decided_per_request() -> Result<()> {
    require_root();
    // Plain HTTP goes through the private-IP gate: a name for the API's private address.
    let net = TestNet::new()?;
    let dir = TempDir::new("l7-plain")?;
    let dns = net.start_dns(&[("plain.rest.test", net.private_v4.into())])?;
    let (api, _) = net.start_rest_api(&dir)?;
    let sandbox = Sandbox::new("l7-plain")?;
    let policy = PolicyFile::new(&policy_yaml(&format!(
        "      - host: plain.rest.test\n        port: {REST_HTTP_PORT}\n        access: read-only\n        allowed_ips: [\"{}/24\"]\n",
        net.private_v4
    )))?;
    let dns_args = dns.agent_args();
    let agent = Agent::start(&sandbox, &policy, &[&dns_args[0], &dns_args[1], "--ca-dir", &dir.file("ca")])?;
    let url = format!("http://plain.rest.test:{REST_HTTP_PORT}/items/../x");
    let read = curl_i(&sandbox, &["--noproxy", "*", "--path-as-is", &url])?;
    assert_eq!((read.status, &read.json()["target"]), (200, &Value::from("/x")), "{}", read.body);
    let write = curl_i(&sandbox, &["--noproxy", "*", "-X", "DELETE", &url])?;
    assert_denied(&write, "access: read-only", "DELETE /x not permitted by policy");
    // The agent's lines are read from its stderr by another thread: waited for, then counted.
    let logged = agent.log.wait_for_count("both requests logged", 2, |e| e["event"] == "request")?;
    assert_eq!(logged.len(), 2, "{logged:?}");
    let reached = api.events.wait_for_count("the allowed request at the API", 1, |e| e["kind"] == "request")?;
    assert_eq!(reached.len(), 1, "the denied request never reached the API: {reached:?}");
    Ok(())
}

#[test]
fn an_inspected_endpoint_refuses_what_is_not_http_or_tls() -> Result<()> {
    require_root();
    let setup = Setup::new("l7-opaque", &rest_endpoint("        access: full\n"))?;
    // The name resolved through the agent, then bytes that are neither TLS nor HTTP.
    let script = "import socket,sys\ns=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\ns.sendall(b'\\x00\\x01raw')\ntry:\n    print(repr(s.recv(100)))\nexcept OSError as e:\n    print(type(e).__name__)";
    let port = REST_TLS_PORT.to_string();
    let (pid, output) = run_in(&setup.sandbox, PYTHON, &["-c", script, REST_API_HOST, &port])?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ConnectionResetError\n");
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "denied");
    ensure!(log["reason"].as_str().is_some_and(|r| r.contains("inspected endpoint")), "{log}");
    assert!(setup.api.events.matching(|e| e["kind"] != "ready").is_empty(), "nothing reached the origin");
    Ok(())
}

#[test]
fn a_client_slow_to_send_its_client_hello_to_an_inspected_endpoint_is_waited_for() -> Result<()> {
    require_root();
    let setup = Setup::new("l7-slow-hello", &rest_endpoint("        access: full\n"))?;
    // Connects, then says nothing for a second (far past the 300 ms first-byte
    // timeout) before its TLS handshake, as a JVM warming up on a busy machine does.
    let script = "import socket,ssl,sys,time\n\
        s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\n\
        time.sleep(1)\n\
        t=ssl.create_default_context(cafile=sys.argv[3]).wrap_socket(s,server_hostname=sys.argv[1])\n\
        t.sendall(b'GET /slow HTTP/1.1\\r\\nHost: '+sys.argv[1].encode()+b'\\r\\nConnection: close\\r\\n\\r\\n')\n\
        print(t.recv(100).split(b'\\r\\n')[0].decode())";
    let port = REST_TLS_PORT.to_string();
    let (_, output) = run_in(&setup.sandbox, PYTHON, &["-c", script, REST_API_HOST, &port, &setup.agent_ca])?;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "HTTP/1.1 200 OK\n",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(setup.received()[0]["target"], "/slow");
    Ok(())
}
