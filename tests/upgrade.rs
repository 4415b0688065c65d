//! `sandbox-egress upgrade` on the real kernel: a slow download and a
//! WebSocket session in flight and a new connection every 20 ms while the
//! daemon hands over to a copy of its binary at another path. Nothing is
//! refused, reset or cut; the old daemon finishes what it had and exits;
//! systemd is told the new main pid; the runtime state comes along. A
//! binary that exits at start leaves the old daemon serving. A drain
//! timeout (after an upgrade, or on SIGTERM) resets a connection that never
//! ends and logs it; a daemon an upgrade started upgrades again.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

/// 8 MiB over 8 s, then the server closes.
const SLOW_PORT: u16 = 9601;
/// One line echoed, then the server closes.
const ECHO_PORT: u16 = 9602;
/// A byte every 100 ms, for ever.
const ENDLESS_PORT: u16 = 9603;
/// Allowed by no policy: a denial to carry over.
const DENIED_PORT: u16 = 9604;
/// Echo again, allowed only by the name [`NAME`]: decided by what the
/// sandbox resolved.
const NAMED_PORT: u16 = 9605;
const NAME: &str = "echo.upgrade.test";
const DOWNLOAD_BYTES: u64 = 8 * 1024 * 1024;
const WS_MESSAGES: &str = "40";

/// The servers, in the test host's namespace.
const SERVERS: &str = r#"
import hashlib, json, socket, sys, threading, time
def emit(**event):
    print(json.dumps(event), flush=True)
def slow(conn):
    with conn:
        for i in range(64):
            conn.sendall(hashlib.sha256(str(i).encode()).digest() * 4096)
            time.sleep(0.125)
def echo(conn):
    with conn:
        conn.sendall(conn.makefile("rb").readline())
def endless(conn):
    with conn:
        try:
            while True:
                conn.sendall(b".")
                time.sleep(0.1)
        except OSError:
            pass
def serve(listener, handler):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()
for port, handler in ((int(sys.argv[1]), slow), (int(sys.argv[2]), echo), (int(sys.argv[3]), endless), (int(sys.argv[4]), echo)):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(512)
    threading.Thread(target=serve, args=(listener, handler), daemon=True).start()
emit(kind="ready")
threading.Event().wait()
"#;

/// Sandboxed: reads the slow download to its end and checks it.
const DOWNLOAD: &str = r#"
import hashlib, json, socket, sys
expected = hashlib.sha256(b"".join(hashlib.sha256(str(i).encode()).digest() * 4096 for i in range(64))).hexdigest()
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
digest, size = hashlib.sha256(), 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    if size == 0:
        print(json.dumps({"kind": "started"}), flush=True)
    digest.update(data)
    size += len(data)
print(json.dumps({"kind": "done", "bytes": size, "checksum_ok": digest.hexdigest() == expected}), flush=True)
"#;

/// Sandboxed: a new connection every 20 ms (one line echoed on each) until
/// the stop file appears (at most 60 s); each connect's CLOCK_MONOTONIC
/// start and outcome.
const PROBER: &str = r#"
import json, os, socket, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
results = []
next_start = time.monotonic()
for n in range(3000):
    if os.path.exists(stop):
        break
    start = time.monotonic_ns()
    try:
        with socket.create_connection((host, port), timeout=10) as conn:
            line = b"probe %d\n" % n
            conn.sendall(line)
            reply = conn.makefile("rb").readline()
            outcome = "ok" if reply == line else "bad reply %r" % reply
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except OSError as error:
        outcome = repr(error)
    results.append([start, outcome])
    next_start += 0.02
    time.sleep(max(0, next_start - time.monotonic()))
print(json.dumps(results), flush=True)
"#;

/// Sandboxed: reads the endless stream until it ends; how it ended.
const ENDLESS: &str = r#"
import json, socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
size, end = 0, "eof"
try:
    while True:
        data = conn.recv(4096)
        if not data:
            break
        if size == 0:
            print(json.dumps({"kind": "started"}), flush=True)
        size += len(data)
except ConnectionResetError:
    end = "reset"
