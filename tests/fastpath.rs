//! The kernel fast path, end to end: an endpoint declared `protocol: tcp`
//! is decided by the proxy for an executable's first connection to a
//! destination; the next ones go direct from connect4/6, each still with
//! its close line (`path: kernel`, the kernel's byte counts), and only while
//! the decision holds: not after a reload that drops it, nor once the
//! sandbox is removed or the agent is gone.

use std::{os::unix::fs::PermissionsExt, path::Path, thread, time::Duration};

use anyhow::{ensure, Result};
use e2e::*;
use serde_json::Value;

fn canonical(path: &str) -> String {
    std::fs::canonicalize(path).unwrap().display().to_string()
}

/// A policy whose one endpoint is `host:port`, L4 only, for `binaries`.
fn l4_policy(host: &str, port: u16, binaries: &[&str]) -> String {
    let binaries: Vec<String> = binaries.iter().map(|path| format!("{{ path: \"{path}\" }}")).collect();
    format!(
        "version: 1\nnetwork_policies:\n  l4:\n    binaries: [{}]\n    endpoints:\n      - host: \"{host}\"\n        \
         port: {port}\n        protocol: tcp\n",
        binaries.join(", ")
    )
}

/// The exchange client run by `program` (a Python interpreter).
fn exchange_by(program: &str, sandbox: &Sandbox, host: &str, send: u64, recv: u64) -> Result<(u32, Value)> {
    let mut command = sandbox.command(program);
    command.arg(support_file("exchange_client.py")).args([
        "inet",
        host,
        &EXCHANGE_PORT.to_string(),
        &send.to_string(),
        &recv.to_string(),
    ]);
    let (pid, output) = spawn_and_wait(command)?;
    ensure!(output.status.success(), "exchange failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok((pid, serde_json::from_slice(&output.stdout)?))
}

fn exchange_fails(program: &str, sandbox: &Sandbox, host: &str) -> Result<(u32, String)> {
    let mut command = sandbox.command(program);
    command.arg(support_file("exchange_client.py")).args(["inet", host, &EXCHANGE_PORT.to_string(), "10", "10"]);
    let (pid, output) = spawn_and_wait(command)?;
    ensure!(!output.status.success(), "the exchange succeeded");
    Ok((pid, String::from_utf8_lossy(&output.stderr).into_owned()))
}

fn header_len(send: u64, recv: u64) -> u64 {
    format!("SEND {send} RECV {recv}\n").len() as u64
}

/// A copy of the Python interpreter under another path (another executable file).
fn python_copy(dir: &TempDir, name: &str) -> Result<String> {
    let copy = dir.file(name);
    std::fs::copy(canonical(PYTHON), &copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    // The sandbox runs it as root; the temp dir must be reachable.
    ensure!(Path::new(&copy).exists());
    Ok(copy)
}

#[test]
fn an_allowed_executable_connects_direct_after_its_first_connection_and_is_logged_by_the_kernel() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let dir = TempDir::new("fastpath-exe")?;
    let other = python_copy(&dir, "python-other")?;
    let denied = python_copy(&dir, "python-denied")?;
    let python = canonical(PYTHON);
    let host = net.v4.to_string();
    let policy = PolicyFile::new(&l4_policy(&host, EXCHANGE_PORT, &[&python, &other]))?;
    let sandbox = Sandbox::new("fastpath")?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let (send, recv) = (200_000u64, 300_000u64);

    let (first_pid, first) = exchange_by(PYTHON, &sandbox, &host, send, recv)?;
    assert_eq!(first["local"], "127.0.0.1", "the first connection goes through the agent");
    let line = agent.wait_connection_of(first_pid)?;
    assert_eq!((&line["verdict"], &line["path"]), (&Value::from("relayed"), &Value::Null), "{line}");
    assert_eq!(line["exe"], python);

    let (pid, second) = exchange_by(PYTHON, &sandbox, &host, send, recv)?;
    assert_eq!(second["received_intact"], true);
    assert_ne!(second["local"], "127.0.0.1", "the second connection goes direct: {second}");
    servers
        .events
        .wait_for("the direct exchange", |e| e["kind"] == "exchange" && e["sha256"] == second["sent_sha256"])?;
    let line = agent.wait_connection_of(pid)?;
    assert_eq!(line["path"], "kernel", "{line}");
    assert_eq!(line["verdict"], "relayed");
    assert_eq!(line["sandbox"], agent.wait_connection_of(first_pid)?["sandbox"]);
    assert_eq!(line["exe"], python);
    assert_eq!(line["comm"], "python3");
    assert_eq!(line["destination"], format!("{host}:{EXCHANGE_PORT}"));
    assert_eq!(line["policy"], "l4");
    assert_eq!(line["bytes_up"], header_len(send, recv) + send, "{line}");
    assert_eq!(line["bytes_down"], recv, "{line}");
    assert_eq!(agent.connections_of(pid).len(), 1, "the proxy did not see it");

    // Another executable the endpoint allows: its own first connection goes through the agent.
    let (other_first, local) = exchange_by(&other, &sandbox, &host, 10, 10)?;
    assert_eq!(local["local"], "127.0.0.1");
    assert_eq!(agent.wait_connection_of(other_first)?["exe"], other);
    let (other_pid, direct) = exchange_by(&other, &sandbox, &host, 10, 20)?;
    assert_ne!(direct["local"], "127.0.0.1");
    let line = agent.wait_connection_of(other_pid)?;
    assert_eq!((&line["path"], &line["exe"]), (&Value::from("kernel"), &Value::from(other.clone())), "{line}");
    assert_eq!(line["bytes_down"], 20);

    // An executable the endpoint does not list is denied, every time, by the proxy.
    for _ in 0..2 {
        let (pid, _) = exchange_fails(&denied, &sandbox, &host)?;
        let line = agent.wait_connection_of(pid)?;
        assert_eq!((&line["verdict"], &line["path"]), (&Value::from("denied"), &Value::Null), "{line}");
    }

    // A reload that drops the endpoint: the next connect is the proxy's again, and denied.
    policy.write(&l4_policy(&host, EXCHANGE_PORT + 1, &[&python, &other]))?;
    agent.log.wait_for("the reload", |e| e["event"] == "policy_reloaded")?;
    let (pid, _) = exchange_fails(PYTHON, &sandbox, &host)?;
    let line = agent.wait_connection_of(pid)?;
    assert_eq!((&line["verdict"], &line["path"]), (&Value::from("denied"), &Value::Null), "{line}");
    Ok(())
}

#[test]
fn a_fast_path_connect_fails_once_the_agent_is_killed() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let host = net.v4.to_string();
    let policy = PolicyFile::new(&l4_policy(&host, EXCHANGE_PORT, &[&canonical(PYTHON)]))?;
    let sandbox = Sandbox::new("fastpath-kill")?;
    let mut agent = Agent::start(&sandbox, &policy, &[])?;
    exchange_by(PYTHON, &sandbox, &host, 10, 10)?;
    let (pid, direct) = exchange_by(PYTHON, &sandbox, &host, 10, 10)?;
    assert_ne!(direct["local"], "127.0.0.1", "fast-pathed before the kill");
    assert_eq!(agent.wait_connection_of(pid)?["path"], "kernel");

    agent.kill();
    let exchanges = servers.events.matching(|e| e["kind"] == "exchange").len();
    let (_, stderr) = exchange_fails(PYTHON, &sandbox, &host)?;
    assert!(stderr.contains("ConnectionRefusedError"), "expected a refused connect, got {stderr}");
    // Give a leaked connection time to show up before asserting there is none.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(servers.events.matching(|e| e["kind"] == "exchange").len(), exchanges, "the server was reached");
    Ok(())
}

