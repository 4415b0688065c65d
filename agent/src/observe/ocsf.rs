//! `--log-format ocsf`: each log line as one OCSF 1.8.0 event, mapped from
//! the fields the line already has (the JSON format's, the sandbox's span
//! included), so emit sites stay as they are:
//!
//! - `event: "connection"` (the close line) and `"connection_open"`:
//!   Network Activity (4001), Close/Refuse/Fail and Open;
//! - `event: "request"`: HTTP Activity (4002), by method;
//! - `event: "dns"`: DNS Activity (4003), Response;
//! - `event: "ready"` and `"shutdown"`: Application Lifecycle (6002),
//!   Start and Stop;
//! - every other line: Base Event (0), Other, with its message.
//!
//! Fields with an OCSF attribute go there; every other field of the line
//! goes to `unmapped`, under its own name, so nothing is lost. The
//! sandbox's name is `actor.process.sandbox` (OCSF: "the name of the
//! containment jail") and `unmapped.sandbox`. README, "OCSF", has the table.

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Map, Value};

/// The OCSF version events declare (`metadata.version`).
pub const OCSF_VERSION: &str = "1.8.0";
/// Target of the lines the OCSF format always shows and the others only at
/// `debug`: connection opens and DNS queries (one each, bounded by the
/// connection limits and the DNS budgets).
pub const ACTIVITY: &str = "sandbox_egress::activity";

const PRODUCT: &str = "sandbox-egress";
/// `actor`, `device` (host); `action_id`, `disposition_id`, `firewall_rule` (security_control).
const PROFILES: [&str; 2] = ["host", "security_control"];

/// One log line's fields, flattened (span fields too, `target`, no
/// timestamp nor level), as an OCSF event at `time_ms` (Unix epoch ms).
pub fn event(mut fields: Map<String, Value>, level: &str, time_ms: u64) -> Value {
    // OCSF never takes null: an attribute is left out instead.
    fields.retain(|_, value| !value.is_null());
    let mut line = Line(fields);
    let kind = line.take_str("event");
    let mut event = Map::new();
    let class = match kind.as_deref() {
        Some("connection") => connection_closed(&mut line, &mut event, time_ms),
        Some("connection_open") => connection_opened(&mut line, &mut event),
        Some("request") => request(&mut line, &mut event),
        Some("dns") => dns(&mut line, &mut event),
        Some("ready") => lifecycle(&mut line, &mut event, 3, "Start"),
        Some("shutdown") => lifecycle(&mut line, &mut event, 4, "Stop"),
        _ => base(&mut line, &mut event),
    };
    let severity_id = event.get("severity_id").and_then(Value::as_u64).unwrap_or_else(|| level_severity(level));
    event.insert("severity_id".into(), severity_id.into());
    event.insert("severity".into(), severity_name(severity_id).into());
    event.insert("class_uid".into(), class.uid.into());
    event.insert("class_name".into(), class.name.into());
    event.insert("category_uid".into(), class.category_uid.into());
    event.insert("category_name".into(), class.category_name.into());
    event.insert("activity_id".into(), class.activity_id.into());
    event.insert("activity_name".into(), class.activity_name.into());
    event.insert("type_uid".into(), (u64::from(class.uid) * 100 + u64::from(class.activity_id)).into());
    event.insert("type_name".into(), format!("{}: {}", class.name, class.activity_name).into());
    event.insert("time".into(), time_ms.into());
    let mut metadata = json!({
        "version": OCSF_VERSION,
        "product": product(),
        "log_level": level,
    });
    if class.category_uid == NETWORK.0 {
        metadata["profiles"] = json!(PROFILES);
    }
    if let Some(kind) = kind {
        metadata["event_code"] = kind.into();
    }
    event.insert("metadata".into(), metadata);
    if !line.0.is_empty() {
        event.insert("unmapped".into(), Value::Object(line.0));
    }
    Value::Object(event)
}

const NETWORK: (u32, &str) = (4, "Network Activity");

struct Class {
    uid: u32,
    name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    activity_name: &'static str,
}

fn network_class(uid: u32, name: &'static str, activity_id: u32, activity_name: &'static str) -> Class {
    Class { uid, name, category_uid: NETWORK.0, category_name: NETWORK.1, activity_id, activity_name }
}

