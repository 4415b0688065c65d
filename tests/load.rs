//! Load and faults, end to end: 64 sandboxed client threads (the load-client
//! binary) make mixed allowed and denied transfers through the real agent,
//! checked byte for byte against what the servers received and what the
//! agent logged; the same load across a SIGKILL and restart of the agent,
//! and across policy reloads.
//!
//! `SE_SOAK_SECS` sets the soak's length (default 20 s; `cargo xtask soak`
//! runs it longer).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use e2e::*;
use serde_json::{json, Value};

const THREADS: u64 = 64;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// How long the soak's load runs before its baseline is taken.
const WARM_UP_SECS: f64 = 4.0;
/// Allocator slack allowed between the baseline and after the soak. Freed
/// memory need not go back to the kernel (glibc keeps it in each thread's
/// arena), so RSS after a load is not RSS before it; but the baseline is
/// taken after a warm-up under the same 64-way load, so that high-water mark
/// is already in it. Measured here (debug agent, 2 cores): RSS moves by
/// under 0.5 MiB over a 20 s soak, peak included. 8 MiB is far above that
/// noise and below what a leak of 1 KiB per connection costs over the
/// default soak's ~10 000 connections (10 MiB; longer soaks catch less).
const RSS_TOLERANCE_KIB: u64 = 8 * 1024;

/// The test host, its servers, a sandbox and an agent. Fields drop in order:
/// the agent goes first.
struct Setup {
    agent: Agent,
    policy: PolicyFile,
    sandbox: Sandbox,
    dir: TempDir,
    servers: Servers,
    net: TestNet,
}

impl Setup {
    /// `listen_port`: `None` for any free port.
    fn new(test: &str, listen_port: Option<u16>) -> Result<Self> {
        require_root();
        let net = TestNet::new()?;
        let servers = net.start_servers()?;
        let dir = TempDir::new(test)?;
        let sandbox = Sandbox::new(test)?;
        let policy = PolicyFile::new(&policy(&net, true))?;
        let agent = match listen_port {
            None => Agent::start(&sandbox, &policy, &[])?,
            Some(port) => Agent::start_on_port(&sandbox, &policy, port, &[])?,
        };
        Ok(Self { agent, policy, sandbox, dir, servers, net })
    }

    /// Allowed: opaque TCP to the public IPv4 exchange server (unless the policy says otherwise).
    fn exchange_v4(&self) -> String {
        format!("{}:{EXCHANGE_PORT}", self.net.v4)
    }

    /// Allowed: opaque TCP to the public IPv6 exchange server.
    fn exchange_v6(&self) -> String {
        format!("[{}]:{EXCHANGE_PORT}", self.net.v6)
    }

    /// Allowed: the same, connected from a dual-stack IPv6 socket (v4-mapped).
    fn exchange_v4_mapped(&self) -> String {
        format!("[::ffff:{}]:{EXCHANGE_PORT}", self.net.v4)
    }

    /// Allowed: plain HTTP to the private IPv4 address.
    fn web(&self) -> String {
        format!("{}:{HTTP_PORT}", self.net.private_v4)
    }

    /// Denied: the private IPv6 address is in no policy (an exchange server listens there).
    fn denied_exchange(&self) -> String {
        format!("[{}]:{EXCHANGE_PORT}", self.net.private_v6)
    }

    /// Denied: the HTTP port of the public IPv4 address is not allowed (a 403).
    fn denied_web(&self) -> String {
        format!("{}:{HTTP_PORT}", self.net.v4)
    }

    /// The address the agent's upstream connects to the private IPv6 address come from.
    fn denied_exchange_peer(&self) -> String {
        let mut segments = self.net.private_v6.segments();
        segments[7] = 1;
        Ipv6Addr::from(segments).to_string()
    }

    /// Starts the load client in the sandbox: THREADS threads for `seconds`.
    fn start_load(&self, name: &str, seconds: f64, seed: u64, mix: Value) -> Result<LoadRun> {
        let records = self.dir.path.join(format!("{name}.jsonl"));
        let plan = json!({ "seed": seed, "threads": THREADS, "seconds": seconds, "mix": mix });
        let mut command = self.sandbox.command(env!("CARGO_BIN_EXE_load-client"));
        command.arg(plan.to_string()).arg(&records);
        let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("spawn load-client")?;
        Ok(LoadRun { child, records, seconds })
    }
}

/// The policy of every test here: exchanges to both public addresses (the
/// IPv4 one only with `v4_exchange`), plain HTTP to the private IPv4 address.
fn policy(net: &TestNet, v4_exchange: bool) -> String {
    let v4 = if v4_exchange {
        format!("      - host: \"{}\"\n        port: {EXCHANGE_PORT}\n", net.v4)
    } else {
        String::new()
    };
    format!(
        "version: 1\nnetwork_policies:\n  load:\n    endpoints:\n{v4}\
         \x20     - host: \"{v6}\"\n        port: {EXCHANGE_PORT}\n\
         \x20     - host: \"{private}\"\n        port: {HTTP_PORT}\n        allowed_ips: [\"{private}/32\"]\n    binaries: [{{ path: \"/**\" }}]\n",
        v6 = net.v6,
        private = net.private_v4,
    )
}

/// One weighted entry of a load mix (see tests/support/bin/load_client.rs).
fn transfer(name: &str, kind: &str, target: String, weight: u64, send: (u64, u64), recv: (u64, u64)) -> Value {
    json!({ "name": name, "kind": kind, "target": target, "weight": weight, "send": [send.0, send.1], "recv": [recv.0, recv.1] })
}

/// The upload spread over `pace_ms` (a range), so the transfer lasts that long.
fn paced(mut transfer: Value, pace_ms: (u64, u64)) -> Value {
    transfer["pace_ms"] = json!([pace_ms.0, pace_ms.1]);
    transfer
}

/// Run back to back by `threads` threads of its own instead of picked by
/// weight: that many are under way at any moment.
fn dedicated(mut transfer: Value, threads: u64) -> Value {
    transfer["threads"] = json!(threads);
    transfer
}

