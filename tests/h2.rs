//! HTTP/2 and gRPC on inspected endpoints, end to end: ALPN `h2` offered to
//! the sandbox only where the origin speaks it, each stream decided like an
//! HTTP/1.1 request, gRPC refusals as PERMISSION_DENIED trailers; real
//! clients in the sandbox with no proxy variables (Python grpcio, curl
//! --http2, Node's http2) against a grpcio server and a Node HTTP/2 server
//! over TLS in the test namespace, and the HTTP/1.1-only REST API.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    process::{Command, Output, Stdio},
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const GRPC_HOST: &str = "grpc.h2.test";
const GRPC_PORT: u16 = 9550;
const H2_HOST: &str = "api.h2.test";
const H2_PORT: u16 = 9551;
const TOKEN: &str = "grpc-token-3e91d0";
const POLICY: &str = "demo";
/// The REST API's private address, for plain HTTP (which goes only to
/// endpoints listing `allowed_ips`).
const PLAIN_HOST: &str = "plain.h2.test";

/// The test namespace serving gRPC as grpc.h2.test, HTTP/2-only REST as
/// api.h2.test and the HTTP/1.1-only REST API as api.rest.test; an agent
/// trusting their CAs upstream, with a credentials file whose provider
/// `grpc` holds [`TOKEN`].
struct Setup {
    agent: Agent,
    sandbox: Sandbox,
    grpc: Servers,
    h2: Servers,
    api: Servers,
    policy: PolicyFile,
    agent_ca: String,
    _net: TestNet,
    _dns: Dns,
    _dir: TempDir,
}

impl Setup {
    fn new(name: &str, endpoints: &str) -> Result<Self> {
        let net = TestNet::new()?;
        let dir = TempDir::new(name)?;
        let records = [
            (GRPC_HOST, net.v4.into()),
            (H2_HOST, net.v4.into()),
            (REST_API_HOST, net.v4.into()),
            (PLAIN_HOST, net.private_v4.into()),
        ];
        let dns = net.start_dns(&records)?;
        let (api, rest_ca) = net.start_rest_api(&dir)?;
        let TestCertificate { ca, cert, key } =
            TestCertificate::new(&dir, "h2", vec![GRPC_HOST.to_owned(), H2_HOST.to_owned()])?;
        let (cert, key) = (cert.to_str().context("utf-8 path")?, key.to_str().context("utf-8 path")?);
        let in_netns = |program: &str| {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &net.netns, program]);
            command
        };
        let mut grpc = in_netns(PYTHON);
        grpc.arg("-u").arg(support_file("grpc_server.py"));
        grpc.args(["--port", &GRPC_PORT.to_string(), "--cert", cert, "--key", key]);
        let grpc = Servers::start(grpc, None)?;
        let mut h2 = in_netns("node");
        h2.arg(support_file("h2_server.js")).args([&H2_PORT.to_string(), cert, key]);
        let h2 = Servers::start(h2, None)?;
        let upstream_ca = dir.file("upstream-cas.pem");
        std::fs::write(&upstream_ca, std::fs::read_to_string(&ca)? + &std::fs::read_to_string(&rest_ca)?)?;
        let secret = dir.file("grpc.token");
        std::fs::write(&secret, format!("{TOKEN}\n"))?;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
        let credentials = dir.file("credentials.yaml");
        std::fs::write(
            &credentials,
            format!("providers:\n  - name: grpc\n    credential: {{ file: \"{secret}\" }}\n"),
        )?;
        let sandbox = Sandbox::new(name)?;
        let endpoints = endpoints.replace("{private_v4}", &net.private_v4.to_string());
        let policy = PolicyFile::new(&policy_yaml(&endpoints))?;
        let ca_dir = dir.file("ca");
        let dns_args = dns.agent_args();
        let args = [
            dns_args[0].as_str(),
            dns_args[1].as_str(),
            "--ca-dir",
            &ca_dir,
            "--upstream-ca",
            &upstream_ca,
            "--credentials",
            &credentials,
        ];
        let agent = Agent::start(&sandbox, &policy, &args)?;
        let exported = run(agent_bin().to_str().context("utf-8 path")?, &["ca", "export", "--ca-dir", &ca_dir])?;
        let agent_ca = dir.file("agent-ca.pem");
        std::fs::write(&agent_ca, &exported.stdout)?;
        Ok(Self { agent, sandbox, grpc, h2, api, policy, agent_ca, _net: net, _dns: dns, _dir: dir })
    }

    /// The grpcio client in the sandbox, running `steps` on one channel to `host:port`.
    fn grpc_client(&self, host: &str, port: u16, steps: &[&str]) -> Command {
        let mut command = self.sandbox.command(PYTHON);
        command.env_clear().env("PATH", "/usr/bin:/bin");
        command.arg(support_file("grpc_client.py")).args([&format!("{host}:{port}"), &self.agent_ca]).args(steps);
        command
    }

    /// The results the grpcio client printed for `steps`.
    fn grpc(&self, host: &str, port: u16, steps: &[&str]) -> Result<Vec<Value>> {
        let (_, output) = spawn_and_wait(self.grpc_client(host, port, steps))?;
        json_lines(&output)
    }

    /// `curl -i --http2` in the sandbox, with `%{http_version}` after the body.
    fn curl_http2(&self, args: &[&str]) -> Result<(HttpResponse, String)> {
        let mut response = curl_i(
            &self.sandbox,
            &[&["--noproxy", "*", "--cacert", &self.agent_ca, "--http2", "-w", "\n%{http_version}"], args].concat(),
        )?;
        let (body, version) = response.body.rsplit_once('\n').context("no http_version")?;
        let version = version.to_owned();
        response.body = body.to_owned();
        Ok((response, version))
    }

    /// The calls the gRPC server received, by method.
    fn calls(&self) -> Vec<String> {
        let calls = self.grpc.events.matching(|e| e["kind"] == "call");
        calls.iter().map(|call| call["method"].as_str().unwrap_or_default().to_owned()).collect()
    }

    fn request_logs(&self, path: &str) -> Vec<Value> {
        self.agent.log.matching(|e| e["event"] == "request" && e["path"] == path)
    }
}