fn product() -> Value {
    json!({"name": PRODUCT, "vendor_name": PRODUCT, "version": env!("CARGO_PKG_VERSION")})
}

/// What the agent did, as OCSF's security_control profile says it.
#[derive(Clone, Copy)]
enum Outcome {
    Allowed,
    /// Allowed by an `enforcement: audit` endpoint that would have denied.
    Audited,
    Denied,
    /// Nothing was decided (a client that closed before saying anything).
    Undecided,
}

impl Outcome {
    fn apply(self, event: &mut Map<String, Value>) {
        let (action_id, action, disposition_id, disposition, severity_id) = match self {
            Outcome::Allowed => (1, "Allowed", 1, "Allowed", 1),
            Outcome::Audited => (3, "Observed", 17, "Logged", 2),
            Outcome::Denied => (2, "Denied", 2, "Blocked", 2),
            Outcome::Undecided => (0, "Unknown", 0, "Unknown", 1),
        };
        event.insert("action_id".into(), action_id.into());
        event.insert("action".into(), action.into());
        event.insert("disposition_id".into(), disposition_id.into());
        event.insert("disposition".into(), disposition.into());
        event.insert("severity_id".into(), severity_id.into());
    }
}

/// The close line: Close (relayed, answered, served; or opened and denied
/// later, by a request on it), Refuse (denied), Fail (the allowed
/// destination could not be reached), Reset (cut at the end of a drain).
fn connection_closed(line: &mut Line, event: &mut Map<String, Value>, time_ms: u64) -> Class {
    let verdict = line.take_str("verdict");
    let opened = line.0.contains_key("upstream");
    let (activity_id, activity_name, outcome) = match verdict.as_deref() {
        Some("relayed" | "answered" | "inference") => (2, "Close", Outcome::Allowed),
        Some("closed") => (2, "Close", Outcome::Undecided),
        Some("denied") if opened => (2, "Close", Outcome::Denied),
        Some("denied") => (5, "Refuse", Outcome::Denied),
        Some("upstream_failed") => (4, "Fail", Outcome::Allowed),
        // Reset by the agent at the end of a drain.
        Some("cut") => (3, "Reset", Outcome::Allowed),
        _ => (99, "Other", Outcome::Undecided),
    };
    if let Some(verdict) = verdict {
        line.0.insert("verdict".into(), verdict.into());
    }
    outcome.apply(event);
    let failed = matches!(activity_id, 4 | 5) || matches!(outcome, Outcome::Denied) || line.0.contains_key("error");
    status(event, if failed { 2 } else { 1 }, line.take_str("reason").or_else(|| line.take_str("error")));
    connection_common(line, event);
    let up = line.take_u64("bytes_up");
    let down = line.take_u64("bytes_down");
    if up.is_some() || down.is_some() {
        let (up, down) = (up.unwrap_or(0), down.unwrap_or(0));
        event.insert("traffic".into(), json!({"bytes_out": up, "bytes_in": down, "bytes": up + down}));
    }
    if let Some(duration) = line.take("duration_ms").and_then(|duration| duration.as_f64()) {
        let duration = duration.round() as u64;
        event.insert("duration".into(), duration.into());
        event.insert("start_time".into(), time_ms.saturating_sub(duration).into());
        event.insert("end_time".into(), time_ms.into());
    }
    network_class(4001, "Network Activity", activity_id, activity_name)
}

/// A connection allowed, before it is relayed (long ones are seen while
/// they last); logged once, at its first allowed decision.
fn connection_opened(line: &mut Line, event: &mut Map<String, Value>) -> Class {
    Outcome::Allowed.apply(event);
    status(event, 1, None);
    connection_common(line, event);
    network_class(4001, "Network Activity", 1, "Open")
}

