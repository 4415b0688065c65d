//! The proxy protocol core end to end, through the real eBPF redirect:
//! classification, Rego policy decisions, CONNECT and absolute-form explicit
//! proxy requests, the private-IP gate, SNI/address consistency, binaries
//! rules, the 101 upgrade splice and policy reload.

use std::net::IpAddr;

use anyhow::{ensure, Result};
use e2e::*;
use serde_json::{json, Value};

/// A test host with servers and a DNS server, a sandbox and an agent.
/// Fields drop in order: the agent goes first.
struct Setup {
    agent: Agent,
    policy: PolicyFile,
    sandbox: Sandbox,
    _dns: Dns,
    servers: Servers,
    net: TestNet,
}

impl Setup {
    /// `names`: (name, address) for the agent's DNS; `policy`: YAML, given the net.
    fn new(
        test: &str,
        names: impl Fn(&TestNet) -> Vec<(&'static str, IpAddr)>,
        policy: impl Fn(&TestNet) -> String,
    ) -> Result<Self> {
        require_root();
        let net = TestNet::new()?;
        let servers = net.start_servers()?;
        let dns = net.start_dns(&names(&net))?;
        let sandbox = Sandbox::new(test)?;
        let policy = PolicyFile::new(&policy(&net))?;
        let dns_args = dns.agent_args();
        let agent = Agent::start(&sandbox, &policy, &[dns_args[0].as_str(), dns_args[1].as_str()])?;
        Ok(Self { agent, policy, sandbox, _dns: dns, servers, net })
    }

    fn proxy(&self) -> String {
        format!("http://127.0.0.1:{}", self.agent.port)
    }

    fn curl(&self, args: &[&str]) -> Result<HttpResponse> {
        curl_i(&self.sandbox, args)
    }
}

fn canonical(path: &str) -> String {
    std::fs::canonicalize(path).unwrap().display().to_string()
}

fn assert_denied_json(response: &HttpResponse, expected: Value) {
    assert_eq!(response.status, 403, "{}", response.body);
    assert!(response.headers.to_ascii_lowercase().contains("content-type: application/json"), "{}", response.headers);
    assert!(response.headers.to_ascii_lowercase().contains("connection: close"), "{}", response.headers);
    assert_eq!(response.json(), expected);
}

#[test]
fn plain_http_to_an_allowed_host_passes_and_a_denied_host_gets_a_readable_403() -> Result<()> {
    let setup = Setup::new(
        "http-allow-deny",
        |net| vec![("allowed.test", net.private_v4.into()), ("denied.test", net.private_v4.into())],
        |net| {
            format!(
            "version: 1\nnetwork_policies:\n  internal:\n    endpoints:\n      - host: allowed.test\n        port: {HTTP_PORT}\n        allowed_ips: [\"{}/24\"]\n    binaries: [{{ path: \"/**\" }}]\n",
            net.private_v4
        )
        },
    )?;
    let ip = setup.net.private_v4;
    let allowed = setup.curl(&[
        "--resolve",
        &format!("allowed.test:{HTTP_PORT}:{ip}"),
        &format!("http://allowed.test:{HTTP_PORT}/bytes/5"),
    ])?;
    assert_eq!(allowed.status, 200);
    let seen = setup.servers.events.wait_for("allowed request", |e| e["path"] == "/bytes/5")?;
    assert_eq!(seen["host"], format!("allowed.test:{HTTP_PORT}"));
    let log = setup.agent.wait_connection_of(allowed.pid)?;
    assert_eq!(
        (log["verdict"].as_str(), log["protocol"].as_str(), log["host"].as_str()),
        (Some("relayed"), Some("http"), Some("allowed.test"))
    );
    assert_eq!(log["policy"], "internal");
    assert_eq!(log["policy_generation"], 1);

    let denied = setup.curl(&[
        "--resolve",
        &format!("denied.test:{HTTP_PORT}:{ip}"),
        &format!("http://denied.test:{HTTP_PORT}/bytes/6"),
    ])?;
    assert_denied_json(
        &denied,
        json!({
            "error": "policy_denied",
            "detail": format!("GET denied.test:{HTTP_PORT} not permitted by policy"),
            "reason": format!("endpoint denied.test:{HTTP_PORT} is not allowed by any policy"),
        }),
    );
    let log = setup.agent.wait_connection_of(denied.pid)?;
    assert_eq!(log["verdict"], "denied");
    assert_eq!(log["exe"], canonical("/usr/bin/curl"));
    assert!(
        setup.servers.events.matching(|e| e["path"] == "/bytes/6").is_empty(),
        "a denied request reached the server"
    );
    Ok(())
}

#[test]
fn tls_is_decided_by_sni_and_the_name_must_stand_for_the_address() -> Result<()> {
    let setup = Setup::new(
        "tls-sni",
        |net| {
            vec![
                ("tls.test", net.v4.into()),
                ("other.test", net.v4.into()),
                // An allowed name that stands for another address.
                ("elsewhere.test", IpAddr::from([198, 18, net.v4.octets()[2], 99])),
            ]
        },
        |_| {
            format!("version: 1\nnetwork_policies:\n  web:\n    endpoints:\n      - host: tls.test\n        port: {TLS_PORT}\n      - host: elsewhere.test\n        port: {TLS_PORT}\n    binaries: [{{ path: \"/**\" }}]\n")
        },
    )?;
    let ip = setup.net.v4;
    let https = |name: &str, path: &str| -> Result<(u32, std::process::Output)> {
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
                "--resolve",
                &format!("{name}:{TLS_PORT}:{ip}"),
                &format!("https://{name}:{TLS_PORT}{path}"),
            ],
        )
    };

    let (pid, output) = https("tls.test", "/bytes/7")?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200", "{}", String::from_utf8_lossy(&output.stderr));
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(
        (log["verdict"].as_str(), log["protocol"].as_str(), log["host"].as_str()),
        (Some("relayed"), Some("tls"), Some("tls.test"))
    );

    let (pid, output) = https("other.test", "/bytes/8")?;
    assert!(!output.status.success(), "TLS to a denied SNI succeeded");
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "denied");
    assert_eq!(log["reason"], format!("endpoint other.test:{TLS_PORT} is not allowed by any policy"));

    let (pid, output) = https("elsewhere.test", "/bytes/9")?;
    assert!(!output.status.success(), "an allowed SNI reached an address it does not stand for");
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "denied");
    assert_eq!(log["reason"], format!("elsewhere.test does not resolve to {ip}, the address the sandbox connected to"));

    let reached: Vec<Value> = setup.servers.events.matching(|e| e["kind"] == "http");
    assert_eq!(reached.len(), 1, "only the allowed TLS request may reach the server: {reached:?}");
    Ok(())
}

