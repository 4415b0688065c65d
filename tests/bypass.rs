//! The bypass matrix: a sandboxed process trying to get around the agent.
//! Every attempt is intercepted or refused, never direct, except the one
//! the kernel cannot cover (a socket created before its process joined the
//! cgroup), which is shown here as it is, with the agent's warning.
//! (Raw IPv4/IPv6/v4-mapped destinations, the agent's own listener and UDP
//! other than DNS are in redirect.rs; DNS over TCP in inference.rs.)

use std::{
    os::unix::fs::PermissionsExt,
    process::{Command, Output},
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

fn probe_output(output: &Output) -> Result<Value> {
    ensure!(
        output.status.success(),
        "probe failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("probe output: {}", String::from_utf8_lossy(&output.stdout)))
}

/// Runs `bypass_probe.py PROBE ARGS` in the sandbox; returns (pid, its JSON line).
fn probe(sandbox: &Sandbox, args: &[&str]) -> Result<(u32, Value)> {
    let script = support_file("bypass_probe.py");
    let (pid, output) = run_in(sandbox, PYTHON, &[&[script.to_str().unwrap()], args].concat())?;
    Ok((pid, probe_output(&output)?))
}

/// An exchange that completed with every byte as the server sent it.
fn assert_intact(outcome: &Value, what: &str) {
    assert_eq!(outcome["ok"]["intact"], true, "{what}: {outcome}");
}

/// The connection logs of `pid`, once there are `count` (bounded wait).
fn wait_connections(agent: &Agent, pid: u32, count: usize) -> Result<Vec<Value>> {
    agent.log.wait_for_count(&format!("{count} connection logs of pid {pid}"), count, |e| {
        e["event"] == "connection" && e["pid"] == pid
    })
}

fn exchanges_seen(servers: &Servers) -> usize {
    servers.events.matching(|e| e["kind"] == "exchange").len()
}

struct Setup {
    agent: Agent,
    sandbox: Sandbox,
    servers: Servers,
    net: TestNet,
}

impl Setup {
    fn new(name: &str) -> Result<Self> {
        require_root();
        let net = TestNet::new()?;
        let servers = net.start_servers()?;
        let sandbox = Sandbox::new(name)?;
        let policy = PolicyFile::new(&net.allow_all_policy())?;
        let agent = Agent::start(&sandbox, &policy, &[])?;
        Ok(Self { agent, sandbox, servers, net })
    }

    fn exchange_port(&self) -> String {
        EXCHANGE_PORT.to_string()
    }
}

#[test]
fn ipv6_only_sockets_are_intercepted_and_cannot_reach_ipv4() -> Result<()> {
    let setup = Setup::new("v6only")?;
    let mapped = format!("::ffff:{}", setup.net.v4);
    let (pid, result) = probe(&setup.sandbox, &["v6only", &setup.net.v6.to_string(), &mapped, &setup.exchange_port()])?;
    assert_intact(&result["v6"], "IPV6_V6ONLY socket to an IPv6 address");
    assert_eq!(result["mapped"]["error"], "ENETUNREACH", "IPV6_V6ONLY socket to a v4-mapped address: {result}");

    let logs = wait_connections(&setup.agent, pid, 1)?;
    assert_eq!(logs.len(), 1, "one connection, the IPv6 one: {logs:?}");
    assert_eq!(logs[0]["verdict"], "relayed");
    assert_eq!(logs[0]["destination"], format!("[{}]:{EXCHANGE_PORT}", setup.net.v6));
    assert_eq!(exchanges_seen(&setup.servers), 1, "the server saw only the intercepted exchange");
    Ok(())
}

#[test]
fn tcp_fast_open_connects_are_intercepted() -> Result<()> {
    let setup = Setup::new("tfo")?;
    for host in [setup.net.v4.to_string(), setup.net.v6.to_string()] {
        let (pid, result) = probe(&setup.sandbox, &["fast-open", &host, &setup.exchange_port()])?;
        assert_intact(&result["sendto"], &format!("sendto(MSG_FASTOPEN) to {host}"));
        assert_intact(&result["fastopen_connect"], &format!("TCP_FASTOPEN_CONNECT to {host}"));
        let logged_host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        let logs = wait_connections(&setup.agent, pid, 2)?;
        assert_eq!(logs.len(), 2, "both fast-open connects logged: {logs:?}");
        for log in logs {
            assert_eq!(log["verdict"], "relayed");
            assert_eq!(log["destination"], format!("{logged_host}:{EXCHANGE_PORT}"));
        }
    }
    assert_eq!(exchanges_seen(&setup.servers), 4);
    Ok(())
}

#[test]
fn threads_and_children_are_attributed_to_their_process() -> Result<()> {
    let setup = Setup::new("threads")?;
    let (pid, result) =
        probe(&setup.sandbox, &["threads-and-child", &setup.net.v4.to_string(), &setup.exchange_port(), "4"])?;
    assert_eq!(result["pid"], pid);
    let thread_ids: Vec<u64> = result["thread_ids"].as_array().unwrap().iter().map(|id| id.as_u64().unwrap()).collect();
    assert_eq!(thread_ids.len(), 4);
    assert!(thread_ids.iter().all(|&id| id != u64::from(pid)), "threads have ids of their own: {thread_ids:?}");
    for outcome in result["threads"].as_array().unwrap() {
        assert_intact(outcome, "exchange from a thread");
    }
    assert_intact(&result["child"], "exchange from a forked child");
    let child_pid = result["child_pid"].as_u64().unwrap();

    let child_log =
        setup.agent.log.wait_for("the child's connection", |e| e["event"] == "connection" && e["pid"] == child_pid)?;
    assert_eq!(child_log["verdict"], "relayed");
    let process_logs = wait_connections(&setup.agent, pid, 4)?;
    assert_eq!(process_logs.len(), 4, "the threads' connections carry the process id: {process_logs:?}");
    let by_thread_id =
        setup.agent.log.matching(|e| e["event"] == "connection" && thread_ids.iter().any(|&id| e["pid"] == id));
    assert!(by_thread_id.is_empty(), "connections attributed to thread ids: {by_thread_id:?}");
    Ok(())
}

const ECHO_SERVER: &str = r#"
import json, socket, sys, threading
port = int(sys.argv[1])
server = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
print(json.dumps({"kind": "ready"}), flush=True)
def serve(conn):
    with conn:
        received = 0
        while data := conn.recv(65536):
            received += len(data)
            conn.sendall(data)
        print(json.dumps({"kind": "echo", "port": port, "received": received}), flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

#[test]
fn dns_over_tls_port_853_is_decided_by_policy_like_any_other() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let echo = net.start_python_servers(ECHO_SERVER, &["853"])?;
    let sandbox = Sandbox::new("dot")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let probe_853 = || probe(&sandbox, &["echo", &net.v4.to_string(), "853"]);

    let (pid, denied) = probe_853()?;
    assert!(denied["ok"]["intact"] != true, "port 853 is not in the policy: {denied}");
    let log = agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "denied");
    assert_eq!(log["destination"], format!("{}:853", net.v4));

    policy.write(&format!("{}      - host: \"{}\"\n        ports: [853]\n", net.allow_all_policy(), net.v4))?;
    agent.log.wait_for("policy reload", |e| e["event"] == "policy_reloaded" && e["generation"] == 2)?;
    let (pid, allowed) = probe_853()?;
    assert_intact(&allowed, "port 853 once listed");
    let log = agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "relayed");
    let seen = echo.events.matching(|e| e["kind"] == "echo");
    assert_eq!(seen.len(), 1, "the server saw only the allowed connection: {seen:?}");
    Ok(())
}