/// What the open and close lines share: who, from where, to where, by
/// which policy. The destination is the address the agent connected to
/// when there is one (for a CONNECT, the sandbox connected to the agent).
fn connection_common(line: &mut Line, event: &mut Map<String, Value>) {
    actor(line, event);
    if let Some(client) = line.take_addr("client") {
        event.insert("src_endpoint".into(), endpoint(client, None));
    }
    let upstream = line.take_addr("upstream");
    let destination = match upstream {
        Some(upstream) => {
            if line.addr("destination") == Some(upstream) {
                line.take("destination");
            }
            Some(upstream)
        }
        None => line.take_addr("destination"),
    };
    let host = line.take_str("host");
    if let Some(destination) = destination {
        event.insert("dst_endpoint".into(), endpoint(destination, host.as_deref()));
    } else if let Some(host) = host {
        line.0.insert("host".into(), host.into());
    }
    let ip_version = destination.map(|destination| if destination.is_ipv4() { 4 } else { 6 });
    let mut connection = json!({"protocol_name": "tcp", "protocol_num": 6, "direction_id": 2, "direction": "Outbound"});
    if let Some(version) = ip_version {
        connection["protocol_ver_id"] = version.into();
    }
    event.insert("connection_info".into(), connection);
    if let Some(protocol) = line.take_str("protocol") {
        event.insert("app_protocol_name".into(), protocol.into());
    }
    firewall_rule(line, event);
}

/// One decided L7 request (or call, or message): HTTP Activity by method.
fn request(line: &mut Line, event: &mut Map<String, Value>) -> Class {
    let outcome = match line.take_str("verdict").as_deref() {
        Some("allowed") => Outcome::Allowed,
        Some("audit") => Outcome::Audited,
        Some("denied") => Outcome::Denied,
        other => {
            if let Some(other) = other {
                line.0.insert("verdict".into(), other.into());
            }
            Outcome::Undecided
        }
    };
    outcome.apply(event);
    status(event, if matches!(outcome, Outcome::Denied) { 2 } else { 1 }, line.take_str("reason"));
    actor(line, event);
    if let Some(client) = line.take_addr("client") {
        event.insert("src_endpoint".into(), endpoint(client, None));
    }
    let host = line.take_str("host");
    let destination = line.take_addr("destination");
    if let Some(destination) = destination {
        event.insert("dst_endpoint".into(), endpoint(destination, host.as_deref()));
    }
    // OCSF's http_method is one of the nine standard methods; any other
    // (a WebSocket message's WEBSOCKET_TEXT) stays as it is in `unmapped`.
    let (activity_id, activity_name) = match line.str("method") {
        Some("CONNECT") => (1, "Connect"),
        Some("DELETE") => (2, "Delete"),
        Some("GET") => (3, "Get"),
        Some("HEAD") => (4, "Head"),
        Some("OPTIONS") => (5, "Options"),
        Some("POST") => (6, "Post"),
        Some("PUT") => (7, "Put"),
        Some("TRACE") => (8, "Trace"),
        Some("PATCH") => (9, "Patch"),
        _ => (99, "Other"),
    };
    let method = if activity_id == 99 { None } else { line.take_str("method") };
    let mut http = Map::new();
    let mut url = Map::new();
    if let Some(path) = line.take_str("path") {
        url.insert("path".into(), path.into());
    }
    if let Some(host) = host.filter(|host| host.parse::<IpAddr>().is_err()) {
        url.insert("hostname".into(), host.into());
    }
    if let Some(destination) = destination {
        url.insert("port".into(), destination.port().into());
    }
    if url.contains_key("path") {
        http.insert("url".into(), Value::Object(url));
    }
    if let Some(method) = method {
        http.insert("http_method".into(), method.into());
    }
    event.insert("http_request".into(), Value::Object(http));
    if let Some(code) = line.take_u64("status") {
        event.insert("http_response".into(), json!({"code": code}));
    }
    firewall_rule(line, event);
    network_class(4002, "HTTP Activity", activity_id, activity_name)
}