/// The client hangs up after half the answer.
fn abandon(mut transfer: Value) -> Value {
    transfer["abandon"] = json!(true);
    transfer
}

struct LoadRun {
    child: Child,
    records: PathBuf,
    seconds: f64,
}

/// What a load client did: its pid (the agent logs it), summary and connections.
struct Finished {
    pid: u32,
    summary: Value,
    conns: Vec<Conn>,
}

impl LoadRun {
    /// Waits for the client, which stops at its deadline plus at most one
    /// connection's own bound (60 s).
    fn finish(mut self) -> Result<Finished> {
        let pid = self.child.id();
        let bound = Instant::now() + Duration::from_secs_f64(self.seconds) + Duration::from_secs(90);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > bound {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("load client still running 90 s after its {} s deadline", self.seconds);
            }
            thread::sleep(Duration::from_millis(100));
        }
        let output = self.child.wait_with_output()?;
        ensure!(
            output.status.success(),
            "load client failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let summary: Value = serde_json::from_slice(&output.stdout).context("load client summary")?;
        let text = std::fs::read_to_string(&self.records)?;
        let conns = text.lines().map(Conn::parse).collect::<Result<Vec<_>>>()?;
        ensure!(summary["connections"] == conns.len(), "summary {summary} but {} records", conns.len());
        Ok(Finished { pid, summary, conns })
    }
}

/// One connection as the load client saw it.
struct Conn {
    mix: String,
    kind: String,
    target: String,
    local: Option<String>,
    start_ns: u64,
    end_ns: u64,
    payload: u64,
    sent: u64,
    sent_sha256: String,
    expect: u64,
    received: u64,
    outcome: String,
    error: Option<String>,
}

impl Conn {
    fn parse(line: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(line)?;
        let text =
            |key: &str| v[key].as_str().map(str::to_owned).with_context(|| format!("record without {key}: {line}"));
        let number = |key: &str| v[key].as_u64().with_context(|| format!("record without {key}: {line}"));
        Ok(Self {
            mix: text("mix")?,
            kind: text("kind")?,
            target: text("target")?,
            local: v["local"].as_str().map(str::to_owned),
            start_ns: number("start_ns")?,
            end_ns: number("end_ns")?,
            payload: number("payload")?,
            sent: number("sent")?,
            sent_sha256: text("sent_sha256")?,
            expect: number("expect")?,
            received: number("received")?,
            outcome: text("outcome")?,
            error: v["error"].as_str().map(str::to_owned),
        })
    }

    fn is_exchange(&self) -> bool {
        self.kind == "exchange"
    }

    /// What the client must have seen for the agent's verdict.
    fn matches_verdict(&self, verdict: &str) -> bool {
        match verdict {
            // Abandoned: the client hung up mid-download, as its mix entry said.
            "relayed" => self.outcome == "intact" || self.outcome == "abandoned",
            // Opaque streams are reset before any answer, HTTP gets a 403.
            "denied" if self.is_exchange() => self.outcome == "cut" && self.received == 0,
            "denied" => self.outcome == "forbidden",
            _ => false,
        }
    }
}

/// One line for failure messages.
impl std::fmt::Display for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{} {} {} from {} at {} ms: sent {}/{}, received {}/{}, {}",
            self.mix,
            self.kind,
            self.target,
            self.local.as_deref().unwrap_or("-"),
            self.start_ns / 1_000_000,
            self.sent,
            self.payload,
            self.received,
            self.expect,
            self.outcome
        )?;
        match &self.error {
            Some(error) => write!(f, ": {error}]"),
            None => write!(f, "]"),
        }
    }
}

/// The agent's log lines of a load client's connections, paired with the
/// client's records. The (client address, destination) is not enough: a
/// client that resets its side frees its local port at once, so the next
/// connection from that port can be accepted while the agent is still
/// closing the old one (an abandoned download waits up to 1 s for the
/// upstream's acknowledgements) and logs first. So each line also goes by
/// when the agent accepted it (`accepted_monotonic_ns`, on the
/// CLOCK_MONOTONIC of the client's records): after that connection's client
/// started connecting and before it finished. Connections from one local
/// port follow each other (the port is free only once the previous socket is
/// gone), so one accept time falls in one connection's window but for the
/// few microseconds around a socket's close: lines go in accept order, each
/// to the window that holds it and ends first.
struct Pairing<'a> {
    pairs: Vec<(&'a Conn, &'a Value)>,
    /// Connected, but no log line.
    unlogged: Vec<&'a Conn>,
    /// A log line for no connection of the client's.
    unknown: Vec<&'a Value>,
    /// Pairs whose line was logged before the line of an earlier connection
    /// from the same (client address, destination): a port used again while
    /// the agent still closed the previous connection, which pairing in
    /// start order would have swapped.
    out_of_order: usize,
}

fn pair<'a>(conns: impl IntoIterator<Item = &'a Conn>, lines: &'a [Value]) -> Pairing<'a> {
    let mut by_key: HashMap<(String, String), Vec<Option<&Conn>>> = HashMap::new();
    for conn in conns.into_iter().filter(|c| c.local.is_some()) {
        let key = (unmapped(conn.local.as_deref().unwrap()), unmapped(&conn.target));
        by_key.entry(key).or_default().push(Some(conn));
    }
    let mut pairing = Pairing { pairs: vec![], unlogged: vec![], unknown: vec![], out_of_order: 0 };
    let mut by_accept: Vec<(u64, usize, &Value)> = Vec::with_capacity(lines.len());
    for (logged, line) in lines.iter().enumerate() {
        match line["accepted_monotonic_ns"].as_u64() {
            Some(accepted) => by_accept.push((accepted, logged, line)),
            None => pairing.unknown.push(line),
        }
    }
    by_accept.sort_by_key(|&(accepted, _, _)| accepted);
    // Per key, the log position of the latest-started connection paired so far.
    let mut latest: HashMap<(String, String), (u64, usize)> = HashMap::new();
    for (accepted, logged, line) in by_accept {
        let key = (
            line["client"].as_str().unwrap_or_default().to_owned(),
            line["destination"].as_str().unwrap_or_default().to_owned(),
        );
        let slot = by_key.get_mut(&key).and_then(|conns| {
            conns
                .iter_mut()
                .filter(|c| c.is_some_and(|c| c.start_ns < accepted && accepted <= c.end_ns))
                .min_by_key(|c| c.map(|c| c.end_ns))
        });
        match slot.and_then(Option::take) {
            Some(conn) => {
                let previous = latest.entry(key).or_insert((conn.start_ns, logged));
                if conn.start_ns > previous.0 {
                    pairing.out_of_order += usize::from(logged < previous.1);
                    *previous = (conn.start_ns, logged);
                }
                pairing.pairs.push((conn, line));
            }
            None => pairing.unknown.push(line),
        }
    }
    pairing.unlogged = by_key.into_values().flatten().flatten().collect();
    pairing
}

