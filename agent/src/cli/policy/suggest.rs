//! `sandbox-egress policy suggest`: allow rules written from the running
//! daemon's recent denials (the control socket's `recent_denials`).
//!
//! One `network_policies` entry per binary and host, one endpoint per
//! port: the host (a name, or an address for a stream without one), the
//! port and the binary exactly as denied, never a wildcard; for requests
//! the rules refused, an allow rule with their method and path. Before
//! anything is printed, the result (with `--merge FILE`, FILE with the
//! entries added) is loaded and each denial is evaluated against it as
//! `policy eval` would: what does not load or still denies is dropped,
//! with a comment saying why.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_norway::Value as Yaml;

use super::{evaluate_http, Offline};
use crate::{
    control::{self, ControlRequest, DEFAULT_CONTROL_SOCKET},
    policy::{Policy, Request},
    ssrf::AddressClass,
};

#[derive(clap::Args)]
pub struct SuggestArgs {
    /// Only this sandbox's denials (needed when several sandboxes have some).
    #[arg(long)]
    sandbox: Option<String>,
    /// Only denials seen within this long, e.g. 90s, 10m, 1h (the daemon
    /// keeps an hour).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// The daemon's control socket.
    #[arg(long, visible_alias = "socket", value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// Print FILE with the suggestions added to its network_policies.
    #[arg(long, value_name = "FILE")]
    merge: Option<PathBuf>,
}

/// A row of the daemon's recent denials (see `observe::DenialRow`).
#[derive(Deserialize)]
struct Row {
    sandbox: String,
    host: String,
    port: u16,
    binary: Option<String>,
    connections_denied: u64,
    last_seen: u64,
    last_reason: String,
    last_kind: String,
    last_protocol: String,
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    requests: Vec<RequestRow>,
    #[serde(default)]
    requests_not_kept: u64,
}

#[derive(Deserialize)]
struct RequestRow {
    method: String,
    path: String,
    #[serde(default)]
    call: Option<String>,
    count: u64,
}

