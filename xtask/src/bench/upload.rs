//! Upload with `Expect: 100-continue` (issue #30): curl -T of
//! `--upload-mib` MiB to bench-peer's upload server, which answers
//! `100 Continue` at once as nginx does, direct and through the agent
//! (transparent, the private-IP gate). A relay that held the 100 back would
//! show curl's own 1 s wait.

use std::{net::SocketAddr, process::Command};

use anyhow::{ensure, Context, Result};

use super::{
    path_str,
    report::{Column, Results, Row, Table, Target},
    Bench, UPLOAD_PORT,
};

const DIRECT: Column = Column { key: "direct", title: "direct" };
const TRANSPARENT: Column = Column { key: "agent_transparent", title: "agent transparent" };

const P50: Row = Row { key: "upload_expect_p50_ms", title: "total time p50 (ms)", decimals: 2 };
const P99: Row = Row { key: "upload_expect_p99_ms", title: "total time p99 (ms)", decimals: 2 };
const ADDED: Row = Row { key: "upload_expect_added_p50_ms", title: "p50 added vs direct (ms)", decimals: 2 };

impl Bench<'_> {
    pub(super) fn upload(&self, results: &mut Results) -> Result<()> {
        let target = SocketAddr::from((self.server_ip, UPLOAD_PORT));
        let mut agent = self.start_agent(&[])?;
        let bytes = self.args.upload_mib << 20;
        let file = self.work.join("upload.bin");
        std::fs::write(&file, vec![b'u'; bytes as usize])?;
        let uploads = self.args.uploads;
        let mut table = Table::new(
            "upload_expect",
            format!("Upload with `Expect: 100-continue`: {uploads} uploads of {} MiB per figure", self.args.upload_mib),
            format!(
                "curl -T of a {} MiB file with `Expect: 100-continue`, a new connection each, timed by curl \
                 (`%{{time_total}}`) from the start to the whole 200 response. The server answers `100 Continue` as \
                 soon as the head is in, reads the body and answers 200. Through the agent, curl runs in the sandbox \
                 and connects to the server's private address (the private-IP gate); the agent relays the server's \
                 100 while the body waits, so no upload waits for curl's own 1 s timeout. \"Added\" is the median \
                 of the differences to direct in the same run.",
                self.args.upload_mib
            ),
            &[DIRECT, TRANSPARENT],
        );
        for run in 0..self.args.runs {
            let mut direct_p50 = 0.0;
            for column in [DIRECT, TRANSPARENT] {
                self.netns.check_alone()?;
                let sandboxed = column.key == TRANSPARENT.key;
                let relayed_before = agent.relayed()?;
                let mut seconds = Vec::with_capacity(uploads);
                for _ in 0..uploads {
                    seconds.push(self.curl_upload(sandboxed, column, path_str(&file)?, target, bytes)?);
                }
                if sandboxed {
                    agent.expect_relayed(relayed_before + uploads)?;
                }
                seconds.sort_by(f64::total_cmp);
                let percentile = |p: f64| seconds[((seconds.len() - 1) as f64 * p).round() as usize] * 1e3;
                let (p50, p99) = (percentile(0.5), percentile(0.99));
                table.add(P50, column, p50);
                table.add(P99, column, p99);
                if sandboxed {
                    table.add(ADDED, column, p50 - direct_p50);
                } else {
                    direct_p50 = p50;
                }
                eprintln!(
                    "bench: run {}/{} upload with Expect {}: p50 {p50:.2} ms p99 {p99:.2} ms",
                    run + 1,
                    self.args.runs,
                    column.title
                );
            }
        }
        results.targets.push(Target {
            what: "upload with `Expect: 100-continue` through the agent, p50 added vs direct ≤ 5 ms",
            measured: table.median(ADDED, TRANSPARENT).map_or("n/a".into(), |ms| format!("{ms:.2} ms")),
            met: table.median(ADDED, TRANSPARENT).map(|ms| ms <= 5.0),
        });
        results.tables.push(table);
        Ok(())
    }

    /// One curl upload; its total time in seconds, checked to be a 200
    /// after the whole file went.
    fn curl_upload(&self, sandboxed: bool, column: Column, file: &str, to: SocketAddr, bytes: u64) -> Result<f64> {
        let mut command = if sandboxed { self.sandbox.command("curl") } else { Command::new("curl") };
        command.args(["-sS", "--noproxy", "*", "-m", "30", "-o", "/dev/null", "-H", "Expect: 100-continue"]);
        command.args(["-w", "%{http_code} %{size_upload} %{time_total}\n", "-T", file, &format!("http://{to}/upload")]);
        // Bounded by curl's own -m.
        let output = command.output().with_context(|| format!("spawn curl via {}", column.title))?;
        let line = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(output.status.success(), "curl via {}: {}", column.title, String::from_utf8_lossy(&output.stderr));
        let fields: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            fields.len() == 3 && fields[0] == "200" && fields[1] == bytes.to_string(),
            "curl upload via {}: {line:?}",
            column.title
        );
        fields[2].parse().with_context(|| format!("curl printed {line:?}"))
    }
}
