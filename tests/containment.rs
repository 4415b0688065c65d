//! Containment (issue #10): ways out of a sandbox other than a TCP connect
//! or a DNS query, tried by a user other than root inside the sandbox
//! cgroup. Each is refused; nothing of it reaches a listener or leaves on
//! the test network's veth (a packet capture on its far side shows it),
//! and another sandbox the same agent serves is served normally meanwhile.

use std::{
    collections::HashSet,
    io::{ErrorKind, Write},
    net::TcpListener,
    os::unix::{
        fs::PermissionsExt,
        net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener},
    },
    process::{Child, ChildStdin, Command, Output, Stdio},
    thread,
};

use std::os::linux::net::SocketAddrExt;

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

/// setpriv arguments that drop to nobody before the program runs.
const NOBODY: [&str; 4] = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];
/// A port on the test host no server listens on: attacks aim there.
const ATTACK_PORT: u16 = 9999;
const CURL: &str = "/usr/bin/curl";

fn probe_script() -> String {
    support_file("containment_probe.py").to_str().unwrap().to_owned()
}

/// `containment_probe.py ARGS` in `sandbox` as nobody.
fn probe_command(sandbox: &Sandbox, args: &[&str]) -> Command {
    let mut command = sandbox.command("setpriv");
    command.args(NOBODY).args([PYTHON, "-u", &probe_script()]).args(args);
    command
}

/// The last line of a probe's output as JSON.
fn last_json(output: &Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("probe printed {stdout:?}; stderr: {}", String::from_utf8_lossy(&output.stderr)))
}

/// Runs a probe as nobody in `sandbox`; returns (pid, its JSON line).
fn probe(sandbox: &Sandbox, args: &[&str]) -> Result<(u32, Value)> {
    let child = probe_command(sandbox, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "probe {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok((pid, last_json(&output)?))
}

/// A process printing JSON lines, told things on stdin; killed on drop.
struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: JsonLines,
}

impl Interactive {
    fn start(mut command: Command, ready: &str) -> Result<Self> {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        let lines = JsonLines::follow_stdout(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        let process = Self { child, stdin, lines };
        process.lines.wait_for(ready, |e| e["kind"] == ready)?;
        Ok(process)
    }

    fn say(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin.as_mut().context("stdin closed")?, "{line}")?;
        Ok(())
    }

    fn close_stdin(&mut self) {
        self.stdin.take();
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every IPv4/IPv6 packet on the namespace side of the test's veth.
struct Capture(Interactive);

impl Capture {
    fn start(net: &TestNet) -> Result<Self> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.netns, PYTHON, "-u", &probe_script(), "capture", &net.ns_if()]);
        Ok(Self(Interactive::start(command, "ready")?))
    }

    /// Stops; returns the packets seen.
    fn finish(mut self) -> Result<Vec<Value>> {
        self.0.close_stdin();
        let report = self.0.lines.wait_for("the capture's packets", |e| e["kind"] == "packets")?;
        Ok(report["packets"].as_array().cloned().unwrap_or_default())
    }
}

/// Packets other than the other sandbox's relayed TCP to the servers' ports.
fn foreign(packets: &[Value]) -> Vec<&Value> {
    let served = [u64::from(EXCHANGE_PORT), u64::from(HTTP_PORT)];
    packets
        .iter()
        .filter(|p| {
            let port = |key: &str| p[key].as_u64().is_some_and(|port| served.contains(&port));
            !(p["proto"] == 6 && (port("sport") || port("dport")))
        })
        .collect()
}

/// Packets as JSON, one per line.
fn show(packets: &[&Value]) -> String {
    packets.iter().map(|p| format!("\n  {p}")).collect()
}

/// Exchanges the exchange server ran for an IPv4 peer (the other sandbox uses IPv6).
fn v4_exchanges(servers: &Servers) -> Vec<Value> {
    servers.events.matching(|e| e["kind"] == "exchange" && e["peer"].as_str().is_some_and(|p| p.contains('.')))
}