/// An address as the agent logs it: a v4-mapped one (`[::ffff:a.b.c.d]:p`,
/// from a dual-stack socket) as plain IPv4.
fn unmapped(address: &str) -> String {
    match address.parse::<SocketAddr>() {
        Ok(SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())).to_string(),
            None => address.to_owned(),
        },
        _ => address.to_owned(),
    }
}

/// Failed expectations, gathered so one run reports all of them at once.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }

    /// Fails with counts per kind of problem (a message's words before its
    /// first `:` or `[`), the first few of each kind, and `context`.
    fn verdict(self, context: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut kinds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for problem in &self.0 {
            let kind = problem.split([':', '[']).next().unwrap_or_default().trim();
            kinds.entry(kind).or_default().push(problem);
        }
        let mut text = format!("{} problem(s)", self.0.len());
        for (kind, problems) in kinds {
            let _ = write!(
                text,
                "\n{} x {kind}, e.g.:\n    {}",
                problems.len(),
                problems.iter().take(3).copied().collect::<Vec<_>>().join("\n    ")
            );
        }
        bail!("{text}\n{context}")
    }
}

/// Outcome counts per mix entry: the measured result, printed by every test.
fn tally(conns: &[Conn]) -> String {
    let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for conn in conns {
        *counts.entry((conn.mix.as_str(), conn.outcome.as_str())).or_default() += 1;
    }
    counts.iter().fold(String::new(), |mut text, ((mix, outcome), n)| {
        let _ = write!(text, "{mix}/{outcome}={n} ");
        text
    })
}

