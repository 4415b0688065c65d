//! OCSF events and the policy advisor, end to end: the agent run with
//! `--log-format ocsf`, real clients in the sandbox (curl, getent, Python),
//! every line the agent writes checked against the official OCSF schema
//! (tests/support/ocsf_validate.py); and `policy suggest` from the daemon's
//! recent denials, its YAML checked with `policy check` and `policy eval`,
//! then loaded by the agent and tried live.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const BLOCKED_HOST: &str = "blocked.test";

/// The REST API in a test namespace as api.rest.test (TLS, inspected,
/// read-only) and on its private address (plain HTTP through the private-IP
/// gate, inspected, any request); dnsmasq answering its name and
/// blocked.test; an agent logging OCSF, with a control socket of its own.
struct Setup {
    // Dropped in this order: the agent detaches from the sandbox before its cgroup goes.
    agent: Agent,
    sandbox: Sandbox,
    policy: PolicyFile,
    socket: String,
    agent_ca: String,
    net: TestNet,
    _api: Servers,
    _dns: Dns,
    dir: TempDir,
}

impl Setup {
    fn new(name: &str) -> Result<Self> {
        let net = TestNet::new()?;
        let dir = TempDir::new(name)?;
        let dns = net.start_dns(&[(REST_API_HOST, net.v4.into()), (BLOCKED_HOST, net.v4.into())])?;
        let (api, rest_ca) = net.start_rest_api(&dir)?;
        let sandbox = Sandbox::new(name)?;
        let policy = PolicyFile::new(&format!(
            "version: 1\nnetwork_policies:\n  rest:\n    endpoints:\n      - host: {REST_API_HOST}\n        port: \
             {REST_TLS_PORT}\n        protocol: rest\n        enforcement: enforce\n        access: read-only\n      \
             - host: \"{ip}\"\n        port: {REST_HTTP_PORT}\n        allowed_ips: [\"{ip}/32\"]\n        protocol: \
             rest\n        enforcement: enforce\n        access: full\n    binaries:\n      - path: /usr/bin/curl\n",
            ip = net.private_v4
        ))?;
        let ca_dir = dir.file("ca");
        let socket = unique_control_socket();
        let dns_args = dns.agent_args();
        let rest_ca = rest_ca.to_str().context("utf-8 path")?;
        let args = [
            dns_args[0].as_str(),
            dns_args[1].as_str(),
            "--ca-dir",
            &ca_dir,
            "--upstream-ca",
            rest_ca,
            "--control-socket",
            &socket,
        ];
        let agent = Agent::start_with_format(&sandbox, &policy, &args, &[], "ocsf")?;
        let exported = run(agent_bin().to_str().context("utf-8 path")?, &["ca", "export", "--ca-dir", &ca_dir])?;
        let agent_ca = dir.file("agent-ca.pem");
        std::fs::write(&agent_ca, &exported.stdout)?;
        Ok(Self { agent, sandbox, policy, socket, agent_ca, net, _api: api, _dns: dns, dir })
    }

    /// `curl -i` in the sandbox to the REST API over TLS, trusting the agent's CA.
    fn curl_api(&self, args: &[&str], path: &str) -> Result<HttpResponse> {
        let url = format!("https://{REST_API_HOST}:{REST_TLS_PORT}{path}");
        curl_i(&self.sandbox, &[&["--noproxy", "*", "--cacert", &self.agent_ca], args, &[&url]].concat())
    }

    /// curl in the sandbox to blocked.test at the test host's address (its
    /// SNI blocked.test), not verifying the certificate: (pid, succeeded).
    fn curl_blocked(&self) -> Result<(u32, bool)> {
        let resolve = format!("{BLOCKED_HOST}:{REST_TLS_PORT}:{}", self.net.v4);
        let url = format!("https://{BLOCKED_HOST}:{REST_TLS_PORT}/");
        let (pid, output) =
            run_in(&self.sandbox, "curl", &["-sS", "-k", "--noproxy", "*", "-m", "10", "--resolve", &resolve, &url])?;
        Ok((pid, output.status.success()))
    }

    /// The first OCSF event of `class_uid` by process `pid` matching `more`.
    fn event_of(&self, class_uid: u64, pid: u32, more: impl Fn(&Value) -> bool) -> Result<Value> {
        self.agent.log.wait_for(&format!("OCSF {class_uid} event of pid {pid}"), |e| {
            e["class_uid"] == class_uid && e["actor"]["process"]["pid"] == pid && more(e)
        })
    }

