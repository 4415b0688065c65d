//! Results: raw runs, medians, ratios to direct, the targets, and the
//! markdown and JSON reports. The main table compares every `Way`; the
//! workloads measured over other columns each get a small `Table` after it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Way;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Metric {
    UploadGbps,
    DownloadGbps,
    SequentialP50,
    SequentialP99,
    SequentialRate,
    ConcurrentP50,
    ConcurrentP99,
    ConcurrentRate,
    IdleBytes,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::UploadGbps,
        Metric::DownloadGbps,
        Metric::SequentialP50,
        Metric::SequentialP99,
        Metric::SequentialRate,
        Metric::ConcurrentP50,
        Metric::ConcurrentP99,
        Metric::ConcurrentRate,
        Metric::IdleBytes,
    ];

    fn key(self) -> &'static str {
        match self {
            Metric::UploadGbps => "upload_gbit_per_s",
            Metric::DownloadGbps => "download_gbit_per_s",
            Metric::SequentialP50 => "sequential_p50_us",
            Metric::SequentialP99 => "sequential_p99_us",
            Metric::SequentialRate => "sequential_conn_per_s",
            Metric::ConcurrentP50 => "concurrent_p50_us",
            Metric::ConcurrentP99 => "concurrent_p99_us",
            Metric::ConcurrentRate => "concurrent_conn_per_s",
            Metric::IdleBytes => "idle_rss_bytes_per_conn",
        }
    }

    fn title(self, sizes: &Sizes) -> String {
        match self {
            Metric::UploadGbps => format!("upload, one stream of {} MiB (Gbit/s)", sizes.bulk_mib),
            Metric::DownloadGbps => format!("download, one stream of {} MiB (Gbit/s)", sizes.bulk_mib),
            Metric::SequentialP50 => format!("{} sequential requests: latency p50 (µs)", sizes.requests),
            Metric::SequentialP99 => format!("{} sequential requests: latency p99 (µs)", sizes.requests),
            Metric::SequentialRate => format!("{} sequential requests: connections/s", sizes.requests),
            Metric::ConcurrentP50 => {
                format!("{} requests {} at a time: latency p50 (µs)", sizes.concurrent_requests, sizes.concurrency)
            }
            Metric::ConcurrentP99 => {
                format!("{} requests {} at a time: latency p99 (µs)", sizes.concurrent_requests, sizes.concurrency)
            }
            Metric::ConcurrentRate => {
                format!("{} requests {} at a time: connections/s", sizes.concurrent_requests, sizes.concurrency)
            }
            Metric::IdleBytes => format!("{} idle connections: proxy RSS per connection (KiB)", sizes.idle),
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Metric::UploadGbps | Metric::DownloadGbps => format!("{value:.2}"),
            Metric::IdleBytes => format!("{:.1}", value / 1024.0),
            _ => format!("{value:.0}"),
        }
    }
}

/// The workload sizes, for titles and the JSON.
pub struct Sizes {
    pub reps: usize,
    pub bulk_mib: u64,
    pub requests: usize,
    pub concurrent_requests: usize,
    pub concurrency: usize,
    pub idle: usize,
    /// Why `idle` is less than asked, if it is.
    pub idle_note: Option<String>,
    pub tls_connections: usize,
    pub tls_requests: usize,
    pub wrk_secs: u64,
    pub stall_connections: usize,
    pub upload_mib: u64,
    pub uploads: usize,
}

#[derive(Default)]
pub struct Results {
    runs: BTreeMap<(Metric, Way), Vec<f64>>,
    /// Failed requests, summed over runs, with the first error seen.
    errors: BTreeMap<(Metric, Way), (u64, String)>,
    /// The small tables, in the order measured.
    pub tables: Vec<Table>,
    /// Targets of the small tables, reported after the main ones.
    pub targets: Vec<Target>,
}

impl Results {
    pub fn add(&mut self, metric: Metric, way: Way, value: f64) {
        self.runs.entry((metric, way)).or_default().push(value);
    }

    pub fn add_errors(&mut self, metric: Metric, way: Way, count: u64, first: &str) {
        let entry = self.errors.entry((metric, way)).or_insert_with(|| (0, first.to_owned()));
        entry.0 += count;
    }