/// A test host with its servers, one agent on a parent cgroup serving two
/// sandboxes: the attacker's and another one. Fields drop in order.
struct Setup {
    agent: Agent,
    sandbox: Sandbox,
    other: Sandbox,
    _parent: Sandbox,
    _policy: PolicyFile,
    servers: Servers,
    net: TestNet,
    json_log: bool,
}

impl Setup {
    fn new(name: &str) -> Result<Self> {
        Self::with(name, |net| net.allow_all_policy(), &[], "json")
    }

    fn with(name: &str, policy: impl Fn(&TestNet) -> String, extra_args: &[&str], format: &str) -> Result<Self> {
        require_root();
        Self::on(TestNet::new()?, name, policy, extra_args, format)
    }

    /// On a test net the caller made (and started more servers on).
    fn on(
        net: TestNet,
        name: &str,
        policy: impl Fn(&TestNet) -> String,
        extra_args: &[&str],
        format: &str,
    ) -> Result<Self> {
        let servers = net.start_servers()?;
        let parent = Sandbox::new(name)?;
        let (sandbox, other) = (parent.child("attacker")?, parent.child("other")?);
        let policy = PolicyFile::new(&policy(&net))?;
        let agent = Agent::start_with_format(&parent, &policy, extra_args, &[], format)?;
        Ok(Self { agent, sandbox, other, _parent: parent, _policy: policy, servers, net, json_log: format == "json" })
    }

    /// Runs `attack` while the other sandbox runs an allowed exchange (to
    /// the test host's IPv6 address); checks that exchange was served.
    fn meanwhile<T>(&self, attack: impl FnOnce() -> T) -> Result<T> {
        let host = self.net.v6.to_string();
        let (served, outcome) = thread::scope(|scope| {
            let served = scope.spawn(|| exchange(Some(&self.other), "inet6", &host, 1000, 1000));
            let outcome = attack();
            (served.join().unwrap(), outcome)
        });
        let (pid, output) = served?;
        let result = last_json(&output)?;
        ensure!(result["received_intact"] == true, "the other sandbox was not served: {result}");
        if self.json_log {
            let log = self.agent.wait_connection_of(pid)?;
            ensure!(log["verdict"] == "relayed", "the other sandbox's exchange: {log}");
        }
        Ok(outcome)
    }
}

fn error_of(outcome: &Value, step: &str) -> String {
    outcome[step]["error"].as_str().unwrap_or("none").to_owned()
}

/// net.ipv4.ping_group_range opened to every group, restored on drop.
struct PingGroupRange(String);

const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

impl PingGroupRange {
    fn everyone() -> Result<Self> {
        let old = std::fs::read_to_string(PING_GROUP_RANGE)?.trim().replace('\t', " ");
        std::fs::write(PING_GROUP_RANGE, "0 2147483647")?;
        Ok(Self(old))
    }
}

impl Drop for PingGroupRange {
    fn drop(&mut self) {
        let _ = std::fs::write(PING_GROUP_RANGE, &self.0);
    }
}

#[test]
fn icmp_echo_from_unprivileged_ping_sockets_is_refused() -> Result<()> {
    let setup = Setup::new("icmp")?;
    let _ping = PingGroupRange::everyone()?;
    let capture = Capture::start(&setup.net)?;
    let (_, result) = setup
        .meanwhile(|| probe(&setup.sandbox, &["icmp", &setup.net.v4.to_string(), &setup.net.v6.to_string()]))??;
    let packets = capture.finish()?;
    eprintln!("probe: {result}\nforeign packets: {}", show(&foreign(&packets)));
    for family in ["icmp4", "icmp6"] {
        assert_eq!(error_of(&result[family], "socket"), "EPERM", "{family} ping socket: {result}");
    }
    assert!(foreign(&packets).is_empty(), "left on the veth: {}", show(&foreign(&packets)));
    Ok(())
}