    /// `sandbox-egress ARGS`: (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let output = Command::new(agent_bin()).args(args).output()?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Ok((output.status.success(), text(&output.stdout), text(&output.stderr)))
    }
}

#[test]
fn each_kind_of_event_is_valid_ocsf() -> Result<()> {
    require_root();
    let mut setup = Setup::new("ocsf-events")?;
    let net_v4 = setup.net.v4.to_string();

    // An allowed plain-HTTP request, through the private-IP gate to an inspected endpoint.
    let (http_pid, output) =
        curl(Some(&setup.sandbox), &format!("http://{}:{REST_HTTP_PORT}/items?x=1", setup.net.private_v4))?;
    ensure!(String::from_utf8_lossy(&output.stdout).starts_with("200 "), "{output:?}");
    // A denied TLS connection: its SNI is in no policy.
    let (tls_pid, connected) = setup.curl_blocked()?;
    ensure!(!connected, "blocked.test was reached");
    // A refused DNS name and an answered one.
    let (_, refused) = run_in(&setup.sandbox, "getent", &["ahostsv4", "refused.test"])?;
    ensure!(!refused.status.success(), "refused.test resolved");
    let (_, answered) = run_in(&setup.sandbox, "getent", &["ahostsv4", REST_API_HOST])?;
    ensure!(answered.status.success(), "{REST_API_HOST} not resolved: {answered:?}");
    // A denied L7 request.
    let post = setup.curl_api(&["-X", "POST", "-d", "{}"], "/v1/items")?;
    assert_eq!(post.status, 403, "{}", post.body);

    let request = setup.event_of(4002, http_pid, |_| true)?;
    assert_eq!((request["activity_id"].as_u64(), request["action_id"].as_u64()), (Some(3), Some(1)), "{request}");
    assert_eq!(request["http_request"]["http_method"], "GET");
    assert_eq!(request["http_request"]["url"]["path"], "/items");
    assert_eq!(request["dst_endpoint"]["ip"], setup.net.private_v4.to_string());
    assert_eq!(request["dst_endpoint"]["port"], REST_HTTP_PORT);
    assert_eq!(request["firewall_rule"]["name"], "rest");
    assert_eq!(request["src_endpoint"]["ip"], "127.0.0.1", "{request}");
    let opened = setup.event_of(4001, http_pid, |e| e["activity_id"] == 1)?;
    assert_eq!(opened["disposition_id"], 1, "{opened}");
    let closed = setup.event_of(4001, http_pid, |e| e["activity_id"] == 2)?;
    assert_eq!((closed["disposition_id"].as_u64(), closed["status_id"].as_u64()), (Some(1), Some(1)), "{closed}");
    assert!(closed["traffic"]["bytes_in"].as_u64() > Some(0), "{closed}");
    assert_eq!(closed["app_protocol_name"], "http");
    assert_eq!(closed["src_endpoint"], opened["src_endpoint"]);

    let refused_tls = setup.event_of(4001, tls_pid, |e| e["activity_id"] == 5)?;
    assert_eq!(refused_tls["type_uid"], 400105);
    assert_eq!((refused_tls["action_id"].as_u64(), refused_tls["disposition_id"].as_u64()), (Some(2), Some(2)));
    assert_eq!(refused_tls["dst_endpoint"]["hostname"], BLOCKED_HOST, "{refused_tls}");
    assert_eq!(refused_tls["dst_endpoint"]["ip"], net_v4);
    assert_eq!(refused_tls["dst_endpoint"]["port"], REST_TLS_PORT);
    assert_eq!(refused_tls["app_protocol_name"], "tls");
    let reason = refused_tls["status_detail"].as_str().unwrap_or_default();
    ensure!(reason.contains(BLOCKED_HOST), "reason {reason:?}");
    let process = &refused_tls["actor"]["process"];
    assert_eq!((process["name"].as_str(), process["file"]["path"].as_str()), (Some("curl"), Some("/usr/bin/curl")));
    assert_eq!(process["sandbox"], "default");
    assert_eq!(refused_tls["actor"]["user"]["uid"], "0");
    assert!(refused_tls.get("firewall_rule").is_none(), "no policy decided it: {refused_tls}");
    assert!(opened_for(&setup, tls_pid).is_empty(), "a refused connection never opened");

    let dns_refused = setup
        .agent
        .log
        .wait_for("refused.test's DNS event", |e| e["class_uid"] == 4003 && e["query"]["hostname"] == "refused.test")?;
    assert_eq!((dns_refused["rcode_id"].as_u64(), dns_refused["disposition_id"].as_u64()), (Some(5), Some(2)));
    assert_eq!(dns_refused["query"]["type"], "A");
    assert_eq!(dns_refused["status_detail"], "not a host of any policy");
    assert_eq!(dns_refused["unmapped"]["sandbox"], "default");
    let dns_answered = setup.agent.log.wait_for("api.rest.test's DNS event", |e| {
        e["class_uid"] == 4003 && e["query"]["hostname"] == REST_API_HOST && e["query"]["type"] == "A"
    })?;
    assert_eq!((dns_answered["rcode_id"].as_u64(), dns_answered["action_id"].as_u64()), (Some(0), Some(1)));
    assert_eq!(dns_answered["answers"][0]["rdata"], net_v4, "{dns_answered}");

    let denied = setup.event_of(4002, post.pid, |e| e["disposition_id"] == 2)?;
    assert_eq!((denied["activity_id"].as_u64(), denied["type_uid"].as_u64()), (Some(6), Some(400206)), "{denied}");
    assert_eq!(denied["http_response"]["code"], 403);
    assert_eq!(denied["http_request"]["url"]["hostname"], REST_API_HOST);
    assert_eq!(denied["firewall_rule"]["name"], "rest");
    assert_eq!(denied["firewall_rule"]["uid"], "access: read-only");
    assert_eq!(denied["status_detail"], "POST /v1/items not permitted by policy");

    // Stopped, the agent's last event is its lifecycle's; then every line it wrote is checked.
    setup.agent.terminate()?;
    setup.agent.log.wait_for("the stop event", |e| e["class_uid"] == 6002 && e["activity_id"] == 4)?;
    let lines = setup.agent.log.raw_lines();
    assert_eq!(lines.len(), setup.agent.log.all().len(), "every line is a JSON event:\n{}", lines.join("\n"));
    let report = validate_ocsf(&lines)?;
    for class in ["\"0\"", "\"4001\"", "\"4002\"", "\"4003\"", "\"6002\""] {
        ensure!(report.contains(&format!("{class}: ")), "no event of class {class}: {report}");
    }
    eprintln!("{report}");
    // The check is strict: an attribute OCSF does not define, or one missing, fails it.
    let mut unknown = refused_tls.clone();
    unknown["sandbox_name"] = "default".into();
    let mut missing = refused_tls;
    missing.as_object_mut().context("an object")?.remove("time");
    for broken in [unknown, missing] {
        ensure!(validate_ocsf(&[broken.to_string()]).is_err(), "accepted: {broken}");
    }
    Ok(())
}