#[test]
fn a_removed_sandbox_cannot_use_its_fast_path() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let host = net.v4.to_string();
    let policy = PolicyFile::new(&l4_policy(&host, EXCHANGE_PORT, &[&canonical(PYTHON)]))?;
    let sandbox = Sandbox::new("fastpath-removed")?;
    let mut daemon = AgentDaemon::start(&[])?;
    daemon.add("l4", &sandbox, &policy, &[])?;
    exchange_by(PYTHON, &sandbox, &host, 10, 10)?;
    let (pid, direct) = exchange_by(PYTHON, &sandbox, &host, 10, 10)?;
    assert_ne!(direct["local"], "127.0.0.1", "fast-pathed before the removal");
    assert_eq!(daemon.agent.wait_connection_of(pid)?["path"], "kernel");

    let (ok, stdout, stderr) = daemon.cli(&["sandbox", "remove", "l4"])?;
    ensure!(ok, "{stdout}{stderr}");
    let (_, stderr) = exchange_fails(PYTHON, &sandbox, &host)?;
    assert!(stderr.contains("PermissionError"), "expected EPERM, got {stderr}");
    Ok(())
}

#[test]
fn the_kernel_reads_the_executable_of_each_process() -> Result<()> {
    // Different binaries from one sandbox, each named right in its line
    // (a copy of the same file is another executable).
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let dir = TempDir::new("fastpath-ids")?;
    let copy = python_copy(&dir, "python-copy")?;
    let sandbox = Sandbox::new("fastpath-ids")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let host = net.v4.to_string();
    for program in [PYTHON, copy.as_str(), PYTHON, copy.as_str()] {
        let (pid, _) = exchange_by(program, &sandbox, &host, 10, 10)?;
        assert_eq!(agent.wait_connection_of(pid)?["exe"], canonical(program));
    }
    Ok(())
}