#[test]
fn udp_lite_sctp_and_mptcp_sockets_are_refused() -> Result<()> {
    let setup = Setup::new("protocols")?;
    let capture = Capture::start(&setup.net)?;
    let (v4, v6, port) = (setup.net.v4.to_string(), setup.net.v6.to_string(), ATTACK_PORT.to_string());
    let (_, result) = setup.meanwhile(|| probe(&setup.sandbox, &["protocols", &v4, &v6, &port]))??;
    let packets = capture.finish()?;
    eprintln!("probe: {result}\nforeign packets: {}", show(&foreign(&packets)));
    for attempt in ["udplite4", "udplite6", "udplite4_sendto", "udplite6_sendto"] {
        assert_eq!(error_of(&result[attempt], "socket"), "EPERM", "{attempt}: {result}");
    }
    // Refused, or absent from this kernel (which the report shows).
    for attempt in ["sctp", "mptcp"] {
        let error = error_of(&result[attempt], "socket");
        assert!(["EPERM", "EPROTONOSUPPORT"].contains(&error.as_str()), "{attempt} socket: {result}");
    }
    assert!(foreign(&packets).is_empty(), "left on the veth: {}", show(&foreign(&packets)));
    assert!(v4_exchanges(&setup.servers).is_empty());
    Ok(())
}

#[test]
fn binding_a_socket_to_the_hosts_device_is_refused() -> Result<()> {
    let setup = Setup::new("bind-device")?;
    let capture = Capture::start(&setup.net)?;
    let (v4, port) = (setup.net.v4.to_string(), ATTACK_PORT.to_string());
    let (_, result) =
        setup.meanwhile(|| probe(&setup.sandbox, &["bind-device", setup.net.host_if(), &v4, &port]))??;
    let packets = capture.finish()?;
    eprintln!("probe: {result}\nforeign packets: {}", show(&foreign(&packets)));
    for attempt in ["bindtodevice_udp", "bindtodevice_tcp", "bindtoifindex_udp", "bindtoifindex_tcp"] {
        assert_eq!(error_of(&result[attempt], "setsockopt"), "EPERM", "{attempt}: {result}");
    }
    assert!(foreign(&packets).is_empty(), "left on the veth: {}", show(&foreign(&packets)));
    Ok(())
}

/// Abstract unix listeners (stream and datagram) in the test process,
/// outside the sandbox; they report what reached them.
struct AbstractListeners {
    stream_name: String,
    dgram_name: String,
    stream: UnixListener,
    dgram: UnixDatagram,
}

impl AbstractListeners {
    fn new(tag: &str) -> Result<Self> {
        let stream_name = format!("se-test-{}-{tag}-stream", std::process::id());
        let dgram_name = format!("se-test-{}-{tag}-dgram", std::process::id());
        let stream = UnixListener::bind_addr(&UnixAddr::from_abstract_name(&stream_name)?)?;
        let dgram = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&dgram_name)?)?;
        stream.set_nonblocking(true)?;
        dgram.set_nonblocking(true)?;
        Ok(Self { stream_name, dgram_name, stream, dgram })
    }

    fn stream_accepted(&self) -> bool {
        !matches!(self.stream.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    fn dgram_received(&self) -> bool {
        !matches!(self.dgram.recv(&mut [0; 256]), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }
}

#[test]
fn abstract_unix_sockets_are_refused_and_path_sockets_stay_usable() -> Result<()> {
    let setup = Setup::new("abstract")?;
    let listeners = AbstractListeners::new("abstract")?;
    let dir = TempDir::new("unix")?;
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755))?;
    let path = dir.file("reachable.sock");
    let path_listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
    path_listener.set_nonblocking(true)?;

    let args = ["unix", listeners.stream_name.as_str(), listeners.dgram_name.as_str(), path.as_str()];
    let (_, result) = setup.meanwhile(|| probe(&setup.sandbox, &args))??;
    eprintln!("probe: {result}");
    let path_accepted = path_listener.accept().is_ok();
    let (stream_reached, dgram_reached) = (listeners.stream_accepted(), listeners.dgram_received());
    assert_eq!(result["abstract_stream"]["error"], "EPERM", "abstract stream connect: {result}");
    assert_eq!(result["abstract_dgram"]["error"], "EPERM", "abstract datagram sendto: {result}");
    assert!(!stream_reached, "the abstract stream listener accepted a connection");
    assert!(!dgram_reached, "the abstract datagram socket received a datagram");
    assert!(result["path_stream"]["ok"].is_number(), "path-based socket: {result}");
    assert!(path_accepted, "the path-based listener saw no connection");
    Ok(())
}

