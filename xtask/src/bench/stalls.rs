//! No stalls (issue #14): a server that speaks first, and a client that
//! speaks first with letters that cannot start an HTTP request, must not
//! wait for the agent's first-byte timeout (300 ms).

use std::net::SocketAddr;

use anyhow::Result;

use super::{
    number,
    proxies::{self, HaproxyMode},
    report::{Better, Column, Results, Row, Table, Target},
    Bench, ECHO_KERNEL_PORT, ECHO_PORT, GREETING_KERNEL_PORT, GREETING_PORT,
};

const DIRECT: Column = Column { key: "direct", title: "direct" };
const TRANSPARENT: Column = Column { key: "agent_transparent", title: "agent transparent" };
/// A `protocol: tcp` endpoint on ports of its own: the first connection
/// through the agent, the rest by the kernel fast path.
const KERNEL: Column = Column { key: "agent_kernel", title: "agent kernel fast path" };
const HAPROXY: Column = Column { key: "haproxy_tcp", title: "haproxy TCP" };

/// Per workload: its client, the rows p50, p99 and p50 added vs direct.
const WORKLOADS: [(&str, Row, Row, Row); 2] = [
    (
        "greeting",
        Row { key: "greeting_p50_us", title: "server greeting: connect → first byte p50 (µs)", decimals: 0 },
        Row { key: "greeting_p99_us", title: "server greeting: connect → first byte p99 (µs)", decimals: 0 },
        Row { key: "greeting_added_p50_us", title: "server greeting: p50 added vs direct (µs)", decimals: 0 },
    ),
    (
        "echo",
        Row { key: "echo_p50_us", title: "`xxxx` first: connect → echo p50 (µs)", decimals: 0 },
        Row { key: "echo_p99_us", title: "`xxxx` first: connect → echo p99 (µs)", decimals: 0 },
        Row { key: "echo_added_p50_us", title: "`xxxx` first: p50 added vs direct (µs)", decimals: 0 },
    ),
];

impl Bench<'_> {
    pub(super) fn stalls(&self, results: &mut Results) -> Result<()> {
        let greeting = SocketAddr::from((self.server_ip, GREETING_PORT));
        let echo = SocketAddr::from((self.server_ip, ECHO_PORT));
        let mut agent = self.start_agent(&[])?;
        let (haproxy, haproxy_ports) = proxies::haproxy(self.work, &[greeting, echo], 64, HaproxyMode::Tcp)?;
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let kernel = [
            SocketAddr::from((self.server_ip, GREETING_KERNEL_PORT)),
            SocketAddr::from((self.server_ip, ECHO_KERNEL_PORT)),
        ];
        let targets =
            [(greeting, loopback(haproxy_ports[0]), kernel[0]), (echo, loopback(haproxy_ports[1]), kernel[1])];

        let connections = self.args.stall_connections;
        let mut table = Table::new(
            "no_stalls",
            format!("No stalls: {connections} connections one after another per figure"),
            "Server greeting: the server writes a line on accept, the client only reads; `xxxx` first: the client \
             sends `xxxx` (no line end) and the server echoes it. Each connection is timed from connect to the \
             bytes expected. The agent's policy names the server by its IP literal, so the address alone decides \
             and it connects upstream early (the first connection after the 50 ms grace, the rest at once since \
             its server spoke first); a stall would show as its 300 ms first-byte timeout. \"Added\" is the \
             median of the differences to direct in the same run."
                .into(),
            &[DIRECT, TRANSPARENT, KERNEL, HAPROXY],
        );
        let connections_arg = connections.to_string();
        for run in 0..self.args.runs {
            for ((workload, p50_row, p99_row, added_row), (server, haproxy_route, kernel)) in
                WORKLOADS.into_iter().zip(targets)
            {
                let mut direct_p50 = 0.0;
                for (column, to) in
                    [(DIRECT, server), (TRANSPARENT, server), (KERNEL, kernel), (HAPROXY, haproxy_route)]
                {
                    self.netns.check_alone()?;
                    let sandboxed = column.key == TRANSPARENT.key || column.key == KERNEL.key;
                    let relayed_before = agent.relayed()?;
                    let out = self.peer(
                        sandboxed,
                        workload,
                        column,
                        &["--to", &to.to_string(), "--connections", &connections_arg],
                    )?;
                    if sandboxed {
                        agent.expect_relayed(relayed_before + connections)?;
                    }
                    let (p50, p99) = (number(&out, "p50_us")?, number(&out, "p99_us")?);
                    table.add(p50_row, column, p50);
                    table.add(p99_row, column, p99);
                    if column.key == DIRECT.key {
                        direct_p50 = p50;
                    } else {
                        table.add(added_row, column, p50 - direct_p50);
                    }
                    eprintln!(
                        "bench: run {}/{} {workload} {}: p50 {p50:.0} µs p99 {p99:.0} µs",
                        run + 1,
                        self.args.runs,
                        column.title
                    );
                }
            }
        }
        drop(haproxy);
        for (what, row) in [
            ("no stall: server greeting through the agent, p50 added vs direct ≤ 1 ms", WORKLOADS[0].3),
            ("no stall: `xxxx` first through the agent, p50 added vs direct ≤ 1 ms", WORKLOADS[1].3),
        ] {
            results.targets.push(Target::at_most_us(what, table.median(row, TRANSPARENT), 1000.0));
        }
        for (what, row) in [
            ("server greeting: p50 added at or ahead of haproxy (µs)", WORKLOADS[0].3),
            ("`xxxx` first: p50 added at or ahead of haproxy (µs)", WORKLOADS[1].3),
        ] {
            let (agent, haproxy) = (table.median(row, TRANSPARENT), table.median(row, HAPROXY));
            results.targets.push(Target::versus_haproxy(what, agent, haproxy, Better::Lower));
        }
        for (what, row) in [
            ("kernel fast path: server greeting p50 added at or ahead of haproxy (µs)", WORKLOADS[0].3),
            ("kernel fast path: `xxxx` first p50 added at or ahead of haproxy (µs)", WORKLOADS[1].3),
        ] {
            let (kernel, haproxy) = (table.median(row, KERNEL), table.median(row, HAPROXY));
            results.targets.push(Target::versus_haproxy(what, kernel, haproxy, Better::Lower));
        }
        results.tables.push(table);
        Ok(())
    }
}