#[test]
fn ipv6_and_v4_mapped_connects_take_the_fast_path_too() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let python = canonical(PYTHON);
    let policy = format!(
        "{}      - host: \"{}\"\n        port: {EXCHANGE_PORT}\n        protocol: tcp\n",
        l4_policy(&net.v4.to_string(), EXCHANGE_PORT, &[&python]),
        net.v6
    );
    let policy = PolicyFile::new(&policy)?;
    let sandbox = Sandbox::new("fastpath-v6")?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let cases = [(net.v6.to_string(), format!("[{}]", net.v6)), (format!("::ffff:{}", net.v4), net.v4.to_string())];
    for (host, logged) in cases {
        let run = |send: u64, recv: u64| -> Result<(u32, Value)> {
            let mut command = sandbox.command(PYTHON);
            command.arg(support_file("exchange_client.py")).args([
                "inet6",
                &host,
                &EXCHANGE_PORT.to_string(),
                &send.to_string(),
                &recv.to_string(),
            ]);
            let (pid, output) = spawn_and_wait(command)?;
            ensure!(output.status.success(), "exchange failed: {}", String::from_utf8_lossy(&output.stderr));
            Ok((pid, serde_json::from_slice(&output.stdout)?))
        };
        let (pid, first) = run(10, 10)?;
        assert!(first["local"].as_str().is_some_and(|local| local.ends_with("127.0.0.1") || local == "::1"), "{first}");
        assert_eq!(agent.wait_connection_of(pid)?["path"], Value::Null);
        let (pid, second) = run(1000, 2000)?;
        assert!(
            second["local"].as_str().is_some_and(|local| !local.ends_with("127.0.0.1") && local != "::1"),
            "{second}"
        );
        let line = agent.wait_connection_of(pid)?;
        assert_eq!(
            (&line["path"], &line["destination"]),
            (&Value::from("kernel"), &Value::from(format!("{logged}:{EXCHANGE_PORT}"))),
            "{line}"
        );
        assert_eq!(
            (&line["bytes_up"], &line["bytes_down"]),
            (&Value::from(header_len(1000, 2000) + 1000), &Value::from(2000)),
            "{line}"
        );
    }
    Ok(())
}

