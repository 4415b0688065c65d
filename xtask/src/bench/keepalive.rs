//! Keep-alive plain HTTP (issue #15): wrk against bench-peer's keep-alive
//! server, direct, through the agent (transparent, the private-IP gate),
//! haproxy in HTTP mode and squid as a forward proxy.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::{ensure, Result};
use serde_json::Value;

use super::{
    number, path_str,
    process::Client,
    proxies::{self, HaproxyMode},
    report::{Better, Column, Results, Row, Table, Target},
    Bench, CLIENT_TIMEOUT, KEEPALIVE_PORT,
};

const DIRECT: Column = Column { key: "direct", title: "direct" };
const TRANSPARENT: Column = Column { key: "agent_transparent", title: "agent transparent" };
const HAPROXY: Column = Column { key: "haproxy_http", title: "haproxy HTTP" };
const SQUID: Column = Column { key: "squid_forward", title: "squid forward proxy" };

/// Rows per number of connections: requests/s and µs added per request.
const ROWS: [(usize, Row, Row); 2] = [
    (
        1,
        Row { key: "one_connection_requests_per_s", title: "1 connection: requests/s", decimals: 0 },
        Row { key: "one_connection_added_us", title: "1 connection: µs added per request vs direct", decimals: 1 },
    ),
    (
        16,
        Row { key: "sixteen_connections_requests_per_s", title: "16 connections: requests/s", decimals: 0 },
        Row {
            key: "sixteen_connections_added_us",
            title: "16 connections: µs added per request vs direct",
            decimals: 1,
        },
    ),
];

/// Prints wrk's figures as one JSON line (after its own report).
const REPORT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%.0f,"duration_us":%.0f,"socket_errors":%.0f,"non_2xx":%.0f,"p50_us":%.0f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50)))
end
"#;

impl Bench<'_> {
    pub(super) fn keepalive(&self, results: &mut Results) -> Result<()> {
        let target = SocketAddr::from((self.server_ip, KEEPALIVE_PORT));
        let mut agent = self.start_agent(&[])?;
        let squid = proxies::squid(self.work, self.limits.nofile)?;
        let (haproxy, haproxy_ports) = proxies::haproxy(self.work, &[target], 64, HaproxyMode::Http)?;
        let origin_script = self.work.join("wrk-origin.lua");
        std::fs::write(&origin_script, REPORT)?;
        // wrk sends origin-form only: a script makes its requests absolute-form for squid.
        let absolute_script = self.work.join("wrk-absolute.lua");
        std::fs::write(
            &absolute_script,
            format!("wrk.path = \"http://{target}/\"\nwrk.headers[\"Host\"] = \"{target}\"\n{REPORT}"),
        )?;
        let loopback = |port: u16| format!("http://127.0.0.1:{port}/");
        let columns = [
            (DIRECT, format!("http://{target}/"), &origin_script),
            (TRANSPARENT, format!("http://{target}/"), &origin_script),
            (HAPROXY, loopback(haproxy_ports[0]), &origin_script),
            (SQUID, loopback(squid.port), &absolute_script),
        ];

        let secs = self.args.wrk_secs;
        let mut table = Table::new(
            "keepalive_http",
            format!("Keep-alive plain HTTP: wrk, one thread, {secs} s per figure"),
            "Requests/s of GET / answered 200 with a 2-byte body, all on keep-alive connections held for the whole \
             run; \"µs added per request\" is 10⁶/(requests/s) minus the same for direct in that run: with one \
             connection, the latency the relay adds to each request; with 16, the time it costs per request \
             (both cores busy). Through the agent, wrk runs in the sandbox and connects to the server's private \
             address (an `allowed_ips` endpoint: the private-IP gate); squid gets absolute-form requests."
                .into(),
            &columns.each_ref().map(|(column, _, _)| *column),
        );
        for run in 0..self.args.runs {
            for (connections, rate_row, added_row) in ROWS {
                let mut direct_us = None;
                for (column, url, script) in &columns {
                    self.netns.check_alone()?;
                    let sandboxed = column.key == TRANSPARENT.key;
                    let relayed_before = agent.relayed()?;
                    let out = self.wrk(sandboxed, *column, url, script, connections)?;
                    if sandboxed {
                        agent.expect_relayed(relayed_before + connections)?;
                    }
                    let rate = number(&out, "requests")? / (number(&out, "duration_us")? / 1e6);
                    table.add(rate_row, *column, rate);
                    let per_request = 1e6 / rate;
                    match direct_us {
                        None => direct_us = Some(per_request),
                        Some(direct) => table.add(added_row, *column, per_request - direct),
                    }
                    eprintln!(
                        "bench: run {}/{} keep-alive HTTP {}, wrk -c{connections}: {rate:.0} requests/s, p50 {:.0} µs",
                        run + 1,
                        self.args.runs,
                        column.title,
                        number(&out, "p50_us")?
                    );
                }
            }
        }
        drop((squid, haproxy));
        let [(_, _, one_added), (_, sixteen_rate, sixteen_added)] = ROWS;
        results.targets.push(Target::at_most_us(
            "keep-alive HTTP, 1 connection: ≤ 20 µs added per request",
            table.median(one_added, TRANSPARENT),
            20.0,
        ));
        let sixteen = table.median(sixteen_rate, TRANSPARENT).zip(table.median(sixteen_rate, DIRECT));
        results.targets.push(Target {
            what: "keep-alive HTTP, 16 connections: ≥ 0.5× direct requests/s",
            measured: sixteen.map_or("n/a".into(), |(agent, direct)| format!("{:.2}×", agent / direct)),
            met: sixteen.map(|(agent, direct)| agent / direct >= 0.5),
        });
        for (what, row) in [
            ("keep-alive HTTP, 1 connection: µs added per request at or ahead of haproxy", one_added),
            ("keep-alive HTTP, 16 connections: µs added per request at or ahead of haproxy", sixteen_added),
        ] {
            let (agent, haproxy) = (table.median(row, TRANSPARENT), table.median(row, HAPROXY));
            results.targets.push(Target::versus_haproxy(what, agent, haproxy, Better::Lower));
        }
        results.tables.push(table);
        Ok(())
    }

    /// One wrk run; its figures, every request answered 200.
    fn wrk(&self, sandboxed: bool, column: Column, url: &str, script: &Path, connections: usize) -> Result<Value> {
        let mut command = if sandboxed { self.sandbox.command("wrk") } else { Command::new("wrk") };
        command.args(["--threads", "1", "--connections", &connections.to_string()]);
        command.args(["--duration", &format!("{}s", self.args.wrk_secs), "--timeout", "5s"]);
        command.args(["--script", path_str(script)?, url]);
        let mut wrk = Client::spawn(command, format!("wrk via {}", column.title))?;
        let out = wrk.json_among_lines(CLIENT_TIMEOUT)?;
        wrk.finish(CLIENT_TIMEOUT)?;
        let failed = number(&out, "socket_errors")? + number(&out, "non_2xx")?;
        ensure!(failed == 0.0 && number(&out, "requests")? > 0.0, "wrk via {}: {out}", column.title);
        Ok(out)
    }
}
