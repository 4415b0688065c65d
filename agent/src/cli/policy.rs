//! `sandbox-egress policy ...`: policy files checked and tried out offline,
//! requests decided by the L7 rooms exactly as the live agent decides them.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;

use crate::{
    http1::{RequestHead, TargetForm},
    l7::{self, Call, Classified},
    policy::{Decision, HttpRequest, Message, Policy, Request, RequestDecision},
    wire::{host::Authority, path::canonicalize},
};

mod suggest;

/// `--query` names and values, encoded as a query component.
const QUERY_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// A body given on the command line is read up to this.
const MAX_BODY_FILE: u64 = 16 * 1024 * 1024;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file
    Check {
        file: PathBuf,
        /// The agent's credentials file: every `credential_binding` must
        /// name one of its providers (without it, each binding is a warning).
        #[arg(long, value_name = "FILE")]
        credentials: Option<PathBuf>,
    },
    /// Evaluate one connection against a policy file, offline
    ///
    /// Prints the decision as JSON, then one readable line. The exit status
    /// is 0 whenever the evaluation ran, allowed or denied.
    Eval(Box<EvalArgs>),
    /// Allow rules for the running daemon's recent denials
    ///
    /// Prints policy YAML (OpenShell schema) that allows exactly what was
    /// denied: its host, port and binary, and the method and path of denied
    /// requests; each entry with a comment saying what was denied and how
    /// often. Checked to load and to allow each denial it came from.
    Suggest(suggest::SuggestArgs),
}

#[derive(clap::Args)]
pub struct EvalArgs {
    file: PathBuf,
    /// Destination host name (SNI or HTTP Host).
    #[arg(long, required_unless_present = "ip")]
    host: Option<String>,
    #[arg(long)]
    port: u16,
    /// Executable of the connecting process.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Executable of an ancestor process, nearest first (repeatable).
    #[arg(long = "ancestor", value_name = "PATH")]
    ancestors: Vec<PathBuf>,
    /// Destination address.
    #[arg(long)]
    ip: Option<IpAddr>,
    /// A name the sandbox resolved to --ip through the agent's DNS
    /// (repeatable, most recent first): decides a stream without a host
    /// of its own (opaque, silent, TLS without SNI) as the agent does.
    #[arg(long = "resolved", value_name = "NAME", requires = "ip", conflicts_with = "host")]
    resolved: Vec<String>,
    /// HTTP method of one request on the connection: decided, if the
    /// connection is allowed by an inspected endpoint, by its L7 rules
    /// exactly as the live agent decides it.
    #[arg(long, requires = "path")]
    method: Option<String>,
    /// The request's target path (with or without `?query`); it is
    /// canonicalised as the agent does before rules see it.
    #[arg(long, requires = "method")]
    path: Option<String>,
    /// A query parameter `NAME=VALUE`, decoded (repeatable; added to
    /// any query in --path).
    #[arg(long = "query", value_name = "NAME=VALUE", requires = "method")]
    query: Vec<String>,
    /// A request header `NAME: VALUE` (repeatable), e.g. `Accept:
    /// text/event-stream` for an MCP receive stream, or `Content-Type`.
    #[arg(long = "header", value_name = "NAME: VALUE", requires = "method")]
    headers: Vec<String>,
    /// The request body, from FILE (`-`: standard input): decided call
    /// by call on JSON-RPC, MCP and GraphQL endpoints.
    #[arg(long, value_name = "FILE", requires = "method")]
    body: Option<PathBuf>,
    /// A client text message after a WebSocket upgrade to --path
    /// (--method GET): decided as WEBSOCKET_TEXT, or as the GraphQL
    /// operation it carries on a GraphQL-over-WebSocket endpoint.
    #[arg(long, value_name = "TEXT", requires = "method")]
    websocket_message: Option<String>,
    /// Decide as plain HTTP through the private-IP gate (a request by
    /// request decision), not as a TLS or CONNECT stream to the host.
    #[arg(long)]
    plain_http: bool,
}