    pub fn median(&self, metric: Metric, way: Way) -> Option<f64> {
        median(self.runs.get(&(metric, way))?.clone())
    }

    /// The median over runs of `combine(a, b)`, each pair measured in the
    /// same run, so drift between runs cancels out.
    fn paired(&self, metric: Metric, a: Way, b: Way, combine: impl Fn(f64, f64) -> f64) -> Option<f64> {
        let (a, b) = (self.runs.get(&(metric, a))?, self.runs.get(&(metric, b))?);
        (a.len() == b.len()).then_some(())?;
        median(a.iter().zip(b).map(|(&a, &b)| combine(a, b)).collect())
    }

    fn ratio(&self, metric: Metric, way: Way) -> Option<f64> {
        self.paired(metric, way, Way::Direct, |way, direct| way / direct)
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[mid]),
        _ => Some((values[mid - 1] + values[mid]) / 2.0),
    }
}

pub struct Target {
    pub what: &'static str,
    pub measured: String,
    /// `None` when a figure it needs is missing.
    pub met: Option<bool>,
}

/// Which way a figure is better.
#[derive(Clone, Copy)]
pub enum Better {
    Lower,
    Higher,
}

impl Target {
    /// The agent's figure at or ahead of haproxy's in the same run (issue #25).
    pub fn versus_haproxy(what: &'static str, agent: Option<f64>, haproxy: Option<f64>, better: Better) -> Self {
        let met = agent.zip(haproxy).map(|(agent, haproxy)| match better {
            Better::Lower => agent <= haproxy,
            Better::Higher => agent >= haproxy,
        });
        let measured = match agent.zip(haproxy) {
            Some((agent, haproxy)) => format!("agent {}, haproxy {}", compact(agent), compact(haproxy)),
            None => "n/a".into(),
        };
        Self { what, measured, met }
    }

    /// A time in µs that should be at most `limit`.
    pub fn at_most_us(what: &'static str, measured: Option<f64>, limit: f64) -> Self {
        Self {
            what,
            measured: measured.map_or("n/a".into(), |us| format!("{us:.0} µs")),
            met: measured.map(|us| us <= limit),
        }
    }

    /// A ratio that should be at least `limit`.
    pub fn at_least_ratio(what: &'static str, measured: Option<f64>, limit: f64) -> Self {
        Self {
            what,
            measured: measured.map_or("n/a".into(), |ratio| format!("{ratio:.2}x")),
            met: measured.map(|ratio| ratio >= limit),
        }
    }
}

/// A column of a [`Table`].
#[derive(Clone, Copy)]
pub struct Column {
    pub key: &'static str,
    pub title: &'static str,
}

/// A row of a [`Table`].
#[derive(Clone, Copy)]
pub struct Row {
    pub key: &'static str,
    pub title: &'static str,
    pub decimals: usize,
}

/// A workload measured over columns of its own: per row and column, one
/// figure per run; the medians are shown.
pub struct Table {
    key: &'static str,
    title: String,
    /// What the rows mean, under the table.
    note: String,
    columns: Vec<Column>,
    /// In the order first added; per column, the runs.
    rows: Vec<(Row, Vec<Vec<f64>>)>,
}

impl Table {
    pub fn new(key: &'static str, title: String, note: String, columns: &[Column]) -> Self {
        Self { key, title, note, columns: columns.to_vec(), rows: Vec::new() }
    }

    pub fn add(&mut self, row: Row, column: Column, value: f64) {
        let at = self.column_index(column);
        let index = match self.rows.iter().position(|(r, _)| r.key == row.key) {
            Some(index) => index,
            None => {
                self.rows.push((row, vec![Vec::new(); self.columns.len()]));
                self.rows.len() - 1
            }
        };
        self.rows[index].1[at].push(value);
    }

    pub fn median(&self, row: Row, column: Column) -> Option<f64> {
        let at = self.column_index(column);
        median(self.rows.iter().find(|(r, _)| r.key == row.key)?.1[at].clone())
    }

    fn column_index(&self, column: Column) -> usize {
        self.columns.iter().position(|c| c.key == column.key).expect("a column of this table")
    }

