//! Load client for end-to-end tests, run inside the sandbox cgroup: a fixed
//! number of threads make connections back to back until a deadline, each
//! one a seeded pseudo-random pick from a weighted mix of transfers to the
//! test servers (tests/support/servers.py), and check every byte either way.
//!
//! `load-client PLAN RECORDS`, PLAN being JSON:
//!
//! ```json
//! {"seed": 7, "threads": 64, "seconds": 20,
//!  "mix": [{"name": "small", "kind": "exchange", "target": "198.18.1.2:9000",
//!           "weight": 4, "send": [1, 16384], "recv": [1, 16384]},
//!          {"name": "web", "kind": "http", "target": "10.231.1.2:8080", "weight": 2, "recv": [0, 65536]},
//!          {"name": "slow", "kind": "exchange", "target": "198.18.1.2:9000", "threads": 8,
//!           "send": [65536, 65536], "recv": [1, 1024], "pace_ms": [3000, 6000]}]}
//! ```
//!
//! An entry with `threads` has that many threads to itself; the other
//! threads pick among the entries with a `weight`. Sizes and paces are drawn
//! from inclusive ranges.
//!
//! `exchange`: sends "SEND n RECV m\n" and n seeded pseudo-random bytes
//! (unique to the connection, so the server's sha256 of what it received
//! names the connection), spread over the pace if there is one, then reads the m
//! pattern bytes the server answers; with `"abandon": true` it closes after
//! half of them (a client hanging up mid-download). `http`: `GET /bytes/N`
//! with `Connection: close`.
//!
//! Each connection appends one JSON line to RECORDS: its local address (the
//! agent logs it as `client`), CLOCK_MONOTONIC times, what was sent (with its
//! sha256) and received, and an outcome: `intact` (every expected byte and
//! nothing else), `refused` (the connect was refused), `forbidden` (the
//! agent's 403 policy denial), `cut` (EOF or a reset before the whole answer,
//! what did arrive being right; `received` says how much), `abandoned` (the
//! client closed as planned, what it read being right), `corrupt` (a wrong
//! or extra byte, or a malformed answer), `timeout`, `error`. A summary line
//! goes to stdout.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufWriter, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use e2e::monotonic_ns;
use ring::digest::{digest, Context as Sha256, SHA256};
use serde_json::{json, Value};

/// Bounds for one connection: a stalled peer fails it instead of hanging the run.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);
/// After a refused connect (no agent listening), so a dead agent is not hammered.
const REFUSED_BACKOFF: Duration = Duration::from_millis(20);
const MAX_HTTP_HEAD: usize = 16 * 1024;
const PACE_STEPS: u64 = 16;