/// Prints the summary or the decision on stdout; load warnings go to the log.
pub fn run(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Check { file, credentials } => {
            let policy = Policy::from_file(&file)?;
            let mut unchecked = Vec::new();
            match credentials {
                Some(credentials) => {
                    let providers = crate::credentials::provider_names(&credentials)?;
                    policy
                        .check_credential_bindings(providers.iter().map(String::as_str))
                        .with_context(|| format!("policy file {}", file.display()))?;
                }
                None => {
                    for (name, position, provider) in policy.credential_bindings() {
                        unchecked.push(format!(
                            "policy '{name}': endpoint {position} is bound to credential provider '{provider}': \
                             `run` refuses the file unless --credentials has it (check with --credentials FILE)"
                        ));
                    }
                }
            }
            let summary = policy.summary_with(&unchecked);
            print!("{}: ok\n{summary}", file.display());
        }
        PolicyCommand::Suggest(args) => suggest::run(args)?,
        PolicyCommand::Eval(args) => {
            let EvalArgs {
                file,
                host,
                port,
                binary,
                ancestors,
                ip,
                resolved,
                method,
                path,
                query,
                headers,
                body,
                websocket_message,
                plain_http,
            } = *args;
            let policy = Policy::from_file(&file)?;
            let request = Request {
                host: host.as_deref(),
                ip,
                port,
                binary: binary.as_deref(),
                ancestors: &ancestors,
                uid: 0,
                cgroup_id: 0,
            };
            let (decision, resolved_host) = if resolved.is_empty() {
                (policy.evaluate(&request)?, None)
            } else {
                policy.evaluate_resolved(&request, &resolved)?
            };
            let request = Request { host: resolved_host.as_deref().or(request.host), ..request };
            let http = match (method, path) {
                (Some(method), Some(path)) => {
                    let body = body.map(|file| read_body(&file)).transpose()?.unwrap_or_default();
                    let offline = Offline { method, target: path, query, headers, body, websocket_message, plain_http };
                    Some(evaluate_http(&policy, &request, &decision, &offline)?)
                }
                _ => None,
            };
            let output =
                Output { resolved_host: resolved_host.as_deref(), decision: &decision, request: http.as_ref() };
            println!("{}", serde_json::to_string_pretty(&output)?);
            println!("{}", describe(&decision, &request));
            if let Some(http) = &http {
                println!("{}", describe_request(http));
            }
        }
    }
    Ok(())
}

/// One request given on the command line (or denied, for `suggest`).
struct Offline {
    method: String,
    target: String,
    query: Vec<String>,
    headers: Vec<String>,
    body: Vec<u8>,
    websocket_message: Option<String>,
    plain_http: bool,
}

/// What the live agent does with one request on the connection.
#[derive(Serialize)]
struct HttpOutcome {
    method: String,
    /// Canonical, as rules see it and the origin would receive it.
    path: Option<String>,
    /// `allow`, `deny`, `audit`, or `not_inspected` (the connection is
    /// allowed and its requests are relayed undecided) or
    /// `connection_denied`.
    verdict: &'static str,
    /// The inspected endpoint's protocol that read the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    /// The decision that settled the request: its first call's if all were
    /// allowed, else the denied call's.
    #[serde(flatten)]
    decision: Option<RequestDecision>,
    /// Each call, operation or message decided, in order, up to the first
    /// denied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    calls: Vec<CallOutcome>,
    /// Why it was refused before the rules (unreadable as its protocol).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct CallOutcome {
    message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rpc_method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    operation: Option<crate::policy::Operation>,
    #[serde(flatten)]
    decision: RequestDecision,
}

