//! Non-HTTP protocols decided by name: real clients in the sandbox resolve
//! a policy host through the agent's DNS and connect to the address they
//! got; the agent decides the opaque or silent stream by the names this
//! sandbox resolved to that address.

use std::{net::SocketAddr, thread, time::Duration};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const NAME: &str = "db.example.test";
const SSH_PORT: u16 = 22;
const REDIS_PORT: u16 = 6379;
const BANNER_PORT: u16 = 7007;
/// The banner server listens here too, but the policy does not list it.
const UNLISTED_PORT: u16 = 7008;

/// A test host whose DNS server knows [`NAME`], a sandbox and an agent
/// whose policy allows [`NAME`] on `ports` for `binaries`. Fields drop in
/// order: the agent goes first.
struct Setup {
    agent: Agent,
    _policy: PolicyFile,
    sandbox: Sandbox,
    _dns: Dns,
    net: TestNet,
}

impl Setup {
    fn new(test: &str, ports: &[u16], binaries: &[&str], extra_args: &[&str]) -> Result<Self> {
        require_root();
        let net = TestNet::new()?;
        let dns = net.start_dns(&[(NAME, net.private_v4.into())])?;
        let sandbox = Sandbox::new(test)?;
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let binaries: String = binaries.iter().map(|path| format!("      - path: \"{path}\"\n")).collect();
        let policy = PolicyFile::new(&format!(
            "version: 1\nnetwork_policies:\n  db:\n    endpoints:\n      - host: {NAME}\n        ports: [{}]\n    binaries:\n{binaries}",
            ports.join(", ")
        ))?;
        let dns_args = dns.agent_args();
        let args: Vec<&str> =
            [dns_args[0].as_str(), dns_args[1].as_str()].into_iter().chain(extra_args.iter().copied()).collect();
        let agent = Agent::start(&sandbox, &policy, &args)?;
        Ok(Self { agent, _policy: policy, sandbox, _dns: dns, net })
    }

