//! `sandbox-egress policy ...`: policy files checked and tried out offline.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{Decision, HttpRequest, Policy, Request, RequestDecision};

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
    Eval {
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
    },
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
        PolicyCommand::Eval { file, host, port, binary, ancestors, ip, resolved, method, path, query } => {
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
                (Some(method), Some(path)) => Some(evaluate_http(&policy, &request, &decision, method, &path, &query)?),
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

/// What the live agent does with one request on the connection.
#[derive(serde::Serialize)]
struct HttpOutcome {
    method: String,
    /// Canonical, as rules see it and the origin would receive it.
    path: Option<String>,
    /// `allow`, `deny`, or `not_inspected` (the connection is allowed and
    /// its requests are relayed undecided) or `connection_denied`.
    verdict: &'static str,
    #[serde(flatten)]
    decision: Option<RequestDecision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn evaluate_http(
    policy: &Policy,
    request: &Request,
    decision: &Decision,
    method: String,
    target: &str,
    query: &[String],
) -> Result<HttpOutcome> {
    let outcome =
        |verdict, path, decision, error| HttpOutcome { method: method.clone(), path, verdict, decision, error };
    let Some(inspection) = decision.inspect.as_ref().filter(|_| decision.allow) else {
        let verdict = if decision.allow { "not_inspected" } else { "connection_denied" };
        return Ok(outcome(verdict, None, None, None));
    };
    let mut canonical = match crate::wire::path::canonicalize(target, inspection.allow_encoded_slash) {
        Ok(canonical) => canonical,
        Err(reason) => return Ok(outcome("deny", None, None, Some(reason))),
    };
    for pair in query {
        let (name, value) = pair.split_once('=').with_context(|| format!("--query {pair}: expected NAME=VALUE"))?;
        canonical.query.entry(name.to_owned()).or_default().push(value.to_owned());
    }
    let http = HttpRequest { method: &method, path: &canonical.path, query: &canonical.query };
    let verdict = policy.evaluate_request(request, &http)?;
    let label = if verdict.allow { "allow" } else { "deny" };
    Ok(outcome(label, Some(canonical.path.clone()), Some(verdict), None))
}

fn describe_request(http: &HttpOutcome) -> String {
    let path = http.path.as_deref().unwrap_or("(refused before the rules)");
    let line = format!("{} {path}", http.method);
    match (&http.decision, &http.error) {
        (_, Some(error)) => format!("request deny: {} {}", http.method, error),
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
        (None, None) => format!("request {line}: the connection is denied"),
    }
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