fn evaluate_http(policy: &Policy, request: &Request, decision: &Decision, offline: &Offline) -> Result<HttpOutcome> {
    let outcome = |verdict, path| HttpOutcome {
        method: offline.method.clone(),
        path,
        verdict,
        protocol: None,
        decision: None,
        calls: Vec::new(),
        error: None,
    };
    let Some(inspection) = decision.inspect.as_ref().filter(|_| decision.allow) else {
        let verdict = if decision.allow { "not_inspected" } else { "connection_denied" };
        return Ok(outcome(verdict, None));
    };
    let mut target = offline.target.clone();
    for pair in &offline.query {
        let (name, value) = pair.split_once('=').with_context(|| format!("--query {pair}: expected NAME=VALUE"))?;
        let separator = if target.contains('?') { '&' } else { '?' };
        let encode = |text| utf8_percent_encode(text, QUERY_COMPONENT).to_string();
        target = format!("{target}{separator}{}={}", encode(name), encode(value));
    }
    let head = request_head(offline, request, &target)?;
    let classified = match &offline.websocket_message {
        None => l7::classify_request(inspection, &head, &offline.body),
        Some(text) => canonicalize(&target, inspection.allow_encoded_slash).and_then(|canonical| {
            let (selected, _) = l7::reader(inspection, &canonical.path);
            let calls = match l7::classify_text(text, selected)? {
                Some(message) => vec![Call { message, id: None }],
                None => Vec::new(),
            };
            Ok((canonical, selected, Classified { calls, batch: false }))
        }),
    };
    let (canonical, selected, classified) = match classified {
        Ok(classified) => classified,
        Err(reason) => return Ok(HttpOutcome { error: Some(reason), ..outcome("deny", None) }),
    };
    let mut path_outcome =
        HttpOutcome { protocol: Some(selected.protocol), ..outcome("deny", Some(canonical.path.clone())) };
    if classified.calls.is_empty() {
        // A GraphQL-over-WebSocket control message: relayed undecided.
        return Ok(HttpOutcome { verdict: "allow", ..path_outcome });
    }
    let method = if offline.websocket_message.is_some() { l7::WEBSOCKET_TEXT } else { offline.method.as_str() };
    let mut calls = Vec::new();
    let mut failed = None;
    let decided = l7::decide_calls(&classified, |call| {
        let http = HttpRequest {
            method,
            path: &canonical.path,
            query: &canonical.query,
            message: &call.message,
            via_gate: offline.plain_http,
        };
        let verdict = policy.evaluate_request(request, &http).unwrap_or_else(|error| {
            failed.get_or_insert(error.to_string());
            RequestDecision::denied(Some(format!("policy evaluation failed: {error}")))
        });
        calls.push(call_outcome(&call.message, &verdict));
        (0, verdict)
    });
    if let Some(error) = failed {
        bail!("policy evaluation failed: {error}");
    }
    let verdict = match decided {
        Ok((_, verdict)) => verdict,
        Err((_, verdict)) => verdict,
    };
    path_outcome.verdict = match (verdict.allow, verdict.audit) {
        (true, false) => "allow",
        (true, true) => "audit",
        (false, _) => "deny",
    };
    Ok(HttpOutcome { decision: Some(verdict), calls, ..path_outcome })
}

fn call_outcome(message: &Message, decision: &RequestDecision) -> CallOutcome {
    let (kind, rpc_method, tool, operation) = match message {
        Message::Http => ("request", None, None, None),
        Message::JsonRpcCall { method, tool } => ("call", Some(method.clone()), tool.clone(), None),
        Message::JsonRpcResponse => ("response", None, None, None),
        Message::ReceiveStream => ("receive_stream", None, None, None),
        Message::SessionEnd => ("session_end", None, None, None),
        Message::GraphQl(operation) => ("operation", None, None, Some(operation.clone())),
        Message::GraphQlUnregistered => ("persisted_query", None, None, None),
    };
    CallOutcome { message: kind, rpc_method, tool, operation, decision: decision.clone() }
}

