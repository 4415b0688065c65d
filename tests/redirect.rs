//! Transparent redirect, end to end on the real kernel: programs that know
//! nothing about proxies, in a real cgroup, reach a server in a network
//! namespace only through the agent.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpListener},
    os::unix::fs::MetadataExt,
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

fn canonical(path: &str) -> String {
    std::fs::canonicalize(path).unwrap().display().to_string()
}

/// `curl -w` fields: http_code size_download size_request size_header.
fn curl_fields(output: &std::process::Output) -> Vec<u64> {
    String::from_utf8_lossy(&output.stdout).split_whitespace().map(|f| f.parse().unwrap()).collect()
}

fn exchange_result(output: &std::process::Output) -> Result<Value> {
    ensure!(output.status.success(), "exchange client failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn assert_curl_intercepted(ip: IpAddr) -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let sandbox = Sandbox::new(&format!("curl-{}", if ip.is_ipv4() { 4 } else { 6 }))?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    // Plain HTTP goes to private addresses only (the private-IP gate).
    let target = match ip {
        IpAddr::V4(_) => IpAddr::V4(net.private_v4),
        IpAddr::V6(_) => IpAddr::V6(net.private_v6),
    };
    let (pid, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/100000", url_host(target)))?;
    ensure!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    let [code, body, request, header] = curl_fields(&output)[..] else { panic!("bad curl output") };
    assert_eq!((code, body), (200, 100_000));

    let seen = servers.events.wait_for("server saw the request", |e| e["path"] == "/bytes/100000")?;
    assert_eq!(seen["status"], 200);
    assert_eq!(seen["via"], "1.1 sandbox-egress");
    let log = agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "relayed");
    assert_eq!(log["exe"], canonical("/usr/bin/curl"));
    assert_eq!(log["comm"], "curl");
    assert_eq!(log["destination"], format!("{}:{HTTP_PORT}", url_host(target)));
    assert_eq!(log["cgroup_id"], std::fs::metadata(&sandbox.path)?.ino());
    // Plain HTTP heads are forwarded with a Via line added (the response's too).
    let via_line = "Via: 1.1 sandbox-egress\r\n".len() as u64;
    assert_eq!(log["bytes_up"], request + via_line, "client->server bytes");
    assert_eq!(log["bytes_down"], header + body, "server->client bytes, as curl received them");
    assert_eq!(log["protocol"], "http");
    Ok(())
}

#[test]
fn curl_over_ipv4_is_intercepted_and_attributed() -> Result<()> {
    assert_curl_intercepted(IpAddr::V4([0, 0, 0, 0].into()))
}

#[test]
fn curl_over_ipv6_is_intercepted_and_attributed() -> Result<()> {
    assert_curl_intercepted(IpAddr::V6(0.into()))
}

#[test]
fn raw_tcp_client_bytes_arrive_intact_over_ipv4_ipv6_and_v4_mapped() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let sandbox = Sandbox::new("raw")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let (send, recv) = (300_000u64, 500_000u64);
    let cases = [
        ("inet", net.v4.to_string(), net.v4.to_string()),
        ("inet6", net.v6.to_string(), format!("[{}]", net.v6)),
        ("inet6", format!("::ffff:{}", net.v4), net.v4.to_string()),
    ];
    for (family, host, logged_host) in cases {
        let (pid, output) = exchange(Some(&sandbox), family, &host, send, recv)?;
        let client = exchange_result(&output)?;
        assert_eq!(client["received"], recv, "{family} {host}");
        assert_eq!(client["received_intact"], true, "{family} {host}");
        let server =
            servers.events.wait_for("exchange", |e| e["kind"] == "exchange" && e["sha256"] == client["sent_sha256"])?;
        assert_eq!(server["received"], send);

        let log = agent.wait_connection_of(pid)?;
        assert_eq!(log["verdict"], "relayed");
        assert_eq!(log["exe"], canonical(PYTHON));
        assert_eq!(log["destination"], format!("{logged_host}:{EXCHANGE_PORT}"), "{family} {host}");
        let header_len = format!("SEND {send} RECV {recv}\n").len() as u64;
        assert_eq!(log["bytes_up"], header_len + send);
        assert_eq!(log["bytes_down"], recv);
    }
    Ok(())
}