/// One DNS query of a sandbox and the agent's answer to it.
fn dns(line: &mut Line, event: &mut Map<String, Value>) -> Class {
    let outcome = match line.take_str("verdict").as_deref() {
        Some("answered") => Outcome::Allowed,
        Some("refused") => Outcome::Denied,
        _ => Outcome::Undecided,
    };
    outcome.apply(event);
    let rcode = line.take_str("rcode");
    let (rcode_id, rcode_name) = match rcode.as_deref() {
        Some("noerror") => (0, "NoError"),
        Some("formerr") => (1, "FormError"),
        Some("servfail") => (2, "ServError"),
        Some("nxdomain") => (3, "NXDomain"),
        Some("notimp") => (4, "NotImp"),
        Some("refused") => (5, "Refused"),
        _ => (99, "Other"),
    };
    event.insert("rcode_id".into(), rcode_id.into());
    event.insert("rcode".into(), rcode_name.into());
    let failed = !matches!(outcome, Outcome::Allowed) || rcode_id != 0;
    status(event, if failed { 2 } else { 1 }, line.take_str("reason"));
    let query_type = line.take_str("query_type");
    if let Some(name) = line.take_str("name") {
        let mut query = json!({"hostname": name, "class": "IN"});
        if let Some(query_type) = &query_type {
            query["type"] = query_type.as_str().into();
        }
        event.insert("query".into(), query);
    } else if let Some(query_type) = query_type {
        line.0.insert("query_type".into(), query_type.into());
    }
    if let Some(addresses) = line.take_str("answers") {
        let answers: Vec<Value> = addresses
            .split(',')
            .filter_map(|address| address.parse::<IpAddr>().ok())
            .map(|ip| json!({"rdata": ip.to_string(), "type": if ip.is_ipv4() { "A" } else { "AAAA" }, "class": "IN"}))
            .collect();
        event.insert("answers".into(), answers.into());
    }
    if let Some(client) = line.take_addr("client") {
        event.insert("src_endpoint".into(), endpoint(client, None));
    }
    let (protocol_name, protocol_num) = match line.take_str("transport").as_deref() {
        Some("tcp") => ("tcp", 6),
        _ => ("udp", 17),
    };
    event.insert(
        "connection_info".into(),
        json!({"protocol_name": protocol_name, "protocol_num": protocol_num, "direction_id": 2, "direction": "Outbound"}),
    );
    network_class(4003, "DNS Activity", 2, "Response")
}

fn lifecycle(line: &mut Line, event: &mut Map<String, Value>, activity_id: u32, activity_name: &'static str) -> Class {
    event.insert("app".into(), product());
    if let Some(message) = line.take_str("message") {
        event.insert("message".into(), message.into());
    }
    Class {
        uid: 6002,
        name: "Application Lifecycle",
        category_uid: 6,
        category_name: "Application Activity",
        activity_id,
        activity_name,
    }
}

fn base(line: &mut Line, event: &mut Map<String, Value>) -> Class {
    if let Some(message) = line.take_str("message") {
        event.insert("message".into(), message.into());
    }
    Class {
        uid: 0,
        name: "Base Event",
        category_uid: 0,
        category_name: "Uncategorized",
        activity_id: 99,
        activity_name: "Other",
    }
}

/// `actor.process` (pid, name, executable, the sandbox) and `actor.user`
/// (uid), when the line names a process.
fn actor(line: &mut Line, event: &mut Map<String, Value>) {
    let Some(pid) = line.take_u64("pid") else { return };
    let mut process = json!({"pid": pid});
    let exe = line.take_str("exe");
    let comm = line.take_str("comm");
    let file_name = exe.as_deref().map(|exe| exe.rsplit('/').next().unwrap_or(exe).to_owned());
    if let Some(name) = comm.or_else(|| file_name.clone()) {
        process["name"] = name.into();
    }
    if let (Some(path), Some(name)) = (exe, file_name) {
        // OCSF `file` needs a name and a type (1: regular file).
        process["file"] = json!({"path": path, "name": name, "type_id": 1, "type": "Regular File"});
    }
    if let Some(sandbox) = line.str("sandbox") {
        process["sandbox"] = sandbox.into();
    }
    let mut actor = json!({"process": process});
    if let Some(uid) = line.take_u64("uid") {
        actor["user"] = json!({"uid": uid.to_string()});
    }
    event.insert("actor".into(), actor);
}

/// `firewall_rule`: the policy (network_policies entry) that decided, the
/// rule in it, the policy's generation.
fn firewall_rule(line: &mut Line, event: &mut Map<String, Value>) {
    let mut rule = Map::new();
    if let Some(policy) = line.take_str("policy") {
        rule.insert("name".into(), policy.into());
    }
    if let Some(uid) = line.take_str("rule") {
        rule.insert("uid".into(), uid.into());
    }
    if rule.is_empty() {
        return;
    }
    if let Some(generation) = line.take_u64("policy_generation") {
        rule.insert("version".into(), generation.to_string().into());
    }
    event.insert("firewall_rule".into(), Value::Object(rule));
}