#[test]
fn a_socket_created_before_joining_the_cgroup_is_not_intercepted() -> Result<()> {
    let setup = Setup::new("late")?;
    // Started outside the sandbox; it joins by itself with a socket already open.
    let output = Command::new(PYTHON)
        .arg(support_file("bypass_probe.py"))
        .args(["joins-late", &setup.net.v4.to_string(), &setup.exchange_port()])
        .arg(setup.sandbox.path.join("cgroup.procs"))
        .output()?;
    let result = probe_output(&output)?;
    let pid = result["pid"].as_u64().unwrap() as u32;
    // The kernel checks the socket's cgroup, fixed when the socket was made:
    // this one went direct. This is why sandboxes must start inside the cgroup.
    assert_intact(&result["socket_from_before"], "socket created before joining");
    assert_intact(&result["socket_from_after"], "socket created after joining");
    setup.servers.events.wait_for_count("both exchanges", 2, |e| e["kind"] == "exchange")?;
    let logs = wait_connections(&setup.agent, pid, 1)?;
    assert_eq!(logs.len(), 1, "only the socket created inside the cgroup is intercepted: {logs:?}");
    Ok(())
}

#[test]
fn the_agent_warns_when_processes_were_in_the_cgroup_before_it() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let warning = |e: &Value| {
        e["level"] == "WARN" && e["message"].as_str().is_some_and(|m| m.contains("before the agent attached"))
    };

    let empty = Sandbox::new("empty-first")?;
    let agent = Agent::start(&empty, &policy, &[])?;
    assert!(agent.log.matching(warning).is_empty(), "warned about an empty cgroup");
    drop(agent);

    let occupied = Sandbox::new("occupied-first")?;
    let mut sleeper = occupied.command("sleep").arg("30").spawn()?;
    let agent = Agent::start(&occupied, &policy, &[])?;
    let found = agent.log.wait_for("warning about earlier processes", warning);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(found?["processes"], 1);
    Ok(())
}