#[test]
fn an_abstract_unix_name_allowed_by_flag_stays_reachable() -> Result<()> {
    require_root();
    let allowed = AbstractListeners::new("allowed")?;
    let refused = AbstractListeners::new("refused")?;
    let name = allowed.stream_name.clone();
    let setup = Setup::with("abstract-flag", |net| net.allow_all_policy(), &["--allow-abstract-unix", &name], "json")?;
    let args = ["unix", allowed.stream_name.as_str(), refused.dgram_name.as_str(), "-"];
    let (_, result) = setup.meanwhile(|| probe(&setup.sandbox, &args))??;
    eprintln!("probe: {result}");
    assert!(result["abstract_stream"]["ok"].is_number(), "the allowed abstract name: {result}");
    assert!(allowed.stream_accepted(), "the allowed abstract listener saw no connection");
    assert_eq!(result["abstract_dgram"]["error"], "EPERM", "an abstract name not listed: {result}");
    assert!(!refused.dgram_received(), "the unlisted abstract socket received a datagram");
    Ok(())
}

/// A free TCP port on loopback (released at once; good enough for a test).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// From inside the test namespace: TCP connects (2 s bound) and UDP
/// datagrams to each address on `port`.
const KNOCKER: &str = r#"
import json, socket, sys
port = int(sys.argv[1])
outcome = {}
for host in sys.argv[2:]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, port))
            sock.sendall(b"inbound")
            outcome["tcp " + host] = "connected"
        except OSError as error:
            outcome["tcp " + host] = type(error).__name__
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"inbound", (host, port))
print(json.dumps(outcome), flush=True)
"#;