/// Tries, from a process the fast path serves, to reach another port of
/// the test host with an HTTP request: over a socket connected by the fast
/// path, disconnected (AF_UNSPEC) and connected again elsewhere; and over a
/// fresh socket. Prints the local address each got (the loopback when the
/// agent has it) or the error.
const TURN: &str = r#"
import ctypes, json, socket, sys
host, port, attack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
request = b"GET /attack HTTP/1.0\r\n\r\n"
def attempt(sock):
    try:
        sock.connect((host, attack))
        local = sock.getsockname()[0]
        sock.sendall(request)
        sock.recv(100)
        return local
    except OSError as error:
        return type(error).__name__
out = {}
s = socket.create_connection((host, port), timeout=5)
out["fast_local"] = s.getsockname()[0]
libc = ctypes.CDLL(None, use_errno=True)
unspec = (ctypes.c_ubyte * 16)()
out["disconnect"] = libc.connect(s.fileno(), unspec, 16)
out["reconnect"] = attempt(s)
t = socket.socket()
t.settimeout(5)
out["fresh"] = attempt(t)
print(json.dumps(out))
"#;

#[test]
fn a_fast_path_socket_cannot_be_turned_to_another_destination() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let host = net.v4.to_string();
    let policy = PolicyFile::new(&l4_policy(&host, EXCHANGE_PORT, &[&canonical(PYTHON)]))?;
    let sandbox = Sandbox::new("fastpath-turn")?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    exchange_by(PYTHON, &sandbox, &host, 10, 10)?;
    let mut fast = Vec::new();
    for _ in 0..2 {
        let mut command = sandbox.command(PYTHON);
        command.args(["-c", TURN, &host, &EXCHANGE_PORT.to_string(), &HTTP_PORT.to_string()]);
        let (_, output) = spawn_and_wait(command)?;
        ensure!(output.status.success(), "probe failed: {}", String::from_utf8_lossy(&output.stderr));
        let out: Value = serde_json::from_slice(&output.stdout)?;
        assert_eq!(out["disconnect"], 0, "{out}");
        for attempt in ["reconnect", "fresh"] {
            assert_eq!(out[attempt], "127.0.0.1", "{attempt} went to the agent: {out}");
        }
        fast.push(out["fast_local"].clone());
    }
    assert!(fast.iter().all(|local| local != "127.0.0.1"), "the probes' first sockets went by the fast path: {fast:?}");
    agent.log.wait_for("a denied attempt", |e| e["event"] == "connection" && e["verdict"] == "denied")?;
    thread::sleep(Duration::from_millis(300));
    assert!(servers.events.matching(|e| e["path"] == "/attack").is_empty(), "the other port was reached");
    Ok(())
}

/// An exchange that waits between its header and its bytes: prints its
/// local address once connected, then waits for a line on stdin.
const HELD: &str = r#"
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(b"SEND 5 RECV 7\n")
print(json.dumps({"local": s.getsockname()[0]}), flush=True)
sys.stdin.readline()
s.sendall(b"hello")
received = b""
while True:
    data = s.recv(100)
    if not data:
        break
    received += data
print(json.dumps({"received": len(received)}), flush=True)
"#;

