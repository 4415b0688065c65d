//! Credentials that never enter the sandbox, end to end: providers in a
//! `--credentials` file, endpoints bound to them, and sandboxed clients (no
//! proxy variables, only placeholders in their environment) whose requests
//! reach the origin with the real secret; a placeholder anywhere else is
//! refused and never forwarded; secrets appear in no log line.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use e2e::*;
use serde_json::Value;

const REST_TOKEN: &str = "rest-token-8f3a1c";
const ROTATED_TOKEN: &str = "rest-token-rotated-77d0";
const INJECT_TOKEN: &str = "inject-token-5be2";
const OTHER_TOKEN: &str = "other-token-90aa";
const GIT_TOKEN: &str = "git-token-c41e9d";
const ALL_TOKENS: [&str; 5] = [REST_TOKEN, ROTATED_TOKEN, INJECT_TOKEN, OTHER_TOKEN, GIT_TOKEN];
/// What the test repository's one file holds.
const README: &str = "cloned through sandbox-egress\n";
const PLAIN_HOST: &str = "plain.rest.test";
/// The raw TCP server of the refusal test.
const RAW_PORT: u16 = 9500;

/// A test namespace serving the REST API as api.rest.test (and, for the
/// git test, git http-backend as git.rest.test); an agent with a
/// credentials file whose secret files sit in the test's directory.
struct Setup {
    // Dropped before the sandbox: it detaches while the cgroup still exists.
    agent: Agent,
    sandbox: Sandbox,
    api: Servers,
    git: Option<Servers>,
    agent_ca: String,
    net: TestNet,
    dir: TempDir,
    _dns: Dns,
    _policy: PolicyFile,
}

impl Setup {
    /// `endpoints`: the policy's endpoints (`{v4}` and `{private_v4}` stand
    /// for the test host's addresses); `providers`: the credentials file
    /// (`{dir}` for the test's directory), whose `secrets` (file name,
    /// value) are written there first, root-only; `agent_env`: for `env`
    /// credentials; `git`: also serve a repository over git http-backend.
    fn new(
        name: &str,
        endpoints: &str,
        providers: &str,
        secrets: &[(&str, &str)],
        agent_env: &[(&str, &str)],
        git: bool,
    ) -> Result<Self> {
        let net = TestNet::new()?;
        let dir = TempDir::new(name)?;
        for (file, value) in secrets {
            write_secret(&dir.path.join(file), value)?;
        }
        let records = [(REST_API_HOST, net.v4.into()), (GIT_HOST, net.v4.into()), (PLAIN_HOST, net.private_v4.into())];
        let dns = net.start_dns(&records)?;
        let (api, rest_ca) = net.start_rest_api(&dir)?;
        let mut upstream_cas = std::fs::read_to_string(&rest_ca)?;
        let git = if git {
            let (server, git_ca) = start_git(&net, &dir)?;
            upstream_cas += &std::fs::read_to_string(git_ca)?;
            Some(server)
        } else {
            None
        };
        let upstream_ca = dir.file("upstream-cas.pem");
        std::fs::write(&upstream_ca, upstream_cas)?;
        let endpoints =
            endpoints.replace("{v4}", &net.v4.to_string()).replace("{private_v4}", &net.private_v4.to_string());
        let policy = PolicyFile::new(&format!(
            "version: 1\nnetwork_policies:\n  test:\n    endpoints:\n{endpoints}    binaries:\n      - path: \"/**\"\n"
        ))?;
        let credentials = dir.file("credentials.yaml");
        std::fs::write(&credentials, providers.replace("{dir}", dir.path.to_str().context("utf-8 path")?))?;
        let sandbox = Sandbox::new(name)?;
        let ca_dir = dir.file("ca");
        let dns_args = dns.agent_args();
        let args = [
            &dns_args[0],
            &dns_args[1],
            "--ca-dir",
            &ca_dir,
            "--upstream-ca",
            &upstream_ca,
            "--credentials",
            &credentials,
        ];
        let agent = Agent::start_with_env(&sandbox, &policy, &args, agent_env)?;
        let exported = run(agent_bin().to_str().context("utf-8 path")?, &["ca", "export", "--ca-dir", &ca_dir])?;
        let agent_ca = dir.file("agent-ca.pem");
        std::fs::write(&agent_ca, &exported.stdout)?;
        Ok(Self { agent, sandbox, api, git, agent_ca, net, dir, _dns: dns, _policy: policy })
    }