pub fn run(args: SuggestArgs) -> Result<()> {
    let request = ControlRequest::RecentDenials {
        sandbox: args.sandbox.clone(),
        since_seconds: args.since.map(|since| since.as_secs()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = runtime.block_on(control::request(&args.control_socket, &request))?;
    let rows: Vec<Row> = serde_json::from_value(reply["denials"].clone()).context("the agent's denials")?;
    let sandboxes: BTreeSet<&str> = rows.iter().map(|row| row.sandbox.as_str()).collect();
    if sandboxes.len() > 1 {
        let names: Vec<&str> = sandboxes.into_iter().collect();
        bail!("denials from several sandboxes ({}): name one with --sandbox", names.join(", "));
    }
    let original = match &args.merge {
        Some(file) => Some(std::fs::read_to_string(file).with_context(|| format!("--merge {}", file.display()))?),
        None => None,
    };
    let mut about = match names_one(&args.sandbox, &rows) {
        Some(sandbox) => format!("the recent denials of sandbox {sandbox}"),
        None => "the recent denials".to_owned(),
    };
    if let Some(since) = args.since {
        about.push_str(&format!(" within {}", humantime::format_duration(since)));
    }
    let shown = args.merge.as_deref().map(Path::display).map(|file| file.to_string());
    print!("{}", suggest(&rows, original.as_deref(), shown.as_deref(), &about)?);
    Ok(())
}

fn names_one<'a>(asked: &'a Option<String>, rows: &'a [Row]) -> Option<&'a str> {
    asked.as_deref().or_else(|| rows.first().map(|row| row.sandbox.as_str()))
}

/// The YAML to print: standalone, or `original` (named `file`) with the
/// entries added; loaded and checked against each denial first.
fn suggest(rows: &[Row], original: Option<&str>, file: Option<&str>, about: &str) -> Result<String> {
    let existing = match original {
        Some(text) => Some(serde_norway::from_str::<Yaml>(text).context("--merge: not YAML")?),
        None => None,
    };
    let (mut entries, mut notes) = plan(rows, existing.as_ref());
    if let (Some(text), Some(file)) = (original, file) {
        let policy = load_quiet(text).with_context(|| format!("--merge {file}"))?;
        for item in allowed_items(&policy, &entries) {
            notes.push(format!("{}: already allowed by {file}", item.describe(&entries)));
            item.remove(&mut entries);
        }
        prune(&mut entries);
    }
    for _pass in 0..3 {
        let text = assemble(&entries, &notes, original, about)?;
        let policy = match load_quiet(&text) {
            Ok(policy) => policy,
            Err(error) if entries.len() > 1 => {
                // Find the entries that do not load (with FILE) on their own.
                let (total, mut kept) = (entries.len(), Vec::new());
                for entry in entries.drain(..) {
                    let alone = assemble(std::slice::from_ref(&entry), &[], original, about)?;
                    match load_quiet(&alone) {
                        Ok(_) => kept.push(entry),
                        Err(error) => notes.push(format!(
                            "{}: does not load: {}",
                            entry.describe(),
                            escaped(&format!("{error:#}"))
                        )),
                    }
                }
                if kept.len() == total {
                    return Err(error).context("the suggestions do not load");
                }
                entries = kept;
                continue;
            }
            Err(error) => {
                let Some(entry) = entries.pop() else { return Err(error).context("the policy does not load") };
                notes.push(format!("{}: does not load: {}", entry.describe(), escaped(&format!("{error:#}"))));
                continue;
            }
        };
        let failed = failures(&policy, &entries);
        if failed.is_empty() {
            return Ok(text);
        }
        for (item, why) in failed {
            notes.push(format!("{}: still denied: {why}", item.describe(&entries)));
            item.remove(&mut entries);
        }
        prune(&mut entries);
    }
    bail!("the suggestions could not be checked")
}

/// One suggested policy: a binary and a host, an endpoint per port.
#[derive(Clone)]
struct Entry {
    name: String,
    binary: String,
    host: String,
    ports: BTreeMap<u16, Port>,
}

#[derive(Clone, Default)]
struct Port {
    /// Connections denied, if suggested: (count, protocol, reason).
    connection: Option<(u64, String, String)>,
    /// Needed in `allowed_ips`: the private-IP gate's address for plain
    /// HTTP, or a sensitive address a name stood for.
    allowed_ip: Option<IpAddr>,
    /// The address decided on, for the check.
    address: Option<IpAddr>,
    plain_http: bool,
    /// (method, path) -> how often denied.
    rules: BTreeMap<(String, String), u64>,
    last_seen: u64,
    /// `protocol`, `enforcement`, `tls`, `allow_encoded_slash` of the
    /// inspected endpoint already there (in --merge FILE), which another
    /// inspected endpoint of its host and port must agree with.
    inspected_as: Vec<(&'static str, String)>,
}

impl Entry {
    fn describe(&self) -> String {
        format!("{} -> {}", escaped(&self.binary), escaped(&self.host))
    }
}

/// What `policy suggest` works from, grouped; and notes on what it cannot
/// suggest.
fn plan(rows: &[Row], existing: Option<&Yaml>) -> (Vec<Entry>, Vec<String>) {
    let mut taken: BTreeSet<String> = existing
        .and_then(|file| file.get("network_policies"))
        .and_then(Yaml::as_mapping)
        .map(|policies| policies.keys().filter_map(Yaml::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let mut entries: BTreeMap<(String, String), Entry> = BTreeMap::new();
    let mut notes = Vec::new();
    for row in rows {
        let what = format!(
            "{} -> {}:{}",
            escaped(row.binary.as_deref().unwrap_or("(unknown binary)")),
            escaped(&row.host),
            row.port
        );
        let Some(binary) = row.binary.clone() else {
            notes.push(format!("{what}: the binary is unknown (the process exited before the agent read it)"));
            continue;
        };
        if has_glob(&binary) || has_glob(&row.host) {
            notes.push(format!("{what}: a glob character in the binary or host would match more than was denied"));
            continue;
        }
        let key = (binary.clone(), row.host.clone());
        let entry = entries.entry(key).or_insert_with(|| Entry {
            name: unique_name(&binary, &row.host, &mut taken),
            binary,
            host: row.host.clone(),
            ports: BTreeMap::new(),
        });
        let port = entry.ports.entry(row.port).or_default();
        port.address = row.address.or(port.address);
        port.last_seen = port.last_seen.max(row.last_seen);
        port.plain_http |= row.last_protocol == "http";
        port.inspected_as = existing.map(|file| inspected_as(file, &row.host, row.port)).unwrap_or_default();
        if row.connections_denied > 0 {
            match connection_allowance(row) {
                Ok(allowed_ip) => {
                    port.allowed_ip = allowed_ip;
                    port.connection =
                        Some((row.connections_denied, row.last_protocol.clone(), row.last_reason.clone()));
                }
                Err(why) => notes.push(format!("{what}: {why}")),
            }
        } else if row.requests.is_empty() {
            notes.push(format!("{what}: {} ({}): not a policy's to allow", row.last_kind, escaped(&row.last_reason)));
        }
        let protocol = port.inspected_as.iter().find(|(key, _)| *key == "protocol").map(|(_, value)| value.as_str());
        for request in &row.requests {
            let line = format!("{what}: {} {}", escaped(&request.method), escaped(&request.path));
            if let Some(call) = &request.call {
                notes.push(format!("{line}: the call {call} was denied: rules for calls are written by hand"));
            } else if has_glob(&request.path) {
                notes.push(format!("{line}: a glob character in the path would match more than was denied"));
            } else if protocol.is_some_and(|protocol| !matches!(protocol, "rest" | "websocket")) {
                notes
                    .push(format!("{line}: its endpoint is {}: rules are written by hand", escaped(protocol.unwrap())));
            } else {
                *port.rules.entry((request.method.clone(), request.path.clone())).or_default() += request.count;
            }
        }
        if row.requests_not_kept > 0 {
            notes.push(format!(
                "{what}: {} more denied requests were not kept (over 16 per destination, or a path over 1 KiB)",
                row.requests_not_kept
            ));
        }
    }
    let mut entries: Vec<Entry> = entries.into_values().collect();
    prune(&mut entries);
    (entries, notes)
}

/// The `allowed_ips` a denied connection needs besides its host, port and
/// binary; `Err`: why no rule can allow it.
fn connection_allowance(row: &Row) -> Result<Option<IpAddr>, String> {
    let literal = row.host.parse::<IpAddr>().ok();
    match row.last_kind.as_str() {
        "policy_denied" | "ssrf_denied" => {}
        kind => return Err(format!("{kind} ({}): not a policy's to allow", escaped(&row.last_reason))),
    }
    let class = row.address.map(AddressClass::of);
    if row.last_protocol == "http" {
        // The private-IP gate: plain HTTP goes only to listed private (or listed sensitive) addresses.
        return match (row.address, class) {
            (Some(address), Some(class)) if class == AddressClass::Private || class.is_sensitive() => Ok(Some(address)),
            _ => Err("plain HTTP is relayed only to private addresses (the private-IP gate): use HTTPS".into()),
        };
    }
    match (row.address, class) {
        (Some(address), Some(class)) if class.is_sensitive() && literal != Some(address) => Ok(Some(address)),
        _ => Ok(None),
    }
}

/// `protocol`, `enforcement`, `tls`, `allow_encoded_slash` of an inspected
/// endpoint of `host` and `port` without `path` in `file`.
fn inspected_as(file: &Yaml, host: &str, port: u16) -> Vec<(&'static str, String)> {
    let endpoints = file
        .get("network_policies")
        .and_then(Yaml::as_mapping)
        .into_iter()
        .flat_map(|policies| policies.values())
        .filter_map(|policy| policy.get("endpoints")?.as_sequence())
        .flatten();
    for endpoint in endpoints {
        let same_host = endpoint.get("host").and_then(Yaml::as_str).is_some_and(|h| h.eq_ignore_ascii_case(host));
        let ports = endpoint.get("ports").and_then(Yaml::as_sequence).filter(|ports| !ports.is_empty());
        let same_port = match ports {
            Some(ports) => ports.iter().any(|p| p.as_u64() == Some(u64::from(port))),
            None => endpoint.get("port").and_then(Yaml::as_u64) == Some(u64::from(port)),
        };
        let inspected = ["protocol", "rules", "access"].iter().any(|key| endpoint.get(key).is_some());
        if same_host && same_port && inspected && endpoint.get("path").is_none() {
            return ["protocol", "enforcement", "tls", "allow_encoded_slash"]
                .into_iter()
                .filter_map(|key| {
                    let value = match endpoint.get(key)? {
                        Yaml::String(text) => text.clone(),
                        Yaml::Bool(flag) => flag.to_string(),
                        _ => return None,
                    };
                    Some((key, value))
                })
                .collect();
        }
    }
    Vec::new()
}

/// Something suggested, to check and, if need be, take out.
#[derive(Clone)]
enum Item {
    Connection { entry: usize, port: u16 },
    Rule { entry: usize, port: u16, method: String, path: String },
}

impl Item {
    fn describe(&self, entries: &[Entry]) -> String {
        match self {
            Item::Connection { entry, port } => format!("{}:{port}", entries[*entry].describe()),
            Item::Rule { entry, port, method, path } => {
                format!("{}:{port} {} {}", entries[*entry].describe(), escaped(method), escaped(path))
            }
        }
    }

    fn remove(&self, entries: &mut [Entry]) {
        match self {
            Item::Connection { entry, port } => {
                if let Some(port) = entries[*entry].ports.get_mut(port) {
                    port.connection = None;
                }
            }
            Item::Rule { entry, port, method, path } => {
                if let Some(port) = entries[*entry].ports.get_mut(port) {
                    port.rules.remove(&(method.clone(), path.clone()));
                }
            }
        }
    }
}

fn items(entries: &[Entry]) -> Vec<Item> {
    let mut items = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        for (&port, plan) in &entry.ports {
            if plan.connection.is_some() {
                items.push(Item::Connection { entry: index, port });
            }
            for (method, path) in plan.rules.keys() {
                items.push(Item::Rule { entry: index, port, method: method.clone(), path: path.clone() });
            }
        }
    }
    items
}

/// Whether `policy` allows `item` as the agent would decide it (and as
/// `policy eval` does): `Err` says why not.
fn allows(policy: &Policy, entries: &[Entry], item: &Item) -> Result<(), String> {
    let (entry, port) = match item {
        Item::Connection { entry, port } | Item::Rule { entry, port, .. } => (&entries[*entry], *port),
    };
    let plan = &entry.ports[&port];
    let literal = entry.host.parse::<IpAddr>().ok();
    let request = Request {
        host: literal.is_none().then_some(entry.host.as_str()),
        ip: literal.or(plan.address),
        port,
        binary: Some(Path::new(&entry.binary)),
        ancestors: &[],
        uid: 0,
        cgroup_id: 0,
    };
    let decision = policy.evaluate(&request).map_err(|error| format!("{error:#}"))?;
    if !decision.allow {
        return Err(decision.reason.unwrap_or_else(|| "denied".into()));
    }
    let Item::Rule { method, path, .. } = item else { return Ok(()) };
    let offline = Offline {
        method: method.clone(),
        target: path.clone(),
        query: Vec::new(),
        headers: Vec::new(),
        body: Vec::new(),
        websocket_message: None,
        plain_http: plan.plain_http,
    };
    let outcome = evaluate_http(policy, &request, &decision, &offline).map_err(|error| format!("{error:#}"))?;
    match outcome.verdict {
        "allow" => Ok(()),
        verdict => Err(format!("the request's verdict is {verdict}")),
    }
}

fn failures(policy: &Policy, entries: &[Entry]) -> Vec<(Item, String)> {
    items(entries)
        .into_iter()
        .filter_map(|item| allows(policy, entries, &item).err().map(|why| (item, escaped(&why))))
        .collect()
}

fn allowed_items(policy: &Policy, entries: &[Entry]) -> Vec<Item> {
    items(entries).into_iter().filter(|item| allows(policy, entries, item).is_ok()).collect()
}

/// Drops endpoints with nothing left to allow, and entries with no endpoint.
fn prune(entries: &mut Vec<Entry>) {
    for entry in entries.iter_mut() {
        entry.ports.retain(|_, port| port.connection.is_some() || !port.rules.is_empty());
    }
    entries.retain(|entry| !entry.ports.is_empty());
}

/// The text printed: a file of its own, or `original` with the entries in
/// its `network_policies`.
fn assemble(entries: &[Entry], notes: &[String], original: Option<&str>, about: &str) -> Result<String> {
    let mut header = vec![
        format!("Suggested by `sandbox-egress policy suggest` from {about}:"),
        "each entry allows exactly what was denied (host, port, binary; method and path of denied requests)."
            .to_owned(),
    ];
    if entries.is_empty() {
        header.push("Nothing to suggest.".into());
    }
    header.extend(notes.iter().map(|note| format!("Not suggested: {note}")));
    let Some(original) = original else {
        let mut text: String = header.iter().map(|line| format!("# {line}\n")).collect();
        text.push_str("version: 1\n");
        if entries.is_empty() {
            text.push_str("network_policies: {}\n");
        } else {
            text.push_str("network_policies:\n");
            entries.iter().for_each(|entry| render(entry, 2, &mut text));
        }
        return Ok(text);
    };
    let place = insertion(original)?;
    let indent = " ".repeat(place.indent);
    let mut block: String = header.iter().map(|line| format!("{indent}# {line}\n")).collect();
    entries.iter().for_each(|entry| render(entry, place.indent, &mut block));
    let merged = format!("{}{}{block}{}", &original[..place.at], place.key, &original[place.at + place.replaced..]);
    check_merge(original, &merged, entries)?;
    Ok(merged)
}

fn render(entry: &Entry, indent: usize, out: &mut String) {
    let pad = |extra: usize| " ".repeat(indent + extra);
    for (port, plan) in &entry.ports {
        let when = timestamp(plan.last_seen);
        if let Some((count, protocol, reason)) = &plan.connection {
            out.push_str(&format!(
                "{}# {}:{port}: {count} {} denied ({}), last {when}: {}\n",
                pad(0),
                entry.describe(),
                if *count == 1 { "connection" } else { "connections" },
                escaped(protocol),
                escaped(reason)
            ));
        }
        for ((method, path), count) in &plan.rules {
            out.push_str(&format!(
                "{}# {}:{port}: {} {} denied {count} {}, last {when}\n",
                pad(0),
                entry.describe(),
                escaped(method),
                escaped(path),
                if *count == 1 { "time" } else { "times" }
            ));
        }
    }
    out.push_str(&format!("{}{}:\n{}endpoints:\n", pad(0), entry.name, pad(2)));
    for (port, plan) in &entry.ports {
        out.push_str(&format!("{}- host: {}\n{}port: {port}\n", pad(4), quoted(&entry.host), pad(6)));
        if let Some(ip) = plan.allowed_ip {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            out.push_str(&format!("{}allowed_ips: [{}]\n", pad(6), quoted(&format!("{ip}/{prefix}"))));
        }
        if plan.rules.is_empty() {
            continue;
        }
        let mut inspected_as = plan.inspected_as.clone();
        for (key, default) in [("protocol", "rest"), ("enforcement", "enforce")] {
            if !inspected_as.iter().any(|(known, _)| *known == key) {
                inspected_as.push((key, default.to_owned()));
            }
        }
        for (key, value) in &inspected_as {
            let value = if *key == "allow_encoded_slash" { value.clone() } else { quoted(value) };
            out.push_str(&format!("{}{key}: {value}\n", pad(6)));
        }
        out.push_str(&format!("{}rules:\n", pad(6)));
        for (method, path) in plan.rules.keys() {
            out.push_str(&format!("{}- allow: {{ method: {}, path: {} }}\n", pad(8), quoted(method), quoted(path)));
        }
    }
    out.push_str(&format!("{}binaries:\n{}- path: {}\n", pad(2), pad(4), quoted(&entry.binary)));
}

/// Where entries go in a file: after the last line of its
/// `network_policies` block, at its entries' indentation.
struct Insertion {
    /// Byte offset in the file, and how many bytes from there the entries
    /// replace (a `network_policies: {}` line).
    at: usize,
    replaced: usize,
    indent: usize,
    /// The key line to write first, when the file has none (or `{}`).
    key: String,
}

fn insertion(original: &str) -> Result<Insertion> {
    let mut offset = 0;
    let mut found = None;
    for line in original.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        if let Some(rest) = line.strip_prefix("network_policies:") {
            found = Some((start, offset, rest));
            break;
        }
    }
    let Some((start, mut end, rest)) = found else {
        let newline = if original.is_empty() || original.ends_with('\n') { "" } else { "\n" };
        return Ok(Insertion {
            at: original.len(),
            replaced: 0,
            indent: 2,
            key: format!("{newline}network_policies:\n"),
        });
    };
    let value = rest.split(" #").next().unwrap_or_default().trim();
    match value {
        "" => {}
        "{}" => {
            // `network_policies: {}` becomes a block of the entries.
            let key = "network_policies:\n".to_owned();
            return Ok(Insertion { at: start, replaced: end - start, indent: 2, key });
        }
        _ => bail!("--merge: network_policies is written in flow style ({value}): write it as a block to merge into"),
    }
    let mut indent = None;
    let mut position = end;
    for line in original[end..].split_inclusive('\n') {
        position += line.len();
        let trimmed = line.trim_start_matches(' ');
        if trimmed.trim().is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let leading = line.len() - trimmed.len();
        if leading == 0 {
            break;
        }
        indent.get_or_insert(leading);
        end = position;
    }
    let newline = if original[..end].ends_with('\n') { "" } else { "\n" };
    Ok(Insertion { at: end, replaced: 0, indent: indent.unwrap_or(2), key: newline.to_owned() })
}

/// The merged file must be the original plus the entries, nothing moved.
fn check_merge(original: &str, merged: &str, entries: &[Entry]) -> Result<()> {
    let before: Yaml = serde_norway::from_str(original).context("--merge: not YAML")?;
    let after: Yaml = serde_norway::from_str(merged).context("the merged file is not YAML")?;
    let policies = |file: &Yaml| file.get("network_policies").and_then(Yaml::as_mapping).cloned().unwrap_or_default();
    let (mut kept, added) = (policies(&before), policies(&after));
    for entry in entries {
        let Some(value) = added.get(entry.name.as_str()) else {
            bail!("--merge: the entries could not be added to the file's network_policies");
        };
        kept.insert(Yaml::String(entry.name.clone()), value.clone());
    }
    let others = |file: &Yaml| {
        let mut file = file.as_mapping().cloned().unwrap_or_default();
        file.remove("network_policies");
        file
    };
    if kept != added || others(&before) != others(&after) {
        bail!("--merge: the entries could not be added without changing the rest of the file");
    }
    Ok(())
}

/// A policy loaded without its warnings on stderr (the file is loaded
/// again by whoever uses it).
fn load_quiet(text: &str) -> Result<Policy> {
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || Policy::from_yaml(text))
}

/// `<binary's file name>-<host>` in the characters of a plain YAML key,
/// made unique.
fn unique_name(binary: &str, host: &str, taken: &mut BTreeSet<String>) -> String {
    let file = binary.rsplit('/').next().unwrap_or(binary);
    let base: String = format!("{file}-{host}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(100)
        .collect();
    let mut name = base.clone();
    let mut n = 2;
    while !taken.insert(name.clone()) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// Globs in `binaries` paths, hosts and rule paths: a value holding one
/// would allow more than was denied.
fn has_glob(text: &str) -> bool {
    text.contains(['*', '?', '[', ']', '{', '}'])
}

/// A YAML double-quoted scalar: JSON's escapes are YAML's, and what YAML
/// would read as a line break or not take at all (DEL, C1 controls, U+2028,
/// U+2029, a BOM) is escaped too.
fn quoted(text: &str) -> String {
    let json = serde_json::to_string(text).expect("a string serializes");
    let mut quoted = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{feff}' => {
                quoted.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => quoted.push(c),
        }
    }
    quoted
}

/// Text from a sandbox, for a comment line: one line, no terminal escapes.
fn escaped(text: &str) -> String {
    text.escape_debug().to_string()
}

fn timestamp(unix_seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_seconds)).to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rows(value: serde_json::Value) -> Vec<Row> {
        serde_json::from_value(value).unwrap()
    }

    fn denial(host: &str, port: u16, binary: &str) -> serde_json::Value {
        json!({"sandbox": "web", "host": host, "port": port, "binary": binary, "count": 2, "connections_denied": 2,
               "first_seen": 1_767_225_600, "last_seen": 1_767_225_660,
               "last_reason": format!("endpoint {host}:{port} is not allowed by any policy"),
               "last_kind": "policy_denied", "last_protocol": "tls", "address": "198.18.1.2"})
    }

    fn decide(policy: &Policy, host: &str, port: u16, binary: &str) -> bool {
        let literal = host.parse::<IpAddr>().ok();
        let request = Request {
            host: literal.is_none().then_some(host),
            ip: Some(literal.unwrap_or("198.18.1.2".parse().unwrap())),
            port,
            binary: Some(Path::new(binary)),
            ancestors: &[],
            uid: 0,
            cgroup_id: 0,
        };
        policy.evaluate(&request).unwrap().allow
    }

    fn request_verdict(policy: &Policy, host: &str, method: &str, path: &str) -> &'static str {
        let request = Request {
            host: Some(host),
            ip: None,
            port: 443,
            binary: Some(Path::new("/usr/bin/curl")),
            ancestors: &[],
            uid: 0,
            cgroup_id: 0,
        };
        let decision = policy.evaluate(&request).unwrap();
        let offline = Offline {
            method: method.into(),
            target: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            body: Vec::new(),
            websocket_message: None,
            plain_http: false,
        };
        evaluate_http(policy, &request, &decision, &offline).unwrap().verdict
    }

    #[test]
    fn suggestions_allow_exactly_what_was_denied() {
        let rows = rows(json!([
            denial("blocked.test", 443, "/usr/bin/curl"),
            denial("blocked.test", 8443, "/usr/bin/curl"),
            denial("198.18.1.9", 22, "/usr/bin/ssh"),
            // Sandbox strings in comments stay on one line.
            denial("evil.test", 443, "/tmp/x\nversion: 2"),
            denial("odd.test", 443, "/tmp/\u{7f}\u{85}\u{2028}\u{feff}y"),
            {"sandbox": "web", "host": "gone.test", "port": 443, "binary": null, "count": 1, "connections_denied": 1,
             "first_seen": 1, "last_seen": 1, "last_reason": "r", "last_kind": "policy_denied", "last_protocol": "tls"},
            {"sandbox": "web", "host": "mismatch.test", "port": 443, "binary": "/usr/bin/curl", "count": 1,
             "connections_denied": 1, "first_seen": 1, "last_seen": 1, "last_reason": "SNI mismatch",
             "last_kind": "host_mismatch", "last_protocol": "tls"},
        ]));
        let text = suggest(&rows, None, None, "the recent denials of sandbox web").unwrap();
        let policy = Policy::from_yaml(&text).unwrap();
        assert!(decide(&policy, "blocked.test", 443, "/usr/bin/curl"), "{text}");
        assert!(decide(&policy, "blocked.test", 8443, "/usr/bin/curl"));
        assert!(decide(&policy, "198.18.1.9", 22, "/usr/bin/ssh"));
        assert!(decide(&policy, "evil.test", 443, "/tmp/x\nversion: 2"));
        assert!(decide(&policy, "odd.test", 443, "/tmp/\u{7f}\u{85}\u{2028}\u{feff}y"), "{text}");
        for (host, port, binary) in [
            ("other.test", 443, "/usr/bin/curl"),
            ("blocked.test", 80, "/usr/bin/curl"),
            ("blocked.test", 443, "/usr/bin/wget"),
            ("198.18.1.10", 22, "/usr/bin/ssh"),
            ("mismatch.test", 443, "/usr/bin/curl"),
            ("gone.test", 443, "/usr/bin/curl"),
        ] {
            assert!(!decide(&policy, host, port, binary), "{host}:{port} {binary}\n{text}");
        }
        assert_eq!(text.matches("\n  curl-blocked.test:\n").count(), 1, "one entry per binary and host:\n{text}");
        assert!(text.contains("# /usr/bin/curl -> blocked.test:443: 2 connections denied (tls), last 2026-01-01T00:01:00Z: endpoint blocked.test:443 is not allowed by any policy"), "{text}");
        assert!(text.contains(r"# /tmp/x\nversion: 2 -> evil.test:443"), "{text}");
        assert!(text.contains("Not suggested: (unknown binary) -> gone.test:443: the binary is unknown"), "{text}");
        assert!(text.contains("Not suggested: /usr/bin/curl -> mismatch.test:443: host_mismatch"), "{text}");
        assert!(!text.contains('*'), "no wildcard:\n{text}");
    }

    #[test]
    fn denied_requests_become_rules_of_the_inspected_endpoint_merged_into_its_file() {
        let original = "version: 1\n# the API\nnetwork_policies:\n    api:\n        endpoints:\n            - host: api.test\n              port: 443\n              protocol: rest\n              enforcement: enforce\n              access: read-only\n        binaries: [{ path: /usr/bin/curl }]\n# trailing\nfilesystem_policy: {}\n";
        let rows = rows(json!([{
            "sandbox": "web", "host": "api.test", "port": 443, "binary": "/usr/bin/curl", "count": 3,
            "connections_denied": 0, "first_seen": 1, "last_seen": 2, "last_reason": "POST /v1/items not permitted",
            "last_kind": "policy_denied", "last_protocol": "tls-inspected", "address": "198.18.1.2",
            "requests": [{"method": "POST", "path": "/v1/items", "count": 2},
                         {"method": "POST", "path": "/v1/*", "count": 1},
                         {"method": "POST", "path": "/mcp", "call": "tools/call delete", "count": 1}],
        }]));
        let merged = suggest(&rows, Some(original), Some("api.yaml"), "the recent denials").unwrap();
        assert!(merged.starts_with("version: 1\n# the API\nnetwork_policies:\n    api:\n"), "{merged}");
        assert!(merged.ends_with("# trailing\nfilesystem_policy: {}\n"), "{merged}");
        let policy = Policy::from_yaml(&merged).unwrap();
        assert_eq!(request_verdict(&policy, "api.test", "POST", "/v1/items"), "allow", "{merged}");
        assert_eq!(request_verdict(&policy, "api.test", "POST", "/v1/other"), "deny");
        assert_eq!(request_verdict(&policy, "api.test", "DELETE", "/v1/items"), "deny");
        assert_eq!(request_verdict(&policy, "api.test", "GET", "/v1/items"), "allow", "the file's own rules stay");
        assert!(merged.contains("    curl-api.test:\n      endpoints:\n"), "{merged}");
        assert!(merged.contains("Not suggested: /usr/bin/curl -> api.test:443: POST /v1/*: a glob character"));
        assert!(merged.contains("the call tools/call delete was denied"), "{merged}");
        // Asked again with the merged file, nothing is left to suggest.
        let again = suggest(&rows, Some(&merged), Some("api.yaml"), "the recent denials").unwrap();
        assert!(again.contains("already allowed by api.yaml"), "{again}");
        assert!(Policy::from_yaml(&again).is_ok());
    }

    #[test]
    fn entries_go_into_the_files_network_policies_whatever_its_shape() {
        let rows = rows(json!([denial("blocked.test", 443, "/usr/bin/curl")]));
        for original in [
            "version: 1\nnetwork_policies: {}\n",
            "version: 1\n",
            "version: 1\nnetwork_policies:\n",
            "version: 1\nnetwork_policies:\n  taken:\n    endpoints: [{ host: a.test, port: 1 }]\n    binaries: [{ path: /a }]",
        ] {
            let merged = suggest(&rows, Some(original), Some("f.yaml"), "x")
                .unwrap_or_else(|error| panic!("{original}: {error:#}"));
            let policy = Policy::from_yaml(&merged).unwrap();
            assert!(decide(&policy, "blocked.test", 443, "/usr/bin/curl"), "{merged}");
        }
        let flow = "version: 1\nnetwork_policies: { a: { endpoints: [], binaries: [] } }\n";
        let error = suggest(&rows, Some(flow), Some("f.yaml"), "x").unwrap_err().to_string();
        assert!(error.contains("flow style"), "{error}");
        let named = "version: 1\nnetwork_policies:\n  curl-blocked.test:\n    endpoints: [{ host: a.test, port: 1 }]\n    binaries: [{ path: /a }]\n";
        let merged = suggest(&rows, Some(named), Some("f.yaml"), "x").unwrap();
        assert!(merged.contains("  curl-blocked.test-2:\n"), "names are unique:\n{merged}");
    }

    #[test]
    fn plain_http_suggestions_pass_the_private_ip_gate_or_say_why_not() {
        let mut private = denial("10.231.1.2", 8080, "/usr/bin/curl");
        private["last_protocol"] = "http".into();
        private["address"] = "10.231.1.2".into();
        let mut public = denial("www.test", 80, "/usr/bin/curl");
        public["last_protocol"] = "http".into();
        let text = suggest(&rows(json!([private, public])), None, None, "x").unwrap();
        assert!(text.contains("allowed_ips: [\"10.231.1.2/32\"]"), "{text}");
        assert!(text.contains("www.test:80: plain HTTP is relayed only to private addresses"), "{text}");
    }
}