fn json_lines(output: &Output) -> Result<Vec<Value>> {
    ensure!(output.status.success(), "client failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|line| Ok(serde_json::from_str(line)?)).collect()
}

fn policy_yaml(endpoints: &str) -> String {
    format!(
        "version: 1\nnetwork_policies:\n  {POLICY}:\n    endpoints:\n{endpoints}    binaries:\n      - path: \"/**\"\n"
    )
}

/// The gRPC endpoint allowing `methods` of demo.Repo (`POST /demo.Repo/M`).
fn grpc_endpoint(methods: &[&str], extra: &str) -> String {
    let rules: String = methods
        .iter()
        .map(|method| {
            format!("          - allow:\n              method: POST\n              path: /demo.Repo/{method}\n")
        })
        .collect();
    format!(
        "      - host: {GRPC_HOST}\n        port: {GRPC_PORT}\n        protocol: rest\n{extra}        rules:\n{rules}"
    )
}

/// An inspected REST endpoint with full access but `/private/**`.
fn rest_endpoint(host: &str, port: u16) -> String {
    format!(
        "      - host: {host}\n        port: {port}\n        protocol: rest\n        access: full\n        deny_rules:\n          - method: \"*\"\n            path: /private/**\n"
    )
}

const ALLOWED: [&str; 5] = ["Get", "Fail", "Watch", "Release", "Echo"];

#[test]
fn grpc_calls_are_decided_per_stream_streamed_both_ways_and_refused_as_permission_denied() -> Result<()> {
    require_root();
    let setup = Setup::new("h2-grpc", &grpc_endpoint(&ALLOWED, ""))?;
    let results = setup.grpc(GRPC_HOST, GRPC_PORT, &["get", "delete", "fail", "watch", "echo"])?;
    assert_eq!(results[0], serde_json::json!({"step": "get", "ok": true, "messages": ["got:x"]}));

    let denied = &results[1];
    assert_eq!((&denied["step"], &denied["code"]), (&"delete".into(), &"PERMISSION_DENIED".into()), "{denied}");
    let details = denied["details"].as_str().unwrap_or_default();
    assert!(details.contains("POST /demo.Repo/Delete not permitted by policy"), "{details}");
    assert!(details.contains(&format!("policy '{POLICY}'")), "the policy is named: {details}");

    // The origin's own error status is relayed as it is.
    assert_eq!(
        results[2],
        serde_json::json!({"step": "fail", "ok": false, "code": "NOT_FOUND", "details": "no such repo"})
    );

    // The first message reached the client before the server sent the
    // second (it waits for Release, which the client calls on the first).
    let watch: Vec<&Value> = results.iter().filter(|result| result["step"] == "watch").collect();
    assert_eq!(watch[0]["received"], "1");
    assert_eq!(watch.last().unwrap()["messages"], serde_json::json!(["1", "2", "3"]), "{watch:?}");
    assert_eq!(results.last().unwrap()["messages"], serde_json::json!(["echo:a", "echo:b", "echo:c"]));

    assert_eq!(
        setup.calls(),
        ["/demo.Repo/Get", "/demo.Repo/Fail", "/demo.Repo/Watch", "/demo.Repo/Release", "/demo.Repo/Echo"]
    );
    let order: Vec<String> = setup
        .grpc
        .events
        .all()
        .iter()
        .filter_map(|e| match e["kind"].as_str() {
            Some("sent") => Some(format!("sent {}", e["message"].as_str().unwrap_or_default())),
            Some("call") => Some(e["method"].as_str().unwrap_or_default().to_owned()),
            _ => None,
        })
        .collect();
    let position = |what: &str| order.iter().position(|seen| seen == what).context(what.to_owned());
    ensure!(position("/demo.Repo/Release")? < position("sent 2")?, "{order:?}");

    // One line per stream, with the call and its final grpc-status.
    let get = &setup.request_logs("/demo.Repo/Get")[0];
    assert_eq!((&get["verdict"], &get["method"]), (&"allowed".into(), &"POST".into()), "{get}");
    assert_eq!(
        (&get["grpc_service"], &get["grpc_method"], &get["grpc_status"]),
        (&"demo.Repo".into(), &"Get".into(), &0.into())
    );
    let delete = &setup.request_logs("/demo.Repo/Delete")[0];
    assert_eq!(
        (&delete["verdict"], &delete["grpc_status"], &delete["policy"]),
        (&"denied".into(), &7.into(), &POLICY.into())
    );
    assert_eq!(setup.request_logs("/demo.Repo/Fail")[0]["grpc_status"], 5);
    assert_eq!(setup.request_logs("/demo.Repo/Watch").len(), 1);
    Ok(())
}

#[test]
fn a_credential_reaches_the_grpc_origin_as_authorization_metadata() -> Result<()> {
    require_root();
    let binding = "        credential_binding: { provider: grpc }\n";
    let setup = Setup::new("h2-grpc-credential", &grpc_endpoint(&ALLOWED, binding))?;
    let results = setup.grpc(
        GRPC_HOST,
        GRPC_PORT,
        &[
            "get-with-auth:Bearer SANDBOX_EGRESS_PLACEHOLDER_grpc",
            "get-with-auth:Bearer SANDBOX_EGRESS_PLACEHOLDER_other",
        ],
    )?;
    assert_eq!(results[0]["ok"], true, "{}", results[0]);
    assert_eq!(results[1]["code"], "PERMISSION_DENIED", "another provider's placeholder is refused: {}", results[1]);
    let calls = setup.grpc.events.matching(|e| e["kind"] == "call");
    assert_eq!(calls.len(), 1, "only the call with the bound placeholder reached the origin: {calls:?}");
    assert_eq!(calls[0]["metadata"]["authorization"], format!("Bearer {TOKEN}"));
    let line = &setup.request_logs("/demo.Repo/Get")[0];
    assert_eq!(line["credential"], "grpc", "{line}");
    for line in setup.agent.log.raw_lines() {
        assert!(!line.contains(TOKEN), "the secret reached the agent's log: {line}");
    }
    Ok(())
}

#[test]
fn a_reload_decides_the_next_call_on_an_open_channel() -> Result<()> {
    require_root();
    let setup = Setup::new("h2-grpc-reload", &grpc_endpoint(&ALLOWED, ""))?;
    let mut client = setup
        .grpc_client(GRPC_HOST, GRPC_PORT, &["get", "wait", "get"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = client.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(client.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    assert_eq!(serde_json::from_str::<Value>(&line)?["ok"], true, "{line}");
    setup.policy.write(&policy_yaml(&grpc_endpoint(&["Fail"], "")))?;
    setup.agent.log.wait_for("policy reload", |e| e["event"] == "policy_reloaded" && e["generation"] == 2)?;
    writeln!(stdin, "go")?;
    line.clear();
    stdout.read_line(&mut line)?;
    assert_eq!(serde_json::from_str::<Value>(&line)?["code"], "PERMISSION_DENIED", "{line}");
    ensure!(client.wait()?.success(), "client failed");
    let generations: Vec<Value> =
        setup.request_logs("/demo.Repo/Get").iter().map(|e| e["policy_generation"].clone()).collect();
    assert_eq!(generations, [1, 2]);
    let connection = setup.agent.wait_connection_of(client.id())?;
    assert_eq!(connection["requests"], 2, "one connection carried both calls: {connection}");
    Ok(())
}

#[test]
fn curl_and_node_speak_http2_and_each_stream_is_decided() -> Result<()> {
    require_root();
    let setup = Setup::new("h2-rest", &rest_endpoint(H2_HOST, H2_PORT))?;
    let url = |path: &str| format!("https://{H2_HOST}:{H2_PORT}{path}");
    let (allowed, version) = setup.curl_http2(&[&url("/repos/o/r")])?;
    assert_eq!((allowed.status, version.as_str()), (200, "2"), "{}", allowed.headers);
    assert_eq!(allowed.json()["path"], "/repos/o/r");
    let (denied, version) = setup.curl_http2(&[&url("/private/x")])?;
    assert_eq!((denied.status, version.as_str()), (403, "2"), "{}", denied.body);
    assert_eq!(denied.json()["error"], "policy_denied");
    assert_eq!(denied.json()["rule"], "deny_rules[0]");

    // Several streams at once on one connection, one of them denied, one
    // reset by the client: the others complete.
    let mut node = setup.sandbox.command("node");
    let paths = ["/a", "/private/y", "~/reset", "/b", "/c"];
    node.arg(support_file("h2_client.js")).args([&url(""), &setup.agent_ca]).args(paths);
    let streams = json_lines(&spawn_and_wait(node)?.1)?;
    let statuses: Vec<(&str, i64)> =
        streams.iter().map(|s| (s["path"].as_str().unwrap_or_default(), s["status"].as_i64().unwrap_or(0))).collect();
    assert_eq!(statuses, [("/a", 200), ("/private/y", 403), ("~/reset", 0), ("/b", 200), ("/c", 200)], "{streams:?}");
    assert_eq!(streams[2]["reset"], true, "{streams:?}");
    let mut reached: Vec<String> = setup
        .h2
        .events
        .matching(|e| e["kind"] == "request")
        .iter()
        .map(|e| e["path"].as_str().unwrap_or_default().to_owned())
        .collect();
    // The reset stream may have reached the server before its reset did.
    reached.retain(|path| path != "/reset");
    reached.sort();
    assert_eq!(reached, ["/a", "/b", "/c", "/repos/o/r"], "denied streams never reach the server");
    assert_eq!(setup.request_logs("/private/y")[0]["verdict"], "denied");
    Ok(())
}

#[test]
fn an_http1_only_origin_gets_http1_from_curl_and_a_clear_error_for_grpc() -> Result<()> {
    require_root();
    let setup = Setup::new("h2-http1-origin", &rest_endpoint(REST_API_HOST, REST_TLS_PORT))?;
    let (response, version) = setup.curl_http2(&[&format!("https://{REST_API_HOST}:{REST_TLS_PORT}/repos")])?;
    assert_eq!((response.status, version.as_str()), (200, "1.1"), "curl falls back to HTTP/1.1");

    let results = setup.grpc(REST_API_HOST, REST_TLS_PORT, &["get"])?;
    assert_eq!(results[0]["code"], "UNAVAILABLE", "{}", results[0]);
    let details = results[0]["details"].as_str().unwrap_or_default();
    assert!(details.contains("speaks only HTTP/1.1"), "the cause is named: {details}");
    let reached = setup.api.events.matching(|e| e["kind"] == "request" && e["path"] == "/demo.Repo/Get");
    assert!(reached.is_empty(), "{reached:?}");
    Ok(())
}

#[test]
fn http2_in_clear_text_is_refused_with_a_403_naming_why() -> Result<()> {
    require_root();
    let endpoint = rest_endpoint(PLAIN_HOST, REST_HTTP_PORT) + "        allowed_ips: [\"{private_v4}/24\"]\n";
    let setup = Setup::new("h2-cleartext", &endpoint)?;
    let url = format!("http://{PLAIN_HOST}:{REST_HTTP_PORT}/repos");
    let plain = curl_i(&setup.sandbox, &["--noproxy", "*", &url])?;
    assert_eq!(plain.status, 200, "HTTP/1.1 goes through: {}", plain.body);
    let prior = curl_i(&setup.sandbox, &["--noproxy", "*", "--http2-prior-knowledge", &url])?;
    assert_eq!(prior.status, 403, "{}", prior.body);
    assert!(prior.headers.starts_with("HTTP/2 403"), "{}", prior.headers);
    assert!(prior.json()["reason"].as_str().unwrap_or_default().contains("h2c"), "{}", prior.body);
    let upgrade = curl_i(&setup.sandbox, &["--noproxy", "*", "--http2", &url])?;
    assert_eq!(upgrade.status, 403, "{}", upgrade.body);
    assert!(upgrade.json()["detail"].as_str().unwrap_or_default().contains("Upgrade: h2c"), "{}", upgrade.body);
    let reached = setup.api.events.matching(|e| e["kind"] == "request");
    assert_eq!(reached.len(), 1, "only the HTTP/1.1 request reached the origin: {reached:?}");
    Ok(())
}

/// A Node HTTP/2 client that makes one request on a connection, then waits:
/// prints `{"status"}`, then `{"goaway": CODE}` or `{"closed": true}`,
/// whichever comes first.
const GOAWAY_CLIENT: &str = r#"
const http2 = require("http2"), fs = require("fs");
const [origin, ca] = process.argv.slice(1);
const session = http2.connect(origin, { ca: fs.readFileSync(ca) });
const say = (event) => { console.log(JSON.stringify(event)); };
session.on("goaway", (code) => { say({ goaway: code }); process.exit(0); });
session.on("close", () => { say({ closed: true }); process.exit(0); });
session.on("error", () => {});
const stream = session.request({ ":path": "/first" });
stream.on("response", (headers) => say({ status: headers[":status"] }));
stream.resume();
stream.end();
"#;

#[test]
fn an_open_http2_connection_gets_goaway_when_the_agent_stops() -> Result<()> {
    require_root();
    let mut setup = Setup::new("h2-goaway", &rest_endpoint(H2_HOST, H2_PORT))?;
    let origin = format!("https://{H2_HOST}:{H2_PORT}");
    let mut client = setup
        .sandbox
        .command("node")
        .args(["-e", GOAWAY_CLIENT, &origin, &setup.agent_ca])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = BufReader::new(client.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    assert_eq!(serde_json::from_str::<Value>(&line)?, serde_json::json!({"status": 200}));
    let status = setup.agent.terminate()?;
    line.clear();
    stdout.read_line(&mut line)?;
    assert_eq!(serde_json::from_str::<Value>(&line)?, serde_json::json!({"goaway": 0}), "GOAWAY (NO_ERROR) first");
    ensure!(client.wait()?.success(), "client failed");
    ensure!(status.success(), "the agent stopped cleanly: {status}");
    Ok(())
}