/// A daemon started by an upgrade (not a child of the test): killed on drop.
struct Started(u32);

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test had started.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        for _ in 0..250 {
            if !Path::new(&format!("/proc/{}", self.0)).exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_fast_socket_open_across_an_upgrade_is_logged_by_the_new_daemon() -> Result<()> {
    use std::{
        io::Write,
        process::{Command, Stdio},
    };
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let host = net.v4.to_string();
    let policy = PolicyFile::new(&l4_policy(&host, EXCHANGE_PORT, &[&canonical(PYTHON)]))?;
    let sandbox = Sandbox::new("fastpath-upgrade")?;
    let dir = TempDir::new("fastpath-upgrade")?;
    let mut daemon = AgentDaemon::start(&[])?;
    daemon.add("l4", &sandbox, &policy, &[])?;
    exchange_by(PYTHON, &sandbox, &host, 10, 10)?;

    let mut held = sandbox.command(PYTHON);
    held.args(["-c", HELD, &host, &EXCHANGE_PORT.to_string()]);
    let mut held = held.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
    let held_pid = held.id();
    let out = JsonLines::follow_stdout(held.stdout.take().unwrap());
    let local = out.wait_for("connected", |e| e.get("local").is_some())?;
    assert_ne!(local["local"], "127.0.0.1", "the held connection goes by the fast path");

    let next = dir.file("sandbox-egress-next");
    std::fs::copy(agent_bin(), &next)?;
    let output =
        Command::new(agent_bin()).args(["upgrade", "--control-socket", &daemon.socket, "--binary", &next]).output()?;
    ensure!(output.status.success(), "upgrade failed: {}", String::from_utf8_lossy(&output.stderr));
    let new_pid: u32 = String::from_utf8_lossy(&output.stdout).trim().parse()?;
    let _new = Started(new_pid);
    daemon.agent.log.wait_for("the new daemon ready", |e| e["event"] == "ready" && e["agent_pid"] == new_pid)?;

    writeln!(held.stdin.take().unwrap())?;
    out.wait_for("the exchange's end", |e| e["received"] == 7)?;
    let _ = held.wait()?;
    let line = daemon.agent.wait_connection_of(held_pid)?;
    assert_eq!((&line["path"], &line["agent_pid"]), (&Value::from("kernel"), &Value::from(new_pid)), "{line}");
    assert_eq!(
        (&line["bytes_up"], &line["bytes_down"]),
        (&Value::from(header_len(5, 7) + 5), &Value::from(7)),
        "{line}"
    );
    assert_eq!(daemon.agent.connections_of(held_pid).len(), 1, "logged once");
    Ok(())
}

/// One TLS handshake and `GET /` to `host:port` without SNI (an IP, as
/// many clients do for a literal), not verifying; prints the socket's local
/// address then the status line.
const TLS_CLIENT: &str = r#"
import socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=30)
local = sock.getsockname()[0]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
tls = context.wrap_socket(sock)
tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
print(local)
print(tls.recv(64).split(b"\r\n")[0].decode())
"#;

#[test]
fn a_tls_stream_passed_through_to_an_l4_endpoint_takes_the_fast_path_next_time() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let host = net.v4.to_string();
    let policy = PolicyFile::new(&l4_policy(&host, TLS_PORT, &[&canonical(PYTHON)]))?;
    let sandbox = Sandbox::new("fastpath-tls")?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let tls_exchange = || -> Result<(u32, String)> {
        let mut command = sandbox.command(PYTHON);
        command.args(["-c", TLS_CLIENT, &host, &TLS_PORT.to_string()]);
        let (pid, output) = spawn_and_wait(command)?;
        ensure!(output.status.success(), "TLS client failed: {}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8(output.stdout)?;
        let mut lines = stdout.lines();
        let local = lines.next().unwrap_or_default().to_string();
        ensure!(lines.next().is_some_and(|status| status.starts_with("HTTP/1")), "no HTTP answer: {stdout}");
        Ok((pid, local))
    };
    let (first_pid, local) = tls_exchange()?;
    assert_eq!(local, "127.0.0.1", "the first connection goes through the agent");
    let line = agent.wait_connection_of(first_pid)?;
    assert_eq!((&line["protocol"], &line["verdict"], &line["path"]), (&"tls".into(), &"relayed".into(), &Value::Null));
    let (pid, local) = tls_exchange()?;
    assert_ne!(local, "127.0.0.1", "the second TLS connection goes direct");
    let line = agent.wait_connection_of(pid)?;
    assert_eq!((&line["path"], &line["policy"]), (&Value::from("kernel"), &Value::from("l4")), "{line}");
    Ok(())
}
