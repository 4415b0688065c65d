//! `tracing` set-up. eBPF traces (aya-log) reach tracing through the `log`
//! bridge that `init()` installs.
//!
//! Log lines carry strings the sandbox chose (comm, SNI, Host, request
//! targets, DNS names, and errors quoting them). None may forge a line or
//! drive the reader's terminal: JSON output escapes control characters by
//! itself, and the text format writes every field and message through
//! [`EscapeControls`].
//!
//! Every line names the daemon's process (`agent_pid`): during an upgrade
//! two daemons write to the same log, and each finishes its own connections.
//!
//! `ocsf` writes each line as an OCSF event (see [`crate::observe::ocsf`]),
//! with the lines of target [`ACTIVITY`] (connection opens, DNS queries)
//! always on; the other formats show those only at `debug`.

use std::{
    fmt::{self, Write as _},
    io::IsTerminal,
    time::UNIX_EPOCH,
};

use serde_json::{Map, Value};
use tracing::{field::Field, Event, Subscriber};
use tracing_subscriber::{
    field::{RecordFields, Visit},
    fmt::{
        format::{JsonFields, Writer},
        time::{FormatTime, SystemTime},
        FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter,
    },
    registry::LookupSpan,
    util::SubscriberInitExt,
    EnvFilter,
};

use crate::observe::ocsf::{self, ACTIVITY};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Text,
    /// One JSON object per line, fields flattened: what tests and log shippers read.
    Json,
    /// One OCSF 1.8.0 event per line (JSON): for SIEMs.
    Ocsf,
}

pub fn init(format: Format) {
    let filter = EnvFilter::try_from_env("SANDBOX_EGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    subscriber(format, filter, std::io::stderr, std::io::stderr().is_terminal()).init();
}

fn subscriber<W>(format: Format, filter: EnvFilter, writer: W, ansi: bool) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = match format {
        Format::Ocsf => filter.add_directive(format!("{ACTIVITY}=debug").parse().expect("a valid directive")),
        Format::Text | Format::Json => filter,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        Format::Text => Box::new(builder.fmt_fields(EscapedFields).with_timer(TimeAndPid).finish()),
        Format::Json => Box::new(builder.fmt_fields(JsonFields::new()).event_format(FlatJson).finish()),
        Format::Ocsf => Box::new(builder.fmt_fields(JsonFields::new()).event_format(Ocsf).finish()),
    }
}

/// The text format's timestamp, followed by `agent_pid=PID`.
struct TimeAndPid;

impl FormatTime for TimeAndPid {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        SystemTime.format_time(writer)?;
        write!(writer, " agent_pid={}", std::process::id())
    }
}

/// One JSON object per line: timestamp, level, target, the event's fields,
/// and the fields of the spans it happened in (the `sandbox` a connection,
/// DNS query or reload belongs to), all at the top level.
struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut object = flat_fields(ctx, event);
        object.insert("timestamp".into(), timestamp.into());
        object.insert("level".into(), event.metadata().level().as_str().into());
        writeln!(writer, "{}", Value::Object(object))
    }
}

/// The fields of the spans `event` happened in, its own, and its target.
fn flat_fields<S>(ctx: &FmtContext<'_, S, JsonFields>, event: &Event<'_>) -> Map<String, Value>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut object = Map::new();
    for span in ctx.event_scope().into_iter().flat_map(|scope| scope.from_root()) {
        let extensions = span.extensions();
        let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else { continue };
        if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
            object.extend(fields);
        }
    }
    event.record(&mut JsonVisitor(&mut object));
    object.insert("target".into(), event.metadata().target().into());
    object.insert("agent_pid".into(), std::process::id().into());
    object
}

/// One OCSF event per line, from the same fields as [`FlatJson`]'s.
struct Ocsf;

impl<S> FormatEvent<S, JsonFields> for Ocsf
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let time_ms = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis());
        let level = event.metadata().level().as_str();
        let event = ocsf::event(flat_fields(ctx, event), level, u64::try_from(time_ms).unwrap_or(u64::MAX));
        writeln!(writer, "{event}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(key(field), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(key(field), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(key(field), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(key(field), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(key(field), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !field.name().starts_with("log.") {
            self.0.insert(key(field), format!("{value:?}").into());
        }
    }
}

fn key(field: &Field) -> String {
    field.name().trim_start_matches("r#").to_owned()
}