struct Mix {
    name: String,
    kind: Kind,
    target: SocketAddr,
    /// Threads of its own (0: picked by weight among the shared entries).
    threads: u64,
    weight: u64,
    send: (u64, u64),
    recv: (u64, u64),
    /// Milliseconds an upload is spread over.
    pace_ms: (u64, u64),
    abandon: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Exchange,
    Http,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    ensure!(args.len() == 3, "usage: load-client PLAN RECORDS");
    let plan: Value = serde_json::from_str(&args[1]).context("plan is not JSON")?;
    let seed = plan["seed"].as_u64().context("plan.seed")?;
    let threads = plan["threads"].as_u64().context("plan.threads")?;
    let seconds = plan["seconds"].as_f64().context("plan.seconds")?;
    let mix = parse_mix(&plan["mix"])?;
    let records = Mutex::new(BufWriter::new(File::create(&args[2]).context("create records file")?));
    // The server's answer pattern: sha256("sandbox-egress") repeated.
    let pattern: [u8; 32] = digest(&SHA256, b"sandbox-egress").as_ref().try_into()?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut summary = Summary::default();
    let dedicated: Vec<&Mix> = mix.iter().flat_map(|m| std::iter::repeat_n(m, m.threads as usize)).collect();
    let shared: Vec<&Mix> = mix.iter().filter(|m| m.threads == 0).collect();
    ensure!(dedicated.len() as u64 <= threads, "more dedicated threads than threads");
    ensure!(
        dedicated.len() as u64 == threads || shared.iter().any(|m| m.weight > 0),
        "threads left without a weighted entry"
    );
    thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|thread_index| {
                let entries = match dedicated.get(thread_index as usize) {
                    Some(&entry) => vec![entry],
                    None => shared.clone(),
                };
                let (pattern, records) = (&pattern, &records);
                scope.spawn(move || worker(seed, thread_index, deadline, &entries, pattern, records))
            })
            .collect();
        for worker in workers {
            summary.add(&worker.join().expect("worker panicked")?);
        }
        Ok(())
    })?;
    records.lock().unwrap().flush()?;
    println!(
        "{}",
        json!({
            "connections": summary.connections,
            "outcomes": summary.outcomes,
            "bytes_sent": summary.bytes_sent,
            "bytes_received": summary.bytes_received,
            "elapsed_s": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

fn parse_mix(mix: &Value) -> Result<Vec<Mix>> {
    let range = |entry: &Value, key: &str| -> Result<(u64, u64)> {
        match entry.get(key) {
            None => Ok((0, 0)),
            Some(range) => Ok((range[0].as_u64().context("range start")?, range[1].as_u64().context("range end")?)),
        }
    };
    let parsed = mix
        .as_array()
        .context("plan.mix")?
        .iter()
        .map(|entry| {
            Ok(Mix {
                name: entry["name"].as_str().context("mix name")?.to_owned(),
                kind: match entry["kind"].as_str() {
                    Some("exchange") => Kind::Exchange,
                    Some("http") => Kind::Http,
                    other => anyhow::bail!("unknown kind {other:?}"),
                },
                target: entry["target"].as_str().context("mix target")?.parse().context("mix target")?,
                threads: entry.get("threads").and_then(Value::as_u64).unwrap_or(0),
                weight: entry.get("weight").and_then(Value::as_u64).unwrap_or(0),
                send: range(entry, "send")?,
                recv: range(entry, "recv")?,
                pace_ms: range(entry, "pace_ms")?,
                abandon: entry.get("abandon").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(parsed)
}

#[derive(Default)]
struct Summary {
    connections: u64,
    outcomes: BTreeMap<&'static str, u64>,
    bytes_sent: u64,
    bytes_received: u64,
}

impl Summary {
    fn add(&mut self, other: &Summary) {
        self.connections += other.connections;
        for (outcome, count) in &other.outcomes {
            *self.outcomes.entry(outcome).or_default() += count;
        }
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
    }
}

/// One thread's connections, each from `entries` (by weight, unless there is just one).
fn worker(
    seed: u64,
    thread_index: u64,
    deadline: Instant,
    entries: &[&Mix],
    pattern: &[u8; 32],
    records: &Mutex<BufWriter<File>>,
) -> Result<Summary> {
    // Mixed, not just offset: threads seeded `seed + k` would walk shifted copies of one sequence.
    let mut rng = Rng::new(mix64(seed ^ mix64(thread_index + 1)));
    let total_weight: u64 = entries.iter().map(|m| m.weight).sum();
    let mut summary = Summary::default();
    while Instant::now() < deadline {
        let chosen = match entries {
            [only] => only,
            _ => {
                let mut pick = rng.below(total_weight);
                entries
                    .iter()
                    .find(|m| {
                        if pick < m.weight {
                            true
                        } else {
                            pick -= m.weight;
                            false
                        }
                    })
                    .expect("pick < total weight")
            }
        };
        let send = rng.between(chosen.send);
        let recv = rng.between(chosen.recv);
        let pace = Duration::from_millis(rng.between(chosen.pace_ms));
        let payload_seed = rng.next();
        let mut record = Record::new(chosen, send, recv);
        match chosen.kind {
            Kind::Exchange => exchange(&mut record, chosen, pace, payload_seed, pattern),
            Kind::Http => http_get(&mut record, chosen, pattern),
        }
        record.end_ns = monotonic_ns();
        summary.connections += 1;
        *summary.outcomes.entry(record.outcome).or_default() += 1;
        summary.bytes_sent += record.sent;
        summary.bytes_received += record.received;
        writeln!(records.lock().unwrap(), "{}", record.to_json())?;
        if record.outcome == "refused" {
            thread::sleep(REFUSED_BACKOFF);
        }
    }
    Ok(summary)
}

struct Record {
    mix: String,
    kind: Kind,
    target: SocketAddr,
    local: Option<SocketAddr>,
    start_ns: u64,
    end_ns: u64,
    /// An exchange's payload as planned, and the bytes written: the payload
    /// (its header not included) or an HTTP request.
    payload: u64,
    sent: u64,
    sent_sha256: String,
    /// Answer bytes expected (an HTTP body's size) and received.
    expect: u64,
    received: u64,
    outcome: &'static str,
    error: Option<String>,
}

impl Record {
    fn new(mix: &Mix, payload: u64, expect: u64) -> Self {
        Self {
            mix: mix.name.clone(),
            kind: mix.kind,
            target: mix.target,
            local: None,
            start_ns: monotonic_ns(),
            end_ns: 0,
            payload,
            sent: 0,
            sent_sha256: String::new(),
            expect,
            received: 0,
            outcome: "error",
            error: None,
        }
    }

    fn fail(&mut self, outcome: &'static str, error: impl ToString) {
        self.outcome = outcome;
        self.error = Some(error.to_string());
    }

    fn to_json(&self) -> Value {
        json!({
            "mix": self.mix,
            "kind": if self.kind == Kind::Http { "http" } else { "exchange" },
            "target": self.target.to_string(), "local": self.local.map(|a| a.to_string()),
            "start_ns": self.start_ns, "end_ns": self.end_ns,
            "payload": self.payload, "sent": self.sent, "sent_sha256": self.sent_sha256,
            "expect": self.expect, "received": self.received,
            "outcome": self.outcome, "error": self.error,
        })
    }
}

fn connect(record: &mut Record) -> Option<TcpStream> {
    match TcpStream::connect_timeout(&record.target, CONNECT_TIMEOUT) {
        Ok(stream) => {
            record.local = stream.local_addr().ok();
            let timeouts =
                stream.set_read_timeout(Some(SOCKET_TIMEOUT)).and(stream.set_write_timeout(Some(SOCKET_TIMEOUT)));
            if let Err(error) = timeouts {
                record.fail("error", error);
                return None;
            }
            Some(stream)
        }
        Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
            record.fail("refused", error);
            None
        }
        Err(error) => {
            record.fail("error", format!("connect: {error}"));
            None
        }
    }
}

fn exchange(record: &mut Record, mix: &Mix, pace: Duration, payload_seed: u64, pattern: &[u8; 32]) {
    let Some(mut stream) = connect(record) else { return };
    let deadline = Instant::now() + CONNECTION_DEADLINE;
    if let Err(error) = send_payload(&mut stream, record, pace, payload_seed) {
        return record.fail(io_outcome(&error), format!("send after {} payload bytes: {error}", record.sent));
    }
    let hang_up_at = mix.abandon.then_some(record.expect / 2);
    receive_answer(&mut stream, record, pattern, &[], hang_up_at, deadline);
}

/// The header, then the payload (a pseudo-random stream from `seed`),
/// spread over `pace` in equal steps if it is non-zero.
fn send_payload(stream: &mut TcpStream, record: &mut Record, pace: Duration, seed: u64) -> io::Result<()> {
    stream.write_all(format!("SEND {} RECV {}\n", record.payload, record.expect).as_bytes())?;
    let mut rng = Rng::new(seed);
    let mut sha = Sha256::new(&SHA256);
    let step = if pace.is_zero() { 64 * 1024 } else { record.payload.div_ceil(PACE_STEPS).max(1) };
    let mut chunk = Vec::with_capacity(step as usize);
    let mut result = Ok(());
    while record.sent < record.payload {
        chunk.clear();
        let len = step.min(record.payload - record.sent) as usize;
        while chunk.len() < len {
            chunk.extend_from_slice(&rng.next().to_le_bytes()[..(len - chunk.len()).min(8)]);
        }
        if let Err(error) = stream.write_all(&chunk) {
            result = Err(error);
            break;
        }
        sha.update(&chunk);
        record.sent += len as u64;
        if !pace.is_zero() {
            thread::sleep(pace / PACE_STEPS as u32);
        }
    }
    record.sent_sha256 = hex(sha.finish().as_ref());
    result
}

fn http_get(record: &mut Record, mix: &Mix, pattern: &[u8; 32]) {
    let Some(mut stream) = connect(record) else { return };
    let deadline = Instant::now() + CONNECTION_DEADLINE;
    let request = format!(
        "GET /bytes/{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: load-client\r\nConnection: close\r\n\r\n",
        record.expect, mix.target
    );
    if let Err(error) = stream.write_all(request.as_bytes()) {
        return record.fail(io_outcome(&error), format!("send request: {error}"));
    }
    record.sent = request.len() as u64;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut answer = Vec::new();
    let head_end = loop {
        if let Some(end) = find(&answer, b"\r\n\r\n") {
            break end;
        }
        if answer.len() > MAX_HTTP_HEAD {
            return record.fail("corrupt", "response head too long");
        }
        match read_some(&mut stream, &mut buffer, deadline) {
            Ok(0) => return record.fail("cut", format!("EOF after {} bytes of the response head", answer.len())),
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(error) => {
                return record.fail(io_outcome(&error), format!("recv head after {} bytes: {error}", answer.len()))
            }
        }
    };
    let body_start = answer.split_off(head_end + 4);
    let head = String::from_utf8_lossy(&answer).into_owned();
    match parse_status(&head) {
        Some(200) => {}
        Some(403) => {
            // The agent's refusal: a short JSON body, then it closes.
            let mut body = body_start;
            while body.len() < MAX_HTTP_HEAD {
                match read_some(&mut stream, &mut buffer, deadline) {
                    Ok(0) => break,
                    Ok(n) => body.extend_from_slice(&buffer[..n]),
                    Err(error) => return record.fail(io_outcome(&error), format!("recv 403 body: {error}")),
                }
            }
            let body = String::from_utf8_lossy(&body);
            if body.contains("\"error\":\"policy_denied\"") {
                record.outcome = "forbidden";
            } else {
                record.fail("error", format!("403 without policy_denied: {body}"));
            }
            return;
        }
        _ => return record.fail("error", format!("unexpected response: {head}")),
    }
    match content_length(&head) {
        Some(length) if length == record.expect => {}
        _ => return record.fail("corrupt", format!("asked {} bytes, got head {head:?}", record.expect)),
    }
    receive_answer(&mut stream, record, pattern, &body_start, None, deadline);
}

/// Reads the answer to EOF, `arrived` being its start, checking it against
/// the pattern as it comes; with `hang_up_at`, closes once that much arrived.
fn receive_answer(
    stream: &mut TcpStream,
    record: &mut Record,
    pattern: &[u8; 32],
    arrived: &[u8],
    hang_up_at: Option<u64>,
    deadline: Instant,
) {
    let mut checker = PatternCheck::new(pattern, record.expect);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut pending = Some(arrived);
    loop {
        let data = match pending.take() {
            Some(arrived) => arrived,
            None => match read_some(stream, &mut buffer, deadline) {
                Ok(0) => break,
                Ok(n) => &buffer[..n],
                Err(error) => {
                    return record
                        .fail(io_outcome(&error), format!("recv after {} answer bytes: {error}", record.received))
                }
            },
        };
        record.received += data.len() as u64;
        if let Err(mismatch) = checker.feed(data) {
            return record.fail("corrupt", mismatch);
        }
        if hang_up_at.is_some_and(|at| record.received >= at) {
            // Closed with the rest unread (the kernel resets the connection if some already arrived).
            record.outcome = "abandoned";
            return;
        }
    }
    if record.received == record.expect {
        record.outcome = "intact";
    } else {
        record.fail("cut", format!("EOF after {} of {} answer bytes", record.received, record.expect));
    }
}

/// One read, bounded by the socket timeout and the connection's deadline.
fn read_some(stream: &mut TcpStream, buffer: &mut [u8], deadline: Instant) -> io::Result<usize> {
    loop {
        if Instant::now() > deadline {
            return Err(io::Error::new(ErrorKind::TimedOut, "connection deadline passed"));
        }
        match stream.read(buffer) {
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

fn parse_status(head: &str) -> Option<u16> {
    head.strip_prefix("HTTP/1.")?.split_whitespace().nth(1)?.parse().ok()
}

fn content_length(head: &str) -> Option<u64> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// How a failed socket call ended the connection.
fn io_outcome(error: &io::Error) -> &'static str {
    match error.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout",
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => "cut",
        _ => "error",
    }
}

/// Checks a stream against the server's repeating 32-byte pattern.
struct PatternCheck<'a> {
    pattern: &'a [u8; 32],
    limit: u64,
    offset: u64,
}

impl<'a> PatternCheck<'a> {
    fn new(pattern: &'a [u8; 32], limit: u64) -> Self {
        Self { pattern, limit, offset: 0 }
    }

    fn feed(&mut self, data: &[u8]) -> std::result::Result<(), String> {
        if self.offset + data.len() as u64 > self.limit {
            return Err(format!(
                "{} bytes past the {} expected",
                self.offset + data.len() as u64 - self.limit,
                self.limit
            ));
        }
        for (i, &byte) in data.iter().enumerate() {
            let at = self.offset + i as u64;
            if byte != self.pattern[(at % 32) as usize] {
                return Err(format!("wrong byte at offset {at}"));
            }
        }
        self.offset += data.len() as u64;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// splitmix64: deterministic from its seed, fast enough to fill payloads.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn between(&mut self, (low, high): (u64, u64)) -> u64 {
        low + self.below(high - low + 1)
    }
}

/// splitmix64's finalizer: a bijection that scatters nearby inputs.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