/// The agent's connection lines for `pid`, once there are `expected` of them (bounded wait).
fn wait_logged(agent: &Agent, pid: u32, expected: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = agent.log.matching(|e| e["event"] == "connection" && e["pid"] == pid);
        if lines.len() >= expected || Instant::now() > deadline {
            return lines;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The servers' events of `kind` once there are `expected` (bounded wait).
fn wait_server_events(servers: &Servers, kind: &str, expected: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let events = servers.events.matching(|e| e["kind"] == kind);
        if events.len() >= expected || Instant::now() > deadline {
            return events;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Each intact exchange's upload must be in the server's events: the same
/// sha256 (payloads are unique per connection) and every byte. With
/// `abandoned` (exchanges whose client hung up mid-download: their server
/// either reported the whole upload too, or failed writing its answer),
/// every event must be of one of them: nothing else reached the server.
fn check_uploads(problems: &mut Problems, events: &[Value], intact: &[&Conn], abandoned: Option<&[&Conn]>) {
    let mut by_sha: HashMap<&str, Vec<&Value>> = HashMap::new();
    for event in events {
        by_sha.entry(event["sha256"].as_str().unwrap_or_default()).or_default().push(event);
    }
    let mut accounted = 0;
    for conn in intact.iter().chain(abandoned.unwrap_or_default()) {
        let seen = by_sha.get(conn.sent_sha256.as_str()).map(Vec::as_slice).unwrap_or_default();
        let whole = seen.len() == 1 && seen[0]["received"] == conn.payload && seen[0]["sent"] == conn.expect;
        problems.check(whole || (seen.is_empty() && conn.outcome == "abandoned"), || {
            format!("server events {seen:?} for the upload of {conn}")
        });
        accounted += seen.len();
    }
    if abandoned.is_some() {
        problems.check(events.len() == accounted, || {
            format!("{} exchange events at the server, {accounted} of them for the client's transfers", events.len())
        });
    }
}

/// For plain HTTP: each intact GET of `target` was served once (the
/// server's events, by path, for that Host).
fn check_http_served(problems: &mut Problems, servers: &Servers, target: &str, intact: &[&Conn], exactly: bool) {
    let events = servers.events.matching(|e| e["kind"] == "http" && e["host"] == target && e["status"] == 200);
    let mut served: HashMap<String, i64> = HashMap::new();
    for event in &events {
        *served.entry(event["path"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    for conn in intact {
        *served.entry(format!("/bytes/{}", conn.expect)).or_default() -= 1;
    }
    let short: Vec<_> = served.iter().filter(|(_, n)| **n < 0 || (exactly && **n > 0)).take(5).collect();
    problems
        .check(short.is_empty(), || format!("HTTP requests to {target}, server count minus intact count: {short:?}"));
}

/// Agent WARN/ERROR lines once it was ready: under load nothing should be one.
fn agent_warnings(agent: &Agent) -> Vec<Value> {
    let lines = agent.log.all();
    let ready = lines.iter().position(|e| e["event"] == "ready").unwrap_or_default();
    lines.into_iter().skip(ready).filter(|e| e["level"] == "WARN" || e["level"] == "ERROR").collect()
}

fn log_excerpt(agent: &Agent) -> String {
    let all = agent.log.all();
    let tail: Vec<String> =
        all.iter().rev().filter(|e| e["event"] != "connection").take(10).map(Value::to_string).collect();
    format!("agent log ({} lines), last non-connection lines:\n  {}", all.len(), tail.join("\n  "))
}

/// The agent's resident memory and open descriptors.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kib: u64,
    fds: usize,
}

fn usage(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Usage { rss_kib, fds })
}

/// Usage once the descriptor count is back to `fds` (bounded wait: the
/// agent closes a connection's sockets just after its log line).
fn settled_usage(pid: u32, fds: usize) -> Result<Usage> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = usage(pid)?;
        if now.fds == fds || Instant::now() > deadline {
            return Ok(now);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn soak_seconds() -> Result<f64> {
    match std::env::var("SE_SOAK_SECS") {
        Ok(text) => text.parse().with_context(|| format!("SE_SOAK_SECS={text:?} is not a number of seconds")),
        Err(_) => Ok(20.0),
    }
}

/// The soak's expectations for one run: what each client saw ("denied-..."
/// mix entries are denied, "abandon" hangs up mid-download, the rest
/// arrives intact), every connection logged once with that verdict,
/// exchanges' byte counts exact, no relay error but on abandoned ones.
/// Returns how many lines were logged out of their port's order (see [`Pairing`]).
fn check_soak_run(problems: &mut Problems, agent: &Agent, run: &Finished) -> usize {
    for conn in &run.conns {
        let expected = match conn.mix.as_str() {
            "denied-tcp" => conn.outcome == "cut" && conn.received == 0,
            "denied-web" => conn.outcome == "forbidden",
            "abandon" => conn.outcome == "abandoned",
            _ => conn.outcome == "intact",
        };
        problems.check(expected, || format!("client saw {conn}"));
    }
    let connected = run.conns.iter().filter(|c| c.local.is_some()).count();
    let lines = wait_logged(agent, run.pid, connected);
    let pairing = pair(&run.conns, &lines);
    problems
        .check(lines.len() == connected, || format!("{} connection lines for {connected} connections", lines.len()));
    for conn in pairing.unlogged.iter().take(3) {
        problems.check(false, || format!("not logged: {conn}"));
    }
    for line in pairing.unknown.iter().take(3) {
        problems.check(false, || format!("logged, but the client made no such connection: {line}"));
    }
    for &(conn, line) in &pairing.pairs {
        let verdict = if conn.mix.starts_with("denied-") { "denied" } else { "relayed" };
        problems.check(line["verdict"] == verdict && conn.matches_verdict(verdict), || {
            format!("expected {verdict}: {conn} logged {line}")
        });
        let abandoned = conn.outcome == "abandoned";
        problems.check(abandoned || line.get("error").is_none_or(Value::is_null), || format!("relay error: {line}"));
        if conn.is_exchange() && verdict == "relayed" {
            let header = format!("SEND {} RECV {}\n", conn.payload, conn.expect).len() as u64;
            let down = line["bytes_down"].as_u64().unwrap_or(u64::MAX);
            // An abandoned download: at least what the client read reached it.
            let down_ok = if abandoned { (conn.received..=conn.expect).contains(&down) } else { down == conn.expect };
            problems.check(line["bytes_up"] == header + conn.payload && down_ok, || {
                format!("byte counts of {conn}: {line}")
            });
        }
    }
    pairing.out_of_order
}

#[test]
fn soak_mixed_transfers_arrive_intact_are_logged_once_and_leave_no_leak() -> Result<()> {
    let seconds = soak_seconds()?;
    let setup = Setup::new("load-soak", None)?;
    let mix = json!([
        transfer("small", "exchange", setup.exchange_v4(), 34, (1, 16 * KIB), (1, 16 * KIB)),
        transfer("mapped", "exchange", setup.exchange_v4_mapped(), 6, (1, 16 * KIB), (1, 16 * KIB)),
        transfer("large", "exchange", setup.exchange_v6(), 6, (256 * KIB, 2 * MIB), (256 * KIB, 2 * MIB)),
        paced(transfer("slow", "exchange", setup.exchange_v4(), 2, (16 * KIB, 64 * KIB), (1, 64 * KIB)), (500, 1500)),
        abandon(transfer("abandon", "exchange", setup.exchange_v4(), 3, (1, 16 * KIB), (64 * KIB, MIB))),
        transfer("web", "http", setup.web(), 25, (0, 0), (0, 64 * KIB)),
        transfer("web-large", "http", setup.web(), 3, (0, 0), (256 * KIB, 2 * MIB)),
        transfer("denied-tcp", "exchange", setup.denied_exchange(), 15, (1, 64 * KIB), (1, 16 * KIB)),
        transfer("denied-web", "http", setup.denied_web(), 9, (0, 0), (1, 1024)),
    ]);
    let agent_pid = setup.agent.pid();
    let idle_fds = usage(agent_pid)?.fds;
    let started = Instant::now();

    // The baseline is taken after the same load has run for a while, so that
    // it includes what the agent rightly keeps after its first burst: tokio's
    // worker threads and their allocator arenas, lazily built state.
    let warm_up = setup.start_load("warm-up", WARM_UP_SECS, 1, mix.clone())?.finish()?;
    let mut problems = Problems::default();
    let mut out_of_order = check_soak_run(&mut problems, &setup.agent, &warm_up);
    let baseline = settled_usage(agent_pid, idle_fds)?;
    problems.check(baseline.fds == idle_fds, || {
        format!("agent fds: {idle_fds} before any load, {} after the warm-up", baseline.fds)
    });

    let soak = setup.start_load("soak", seconds, 2, mix)?.finish()?;
    out_of_order += check_soak_run(&mut problems, &setup.agent, &soak);

    let conns = || [&warm_up, &soak].into_iter().flat_map(|run| &run.conns);
    let intact_exchanges: Vec<&Conn> = conns().filter(|c| c.is_exchange() && c.outcome == "intact").collect();
    let abandoned: Vec<&Conn> = conns().filter(|c| c.outcome == "abandoned").collect();
    let events = wait_server_events(&setup.servers, "exchange", intact_exchanges.len());
    check_uploads(&mut problems, &events, &intact_exchanges, Some(&abandoned));
    let denied_peer = setup.denied_exchange_peer();
    let leaked: Vec<&Value> = events.iter().filter(|e| e["peer"] == denied_peer.as_str()).collect();
    problems.check(leaked.is_empty(), || {
        format!("{} denied exchanges reached the server: {:?}", leaked.len(), leaked.first())
    });
    let intact_web: Vec<&Conn> = conns().filter(|c| !c.is_exchange() && c.outcome == "intact").collect();
    check_http_served(&mut problems, &setup.servers, &setup.web(), &intact_web, true);
    let leaked_web = setup.servers.events.matching(|e| e["kind"] == "http" && e["host"] == setup.denied_web().as_str());
    problems.check(leaked_web.is_empty(), || {
        format!("{} denied HTTP requests reached the server: {:?}", leaked_web.len(), leaked_web.first())
    });

    // Only a server answering a client that hung up may fail, and only on the
    // connection closed under it (a write or its final shutdown).
    let server_errors = setup.servers.events.matching(|e| e["kind"] == "server_error");
    let closed_under_it = |e: &&Value| {
        e["error"].as_str().is_some_and(|error| {
            ["BrokenPipe", "ConnectionReset", "Transport endpoint is not connected"]
                .iter()
                .any(|kind| error.contains(kind))
        })
    };
    problems.check(server_errors.len() <= abandoned.len() && server_errors.iter().all(|e| closed_under_it(&e)), || {
        format!(
            "{} server errors for {} abandoned downloads, the first: {}",
            server_errors.len(),
            abandoned.len(),
            server_errors[0]
        )
    });

    let after = settled_usage(agent_pid, idle_fds)?;
    problems.check(after.fds == idle_fds, || {
        format!("agent fds: {idle_fds} before any load, {} after the soak", after.fds)
    });
    problems.check(after.rss_kib <= baseline.rss_kib + RSS_TOLERANCE_KIB, || {
        format!(
            "agent VmRSS: {} KiB at baseline, {} KiB after the soak (tolerance {RSS_TOLERANCE_KIB} KiB)",
            baseline.rss_kib, after.rss_kib
        )
    });
    // Attribution held under load: every connection the agent saw was one of the clients'.
    let strangers =
        setup.agent.log.matching(|e| e["event"] == "connection" && e["pid"] != warm_up.pid && e["pid"] != soak.pid);
    problems.check(strangers.is_empty(), || {
        format!("{} connection lines of other pids, the first: {}", strangers.len(), strangers[0])
    });
    let warnings = agent_warnings(&setup.agent);
    problems.check(warnings.is_empty(), || format!("{} agent warnings, the first: {}", warnings.len(), warnings[0]));

    let report = format!(
        "soak {seconds} s: {} | warm-up: {} | outcomes {} | server errors answering abandoned downloads {} | ports reused while the agent still had the previous connection, logged out of order {out_of_order} | agent fds {idle_fds} idle; after warm-up {baseline:?}, after the soak {after:?} | {:.1} s in all",
        soak.summary,
        warm_up.summary["connections"],
        tally(&soak.conns),
        server_errors.len(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("{report}");
    problems.verdict(&format!("{report}\n{}", log_excerpt(&setup.agent)))
}

/// The port-reuse test's sizes: the abandoned download and where its client
/// hangs up, then the small exchange from the same port.
const REUSE_ABANDONED: (u64, u64) = (1000, 4 * MIB);
const REUSE_HANG_UP_AT: u64 = 256 * KIB;
const REUSE_SMALL: (u64, u64) = (100, 1000);

/// A sandboxed client (argv: host, port, then the sizes above) that abandons
/// a download, resets (SO_LINGER 0: no TIME_WAIT, the port is free at once)
/// and right away, from a forked child (another pid, so another kernel
/// record), connects from the same local port to the same destination for a
/// small exchange. One JSON line per connection, the child's first: pid,
/// local address, CLOCK_MONOTONIC start (before connecting) and end (after
/// closing), bytes sent and received.
const PORT_REUSE_CLIENT: &str = r#"
import json, os, socket, struct, sys, time

host, port, send_a, recv_a, hang_up_at, send_b, recv_b = sys.argv[1], *map(int, sys.argv[2:8])

def exchange(role, local_port, send, recv, hang_up_at=None):
    record = {"role": role, "pid": os.getpid(), "payload": send, "expect": recv, "start_ns": time.monotonic_ns()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(20)
    sock.bind(("0.0.0.0", local_port))
    sock.connect((host, port))
    local = sock.getsockname()
    record["local"] = "%s:%d" % local
    sock.sendall(b"SEND %d RECV %d\n" % (send, recv) + b"u" * send)
    received = 0
    while hang_up_at is None or received < hang_up_at:
        data = sock.recv(65536)
        if not data:
            break
        received += len(data)
    record["received"] = received
    if hang_up_at is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    record["end_ns"] = time.monotonic_ns()
    return local[1], record

local_port, abandoned = exchange("abandoned", 0, send_a, recv_a, hang_up_at)
child = os.fork()
if child == 0:
    code = 1
    try:
        _, reused = exchange("reused", local_port, send_b, recv_b)
        print(json.dumps(reused), flush=True)
        code = 0
    finally:
        os._exit(code)
_, status = os.waitpid(child, 0)
print(json.dumps(abandoned), flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

#[test]
fn a_port_reused_at_once_after_an_abandoned_download_gets_its_own_record_and_log_line() -> Result<()> {
    let setup = Setup::new("load-port-reuse", None)?;
    let destination = setup.exchange_v4();
    let sizes = [REUSE_ABANDONED.0, REUSE_ABANDONED.1, REUSE_HANG_UP_AT, REUSE_SMALL.0, REUSE_SMALL.1];
    let mut command = setup.sandbox.command(PYTHON);
    command.args(["-c", PORT_REUSE_CLIENT, &setup.net.v4.to_string(), &EXCHANGE_PORT.to_string()]);
    command.args(sizes.map(|size| size.to_string()));
    // Bounded: every socket call of the client has a 20 s timeout.
    let output = command.output().context("run the port-reuse client")?;
    ensure!(
        output.status.success(),
        "port-reuse client failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let records: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("port-reuse client output")?;
    let [reused, abandoned] = records.as_slice() else { bail!("expected two records, got {records:?}") };
    ensure!(reused["role"] == "reused" && abandoned["role"] == "abandoned", "records {records:?}");
    let client = abandoned["local"].as_str().context("no local address")?.to_owned();
    ensure!(reused["local"] == client.as_str(), "the second connection did not reuse the port: {records:?}");
    ensure!(reused["pid"] != abandoned["pid"], "one pid for both connections: {records:?}");
    let received = |record: &Value| record["received"].as_u64().unwrap_or_default();
    ensure!(
        (REUSE_HANG_UP_AT..REUSE_ABANDONED.1).contains(&received(abandoned)),
        "the first connection was not abandoned mid-download: {abandoned}"
    );
    ensure!(received(reused) == REUSE_SMALL.1, "the small exchange did not arrive whole: {reused}");

    // The agent: two lines for that client address, each with its own
    // connection's pid, destination and byte counts.
    let lines = setup.agent.log.wait_for_count(&format!("two connection lines from {client}"), 2, |e| {
        e["event"] == "connection" && e["client"] == client.as_str()
    })?;
    ensure!(lines.len() == 2, "{} connection lines from {client}: {lines:?}", lines.len());
    let header = |(send, recv): (u64, u64)| format!("SEND {send} RECV {recv}\n").len() as u64 + send;
    let line_of = |record: &Value| -> Result<&Value> {
        let mine: Vec<&Value> = lines.iter().filter(|line| line["pid"] == record["pid"]).collect();
        ensure!(mine.len() == 1, "{} lines with the pid of {record}: {lines:?}", mine.len());
        let line = mine[0];
        ensure!(line["destination"] == destination.as_str() && line["verdict"] == "relayed", "{record}: {line}");
        let accepted = line["accepted_monotonic_ns"].as_u64().with_context(|| format!("no accept time: {line}"))?;
        ensure!(
            record["start_ns"].as_u64().is_some_and(|start| start < accepted)
                && record["end_ns"].as_u64().is_some_and(|end| accepted <= end),
            "accepted outside its client's connection: {record}, {line}"
        );
        Ok(line)
    };
    let (abandoned_line, reused_line) = (line_of(abandoned)?, line_of(reused)?);
    let down = |line: &Value| line["bytes_down"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        abandoned_line["bytes_up"] == header(REUSE_ABANDONED)
            && (received(abandoned)..=REUSE_ABANDONED.1).contains(&down(abandoned_line)),
        "byte counts of the abandoned download ({abandoned}): {abandoned_line}"
    );
    ensure!(
        reused_line["bytes_up"] == header(REUSE_SMALL)
            && down(reused_line) == REUSE_SMALL.1
            && reused_line.get("error").is_none_or(Value::is_null),
        "byte counts of the exchange from the reused port ({reused}): {reused_line}"
    );

    // The soak's pairing, on the client's records alone, gives each line to its own connection.
    let conn = |record: &Value| Conn {
        mix: record["role"].as_str().unwrap_or_default().to_owned(),
        kind: "exchange".into(),
        target: destination.clone(),
        local: Some(client.clone()),
        start_ns: record["start_ns"].as_u64().unwrap_or_default(),
        end_ns: record["end_ns"].as_u64().unwrap_or_default(),
        payload: record["payload"].as_u64().unwrap_or_default(),
        sent: record["payload"].as_u64().unwrap_or_default(),
        sent_sha256: String::new(),
        expect: record["expect"].as_u64().unwrap_or_default(),
        received: received(record),
        outcome: record["role"].as_str().unwrap_or_default().to_owned(),
        error: None,
    };
    let conns = [conn(abandoned), conn(reused)];
    let pairing = pair(&conns, &lines);
    ensure!(pairing.unlogged.is_empty() && pairing.unknown.is_empty(), "pairing left some out: {lines:?}");
    for (conn, line) in &pairing.pairs {
        let record = if conn.mix == "abandoned" { abandoned } else { reused };
        ensure!(line["pid"] == record["pid"], "paired {conn} with {line}");
    }

    // What happened on the agent's side, reported (timings are not asserted).
    let number = |value: &Value| value.as_u64().unwrap_or_default() as f64;
    let abandoned_closed_ms =
        (number(&abandoned_line["accepted_monotonic_ns"]) - number(&reused_line["accepted_monotonic_ns"])) / 1e6
            + abandoned_line["duration_ms"].as_f64().unwrap_or_default();
    eprintln!(
        "port reuse from {client}: reconnected {:.3} ms after the reset; agent logged the {} connection first; \
         the reused port's connection was accepted {abandoned_closed_ms:.1} ms before the agent closed the abandoned one \
         | abandoned: client read {}, agent sent {} | reused: {}",
        (number(&reused["start_ns"]) - number(&abandoned["end_ns"])) / 1e6,
        lines[0]["pid"].as_u64().map_or("?", |pid| if abandoned["pid"] == pid { "abandoned" } else { "reused" }),
        received(abandoned),
        down(abandoned_line),
        reused_line,
    );
    Ok(())
}

/// A free port below the ephemeral range for the agent. While the agent is
/// down, sandboxed connects go to this port with nobody listening; were it
/// an ephemeral port, one of them could pick it as its own local port and
/// connect to itself (TCP simultaneous open).
fn port_below_ephemeral_range() -> Result<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let low: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).context("ip_local_port_range")?;
    let span = 8000.min(low.saturating_sub(1024));
    ensure!(span > 0, "the ephemeral range starts at {low}: no room below it");
    let offset = (std::process::id() % u32::from(span)) as u16;
    let free = |port: u16| {
        TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("::1", port)).is_ok()
    };
    (0..span)
        .map(|i| low - span + (offset + i) % span)
        .find(|&port| free(port))
        .context("no free port below the ephemeral range")
}

#[test]
fn sigkill_under_load_cuts_in_flight_transfers_fails_closed_and_a_restart_resumes() -> Result<()> {
    let port = port_below_ephemeral_range()?;
    let mut setup = Setup::new("load-kill", Some(port))?;
    let idle_fds = usage(setup.agent.pid())?.fds;
    let started = Instant::now();
    let mix = json!([
        transfer("small", "exchange", setup.exchange_v4(), 4, (1, 16 * KIB), (1, 16 * KIB)),
        transfer("large", "exchange", setup.exchange_v6(), 2, (256 * KIB, 2 * MIB), (256 * KIB, 2 * MIB)),
        // Uploads lasting 3 to 6 s on threads of their own: 8 are under way when the agent dies.
        dedicated(
            paced(
                transfer("slow", "exchange", setup.exchange_v4(), 0, (64 * KIB, 256 * KIB), (1, 64 * KIB)),
                (3000, 6000)
            ),
            8
        ),
        transfer("web", "http", setup.web(), 2, (0, 0), (0, 256 * KIB)),
    ]);
    let load = setup.start_load("kill", 10.0, 3, mix)?;
    thread::sleep(Duration::from_millis(2500));
    let killed_at = monotonic_ns();
    setup.agent.kill();
    let dead_at = monotonic_ns();
    thread::sleep(Duration::from_millis(1500));
    let restarted_at = monotonic_ns();
    let second = Agent::start_on_port(&setup.sandbox, &setup.policy, port, &[])?;
    second.log.wait_for("links replaced", |e| e["replaced"].as_u64().is_some_and(|n| n > 0))?;
    let resumed_at = monotonic_ns();
    // Dropping the dead agent would detach the cgroup: keep it to the end.
    let first = std::mem::replace(&mut setup.agent, second);
    let run = load.finish()?;

    let mut problems = Problems::default();
    for conn in &run.conns {
        let ok = match conn.outcome.as_str() {
            "intact" => true,
            // Cut by the kill: under way when the agent was killed.
            "cut" => conn.start_ns < dead_at && conn.end_ns >= killed_at,
            // Refused while no agent listened.
            "refused" => conn.end_ns >= killed_at && conn.start_ns <= resumed_at,
            _ => false,
        };
        problems.check(ok, || format!("client saw {conn}"));
    }
    // Fail closed: a connect that went direct would succeed; refused, it met
    // the pinned redirect to a port nobody listens on.
    let dead_window: Vec<&Conn> =
        run.conns.iter().filter(|c| c.start_ns >= dead_at && c.end_ns <= restarted_at).collect();
    problems.check(!dead_window.is_empty(), || "no connect was tried while the agent was dead".into());
    for conn in dead_window.iter().filter(|c| c.outcome != "refused") {
        problems.check(false, || format!("connect with the agent dead was not refused: {conn}"));
    }
    let cut_by_kill = run.conns.iter().filter(|c| c.outcome == "cut").count();
    problems.check(cut_by_kill > 0, || "no transfer was in flight when the agent was killed".into());
    let after_restart: Vec<&Conn> = run.conns.iter().filter(|c| c.start_ns >= resumed_at).collect();
    problems.check(!after_restart.is_empty(), || "no connection after the restart".into());

    // The restarted agent logged every connection made after the kill that
    // got through, as relayed; the first agent only connections made before.
    let after_kill: Vec<&Conn> = run.conns.iter().filter(|c| c.start_ns >= dead_at).collect();
    let second_lines = wait_logged(&setup.agent, run.pid, after_kill.iter().filter(|c| c.local.is_some()).count());
    let pairing = pair(after_kill.iter().copied(), &second_lines);
    for conn in pairing.unlogged.iter().take(3) {
        problems.check(false, || format!("not logged by the restarted agent: {conn}"));
    }
    for line in pairing.unknown.iter().take(3) {
        problems.check(false, || {
            format!("restarted agent logged a connection the client did not make after the kill: {line}")
        });
    }
    for (conn, line) in &pairing.pairs {
        problems.check(line["verdict"] == "relayed" && conn.outcome == "intact", || {
            format!("after restart: {conn} logged {line}")
        });
    }
    let first_lines = first.log.matching(|e| e["event"] == "connection" && e["pid"] == run.pid);
    let before_kill = run.conns.iter().filter(|c| c.start_ns < killed_at);
    let first_pairing = pair(before_kill, &first_lines);
    for line in first_pairing.unknown.iter().take(3) {
        problems.check(false, || {
            format!("first agent logged a connection the client did not make before the kill: {line}")
        });
    }
    for (conn, line) in &first_pairing.pairs {
        problems.check(line["verdict"] == "relayed" && conn.outcome == "intact", || {
            format!("before the kill: {conn} logged {line}")
        });
    }

    // Whatever completed reached the server whole, through an agent.
    let intact_exchanges: Vec<&Conn> = run.conns.iter().filter(|c| c.is_exchange() && c.outcome == "intact").collect();
    let events = wait_server_events(&setup.servers, "exchange", intact_exchanges.len());
    check_uploads(&mut problems, &events, &intact_exchanges, None);
    let intact_web: Vec<&Conn> = run.conns.iter().filter(|c| !c.is_exchange() && c.outcome == "intact").collect();
    check_http_served(&mut problems, &setup.servers, &setup.web(), &intact_web, false);

    // The restarted agent, same configuration, back to what the first one held idle.
    let after = settled_usage(setup.agent.pid(), idle_fds)?;
    problems.check(after.fds == idle_fds, || {
        format!("agent fds: {idle_fds} for the first agent idle, {} for the restarted one after the load", after.fds)
    });

    let report = format!(
        "kill under load: {} | outcomes {} | cut by the kill {cut_by_kill} ({} server-side errors), refused while dead {}, after restart {} ({} logged by it) | restarted agent after the load {after:?} | {:.1} s in all",
        run.summary,
        tally(&run.conns),
        setup.servers.events.matching(|e| e["kind"] == "server_error").len(),
        dead_window.len(),
        after_restart.len(),
        pairing.pairs.len(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("{report}");
    problems.verdict(&format!("{report}\n{}", log_excerpt(&setup.agent)))
}

#[test]
fn policy_reload_under_load_decides_new_connections_by_the_new_generation_and_spares_in_flight_ones() -> Result<()> {
    let setup = Setup::new("load-reload", None)?;
    let idle_fds = usage(setup.agent.pid())?.fds;
    let started = Instant::now();
    // The IPv4 exchange server is allowed in generations 1 and 3, denied in 2.
    let flipped = setup.exchange_v4();
    let mix = json!([
        transfer("flip", "exchange", flipped.clone(), 6, (1, 16 * KIB), (1, 16 * KIB)),
        // Uploads lasting 3 to 6 s on threads of their own: 8 are under way at each reload.
        dedicated(
            paced(
                transfer("flip-slow", "exchange", flipped.clone(), 0, (64 * KIB, 256 * KIB), (1, 64 * KIB)),
                (3000, 6000)
            ),
            8
        ),
        transfer("steady", "exchange", setup.exchange_v6(), 2, (64 * KIB, MIB), (64 * KIB, MIB)),
        transfer("steady-web", "http", setup.web(), 3, (0, 0), (0, 64 * KIB)),
    ]);
    let load = setup.start_load("reload", 10.0, 4, mix)?;
    thread::sleep(Duration::from_millis(2500));
    // Rewrites the policy; returns when it was written and when the agent had
    // logged the reload, then lets the load run under it.
    let reload = |generation: u64, v4_exchange: bool| -> Result<(u64, u64)> {
        let written_at = monotonic_ns();
        setup.policy.write(&policy(&setup.net, v4_exchange))?;
        setup.agent.log.wait_for(&format!("reload to generation {generation}"), |e| {
            e["event"] == "policy_reloaded" && e["generation"] == generation
        })?;
        let seen_at = monotonic_ns();
        thread::sleep(Duration::from_millis(2500));
        Ok((written_at, seen_at))
    };
    let (written_2, seen_2) = reload(2, false)?;
    let (written_3, seen_3) = reload(3, true)?;
    let run = load.finish()?;

    // The only generation that can have decided a connection, by when it started and ended.
    let generation_by_time = |conn: &Conn| {
        if conn.end_ns < written_2 {
            Some(1)
        } else if conn.start_ns > seen_2 && conn.end_ns < written_3 {
            Some(2)
        } else if conn.start_ns > seen_3 {
            Some(3)
        } else {
            None
        }
    };
    let mut problems = Problems::default();
    let connected = run.conns.iter().filter(|c| c.local.is_some()).count();
    let lines = wait_logged(&setup.agent, run.pid, connected);
    let pairing = pair(&run.conns, &lines);
    problems.check(pairing.unlogged.is_empty() && pairing.unknown.is_empty() && connected == run.conns.len(), || {
        format!(
            "{} connections, {connected} connected, {} unlogged (first {}), {} unknown lines",
            run.conns.len(),
            pairing.unlogged.len(),
            pairing.unlogged.first().map(|c| c.to_string()).unwrap_or_default(),
            pairing.unknown.len()
        )
    });
    let mut per_generation = [0u64; 4];
    let mut spanning_intact = 0;
    for (conn, line) in &pairing.pairs {
        let generation = line["policy_generation"].as_u64().unwrap_or_default();
        let verdict = if conn.target == flipped && generation == 2 { "denied" } else { "relayed" };
        problems.check(line["verdict"] == verdict && conn.matches_verdict(verdict), || {
            format!("generation {generation} expects {verdict}: {conn} logged {line}")
        });
        problems.check(generation_by_time(conn).is_none_or(|g| g == generation), || {
            format!("decided by generation {generation}, expected {:?}: {conn}", generation_by_time(conn))
        });
        problems.check(line.get("error").is_none_or(Value::is_null), || format!("relay error: {line}"));
        if let Some(count) = per_generation.get_mut(generation as usize) {
            *count += 1;
        }
        // Allowed by generation 1, still relaying when generation 2 (which denies it) was in force.
        if conn.target == flipped
            && generation == 1
            && conn.start_ns < written_2
            && conn.end_ns > seen_2
            && conn.outcome == "intact"
        {
            spanning_intact += 1;
        }
    }
    problems.check(per_generation[1..].iter().all(|&n| n > 0), || {
        format!("connections per generation 1..3: {:?}", &per_generation[1..])
    });
    problems.check(spanning_intact > 0, || "no allowed transfer was in flight across the reload that denied it".into());

    // Denied connections never reached the server; allowed ones arrived whole.
    let intact_exchanges: Vec<&Conn> = run.conns.iter().filter(|c| c.is_exchange() && c.outcome == "intact").collect();
    let events = wait_server_events(&setup.servers, "exchange", intact_exchanges.len());
    check_uploads(&mut problems, &events, &intact_exchanges, Some(&[]));
    let intact_web: Vec<&Conn> = run.conns.iter().filter(|c| !c.is_exchange() && c.outcome == "intact").collect();
    check_http_served(&mut problems, &setup.servers, &setup.web(), &intact_web, true);
    let server_errors = setup.servers.events.matching(|e| e["kind"] == "server_error");
    problems.check(server_errors.is_empty(), || {
        format!("{} server errors, the first: {}", server_errors.len(), server_errors[0])
    });
    let warnings = agent_warnings(&setup.agent);
    problems.check(warnings.is_empty(), || format!("{} agent warnings, the first: {}", warnings.len(), warnings[0]));

    let after = settled_usage(setup.agent.pid(), idle_fds)?;
    problems.check(after.fds == idle_fds, || {
        format!("agent fds: {idle_fds} idle, {} after the load and reloads", after.fds)
    });

    let report = format!(
        "reload under load: {} | outcomes {} | per generation 1..3 {:?} | allowed and intact across the denying reload {spanning_intact} | agent fds {idle_fds} idle, after {after:?} | {:.1} s in all",
        run.summary,
        tally(&run.conns),
        &per_generation[1..],
        started.elapsed().as_secs_f64()
    );
    eprintln!("{report}");
    problems.verdict(&format!("{report}\n{}", log_excerpt(&setup.agent)))
}
