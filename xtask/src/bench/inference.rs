//! inference.local (issue #14): time to the first streamed event of a chat
//! completion, straight to a provider and through inference.local, which
//! injects the credential, rewrites the model and relays the stream.

use std::{net::SocketAddr, os::unix::fs::PermissionsExt};

use anyhow::Result;

use super::{
    number, path_str,
    report::{Column, Results, Row, Table},
    Bench, SSE_PORT,
};

const DIRECT: Column = Column { key: "direct", title: "direct to the provider" };
const THROUGH: Column = Column { key: "inference_local", title: "inference.local (plain HTTP)" };

const P50: Row = Row { key: "first_event_p50_us", title: "connect → first streamed event p50 (µs)", decimals: 0 };
const P99: Row = Row { key: "first_event_p99_us", title: "connect → first streamed event p99 (µs)", decimals: 0 };
const ADDED: Row = Row { key: "first_event_added_p50_us", title: "p50 added vs direct (µs)", decimals: 0 };

/// inference.local's reserved IPv4 address, as the agent's DNS answers it.
const INFERENCE_V4: [u8; 4] = [240, 0, 0, 1];

impl Bench<'_> {
    pub(super) fn inference_stream(&self, results: &mut Results) -> Result<()> {
        let provider = SocketAddr::from((self.server_ip, SSE_PORT));
        let key = self.work.join("provider.key");
        std::fs::write(&key, "sk-bench")?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let config = self.work.join("inference.yaml");
        std::fs::write(
            &config,
            format!(
                "providers:\n  - name: bench\n    type: openai\n    base_url: http://{provider}\n    credential: {{ file: {} }}\nroute: {{ provider: bench, model: bench-model }}\n",
                key.display()
            ),
        )?;
        let _agent = self.start_agent(&["--inference-config", path_str(&config)?])?;
        let connections = self.args.stall_connections;
        let mut table = Table::new(
            "inference_stream",
            format!("inference.local: {connections} streamed requests one after another per figure"),
            "A streaming chat completion (`stream: true`), a new connection each, timed from connect to the first \
             server-sent event's bytes. The provider (the bench peer) sends the first event at once and the rest \
             20 ms later, so a relay that buffered would show it. Through inference.local the agent reads the \
             request, injects the provider's credential, rewrites the model, connects to the provider and relays \
             the response chunk by chunk."
                .into(),
            &[DIRECT, THROUGH],
        );
        let connections_arg = connections.to_string();
        let through = SocketAddr::from((INFERENCE_V4, 80));
        for run in 0..self.args.runs {
            let mut direct_p50 = 0.0;
            for (column, to, host) in
                [(DIRECT, provider, provider.to_string()), (THROUGH, through, "inference.local".into())]
            {
                self.netns.check_alone()?;
                let sandboxed = column.key == THROUGH.key;
                let args = ["--to", &to.to_string(), "--host", &host, "--connections", &connections_arg];
                let out = self.peer(sandboxed, "stream", column, &args)?;
                let (p50, p99) = (number(&out, "p50_us")?, number(&out, "p99_us")?);
                table.add(P50, column, p50);
                table.add(P99, column, p99);
                if sandboxed {
                    table.add(ADDED, column, p50 - direct_p50);
                } else {
                    direct_p50 = p50;
                }
                eprintln!(
                    "bench: run {}/{} inference stream {}: p50 {p50:.0} µs p99 {p99:.0} µs",
                    run + 1,
                    self.args.runs,
                    column.title
                );
            }
        }
        results.tables.push(table);
        Ok(())
    }
}
