//! gRPC calls (issue #22): unary calls and a server-streaming call over
//! HTTP/2 and TLS to bench-peer, direct, through the agent as passthrough
//! (decided on the SNI) and inspected (ALPN `h2` both ways, each call a
//! stream decided by a `POST /bench.Peer/*` rule, relayed on the agent's
//! own HTTP/2 connection to the server).

use std::net::SocketAddr;

use anyhow::Result;

use super::{
    number, path_str,
    report::{Column, Results, Row, Table, Target},
    tls::NAME,
    Bench, GRPC_INSPECTED_PORT, GRPC_PORT,
};

const DIRECT: Column = Column { key: "direct", title: "direct" };
const PASSTHROUGH: Column = Column { key: "agent_passthrough", title: "agent passthrough" };
const INSPECTED: Column = Column { key: "agent_inspected", title: "agent inspected" };

const NEW_P50: Row =
    Row { key: "unary_new_connection_p50_us", title: "unary call, new connection p50 (µs)", decimals: 0 };
const NEW_ADDED: Row = Row {
    key: "unary_new_connection_added_p50_us",
    title: "new connection p50 added vs passthrough (µs)",
    decimals: 0,
};
const OPEN_P50: Row =
    Row { key: "unary_open_channel_p50_us", title: "unary call, open channel p50 (µs)", decimals: 0 };
const OPEN_ADDED: Row =
    Row { key: "unary_open_channel_added_p50_us", title: "open channel p50 added vs passthrough (µs)", decimals: 0 };
const STREAM: Row = Row { key: "stream_mib_s", title: "server-streaming throughput (MiB/s)", decimals: 0 };
const STREAM_RATIO: Row =
    Row { key: "stream_vs_passthrough", title: "streaming throughput vs passthrough", decimals: 2 };

impl Bench<'_> {
    /// Every column in each run, against one agent serving both agent columns.
    pub(super) fn grpc_calls(&self, results: &mut Results) -> Result<()> {
        let (calls, mib) = (self.args.grpc_calls, self.args.grpc_stream_mib);
        let _agent = self.start_agent(&[
            "--dns-server",
            &self.dns.server.to_string(),
            "--upstream-ca",
            path_str(&self.tls_ca.ca)?,
        ])?;
        let exported = e2e::run(path_str(&self.agent_bin)?, &["ca", "export", "--ca-dir", path_str(&self.ca_dir())?])?;
        let agent_ca = self.work.join("agent-ca.pem");
        std::fs::write(&agent_ca, exported.stdout)?;
        let mut table = Table::new(
            "grpc_calls",
            format!("gRPC over HTTP/2: {calls} unary calls on a new connection each, {calls} on one open channel, one {mib} MiB server stream"),
            "A unary call (2-byte messages) is timed from connect through the TLS and HTTP/2 handshakes to its \
             trailers on a new connection, and from sending it to its trailers on an open channel; the stream is \
             one call whose server sends 64 KiB messages. Passthrough: the agent decides on the SNI and splices; \
             inspected: ALPN h2 both ways (the agent connects to the server before answering the ClientHello), each \
             call decided by a `POST /bench.Peer/*` rule and relayed on the agent's own HTTP/2 connection. \"Added\" \
             is the median of inspected minus passthrough in the same run."
                .into(),
            &[DIRECT, PASSTHROUGH, INSPECTED],
        );
        let (calls_arg, mib_arg) = (calls.to_string(), mib.to_string());
        for run in 0..self.args.runs {
            let mut figures = [(0.0, 0.0, 0.0); 3];
            let columns = [
                (DIRECT, GRPC_PORT, &self.tls_ca.ca),
                (PASSTHROUGH, GRPC_PORT, &self.tls_ca.ca),
                (INSPECTED, GRPC_INSPECTED_PORT, &agent_ca),
            ];
            for (i, (column, port, ca)) in columns.into_iter().enumerate() {
                self.netns.check_alone()?;
                let to = SocketAddr::from((self.server_ip, port)).to_string();
                let args = [
                    "--to",
                    &to,
                    "--ca",
                    path_str(ca)?,
                    "--name",
                    NAME,
                    "--calls",
                    &calls_arg,
                    "--stream-mib",
                    &mib_arg,
                ];
                let out = self.peer(column.key != DIRECT.key, "grpc", column, &args)?;
                figures[i] = (number(&out, "new_p50_us")?, number(&out, "open_p50_us")?, number(&out, "stream_mib_s")?);
                table.add(NEW_P50, column, figures[i].0);
                table.add(OPEN_P50, column, figures[i].1);
                table.add(STREAM, column, figures[i].2);
                eprintln!(
                    "bench: run {}/{} gRPC {}: unary new connection p50 {:.0} µs, open channel p50 {:.0} µs; stream {:.0} MiB/s",
                    run + 1,
                    self.args.runs,
                    column.title,
                    figures[i].0,
                    figures[i].1,
                    figures[i].2
                );
            }
            let (passthrough, inspected) = (figures[1], figures[2]);
            table.add(NEW_ADDED, INSPECTED, inspected.0 - passthrough.0);
            table.add(OPEN_ADDED, INSPECTED, inspected.1 - passthrough.1);
            table.add(STREAM_RATIO, INSPECTED, inspected.2 / passthrough.2);
        }
        results.targets.push(Target::at_most_us(
            "gRPC unary call on a new connection, added vs passthrough (p50) ≤ 1 ms",
            table.median(NEW_ADDED, INSPECTED),
            1000.0,
        ));
        results.targets.push(Target::at_most_us(
            "gRPC unary call on an open channel, added vs passthrough (p50) ≤ 50 µs",
            table.median(OPEN_ADDED, INSPECTED),
            50.0,
        ));
        results.targets.push(Target::at_least_ratio(
            "gRPC server-streaming throughput vs passthrough ≥ 0.8x",
            table.median(STREAM_RATIO, INSPECTED),
            0.8,
        ));
        results.tables.push(table);
        Ok(())
    }
}