/// The text format's fields, as tracing-subscriber's default writes them
/// (`message key=value ...`, `log.*` metadata left out), with control and
/// invisible characters escaped: tracing-subscriber escapes `Debug` string
/// values, but neither messages nor `%` (Display) values.
struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor { writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let separator = if std::mem::take(&mut self.first) { "" } else { " " };
        self.result = match name {
            "message" => write!(self.writer, "{separator}"),
            name => write!(self.writer, "{separator}{}=", name.trim_start_matches("r#")),
        }
        .and_then(|()| write!(EscapeControls(&mut self.writer), "{value:?}"));
    }
}

/// Writes through to `W` with control characters (`\n`, `\r`, ESC, DEL, C1),
/// line separators and invisible formatting characters (bidi overrides)
/// written as Rust escapes (`\n`, `\u{1b}`). Backslashes and quotes pass
/// unchanged, so `Debug` output that already escaped them is not escaped
/// twice.
struct EscapeControls<W>(W);

impl<W: fmt::Write> fmt::Write for EscapeControls<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            match c {
                '\\' | '\'' | '"' => self.0.write_char(c)?,
                c => write!(self.0, "{}", c.escape_debug())?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// One event carrying sandbox strings everywhere one can go, logged in `format`.
    fn log_sandbox_strings(format: Format) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(format, EnvFilter::new("info"), move || writer.clone(), false);
        let lossy = String::from_utf8_lossy(b"bad\xff\nFORGED");
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                comm = "x\nFORGED",
                host = %"h\x1b[31mred",
                target = ?"t\r\nFORGED",
                name = lossy.as_ref(),
                "DNS: refused {} (A)",
                "n\nFORGED \u{202e}\u{85}"
            );
        });
        let output = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        output
    }

    #[test]
    fn text_lines_cannot_be_forged_nor_carry_terminal_escapes() {
        let line = log_sandbox_strings(Format::Text);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.ends_with('\n'));
        assert!(!line.chars().any(|c| c != '\n' && (c.is_control() || c == '\u{202e}')), "{line:?}");
        for expected in [
            r"DNS: refused n\nFORGED \u{202e}\u{85} (A)",
            r#"comm="x\nFORGED""#,
            r"host=h\u{1b}[31mred",
            r#"target="t\r\nFORGED""#,
            "name=\"bad\u{fffd}\\nFORGED\"",
            &format!("agent_pid={}", std::process::id()),
        ] {
            assert!(line.contains(expected), "{expected} in {line}");
        }
    }

    #[test]
    fn json_lines_cannot_be_forged() {
        let line = log_sandbox_strings(Format::Json);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(!line.contains('\x1b'));
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["comm"], "x\nFORGED");
        assert_eq!(event["host"], "h\x1b[31mred");
        assert_eq!(event["agent_pid"], std::process::id());
    }

    #[test]
    fn ocsf_lines_cannot_be_forged_and_are_events() {
        let line = log_sandbox_strings(Format::Ocsf);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["class_uid"], 0);
        assert_eq!(event["severity_id"], 3, "a warning");
        assert_eq!(event["unmapped"]["comm"], "x\nFORGED");
        assert!(event["message"].as_str().unwrap().starts_with("DNS: refused n\nFORGED"));
    }

    #[test]
    fn activity_lines_are_on_in_ocsf_only() {
        let lines = |format| {
            let buffer = Buffer::default();
            let writer = buffer.clone();
            let subscriber = subscriber(format, EnvFilter::new("info"), move || writer.clone(), false);
            tracing::subscriber::with_default(subscriber, || {
                tracing::debug!(target: ACTIVITY, event = "dns", name = "a.test", verdict = "refused");
                tracing::debug!(event = "other_debug");
            });
            let output = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
            output.lines().map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()).collect::<Vec<_>>()
        };
        let ocsf = lines(Format::Ocsf);
        assert_eq!(ocsf.len(), 1, "{ocsf:?}");
        assert_eq!(ocsf[0]["class_uid"], 4003);
        assert!(lines(Format::Json).is_empty());
    }

    #[test]
    fn escaping_leaves_quotes_and_backslashes() {
        let mut out = String::new();
        fmt::Write::write_str(&mut EscapeControls(&mut out), "a\\n'b\"\tc\u{7f}é").unwrap();
        assert_eq!(out, r#"a\n'b"\tc\u{7f}é"#);
    }
}