print(json.dumps({"kind": "done", "end": end, "bytes": size}), flush=True)
"#;

/// Sandboxed: one line echoed, printed.
const ECHO_ONCE: &str = r#"
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    conn.sendall(b"once\n")
    sys.stdout.write(conn.makefile("rb").readline().decode())
"#;

/// A network namespace of a sandbox's own, with only `lo`.
struct OwnNetns {
    name: String,
}

impl OwnNetns {
    fn new() -> Result<Self> {
        let name = format!("se-upgrade-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

struct Setup {
    _dns: Dns,
    net: TestNet,
    _servers: Servers,
    sandbox: Sandbox,
    _policy: PolicyFile,
    dir: TempDir,
}

impl Setup {
    fn new(name: &str) -> Result<Self> {
        require_root();
        let net = TestNet::new()?;
        let ports = [SLOW_PORT, ECHO_PORT, ENDLESS_PORT, NAMED_PORT].map(|port| port.to_string());
        let servers = net.start_python_servers(SERVERS, &ports.each_ref().map(String::as_str))?;
        let dns = net.start_dns(&[(NAME, net.private_v4.into())])?;
        let mut endpoints = String::new();
        for port in [SLOW_PORT, ECHO_PORT, ENDLESS_PORT, WS_PORT] {
            endpoints += &format!(
                "      - host: \"{0}\"\n        port: {port}\n        allowed_ips: [\"{0}/32\"]\n",
                net.private_v4
            );
        }
        endpoints += &format!("      - host: {NAME}\n        port: {NAMED_PORT}\n");
        let policy = PolicyFile::new(&format!(
            "version: 1\nnetwork_policies:\n  test:\n    binaries: [{{ path: \"/**\" }}]\n    endpoints:\n{endpoints}"
        ))?;
        let (sandbox, dir) = (Sandbox::new(name)?, TempDir::new(name)?);
        Ok(Self { _servers: servers, _dns: dns, sandbox, _policy: policy, dir, net })
    }

    /// A daemon serving the sandbox as `main` (added at run time), asking the test's DNS server.
    fn daemon(&self, args: &[&str], env: &[(&str, &str)]) -> Result<AgentDaemon> {
        let dns = self._dns.agent_args();
        let args: Vec<&str> = dns.iter().map(String::as_str).chain(args.iter().copied()).collect();
        let mut daemon = AgentDaemon::start_with_env(&args, env)?;
        daemon.add("main", &self.sandbox, &self._policy, &[])?;
        Ok(daemon)
    }

    /// A copy of the agent's binary at another path: the "new version".
    fn next_binary(&self) -> Result<PathBuf> {
        let path = PathBuf::from(self.dir.file("sandbox-egress-next"));
        std::fs::copy(agent_bin(), &path)?;
        Ok(path)
    }

    /// A Python client in the sandbox, its stdout followed.
    fn client(&self, script: &str, port: u16, extra: &[&str]) -> Result<(Child, JsonLines)> {
        let mut command = self.sandbox.command(PYTHON);
        command.args(["-c", script, &self.net.private_v4.to_string(), &port.to_string()]).args(extra);
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        let lines = JsonLines::follow_stdout(child.stdout.take().context("stdout piped")?);
        Ok((child, lines))
    }
}

/// A daemon started by an upgrade (not a child of the test): stopped on drop.
struct Started(u32);

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test had started.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        let deadline = Instant::now() + WAIT;
        while Path::new(&format!("/proc/{}", self.0)).exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `sandbox-egress upgrade --control-socket SOCKET ARGS`: (success, stdout, stderr).
fn upgrade(socket: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let output = Command::new(agent_bin()).args(["upgrade", "--control-socket", socket]).args(args).output()?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    Ok((output.status.success(), text(&output.stdout), text(&output.stderr)))
}

/// Waits (bounded) for a child to exit.
fn wait_child(child: &mut Child, within: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        ensure!(Instant::now() < deadline, "client still running after {within:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) for a client to exit; its stdout events.
fn finish(mut child: Child, lines: &JsonLines, within: Duration) -> Result<Vec<Value>> {
    wait_child(&mut child, within)?;
    // Its last line may still be on its way from the reader thread.
    lines.wait_for("the client's last line", |event| event["kind"] == "done" || event.is_array())?;
    Ok(lines.all())
}

/// The pids `ss FLAGS` shows owning sockets bound to `port` (in `netns`).
fn listener_owners(netns: Option<&str>, flags: &str, port: u16) -> Result<BTreeSet<u32>> {
    let filter = format!("sport = :{port}");
    let output = match netns {
        Some(netns) => run("ip", &["netns", "exec", netns, "ss", flags, &filter])?,
        None => run("ss", &[flags, &filter])?,
    };
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .split("pid=")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect())
}

fn close_line_of(log: &JsonLines, pid: u32) -> Result<Value> {
    log.wait_for(&format!("close line of pid {pid}"), |e| e["event"] == "connection" && e["pid"] == pid)
}

#[test]
fn an_upgrade_refuses_no_connect_and_cuts_no_connection() -> Result<()> {
    let setup = Setup::new("upgrade")?;
    let other_sandbox = Sandbox::new("upgrade-other")?;
    let other_netns = OwnNetns::new()?;
    let notify_path = setup.dir.file("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(WAIT))?;
    // dnsmasq answers with a TTL of 0: the answer must outlast the download.
    let args = ["--dns-record-min-ttl", "60", "--metrics-listen", "127.0.0.1:0"];
    let mut daemon = setup.daemon(&args, &[("NOTIFY_SOCKET", &notify_path)])?;
    let mut first = [0u8; 256];
    let told = notify.recv(&mut first)?;
    ensure!(String::from_utf8_lossy(&first[..told]).contains("READY=1"), "the daemon told systemd it is ready");
    let old_pid = daemon.agent.pid();
    let metrics = daemon.agent.log.wait_for("the metrics listener", |e| e["event"] == "metrics_listening")?;
    let metrics: std::net::SocketAddr = metrics["address"].as_str().context("address")?.parse()?;
    let listen_port = daemon.list()?[0]["listen_port"].as_u64().context("listen_port")? as u16;
    daemon.add("other", &other_sandbox, &setup._policy, &["--netns", &other_netns.path()])?;
    // A denial, to be found in the new daemon's recent denials.
    let denied = format!(
        "import socket\ntry: socket.create_connection(('{}', {DENIED_PORT}), timeout=5).recv(1)\nexcept OSError: pass",
        setup.net.private_v4
    );
    let (_, output) = run_in(&setup.sandbox, PYTHON, &["-c", &denied])?;
    ensure!(output.status.success());

    // A name resolved through the daemon's DNS: its answer is what decides a stream to it.
    let resolve = format!("import socket\nprint(socket.gethostbyname('{NAME}'))");
    let (_, output) = run_in(&setup.sandbox, PYTHON, &["-c", &resolve])?;
    let resolved = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert_eq!(resolved, setup.net.private_v4.to_string(), "{}", String::from_utf8_lossy(&output.stderr));

    let ws_peer = env!("CARGO_BIN_EXE_ws-peer");
    let _ws_server = setup.net.start_websocket_server(ws_peer, None)?;
    let (download, download_out) = setup.client(DOWNLOAD, SLOW_PORT, &[])?;
    let mut ws_command = setup.sandbox.command(ws_peer);
    let url = format!("ws://{}:{WS_PORT}/echo", setup.net.private_v4);
    ws_command.args(["client", &url, WS_MESSAGES]).env("WS_PEER_INTERVAL_MS", "200");
    let mut ws = ws_command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
    let ws_out = JsonLines::follow_stdout(ws.stdout.take().context("stdout piped")?);
    let stop_file = setup.dir.file("stop-probing");
    let (prober, prober_out) = setup.client(PROBER, ECHO_PORT, &[&stop_file])?;
    download_out.wait_for("the download under way", |e| e["kind"] == "started")?;
    ws_out.wait_for("the WebSocket session under way", |e| e["kind"] == "started")?;

    let next = setup.next_binary()?;
    let upgrade_started = monotonic_ns();
    let (ok, stdout, stderr) = upgrade(&daemon.socket, &["--binary", next.to_str().unwrap()])?;
    let upgrade_ended = monotonic_ns();
    ensure!(ok, "upgrade failed: {stderr}");
    let new_pid: u32 = stdout.trim().parse().with_context(|| format!("upgrade printed {stdout:?}"))?;
    let _new = Started(new_pid);
    ensure!(new_pid != old_pid);
    let told = notify.recv(&mut first)?;
    let told = String::from_utf8_lossy(&first[..told]).into_owned();
    ensure!(told.contains(&format!("MAINPID={new_pid}")) && told.contains("READY=1"), "systemd was told {told:?}");
    let log = &daemon.agent.log.clone();
    let ready = log.wait_for("the new daemon ready", |e| e["event"] == "ready" && e["agent_pid"] == new_pid)?;
    assert_eq!(ready["upgraded_from"], old_pid);

    // Every byte and every echo of the connections in flight.
    let download_pid = download.id();
    let events = finish(download, &download_out, WAIT)?;
    let done = events.iter().find(|e| e["kind"] == "done").context("the download's result")?;
    assert_eq!(done["bytes"], DOWNLOAD_BYTES);
    assert_eq!(done["checksum_ok"], true);
    let ws_pid = ws.id();
    let ws_status = wait_child(&mut ws, WAIT)?;
    ensure!(ws_status.success(), "the WebSocket client failed ({ws_status})");
    let echoed = ws_out.wait_for("the WebSocket result", |e| e.get("echoed").is_some())?;
    assert_eq!(echoed["echoed"], 40);
    // Each finished by the old daemon, with its close line.
    for pid in [download_pid, ws_pid] {
        let line = close_line_of(log, pid)?;
        assert_eq!((line["verdict"].as_str(), line["agent_pid"].as_u64()), (Some("relayed"), Some(old_pid.into())));
    }
    let status = daemon.agent.wait_exit(WAIT)?;
    ensure!(status.success(), "the old daemon exited with {status}");
    let lines = log.all();
    let position = |predicate: &dyn Fn(&Value) -> bool| lines.iter().position(predicate);
    let shutdown =
        position(&|e| e["event"] == "shutdown" && e["agent_pid"] == old_pid).context("the old daemon's shutdown")?;
    for pid in [download_pid, ws_pid] {
        let closed = position(&|e| e["event"] == "connection" && e["pid"] == pid).context("close line")?;
        ensure!(closed < shutdown, "the old daemon stopped before its connection of pid {pid} ended");
    }
    assert_eq!(lines[shutdown]["in_flight_cut"], false);
    assert_eq!(listener_owners(None, "-Hltnp", listen_port)?, BTreeSet::from([new_pid]), "the new daemon listens");
    // ...and the metrics listener, which it serves.
    assert_eq!(listener_owners(None, "-Hltnp", metrics.port())?, BTreeSet::from([new_pid]));
    let mut scrape = std::net::TcpStream::connect(metrics)?;
    scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n")?;
    let mut scraped = String::new();
    scrape.read_to_string(&mut scraped)?;
    ensure!(scraped.starts_with("HTTP/1.1 200 OK"), "{scraped}");
    // ...in the other sandbox's namespace too, its DNS socket included, and serves there.
    let other_port = daemon.list()?[1]["listen_port"].as_u64().context("listen_port")? as u16;
    for flags in ["-Hltnp", "-Hlunp"] {
        assert_eq!(listener_owners(Some(&other_netns.name), flags, other_port)?, BTreeSet::from([new_pid]), "{flags}");
    }
    let mut echo = other_sandbox.command("ip");
    echo.args(["netns", "exec", &other_netns.name, PYTHON, "-c", ECHO_ONCE, &setup.net.private_v4.to_string()]);
    echo.arg(ECHO_PORT.to_string());
    let (pid, output) = spawn_and_wait(echo)?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "once\n");
    assert_eq!(close_line_of(log, pid)?["agent_pid"], new_pid);

    // No connect refused, reset or failed before, during or after.
    std::fs::write(&stop_file, "")?;
    let results = finish(prober, &prober_out, WAIT)?;
    let results = results.iter().find(|e| e.is_array()).context("the prober's results")?.as_array().unwrap().clone();
    let outcome = |result: &Value| result[1].as_str().unwrap_or_default().to_owned();
    let failed: Vec<String> = results.iter().map(outcome).filter(|outcome| outcome != "ok").collect();
    let during = results
        .iter()
        .filter(|result| (upgrade_started..=upgrade_ended).contains(&result[0].as_u64().unwrap_or_default()))
        .count();
    let refused = failed.iter().filter(|outcome| *outcome == "refused").count();
    let reset = failed.iter().filter(|outcome| *outcome == "reset").count();
    eprintln!(
        "upgrade took {} ms; connections: {} in all, {during} started during the upgrade; refused: {refused}, reset: \
         {reset}, other failures: {}",
        (upgrade_ended - upgrade_started) / 1_000_000,
        results.len(),
        failed.len() - refused - reset
    );
    ensure!(failed.is_empty(), "connects failed: {failed:?}");
    ensure!(during > 0, "no connection was made during the upgrade");
    let served_by = |pid: u32| log.matching(|e| e["event"] == "connection" && e["agent_pid"] == pid).len();
    ensure!(served_by(new_pid) > 0, "the new daemon served no connection");

    // The runtime state came along: the DNS answer (a stream to the address
    // the name was resolved to before is decided by that name)...
    let mut echo = setup.sandbox.command(PYTHON);
    echo.args(["-c", ECHO_ONCE, &resolved, &NAMED_PORT.to_string()]);
    let (pid, output) = spawn_and_wait(echo)?;
    let line = close_line_of(log, pid)?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "once\n", "{line}");
    assert_eq!((line["host"].as_str(), line["agent_pid"].as_u64()), (Some(NAME), Some(new_pid.into())), "{line}");
    // ...the sandbox added at run time, the denial.
    let (ok, listed, stderr) = daemon.cli(&["sandbox", "list", "--json"])?;
    ensure!(ok, "sandbox list from the new daemon: {stderr}");
    let names: Vec<Value> = serde_json::from_str::<Vec<Value>>(&listed)?.iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, ["main", "other"]);
    let (ok, status, stderr) = daemon.cli(&["status", "--json"])?;
    ensure!(ok, "status from the new daemon: {stderr}");
    let status: Value = serde_json::from_str(&status)?;
    let denials = status["recent_denials"].as_array().context("recent_denials")?;
    ensure!(denials.iter().any(|d| d["port"] == DENIED_PORT), "the denial was carried over: {status}");
    Ok(())
}

#[test]
fn a_binary_that_exits_at_start_leaves_the_old_daemon_serving() -> Result<()> {
    let setup = Setup::new("upgrade-fails")?;
    let again = Sandbox::new("upgrade-fails-again")?;
    let mut daemon = setup.daemon(&[], &[])?;
    let old_pid = daemon.agent.pid();
    let broken = setup.dir.file("exits-at-start");
    std::fs::write(&broken, "#!/bin/sh\necho 'this binary exits at start' >&2\nexit 7\n")?;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755))?;
    let (ok, stdout, stderr) = upgrade(&daemon.socket, &["--binary", &broken])?;
    ensure!(!ok && stdout.is_empty(), "an upgrade to a failing binary succeeded: {stdout}");
    ensure!(stderr.contains("the new daemon exited (exit status: 7) before it was ready"), "{stderr}");
    let (ok, _, stderr) = upgrade(&daemon.socket, &["--binary", "/nonexistent/sandbox-egress"])?;
    ensure!(!ok && stderr.contains("cannot start /nonexistent/sandbox-egress"), "{stderr}");
    daemon.agent.log.wait_for("upgrade_failed", |e| e["event"] == "upgrade_failed")?;