#[test]
fn listeners_in_the_sandbox_are_not_reachable_from_outside_but_loopback_works() -> Result<()> {
    let (port, loopback_port) = (free_port()?, free_port()?);
    let setup = Setup::with(
        "inbound",
        |net| {
            format!(
                "{}  local:\n    binaries: [{{ path: \"/**\" }}]\n    endpoints:\n      - host: 127.0.0.1\n        port: {loopback_port}\n",
                net.allow_all_policy()
            )
        },
        &[],
        "json",
    )?;
    // First what must keep working: a sandboxed server on loopback, reached by another
    // sandboxed process through an allowed endpoint.
    let server = Interactive::start(
        probe_command(&setup.sandbox, &["loopback-server", &loopback_port.to_string()]),
        "listening",
    )?;
    let (pid, client) = probe(&setup.other, &["loopback-client", &loopback_port.to_string()])?;
    assert_eq!(client["ok"], "pong", "loopback through the agent: {client}");
    assert_eq!(setup.agent.wait_connection_of(pid)?["verdict"], "relayed");
    let reached = server.lines.wait_for("the loopback server's report", |e| e["kind"] == "report")?;
    assert_eq!(reached["reached"], true);

    let capture = Capture::start(&setup.net)?;
    let mut listener = Interactive::start(probe_command(&setup.sandbox, &["listen", &port.to_string()]), "listening")?;
    let bound = listener.lines.wait_for("listening", |e| e["kind"] == "listening")?;
    let (host_v4, host_v6) = setup.net.host_side();
    let knock = setup.meanwhile(|| {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &setup.net.netns, PYTHON, "-c", KNOCKER, &port.to_string()]);
        command.args([host_v4.to_string(), host_v6.to_string()]).output()
    })??;
    let knocked = last_json(&knock)?;
    listener.say("report")?;
    let report = listener.lines.wait_for("the listener's report", |e| e["kind"] == "report")?;
    let packets = capture.finish()?;
    eprintln!(
        "bound: {bound}\nknocked: {knocked}\nlistener: {report}\npackets: {}",
        show(&packets.iter().collect::<Vec<_>>())
    );

    for (address, outcome) in knocked.as_object().unwrap() {
        assert_ne!(outcome, "connected", "{address}:{port} reached a sandboxed listener from outside");
    }
    for (socket, received) in report["received"].as_object().unwrap() {
        assert_eq!(received, 0, "the sandboxed {socket} listener got something from outside");
    }
    let answers: Vec<&Value> = packets
        .iter()
        .filter(|p| {
            p["outgoing"] == false
                && p["sport"] == port
                && ((p["proto"] == 6 && (p["flags"] == "SA" || p["payload"].as_u64() > Some(0))) || p["proto"] == 17)
        })
        .collect();
    assert!(answers.is_empty(), "the sandbox answered from port {port}: {}", show(&answers));

    Ok(())
}

fn curl_only_policy(net: &TestNet) -> String {
    format!(
        "version: 1\nnetwork_policies:\n  curl-only:\n    endpoints:\n      - host: \"{}\"\n        port: {EXCHANGE_PORT}\n    binaries:\n      - path: {CURL}\n  others:\n    endpoints:\n      - host: \"{}\"\n        port: {EXCHANGE_PORT}\n    binaries: [{{ path: \"/**\" }}]\n",
        net.v4, net.v6
    )
}

/// Runs a probe whose first process ends up as curl; returns its JSON line.
fn exec_probe(sandbox: &Sandbox, args: &[&str]) -> Result<Value> {
    let output = probe_command(sandbox, args).stdin(Stdio::null()).output()?;
    last_json(&output)
}

#[test]
fn a_child_forked_before_its_parent_execd_an_allowed_binary_is_not_that_binary() -> Result<()> {
    let setup = Setup::with("fork-exec", curl_only_policy, &[], "json")?;
    let (v4, port) = (setup.net.v4.to_string(), EXCHANGE_PORT.to_string());
    let result = setup.meanwhile(|| exec_probe(&setup.sandbox, &["fork-then-exec", &v4, &port, CURL]))??;
    eprintln!("probe: {result}");
    assert_eq!(result["parent_was_curl"], true, "the parent never became curl: {result}");
    let child = result["child_pid"].as_u64().context("no child pid")? as u32;
    let log = setup.agent.wait_connection_of(child)?;
    eprintln!("agent: {log}");
    assert_eq!(log["verdict"], "denied", "python allowed through its parent's later exec: {log}");
    assert_ne!(result["exchange"]["ok"], 10, "the exchange went through: {result}");
    assert!(v4_exchanges(&setup.servers).is_empty(), "the server saw {:?}", v4_exchanges(&setup.servers));
    Ok(())
}