fn status(event: &mut Map<String, Value>, status_id: u32, detail: Option<String>) {
    event.insert("status_id".into(), status_id.into());
    event.insert("status".into(), if status_id == 1 { "Success" } else { "Failure" }.into());
    if let Some(detail) = detail {
        event.insert("status_detail".into(), detail.into());
    }
}

fn endpoint(address: SocketAddr, host: Option<&str>) -> Value {
    let mut endpoint = json!({"ip": address.ip().to_canonical().to_string(), "port": address.port()});
    if let Some(host) = host.filter(|host| host.parse::<IpAddr>().is_err()) {
        endpoint["hostname"] = host.into();
    }
    endpoint
}

fn level_severity(level: &str) -> u64 {
    match level {
        "ERROR" => 4,
        "WARN" => 3,
        _ => 1,
    }
}

fn severity_name(severity_id: u64) -> &'static str {
    match severity_id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        _ => "Unknown",
    }
}

/// A line's fields; what a mapping takes leaves, the rest is `unmapped`.
struct Line(Map<String, Value>);

impl Line {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    fn take_str(&mut self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            Value::String(_) => match self.0.remove(key) {
                Some(Value::String(text)) => Some(text),
                _ => None,
            },
            _ => None,
        }
    }

    fn take_u64(&mut self, key: &str) -> Option<u64> {
        let value = self.0.get(key)?.as_u64()?;
        self.0.remove(key);
        Some(value)
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.as_str()
    }

    fn addr(&self, key: &str) -> Option<SocketAddr> {
        self.str(key)?.parse().ok()
    }

    /// Taken only if it reads as an address; otherwise left for `unmapped`.
    fn take_addr(&mut self, key: &str) -> Option<SocketAddr> {
        let address = self.addr(key)?;
        self.0.remove(key);
        Some(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    const TIME: u64 = 1_767_225_600_000;

    #[test]
    fn a_denied_connection_is_a_network_refuse_with_its_actor_and_reason() {
        let line = map(json!({
            "event": "connection", "verdict": "denied", "reason": "endpoint a.test:443 is not allowed by any policy",
            "protocol": "tls", "host": "a.test", "pid": 42, "exe": "/usr/bin/curl", "comm": "curl", "uid": 1000,
            "cgroup_id": 7, "client": "127.0.0.1:40000", "destination": "[::ffff:198.18.1.2]:443",
            "policy_generation": 3, "bytes_up": 0, "bytes_down": 0, "duration_ms": 1.6, "sandbox": "web",
            "target": "sandbox_egress::conn::ledger",
        }));
        let event = event(line, "INFO", TIME);
        assert_eq!(event["class_uid"], 4001);
        assert_eq!((event["activity_id"].as_u64(), event["type_uid"].as_u64()), (Some(5), Some(400105)));
        assert_eq!((event["action_id"].as_u64(), event["disposition_id"].as_u64()), (Some(2), Some(2)));
        assert_eq!(event["status_detail"], "endpoint a.test:443 is not allowed by any policy");
        assert_eq!(event["time"], TIME);
        assert_eq!((event["duration"].as_u64(), event["start_time"].as_u64()), (Some(2), Some(TIME - 2)));
        assert_eq!(event["actor"]["process"]["pid"], 42);
        assert_eq!(event["actor"]["process"]["name"], "curl");
        assert_eq!(event["actor"]["process"]["file"]["path"], "/usr/bin/curl");
        assert_eq!(event["actor"]["process"]["sandbox"], "web");
        assert_eq!(event["actor"]["user"]["uid"], "1000");
        assert_eq!(event["src_endpoint"], json!({"ip": "127.0.0.1", "port": 40000}));
        assert_eq!(event["dst_endpoint"], json!({"ip": "198.18.1.2", "port": 443, "hostname": "a.test"}));
        assert_eq!(event["app_protocol_name"], "tls");
        assert_eq!(event["metadata"]["version"], OCSF_VERSION);
        assert_eq!(event["metadata"]["product"]["name"], "sandbox-egress");
        assert_eq!(event["metadata"]["profiles"], json!(PROFILES));
        assert_eq!(event["metadata"]["event_code"], "connection");
        // No policy decided: no rule, and the generation stays in unmapped.
        assert!(event.get("firewall_rule").is_none());
        assert_eq!(
            event["unmapped"],
            json!({"verdict": "denied", "cgroup_id": 7, "policy_generation": 3, "sandbox": "web",
                   "target": "sandbox_egress::conn::ledger"})
        );
    }

    #[test]
    fn a_relayed_connection_closes_with_its_traffic_and_rule() {
        let line = map(json!({
            "event": "connection", "verdict": "relayed", "protocol": "http", "pid": 9, "exe": "/usr/bin/python3.11",
            "uid": 0, "client": "127.0.0.1:1", "destination": "10.0.0.1:80", "upstream": "10.0.0.1:80",
            "policy": "web", "policy_generation": 1, "bytes_up": 10, "bytes_down": 90, "error": null,
        }));
        let event = event(line, "INFO", TIME);
        assert_eq!((event["activity_id"].as_u64(), event["status_id"].as_u64()), (Some(2), Some(1)));
        assert_eq!((event["action_id"].as_u64(), event["disposition_id"].as_u64()), (Some(1), Some(1)));
        assert_eq!(event["traffic"], json!({"bytes_out": 10, "bytes_in": 90, "bytes": 100}));
        assert_eq!(event["firewall_rule"], json!({"name": "web", "version": "1"}));
        assert_eq!(event["actor"]["process"]["name"], "python3.11", "the executable's name without a comm");
        assert_eq!(event["dst_endpoint"], json!({"ip": "10.0.0.1", "port": 80}), "no host name for an address");
        assert_eq!(event["unmapped"], json!({"verdict": "relayed"}), "the same destination is not kept twice");
    }

    #[test]
    fn a_kernel_fast_path_connection_keeps_its_path_in_unmapped() {
        let line = map(json!({
            "event": "connection", "path": "kernel", "verdict": "relayed", "protocol": "tcp", "pid": 9,
            "exe": "/usr/bin/psql", "comm": "psql", "uid": 0, "destination": "10.0.0.1:5432",
            "upstream": "10.0.0.1:5432", "policy": "db", "policy_generation": 2, "bytes_up": 7, "bytes_down": 3,
        }));
        let event = event(line, "INFO", TIME);
        assert_eq!((event["activity_id"].as_u64(), event["disposition_id"].as_u64()), (Some(2), Some(1)));
        assert_eq!(event["traffic"], json!({"bytes_out": 7, "bytes_in": 3, "bytes": 10}));
        assert_eq!(event["dst_endpoint"], json!({"ip": "10.0.0.1", "port": 5432}));
        assert_eq!(event["unmapped"]["path"], "kernel");
    }

    #[test]
    fn a_connection_denied_by_its_requests_closes_blocked() {
        let line = map(json!({"event": "connection", "verdict": "denied", "reason": "POST / not permitted",
                              "destination": "198.18.1.2:443", "upstream": "198.18.1.2:443", "requests": 1}));
        let event = event(line, "INFO", TIME);
        assert_eq!((event["activity_id"].as_u64(), event["disposition_id"].as_u64()), (Some(2), Some(2)));
        assert_eq!(
            (event["status_id"].as_u64(), event["status_detail"].as_str()),
            (Some(2), Some("POST / not permitted"))
        );
    }

    #[test]
    fn requests_are_http_activity_by_method() {
        let line = map(json!({
            "event": "request", "verdict": "denied", "method": "POST", "path": "/repos/o/r/issues",
            "host": "api.test", "destination": "198.18.1.2:443", "policy": "github", "rule": "access: read-only",
            "policy_generation": 2, "reason": "POST /repos/o/r/issues not permitted by policy", "status": 403,
            "pid": 5, "exe": "/usr/bin/curl", "comm": "curl", "uid": 1000, "client": "[::1]:5000",
            "message": "call", "rpc_method": "tools/call",
        }));
        let event = event(line, "INFO", TIME);
        assert_eq!((event["class_uid"].as_u64(), event["activity_id"].as_u64()), (Some(4002), Some(6)));
        assert_eq!(event["type_uid"], 400206);
        assert_eq!(event["http_request"]["http_method"], "POST");
        assert_eq!(
            event["http_request"]["url"],
            json!({"path": "/repos/o/r/issues", "hostname": "api.test", "port": 443})
        );
        assert_eq!(event["http_response"]["code"], 403);
        assert_eq!(event["firewall_rule"], json!({"name": "github", "uid": "access: read-only", "version": "2"}));
        assert_eq!(event["src_endpoint"], json!({"ip": "::1", "port": 5000}));
        assert_eq!(event["unmapped"], json!({"message": "call", "rpc_method": "tools/call"}));
        let audited = map(json!({"event": "request", "verdict": "audit", "method": "WEBSOCKET_TEXT", "path": "/ws"}));
        let audited = super::event(audited, "INFO", TIME);
        assert_eq!((audited["activity_id"].as_u64(), audited["action_id"].as_u64()), (Some(99), Some(3)));
        assert_eq!(audited["unmapped"]["method"], "WEBSOCKET_TEXT");
        assert!(audited["http_request"].get("http_method").is_none());
    }

    #[test]
    fn dns_queries_carry_name_type_rcode_and_answers() {
        let line = map(json!({
            "event": "dns", "verdict": "refused", "name": "exfil.example", "query_type": "TXT", "rcode": "refused",
            "reason": "query type not answered", "client": "127.0.0.1:5353", "transport": "udp", "cgroup_id": 3,
        }));
        let event = event(line, "DEBUG", TIME);
        assert_eq!((event["class_uid"].as_u64(), event["type_uid"].as_u64()), (Some(4003), Some(400302)));
        assert_eq!(event["query"], json!({"hostname": "exfil.example", "type": "TXT", "class": "IN"}));
        assert_eq!((event["rcode_id"].as_u64(), event["disposition_id"].as_u64()), (Some(5), Some(2)));
        assert!(event.get("actor").is_none());
        let answered = map(json!({
            "event": "dns", "verdict": "answered", "name": "a.test", "query_type": "A", "rcode": "noerror",
            "answers": "198.18.1.2,2001:db8::1", "client": "127.0.0.1:5353", "transport": "tcp",
        }));
        let answered = super::event(answered, "DEBUG", TIME);
        assert_eq!(answered["answers"][1], json!({"rdata": "2001:db8::1", "type": "AAAA", "class": "IN"}));
        assert_eq!((answered["status_id"].as_u64(), answered["action_id"].as_u64()), (Some(1), Some(1)));
        assert_eq!(answered["connection_info"]["protocol_num"], 6);
    }

    #[test]
    fn other_lines_are_base_events_or_the_lifecycle_keeping_every_field() {
        let warning = map(json!({"message": "DNS: refused x (TXT)", "cgroup_id": 3, "sandbox": "web"}));
        let event = event(warning, "WARN", TIME);
        assert_eq!((event["class_uid"].as_u64(), event["type_uid"].as_u64()), (Some(0), Some(99)));
        assert_eq!((event["severity_id"].as_u64(), event["message"].as_str()), (Some(3), Some("DNS: refused x (TXT)")));
        assert_eq!(event["unmapped"], json!({"cgroup_id": 3, "sandbox": "web"}));
        assert!(event["metadata"].get("profiles").is_none());
        let ready = map(json!({"event": "ready", "message": "agent ready", "listen_port": 15001}));
        let ready = super::event(ready, "INFO", TIME);
        assert_eq!((ready["class_uid"].as_u64(), ready["type_uid"].as_u64()), (Some(6002), Some(600203)));
        assert_eq!(ready["app"]["name"], "sandbox-egress");
        assert_eq!(ready["unmapped"], json!({"listen_port": 15001}));
    }

    #[test]
    fn sandbox_strings_stay_strings_and_lines_stay_lines() {
        let line = map(json!({"event": "request", "verdict": "denied", "method": "GET\r\nX", "path": "/\u{1b}[31m\n",
                              "host": "h\nFORGED"}));
        let text = event(line, "INFO", TIME).to_string();
        assert!(!text.contains('\n') && !text.contains('\x1b'), "{text}");
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["http_request"]["url"]["path"], "/\u{1b}[31m\n");
    }
}