/// The request as the agent would have parsed it: `--header`s, and a
/// `Content-Length` for `--body`.
fn request_head(offline: &Offline, request: &Request, target: &str) -> Result<RequestHead> {
    let mut headers = Vec::new();
    for header in &offline.headers {
        let (name, value) =
            header.split_once(':').with_context(|| format!("--header {header}: expected NAME: VALUE"))?;
        headers.push((name.trim().to_owned(), value.trim().as_bytes().to_vec()));
    }
    if !offline.body.is_empty() {
        headers.push(("Content-Length".to_owned(), offline.body.len().to_string().into_bytes()));
    }
    let authority = match (request.host, request.ip) {
        (Some(host), _) => Authority::parse(host.as_bytes()).ok(),
        (None, Some(ip)) => Authority::parse(ip.to_string().as_bytes()).ok(),
        (None, None) => None,
    };
    Ok(RequestHead {
        method: offline.method.clone(),
        target: target.to_owned(),
        version: 1,
        headers,
        head_len: 0,
        authority,
        form: TargetForm::Origin,
    })
}

fn read_body(file: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut body = Vec::new();
    let reader: Box<dyn Read> = if file == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("--body {}", file.display()))?)
    };
    reader.take(MAX_BODY_FILE).read_to_end(&mut body).with_context(|| format!("--body {}", file.display()))?;
    Ok(body)
}

fn describe_request(http: &HttpOutcome) -> String {
    let path = http.path.as_deref().unwrap_or("(refused before the rules)");
    let line = format!("{} {path}", http.method);
    let mut described = match (&http.decision, &http.error) {
        (_, Some(error)) => format!("request deny: {} {error}", http.method),
        (Some(decision), None) => {
            let policy = decision.policy.as_deref().unwrap_or("(none)");
            let rule = decision.rule.as_deref().unwrap_or("(none)");
            let reason = decision.reason.as_deref().unwrap_or_default();
            match (decision.allow, decision.audit) {
                (true, false) => format!("request allow: {line} by policy '{policy}', {rule}"),
                (true, true) => format!("request allow (audit): {line} by policy '{policy}'; would deny: {reason}"),
                (false, _) => format!("request deny: {reason} (policy '{policy}', {rule})"),
            }
        }
        (None, None) if http.verdict == "not_inspected" => {
            format!("request {line}: not inspected (no inspected endpoint allows the connection)")
        }
        (None, None) if http.verdict == "allow" => format!("request allow: {line}: a control message, not decided"),
        (None, None) => format!("request {line}: the connection is denied"),
    };
    if http.calls.len() > 1 {
        described.push_str(&format!(" ({} calls decided)", http.calls.len()));
    }
    described
}

#[derive(serde::Serialize)]
struct Output<'a> {
    /// The resolved name that allowed the stream, as the agent logs it in `host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    resolved_host: Option<&'a str>,
    #[serde(flatten)]
    decision: &'a Decision,
    /// With --method and --path: the request's own decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<&'a HttpOutcome>,
}