    /// `script` run by sh in the sandbox with nothing in its environment but
    /// PATH, HOME, CA (the agent's CA file) and `env`.
    fn sandboxed(&self, script: &str, env: &[(&str, &str)]) -> Result<(u32, Output)> {
        let mut command = self.sandbox.command("/bin/sh");
        command.args(["-c", script]).env_clear();
        command.envs([("PATH", "/usr/bin:/bin"), ("HOME", self.dir.path.to_str().context("utf-8 path")?)]);
        command.env("CA", &self.agent_ca).envs(env.iter().copied());
        let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let pid = child.id();
        Ok((pid, child.wait_with_output()?))
    }

    /// The requests the REST API received, in order.
    fn received(&self) -> Vec<Value> {
        self.api.events.matching(|e| e["kind"] == "request")
    }

    /// Fails if any line the agent wrote holds a secret.
    fn assert_no_secret_logged(&self) {
        let lines = self.agent.log.raw_lines();
        assert!(!lines.is_empty());
        for line in lines {
            for token in ALL_TOKENS {
                assert!(!line.contains(token), "a secret reached the agent's log: {line}");
            }
        }
    }
}

/// A secret file as the agent accepts it: root's, 0600.
fn write_secret(path: &Path, value: &str) -> Result<()> {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, format!("{value}\n"))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&staged, path)?;
    Ok(())
}

/// `sandbox-egress credentials placeholder NAME`.
fn placeholder(name: &str) -> Result<String> {
    let output = run(agent_bin().to_str().context("utf-8 path")?, &["credentials", "placeholder", name])?;
    Ok(String::from_utf8(output.stdout)?.trim_end().to_owned())
}

/// A bare repository `repo.git` with one commit under `{dir}/git`, served
/// by git http-backend to Basic credentials with [`GIT_TOKEN`].
fn start_git(net: &TestNet, dir: &TempDir) -> Result<(Servers, std::path::PathBuf)> {
    let work = dir.file("work");
    let root = dir.path.join("git");
    std::fs::create_dir_all(&work)?;
    std::fs::write(dir.path.join("work/README"), README)?;
    let git = |args: &[&str]| {
        run("git", &[&["-C", &work, "-c", "user.name=t", "-c", "user.email=t@example.test"], args].concat())
    };
    git(&["init", "-q", "-b", "main"])?;
    git(&["add", "README"])?;
    git(&["commit", "-q", "-m", "one commit"])?;
    git(&["clone", "-q", "--bare", ".", root.join("repo.git").to_str().context("utf-8 path")?])?;
    let token_file = dir.path.join("git-server.token");
    write_secret(&token_file, GIT_TOKEN)?;
    net.start_git_server(dir, &root, &token_file)
}

fn bound_endpoint(host: &str, port: u16, provider: &str, extra: &str) -> String {
    format!(
        "      - host: {host}\n        port: {port}\n{extra}        credential_binding: {{ provider: {provider} }}\n"
    )
}

