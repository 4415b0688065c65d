//! "1,000 sandboxes" (issue #29): what a sandbox costs one daemon. The
//! bench sandbox plus `--sandboxes - 1` more, each a cgroup of its own, all
//! with the bench policy: daemon memory and descriptors per sandbox beyond
//! the first, `sandbox add` and `sandbox remove` times through the control
//! socket, a restart with as many spec files back to serving them, and a
//! new connection's latency with one sandbox and with all of them.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use e2e::{percentile, process_usage, ControlClient, Sandbox};
use serde_json::json;

use super::{
    number, path_str,
    process::AgentProcess,
    report::{Column, Results, Row, Table, Target},
    Bench, Route, Way,
};

const ONE: Column = Column { key: "one_sandbox", title: "1 sandbox" };
const MANY: Column = Column { key: "many_sandboxes", title: "all sandboxes" };

const MEMORY: Row =
    Row { key: "sandbox_memory_kib", title: "daemon memory per sandbox beyond the first (KiB)", decimals: 1 };
const FDS: Row = Row { key: "sandbox_fds", title: "descriptors per sandbox beyond the first", decimals: 2 };
const ADD_P50: Row = Row { key: "sandbox_add_p50_ms", title: "`sandbox add` p50 (ms)", decimals: 2 };
const ADD_P99: Row = Row { key: "sandbox_add_p99_ms", title: "`sandbox add` p99 (ms)", decimals: 2 };
const REMOVE_P50: Row = Row { key: "sandbox_remove_p50_ms", title: "`sandbox remove` p50 (ms)", decimals: 2 };
const REMOVE_P99: Row = Row { key: "sandbox_remove_p99_ms", title: "`sandbox remove` p99 (ms)", decimals: 2 };
const RESTART: Row = Row { key: "sandbox_restart_s", title: "restart to serving every spec file (s)", decimals: 2 };
const CONNECTION_P50: Row = Row { key: "sandbox_connection_p50_us", title: "new connection p50 (µs)", decimals: 0 };
const CONNECTION_P99: Row = Row { key: "sandbox_connection_p99_us", title: "new connection p99 (µs)", decimals: 0 };

/// Requests one after another per connection-cost figure.
const REQUESTS: &str = "1000";