fn describe(decision: &Decision, request: &Request) -> String {
    let destination = match (request.host, request.ip) {
        (Some(host), Some(ip)) => format!("{host}:{} ({ip})", request.port),
        (Some(host), None) => format!("{host}:{}", request.port),
        (None, Some(IpAddr::V6(ip))) => format!("[{ip}]:{}", request.port),
        (None, Some(ip)) => format!("{ip}:{}", request.port),
        (None, None) => format!("?:{}", request.port),
    };
    let process = request.binary.map_or_else(|| "(unknown)".into(), Path::to_string_lossy);
    let policy = decision.policy.as_deref().unwrap_or_default();
    let reason = decision.reason.as_deref().unwrap_or_default();
    if decision.allow {
        let entry = decision.matched_binary.as_deref().unwrap_or_default();
        let exe = decision.matched_exe.as_deref().unwrap_or_default();
        format!("allow: {process} -> {destination} by policy '{policy}', binary entry '{entry}' matched {exe}")
    } else {
        format!("deny: {process} -> {destination}: {reason}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// OpenShell's own L7 test cases (JSON-RPC, MCP, GraphQL, GraphQL over
    /// WebSocket, WebSocket messages; body-level decisions), each with the
    /// decision its tests assert, extracted from NVIDIA/OpenShell at commit
    /// 2f7fb65591ee; host, port and binary normalised.
    const CASES: &str = include_str!("openshell_l7_cases.json");

    /// How a case's transport reaches the agent: plain HTTP through the gate,
    /// or a CONNECT (or TLS) stream.
    fn transports(case: &Value) -> Vec<bool> {
        match &case["transport"] {
            Value::Array(kinds) => kinds.iter().map(|kind| kind == "forward").collect(),
            _ => vec![false],
        }
    }

    #[test]
    fn policy_eval_decides_openshells_l7_cases_as_openshell_does() {
        let cases: Vec<Value> = serde_json::from_str(CASES).unwrap();
        assert!(cases.len() >= 80, "{} cases", cases.len());
        let mut failures = Vec::new();
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let policy = Policy::from_yaml(case["policy_yaml"].as_str().unwrap())
                .unwrap_or_else(|error| panic!("{name}: policy refused: {error:#}"));
            let request = Request {
                host: Some("api.test"),
                ip: None,
                port: 443,
                binary: Some(Path::new("/usr/bin/curl")),
                ancestors: &[],
                uid: 1000,
                cgroup_id: 1,
            };
            let decision = policy.evaluate(&request).unwrap();
            for plain_http in transports(case) {
                let offline = match case.get("ws_message") {
                    Some(message) => Offline {
                        method: "GET".into(),
                        target: case["upgrade_path"].as_str().unwrap().into(),
                        query: Vec::new(),
                        headers: Vec::new(),
                        body: Vec::new(),
                        websocket_message: Some(message.as_str().unwrap().into()),
                        plain_http,
                    },
                    None => {
                        let http = &case["request"];
                        let headers = http["headers"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(name, _)| !name.eq_ignore_ascii_case("host"))
                            .map(|(name, value)| format!("{name}: {}", value.as_str().unwrap()))
                            .collect();
                        Offline {
                            method: http["method"].as_str().unwrap().into(),
                            target: http["path"].as_str().unwrap().into(),
                            query: Vec::new(),
                            headers,
                            body: http["body"].as_str().unwrap_or_default().as_bytes().to_vec(),
                            websocket_message: None,
                            plain_http,
                        }
                    }
                };
                let outcome = evaluate_http(&policy, &request, &decision, &offline).unwrap();
                let mut expected = case["expected"].as_str().unwrap();
                // The one documented difference: left out, `enforcement`
                // means enforce here and audit in OpenShell, and the load
                // warns (README, "L7 policy").
                if expected == "audit" && !case["policy_yaml"].as_str().unwrap().contains("enforcement:") {
                    assert!(policy.summary().contains("but no `enforcement`"), "{name}: no warning");
                    expected = "deny";
                }
                let verdict = if outcome.error.is_some() { "deny" } else { outcome.verdict };
                if verdict != expected {
                    failures.push(format!(
                        "{name} ({}): expected {expected}, got {verdict}: {}",
                        if plain_http { "plain HTTP" } else { "stream" },
                        describe_request(&outcome)
                    ));
                    continue;
                }
                if let Some(reason) = case.get("reason").and_then(Value::as_str) {
                    let said = outcome
                        .error
                        .clone()
                        .or_else(|| outcome.decision.as_ref().and_then(|decision| decision.reason.clone()))
                        .unwrap_or_default();
                    if !said.contains(reason) {
                        failures.push(format!("{name}: reason {said:?} does not say {reason:?}"));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    }
}