fn curl_status(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn placeholders_and_injection_give_the_origin_the_real_token() -> Result<()> {
    require_root();
    let endpoints = bound_endpoint(REST_API_HOST, REST_TLS_PORT, "injected", "        path: /inject/**\n")
        + &bound_endpoint(REST_API_HOST, REST_TLS_PORT, "rest", "        path: /api/**\n");
    let providers = "providers:\n\
        \x20 - name: rest\n    credential: { file: \"{dir}/rest.token\" }\n\
        \x20 - name: injected\n    credential: { env: SE_TEST_INJECT_TOKEN }\n\
        \x20   inject: { header: Authorization, format: \"Bearer {}\" }\n";
    let setup = Setup::new(
        "cred-rewrite",
        &endpoints,
        providers,
        &[("rest.token", REST_TOKEN)],
        &[("SE_TEST_INJECT_TOKEN", INJECT_TOKEN)],
        false,
    )?;
    let token = placeholder("rest")?;
    assert_eq!(token, "SANDBOX_EGRESS_PLACEHOLDER_rest");
    let base = format!("https://{REST_API_HOST}:{REST_TLS_PORT}");
    let script = r#"
        get() { curl -sS --cacert "$CA" -o /dev/null -w '%{http_code}\n' "$@"; }
        get "$BASE/inject/none"
        get -H 'Authorization: Bearer wrong' "$BASE/inject/wrong"
        get -H "Authorization: Bearer $TOKEN" "$BASE/api/bearer"
        get "$BASE/api/query?token=$TOKEN&page=2"
        get "$BASE/api/$TOKEN/items"
        get -u "x-access-token:$TOKEN" "$BASE/api/basic"
    "#;
    let (_, output) = setup.sandboxed(script, &[("TOKEN", &token), ("BASE", &base)])?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(curl_status(&output), ["200"; 6]);

    let received = setup.received();
    let seen: Vec<(&str, Vec<&str>)> = received
        .iter()
        .map(|request| {
            let authorization = request["header_list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|pair| pair[0].as_str().is_some_and(|name| name.eq_ignore_ascii_case("authorization")))
                .filter_map(|pair| pair[1].as_str())
                .collect();
            (request["target"].as_str().unwrap_or_default(), authorization)
        })
        .collect();
    let basic = format!("Basic {}", BASE64.encode(format!("x-access-token:{REST_TOKEN}")));
    let (injected, bearer) = (format!("Bearer {INJECT_TOKEN}"), format!("Bearer {REST_TOKEN}"));
    let (query, path) = (format!("/api/query?token={REST_TOKEN}&page=2"), format!("/api/{REST_TOKEN}/items"));
    assert_eq!(
        seen,
        [
            ("/inject/none", vec![injected.as_str()]),
            ("/inject/wrong", vec![injected.as_str()]),
            ("/api/bearer", vec![bearer.as_str()]),
            (query.as_str(), vec![]),
            (path.as_str(), vec![]),
            ("/api/basic", vec![basic.as_str()]),
        ],
        "injection replaced what the client sent; placeholders became the token"
    );
    for request in &received {
        assert!(
            !request.to_string().contains("SANDBOX_EGRESS_PLACEHOLDER"),
            "a placeholder reached the origin: {request}"
        );
    }
    let logged: Vec<(Value, Value)> = setup
        .agent
        .log
        .matching(|e| e["event"] == "request")
        .into_iter()
        .map(|e| (e["verdict"].clone(), e["credential"].clone()))
        .collect();
    let expected: Vec<(Value, Value)> = ["injected", "injected", "rest", "rest", "rest", "rest"]
        .iter()
        .map(|p| ("allowed".into(), (*p).into()))
        .collect();
    assert_eq!(logged, expected);
    setup.assert_no_secret_logged();
    Ok(())
}

#[test]
fn a_real_git_clone_gets_the_token_the_sandbox_never_had() -> Result<()> {
    require_root();
    let providers = "providers:\n  - name: git\n    credential: { file: \"{dir}/git.token\" }\n";
    let endpoints = bound_endpoint(GIT_HOST, GIT_TLS_PORT, "git", "");
    let setup = Setup::new("cred-git", &endpoints, providers, &[("git.token", GIT_TOKEN)], &[], true)?;
    let git_server = setup.git.as_ref().context("git server")?;
    let url = format!("https://x-access-token:{}@{GIT_HOST}:{GIT_TLS_PORT}/repo.git", placeholder("git")?);
    let clone = setup.dir.file("clone");
    let env = [
        ("URL", url.as_str()),
        ("DEST", clone.as_str()),
        ("GIT_SSL_CAINFO", setup.agent_ca.as_str()),
        ("GIT_TERMINAL_PROMPT", "0"),
        ("GIT_CONFIG_NOSYSTEM", "1"),
    ];
    let (_, output) = setup.sandboxed(r#"env; git clone -q "$URL" "$DEST""#, &env)?;
    let environment = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "git clone failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(environment.contains("SANDBOX_EGRESS_PLACEHOLDER_git"), "{environment}");
    assert!(!environment.contains(GIT_TOKEN), "the sandbox's environment held the token");
    assert_eq!(std::fs::read_to_string(Path::new(&clone).join("README"))?, README);
    let config = std::fs::read_to_string(Path::new(&clone).join(".git/config"))?;
    assert!(!config.contains(GIT_TOKEN), "the clone's config holds the token: {config}");

    let requests = git_server.events.matching(|e| e["kind"] == "request");
    let real = format!("Basic {}", BASE64.encode(format!("x-access-token:{GIT_TOKEN}")));
    let served: Vec<&Value> = requests.iter().filter(|r| r["status"] == 200).collect();
    ensure!(served.len() >= 2, "info/refs and upload-pack were served: {requests:?}");
    for request in &served {
        assert_eq!(request["authorization"], real.as_str(), "{request}");
    }
    assert!(served.iter().any(|r| r["path"] == "/repo.git/git-upload-pack"), "{requests:?}");
    for request in &requests {
        assert!(
            request["status"] == 200 || request["authorization"].is_null(),
            "only unauthenticated asks get 401: {request}"
        );
    }
    let logged = setup.agent.log.matching(|e| e["event"] == "request" && e["host"] == GIT_HOST);
    ensure!(!logged.is_empty() && logged.iter().all(|e| e["verdict"] == "allowed"), "{logged:?}");
    assert!(logged.iter().any(|e| e["credential"] == "git"), "{logged:?}");
    setup.assert_no_secret_logged();
    Ok(())
}

/// A raw TCP server: prints what each connection sent, once it ends.
const RAW_SERVER: &str = r#"
import json, socket, sys, threading
server = socket.create_server(('::', int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
def serve(connection):
    data = b''
    try:
        while chunk := connection.recv(4096):
            data += chunk
    except OSError:
        pass
    if data:
        print(json.dumps({'kind': 'received', 'data': data.decode('latin-1')}), flush=True)
    connection.close()
print(json.dumps({'kind': 'ready'}), flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"#;

/// Sends argv[3] to argv[1]:argv[2], ends its side, prints `closed` or the error.
const RAW_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(sys.argv[3].encode())
try:
    s.shutdown(socket.SHUT_WR)
except OSError:
    pass  # ENOTCONN: the agent's reset came first; recv reports it
try:
    print('closed' if s.recv(100) == b'' else 'data')
except OSError as error:
    print(type(error).__name__)
"#;

#[test]
fn a_placeholder_anywhere_else_is_refused_and_never_forwarded() -> Result<()> {
    require_root();
    let endpoints = bound_endpoint(REST_API_HOST, REST_TLS_PORT, "rest", "")
        + &format!("      - host: \"{{v4}}\"\n        port: {REST_TLS_PORT}\n        access: full\n")
        + &format!("      - host: \"{{v4}}\"\n        port: {RAW_PORT}\n")
        + &format!(
            "      - host: {PLAIN_HOST}\n        port: {REST_HTTP_PORT}\n        allowed_ips: [\"{{private_v4}}/24\"]\n"
        );
    let providers = "providers:\n\
        \x20 - name: rest\n    credential: { file: \"{dir}/rest.token\" }\n\
        \x20 - name: other\n    credential: { env: SE_TEST_OTHER_TOKEN }\n";
    let setup = Setup::new(
        "cred-refused",
        &endpoints,
        providers,
        &[("rest.token", REST_TOKEN)],
        &[("SE_TEST_OTHER_TOKEN", OTHER_TOKEN)],
        false,
    )?;
    let raw = setup.net.start_python_servers(RAW_SERVER, &[&RAW_PORT.to_string()])?;
    let (token, other) = (placeholder("rest")?, placeholder("other")?);
    let v4 = setup.net.v4.to_string();
    let env = [("TOKEN", token.as_str()), ("OTHER", other.as_str()), ("V4", v4.as_str())];
    let unbound = format!("https://{v4}:{REST_TLS_PORT}");
    let bound = format!("https://{REST_API_HOST}:{REST_TLS_PORT}");
    let plain = format!("http://{PLAIN_HOST}:{REST_HTTP_PORT}");
    let script = format!(
        r#"
        get() {{ curl -sS --cacert "$CA" -w '\n%{{http_code}}\n' "$@"; }}
        get "{unbound}/control"
        get -H "Authorization: Bearer $TOKEN" "{unbound}/unbound"
        get -H "X-Key: $OTHER" "{bound}/other-provider"
        get "{plain}/control"
        get -H "X-Key: $TOKEN" "{plain}/plain"
        "#
    );
    let (_, output) = setup.sandboxed(&script, &env)?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let answers: Vec<(&str, &str)> =
        text.lines().collect::<Vec<_>>().chunks(2).map(|pair| (pair[0], pair.get(1).copied().unwrap_or(""))).collect();
    let statuses: Vec<&str> = answers.iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, ["200", "403", "403", "200", "403"], "{text}");
    for ((body, _), (provider, host, reason)) in answers.iter().skip(1).filter(|(_, status)| *status == "403").zip([
        ("rest", v4.as_str(), "is bound to no credential provider"),
        ("other", REST_API_HOST, "is bound to credential provider 'rest'"),
        ("rest", PLAIN_HOST, "plain HTTP"),
    ]) {
        let body: Value = serde_json::from_str(body).with_context(|| format!("JSON body: {body}"))?;
        assert_eq!(body["error"], "credential_not_bound", "{body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(&format!("provider '{provider}'")) && detail.ends_with(&format!("sent to {host}")),
            "{body}"
        );
        assert!(body["reason"].as_str().is_some_and(|r| r.contains(reason)), "{body}");
    }
    let received = setup.received();
    let reached: Vec<&str> = received.iter().filter_map(|r| r["path"].as_str()).collect();
    assert_eq!(reached, ["/control", "/control"], "only the requests without a placeholder reached the API");

    // Opaque bytes to an endpoint without L7 content: relayed, unless they hold a placeholder.
    let port = RAW_PORT.to_string();
    let (_, control) = run_in(&setup.sandbox, PYTHON, &["-c", RAW_CLIENT, &v4, &port, "hello\n"])?;
    assert_eq!(String::from_utf8_lossy(&control.stdout), "closed\n", "{}", String::from_utf8_lossy(&control.stderr));
    let with_token = format!("auth {token}\n");
    let (pid, refused) = run_in(&setup.sandbox, PYTHON, &["-c", RAW_CLIENT, &v4, &port, &with_token])?;
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "ConnectionResetError\n");
    let log = setup.agent.wait_connection_of(pid)?;
    assert_eq!((&log["verdict"], &log["protocol"]), (&Value::from("denied"), &Value::from("opaque")), "{log}");
    ensure!(log["reason"].as_str().is_some_and(|r| r.contains("first bytes of the stream (opaque)")), "{log}");
    raw.events.wait_for("the control bytes", |e| e["kind"] == "received")?;
    let received: Vec<Value> =
        raw.events.matching(|e| e["kind"] == "received").into_iter().map(|e| e["data"].clone()).collect();
    assert_eq!(received, ["hello\n"], "the placeholder never reached the server");

    let refusals: Vec<(Value, Value)> = setup
        .agent
        .log
        .matching(|e| e["event"] == "credential_refused")
        .into_iter()
        .map(|e| (e["provider"].clone(), e["error"].clone()))
        .collect();
    let expected: Vec<(Value, Value)> =
        ["rest", "other", "rest", "rest"].iter().map(|p| ((*p).into(), "credential_not_bound".into())).collect();
    assert_eq!(refusals, expected);
    setup.assert_no_secret_logged();
    Ok(())
}

#[test]
fn a_rotated_secret_file_is_used_from_the_next_request_and_an_unsafe_one_fails_closed() -> Result<()> {
    require_root();
    let providers = "providers:\n  - name: rest\n    credential: { file: \"{dir}/rest.token\" }\n";
    let endpoints = bound_endpoint(REST_API_HOST, REST_TLS_PORT, "rest", "");
    let setup = Setup::new("cred-rotate", &endpoints, providers, &[("rest.token", REST_TOKEN)], &[], false)?;
    let token = placeholder("rest")?;
    let url = format!("https://{REST_API_HOST}:{REST_TLS_PORT}/rotate");
    let request = || -> Result<(String, String)> {
        let script = r#"curl -sS --cacert "$CA" -H "Authorization: Bearer $TOKEN" -w '\n%{http_code}' "$URL""#;
        let (_, output) = setup.sandboxed(script, &[("TOKEN", &token), ("URL", &url)])?;
        ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout)?;
        let (body, status) = text.rsplit_once('\n').context("status line")?;
        Ok((status.to_owned(), body.to_owned()))
    };
    assert_eq!(request()?.0, "200");
    write_secret(&setup.dir.path.join("rest.token"), ROTATED_TOKEN)?;
    assert_eq!(request()?.0, "200");
    let authorizations: Vec<Value> = setup.received().iter().map(|r| r["headers"]["authorization"].clone()).collect();
    assert_eq!(authorizations, [format!("Bearer {REST_TOKEN}"), format!("Bearer {ROTATED_TOKEN}")]);

    // Opened to others: the agent stops using it rather than send it on.
    let path = setup.dir.path.join("rest.token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    let (status, body) = request()?;
    assert_eq!(status, "502", "{body}");
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["error"], "credential_unavailable", "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(path.to_str().context("utf-8 path")?) && reason.contains("chmod 600"), "{body}");
    assert_eq!(setup.received().len(), 2, "the failed request never reached the origin");
    for token in ALL_TOKENS {
        assert!(!body.to_string().contains(token), "{body}");
    }
    setup.assert_no_secret_logged();
    Ok(())
}

/// Runs the agent to its exit, which must come at start-up (killed, and the
/// test failed, if it is still running after [`WAIT`]).
fn agent_start_failure(sandbox: &Sandbox, policy: &PolicyFile, credentials: &str) -> Result<String> {
    let mut child = Command::new(agent_bin())
        .args(["run", "--cgroup", sandbox.path_str(), "--listen-port", "0", "--policy"])
        .arg(&policy.path)
        .args(["--credentials", credentials])
        .args(own_control_socket(&[]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + WAIT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            detach(sandbox.path_str());
            bail!("the agent started");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    ensure!(!output.status.success(), "the agent exited successfully");
    Ok(String::from_utf8(output.stderr)?)
}

#[test]
fn the_agent_refuses_unsafe_or_unknown_credentials_at_start() -> Result<()> {
    require_root();
    let dir = TempDir::new("cred-start")?;
    let sandbox = Sandbox::new("cred-start")?;
    let token = dir.path.join("rest.token");
    write_secret(&token, REST_TOKEN)?;
    let bound = |provider: &str| {
        format!(
            "version: 1\nnetwork_policies:\n  p:\n    endpoints:\n{}    binaries: [{{ path: \"/**\" }}]\n",
            bound_endpoint(REST_API_HOST, REST_TLS_PORT, provider, "")
        )
    };
    let credentials = dir.file("credentials.yaml");
    let write_credentials = |text: &str| std::fs::write(&credentials, text.replace("{token}", token.to_str().unwrap()));

    write_credentials("providers:\n  - { name: rest, credential: { file: \"{token}\" } }\n")?;
    let error = agent_start_failure(&sandbox, &PolicyFile::new(&bound("nope"))?, &credentials)?;
    assert!(
        error.contains("network_policies.p.endpoints[0].credential_binding.provider: no credential provider 'nope' (--credentials has rest)"),
        "{error}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640))?;
    let error = agent_start_failure(&sandbox, &PolicyFile::new(&bound("rest"))?, &credentials)?;
    assert!(
        error.contains("providers[0].credential: credential file") && error.contains("(mode 640): chmod 600 it"),
        "{error}"
    );
    write_credentials("providers:\n  - { name: rest, credential: { env: X }, injct: { query: k } }\n")?;
    let error = agent_start_failure(&sandbox, &PolicyFile::new(&bound("rest"))?, &credentials)?;
    assert!(error.contains("unknown field `injct`") && error.contains("providers[0]"), "{error}");
    assert!(!error.contains(REST_TOKEN));
    Ok(())
}

#[test]
fn placeholders_in_json_and_form_bodies_are_replaced_and_unreplaceable_ones_fail_closed() -> Result<()> {
    require_root();
    let endpoints = bound_endpoint(
        REST_API_HOST,
        REST_TLS_PORT,
        "rest",
        "        protocol: rest\n        enforcement: enforce\n        access: full\n        \
         request_body_credential_rewrite: true\n",
    );
    let providers = "providers:\n  - name: rest\n    credential: { file: \"{dir}/rest.token\" }\n";
    let setup = Setup::new("cred-body", &endpoints, providers, &[("rest.token", REST_TOKEN)], &[], false)?;
    let token = placeholder("rest")?;
    let base = format!("https://{REST_API_HOST}:{REST_TLS_PORT}");
    let script = r#"
        post() { curl -sS --max-time 10 --cacert "$CA" -o /dev/null -w '%{http_code}\n' -X POST "$@"; }
        post -H 'Content-Type: application/json' -d "{\"token\":\"$TOKEN\",\"n\":1}" "$BASE/json"
        post -H 'Content-Type: application/json' -H 'Transfer-Encoding: chunked' -d "{\"key\":\"$TOKEN\"}" "$BASE/chunked"
        post --data-urlencode "secret=$TOKEN" --data-urlencode 'other=a b' "$BASE/form"
        printf '{"token":"%s"}' "$TOKEN" | gzip | post -H 'Content-Type: application/json' \
            -H 'Content-Encoding: gzip' --data-binary @- "$BASE/compressed"
        post -H 'Content-Type: application/octet-stream' -d "$TOKEN" "$BASE/binary"
    "#;
    let (_, output) = setup.sandboxed(script, &[("TOKEN", &token), ("BASE", &base)])?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(curl_status(&output), ["200", "200", "200", "502", "502"]);

    let received = setup.received();
    let bodies: Vec<(&str, &str)> = received
        .iter()
        .map(|request| (request["path"].as_str().unwrap_or_default(), request["body"].as_str().unwrap_or_default()))
        .collect();
    let json = format!("{{\"token\":\"{REST_TOKEN}\",\"n\":1}}");
    let chunked = format!("{{\"key\":\"{REST_TOKEN}\"}}");
    let form = format!("secret={REST_TOKEN}&other=a+b");
    assert_eq!(
        bodies,
        [("/json", json.as_str()), ("/chunked", chunked.as_str()), ("/form", form.as_str())],
        "the origin got the secret in place of the placeholder; the unreplaceable bodies never arrived"
    );
    // Read whole and forwarded with its length, whatever framing the client used.
    let chunked_request = received.iter().find(|request| request["path"] == "/chunked").context("chunked")?;
    assert_eq!(chunked_request["headers"]["content-length"], chunked.len().to_string(), "{chunked_request}");
    let refusals = setup.agent.log.matching(|e| e["event"] == "credential_refused");
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    ensure!(refusals.iter().any(|e| e.to_string().contains("gzip-encoded")), "{refusals:?}");
    setup.assert_no_secret_logged();
    Ok(())
}