#[test]
fn explicit_proxy_connect_and_absolute_form_requests_are_decided_by_policy() -> Result<()> {
    let setup = Setup::new(
        "explicit",
        |net| vec![("tls.test", net.v4.into()), ("other.test", net.v4.into()), ("allowed.test", net.private_v4.into())],
        |net| {
            format!(
            "version: 1\nnetwork_policies:\n  web:\n    endpoints:\n      - host: tls.test\n        port: {TLS_PORT}\n      - host: allowed.test\n        port: {HTTP_PORT}\n        allowed_ips: [\"{}/24\"]\n    binaries: [{{ path: \"/**\" }}]\n",
            net.private_v4
        )
        },
    )?;
    let proxy = setup.proxy();

    let (pid, output) = run_in(
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
            "-x",
            &proxy,
            &format!("https://tls.test:{TLS_PORT}/bytes/10"),
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200", "{}", String::from_utf8_lossy(&output.stderr));
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("connect")));
    assert_eq!(log["upstream"], format!("{}:{TLS_PORT}", setup.net.v4));

    // A CONNECT written by hand, to read the 403 the agent answers.
    let script = format!(
        "import socket; s=socket.create_connection(('127.0.0.1', {}), timeout=5); \
         s.sendall(b'CONNECT other.test:{TLS_PORT} HTTP/1.1\\r\\nHost: other.test:{TLS_PORT}\\r\\n\\r\\n'); \
         data=b''\nwhile True:\n  chunk=s.recv(4096)\n  if not chunk: break\n  data+=chunk\nprint(data.decode())",
        setup.agent.port
    );
    let (pid, output) = run_in(&setup.sandbox, PYTHON, &["-c", &script])?;
    let reply = String::from_utf8_lossy(&output.stdout);
    ensure!(reply.starts_with("HTTP/1.1 403 Forbidden"), "CONNECT reply: {reply}");
    let body: Value = serde_json::from_str(reply.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default())?;
    assert_eq!(
        body,
        json!({
            "error": "policy_denied",
            "detail": format!("CONNECT other.test:{TLS_PORT} not permitted by policy"),
            "reason": format!("endpoint other.test:{TLS_PORT} is not allowed by any policy"),
        })
    );
    assert_eq!(setup.agent.wait_connection_of(pid)?["verdict"], "denied");

    let absolute = setup.curl(&["-x", &proxy, &format!("http://allowed.test:{HTTP_PORT}/bytes/11")])?;
    assert_eq!(absolute.status, 200);
    let seen = setup.servers.events.wait_for("absolute-form request", |e| e["path"] == "/bytes/11")?;
    assert_eq!(seen["host"], format!("allowed.test:{HTTP_PORT}"), "the request reached the server in origin-form");
    assert_eq!(seen["via"], "1.1 sandbox-egress");
    assert_eq!(
        setup.agent.wait_connection_of(absolute.pid)?["upstream"],
        format!("{}:{HTTP_PORT}", setup.net.private_v4)
    );
    Ok(())
}