impl Bench<'_> {
    pub(super) fn sandboxes(&self, results: &mut Results) -> Result<()> {
        let count = self.args.sandboxes;
        let mut table = Table::new(
            "sandboxes",
            format!("{} sandboxes on one daemon", thousands(count)),
            format!(
                "The bench sandbox (`run --cgroup`) and {} more cgroups with the same policy file, added through the \
                 control socket one after another (one connection, requests timed from send to reply), then removed \
                 (fail closed, no --detach). Memory (RSS) and descriptors of the daemon with one sandbox and with \
                 {count}, per sandbox beyond the first. Restart: {count} spec files (`--sandboxes DIR`, the bench \
                 sandbox's among them), the daemon killed (SIGKILL) and started again with their pins in place, from \
                 spawn to its ready line (every spec file served). New connection: {REQUESTS} HTTP requests one after \
                 another from the bench sandbox, a new connection each, transparent.",
                count - 1
            ),
            &[ONE, MANY],
        );
        let cgroups: Vec<Sandbox> =
            (1..count).map(|i| Sandbox::new(&format!("bench-scale-{i}"))).collect::<Result<_>>()?;
        for run in 0..self.args.runs {
            let mut agent = self.start_agent(&[])?;
            let socket = self.work.join(format!("agent-{}.sock", self.agents_started.get()));
            let mut control = ControlClient::connect(path_str(&socket)?)?;
            let (rss_one, fds_one) = process_usage(agent.pid())?;
            let (p50, p99) = self.connection_latency(&mut agent)?;
            table.add(CONNECTION_P50, ONE, p50);
            table.add(CONNECTION_P99, ONE, p99);

            let mut adds = Vec::with_capacity(count);
            for (i, cgroup) in cgroups.iter().enumerate() {
                let spec = json!({"name": format!("scale-{i}"), "cgroup": cgroup.path, "policy": self.policy.path});
                let started = Instant::now();
                control.request(&json!({"op": "sandbox_add", "spec": spec}))?;
                adds.push(started.elapsed());
            }
            let (rss_many, fds_many) = process_usage(agent.pid())?;
            let per = |many: f64, one: f64| (many - one) / (count - 1).max(1) as f64;
            table.add(MEMORY, MANY, per(rss_many as f64, rss_one as f64));
            table.add(FDS, MANY, per(fds_many as f64, fds_one as f64));
            let (p50, p99) = self.connection_latency(&mut agent)?;
            table.add(CONNECTION_P50, MANY, p50);
            table.add(CONNECTION_P99, MANY, p99);

            let mut removes = Vec::with_capacity(count);
            for i in 0..cgroups.len() {
                let started = Instant::now();
                control.request(&json!({"op": "sandbox_remove", "name": format!("scale-{i}")}))?;
                removes.push(started.elapsed());
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            table.add(ADD_P50, MANY, ms(percentile(&mut adds, 50)));
            table.add(ADD_P99, MANY, ms(percentile(&mut adds, 99)));
            table.add(REMOVE_P50, MANY, ms(percentile(&mut removes, 50)));
            table.add(REMOVE_P99, MANY, ms(percentile(&mut removes, 99)));
            drop(control);
            drop(agent);

            let restart = self.restart_with_spec_files(&cgroups)?;
            table.add(RESTART, MANY, restart);
            eprintln!(
                "bench: run {}/{} {count} sandboxes: {:.1} KiB and {:.2} fds per sandbox, add p50 {:.2} ms, remove p50 \
                 {:.2} ms, restart {restart:.2} s",
                run + 1,
                self.args.runs,
                per(rss_many as f64, rss_one as f64),
                per(fds_many as f64, fds_one as f64),
                ms(percentile(&mut adds, 50)),
                ms(percentile(&mut removes, 50)),
            );
        }
        let median = |row, column| table.median(row, column);
        let target = |what, row, column, limit: f64, unit: &str| Target {
            what,
            measured: median(row, column).map_or("n/a".into(), |value: f64| format!("{value:.2} {unit}")),
            met: median(row, column).map(|value| value <= limit),
        };
        results.targets.push(target(
            "daemon memory per sandbox beyond the first ≤ 100 KiB",
            MEMORY,
            MANY,
            100.0,
            "KiB",
        ));
        results.targets.push(target("descriptors per sandbox beyond the first ≤ 4", FDS, MANY, 4.0, ""));
        results.targets.push(target("`sandbox add` p50 ≤ 10 ms with 1,000 sandboxes", ADD_P50, MANY, 10.0, "ms"));
        results.targets.push(target("`sandbox remove` p50 ≤ 10 ms with 1,000 sandboxes", REMOVE_P50, MANY, 10.0, "ms"));
        results.targets.push(target("restart with 1,000 spec files to serving ≤ 5 s", RESTART, MANY, 5.0, "s"));
        results.tables.push(table);
        Ok(())
    }

    /// Sequential new connections from the bench sandbox: (p50, p99) in µs.
    fn connection_latency(&self, agent: &mut AgentProcess) -> Result<(f64, f64)> {
        let target = self.http_target(Way::Transparent, 0);
        let relayed_before = agent.relayed()?;
        let route = Route { to: target, connect: None };
        let host = target.to_string();
        let args = ["--host", &host, "--requests", REQUESTS, "--concurrency", "1"];
        let out = self.client(Way::Transparent, "http", &route, &args)?;
        let errors = out["errors"].as_u64().unwrap_or_default();
        ensure!(errors == 0, "{errors} requests failed with many sandboxes: {out}");
        agent.expect_relayed(relayed_before + REQUESTS.parse::<usize>()?)?;
        Ok((number(&out, "p50_us")?, number(&out, "p99_us")?))
    }

    /// Starts a daemon with a spec file per sandbox, stops it, starts it
    /// again: the seconds from the second spawn to its ready line.
    fn restart_with_spec_files(&self, cgroups: &[Sandbox]) -> Result<f64> {
        let dir = self.work.join("specs");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for (i, cgroup) in cgroups.iter().enumerate() {
            let spec = format!("cgroup: {}\npolicy: {}\n", cgroup.path.display(), self.policy.path.display());
            std::fs::write(dir.join(format!("scale-{i}.yaml")), spec)?;
        }
        let args = ["--sandboxes", path_str(&dir)?];
        // Killed: its pins stay, as after a crash.
        drop(self.start_agent(&args)?);
        let started = Instant::now();
        let mut second = self.start_agent(&args)?;
        let restart = started.elapsed().as_secs_f64();
        // Serving, not only started: a connection through it.
        self.connection_latency(&mut second)?;
        // Detached through the daemon, so no pins outlive the bench.
        let socket = self.work.join(format!("agent-{}.sock", self.agents_started.get()));
        let mut control = ControlClient::connect(path_str(&socket)?)?;
        for i in 0..cgroups.len() {
            let request = json!({"op": "sandbox_remove", "name": format!("scale-{i}"), "detach": true, "force": true});
            control.request(&request)?;
        }
        Ok(restart)
    }
}

/// 1000 as "1,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
