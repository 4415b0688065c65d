//! L7 rules for what agents send inside HTTP: MCP tool calls, JSON-RPC
//! calls, GraphQL operations and WebSocket messages, end to end through the
//! agent with real clients in the sandbox (no proxy variables) and real
//! servers in the test namespace over TLS: the official MCP Python SDK on
//! both sides, a GraphQL client library (gql) against a graphql-core server,
//! Python `websockets` on both sides.

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const MCP_HOST: &str = "mcp.l7.test";
const MCP_PORT: u16 = 9445;

/// A test namespace with one TLS server for `host`, whose test CA the agent
/// trusts upstream, and an agent whose own CA the sandbox's clients trust.
struct Setup {
    // Dropped in this order: the agent detaches from the sandbox before its cgroup goes.
    agent: Agent,
    sandbox: Sandbox,
    policy: PolicyFile,
    agent_ca: String,
    control_socket: String,
    certificate: TestCertificate,
    net: TestNet,
    _dns: Dns,
    _dir: TempDir,
}

impl Setup {
    fn new(name: &str, host: &str, endpoints: &str) -> Result<Self> {
        let net = TestNet::new()?;
        let dir = TempDir::new(name)?;
        let dns = net.start_dns(&[(host, net.v4.into())])?;
        let certificate = TestCertificate::new(&dir, name, vec![host.to_owned()])?;
        let sandbox = Sandbox::new(name)?;
        let policy = PolicyFile::new(&policy_yaml(endpoints))?;
        let ca_dir = dir.file("ca");
        let upstream_ca = certificate.ca.to_str().context("utf-8 path")?.to_owned();
        let dns_args = dns.agent_args();
        let control_socket = unique_control_socket();
        let args = [
            dns_args[0].as_str(),
            dns_args[1].as_str(),
            "--ca-dir",
            &ca_dir,
            "--upstream-ca",
            &upstream_ca,
            "--control-socket",
            &control_socket,
        ];
        let agent = Agent::start(&sandbox, &policy, &args)?;
        let exported = run(agent_bin().to_str().context("utf-8 path")?, &["ca", "export", "--ca-dir", &ca_dir])?;
        let agent_ca = dir.file("agent-ca.pem");
        std::fs::write(&agent_ca, &exported.stdout)?;
        Ok(Self { agent, sandbox, policy, agent_ca, control_socket, certificate, net, _dns: dns, _dir: dir })
    }

    /// Starts tests/support/`script` in the namespace with the server's
    /// certificate (`--cert`, `--key`) and `args`.
    fn start_server(&self, script: &str, args: &[&str]) -> Result<Servers> {
        let cert = self.certificate.cert.to_str().context("utf-8 path")?;
        let key = self.certificate.key.to_str().context("utf-8 path")?;
        self.net.start_support_server(script, &[&["--cert", cert, "--key", key], args].concat())
    }

    /// Runs a tests/support/ Python script in the sandbox; its JSON lines.
    fn python(&self, script: &str, args: &[&str]) -> Result<Vec<Value>> {
        let script = support_file(script);
        let (_, output) = run_in(&self.sandbox, PYTHON, &[&[script.to_str().context("utf-8 path")?], args].concat())?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "{script:?} failed: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout.lines().map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))).collect()
    }

    fn request_logs(&self) -> Vec<Value> {
        self.agent.log.matching(|e| e["event"] == "request")
    }
}

fn policy_yaml(endpoints: &str) -> String {
    format!(
        "version: 1\nnetwork_policies:\n  agents:\n    endpoints:\n{endpoints}    binaries:\n      - path: \"/**\"\n"
    )
}

fn step<'a>(lines: &'a [Value], name: &str) -> Result<&'a Value> {
    lines.iter().find(|line| line["step"] == name).with_context(|| format!("no step {name} in {lines:?}"))
}

