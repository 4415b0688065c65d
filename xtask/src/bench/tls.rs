//! TLS-terminated requests (issue #11): keep-alive HTTP/1.1 over TLS to
//! bench-peer, direct, through the agent as passthrough (decided on the
//! SNI, never decrypted) and inspected (terminated with the agent's CA,
//! every request decided by an L7 rule, a TLS connection of its own to the
//! server verified against the test CA). Then MCP tool calls (issue #23):
//! the same 1 KiB `tools/call` to a REST-inspected endpoint and to an MCP
//! one, whose body the agent reads and decides call by call.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Result;

use super::{
    number, path_str,
    report::{Column, Results, Row, Table, Target},
    Bench, TLS_INSPECTED_PORT, TLS_MCP_PORT, TLS_PORT,
};

/// The server's name: the clients' SNI and Host, answered by the
/// namespace's dnsmasq with the server's address for the agent's check.
pub const NAME: &str = "bench.tls.test";

const DIRECT: Column = Column { key: "direct", title: "direct" };
const PASSTHROUGH: Column = Column { key: "agent_passthrough", title: "agent passthrough" };
const INSPECTED: Column = Column { key: "agent_inspected", title: "agent inspected" };

const NEW_P50: Row = Row { key: "new_connection_p50_us", title: "new connection p50 (µs)", decimals: 0 };
const NEW_P99: Row = Row { key: "new_connection_p99_us", title: "new connection p99 (µs)", decimals: 0 };
const NEW_ADDED: Row =
    Row { key: "new_connection_added_p50_us", title: "new connection p50 added vs passthrough (µs)", decimals: 0 };
const REQUEST_P50: Row = Row { key: "keepalive_request_p50_us", title: "keep-alive request p50 (µs)", decimals: 0 };
const REQUEST_P99: Row = Row { key: "keepalive_request_p99_us", title: "keep-alive request p99 (µs)", decimals: 0 };
const REQUEST_ADDED: Row = Row {
    key: "keepalive_request_added_p50_us",
    title: "keep-alive request p50 added vs passthrough (µs)",
    decimals: 0,
};

const REST_CALL: Column = Column { key: "agent_rest", title: "agent, REST endpoint" };
const MCP_CALL: Column = Column { key: "agent_mcp", title: "agent, MCP endpoint" };
const CALL_P50: Row = Row { key: "call_p50_us", title: "keep-alive tools/call p50 (µs)", decimals: 0 };
const CALL_P99: Row = Row { key: "call_p99_us", title: "keep-alive tools/call p99 (µs)", decimals: 0 };
const CALL_ADDED: Row = Row { key: "call_added_p50_us", title: "p50 added vs the REST endpoint (µs)", decimals: 0 };
/// The size of the MCP call's body.
const CALL_BYTES: usize = 1024;

/// A test CA and the TLS servers' certificate, signed by it for [`NAME`]
/// and the server's address: PEM files.
pub struct TestCa {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn create(dir: &Path, server_ip: IpAddr) -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "sandbox-egress bench CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(vec![NAME.to_owned(), server_ip.to_string()])?
            .signed_by(&leaf_key, &issuer)?;
        let files = Self { ca: dir.join("tls-ca.pem"), cert: dir.join("tls-cert.pem"), key: dir.join("tls-key.pem") };
        std::fs::write(&files.ca, ca_cert.pem())?;
        std::fs::write(&files.cert, leaf.pem())?;
        std::fs::write(&files.key, leaf_key.serialize_pem())?;
        Ok(files)
    }
}