#[test]
fn process_outside_the_cgroup_is_not_intercepted() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let sandbox = Sandbox::new("outside")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let url = format!("http://{}:{HTTP_PORT}/bytes/10", net.v4);

    let (outside_pid, output) = curl(None, &url)?;
    ensure!(output.status.success(), "direct curl failed");
    servers.events.wait_for("direct request", |e| e["path"] == "/bytes/10")?;
    // The sandboxed request is logged after the outside one would have been.
    let (inside_pid, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/11", net.private_v4))?;
    ensure!(output.status.success(), "sandboxed curl failed");
    agent.wait_connection_of(inside_pid)?;
    assert!(agent.connections_of(outside_pid).is_empty(), "a process outside the cgroup was intercepted");
    Ok(())
}

#[test]
fn sigkill_fails_closed_and_restart_resumes_interception() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let sandbox = Sandbox::new("failclosed")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let mut first = Agent::start(&sandbox, &policy, &[])?;
    let (pid, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/1", net.private_v4))?;
    ensure!(output.status.success(), "curl through the first agent failed");
    first.wait_connection_of(pid)?;

    first.kill();
    for (family, host) in [("inet", net.v4.to_string()), ("inet6", net.v6.to_string())] {
        let (_, output) = exchange(Some(&sandbox), family, &host, 10, 10)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{family}: sandboxed connect succeeded with the agent dead");
        assert!(stderr.contains("ConnectionRefusedError"), "{family}: expected a refused connect, got {stderr}");
    }
    let (_, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/2", net.private_v4))?;
    assert_eq!(output.status.code(), Some(7), "curl should fail to connect with the agent dead");
    // Give a leaked connection time to show up before asserting there is none.
    thread::sleep(Duration::from_millis(300));
    assert!(
        servers.events.matching(|e| e["kind"] == "exchange" || e["path"] == "/bytes/2").is_empty(),
        "the server was reached while the agent was dead"
    );

    let second = Agent::start(&sandbox, &policy, &[])?;
    // connect4/6, sock_ops, sendmsg4/6, recvmsg4/6, sock_create, setsockopt,
    // skb egress/ingress, connect_unix/sendmsg_unix (the fork and exec
    // tracepoints are the host's, attached once for every sandbox).
    second.log.wait_for("links replaced", |e| e["replaced"] == 13)?;
    let (pid, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/3", net.private_v4))?;
    ensure!(output.status.success(), "curl through the restarted agent failed");
    assert_eq!(second.wait_connection_of(pid)?["verdict"], "relayed");
    Ok(())
}

#[test]
fn sigterm_stops_cleanly_and_the_sandbox_stays_closed() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let sandbox = Sandbox::new("sigterm")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let mut agent = Agent::start(&sandbox, &policy, &[])?;
    let status = agent.terminate()?;
    assert!(status.success(), "agent exited with {status} on SIGTERM");
    agent.log.wait_for("shutdown summary", |e| e["event"] == "shutdown")?;
    let (_, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/1", net.private_v4))?;
    assert_eq!(output.status.code(), Some(7), "a stopped agent must leave the sandbox closed");
    Ok(())
}

#[test]
fn detach_restores_direct_connects() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let sandbox = Sandbox::new("detach")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    run(agent_bin().to_str().unwrap(), &["detach", "--cgroup", sandbox.path_str()])?;
    let (pid, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/5", net.v4))?;
    ensure!(output.status.success(), "direct curl after detach failed");
    servers.events.wait_for("request after detach", |e| e["path"] == "/bytes/5")?;
    assert!(agent.connections_of(pid).is_empty(), "intercepted after detach");
    Ok(())
}

#[test]
fn pins_of_a_cgroup_removed_without_detach_are_removed_by_the_next_agent() -> Result<()> {
    require_root();
    let policy = PolicyFile::new("version: 1\nnetwork_policies: {}\n")?;
    let removed = Sandbox::new("pins-removed")?;
    let pins = Path::new("/sys/fs/bpf/sandbox-egress").join(std::fs::metadata(&removed.path)?.ino().to_string());
    let mut first = Agent::start(&removed, &policy, &[])?;
    first.kill();
    ensure!(pins.exists(), "a killed agent leaves its pins (fail closed)");
    let other = Sandbox::new("pins-other")?;
    // The cgroup goes without a detach, as when a container runtime removes
    // it; no other test's agent may attach (and remove the pins) meanwhile.
    let mut left = false;
    let agent = Agent::start_alone(&other, &policy, || {
        drop(removed);
        left = pins.exists();
    })?;
    ensure!(left, "nothing removes them with the cgroup");
    ensure!(!pins.exists(), "the next agent removed the pins of the removed cgroup");
    agent.log.wait_for("the removal logged", |e| {
        e["message"] == "removed the pins of a cgroup that no longer exists"
            && e["cgroup_id"].as_u64().map(|id| id.to_string()) == pins.file_name().map(|n| n.to_string_lossy().into())
    })?;
    let own = Path::new("/sys/fs/bpf/sandbox-egress").join(std::fs::metadata(&other.path)?.ino().to_string());
    ensure!(own.exists(), "its own pins stay");
    Ok(())
}

/// A one-shot HTTP server on loopback in the test process; reports whether it was reached.
fn loopback_http_server() -> Result<(u16, thread::JoinHandle<bool>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let handle = thread::spawn(move || {
        for _ in 0..100 {
            if let Ok((mut stream, _)) = listener.accept() {
                stream.set_nonblocking(false).unwrap();
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    });
    Ok((port, handle))
}

/// Opaque TCP to loopback (a non-HTTP first byte), printing the server's answer.
fn loopback_exchange(sandbox: &Sandbox, port: u16) -> Result<(u32, std::process::Output)> {
    let mut command = sandbox.command(PYTHON);
    command.args(["-c", &format!(
        "import socket; s=socket.create_connection(('127.0.0.1', {port}), timeout=5); s.sendall(b'\\x00ping'); print(s.recv(100).decode())"
    )]);
    let child = command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    let pid = child.id();
    Ok((pid, child.wait_with_output()?))
}

#[test]
fn loopback_destinations_are_denied_unless_a_policy_lists_them() -> Result<()> {
    require_root();
    let sandbox = Sandbox::new("loopback")?;

    let (port, server) = loopback_http_server()?;
    let wide_open = PolicyFile::new(&format!(
        "version: 1\nnetwork_policies:\n  everything:\n    endpoints:\n      - allowed_ips: [\"0.0.0.0/0\"]\n        port: {port}\n    binaries: [{{ path: \"/**\" }}]\n"
    ))?;
    let agent = Agent::start(&sandbox, &wide_open, &[])?;
    let (pid, output) = loopback_exchange(&sandbox, port)?;
    assert!(!String::from_utf8_lossy(&output.stdout).contains("200 OK"), "loopback reached through 0.0.0.0/0");
    let log = agent.wait_connection_of(pid)?;
    assert_eq!(log["verdict"], "denied");
    assert_eq!(log["reason"], "127.0.0.1 is a loopback address and no endpoint lists it explicitly");
    assert!(!server.join().unwrap(), "the loopback server was reached");
    drop(agent);

    let (port, server) = loopback_http_server()?;
    let listed = PolicyFile::new(&format!(
        "version: 1\nnetwork_policies:\n  local:\n    endpoints:\n      - host: 127.0.0.1\n        port: {port}\n    binaries: [{{ path: \"/**\" }}]\n"
    ))?;
    let agent = Agent::start(&sandbox, &listed, &[])?;
    let (pid, output) = loopback_exchange(&sandbox, port)?;
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(agent.wait_connection_of(pid)?["verdict"], "relayed");
    assert!(server.join().unwrap());
    Ok(())
}

#[test]
fn v4_mapped_literal_hosts_are_their_ipv4_address() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let sandbox = Sandbox::new("mapped")?;
    let (port, loopback) = loopback_http_server()?;
    let policy = PolicyFile::new(&format!(
        "version: 1\nnetwork_policies:\n  mapped:\n    endpoints:\n\
         \x20     - {{ port: {HTTP_PORT}, allowed_ips: [\"{}/24\"] }}\n\
         \x20     - {{ port: {port}, allowed_ips: [\"0.0.0.0/0\"] }}\n\
         \x20   binaries: [{{ path: \"/**\" }}]\n",
        net.private_v4
    ))?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let request = |url: String| curl_i(&sandbox, &["-g", "--noproxy", "*", &url]);

    // Loopback spelt v4-mapped is loopback, refused as such (while the server still listens).
    let denied = request(format!("http://[::ffff:127.0.0.1]:{port}/"))?;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json()["error"], "ssrf_denied", "{}", denied.body);
    assert_eq!(denied.json()["address_class"], "loopback", "{}", denied.body);
    let log = agent.wait_connection_of(denied.pid)?;
    assert_eq!(log["verdict"], "denied");
    assert_eq!(log["reason"], "127.0.0.1 is a loopback address and no endpoint lists it explicitly");

    // The Host names the address connected to, as `policy eval --host ::ffff:A --ip A` says.
    let allowed = request(format!("http://[::ffff:{}]:{HTTP_PORT}/bytes/7", net.private_v4))?;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    servers.events.wait_for("the v4-mapped request", |e| e["path"] == "/bytes/7")?;
    assert_eq!(agent.wait_connection_of(allowed.pid)?["verdict"], "relayed");
    assert!(!loopback.join().unwrap(), "the loopback server was reached");
    Ok(())
}

#[test]
fn the_agents_own_listener_is_not_a_destination() -> Result<()> {
    require_root();
    let sandbox = Sandbox::new("ownport")?;
    let policy = PolicyFile::new("version: 1\nnetwork_policies: {}\n")?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    // A request to the listener itself (not a proxy request) is refused, not relayed to itself.
    for host in ["127.0.0.1", "[::1]"] {
        let (pid, output) = curl(Some(&sandbox), &format!("http://{host}:{}/", agent.port))?;
        assert_eq!(curl_fields(&output)[0], 400, "{host}");
        let log = agent.wait_connection_of(pid)?;
        assert_eq!(log["verdict"], "denied", "{host}");
        assert_eq!(log["reason"], "this is an egress proxy: send CONNECT host:port or an absolute-form request");
        assert!(log["upstream"].is_null(), "{host}: relayed somewhere: {log}");
    }
    Ok(())
}

#[test]
fn ebpf_redirect_traces_reach_the_agent_log() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let sandbox = Sandbox::new("traces")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start_with_env(
        &sandbox,
        &policy,
        &["--ebpf-log-level", "debug"],
        &[("SANDBOX_EGRESS_LOG", "info,agent_ebpf=debug")],
    )?;
    let (pid, output) = curl(Some(&sandbox), &format!("http://{}:{HTTP_PORT}/bytes/1", net.private_v4))?;
    ensure!(output.status.success(), "curl failed");
    // comm is the sandbox's to choose: it is logged escaped on the connection line, not here.
    let expected = format!("redirect pid={pid} dst=[::ffff:{}]:{HTTP_PORT}", net.private_v4);
    agent.log.wait_for(&expected, |e| e["message"] == expected.as_str())?;
    Ok(())
}

fn run_agent(args: &[&str]) -> Result<(bool, String)> {
    let output = Command::new(agent_bin()).args(args).args(own_control_socket(args)).output()?;
    Ok((output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned()))
}

#[test]
fn run_reports_clear_errors() -> Result<()> {
    require_root();
    let (ok, stderr) = run_agent(&["run", "--cgroup", "/tmp", "--policy", "/dev/null"])?;
    assert!(!ok && stderr.contains("/tmp is not a cgroup v2 directory"), "{stderr}");

    let (ok, stderr) =
        run_agent(&["run", "--cgroup", "/sys/fs/cgroup/unified/does-not-exist", "--policy", "/dev/null"])?;
    assert!(!ok && stderr.contains("does not exist"), "{stderr}");

    let sandbox = Sandbox::new("errors")?;
    let policy = PolicyFile::new("version: 1\nnetwork_policies: {}\n")?;
    let policy_path = policy.path.to_str().unwrap();
    let (ok, stderr) = run_agent(&["run", "--cgroup", sandbox.path_str(), "--policy", "/nonexistent.yaml"])?;
    assert!(!ok && stderr.contains("cannot read policy file /nonexistent.yaml"), "{stderr}");

    let taken = TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let (ok, stderr) =
        run_agent(&["run", "--cgroup", sandbox.path_str(), "--listen-port", &port, "--policy", policy_path])?;
    assert!(!ok && stderr.contains("already in use"), "{stderr}");
    let pins = Path::new("/sys/fs/bpf/sandbox-egress").join(std::fs::metadata(&sandbox.path)?.ino().to_string());
    assert!(!pins.exists(), "a failed start left pins at {}", pins.display());

    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(agent_bin())
        .args(["run", "--cgroup", sandbox.path_str(), "--policy", policy_path])
        .output()
        .context("setpriv")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("must run as root"), "{stderr}");
    Ok(())
}