    fn markdown(&self) -> String {
        let mut out = format!("**{}**\n\n|  |", self.title);
        for column in &self.columns {
            out += &format!(" {} |", column.title);
        }
        out += "\n|---|";
        out += &"---:|".repeat(self.columns.len());
        out += "\n";
        for (row, cells) in &self.rows {
            out += &format!("| {} |", row.title);
            for runs in cells {
                let cell = median(runs.clone()).map_or("—".into(), |value| format!("{value:.*}", row.decimals));
                out += &format!(" {cell} |");
            }
            out += "\n";
        }
        out + &format!("\n{}\n", self.note)
    }

    fn raw_markdown(&self) -> String {
        let mut out = String::new();
        for (row, cells) in &self.rows {
            for (column, runs) in self.columns.iter().zip(cells).filter(|(_, runs)| !runs.is_empty()) {
                let runs: Vec<String> = runs.iter().map(|v| format!("{v:.*}", row.decimals)).collect();
                out += &format!("| {}: {} | {} | {} |\n", self.key, row.title, column.title, runs.join(", "));
            }
        }
        out
    }

    fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|(row, cells)| {
                let cells: serde_json::Map<String, Value> = self
                    .columns
                    .iter()
                    .zip(cells)
                    .filter(|(_, runs)| !runs.is_empty())
                    .map(|(column, runs)| {
                        (column.key.to_owned(), json!({ "runs": runs, "median": median(runs.clone()) }))
                    })
                    .collect();
                json!({ "key": row.key, "title": row.title, "cells": cells })
            })
            .collect();
        json!({
            "key": self.key,
            "title": self.title,
            "note": self.note,
            "columns": self.columns.iter().map(|c| c.key).collect::<Vec<_>>(),
            "rows": rows,
        })
    }
}