#[test]
fn mcp_tool_calls_through_the_official_sdk_are_decided_one_by_one() -> Result<()> {
    require_root();
    let endpoint = format!(
        "      - host: {MCP_HOST}\n        port: {MCP_PORT}\n        protocol: mcp\n        enforcement: enforce\n        \
         rules:\n          - allow: {{ method: initialize }}\n          - allow: {{ method: notifications/initialized }}\n          \
         - allow: {{ method: tools/list }}\n          - allow: {{ method: tools/call, tool: search }}\n"
    );
    let setup = Setup::new("l7-mcp", MCP_HOST, &endpoint)?;
    let port = MCP_PORT.to_string();
    let server = setup.start_server("mcp_server.py", &["--port", &port, "--host-name", MCP_HOST])?;
    let url = format!("https://{MCP_HOST}:{MCP_PORT}/mcp");
    let lines = setup
        .python("mcp_client.py", &["--url", &url, "--cafile", &setup.agent_ca, "search=sandbox", "delete_repo=all"])?;

    assert_eq!(step(&lines, "initialize")?["ok"], true, "{lines:?}");
    assert_eq!(step(&lines, "tools/list")?["tools"], serde_json::json!(["delete_repo", "search"]), "{lines:?}");
    let search = step(&lines, "tools/call search")?;
    assert_eq!((&search["ok"], &search["text"]), (&Value::Bool(true), &Value::from("3 results for sandbox")));
    // The denial reaches the agent through the SDK as a JSON-RPC error with the policy's reason.
    let denied = step(&lines, "tools/call delete_repo")?;
    assert_eq!(denied["ok"], false, "{denied}");
    assert_eq!(denied["code"], -32001, "{denied}");
    let message = denied["message"].as_str().unwrap_or_default();
    assert!(message.contains("not permitted by policy") && message.contains("tools/call delete_repo"), "{denied}");
    assert_eq!(denied["data"]["policy"], "agents", "{denied}");
    assert_eq!(denied["data"]["rule"], "4 rules", "{denied}");

    let calls: Vec<Value> = server.events.matching(|e| e["kind"] == "tool_call");
    let names: Vec<&str> = calls.iter().filter_map(|call| call["name"].as_str()).collect();
    assert_eq!(names, ["search"], "the denied call never reached the server: {calls:?}");

    let logs = setup.request_logs();
    let tool_line = |tool: &str| logs.iter().find(|line| line["tool"] == tool).cloned();
    let allowed = tool_line("search").context("a line for the search call")?;
    assert_eq!((&allowed["verdict"], &allowed["rpc_method"]), (&Value::from("allowed"), &Value::from("tools/call")));
    assert_eq!(allowed["rule"], "rules[3]", "{allowed}");
    let refused = tool_line("delete_repo").context("a line for the delete_repo call")?;
    assert_eq!(refused["verdict"], "denied", "{refused}");
    assert!(refused.get("arguments").is_none(), "arguments are never logged: {refused}");
    ensure!(
        !logs.iter().any(|line| line.to_string().contains("\"all\"")),
        "a tool's arguments appear in the log: {logs:?}"
    );
    Ok(())
}

const GRAPHQL_HOST: &str = "graphql.l7.test";
const GRAPHQL_PORT: u16 = 9446;
/// Served by the server by its sha256 hash; registered with the policy.
const REGISTERED_QUERY: &str = "query Viewer { viewer { login } }";
/// Served by the server too, but unknown to the policy.
const UNREGISTERED_QUERY: &str = "query Secrets { secrets }";