fn opened_for(setup: &Setup, pid: u32) -> Vec<Value> {
    setup.agent.log.matching(|e| e["class_uid"] == 4001 && e["activity_id"] == 1 && e["actor"]["process"]["pid"] == pid)
}

/// `policy eval FILE ARGS`: its verdict lines (`allow: ...`, `request deny: ...`).
fn eval(setup: &Setup, file: &str, args: &[&str]) -> Result<Vec<String>> {
    let (ok, stdout, stderr) = setup.cli(&[&["policy", "eval", file], args].concat())?;
    ensure!(ok, "policy eval {args:?}: {stderr}");
    Ok(stdout
        .lines()
        .filter(|line| ["allow", "deny", "request allow", "request deny"].iter().any(|v| line.starts_with(v)))
        .map(str::to_owned)
        .collect())
}

fn connection_verdict(setup: &Setup, file: &str, host: &str, port: u16, binary: &str) -> Result<String> {
    let port = port.to_string();
    let lines = eval(setup, file, &["--host", host, "--port", &port, "--binary", binary])?;
    let verdict = lines.first().context("no verdict line")?;
    Ok(verdict.split(':').next().unwrap_or_default().to_owned())
}

fn request_verdict(setup: &Setup, file: &str, method: &str, path: &str) -> Result<String> {
    let port = REST_TLS_PORT.to_string();
    let args =
        ["--host", REST_API_HOST, "--port", &port, "--binary", "/usr/bin/curl", "--method", method, "--path", path];
    let lines = eval(setup, file, &args)?;
    let verdict = lines.iter().find(|line| line.starts_with("request")).context("no request verdict")?;
    Ok(verdict.split(':').next().unwrap_or_default().to_owned())
}