pub fn targets(results: &Results) -> Vec<Target> {
    let mut targets = Vec::new();

    let up = results.ratio(Metric::UploadGbps, Way::Transparent);
    let down = results.ratio(Metric::DownloadGbps, Way::Transparent);
    targets.push(Target {
        what: "transparent passthrough throughput ≥ 0.9× direct",
        measured: format!("upload {}, download {}", times(up), times(down)),
        met: up.zip(down).map(|(up, down)| up >= 0.9 && down >= 0.9),
    });

    let added = results.paired(Metric::SequentialP50, Way::Transparent, Way::Direct, |agent, direct| agent - direct);
    targets.push(Target {
        what: "added latency per new connection (transparent, sequential p50) ≤ 50 µs",
        measured: added.map_or("n/a".into(), |added| format!("{added:.0} µs")),
        met: added.map(|added| added <= 50.0),
    });

    for (what, metrics) in [
        ("agent CONNECT throughput ≥ squid and tinyproxy", [Metric::UploadGbps, Metric::DownloadGbps]),
        ("agent CONNECT connection rate ≥ squid and tinyproxy", [Metric::SequentialRate, Metric::ConcurrentRate]),
    ] {
        let mut parts = Vec::new();
        let mut met = Some(true);
        for metric in metrics {
            for peer in [Way::Squid, Way::Tinyproxy] {
                let vs = results.paired(metric, Way::AgentConnect, peer, |agent, peer| agent / peer);
                let peer_name = peer.title().split(' ').next().unwrap_or_default();
                parts.push(format!("{} {} of {peer_name}", short(metric), times(vs)));
                met = met.zip(vs).map(|(met, vs)| met && vs >= 1.0);
            }
        }
        targets.push(Target { what, measured: parts.join(", "), met });
    }

    let transparent = results.median(Metric::IdleBytes, Way::Transparent);
    let connect = results.median(Metric::IdleBytes, Way::AgentConnect);
    targets.push(Target {
        what: "agent memory per idle connection ≤ 3.3 KiB",
        measured: format!("transparent {}, CONNECT {}", kib(transparent), kib(connect)),
        met: transparent.zip(connect).map(|(t, c)| t <= 3.3 * 1024.0 && c <= 3.3 * 1024.0),
    });

    // Every row of the main table: the agent (transparent) beside haproxy (TCP).
    for (what, metric, better) in [
        ("upload at or ahead of haproxy (Gbit/s)", Metric::UploadGbps, Better::Higher),
        ("download at or ahead of haproxy (Gbit/s)", Metric::DownloadGbps, Better::Higher),
        ("sequential p50 at or ahead of haproxy (µs)", Metric::SequentialP50, Better::Lower),
        ("sequential p99 at or ahead of haproxy (µs)", Metric::SequentialP99, Better::Lower),
        ("sequential connections/s at or ahead of haproxy", Metric::SequentialRate, Better::Higher),
        ("concurrent p50 at or ahead of haproxy (µs)", Metric::ConcurrentP50, Better::Lower),
        ("concurrent p99 at or ahead of haproxy (µs)", Metric::ConcurrentP99, Better::Lower),
        ("concurrent connections/s at or ahead of haproxy", Metric::ConcurrentRate, Better::Higher),
        ("memory per idle connection at or ahead of haproxy (bytes)", Metric::IdleBytes, Better::Lower),
    ] {
        let agent = results.median(metric, Way::Transparent);
        targets.push(Target::versus_haproxy(what, agent, results.median(metric, Way::Haproxy), better));
    }

    // The same for the kernel fast path of a `protocol: tcp` endpoint.
    let up = results.ratio(Metric::UploadGbps, Way::Kernel);
    let down = results.ratio(Metric::DownloadGbps, Way::Kernel);
    targets.push(Target {
        what: "kernel fast path throughput ≥ 0.9× direct",
        measured: format!("upload {}, download {}", times(up), times(down)),
        met: up.zip(down).map(|(up, down)| up >= 0.9 && down >= 0.9),
    });
    let added = results.paired(Metric::SequentialP50, Way::Kernel, Way::Direct, |agent, direct| agent - direct);
    targets.push(Target {
        what: "kernel fast path: added latency per new connection (sequential p50) ≤ 50 µs",
        measured: added.map_or("n/a".into(), |added| format!("{added:.0} µs")),
        met: added.map(|added| added <= 50.0),
    });
    let kernel_idle = results.median(Metric::IdleBytes, Way::Kernel);
    targets.push(Target {
        what: "kernel fast path: agent memory per idle connection ≤ 3.3 KiB",
        measured: kib(kernel_idle),
        met: kernel_idle.map(|bytes| bytes <= 3.3 * 1024.0),
    });
    for (what, metric, better) in [
        ("kernel fast path: upload at or ahead of haproxy (Gbit/s)", Metric::UploadGbps, Better::Higher),
        ("kernel fast path: download at or ahead of haproxy (Gbit/s)", Metric::DownloadGbps, Better::Higher),
        ("kernel fast path: sequential p50 at or ahead of haproxy (µs)", Metric::SequentialP50, Better::Lower),
        ("kernel fast path: sequential p99 at or ahead of haproxy (µs)", Metric::SequentialP99, Better::Lower),
        ("kernel fast path: sequential connections/s at or ahead of haproxy", Metric::SequentialRate, Better::Higher),
        ("kernel fast path: concurrent p50 at or ahead of haproxy (µs)", Metric::ConcurrentP50, Better::Lower),
        ("kernel fast path: concurrent p99 at or ahead of haproxy (µs)", Metric::ConcurrentP99, Better::Lower),
        ("kernel fast path: concurrent connections/s at or ahead of haproxy", Metric::ConcurrentRate, Better::Higher),
        (
            "kernel fast path: memory per idle connection at or ahead of haproxy (bytes)",
            Metric::IdleBytes,
            Better::Lower,
        ),
    ] {
        let agent = results.median(metric, Way::Kernel);
        targets.push(Target::versus_haproxy(what, agent, results.median(metric, Way::Haproxy), better));
    }
    targets
}

/// A figure with as many decimals as its size needs.
fn compact(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn times(ratio: Option<f64>) -> String {
    ratio.map_or("n/a".into(), |ratio| format!("{ratio:.2}×"))
}

fn kib(bytes: Option<f64>) -> String {
    bytes.map_or("n/a".into(), |bytes| format!("{:.1} KiB", bytes / 1024.0))
}

fn short(metric: Metric) -> &'static str {
    match metric {
        Metric::UploadGbps => "upload",
        Metric::DownloadGbps => "download",
        Metric::SequentialRate => "sequential",
        Metric::ConcurrentRate => "concurrent",
        _ => metric.key(),
    }
}

