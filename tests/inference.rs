//! inference.local end to end: the sandbox's DNS answered by the agent, and
//! the managed inference route.

use anyhow::{ensure, Result};
use e2e::*;

/// A raw DNS exchange from Python inside the sandbox: `transport` udp or tcp,
/// to `server` (any address: the agent answers). Prints the reply's source
/// address (udp) and the address of the first A answer.
const DNS_CLIENT: &str = r#"
import socket, struct, sys
transport, server, name = sys.argv[1], sys.argv[2], sys.argv[3]
query = struct.pack('>HHHHHH', 0x5e5e, 0x0100, 1, 0, 0, 0)
query += b''.join(bytes([len(label)]) + label.encode() for label in name.split('.')) + b'\x00' + struct.pack('>HH', 1, 1)
if transport == 'udp':
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(query, (server, 53))
    reply, source = s.recvfrom(4096)
    print(f'{source[0]}:{source[1]}')
else:
    s = socket.create_connection((server, 53), timeout=5)
    s.sendall(struct.pack('>H', len(query)) + query)
    length = struct.unpack('>H', s.recv(2))[0]
    reply = b''
    while len(reply) < length:
        reply += s.recv(length - len(reply))
    print('tcp')
assert reply[:2] == b'\x5e\x5e', 'id differs'
print(socket.inet_ntoa(reply[-4:]))
"#;

#[test]
fn the_sandboxes_dns_is_answered_by_the_agent() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    // The resolver knows both names; the policy names only allowed.test.
    let dns = net.start_dns(&[("allowed.test", net.private_v4.into()), ("unlisted.test", net.private_v4.into())])?;
    let sandbox = Sandbox::new("dns")?;
    let policy = PolicyFile::new(
        "version: 1\nnetwork_policies:\n  web:\n    endpoints:\n      - host: allowed.test\n        port: 443\n    binaries: [{ path: \"/**\" }]\n",
    )?;
    let dns_args = dns.agent_args();
    let agent = Agent::start(&sandbox, &policy, &[dns_args[0].as_str(), dns_args[1].as_str()])?;

    // glibc's resolver, through /etc/resolv.conf, whatever server it names.
    for (name, expected) in [("inference.local", "240.0.0.1".to_owned()), ("allowed.test", net.private_v4.to_string())]
    {
        let (_, output) = run_in(&sandbox, "getent", &["ahostsv4", name])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            stdout.starts_with(&format!("{expected} ")),
            "getent ahostsv4 {name}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // A name of no policy endpoint is refused, not forwarded.
    let (_, output) = run_in(&sandbox, "getent", &["ahostsv4", "unlisted.test"])?;
    assert!(!output.status.success(), "unlisted.test resolved: {}", String::from_utf8_lossy(&output.stdout));
    agent.log.wait_for("the refusal logged", |e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("DNS: refused unlisted.test") && m.ends_with("not a host of any policy"))
    })?;
    let (_, output) = run_in(&sandbox, "getent", &["ahostsv6", "inference.local"])?;
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("100::1 "),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    // Any resolver address (one in the blackholed test range, so nothing
    // could leave the machine if interception failed); the reply appears to
    // come from the server the program asked.
    let server = format!("198.18.{}.53", net.v4.octets()[2]);
    let (_, output) = run_in(&sandbox, PYTHON, &["-c", DNS_CLIENT, "udp", &server, "inference.local"])?;
    ensure!(output.status.success(), "udp query: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{server}:53\n240.0.0.1\n"));

    let (_, output) = run_in(&sandbox, PYTHON, &["-c", DNS_CLIENT, "tcp", &server, "allowed.test"])?;
    ensure!(output.status.success(), "tcp query: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("tcp\n{}\n", net.private_v4));

    // Outside the sandbox nothing changes: the same UDP query gets no answer.
    let mut outside = std::process::Command::new(PYTHON);
    outside.args(["-c", DNS_CLIENT, "udp", &server, "inference.local"]);
    let output = outside.output()?;
    assert!(!output.status.success(), "a process outside the sandbox was answered by the agent");
    Ok(())
}

const OPENAI_KEY: &str = "sk-test-openai-secret";
const ANTHROPIC_KEY: &str = "sk-test-anthropic-secret";
/// Known to the test host's DNS only, not to the machine's resolver.
const PROVIDER_NAME: &str = "provider.inference.test";

/// A sandbox whose agent routes inference.local to the fake provider.
struct InferenceSetup {
    agent: Agent,
    sandbox: Sandbox,
    provider: Servers,
    dir: TempDir,
    _dns: Dns,
    _net: TestNet,
}