#[test]
fn opaque_tcp_is_decided_on_the_destination_address_and_port() -> Result<()> {
    let setup = Setup::new(
        "opaque",
        |_| vec![],
        |net| {
            format!("version: 1\nnetwork_policies:\n  raw:\n    endpoints:\n      - host: \"{}\"\n        port: {EXCHANGE_PORT}\n    binaries: [{{ path: \"/**\" }}]\n", net.v4)
        },
    )?;
    let ip = setup.net.v4;
    let (pid, output) = exchange(Some(&setup.sandbox), "inet", &ip.to_string(), 1000, 2000)?;
    ensure!(output.status.success(), "allowed opaque exchange failed: {}", String::from_utf8_lossy(&output.stderr));
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("opaque")));

    let script = format!("import socket; s=socket.create_connection(('{ip}', {}), timeout=5); s.sendall(b'\\x00ping'); print(repr(s.recv(10)))", EXCHANGE_PORT + 1);
    let (pid, output) = run_in(&setup.sandbox, PYTHON, &["-c", &script])?;
    assert!(!output.status.success(), "denied port answered: {}", String::from_utf8_lossy(&output.stdout));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("ConnectionResetError"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "denied");
    assert_eq!(log["reason"], format!("endpoint {ip}:{} is not allowed by any policy", EXCHANGE_PORT + 1));
    Ok(())
}