#[test]
fn a_connection_made_before_its_process_execd_an_allowed_binary_is_refused() -> Result<()> {
    let setup = Setup::with("connect-exec", curl_only_policy, &[], "json")?;
    let (v4, port) = (setup.net.v4.to_string(), EXCHANGE_PORT.to_string());
    let mut leaks = vec![];
    for round in 0..10 {
        let result = setup.meanwhile(|| exec_probe(&setup.sandbox, &["connect-then-exec", &v4, &port, CURL]))??;
        assert_eq!(result["parent_was_curl"], true, "round {round}: the parent never became curl: {result}");
        let pid = result["parent_pid"].as_u64().context("no parent pid")? as u32;
        let log = setup.agent.wait_connection_of(pid)?;
        eprintln!("round {round}: probe {result}\n  agent: {log}");
        let exec_reason = log["reason"].as_str().is_some_and(|r| r.contains("exec"));
        // An agent that looked before the exec saw python: refused as python, no exec to mention.
        let saw_python = log["exe"].as_str().is_some_and(|exe| exe != CURL && exe.contains("python"));
        if log["verdict"] != "denied" || !(exec_reason || saw_python) || result["exchange"]["ok"] == 10 {
            leaks.push(format!("round {round}: {log} / {result}"));
        }
    }
    let seen = v4_exchanges(&setup.servers);
    eprintln!("leaks: {}/10; server saw {} exchanges", leaks.len(), seen.len());
    assert!(leaks.is_empty(), "not refused for the exec:\n{}", leaks.join("\n"));
    assert!(seen.is_empty(), "the server saw {seen:?}");
    Ok(())
}

#[test]
fn a_forged_comm_cannot_forge_log_lines_and_refusal_warnings_are_rate_limited() -> Result<()> {
    const ATTEMPTS: u32 = 2000;
    let setup = Setup::with("forge", |net| net.allow_all_policy(), &[], "text")?;
    let (v4, port) = (setup.net.v4.to_string(), EXCHANGE_PORT.to_string());
    let (script, count) = (probe_script(), ATTEMPTS.to_string());
    let mut args = vec!["--net", "setpriv"];
    args.extend(NOBODY);
    args.extend([PYTHON, script.as_str(), "forge", count.as_str(), v4.as_str(), port.as_str()]);
    let (_, output) = setup.meanwhile(|| run_in(&setup.sandbox, "unshare", &args))??;
    let result = last_json(&output)?;
    eprintln!("probe: {result}");
    let pid = result["pid"].as_u64().context("no pid")?;
    assert_eq!(result["comm"], "x\nFORGED line", "the probe could not name itself");
    assert_eq!(result["outcomes"]["EPERM"], ATTEMPTS, "every connect from another namespace is refused: {result}");

    let of_pid = |line: &str| {
        line.match_indices(&format!("pid={pid}"))
            .any(|(at, m)| !line[at + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
    };
    // Bounded: the refusal traces arrive asynchronously; the summary of suppressed ones comes last.
    let suppressed = setup.agent.log.wait_for_raw("a line about suppressed warnings", |l| {
        l.contains("suppressed") && (of_pid(l) || l.contains("refus"))
    });
    let lines = setup.agent.log.raw_lines();
    let forged: Vec<&String> =
        lines.iter().filter(|l| l.starts_with("FORGED") || l.trim_end().ends_with("comm=x")).collect();
    let warnings = lines.iter().filter(|l| l.contains("refused") && of_pid(l)).count();
    let suppressed = suppressed.ok();
    eprintln!(
        "{warnings} refusal warnings for pid {pid}; {} forged-looking lines, first {:?}; suppressed line: {suppressed:?}",
        forged.len(),
        forged.iter().take(2).collect::<Vec<_>>()
    );
    assert!(forged.is_empty(), "the comm's newline reached the log in {} lines: {:?}", forged.len(), &forged[..2]);
    assert!(warnings < 50, "{warnings} refusal warnings for {ATTEMPTS} attempts");
    assert!(suppressed.is_some(), "no line about suppressed refusal warnings");
    Ok(())
}

/// The recording DNS server in the test namespace (the agent's upstream).
fn start_dns_server(net: &TestNet, slow_suffix: &str, records: &[String]) -> Result<Interactive> {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &net.netns, PYTHON, "-u", &probe_script(), "dns-server", &net.v4.to_string()]);
    command.args([slow_suffix, "1.5"]).args(records);
    Interactive::start(command, "ready")
}