#[test]
fn policy_suggest_allows_what_was_denied_and_nothing_next_to_it() -> Result<()> {
    require_root();
    let setup = Setup::new("ocsf-suggest")?;
    let (tls_pid, connected) = setup.curl_blocked()?;
    ensure!(!connected, "blocked.test was reached");
    setup.event_of(4001, tls_pid, |e| e["activity_id"] == 5)?;
    let post = setup.curl_api(&["-X", "POST", "-d", "{}"], "/v1/items")?;
    assert_eq!(post.status, 403, "{}", post.body);
    let closed = setup.event_of(4001, post.pid, |e| e["activity_id"] == 2)?;
    assert_eq!(closed["disposition_id"], 2, "opened, then closed with a request denied: {closed}");

    // On its own: a file that loads, allows each denial and nothing next to it.
    let (ok, suggested, stderr) = setup.cli(&[
        "policy",
        "suggest",
        "--control-socket",
        &setup.socket,
        "--sandbox",
        "default",
        "--since",
        "10m",
    ])?;
    ensure!(ok, "policy suggest: {stderr}");
    let file = setup.dir.file("suggested.yaml");
    std::fs::write(&file, &suggested)?;
    let (ok, _, stderr) = setup.cli(&["policy", "check", &file])?;
    ensure!(ok, "policy check of\n{suggested}\n{stderr}");
    ensure!(
        suggested
            .contains(&format!("# /usr/bin/curl -> {BLOCKED_HOST}:{REST_TLS_PORT}: 1 connection denied (tls), last ")),
        "{suggested}"
    );
    ensure!(suggested.contains("POST /v1/items denied 1 time"), "{suggested}");
    let verdict = |host: &str, port: u16, binary: &str| connection_verdict(&setup, &file, host, port, binary);
    assert_eq!(verdict(BLOCKED_HOST, REST_TLS_PORT, "/usr/bin/curl")?, "allow", "{suggested}");
    assert_eq!(verdict("other.test", REST_TLS_PORT, "/usr/bin/curl")?, "deny", "another host");
    assert_eq!(verdict(BLOCKED_HOST, REST_TLS_PORT + 1, "/usr/bin/curl")?, "deny", "another port");
    assert_eq!(verdict(BLOCKED_HOST, REST_TLS_PORT, "/usr/bin/wget")?, "deny", "another binary");
    assert_eq!(request_verdict(&setup, &file, "POST", "/v1/items")?, "request allow", "{suggested}");
    assert_eq!(request_verdict(&setup, &file, "POST", "/v1/other")?, "request deny", "another path");
    assert_eq!(request_verdict(&setup, &file, "DELETE", "/v1/items")?, "request deny", "another method");

    // Merged into the sandbox's own policy, which the agent then loads.
    let path = setup.policy.path.to_str().context("utf-8 path")?;
    let (ok, merged, stderr) = setup.cli(&["policy", "suggest", "--control-socket", &setup.socket, "--merge", path])?;
    ensure!(ok, "policy suggest --merge: {stderr}");
    let original = std::fs::read_to_string(&setup.policy.path)?;
    ensure!(merged.starts_with(&original), "the file comes first, unchanged:\n{merged}");
    let file = setup.dir.file("merged.yaml");
    std::fs::write(&file, &merged)?;
    assert_eq!(request_verdict(&setup, &file, "GET", "/v1/items")?, "request allow", "the file's own rules stay");
    setup.policy.write(&merged)?;
    setup.agent.log.wait_for("policy reload", |e| {
        e["metadata"]["event_code"] == "policy_reloaded" && e["unmapped"]["generation"] == 2
    })?;
    let post = setup.curl_api(&["-X", "POST", "-d", "{}"], "/v1/items")?;
    assert_eq!(post.status, 200, "{}", post.body);
    let delete = setup.curl_api(&["-X", "DELETE"], "/v1/items")?;
    assert_eq!(delete.status, 403, "{}", delete.body);
    let (_, connected) = setup.curl_blocked()?;
    ensure!(connected, "blocked.test still denied");
    // Another binary to the same host and port is still refused.
    let script = format!(
        "import socket, ssl\nctx = ssl.create_default_context()\nctx.check_hostname = False\nctx.verify_mode = \
         ssl.CERT_NONE\ntry:\n    ctx.wrap_socket(socket.create_connection(('{}', {REST_TLS_PORT}), timeout=10), \
         server_hostname='{BLOCKED_HOST}')\n    print('connected')\nexcept OSError as error:\n    print('refused', error)\n",
        setup.net.v4
    );
    let (python_pid, output) = run_in(&setup.sandbox, PYTHON, &["-c", &script])?;
    let said = String::from_utf8_lossy(&output.stdout);
    ensure!(said.starts_with("refused"), "python3 to blocked.test: {said}");
    setup.event_of(4001, python_pid, |e| e["activity_id"] == 5)?;
    Ok(())
}