impl InferenceSetup {
    fn new(test: &str, route: Option<(&str, &str)>) -> Result<Self> {
        require_root();
        let net = TestNet::new()?;
        let dir = TempDir::new(test)?;
        let (provider, provider_ca) = net.start_fake_provider(&dir)?;
        // The agent resolves a provider's name with its --dns-server, as every other name.
        let dns = net.start_dns(&[(PROVIDER_NAME, net.v4.into())])?;
        let dns_args = dns.agent_args();
        std::fs::write(dir.path.join("openai.key"), OPENAI_KEY)?;
        let route = route
            .map(|(provider, model)| format!("route: {{ provider: {provider}, model: {model} }}\n"))
            .unwrap_or_default();
        let config = format!(
            "providers:\n\
             \x20 - name: openai\n    type: openai\n    base_url: https://{ip}:{PROVIDER_TLS_PORT}\n\
             \x20   credential: {{ file: {key} }}\n    ca_file: {ca}\n\
             \x20 - name: anthropic\n    type: anthropic\n    base_url: http://{PROVIDER_NAME}:{PROVIDER_HTTP_PORT}\n\
             \x20   credential: {{ env: SE_TEST_ANTHROPIC_KEY }}\n{route}",
            ip = net.v4,
            key = dir.file("openai.key"),
            ca = provider_ca.display(),
        );
        std::fs::write(dir.path.join("inference.yaml"), config)?;
        let sandbox = Sandbox::new(test)?;
        let policy = PolicyFile::new("version: 1\nnetwork_policies: {}\n")?;
        let agent = Agent::start_with_env(
            &sandbox,
            &policy,
            &[
                &dns_args[0],
                &dns_args[1],
                "--inference-config",
                &dir.file("inference.yaml"),
                "--control-socket",
                &dir.file("control.sock"),
                "--ca-dir",
                &dir.file("ca"),
            ],
            &[("SE_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)],
        )?;
        // What a sandbox would be given to trust inference.local.
        let ca =
            std::process::Command::new(agent_bin()).args(["ca", "export", "--ca-dir", &dir.file("ca")]).output()?;
        ensure!(ca.status.success(), "ca export: {}", String::from_utf8_lossy(&ca.stderr));
        std::fs::write(dir.path.join("agent-ca.pem"), &ca.stdout)?;
        drop(policy);
        Ok(Self { agent, sandbox, provider, dir, _dns: dns, _net: net })
    }

    fn control(&self, args: &[&str]) -> Result<String> {
        let output = std::process::Command::new(agent_bin())
            .arg("inference")
            .args(args)
            .args(["--socket", &self.dir.file("control.sock")])
            .output()?;
        ensure!(output.status.success(), "inference {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn last_provider_request(&self, path: &str) -> Result<serde_json::Value> {
        let requests = self.provider.events.matching(|e| e["kind"] == "request" && e["path"] == path);
        requests.last().cloned().ok_or_else(|| anyhow::anyhow!("the provider saw no {path}"))
    }
}

#[test]
fn inference_local_over_tls_gets_the_providers_credential_and_the_configured_model() -> Result<()> {
    let setup = InferenceSetup::new("inference-tls", Some(("openai", "served-model")))?;
    let response = curl_i(
        &setup.sandbox,
        &[
            "--cacert",
            &setup.dir.file("agent-ca.pem"),
            "-H",
            "Authorization: Bearer client-supplied-key",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"model":"whatever-the-client-said","messages":[{"role":"user","content":"hi"}]}"#,
            "https://inference.local/v1/chat/completions",
        ],
    )?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["model"], "served-model");

    let seen = setup.last_provider_request("/v1/chat/completions")?;
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {OPENAI_KEY}"));
    assert_eq!(seen["body"]["model"], "served-model");
    assert_eq!(seen["body"]["messages"][0]["content"], "hi");
    assert!(!seen.to_string().contains("client-supplied-key"), "the client's credential reached the provider: {seen}");

    let log = setup.agent.wait_connection_of(response.pid)?;
    assert_eq!((log["protocol"].as_str(), log["verdict"].as_str()), (Some("inference-tls"), Some("inference")));
    assert_eq!(
        (log["inference_provider"].as_str(), log["inference_model"].as_str()),
        (Some("openai"), Some("served-model"))
    );
    assert_eq!(log["inference_last_status"], 200);
    let destination = log["destination"].as_str().unwrap_or_default();
    assert!(
        ["240.0.0.1:443", "[100::1]:443"].contains(&destination),
        "curl resolved inference.local through the agent's DNS to a reserved address, not {destination}"
    );
    assert!(
        !setup.agent.log.all().iter().any(|line| line.to_string().contains(OPENAI_KEY)),
        "a credential reached the log"
    );
    Ok(())
}

/// Streams chat completions over plain HTTP with Python's http.client and
/// prints each event with the time it arrived.
const STREAMING_CLIENT: &str = r#"
import http.client, json, time
connection = http.client.HTTPConnection('inference.local', 80, timeout=10)
body = json.dumps({'model': 'anything', 'stream': True, 'messages': []})
connection.request('POST', '/v1/chat/completions', body=body, headers={'Content-Type': 'application/json', 'x-api-key': 'client-key'})
response = connection.getresponse()
events = []
buffer = b''
while True:
    chunk = response.read1(65536)
    if not chunk:
        break
    buffer += chunk
    while b'\n\n' in buffer:
        event, buffer = buffer.split(b'\n\n', 1)
        events.append({'at': time.monotonic(), 'data': event.decode()})
print(json.dumps({'status': response.status, 'events': events}))
"#;

#[test]
fn streamed_responses_reach_the_client_event_by_event_over_plain_http() -> Result<()> {
    let setup = InferenceSetup::new("inference-stream", Some(("openai", "served-model")))?;
    let (pid, output) = run_in(&setup.sandbox, PYTHON, &["-c", STREAMING_CLIENT])?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(result["status"], 200);
    let events = result["events"].as_array().unwrap();
    let data: Vec<&str> = events.iter().map(|e| e["data"].as_str().unwrap()).collect();
    assert_eq!(
        data,
        [
            r#"data: {"model": "served-model", "index": 0}"#,
            r#"data: {"model": "served-model", "index": 1}"#,
            r#"data: {"model": "served-model", "index": 2}"#,
            "data: [DONE]",
        ]
    );
    // The provider pauses 200 ms between events: relayed as they come, the
    // first arrives well before the last (buffered whole, all at once).
    let spread = events[3]["at"].as_f64().unwrap() - events[0]["at"].as_f64().unwrap();
    assert!(spread > 0.3, "events arrived together ({spread:.3} s apart): the stream was buffered");
    assert_eq!(setup.agent.wait_connection_of(pid)?["protocol"], "inference-http");
    Ok(())
}

#[test]
fn the_route_changes_without_restart_and_errors_are_clear() -> Result<()> {
    let setup = InferenceSetup::new("inference-route", Some(("openai", "served-model")))?;
    assert!(setup.control(&["get"])?.contains("openai"));
    setup.control(&["update", "--provider", "anthropic", "--model", "claude-test"])?;

    let script = r#"
import json, urllib.request
request = urllib.request.Request('http://inference.local/v1/messages', method='POST',
    data=json.dumps({'model': 'x', 'max_tokens': 5, 'messages': []}).encode(),
    headers={'Content-Type': 'application/json', 'x-api-key': 'client-key'})
print(urllib.request.urlopen(request, timeout=10).read().decode())
"#;
    let (_, output) = run_in(&setup.sandbox, PYTHON, &["-c", script])?;
    ensure!(output.status.success(), "urllib: {}", String::from_utf8_lossy(&output.stderr));
    let seen = setup.last_provider_request("/v1/messages")?;
    assert_eq!(seen["headers"]["x-api-key"], ANTHROPIC_KEY);
    assert_eq!(seen["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(seen["body"]["model"], "claude-test");

    // An endpoint the routed provider does not speak, and a path that is no endpoint.
    let mismatch = curl_i(&setup.sandbox, &["-d", "{}", "http://inference.local/v1/chat/completions"])?;
    assert_eq!(mismatch.status, 400, "{}", mismatch.body);
    assert_eq!(mismatch.json()["error"]["type"], "protocol_mismatch");
    let unknown = curl_i(&setup.sandbox, &["http://inference.local/admin"])?;
    assert_eq!(unknown.status, 403, "{}", unknown.body);
    assert_eq!(unknown.json()["error"]["type"], "forbidden");
    Ok(())
}

#[test]
fn without_a_route_inference_local_answers_503_with_the_command_to_set_one() -> Result<()> {
    let setup = InferenceSetup::new("inference-noroute", None)?;
    let response = curl_i(&setup.sandbox, &["-d", "{}", "http://inference.local/v1/chat/completions"])?;
    assert_eq!(response.status, 503, "{}", response.body);
    let error = &response.json()["error"];
    assert_eq!(error["type"], "no_route");
    assert!(error["message"].as_str().unwrap().contains("sandbox-egress inference set --provider"), "{error}");
    setup.control(&["set", "--provider", "openai", "--model", "late-model"])?;
    let response = curl_i(&setup.sandbox, &["-d", r#"{"messages":[]}"#, "http://inference.local/v1/chat/completions"])?;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(setup.last_provider_request("/v1/chat/completions")?["body"]["model"], "late-model");
    Ok(())
}
