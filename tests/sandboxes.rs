//! One daemon, many sandboxes: each with its own policy, one in a network
//! namespace of its own with only `lo`; sandboxes added and removed at run
//! time; metrics and status checked against the log.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

/// The name the test host's DNS answers with its public IPv4 address.
const NAME: &str = "svc.sbx.test";

/// Sends half of a 2 MiB exchange, says "half", waits for a line on stdin,
/// sends the rest, then prints what came back.
const SLOW_EXCHANGE: &str = r#"
import json, socket, sys
from servers import pattern
host, port = sys.argv[1], int(sys.argv[2])
send, recv = 2 << 20, 1 << 20
data = b"".join(pattern(send))
s = socket.create_connection((host, port), timeout=30)
s.sendall(f"SEND {send} RECV {recv}\n".encode())
s.sendall(data[: send // 2])
print("half", flush=True)
sys.stdin.readline()
s.sendall(data[send // 2 :])
got = bytearray()
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print(json.dumps({"received": len(got), "intact": bytes(got) == b"".join(pattern(recv))}), flush=True)
"#;

/// What the slow exchange sends before its data.
const EXCHANGE_HEADER: &str = "SEND 2097152 RECV 1048576\n";

/// Prometheus text on stdin -> JSON samples on stdout, by the official
/// client library's parser.
const PARSE_METRICS: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples.append({"name": sample.name, "labels": sample.labels, "value": sample.value})
print(json.dumps(samples))
"#;

/// A network namespace of the sandbox's own, with `lo` (left down: the
/// agent brings it up) and nothing else.
struct OwnNetns {
    name: String,
}

impl OwnNetns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("se-sbx-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `program args` in `sandbox`, inside this namespace.
    fn command(&self, sandbox: &Sandbox, program: &str, args: &[&str]) -> Command {
        let mut command = sandbox.command("ip");
        command.args(["netns", "exec", &self.name, program]).args(args);
        command
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// `binary` may reach [`NAME`] (the test host's private address: plain
/// HTTP goes through the private-IP gate) on `ports`.
fn policy(binary: &str, ports: &[u16], net: &TestNet) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "version: 1\nnetwork_policies:\n  svc:\n    binaries: [{{ path: \"{binary}\" }}]\n    endpoints:\n      - host: {NAME}\n        ports: [{}]\n        allowed_ips: [\"{}/24\"]\n",
        ports.join(", "),
        net.private_v4
    )
}

fn output(command: &mut Command) -> Result<(u32, std::process::Output)> {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    Ok((pid, child.wait_with_output()?))
}

/// `curl -w %{http_code}` to `url`: (pid, status text, exit code).
fn curl_status(command: Command, url: &str) -> Result<(u32, String, Option<i32>)> {
    let mut command = command;
    command.args(["-sS", "--noproxy", "*", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url]);
    let (pid, out) = output(&mut command)?;
    Ok((pid, String::from_utf8_lossy(&out.stdout).into_owned(), out.status.code()))
}

fn curl_in(sandbox: &Sandbox, url: &str) -> Result<(u32, String, Option<i32>)> {
    curl_status(sandbox.command("curl"), url)
}

/// A sample's name and labels.
type Series = (String, BTreeMap<String, String>);

/// The daemon's /metrics, parsed: (name, labels) -> value.
fn scrape(address: &str) -> Result<BTreeMap<Series, f64>> {
    let text = run("curl", &["-sS", "--noproxy", "*", "-m", "10", &format!("http://{address}/metrics")])?;
    let mut parser = Command::new(PYTHON)
        .args(["-c", PARSE_METRICS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    parser.stdin.take().context("stdin")?.write_all(&text.stdout)?;
    let parsed = parser.wait_with_output()?;
    ensure!(
        parsed.status.success(),
        "the Prometheus parser refused the text: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&parsed.stdout)?;
    Ok(samples
        .into_iter()
        .map(|sample| {
            let labels = sample["labels"]
                .as_object()
                .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned())).collect())
                .unwrap_or_default();
            ((sample["name"].as_str().unwrap_or("").to_owned(), labels), sample["value"].as_f64().unwrap_or(-1.0))
        })
        .collect())
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Dropped in this order: the daemon (its sandboxes detached), the
/// cgroups, the namespace, then the test host.
struct World {
    daemon: AgentDaemon,
    alpha: Sandbox,
    beta: Sandbox,
    gamma: Sandbox,
    netns: OwnNetns,
    _dns: Dns,
    servers: Servers,
    net: TestNet,
}

#[test]
fn one_daemon_serves_sandboxes_with_their_own_policies_namespaces_metrics_and_status() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let servers = net.start_servers()?;
    let dns = net.start_dns(&[(NAME, IpAddr::V4(net.private_v4))])?;
    let dns_args = dns.agent_args();
    let daemon = AgentDaemon::start(&[&dns_args[0], &dns_args[1], "--metrics-listen", "127.0.0.1:0"])?;
    let mut world = World {
        daemon,
        alpha: Sandbox::new("alpha")?,
        beta: Sandbox::new("beta")?,
        gamma: Sandbox::new("gamma")?,
        netns: OwnNetns::new("gamma")?,
        _dns: dns,
        servers,
        net,
    };
    let metrics = world.daemon.agent.log.wait_for("metrics", |e| e["event"] == "metrics_listening")?["address"]
        .as_str()
        .context("metrics address")?
        .to_owned();
    let metrics_port = metrics.rsplit(':').next().unwrap_or_default().to_owned();
    assert_eq!(world.daemon.list()?, Vec::<Value>::new(), "the daemon starts empty");

    // alpha: curl may reach the name over HTTP; beta: the same destination is not in its policy.
    let alpha_policy = PolicyFile::new(&policy("/usr/bin/curl", &[HTTP_PORT], &world.net))?;
    let beta_policy = PolicyFile::new(&policy("/**", &[EXCHANGE_PORT], &world.net))?;
    let gamma_policy = PolicyFile::new(&policy("/**", &[HTTP_PORT, EXCHANGE_PORT], &world.net))?;
    world.daemon.add("alpha", &world.alpha, &alpha_policy, &[])?;
    let netns_path = world.netns.path();
    world.daemon.add("gamma", &world.gamma, &gamma_policy, &["--netns", &netns_path])?;
    let lo = run("ip", &["-n", &world.netns.name, "link", "show", "lo"])?;
    ensure!(String::from_utf8_lossy(&lo.stdout).contains(",UP"), "the agent brought lo up in the sandbox's namespace");

    let url = format!("http://{NAME}:{HTTP_PORT}/bytes/10");
    let (pid, status, _) = curl_in(&world.alpha, &url)?;
    assert_eq!(status, "200", "alpha's policy allows {url}");
    let line = world.daemon.agent.wait_connection_of(pid)?;
    assert_eq!((&line["sandbox"], &line["verdict"]), (&Value::from("alpha"), &Value::from("relayed")), "{line}");

    // gamma, in a namespace with only lo: its DNS and connections are served there.
    let (pid, status, _) = curl_status(world.netns.command(&world.gamma, "curl", &[]), &url)?;
    assert_eq!(status, "200", "gamma reaches the name from its own namespace");
    let line = world.daemon.agent.wait_connection_of(pid)?;
    assert_eq!((&line["sandbox"], &line["host"]), (&Value::from("gamma"), &Value::from(NAME)), "{line}");

    // A transfer in gamma spans the changes to the other sandboxes.
    let mut slow = world
        .netns
        .command(&world.gamma, PYTHON, &["-c", SLOW_EXCHANGE, NAME, &EXCHANGE_PORT.to_string()])
        .env("PYTHONPATH", support_file(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let slow_pid = slow.id();
    let mut slow_out = BufReader::new(slow.stdout.take().context("stdout")?);
    let mut said = String::new();
    slow_out.read_line(&mut said)?;
    ensure!(said == "half\n", "the slow exchange did not get going: {said:?}");

    world.daemon.add("beta", &world.beta, &beta_policy, &[])?;
    for _ in 0..2 {
        let (pid, status, _) = curl_in(&world.beta, &url)?;
        assert_eq!(status, "403", "beta's policy does not allow {url}");
        let line = world.daemon.agent.wait_connection_of(pid)?;
        assert_eq!((&line["sandbox"], &line["verdict"]), (&Value::from("beta"), &Value::from("denied")), "{line}");
    }
    let (pid, beta_exchange) = exchange(Some(&world.beta), "inet", NAME, 1000, 1000)?;
    ensure!(beta_exchange.status.success(), "beta resolves and reaches what its policy allows");
    assert_eq!(world.daemon.agent.wait_connection_of(pid)?["sandbox"], "beta");

    // alpha removed without --detach: its cgroup stays closed.
    let http_before = world.servers.events.matching(|e| e["kind"] == "http").len();
    let (ok, stdout, stderr) = world.daemon.cli(&["sandbox", "remove", "alpha"])?;
    ensure!(ok && stdout.contains("removed alpha: its cgroup stays closed"), "{stdout}{stderr}");
    let by_address = format!("http://{}:{HTTP_PORT}/bytes/10", world.net.private_v4);
    let (_, status, code) = curl_in(&world.alpha, &by_address)?;
    assert_eq!((status.as_str(), code), ("000", Some(7)), "a removed sandbox's connects are refused");
    let (_, status, code) = curl_in(&world.alpha, &url)?;
    assert_eq!((status.as_str(), code), ("000", Some(6)), "and its DNS queries");
    assert_eq!(world.servers.events.matching(|e| e["kind"] == "http").len(), http_before, "nothing reached the server");

    writeln!(slow.stdin.take().context("stdin")?)?;
    let mut result = String::new();
    slow_out.read_line(&mut result)?;
    let result: Value = serde_json::from_str(&result).with_context(|| format!("slow exchange said {result:?}"))?;
    assert_eq!((&result["received"], &result["intact"]), (&Value::from(1 << 20), &Value::Bool(true)), "{result}");
    let _ = slow.wait()?;
    let line = world.daemon.agent.wait_connection_of(slow_pid)?;
    assert_eq!(
        (&line["sandbox"], &line["bytes_up"]),
        (&Value::from("gamma"), &Value::from(EXCHANGE_HEADER.len() + (2 << 20))),
        "{line}"
    );

    // A reload in beta: its generation moves, gamma's does not.
    beta_policy.write(
        &(policy("/**", &[EXCHANGE_PORT], &world.net)
            + &format!("      - host: 127.0.0.1\n        port: {metrics_port}\n")),
    )?;
    world.daemon.agent.log.wait_for("beta's reload", |e| e["event"] == "policy_reloaded" && e["sandbox"] == "beta")?;
    let generations: BTreeMap<String, u64> = world
        .daemon
        .list()?
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or_default().to_owned(), s["policy_generation"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(generations, BTreeMap::from([("beta".to_owned(), 2), ("gamma".to_owned(), 1)]));

    // The metrics listener is out of reach even where a policy lists it.
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let (pid, status, _) = curl_in(&world.beta, &metrics_url)?;
    assert_eq!(status, "000");
    let line = world.daemon.agent.wait_connection_of(pid)?;
    ensure!(line["reason"].as_str().is_some_and(|r| r.contains("metrics listener")), "{line}");
    let (pid, status, _) = curl_status(world.netns.command(&world.gamma, "curl", &[]), &metrics_url)?;
    assert_eq!(status, "000");
    let line = world.daemon.agent.wait_connection_of(pid)?;
    ensure!(line["reason"].as_str().is_some_and(|r| r.contains("metrics listener")), "{line}");

    // Metrics, parsed by Prometheus' own parser, agree with the log.
    let samples = scrape(&metrics)?;
    let mut logged: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for line in world.daemon.agent.log.matching(|e| e["event"] == "connection") {
        let key = |field: &str| line[field].as_str().unwrap_or_default().to_owned();
        *logged.entry((key("sandbox"), key("verdict"), key("protocol"))).or_default() += 1.0;
    }
    let counted: BTreeMap<(String, String, String), f64> = samples
        .iter()
        .filter(|((name, _), _)| name == "sandbox_egress_connections_total")
        .map(|((_, l), value)| ((l["sandbox"].clone(), l["verdict"].clone(), l["protocol"].clone()), *value))
        .collect();
    assert_eq!(counted, logged, "connections by sandbox, verdict and protocol");
    let sample = |name: &str, pairs: &[(&str, &str)]| samples.get(&(name.to_owned(), labels(pairs))).copied();
    assert_eq!(sample("sandbox_egress_sandboxes", &[]), Some(2.0));
    assert_eq!(sample("sandbox_egress_policy_generation", &[("sandbox", "beta")]), Some(2.0));
    assert_eq!(sample("sandbox_egress_policy_generation", &[("sandbox", "gamma")]), Some(1.0));
    assert_eq!(sample("sandbox_egress_connections_active", &[("sandbox", "gamma")]), Some(0.0));
    let denied = sample("sandbox_egress_denials_total", &[("sandbox", "beta"), ("reason", "policy_denied")]);
    assert_eq!(denied, Some(2.0));
    let bytes_up = sample("sandbox_egress_bytes_total", &[("sandbox", "gamma"), ("direction", "up")]).unwrap_or(0.0);
    ensure!(bytes_up >= (EXCHANGE_HEADER.len() + (2 << 20)) as f64, "gamma's upload counted: {bytes_up}");
    let gamma_dns = sample("sandbox_egress_dns_queries_total", &[("sandbox", "gamma"), ("answer", "noerror")]);
    ensure!(gamma_dns.is_some_and(|n| n >= 1.0), "gamma's DNS answered in its namespace: {gamma_dns:?}");
    let decisions = sample("sandbox_egress_decision_seconds_count", &[("sandbox", "beta")]).unwrap_or(0.0);
    ensure!(decisions >= 3.0, "beta's decisions timed: {decisions}");
    let fill = sample("sandbox_egress_ebpf_map_capacity", &[("map", "process_times")]);
    ensure!(fill.is_some_and(|n| n > 0.0), "map capacity reported");

    // status: the sandboxes and the most frequent denial, by host, port and binary.
    let (ok, stdout, stderr) = world.daemon.cli(&["status", "--json"])?;
    ensure!(ok, "{stderr}");
    let status: Value = serde_json::from_str(&stdout)?;
    let names: Vec<&str> =
        status["sandboxes"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["beta", "gamma"]);
    assert_eq!(status["connections_in_flight"], 0);
    let top = &status["recent_denials"][0];
    assert_eq!(
        (&top["sandbox"], &top["host"], &top["port"], &top["binary"], &top["count"]),
        (
            &Value::from("beta"),
            &Value::from(NAME),
            &Value::from(HTTP_PORT),
            &Value::from("/usr/bin/curl"),
            &Value::from(2)
        ),
        "{status}"
    );

    // --detach refuses while processes remain, unless --force.
    let mut sleeper = world.beta.command("sleep").arg("30").spawn()?;
    let (ok, _, stderr) = world.daemon.cli(&["sandbox", "remove", "beta", "--detach"])?;
    ensure!(!ok && stderr.contains("1 processes remain"), "{stderr}");
    let (ok, stdout, stderr) = world.daemon.cli(&["sandbox", "remove", "beta", "--detach", "--force"])?;
    ensure!(ok && stdout.contains("detached"), "{stdout}{stderr}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let (ok, stdout, _) = world.daemon.cli(&["sandbox", "list"])?;
    ensure!(ok && stdout.starts_with("gamma "), "{stdout}");
    Ok(())
}

#[test]
fn a_spec_directory_adds_replaces_and_removes_sandboxes_as_files_change() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let dns = net.start_dns(&[(NAME, IpAddr::V4(net.private_v4))])?;
    let dir = TempDir::new("sandbox-specs")?;
    let specs = dir.file("specs");
    std::fs::create_dir(&specs)?;
    let sandbox = Sandbox::new("from-dir")?;
    let allowed = PolicyFile::new(&policy("/usr/bin/curl", &[HTTP_PORT], &net))?;
    let denied = PolicyFile::new(&policy("/usr/bin/curl", &[EXCHANGE_PORT], &net))?;
    let spec = |policy: &PolicyFile| format!("cgroup: {}\npolicy: {}\n", sandbox.path_str(), policy.path.display());
    let file = format!("{specs}/web.yaml");
    std::fs::write(&file, spec(&allowed))?;
    let dns_args = dns.agent_args();
    let mut daemon = AgentDaemon::start(&[&dns_args[0], &dns_args[1], "--sandboxes", &specs])?;
    daemon.detach_on_drop(sandbox.path_str());
    let url = format!("http://{NAME}:{HTTP_PORT}/bytes/10");
    assert_eq!(curl_in(&sandbox, &url)?.1, "200", "the spec in the directory at start is served");
    assert_eq!(daemon.list()?[0]["name"], "web", "named after its file");

    std::fs::write(&file, spec(&denied))?;
    daemon
        .agent
        .log
        .wait_for_count("the replacement", 2, |e| e["event"] == "sandbox_added" && e["sandbox"] == "web")?;
    assert_eq!(curl_in(&sandbox, &url)?.1, "403", "the changed spec's policy decides");

    std::fs::write(format!("{specs}/broken.yaml"), "cgroup: /nowhere\npolicy: /nothing.yaml\n")?;
    let refused = daemon.agent.log.wait_for("the broken spec", |e| e["event"] == "sandbox_spec_refused")?;
    ensure!(refused["message"].as_str().is_some_and(|m| m.contains("/nowhere")), "{refused}");
    assert_eq!(daemon.list()?.len(), 1, "a broken spec adds nothing and removes nothing");

    std::fs::remove_file(&file)?;
    // The second removal of "web" (the first was the replacement's).
    daemon.agent.log.wait_for_count("the removal", 2, |e| e["event"] == "sandbox_removed" && e["sandbox"] == "web")?;
    let by_address = format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4);
    let (_, status, code) = curl_in(&sandbox, &by_address)?;
    assert_eq!((status.as_str(), code), ("000", Some(7)), "a removed spec's cgroup stays closed");
    drop(daemon);
    Ok(())
}