    // Still serving, and still the one serving.
    let (client, out) = setup.client(PROBER, ECHO_PORT, &[&setup.dir.file("stop")])?;
    let pid = client.id();
    let line = close_line_of(&daemon.agent.log, pid)?;
    std::fs::write(setup.dir.file("stop"), "")?;
    let results = finish(client, &out, WAIT)?;
    let results = results.iter().find(|e| e.is_array()).context("results")?;
    ensure!(results.as_array().unwrap().iter().all(|r| r[1] == "ok"), "connects failed: {results}");
    assert_eq!((line["verdict"].as_str(), line["agent_pid"].as_u64()), (Some("relayed"), Some(old_pid.into())));
    // Changes are taken again (refused only while an upgrade is under way).
    daemon.add("again", &again, &setup._policy, &[])?;
    Ok(())
}

#[test]
fn a_drain_timeout_resets_a_connection_that_never_ends_and_logs_it() -> Result<()> {
    let setup = Setup::new("upgrade-drain")?;
    let mut daemon = setup.daemon(&["--drain-timeout", "1s"], &[])?;
    let old_pid = daemon.agent.pid();
    let (endless, out) = setup.client(ENDLESS, ENDLESS_PORT, &[])?;
    out.wait_for("the endless stream under way", |e| e["kind"] == "started")?;

    // After an upgrade: the old daemon cuts it once its drain timeout runs out.
    let next = setup.next_binary()?;
    let (ok, stdout, stderr) = upgrade(&daemon.socket, &["--binary", next.to_str().unwrap(), "--drain-timeout", "1s"])?;
    ensure!(ok, "upgrade failed: {stderr}");
    let new_pid: u32 = stdout.trim().parse()?;
    let _new = Started(new_pid);
    let log = &daemon.agent.log.clone();
    let pid = endless.id();
    let events = finish(endless, &out, WAIT)?;
    let done = events.iter().find(|e| e["kind"] == "done").context("the client's result")?;
    assert_eq!(done["end"], "reset");
    let line = close_line_of(log, pid)?;
    assert_eq!((line["verdict"].as_str(), line["agent_pid"].as_u64()), (Some("cut"), Some(old_pid.into())));
    assert_eq!(line["reason"], "the daemon's drain timeout ran out: connection reset");
    let drain = log.wait_for("the drain timeout", |e| e["event"] == "drain_timeout" && e["agent_pid"] == old_pid)?;
    assert_eq!(drain["connections"], 1);
    daemon.agent.wait_exit(WAIT)?;

    // Upgraded again, from the daemon an upgrade started, with no --binary:
    // the one it runs from, the copy.
    let (ok, stdout, stderr) = upgrade(&daemon.socket, &[])?;
    ensure!(ok, "the second upgrade failed: {stderr}");
    let third_pid: u32 = stdout.trim().parse()?;
    let _third = Started(third_pid);
    let ready = log.wait_for("the third daemon ready", |e| e["event"] == "ready" && e["agent_pid"] == third_pid)?;
    assert_eq!(ready["upgraded_from"], new_pid);
    assert_eq!(std::fs::read_link(format!("/proc/{third_pid}/exe"))?, next);
    log.wait_for("the second daemon's shutdown", |e| e["event"] == "shutdown" && e["agent_pid"] == new_pid)?;

    // On SIGTERM: the daemon (run with --drain-timeout 1s, as each was) does the same.
    let (endless, out) = setup.client(ENDLESS, ENDLESS_PORT, &[])?;
    out.wait_for("the endless stream under way", |e| e["kind"] == "started")?;
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(third_pid as i32, libc::SIGTERM) };
    let pid = endless.id();
    let events = finish(endless, &out, WAIT)?;
    let done = events.iter().find(|e| e["kind"] == "done").context("the client's result")?;
    assert_eq!(done["end"], "reset");
    let line = close_line_of(log, pid)?;
    assert_eq!((line["verdict"].as_str(), line["agent_pid"].as_u64()), (Some("cut"), Some(third_pid.into())));
    let shutdown = log.wait_for("shutdown", |e| e["event"] == "shutdown" && e["agent_pid"] == third_pid)?;
    assert_eq!(shutdown["connections_cut"], 1);
    Ok(())
}
