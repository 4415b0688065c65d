//! The processes the bench starts and measures: `bench-peer` clients and
//! servers, and the agent.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use e2e::{PolicyFile, Sandbox};
use serde_json::Value;

use super::interrupt;

/// How long the agent may take to log a connection after it closed.
const LOG_LAG: Duration = Duration::from_secs(5);

/// A `bench-peer` process whose stdout lines arrive on a channel; killed on drop.
pub struct Client {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Its whole stderr, once it has exited.
    stderr: Option<thread::JoinHandle<String>>,
}

impl Client {
    pub fn spawn(mut command: Command, what: String) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {what}"))?;
        let (sender, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut pipe = child.stderr.take().expect("piped");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Ok(Self { what, stdin: child.stdin.take(), child, lines, stderr: Some(stderr) })
    }

    /// The next stdout line, as JSON; fails if the process ends first or it takes longer than `timeout`.
    pub fn next_json(&mut self, timeout: Duration) -> Result<Value> {
        let line = self.next_line(|_| true, timeout)?;
        serde_json::from_str(&line).with_context(|| format!("{}: not JSON: {line}", self.what))
    }

    /// The first stdout line that starts with `{`, as JSON: a program with
    /// a report of its own (wrk) prints its figures so among other lines.
    pub fn json_among_lines(&mut self, timeout: Duration) -> Result<Value> {
        let line = self.next_line(|line| line.starts_with('{'), timeout)?;
        serde_json::from_str(&line).with_context(|| format!("{}: not JSON: {line}", self.what))
    }

    fn next_line(&mut self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            interrupt::check()?;
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if wanted(&line) => return Ok(line),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{} gave no result within {timeout:?}", self.what)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.wait(Duration::from_secs(5))?;
                    let stderr = self.stderr();
                    bail!("{} exited ({status}) without a result: {}", self.what, stderr.trim());
                }
            }
        }
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for a successful exit.
    pub fn finish(&mut self, timeout: Duration) -> Result<()> {
        let status = self.wait(timeout)?;
        if !status.success() {
            let stderr = self.stderr();
            bail!("{} failed ({status}): {}", self.what, stderr.trim());
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            interrupt::check()?;
            ensure!(Instant::now() < deadline, "{} still running after {timeout:?}", self.what);
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Call only after the process exited: the reader ends at its EOF.
    fn stderr(&mut self) -> String {
        self.stderr.take().and_then(|reader| reader.join().ok()).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The agent with its JSON log in a file, not a pipe: a log reader in this
/// (debug-built) process must not slow down or block the agent being measured.
pub struct AgentProcess {
    child: Child,
    pub port: u16,
    cgroup: String,
    log: PathBuf,
    /// Relayed connections counted in the log up to `log_offset`.
    relayed: usize,
    log_offset: u64,
}

impl AgentProcess {
    pub fn start(bin: &Path, sandbox: &Sandbox, policy: &PolicyFile, extra_args: &[&str], log: &Path) -> Result<Self> {
        let child = Command::new(bin)
            .args(["--log-format", "json", "run", "--cgroup", sandbox.path_str(), "--listen-port", "0", "--policy"])
            .arg(&policy.path)
            .arg("--control-socket")
            .arg(log.with_extension("sock"))
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut agent = Self {
            child,
            port: 0,
            cgroup: sandbox.path_str().to_owned(),
            log: log.to_owned(),
            relayed: 0,
            log_offset: 0,
        };
        let deadline = Instant::now() + e2e::WAIT;
        loop {
            interrupt::check()?;
            let text = std::fs::read_to_string(log)?;
            if let Some(ready) =
                text.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()).find(|e| e["event"] == "ready")
            {
                agent.port = ready["listen_port"].as_u64().context("ready line without listen_port")? as u16;
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("the agent exited ({status}) before it was ready:\n{text}");
            }
            ensure!(Instant::now() < deadline, "the agent was not ready after {:?}:\n{text}", e2e::WAIT);
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connections the agent has logged as relayed so far.
    pub fn relayed(&mut self) -> Result<usize> {
        let mut file = File::open(&self.log)?;
        file.seek(SeekFrom::Start(self.log_offset))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        // Only whole lines: the agent may be writing the last one.
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
        for line in text[..whole].split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            if line.contains(r#""event":"connection""#) && line.contains(r#""verdict":"relayed""#) {
                self.relayed += 1;
            }
        }
        self.log_offset += whole as u64;
        Ok(self.relayed)
    }

    /// Proves the clients went through the agent (a transparent client that
    /// was not redirected would have measured the direct path).
    pub fn expect_relayed(&mut self, expected: usize) -> Result<()> {
        let deadline = Instant::now() + LOG_LAG;
        while self.relayed()? < expected {
            interrupt::check()?;
            if Instant::now() > deadline {
                bail!(
                    "the agent logged {} relayed connections, expected {expected}; its other outcomes: {}",
                    self.relayed,
                    self.other_outcomes()?
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Counts of the log's warnings and non-relayed connections, by what
    /// they say, most frequent first: the work directory is gone after the run.
    fn other_outcomes(&self) -> Result<String> {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for line in std::fs::read_to_string(&self.log)?.lines() {
            let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
            let what = if event["event"] == "connection" {
                if event["verdict"] == "relayed" {
                    continue;
                }
                format!("{} {}", event["verdict"], event["reason"])
            } else if event["level"] == "WARN" || event["level"] == "ERROR" {
                event["message"].to_string()
            } else {
                continue;
            };
            *counts.entry(what).or_default() += 1;
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let top: Vec<String> = counts.iter().take(5).map(|(what, n)| format!("{n}× {what}")).collect();
        Ok(if top.is_empty() { "none (clients that bypassed it?)".into() } else { top.join("; ") })
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        e2e::detach(&self.cgroup);
    }
}

/// VmRSS of `pid` and its descendants (a proxy may fork helpers).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let mut total = 0;
    for pid in family(pid)? {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
        total += kib * 1024;
    }
    Ok(total)
}

/// User plus system CPU time of `pid` and its descendants, every thread
/// included, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0;
    for pid in family(pid)? {
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
        // utime and stime are fields 14 and 15, the 12th and 13th after the parenthesised command name.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        ticks += field(11)
            .zip(field(12))
            .map(|(user, system)| user + system)
            .with_context(|| format!("bad /proc/{pid}/stat"))?;
    }
    Ok(ticks as f64 / ticks_per_second)
}

/// `pid` and its descendants.
fn family(pid: u32) -> Result<Vec<u32>> {
    let mut family = vec![pid];
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The parent is the second field after the parenthesised command name.
        if let Some(parent) =
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
        {
            parents.push((child, parent));
        }
    }
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(parents.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        i += 1;
    }
    Ok(family)
}