#[test]
fn a_sandbox_in_its_own_network_namespace_is_refused_with_a_clear_error() -> Result<()> {
    let setup = Setup::new("netns")?;
    let script = support_file("bypass_probe.py");
    let inner = format!(
        "ip link set lo up && exec {PYTHON} {} other-netns {} {EXCHANGE_PORT} {}",
        script.display(),
        setup.net.v4,
        setup.agent.port
    );
    let (pid, output) = run_in(&setup.sandbox, "unshare", &["--net", "sh", "-c", &inner])?;
    let result = probe_output(&output)?;
    for attempt in ["tcp", "dns", "udp_443"] {
        assert_eq!(result[attempt]["error"], "EPERM", "{attempt} from another network namespace: {result}");
    }
    assert_eq!(result["decoy_accepted"], false, "a connect was redirected into the sandbox's own namespace");
    let expected =
        format!("refused pid={pid} comm=python3: it is in another network namespace than its sandbox's listener");
    let trace = setup
        .agent
        .log
        .wait_for("the refusal's trace", |e| e["message"].as_str().is_some_and(|m| m.starts_with(&expected)))?;
    assert_eq!(trace["level"], "WARN");
    assert!(setup.agent.connections_of(pid).is_empty());
    assert_eq!(exchanges_seen(&setup.servers), 0);
    Ok(())
}

#[test]
fn the_control_socket_is_out_of_reach_of_sandboxed_users() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let dir = TempDir::new("control")?;
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755))?;
    let config = format!(
        "providers:\n  - name: openai\n    type: openai\n    base_url: http://{}:{PROVIDER_HTTP_PORT}\n    credential: {{ env: SE_TEST_KEY }}\n",
        net.v4
    );
    std::fs::write(dir.path.join("inference.yaml"), config)?;
    let sandbox = Sandbox::new("control")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let socket = dir.file("control.sock");
    let agent = Agent::start_with_env(
        &sandbox,
        &policy,
        &["--inference-config", &dir.file("inference.yaml"), "--control-socket", &socket, "--ca-dir", &dir.file("ca")],
        &[("SE_TEST_KEY", "sk-test")],
    )?;
    agent.log.wait_for("the control socket", |e| e["message"] == "control socket listening")?;
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let script = support_file("bypass_probe.py");
    let as_nobody = [
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        PYTHON,
        script.to_str().unwrap(),
        "unix-connect",
        &socket,
    ];
    let (_, output) = run_in(&sandbox, "setpriv", &as_nobody)?;
    let result = probe_output(&output)?;
    assert_eq!(result["error"], "EACCES", "a sandboxed user reached the control socket: {result}");
    Ok(())
}