impl Bench<'_> {
    /// Every column in each run, against one agent that serves both agent columns.
    pub(super) fn tls_requests(&self, results: &mut Results) -> Result<()> {
        let (connections, requests) = (self.args.tls_connections, self.args.tls_requests);
        let mut agent = self.start_agent(&[
            "--dns-server",
            &self.dns.server.to_string(),
            "--upstream-ca",
            path_str(&self.tls_ca.ca)?,
        ])?;
        let exported = e2e::run(path_str(&self.agent_bin)?, &["ca", "export", "--ca-dir", path_str(&self.ca_dir())?])?;
        let agent_ca = self.work.join("agent-ca.pem");
        std::fs::write(&agent_ca, exported.stdout)?;

        let mut table = Table::new(
            "tls_requests",
            format!(
                "TLS-terminated requests: {connections} connections one after another, {requests} keep-alive requests each"
            ),
            "A new connection is timed from connect through the TLS handshake (full, no resumption) to the first \
             response; a keep-alive request from sending it to its whole response (200, 2-byte body). Passthrough: \
             the agent decides on the SNI and splices; inspected: it terminates TLS with its CA, decides each request \
             (`protocol: rest`, `access: full`) and makes its own TLS connection to the server. The agent checks the \
             SNI against a DNS lookup on each connection (the client connects by address). \"Added\" is the median of \
             inspected minus passthrough in the same run."
                .into(),
            &[DIRECT, PASSTHROUGH, INSPECTED],
        );
        let (connections_arg, requests_arg) = (connections.to_string(), requests.to_string());
        for run in 0..self.args.runs {
            // Per column: the new-connection and keep-alive request p50s.
            let mut p50s = [(0.0, 0.0); 3];
            let columns = [
                (DIRECT, TLS_PORT, &self.tls_ca.ca),
                (PASSTHROUGH, TLS_PORT, &self.tls_ca.ca),
                (INSPECTED, TLS_INSPECTED_PORT, &agent_ca),
            ];
            for (i, (column, port, ca)) in columns.into_iter().enumerate() {
                self.netns.check_alone()?;
                let sandboxed = column.key != DIRECT.key;
                let relayed_before = agent.relayed()?;
                let to = SocketAddr::from((self.server_ip, port)).to_string();
                let out = self.peer(
                    sandboxed,
                    "tls",
                    column,
                    &[
                        "--to",
                        &to,
                        "--ca",
                        path_str(ca)?,
                        "--name",
                        NAME,
                        "--connections",
                        &connections_arg,
                        "--requests",
                        &requests_arg,
                    ],
                )?;
                if sandboxed {
                    agent.expect_relayed(relayed_before + connections)?;
                }
                let figures = [
                    (NEW_P50, number(&out, "new_p50_us")?),
                    (NEW_P99, number(&out, "new_p99_us")?),
                    (REQUEST_P50, number(&out, "keepalive_p50_us")?),
                    (REQUEST_P99, number(&out, "keepalive_p99_us")?),
                ];
                for (row, value) in figures {
                    table.add(row, column, value);
                }
                p50s[i] = (figures[0].1, figures[2].1);
                eprintln!(
                    "bench: run {}/{} TLS {}: new connection p50 {:.0} µs p99 {:.0} µs; keep-alive request p50 {:.0} µs p99 {:.0} µs",
                    run + 1,
                    self.args.runs,
                    column.title,
                    figures[0].1,
                    figures[1].1,
                    figures[2].1,
                    figures[3].1
                );
            }
            let (passthrough, inspected) = (p50s[1], p50s[2]);
            table.add(NEW_ADDED, INSPECTED, inspected.0 - passthrough.0);
            table.add(REQUEST_ADDED, INSPECTED, inspected.1 - passthrough.1);
        }
        results.targets.push(Target::at_most_us(
            "added per new TLS-terminated connection (inspected vs passthrough, p50) ≤ 1 ms",
            table.median(NEW_ADDED, INSPECTED),
            1000.0,
        ));
        results.targets.push(Target::at_most_us(
            "added per keep-alive request on a terminated connection (p50) ≤ 100 µs",
            table.median(REQUEST_ADDED, INSPECTED),
            100.0,
        ));
        results.tables.push(table);
        Ok(())
    }

    /// The same keep-alive `tools/call` (1 KiB) to a REST-inspected endpoint
    /// (`access: full`: decided on its head) and to an MCP one (the body read
    /// whole, parsed, the call decided): what reading MCP costs per call.
    pub(super) fn mcp_calls(&self, results: &mut Results) -> Result<()> {
        let (connections, requests) = (self.args.tls_connections, self.args.tls_requests);
        let _agent = self.start_agent(&[
            "--dns-server",
            &self.dns.server.to_string(),
            "--upstream-ca",
            path_str(&self.tls_ca.ca)?,
        ])?;
        let exported = e2e::run(path_str(&self.agent_bin)?, &["ca", "export", "--ca-dir", path_str(&self.ca_dir())?])?;
        let agent_ca = self.work.join("agent-ca.pem");
        std::fs::write(&agent_ca, exported.stdout)?;
        let body = self.work.join("tools-call.json");
        std::fs::write(&body, tools_call(CALL_BYTES))?;
        let mut table = Table::new(
            "mcp_calls",
            format!(
                "MCP tool calls: {connections} connections one after another, {requests} keep-alive calls each, \
                 a {CALL_BYTES}-byte tools/call"
            ),
            "The same `POST /mcp` with a JSON-RPC `tools/call` body, timed from sending it to its whole response, \
             through the agent to an inspected endpoint: `protocol: rest, access: full` (decided on the head, the \
             body streamed) and `protocol: mcp` with a `tools/call` rule naming the tool (the body read whole, \
             parsed, the call decided, the body forwarded with its length). \"Added\" is the median of MCP minus \
             REST in the same run."
                .into(),
            &[REST_CALL, MCP_CALL],
        );
        let (connections_arg, requests_arg) = (connections.to_string(), requests.to_string());
        for run in 0..self.args.runs {
            let mut p50s = [0.0; 2];
            for (i, (column, port)) in
                [(REST_CALL, TLS_INSPECTED_PORT), (MCP_CALL, TLS_MCP_PORT)].into_iter().enumerate()
            {
                self.netns.check_alone()?;
                let to = SocketAddr::from((self.server_ip, port)).to_string();
                let out = self.peer(
                    true,
                    "tls",
                    column,
                    &[
                        "--to",
                        &to,
                        "--ca",
                        path_str(&agent_ca)?,
                        "--name",
                        NAME,
                        "--connections",
                        &connections_arg,
                        "--requests",
                        &requests_arg,
                        "--post",
                        path_str(&body)?,
                        "--path",
                        "/mcp",
                    ],
                )?;
                let (p50, p99) = (number(&out, "keepalive_p50_us")?, number(&out, "keepalive_p99_us")?);
                table.add(CALL_P50, column, p50);
                table.add(CALL_P99, column, p99);
                p50s[i] = p50;
                eprintln!(
                    "bench: run {}/{} MCP call {}: p50 {p50:.0} µs p99 {p99:.0} µs",
                    run + 1,
                    self.args.runs,
                    column.title
                );
            }
            table.add(CALL_ADDED, MCP_CALL, p50s[1] - p50s[0]);
        }
        results.targets.push(Target::at_most_us(
            "MCP tool call (1 KiB body) p50 added vs the same call to a REST-inspected endpoint ≤ 50 µs",
            table.median(CALL_ADDED, MCP_CALL),
            50.0,
        ));
        results.tables.push(table);
        Ok(())
    }
}

/// A JSON-RPC `tools/call` of the tool `search`, padded to `size` bytes.
fn tools_call(size: usize) -> String {
    let call = |padding: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search","arguments":{{"query":"{padding}"}}}}}}"#
        )
    };
    let bare = call("").len();
    call(&"x".repeat(size.saturating_sub(bare)))
}