fn sha256_hex(text: &str) -> Result<String> {
    let output = std::process::Command::new(PYTHON)
        .args(["-c", "import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())", text])
        .output()?;
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

#[test]
fn graphql_operations_are_decided_by_type_name_and_root_fields() -> Result<()> {
    require_root();
    let registered = sha256_hex(REGISTERED_QUERY)?;
    let unregistered = sha256_hex(UNREGISTERED_QUERY)?;
    let endpoints = format!(
        "      - host: {GRAPHQL_HOST}\n        port: {GRAPHQL_PORT}\n        path: /ro\n        protocol: graphql\n        \
         enforcement: enforce\n        access: read-only\n\
         \x20     - host: {GRAPHQL_HOST}\n        port: {GRAPHQL_PORT}\n        path: /graphql\n        protocol: graphql\n        \
         enforcement: enforce\n        persisted_queries: allow_registered\n        graphql_persisted_queries:\n          \
         {registered}: {{ operation_type: query, operation_name: Viewer, fields: [viewer] }}\n        rules:\n          \
         - allow: {{ operation_type: query, fields: [viewer, repository] }}\n          \
         - allow: {{ operation_type: mutation, fields: [createIssue] }}\n"
    );
    let setup = Setup::new("l7-graphql", GRAPHQL_HOST, &endpoints)?;
    let port = GRAPHQL_PORT.to_string();
    let server = setup.start_server(
        "graphql_server.py",
        &["--port", &port, "--persisted", REGISTERED_QUERY, "--persisted", UNREGISTERED_QUERY],
    )?;
    let client = |path: &str, steps: &[&str]| {
        let url = format!("https://{GRAPHQL_HOST}:{GRAPHQL_PORT}{path}");
        setup.python("graphql_client.py", &[&["--url", url.as_str(), "--cafile", &setup.agent_ca], steps].concat())
    };

    // access: read-only: queries pass, a mutation is refused in GraphQL's own terms, and so is
    // a batch holding one.
    let read_only = client(
        "/ro",
        &[
            "query=query { viewer { login } }",
            "mutation=mutation { createIssue(title: \"x\") { title } }",
            "batch=query { viewer { login } };;mutation { deleteRepository(name: \"r\") }",
        ],
    )?;
    assert_eq!(step(&read_only, "query")?["data"]["viewer"]["login"], "sandbox", "{read_only:?}");
    let mutation = step(&read_only, "mutation")?;
    assert_eq!(mutation["ok"], false, "{mutation}");
    let error = &mutation["errors"][0];
    assert!(error["message"].as_str().unwrap_or_default().contains("GraphQL operation blocked by endpoint policy"));
    assert_eq!(
        (&error["extensions"]["policy"], &error["extensions"]["rule"]),
        (&Value::from("agents"), &Value::from("access: read-only"))
    );
    assert_eq!(step(&read_only, "batch")?["ok"], false, "{read_only:?}");

    // Rules: root fields by name, persisted queries by their registered classification.
    let ruled = client(
        "/graphql",
        &[
            "fields=query { viewer { login } alias: repository(name: \"x\") { name } }",
            "secrets=query { secrets }",
            &format!("persisted={registered}"),
            &format!("persisted={unregistered}"),
        ],
    )?;
    assert_eq!(step(&ruled, "fields")?["data"]["alias"]["name"], "x", "{ruled:?}");
    let secrets = step(&ruled, "secrets")?;
    assert_eq!(secrets["ok"], false, "{secrets}");
    let persisted: Vec<&Value> = ruled.iter().filter(|line| line["step"] == "persisted").collect();
    assert_eq!(persisted[0]["data"]["viewer"]["login"], "sandbox", "{persisted:?}");
    assert_eq!(persisted[1]["status"], 403, "{persisted:?}");
    let reason = persisted[1]["errors"][0]["extensions"]["reason"].as_str().unwrap_or_default();
    let message = persisted[1]["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("GraphQL persisted query is not registered"), "{message} ({reason})");

    // What reached the server: only the allowed operations, in order.
    let operations: Vec<(String, Option<String>)> = server
        .events
        .matching(|e| e["kind"] == "operation")
        .iter()
        .map(|op| (op["type"].as_str().unwrap_or_default().to_owned(), op["name"].as_str().map(str::to_owned)))
        .collect();
    assert_eq!(
        operations,
        [("query".into(), None), ("query".into(), None), ("query".into(), Some("Viewer".into()))],
        "denied operations never reached the server"
    );
    let logs = setup.request_logs();
    let denied: Vec<&Value> = logs.iter().filter(|line| line["verdict"] == "denied").collect();
    ensure!(denied.iter().any(|line| line["operation_type"] == "mutation"), "{denied:?}");
    ensure!(denied.iter().any(|line| line["fields"] == "secrets"), "{denied:?}");
    ensure!(denied.iter().any(|line| line["message"] == "persisted_query"), "{denied:?}");
    Ok(())
}

const WS_HOST: &str = "ws.l7.test";
const WS_TLS_PORT: u16 = 9447;

fn websocket_endpoints() -> String {
    format!(
        "      - host: {WS_HOST}\n        port: {WS_TLS_PORT}\n        path: /ro/**\n        protocol: websocket\n        \
         enforcement: enforce\n        access: read-only\n\
         \x20     - host: {WS_HOST}\n        port: {WS_TLS_PORT}\n        path: /rw/**\n        protocol: websocket\n        \
         enforcement: enforce\n        rules:\n          - allow: {{ method: GET, path: /rw/** }}\n          \
         - allow: {{ method: WEBSOCKET_TEXT, path: /rw/** }}\n        deny_rules:\n          \
         - {{ method: WEBSOCKET_TEXT, path: /rw/admin }}\n"
    )
}

fn websocket_setup(name: &str) -> Result<(Setup, Servers)> {
    let setup = Setup::new(name, WS_HOST, &websocket_endpoints())?;
    let port = WS_TLS_PORT.to_string();
    let server = setup.start_server("ws_server.py", &["--port", &port])?;
    Ok((setup, server))
}

fn ws_url(path: &str) -> String {
    format!("wss://{WS_HOST}:{WS_TLS_PORT}{path}")
}

#[test]
fn websocket_text_messages_are_decided_one_by_one_and_refused_with_1008() -> Result<()> {
    require_root();
    let (setup, server) = websocket_setup("l7-ws")?;
    let client = |path: &str, extra: &[&str]| {
        let url = ws_url(path);
        setup.python("ws_client.py", &[&["--url", url.as_str(), "--cafile", &setup.agent_ca], extra].concat())
    };

    // access: read-only: the upgrade passes, a text message does not.
    let read_only = client("/ro/chat", &["hello"])?;
    assert_eq!(read_only.last().context("a line")?["closed"], 1008, "{read_only:?}");
    let reason = read_only.last().unwrap()["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("WEBSOCKET_TEXT /ro/chat not permitted by policy"), "{reason}");

    // Compressed (the client's default): each message inflated, decided, then echoed.
    let compressed = client("/rw/chat", &["one", "two"])?;
    assert_eq!(compressed[0]["deflate"], true, "permessage-deflate was negotiated: {compressed:?}");
    let echoes: Vec<&Value> = compressed.iter().filter_map(|line| line.get("echo")).collect();
    assert_eq!(echoes, [&Value::from("one"), &Value::from("two")], "{compressed:?}");
    let plain = client("/rw/chat", &["--no-compression", "plain"])?;
    assert_eq!((&plain[0]["deflate"], &plain[1]["echo"]), (&Value::Bool(false), &Value::from("plain")));

    // A deny rule on the upgrade's path: 1008, compressed or not.
    let admin = client("/rw/admin", &["drop everything"])?;
    assert_eq!(admin.last().context("a line")?["closed"], 1008, "{admin:?}");
    assert!(admin.last().unwrap()["reason"].as_str().unwrap_or_default().contains("blocked by deny rule"));

    let seen: Vec<(String, String)> = server
        .events
        .matching(|e| e["kind"] == "message")
        .iter()
        .map(|m| (m["path"].as_str().unwrap_or_default().to_owned(), m["text"].as_str().unwrap_or_default().to_owned()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/rw/chat".to_owned(), "one".to_owned()),
            ("/rw/chat".to_owned(), "two".to_owned()),
            ("/rw/chat".to_owned(), "plain".to_owned()),
        ],
        "refused messages never reached the server"
    );
    let texts: Vec<(String, String)> = setup
        .request_logs()
        .iter()
        .filter(|line| line["method"] == "WEBSOCKET_TEXT")
        .map(|line| {
            (
                line["path"].as_str().unwrap_or_default().to_owned(),
                line["verdict"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        texts,
        [
            ("/ro/chat".to_owned(), "denied".to_owned()),
            ("/rw/chat".to_owned(), "allowed".to_owned()),
            ("/rw/chat".to_owned(), "allowed".to_owned()),
            ("/rw/chat".to_owned(), "allowed".to_owned()),
            ("/rw/admin".to_owned(), "denied".to_owned()),
        ]
    );

    // Denied messages are what `policy suggest` proposes to allow, kept
    // when their connections close.
    setup.agent.log.wait_for_count("the sessions with a denied message closed", 2, |line| {
        line["event"] == "connection" && line["requests_denied"] == 1
    })?;
    let suggested = run(
        agent_bin().to_str().context("utf-8 path")?,
        &["policy", "suggest", "--control-socket", &setup.control_socket, "--since", "10m"],
    )?;
    let suggested = String::from_utf8_lossy(&suggested.stdout);
    for path in ["/ro/chat", "/rw/admin"] {
        assert!(suggested.contains(&format!("WEBSOCKET_TEXT {path} denied 1 time")), "{suggested}");
    }
    Ok(())
}

#[test]
fn a_policy_reload_closes_inspected_websocket_sessions_with_1012() -> Result<()> {
    require_root();
    let (setup, _server) = websocket_setup("l7-ws-reload")?;
    let script = support_file("ws_client.py");
    let url = ws_url("/rw/chat");
    let mut command = setup.sandbox.command(PYTHON);
    command.arg(&script).args(["--url", &url, "--cafile", &setup.agent_ca, "--wait-close", "--wait", "20", "first"]);
    let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
    let lines = JsonLines::follow_stdout(child.stdout.take().context("stdout")?);
    lines.wait_for("the first message echoed and the session waiting", |line| line["waiting"] == true)?;
    // Any change of the file is a new generation.
    setup.policy.write(&policy_yaml(&format!("{}      # reloaded\n", websocket_endpoints())))?;
    let closed = lines.wait_for("the session closed", |line| line.get("closed").is_some())?;
    let status = child.wait()?;
    ensure!(status.success(), "the client failed: {status}");
    assert_eq!(closed["closed"], 1012, "{closed}");
    let connection = setup
        .agent
        .log
        .wait_for("the session's close line", |e| e["event"] == "connection" && e["protocol"] == "websocket")?;
    assert!(connection["error"].as_str().unwrap_or_default().contains("1012"), "{connection}");
    Ok(())
}