/// The summary table, the targets, and (with `raw`) every run.
pub fn markdown(results: &Results, sizes: &Sizes, header: &str, raw: bool) -> String {
    let mut out = format!("{header}\n\n");
    out += "| workload |";
    for way in Way::ALL {
        out += &format!(" {} |", way.title());
    }
    out += "\n|---|";
    out += &"---:|".repeat(Way::ALL.len());
    out += "\n";
    let mut footnotes = Vec::new();
    for metric in Metric::ALL {
        out += &format!("| {} |", metric.title(sizes));
        for way in Way::ALL {
            let cell = match results.median(metric, way) {
                None => "—".to_owned(),
                Some(value) => {
                    let mut cell = metric.format(value);
                    if way != Way::Direct {
                        if let Some(ratio) = results.ratio(metric, way) {
                            cell += &format!(" ({ratio:.2}×)");
                        }
                    }
                    if let Some((count, first)) = results.errors.get(&(metric, way)) {
                        footnotes.push(format!(
                            "{} / {}: {count} failed requests, e.g. {first}",
                            way.title(),
                            metric.title(sizes)
                        ));
                        cell += &format!(" [{}]", footnotes.len());
                    }
                    cell
                }
            };
            out += &format!(" {cell} |");
        }
        out += "\n";
    }
    out += &format!(
        "\nMedians of {} runs; (×) is the median of the ratios to direct in the same run (for latency, higher is worse). \
         Idle memory is measured for proxies only: direct has none.\n",
        sizes.reps
    );
    if let Some(note) = &sizes.idle_note {
        out += &format!("{note}\n");
    }
    for (n, footnote) in footnotes.iter().enumerate() {
        out += &format!("[{}] {footnote}\n", n + 1);
    }
    for table in &results.tables {
        out += &format!("\n{}", table.markdown());
    }
    out += "\n| target | measured | met |\n|---|---|---|\n";
    for target in targets(results).iter().chain(&results.targets) {
        let met = match target.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        out += &format!("| {} | {} | {met} |\n", target.what, target.measured);
    }
    if raw {
        out += "\n### Every run\n\n| workload | way | runs |\n|---|---|---|\n";
        for ((metric, way), runs) in &results.runs {
            let runs: Vec<String> = runs.iter().map(|&v| metric.format(v)).collect();
            out += &format!("| {} | {} | {} |\n", metric.title(sizes), way.title(), runs.join(", "));
        }
        for table in &results.tables {
            out += &table.raw_markdown();
        }
    }
    out
}

pub fn json(results: &Results, sizes: &Sizes, machine: Value) -> Value {
    let mut figures = Vec::new();
    for ((metric, way), runs) in &results.runs {
        let errors = results.errors.get(&(*metric, *way));
        figures.push(json!({
            "metric": metric.key(),
            "way": way.key(),
            "runs": runs,
            "median": results.median(*metric, *way),
            "ratio_to_direct": results.ratio(*metric, *way),
            "failed_requests": errors.map_or(0, |e| e.0),
            "first_error": errors.map(|e| e.1.clone()),
        }));
    }
    let targets: Vec<Value> = targets(results)
        .iter()
        .chain(&results.targets)
        .map(|t| json!({ "target": t.what, "measured": t.measured, "met": t.met }))
        .collect();
    json!({
        "machine": machine,
        "sizes": {
            "runs": sizes.reps,
            "bulk_mib": sizes.bulk_mib,
            "sequential_requests": sizes.requests,
            "concurrent_requests": sizes.concurrent_requests,
            "concurrency": sizes.concurrency,
            "idle_connections": sizes.idle,
            "idle_note": sizes.idle_note,
            "tls_connections": sizes.tls_connections,
            "tls_requests_per_connection": sizes.tls_requests,
            "wrk_secs": sizes.wrk_secs,
            "stall_connections": sizes.stall_connections,
            "upload_mib": sizes.upload_mib,
            "uploads": sizes.uploads,
        },
        "figures": figures,
        "tables": results.tables.iter().map(Table::json).collect::<Vec<_>>(),
        "targets": targets,
    })
}