#[test]
fn dns_tunnelling_through_names_outside_the_policy_and_odd_types_is_refused() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let upstream = start_dns_server(&net, ".slow.test", &[format!("listed.test={}", net.v4)])?;
    let dns_args = ["--dns-server".to_owned(), format!("{}:53", net.v4)];
    let policy = |net: &TestNet| format!("{}      - host: listed.test\n        port: 443\n", net.allow_all_policy());
    let v4 = net.v4.to_string();
    let setup = Setup::on(net, "tunnel", policy, &[&dns_args[0], &dns_args[1]], "json")?;
    let (_, result) =
        setup.meanwhile(|| probe(&setup.sandbox, &["dns-tunnel", &v4, "exfil.test", "200", "listed.test"]))??;
    let names: HashSet<String> =
        result["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect();
    let queries = upstream.lines.matching(|e| e["kind"] == "query");
    let leaked: Vec<&Value> = queries
        .iter()
        .filter(|q| {
            q["name"].as_str().is_some_and(|n| names.contains(n) || n.ends_with("exfil.test"))
                || (q["name"] == "listed.test" && q["qtype"] != 1 && q["qtype"] != 28)
        })
        .collect();
    eprintln!(
        "answered {} rcodes {} other types {} A {}; upstream got {} of the tunnel's queries",
        result["answered"],
        result["rcodes"],
        result["other_types"],
        result["a"],
        leaked.len()
    );
    assert!(leaked.is_empty(), "{} queries reached the upstream, e.g. {:?}", leaked.len(), leaked.first());
    assert_eq!(result["rcodes"]["5"], 200, "every tunnelling query gets REFUSED: {}", result["rcodes"]);
    assert_eq!(result["other_types"]["TXT"]["rcode"], 5, "{}", result["other_types"]);
    assert_eq!(result["other_types"]["NULL"]["rcode"], 5, "{}", result["other_types"]);
    assert_eq!(result["a"]["rcode"], 0, "a policy host is still resolved: {}", result["a"]);
    assert_eq!(result["a"]["answers"], 1, "a policy host is still resolved: {}", result["a"]);
    Ok(())
}

#[test]
fn a_sandbox_flooding_slow_dns_queries_does_not_starve_another() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let fast: Vec<String> = (1..=20).map(|n| format!("n{n}.fast.test")).collect();
    let records: Vec<String> = fast.iter().map(|name| format!("{name}={}", net.v4)).collect();
    let upstream = start_dns_server(&net, ".slow.test", &records)?;
    let policy = |net: &TestNet| {
        format!(
            "{}      - host: \"*.slow.test\"\n        port: 443\n      - host: \"*.fast.test\"\n        port: 443\n",
            net.allow_all_policy()
        )
    };
    let dns_args = ["--dns-server".to_owned(), format!("{}:53", net.v4)];
    let v4 = net.v4.to_string();
    let setup = Setup::on(net, "dns-budget", policy, &[&dns_args[0], &dns_args[1]], "json")?;
    let mut flood =
        Interactive::start(probe_command(&setup.sandbox, &["dns-flood", &v4, "slow.test", "100000"]), "flooding")?;
    let resolve: Vec<&str> = ["dns-resolve", v4.as_str()].into_iter().chain(fast.iter().map(String::as_str)).collect();
    let (_, result) = probe(&setup.other, &resolve)?;
    flood.close_stdin();
    let done = flood.lines.wait_for("the flood's end", |e| e["kind"] == "done")?;
    let slow = upstream.lines.matching(|e| e["name"].as_str().is_some_and(|n| n.ends_with(".slow.test"))).len();
    eprintln!(
        "other sandbox answered {}/20; flood sent {}; upstream got {slow} slow queries",
        result["answered"], done["sent"]
    );
    assert_eq!(result["answered"], 20, "the other sandbox's names: {}", result["answers"]);
    Ok(())
}