#[test]
fn udp_other_than_dns_is_refused_so_quic_falls_back_to_tcp() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let sandbox = Sandbox::new("udp")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let _agent = Agent::start(&sandbox, &policy, &[])?;
    // sendto (unconnected) and connect (connected UDP), over IPv4 and IPv6, to QUIC's port and another.
    let script = r#"
import socket, sys
results = []
for family, host in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    for port in (443, 5353):
        for how in ('sendto', 'connect'):
            s = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if how == 'sendto':
                    s.sendto(b'x', (host, port))
                else:
                    s.connect((host, port))
                results.append(f'{how} {host} {port}: sent')
            except PermissionError:
                results.append(f'{how} {host} {port}: refused')
print('\n'.join(results))
"#;
    let (_, output) = run_in(&sandbox, PYTHON, &["-c", script, &net.v4.to_string(), &net.v6.to_string()])?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 8, "{stdout}");
    assert!(stdout.lines().all(|line| line.ends_with(": refused")), "UDP left the sandbox:\n{stdout}");
    Ok(())
}

#[test]
fn the_open_file_limit_sizes_the_default_connection_budget_and_warns_only_for_a_flag_it_cannot_cover() -> Result<()> {
    require_root();
    let sandbox = Sandbox::new("nofile")?;
    let policy = PolicyFile::new("version: 1\nnetwork_policies: {}\n")?;
    // A hard limit of 4000 the agent may not raise (no CAP_SYS_RESOURCE):
    // (4000 - 1024) / 6 = 496 connections fit.
    let limited = ["prlimit", "--nofile=4000:4000", "setpriv", "--bounding-set", "-sys_resource"];
    let defaulted = Agent::start_under(&limited, &sandbox, &policy, &[])?;
    let sized = defaulted.log.wait_for("the default sized", |e| {
        e["message"].as_str().is_some_and(|m| m.starts_with("--max-connections defaults to"))
    })?;
    assert_eq!(
        (&sized["level"], &sized["max_connections"], &sized["open_files"]),
        (&Value::from("INFO"), &Value::from(496), &Value::from(4000)),
        "{sized}"
    );
    ensure!(
        defaulted.log.matching(|e| e["level"] == "WARN").is_empty(),
        "no warning for the default: {:?}",
        defaulted.log.matching(|e| e["level"] == "WARN")
    );
    drop(defaulted);
    let asked = Agent::start_under(&limited, &sandbox, &policy, &["--max-connections", "1000"])?;
    let warned = asked.log.wait_for("the warning", |e| e["level"] == "WARN" && e["max_connections"] == 1000)?;
    ensure!(
        warned["message"]
            .as_str()
            .is_some_and(|m| m.contains("covers about 496 connections, fewer than --max-connections 1000")),
        "{warned}"
    );
    Ok(())
}