#[test]
fn private_ip_gate_forwards_plain_http_only_to_listed_private_addresses() -> Result<()> {
    let setup = Setup::new(
        "gate",
        |net| {
            vec![
                ("private.test", net.private_v4.into()),
                ("public.test", net.v4.into()),
                ("nolist.test", net.private_v4.into()),
                ("loop.test", IpAddr::from([127, 0, 0, 1])),
                ("meta.test", IpAddr::from([169, 254, 169, 254])),
                ("linklocal.test", IpAddr::from([169, 254, 10, 10])),
            ]
        },
        |net| {
            format!(
                "version: 1\nnetwork_policies:\n  gate:\n    endpoints:\n\
                 \x20     - {{ host: private.test, port: {HTTP_PORT}, allowed_ips: [\"{}/24\"] }}\n\
                 \x20     - {{ host: public.test, port: {HTTP_PORT}, allowed_ips: [\"198.18.0.0/15\"] }}\n\
                 \x20     - {{ host: nolist.test, port: {HTTP_PORT} }}\n\
                 \x20     - {{ host: loop.test, port: {HTTP_PORT}, allowed_ips: [\"0.0.0.0/0\"] }}\n\
                 \x20     - {{ host: meta.test, port: 80, allowed_ips: [\"169.254.0.0/16\"] }}\n\
                 \x20     - {{ host: linklocal.test, port: 80, allowed_ips: [\"0.0.0.0/0\"] }}\n\
                 \x20   binaries: [{{ path: \"/**\" }}]\n",
                net.private_v4
            )
        },
    )?;
    let proxy = setup.proxy();
    let via_proxy = |url: String| setup.curl(&["-x", &proxy, &url]);

    assert_eq!(via_proxy(format!("http://private.test:{HTTP_PORT}/bytes/12"))?.status, 200);

    let cases = [
        (format!("public.test:{HTTP_PORT}"), "public", format!("plain HTTP to public.test:{HTTP_PORT} is forwarded only to private addresses, and public.test resolves to {} (public)", setup.net.v4)),
        (format!("nolist.test:{HTTP_PORT}"), "private", format!("plain HTTP to nolist.test:{HTTP_PORT} is forwarded only to endpoints that list allowed_ips")),
        (format!("loop.test:{HTTP_PORT}"), "loopback", "127.0.0.1 is a loopback address and no endpoint lists it explicitly".to_owned()),
        ("meta.test:80".to_owned(), "cloud metadata", "169.254.169.254 is a cloud metadata address and no endpoint lists it explicitly".to_owned()),
        ("linklocal.test:80".to_owned(), "link-local", "169.254.10.10 is a link-local address and no endpoint lists it explicitly".to_owned()),
    ];
    for (authority, class, reason) in cases {
        let response = via_proxy(format!("http://{authority}/x"))?;
        assert_denied_json(
            &response,
            json!({ "error": "ssrf_denied", "detail": format!("GET {authority} not permitted by policy"), "reason": reason, "address_class": class }),
        );
        assert_eq!(setup.agent.wait_connection_of(response.pid)?["verdict"], "denied", "{authority}");
    }

    // Transparent plain HTTP to the public address is refused the same way.
    let response = setup.curl(&[
        "--resolve",
        &format!("public.test:{HTTP_PORT}:{}", setup.net.v4),
        &format!("http://public.test:{HTTP_PORT}/bytes/13"),
    ])?;
    assert_eq!(response.status, 403);
    assert_eq!(response.json()["address_class"], "public");
    assert!(
        setup.servers.events.matching(|e| e["path"] == "/bytes/13" || e["path"] == "/x").is_empty(),
        "a gated request reached the server"
    );
    Ok(())
}