    fn address(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.private_v4.into(), port)
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The close line of `pid`, which must have `verdict`.
fn connection(agent: &Agent, pid: u32, verdict: &str) -> Result<Value> {
    let line = agent.wait_connection_of(pid)?;
    ensure!(line["verdict"] == verdict, "expected {verdict}: {line}");
    Ok(line)
}

#[test]
fn ssh_by_name_runs_a_command() -> Result<()> {
    let setup = Setup::new("names-ssh", &[SSH_PORT], &["/usr/bin/ssh"], &[])?;
    let keys = TempDir::new("ssh")?;
    for key in ["host_key", "user_key"] {
        run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", &keys.file(key)])?;
    }
    std::fs::copy(keys.file("user_key.pub"), keys.file("authorized_keys"))?;
    // sshd's privilege separation directory, made by its service unit on a normal boot.
    std::fs::create_dir_all("/run/sshd")?;
    let config = format!(
        "Port {SSH_PORT}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
         PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         UsePAM no\nStrictModes no\n",
        setup.net.private_v4,
        keys.file("host_key"),
        keys.file("authorized_keys"),
    );
    std::fs::write(keys.file("sshd_config"), config)?;
    let sshd = setup.net.start_daemon(
        "/usr/sbin/sshd",
        &["-D", "-e", "-f", &keys.file("sshd_config")],
        setup.address(SSH_PORT),
    )?;

    let (pid, output) = run_in(
        &setup.sandbox,
        "ssh",
        &[
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-i",
            &keys.file("user_key"),
            "-p",
            &SSH_PORT.to_string(),
            &format!("root@{NAME}"),
            "echo ran-over-ssh $((6 * 7))",
        ],
    )?;
    ensure!(
        output.status.success() && stdout(&output) == "ran-over-ssh 42\n",
        "ssh: {}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    let line = connection(&setup.agent, pid, "relayed")?;
    assert_eq!(line["host"], NAME, "decided by the name the sandbox resolved: {line}");
    assert_eq!(line["destination"], setup.address(SSH_PORT).to_string());
    assert_eq!(line["policy"], "db");
    assert!(line["protocol"] == "opaque" || line["protocol"] == "silent", "{line}");
    sshd.log.wait_for_raw("sshd accepting the key", |l| l.starts_with("Accepted publickey for root"))?;
    Ok(())
}

/// A client of Debian's Redis, in `sandbox`: `redis-cli -h HOST PING`.
fn redis_ping(sandbox: &Sandbox, host: &str) -> Result<(u32, std::process::Output)> {
    run_in(sandbox, "redis-cli", &["-h", host, "-p", &REDIS_PORT.to_string(), "PING"])
}

/// Connections the server accepted, asked from outside the sandbox (this
/// asking counts as one).
fn redis_connections(setup: &Setup) -> Result<u64> {
    let ip = setup.net.private_v4.to_string();
    let output = run("redis-cli", &["-h", &ip, "-p", &REDIS_PORT.to_string(), "INFO", "stats"])?;
    let stats = stdout(&output);
    let line = stats.lines().find_map(|l| l.strip_prefix("total_connections_received:")).context("no count")?;
    Ok(line.trim().parse()?)
}

#[test]
fn redis_by_name_per_sandbox_until_the_record_expires() -> Result<()> {
    const TTL: u64 = 5;
    let ttl = TTL.to_string();
    let setup = Setup::new(
        "names-redis",
        &[REDIS_PORT],
        &["/usr/bin/redis-cli"],
        &["--dns-record-min-ttl", &ttl, "--dns-record-max-ttl", &ttl],
    )?;
    let data = TempDir::new("redis")?;
    let ip = setup.net.private_v4.to_string();
    let port = REDIS_PORT.to_string();
    let _redis = setup.net.start_daemon(
        "/usr/bin/redis-server",
        &[
            "--bind",
            &ip,
            "--port",
            &port,
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &data.path.to_string_lossy(),
        ],
        setup.address(REDIS_PORT),
    )?;
    let other = setup.sandbox.child("other")?;
    let denied_by_address = format!("endpoint {ip}:{REDIS_PORT} is not allowed by any policy");

    // Never resolved: decided on the address alone, as before.
    let (pid, output) = redis_ping(&setup.sandbox, &ip)?;
    ensure!(stdout(&output) != "PONG\n", "PING to an unresolved address answered");
    assert_eq!(connection(&setup.agent, pid, "denied")?["reason"], denied_by_address.as_str());

    let (pid, output) = redis_ping(&setup.sandbox, NAME)?;
    ensure!(
        stdout(&output) == "PONG\n",
        "redis-cli by name: {}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    let line = connection(&setup.agent, pid, "relayed")?;
    assert_eq!(line["host"], NAME, "{line}");
    assert_eq!(line["protocol"], "opaque");

    // Another sandbox (a cgroup below) did not resolve the name: its records are its own.
    let (pid, output) = redis_ping(&other, &ip)?;
    ensure!(stdout(&output) != "PONG\n", "the other sandbox reached the address");
    assert_eq!(connection(&setup.agent, pid, "denied")?["reason"], denied_by_address.as_str());

    // The sandbox that resolved it reaches the address by name, the record still live
    // (so it was live for the other sandbox's attempt too).
    let (pid, output) = redis_ping(&setup.sandbox, &ip)?;
    ensure!(stdout(&output) == "PONG\n", "the resolving sandbox by address: {}", stdout(&output));
    assert_eq!(connection(&setup.agent, pid, "relayed")?["host"], NAME);

    // dnsmasq answers with TTL 0, kept for the clamp's minimum: after it the record is gone.
    thread::sleep(Duration::from_millis(TTL * 1000 + 500));
    let (pid, output) = redis_ping(&setup.sandbox, &ip)?;
    ensure!(stdout(&output) != "PONG\n", "reached the address after its record expired");
    assert_eq!(connection(&setup.agent, pid, "denied")?["reason"], denied_by_address.as_str());

    // Resolved again (by glibc, as any program would), the address is the name's again.
    let (_, output) = run_in(&setup.sandbox, "getent", &["ahostsv4", NAME])?;
    ensure!(stdout(&output).starts_with(&format!("{ip} ")), "getent: {}", stdout(&output));
    let (pid, output) = redis_ping(&setup.sandbox, &ip)?;
    ensure!(stdout(&output) == "PONG\n", "after resolving again: {}", stdout(&output));
    assert_eq!(connection(&setup.agent, pid, "relayed")?["host"], NAME);

    // The readiness probe, the three PINGs relayed and this question: the denied ones never arrived.
    assert_eq!(redis_connections(&setup)?, 5);
    Ok(())
}

/// Listens on the address (argv[1]) and ports (argv[2:]); to each
/// connection sends a banner first, then answers one line.
const BANNER_SERVER: &str = r#"
import json, selectors, socket, sys
selector = selectors.DefaultSelector()
for port in sys.argv[2:]:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((sys.argv[1], int(port)))
    listener.listen()
    selector.register(listener, selectors.EVENT_READ)
print(json.dumps({"kind": "ready"}), flush=True)
while True:
    for key, _ in selector.select():
        conn, _ = key.fileobj.accept()
        print(json.dumps({"kind": "accept", "port": key.fileobj.getsockname()[1]}), flush=True)
        conn.settimeout(10)
        try:
            conn.sendall(b"220 banner-first\r\n")
            conn.sendall(b"250 got " + conn.recv(100))
        except OSError:
            pass
        conn.close()
"#;

/// Waits for the banner before saying anything, as SMTP or MySQL clients do.
const BANNER_CLIENT: &str = r#"
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
banner = conn.recv(100)
conn.sendall(b"HELO\r\n")
print(banner.decode().strip(), "/", conn.recv(100).decode().strip())
"#;

#[test]
fn a_server_first_protocol_by_name_and_only_on_listed_ports() -> Result<()> {
    let setup = Setup::new("names-banner", &[BANNER_PORT], &["/usr/bin/python3*"], &[])?;
    let ip = setup.net.private_v4.to_string();
    let server =
        setup.net.start_python_servers(BANNER_SERVER, &[&ip, &BANNER_PORT.to_string(), &UNLISTED_PORT.to_string()])?;
    let banner = |port: u16| run_in(&setup.sandbox, PYTHON, &["-c", BANNER_CLIENT, NAME, &port.to_string()]);

    let (pid, output) = banner(BANNER_PORT)?;
    ensure!(
        stdout(&output) == "220 banner-first / 250 got HELO\n",
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    let line = connection(&setup.agent, pid, "relayed")?;
    assert_eq!(line["protocol"], "silent", "the client waited for the server: {line}");
    assert_eq!(line["host"], NAME);

    // The same name on a port the policy does not list.
    let (pid, output) = banner(UNLISTED_PORT)?;
    ensure!(!output.status.success(), "unlisted port answered: {}", stdout(&output));
    let line = connection(&setup.agent, pid, "denied")?;
    assert_eq!(line["reason"], format!("endpoint {NAME}:{UNLISTED_PORT} is not allowed by any policy").as_str());
    assert!(line["upstream"].is_null(), "{line}");
    // One more allowed connection: its accept comes after any the denied one could have caused.
    let (pid, _) = banner(BANNER_PORT)?;
    connection(&setup.agent, pid, "relayed")?;
    server.events.wait_for_count("two accepts on the listed port", 2, |e| e["kind"] == "accept")?;
    let accepted: Vec<Value> = server.events.matching(|e| e["kind"] == "accept");
    assert!(accepted.iter().all(|e| e["port"] == BANNER_PORT), "the server saw the unlisted port: {accepted:?}");
    Ok(())
}
