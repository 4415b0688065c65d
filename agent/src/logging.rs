//! `tracing` set-up. eBPF traces (aya-log) reach tracing through the `log`
//! bridge that `init()` installs.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Text,
    /// One JSON object per line, fields flattened: what tests and log shippers read.
    Json,
}

pub fn init(format: Format) {
    let filter = EnvFilter::try_from_env("SANDBOX_EGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        Format::Text => builder.init(),
        Format::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}