#[test]
fn binaries_rule_allows_curl_and_denies_python_for_the_same_host() -> Result<()> {
    let setup = Setup::new(
        "binaries",
        |net| vec![("allowed.test", net.private_v4.into())],
        |net| {
            format!(
            "version: 1\nnetwork_policies:\n  tools:\n    endpoints:\n      - host: allowed.test\n        port: {HTTP_PORT}\n        allowed_ips: [\"{}/24\"]\n    binaries:\n      - path: /usr/bin/curl\n",
            net.private_v4
        )
        },
    )?;
    let ip = setup.net.private_v4;
    let response = setup.curl(&[
        "--resolve",
        &format!("allowed.test:{HTTP_PORT}:{ip}"),
        &format!("http://allowed.test:{HTTP_PORT}/bytes/14"),
    ])?;
    assert_eq!(response.status, 200);

    let script = format!(
        "import http.client; c=http.client.HTTPConnection('{ip}', {HTTP_PORT}, timeout=5); \
         c.request('GET', '/bytes/15', headers={{'Host': 'allowed.test:{HTTP_PORT}'}}); r=c.getresponse(); print(r.status); print(r.read().decode())"
    );
    let (pid, output) = run_in(&setup.sandbox, PYTHON, &["-c", &script])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (status, body) = stdout.split_once('\n').unwrap_or_default();
    assert_eq!(status, "403", "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let python = canonical(PYTHON);
    let body: Value = serde_json::from_str(body.trim())?;
    assert_eq!(body["reason"], format!("binary '{python}' not allowed in policy 'tools'"));
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!(log["exe"], python);
    assert_eq!(log["verdict"], "denied");
    Ok(())
}

fn websocket_upgrade(test: &str, greeting: Option<&str>) -> Result<()> {
    let setup = Setup::new(
        test,
        |_| vec![],
        |net| {
            format!(
            "version: 1\nnetwork_policies:\n  ws:\n    endpoints:\n      - host: \"{0}\"\n        port: {WS_PORT}\n        allowed_ips: [\"{0}/32\"]\n    binaries: [{{ path: \"/**\" }}]\n",
            net.private_v4
        )
        },
    )?;
    let ws_peer = env!("CARGO_BIN_EXE_ws-peer");
    let _ws = setup.net.start_websocket_server(ws_peer, greeting)?;
    let url = format!("ws://{}:{WS_PORT}/echo", setup.net.private_v4);
    let mut args = vec!["client", url.as_str(), "6"];
    args.extend(greeting);
    let (pid, output) = run_in(&setup.sandbox, ws_peer, &args)?;
    ensure!(output.status.success(), "ws client: {}", String::from_utf8_lossy(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(result["echoed"], 6);
    assert_eq!(result["greeting"], greeting.map_or(Value::Null, Value::from));
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!((log["verdict"].as_str(), log["protocol"].as_str()), (Some("relayed"), Some("http-upgrade")));
    Ok(())
}

#[test]
fn websocket_upgrade_is_spliced_raw_both_ways() -> Result<()> {
    websocket_upgrade("websocket", None)
}

#[test]
fn websocket_frame_in_the_same_segment_as_the_101_is_forwarded() -> Result<()> {
    websocket_upgrade("websocket-greeting", Some("hello-from-the-101-segment"))
}

#[test]
fn policy_reload_applies_to_new_connections_and_logs_the_generation() -> Result<()> {
    let allow = |net: &TestNet| {
        format!(
            "version: 1\nnetwork_policies:\n  internal:\n    endpoints:\n      - host: allowed.test\n        port: {HTTP_PORT}\n        allowed_ips: [\"{}/24\"]\n    binaries: [{{ path: \"/**\" }}]\n",
            net.private_v4
        )
    };
    let setup = Setup::new(
        "reload",
        |net| vec![("allowed.test", net.private_v4.into())],
        |_| "version: 1\nnetwork_policies: {}\n".into(),
    )?;
    let resolve = format!("allowed.test:{HTTP_PORT}:{}", setup.net.private_v4);
    let url = format!("http://allowed.test:{HTTP_PORT}/bytes/16");
    let request = || setup.curl(&["--resolve", &resolve, &url]);

    let denied = request()?;
    assert_eq!(denied.status, 403);
    assert_eq!(setup.agent.wait_connection_of(denied.pid)?["policy_generation"], 1);

    setup.policy.write(&allow(&setup.net))?;
    setup.agent.log.wait_for("reload on file change", |e| e["event"] == "policy_reloaded" && e["generation"] == 2)?;
    let allowed = request()?;
    assert_eq!(allowed.status, 200);
    assert_eq!(setup.agent.wait_connection_of(allowed.pid)?["policy_generation"], 2);

    setup.agent.signal(libc::SIGHUP);
    setup.agent.log.wait_for("reload on SIGHUP", |e| {
        e["event"] == "policy_reloaded" && e["trigger"] == "SIGHUP" && e["generation"] == 3
    })?;

    setup
        .policy
        .write("version: 1\nnetwork_policies:\n  broken:\n    endpoints:\n      - host: \"*\"\n        port: 1\n")?;
    setup.agent.log.wait_for("refused reload", |e| e["event"] == "policy_reload_failed")?;
    let still_allowed = request()?;
    assert_eq!(still_allowed.status, 200, "a broken policy file must leave the previous policy in force");
    assert_eq!(setup.agent.wait_connection_of(still_allowed.pid)?["policy_generation"], 3);
    Ok(())
}

/// Two GETs on one keep-alive connection, the second after a line on stdin;
/// prints each status.
const KEEP_ALIVE_CLIENT: &str = r#"
import http.client, sys
connection = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
for _ in range(2):
    connection.request('GET', '/bytes/16', headers={'Host': sys.argv[3]})
    response = connection.getresponse()
    response.read()
    print(response.status, flush=True)
    sys.stdin.readline()
"#;

#[test]
fn a_reload_decides_the_next_plain_http_request_of_an_open_keep_alive_connection() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let policy = |net: &TestNet, port: u16| {
        format!(
            "version: 1\nnetwork_policies:\n  internal:\n    endpoints:\n      - host: allowed.test\n        port: {port}\n        allowed_ips: [\"{}/24\"]\n    binaries: [{{ path: \"/**\" }}]\n",
            net.private_v4
        )
    };
    let setup = Setup::new(
        "keepalive-reload",
        |net| vec![("allowed.test", net.private_v4.into())],
        |net| policy(net, HTTP_PORT),
    )?;
    let mut client = setup
        .sandbox
        .command(PYTHON)
        .args(["-c", KEEP_ALIVE_CLIENT, &setup.net.private_v4.to_string(), &HTTP_PORT.to_string(), "allowed.test"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut stdin, mut stdout) = (client.stdin.take().unwrap(), BufReader::new(client.stdout.take().unwrap()));
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    assert_eq!(line, "200\n");
    // The endpoint moves to another port: the open connection's next request is no longer allowed.
    setup.policy.write(&policy(&setup.net, 1))?;
    setup.agent.log.wait_for("reload", |e| e["event"] == "policy_reloaded" && e["generation"] == 2)?;
    writeln!(stdin, "next")?;
    line.clear();
    stdout.read_line(&mut line)?;
    assert_eq!(line, "403\n", "decided by generation 2, not a decision cached from generation 1");
    drop(stdin);
    ensure!(client.wait()?.success(), "client failed");
    let log = setup.agent.wait_connection_of(client.id())?;
    assert_eq!((log["verdict"].as_str(), log["policy_generation"].as_u64()), (Some("denied"), Some(2)));
    assert_eq!(setup.servers.events.matching(|e| e["path"] == "/bytes/16").len(), 1, "one request reached the server");
    Ok(())
}

#[test]
fn policy_cli_checks_and_evaluates_offline() -> Result<()> {
    let agent = agent_bin();
    let example = workspace_root().join("policies/examples/openshell.yaml");
    let check = std::process::Command::new(&agent).args(["policy", "check"]).arg(&example).output()?;
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("endpoint api.github.com:443"));

    let eval = std::process::Command::new(&agent)
        .args(["policy", "eval"])
        .arg(&example)
        .args(["--host", "api.github.com", "--port", "443", "--binary", "/usr/bin/gh"])
        .output()?;
    let decision: Value = serde_json::from_slice(
        eval.stdout
            .split(|&b| b == b'\n')
            .take_while(|line| !line.starts_with(b"allow") && !line.starts_with(b"deny"))
            .collect::<Vec<_>>()
            .join(&b'\n')
            .as_slice(),
    )?;
    assert_eq!(decision["allow"], true);
    assert_eq!(decision["policy"], "github_api");

    // An opaque stream to an address the sandbox resolved from a policy host.
    let resolved = |name: &str| {
        std::process::Command::new(&agent)
            .args(["policy", "eval"])
            .arg(&example)
            .args(["--ip", "192.0.2.80", "--resolved", "example.test", "--resolved", name, "--port", "443"])
            .args(["--binary", "/usr/bin/gh"])
            .output()
    };
    let allowed = String::from_utf8(resolved("api.github.com")?.stdout)?;
    assert!(allowed.contains(r#""resolved_host": "api.github.com""#), "{allowed}");
    assert!(allowed.ends_with("allow: /usr/bin/gh -> api.github.com:443 (192.0.2.80) by policy 'github_api', binary entry '/usr/bin/gh' matched /usr/bin/gh\n"), "{allowed}");
    let denied = String::from_utf8(resolved("other.test")?.stdout)?;
    assert!(!denied.contains("resolved_host") && denied.contains("deny: "), "{denied}");

    let bad = PolicyFile::new(
        "version: 1\nnetwork_policies:\n  x:\n    endpoints:\n      - host: a.test\n        prot: 80\n",
    )?;
    let check = std::process::Command::new(&agent).args(["policy", "check"]).arg(&bad.path).output()?;
    assert!(!check.status.success());
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("unknown field `prot`"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}
