//! Egress policy: OpenShell-schema YAML evaluated by Rego (regorus).
//!
//! # Policy file
//!
//! The network part of OpenShell's sandbox policy schema, so OpenShell policy
//! files load unchanged:
//!
//! ```yaml
//! version: 1
//! network_policies:
//!   github:                         # the name decisions refer to
//!     name: GitHub                  # optional display name
//!     endpoints:
//!       - host: api.github.com
//!         port: 443
//!       - host: "*.githubusercontent.com"
//!         ports: [443, 80]
//!         enforcement: audit        # enforce (default) | audit: L7 only
//!         tls: skip
//!       - allowed_ips: [10.0.0.0/8] # no host: reached by address
//!         port: 5432
//!     binaries:                     # required: without, no binary
//!       - path: /usr/bin/git
//!       - path: /usr/lib/git-core/*
//! ```
//!
//! `filesystem_policy`, `landlock`, `process` and `network_middlewares` are
//! accepted and ignored, with one warning each. A key the schema does not
//! have is an error that names it and where it is (inside `json_rpc`, `mcp`
//! and `credential_binding` too). Endpoints with REST or WebSocket rules, or
//! a `credential_binding`, are inspected: each HTTP request is decided by
//! [`Policy::evaluate_request`] (egress.rego's L7 part). Fields of the L7
//! protocols not inspected (GraphQL, MCP, JSON-RPC, SQL) and the credential
//! rewrite and signing options are parsed and reported as not yet enforced:
//! one warning per field per policy at load, listed by [`Policy::summary`]
//! and in [`Endpoint::not_enforced`]. Such endpoints are decided on host,
//! port and binary alone.
//!
//! As in OpenShell: `protocol` takes any case; `tls` and `enforcement` are
//! compared exactly, so only `skip` skips (other values have no effect) and
//! only `enforce` enforces (other values mean `audit`), with a warning for
//! each value that is not `skip`, `enforce` or `audit`; a non-empty `ports`
//! wins over `port` (with a warning).
//!
//! # Matching
//!
//! A connection is allowed when a policy has an endpoint matching its
//! destination and a binary entry matching its process.
//!
//! An endpoint matches when the destination port is `port` or one of `ports`,
//! and its host matches:
//! - a DNS name equals the request's host; both are compared lower-cased and
//!   without a trailing dot;
//! - an IP literal equals the request's host as written, an IP literal too
//!   (IPv4-mapped IPv6 addresses compare as IPv4), or, for a request without
//!   host, the destination address. A request whose host is a name never
//!   matches it, whatever the name resolves to (as in OpenShell);
//! - a wildcard: in the first label, `*.example.com` matches exactly one
//!   label (`a.example.com`, not `example.com` nor `a.b.example.com`),
//!   `api-*.example.com` one label with that text around the `*`,
//!   `**.example.com` one or more labels; past the first label only a whole
//!   label `*` is allowed, matching exactly one label
//!   (`*.s3.*.amazonaws.com` matches `b.s3.us-east-1.amazonaws.com`, not
//!   `b.s3.amazonaws.com`). `*`, `**`, partial wildcards past the first label
//!   (`a.b*c.com`) and wildcards of fewer than three labels (`*.com`) are
//!   rejected at load;
//! - an endpoint without host matches a destination address inside one of its
//!   `allowed_ips`.
//!
//! A request without host (opaque TCP) can therefore only match IP-literal and
//! hostless endpoints; the agent gives such a stream the names its sandbox
//! resolved to the address ([`Policy::evaluate_resolved`]). On an endpoint with a host, `allowed_ips` takes no part
//! in matching: it comes back in [`Decision::endpoint`] for the caller (in
//! OpenShell it lists the private addresses the host may resolve to).
//!
//! The connecting executable or one of its ancestors' executables must match
//! an entry of the policy's `binaries`: an exact path, or a glob if it
//! contains `*`, where `*` stays within one path segment and `**` spans any
//! number of them (`/usr/bin/*` matches `/usr/bin/curl`, not `/usr/bin/x/y`;
//! `/opt/**` matches any path below `/opt`, `/**` any executable). An exact
//! path that leads elsewhere on this host through symlinks also matches its
//! target (`/usr/bin/python3` matches `/usr/bin/python3.11`), as OpenShell
//! expands them; the decision still names the entry as written. The decision
//! names the entry and the path it matched, preferring the executable
//! itself, then the nearest ancestor. A policy without `binaries`, or with an
//! empty list, allows no binary (as in OpenShell), and is warned about.
//!
//! # Decision
//!
//! First match wins, in this order, ties going to the smallest policy name,
//! then the first endpoint:
//! 1. an endpoint and binary match: allow;
//! 2. an endpoint matches but no binary does: deny with one
//!    `binary '/usr/bin/python3' not allowed in policy 'github'` per policy,
//!    joined by `; ` (`'(unknown)'` when the executable is not known);
//! 3. deny with `endpoint api.github.com:443 is not allowed by any policy`
//!    (the IP-literal host, or the address when there is no host, bracketed
//!    if IPv6).
//!
//! `enforcement: audit` applies to L7 requests only, as in OpenShell: it
//! never lets a connection through, and [`Decision::audit`] is never set for
//! one.
//!
//! A request whose host is not a valid DNS name is denied without
//! evaluation. [`Policy::evaluate`] fails only for a request with neither
//! host nor address, or if the engine fails; callers should deny then.
//!
//! # Evaluation
//!
//! policies/egress.rego decides, in process, with regorus. The Rust side
//! validates the YAML and normalises it into the Rego data document (see the
//! comment at the top of egress.rego), and normalises each request into its
//! input. The policy is compiled once; [`regorus::CompiledPolicy::eval_with_input`]
//! takes `&self` and builds a short-lived interpreter over the shared,
//! immutable compiled policy, so evaluations run concurrently without locks.
//! The data document files endpoints under lookup keys, so the cost of an
//! evaluation does not grow with the number of endpoints.
//! Binary globs are compiled once at load and reach Rego as the
//! `sandbox_egress.path_glob` extension, since regorus's `glob.match` would
//! recompile its pattern on every call.

#[cfg(test)]
mod l7_tests;
mod normalize;
mod rules;
mod schema;
mod store;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{bail, Context, Result};
use globset::GlobMatcher;
use ipnet::IpNet;
use regorus::{CompiledPolicy, Value};
use serde::Serialize;

use normalize::{canonical_host, validate_dns_name, NetworkPolicy};
pub use store::{compiled_policies, PolicyStore};

const EGRESS_REGO: &str = include_str!("../../../policies/egress.rego");
const DECISION_RULE: &str = "data.sandbox_egress.decision";
const HOST_NAMED_RULE: &str = "data.sandbox_egress.host_named";
const REQUEST_RULE: &str = "data.sandbox_egress.request_decision";
const PATH_GLOB_EXTENSION: &str = "sandbox_egress.path_glob";
/// Names of one address tried by [`Policy::evaluate_resolved`].
pub const MAX_RESOLVED_NAMES: usize = 16;

/// Decisions one policy generation keeps; past this the cache starts over.
const MAX_CACHED_DECISIONS: usize = 4096;

/// Everything egress.rego reads of a request (see `input_document`): equal
/// keys get equal decisions from one policy.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DecisionKey {
    host: Option<String>,
    literal: Option<IpAddr>,
    ip: Option<IpAddr>,
    port: u16,
    binary: Option<PathBuf>,
    ancestors: Vec<PathBuf>,
    uid: u32,
    cgroup_id: u64,
}

/// Everything request_decision reads: the connection's key and the request.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RequestKey {
    connection: DecisionKey,
    method: String,
    path: String,
    query: BTreeMap<String, Vec<String>>,
    message: Message,
    via_gate: bool,
}

/// One message of one HTTP request on an inspected connection: the request
/// itself, or one call, operation or WebSocket text message in it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// As sent (rules compare methods in any case); `WEBSOCKET_TEXT` for a
    /// client text message after an upgrade.
    pub method: &'a str,
    /// Canonical (see [`crate::wire::path::canonicalize`]).
    pub path: &'a str,
    /// Decoded names to decoded values.
    pub query: &'a BTreeMap<String, Vec<String>>,
    /// What the endpoint's protocol read of it.
    pub message: &'a Message,
    /// Plain HTTP through the private-IP gate, decided request by request
    /// (not a TLS or CONNECT stream decided once for its host).
    pub via_gate: bool,
}

/// What an L7 room read of a request, as the rules match it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Message {
    /// The HTTP request itself: REST and WebSocket rules match its method,
    /// path and query.
    Http,
    /// One JSON-RPC or MCP call; `tool`, a `tools/call`'s `params.name`.
    JsonRpcCall { method: String, tool: Option<String> },
    /// A response frame the client sent (it answers a server's request).
    JsonRpcResponse,
    /// An MCP `GET` with `Accept: text/event-stream`: the server's messages.
    ReceiveStream,
    /// An MCP `DELETE` without a body: the client ends its session.
    SessionEnd,
    /// One GraphQL operation (a registered persisted query as registered).
    GraphQl(Operation),
    /// A persisted query's hash or id that the endpoint does not register.
    GraphQlUnregistered,
}

/// A GraphQL operation as rules match it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Operation {
    /// `query`, `mutation` or `subscription`.
    pub operation_type: String,
    /// Empty for an anonymous operation.
    pub operation_name: String,
    /// Root field names (not aliases), fragments expanded, sorted, unique.
    pub fields: Vec<String>,
}

/// The L7 verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestDecision {
    pub allow: bool,
    /// Allowed only because the deciding endpoint is in audit mode; `reason`
    /// says what would have denied.
    pub audit: bool,
    /// The policy whose endpoint decided.
    pub policy: Option<String>,
    /// The rule that decided (`rules[2]`, `deny_rules[0]`, `access:
    /// read-only`), or the endpoint's rules when none matched.
    pub rule: Option<String>,
    pub reason: Option<String>,
    /// The deciding endpoint's `credential_binding` provider: its secret
    /// goes into the request (see [`crate::credentials`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_provider: Option<String>,
}

impl RequestDecision {
    pub fn denied(reason: Option<String>) -> Self {
        RequestDecision { allow: false, audit: false, policy: None, rule: None, reason, credential_provider: None }
    }
}

/// One connection to decide on.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// From SNI, the HTTP Host header or the CONNECT authority; `None` (or
    /// empty) for opaque TCP. An IP literal here is what IP-literal endpoints
    /// are compared with (`ip` is, without a host), and stands in for `ip`
    /// when that is `None`.
    pub host: Option<&'a str>,
    pub ip: Option<IpAddr>,
    pub port: u16,
    /// Executable of the connecting process.
    pub binary: Option<&'a Path>,
    /// Executables of its ancestors, nearest first.
    pub ancestors: &'a [PathBuf],
    pub uid: u32,
    pub cgroup_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allow: bool,
    /// Allowed only because the endpoint is in audit mode; `reason` says what
    /// would have denied. For L7 requests: a connection never sets it.
    pub audit: bool,
    /// The policy that allowed the connection.
    pub policy: Option<String>,
    /// Why it was denied, or would have been under audit.
    pub reason: Option<String>,
    /// The endpoint that allowed the connection.
    pub endpoint: Option<Endpoint>,
    /// The `binaries` entry that matched, as written.
    pub matched_binary: Option<String>,
    /// The executable, or ancestor's executable, that entry matched.
    pub matched_exe: Option<String>,
    /// Set when an inspected endpoint allows the connection: its HTTP
    /// requests are then each decided by [`Policy::evaluate_request`].
    pub inspect: Option<Inspection>,
}

impl Decision {
    fn deny(reason: String) -> Decision {
        Decision {
            allow: false,
            audit: false,
            policy: None,
            reason: Some(reason),
            endpoint: None,
            matched_binary: None,
            matched_exe: None,
            inspect: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Lower-cased, as written otherwise (a name, wildcard or IP literal);
    /// `None` for an endpoint reached by address through `allowed_ips`.
    pub host: Option<String>,
    /// Sorted, without duplicates.
    pub ports: Vec<u16>,
    pub allowed_ips: Vec<IpNet>,
    /// `tls: skip`: do not look for a TLS ClientHello.
    pub tls_skip: bool,
    pub enforcement: Enforcement,
    pub protocol: Option<String>,
    /// Set when the agent inspects this endpoint's HTTP requests.
    pub inspection: Option<Inspection>,
    /// `credential_binding.provider`: its requests get that provider's secret.
    pub credential_provider: Option<String>,
    /// Fields of this endpoint that need L7 inspection, which is not done yet.
    pub not_enforced: Vec<&'static str>,
}

/// How an inspected endpoint's requests are read and decided (see
/// egress.rego's L7 part).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// `rest`, `websocket`, `graphql`, `json-rpc` or `mcp`: the L7 room
    /// that reads its requests.
    pub protocol: &'static str,
    /// Selects this endpoint among inspected ones of a host and port.
    pub path: Option<String>,
    /// `%2F` inside a path segment is kept instead of refused.
    pub allow_encoded_slash: bool,
    /// TLS to it is terminated so its requests can be decided; not with
    /// `tls: skip` (then only plain HTTP to it is inspected).
    pub terminate_tls: bool,
    /// `access: read-only`, or how many allow rules.
    pub rules: String,
    pub deny_rules: usize,
    /// `enforcement: audit`: what its rules would deny goes through, logged.
    pub audit: bool,
    /// What the rooms reading bodies and messages need.
    #[serde(skip)]
    pub messages: Arc<MessageRules>,
    /// In a decision: the other inspected endpoints allowing the same
    /// connection, in order. A request is read by the one whose `path`
    /// selects it most specifically (see [`Inspection::select`]).
    #[serde(skip)]
    pub others: Vec<Inspection>,
}

/// An inspected endpoint's settings for bodies and messages.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MessageRules {
    /// Its `path` compiled, for choosing among several inspected endpoints.
    pub path_matcher: Option<PathMatcher>,
    /// JSON-RPC, MCP and GraphQL bodies are read up to this to be decided.
    pub max_body_bytes: usize,
    /// MCP: a tool name must be 1 to 128 of `A-Z a-z 0-9 _ . -`.
    pub strict_tool_names: bool,
    /// GraphQL persisted queries: `None`, denied; else the registered ones
    /// by hash or id (`persisted_queries: allow_registered`).
    pub persisted: Option<BTreeMap<String, Operation>>,
    /// A WebSocket endpoint whose client messages are GraphQL operations.
    pub websocket_graphql: bool,
    /// `request_body_credential_rewrite`.
    pub rewrite_body: bool,
    /// `websocket_credential_rewrite`.
    pub rewrite_websocket: bool,
}

impl Inspection {
    /// The endpoint that reads a request for `path`: among this one and
    /// [`Inspection::others`], the one whose `path` selects it with the
    /// most literal characters (no `path` selects every request, with
    /// none); `None` when several are inspected and none selects it. A lone
    /// inspected endpoint reads every request (its rules then find it
    /// outside their path).
    pub fn select(&self, path: &str) -> Option<&Inspection> {
        if self.others.is_empty() {
            return Some(self);
        }
        let mut best: Option<(usize, &Inspection)> = None;
        for candidate in std::iter::once(self).chain(&self.others) {
            let specificity = match (candidate.path.as_deref(), &candidate.messages.path_matcher) {
                (Some(pattern), Some(matcher)) if matcher.matches(path) => {
                    pattern.chars().filter(|&c| c != '*').count()
                }
                (Some(_), _) => continue,
                (None, _) => 0,
            };
            // Ties go to the first in order.
            if best.is_none_or(|(most, _)| specificity > most) {
                best = Some((specificity, candidate));
            }
        }
        best.map(|(_, candidate)| candidate)
    }
}

/// An endpoint `path` compiled once, matching as egress.rego's
/// `path_matches`: `**` any path, else a glob where `*` stays within a
/// segment.
#[derive(Debug, Clone)]
pub struct PathMatcher(Option<GlobMatcher>);

impl PathMatcher {
    pub fn new(pattern: &str) -> Result<Self> {
        if pattern == "**" {
            return Ok(Self(None));
        }
        let glob = globset::GlobBuilder::new(pattern).literal_separator(true).build()?;
        Ok(Self(Some(glob.compile_matcher())))
    }

    pub fn matches(&self, path: &str) -> bool {
        self.0.as_ref().is_none_or(|glob| glob.is_match(path))
    }
}

/// Equal when made from the same pattern.
impl PartialEq for PathMatcher {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_ref().map(GlobMatcher::glob) == other.0.as_ref().map(GlobMatcher::glob)
    }
}

impl Eq for PathMatcher {}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    #[default]
    Enforce,
    Audit,
}

/// A loaded policy file, ready to evaluate requests. Immutable: share it
/// behind an `Arc` and replace it whole to reload.
pub struct Policy {
    compiled: CompiledPolicy,
    /// Decisions made by this policy (so by this generation: a reload makes
    /// a new `Policy` and starts empty), by everything a decision reads.
    decisions: Mutex<HashMap<DecisionKey, Decision>>,
    /// `host_named`, from the same engine: the DNS side of the host matcher.
    host_named: CompiledPolicy,
    /// `request_decision`, from the same engine: L7.
    request: CompiledPolicy,
    /// Like `decisions`, for requests.
    request_decisions: Mutex<HashMap<RequestKey, RequestDecision>>,
    policies: BTreeMap<String, NetworkPolicy>,
    warnings: Vec<String>,
}

impl Policy {
    /// Errors name the file and the offending key or value.
    pub fn from_file(path: &Path) -> Result<Policy> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read policy file {}", path.display()))?;
        Policy::from_yaml(&text).with_context(|| format!("policy file {}", path.display()))
    }

    /// Logs a warning for each ignored section and each field not yet
    /// enforced.
    pub fn from_yaml(text: &str) -> Result<Policy> {
        let file: schema::PolicyFile = serde_norway::from_str(text)?;
        let normalized = normalize::normalize(file)?;
        for warning in &normalized.warnings {
            tracing::warn!("{warning}");
        }
        let (compiled, host_named, request) = compile(normalized.data, normalized.globs)?;
        Ok(Policy {
            compiled,
            decisions: Mutex::default(),
            host_named,
            request,
            request_decisions: Mutex::default(),
            policies: normalized.policies,
            warnings: normalized.warnings,
        })
    }

    pub fn evaluate(&self, request: &Request) -> Result<Decision> {
        self.decide(request, destination(request))
    }

    /// `request`, to `destination` (see [`destination`]).
    fn decide(&self, request: &Request, destination: Destination) -> Result<Decision> {
        let Destination { host, literal, ip } = destination;
        if let Some(name) = &host {
            if validate_dns_name(name).is_err() {
                return Ok(Decision::deny(format!("host '{name}' is not a valid DNS name")));
            }
        }
        if host.is_none() && ip.is_none() {
            bail!("a request needs a host or an address");
        }
        let key = decision_key(request, &host, literal, ip);
        if let Some(decision) = self.decisions.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            return Ok(decision.clone());
        }
        let output = self.compiled.eval_with_input(input_document(request, host.as_deref(), literal, ip)?)?;
        let decision =
            self.decision_from(&output).with_context(|| format!("unexpected decision from egress.rego: {output}"))?;
        remember(&self.decisions, key, &decision);
        Ok(decision)
    }

    /// One HTTP request on a connection this policy allowed with
    /// [`Decision::inspect`] set: decided by the inspected endpoints' rules
    /// (OpenShell's L7 semantics; see egress.rego). `request` is the
    /// connection's, as given to [`Policy::evaluate`].
    pub fn evaluate_request(&self, request: &Request, http: &HttpRequest) -> Result<RequestDecision> {
        let Destination { host, literal, ip } = destination(request);
        if host.is_none() && ip.is_none() {
            bail!("a request needs a host or an address");
        }
        let key = RequestKey {
            connection: decision_key(request, &host, literal, ip),
            method: http.method.to_owned(),
            path: http.path.to_owned(),
            query: http.query.clone(),
            message: http.message.clone(),
            via_gate: http.via_gate,
        };
        if let Some(decision) = self.request_decisions.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            return Ok(decision.clone());
        }
        let mut input = input_document(request, host.as_deref(), literal, ip)?;
        let query: BTreeMap<Value, Value> = http
            .query
            .iter()
            .map(|(name, values)| {
                (
                    Value::from(name.as_str()),
                    Value::from(values.iter().map(|v| Value::from(v.as_str())).collect::<Vec<_>>()),
                )
            })
            .collect();
        let mut fields = Value::new_object();
        let object = fields.as_object_mut()?;
        object.insert("method".into(), Value::from(http.method));
        object.insert("path".into(), Value::from(http.path));
        object.insert("query".into(), Value::from(query));
        object.insert("via_gate".into(), Value::from(http.via_gate));
        object.insert("message".into(), message_document(http.message)?);
        input.as_object_mut()?.insert("request".into(), fields);
        let output = self.request.eval_with_input(input)?;
        let decision = self
            .request_decision_from(&output)
            .with_context(|| format!("unexpected request decision from egress.rego: {output}"))?;
        remember(&self.request_decisions, key, &decision);
        Ok(decision)
    }

    /// A stream with no host of its own (opaque, silent, TLS without SNI)
    /// to `request.ip`, decided with the names the sandbox resolved to that
    /// address, most recent first. Each name is tried as the request's host
    /// (its endpoints match, and the address's as always); the first allow
    /// wins: any allowed name allows the address, as FQDN policies do in
    /// Cilium. Only the [`MAX_RESOLVED_NAMES`] most recent names are tried,
    /// so an address many names share costs a bounded number of
    /// evaluations. Without names, the address alone decides. Returns the
    /// name that allowed.
    pub fn evaluate_resolved(&self, request: &Request, resolved: &[String]) -> Result<(Decision, Option<String>)> {
        let resolved = &resolved[..resolved.len().min(MAX_RESOLVED_NAMES)];
        if resolved.is_empty() {
            return Ok((self.evaluate(&Request { host: None, ..*request })?, None));
        }
        let mut reasons: Vec<String> = Vec::new();
        let literal = request.ip.map(|ip| ip.to_canonical());
        for name in resolved {
            let destination = Destination { host: Some(canonical_host(name)), literal, ip: request.ip };
            let decision = self.decide(request, destination)?;
            if decision.allow {
                return Ok((decision, Some(name.clone())));
            }
            reasons.extend(decision.reason.filter(|reason| !reasons.contains(reason)));
        }
        Ok((Decision::deny(reasons.join("; ")), None))
    }

    /// Whether an endpoint's host, a name or a wildcard, matches `host` as it
    /// would for a connection, whatever the endpoint's ports and binaries:
    /// the names the agent's DNS answers. IP literals and invalid names are
    /// never named (an IP needs no lookup).
    pub fn names_host(&self, host: &str) -> Result<bool> {
        let host = canonical_host(host);
        if host.parse::<IpAddr>().is_ok() || validate_dns_name(&host).is_err() {
            return Ok(false);
        }
        let mut input = Value::new_object();
        let fields = input.as_object_mut()?;
        fields.insert("host_domains".into(), Value::from(host_domains(&host)));
        fields.insert("host".into(), Value::from(host.as_str()));
        Ok(self.host_named.eval_with_input(input)? == Value::from(true))
    }

    /// Whether a decision may need the connecting process's ancestors
    /// (walking /proc for them costs on every connection): not when every
    /// policy with endpoints lists `/**`, which any known executable
    /// matches itself, first. The caller walks anyway for an unknown one.
    pub fn matches_binaries(&self) -> bool {
        self.policies
            .values()
            .any(|policy| !policy.endpoints.is_empty() && !policy.binaries.iter().any(|binary| binary == "/**"))
    }

    /// What `policy check` prints: each policy with its endpoints and
    /// binaries, then the load warnings.
    pub fn summary(&self) -> String {
        self.summary_with(&[])
    }

    /// [`Policy::summary`] with `more_warnings` after the load warnings.
    pub fn summary_with(&self, more_warnings: &[String]) -> String {
        let endpoint_count: usize = self.policies.values().map(|policy| policy.endpoints.len()).sum();
        let mut out = format!(
            "{} network {}, {} {}\n",
            self.policies.len(),
            plural(self.policies.len(), "policy", "policies"),
            endpoint_count,
            plural(endpoint_count, "endpoint", "endpoints"),
        );
        for (name, policy) in &self.policies {
            match &policy.display_name {
                Some(display_name) if display_name != name => {
                    let _ = writeln!(out, "policy '{name}' ({display_name})");
                }
                _ => {
                    let _ = writeln!(out, "policy '{name}'");
                }
            }
            for endpoint in &policy.endpoints {
                let _ = writeln!(out, "  endpoint {}", describe_endpoint(endpoint));
            }
            let binaries = if policy.binaries.is_empty() { "none".to_owned() } else { policy.binaries.join(", ") };
            let _ = writeln!(out, "  binaries: {binaries}");
        }
        if !self.warnings.is_empty() || !more_warnings.is_empty() {
            out.push_str("warnings:\n");
            for warning in self.warnings.iter().chain(more_warnings) {
                let _ = writeln!(out, "  {warning}");
            }
        }
        out
    }

    fn decision_from(&self, output: &Value) -> Result<Decision> {
        let text = |key: &str| match &output[key] {
            Value::String(text) => Some(text.to_string()),
            _ => None,
        };
        let policy = text("policy");
        let endpoint = match (&policy, &output["endpoint"]) {
            (Some(name), position @ Value::Number(_)) => {
                let position = usize::try_from(position.as_u64()?)?;
                let endpoint = self
                    .policies
                    .get(name)
                    .and_then(|policy| policy.endpoints.get(position))
                    .with_context(|| format!("no endpoint {position} in policy '{name}'"))?;
                Some(endpoint.clone())
            }
            _ => None,
        };
        let inspect = match &output["inspect"] {
            Value::Array(pairs) => {
                let mut inspected = Vec::with_capacity(pairs.len());
                for pair in pairs.iter() {
                    let [Value::String(name), position] = pair.as_array()?.as_slice() else {
                        bail!("`inspect` is not a list of [policy, endpoint]");
                    };
                    let endpoint = self.endpoint(name, usize::try_from(position.as_u64()?)?)?;
                    inspected.extend(endpoint.inspection.clone());
                }
                let mut inspected = inspected.into_iter();
                inspected.next().map(|first| Inspection { others: inspected.collect(), ..first })
            }
            _ => None,
        };
        Ok(Decision {
            allow: *output["allow"].as_bool()?,
            audit: *output["audit"].as_bool()?,
            policy,
            reason: text("reason"),
            endpoint,
            matched_binary: text("binary"),
            matched_exe: text("exe"),
            inspect,
        })
    }

    fn request_decision_from(&self, output: &Value) -> Result<RequestDecision> {
        let text = |key: &str| match &output[key] {
            Value::String(text) => Some(text.to_string()),
            _ => None,
        };
        let policy = text("policy");
        let endpoint = match (&policy, &output["endpoint"]) {
            (Some(name), position @ Value::Number(_)) => {
                Some(self.endpoint(name, usize::try_from(position.as_u64()?)?)?)
            }
            _ => None,
        };
        // No rule matched: name the rules that did not.
        let rule = text("rule").or_else(|| Some(endpoint?.inspection.as_ref()?.rules.clone()));
        Ok(RequestDecision {
            allow: *output["allow"].as_bool()?,
            audit: *output["audit"].as_bool()?,
            policy,
            rule,
            reason: text("reason"),
            credential_provider: endpoint.and_then(|endpoint| endpoint.credential_provider.clone()),
        })
    }

    /// Every `credential_binding`: (policy, endpoint position, provider).
    pub fn credential_bindings(&self) -> impl Iterator<Item = (&str, usize, &str)> {
        self.policies.iter().flat_map(|(name, policy)| {
            policy.endpoints.iter().enumerate().filter_map(move |(position, endpoint)| {
                Some((name.as_str(), position, endpoint.credential_provider.as_deref()?))
            })
        })
    }

    /// Refuses a binding to a provider that is not in `providers` (those
    /// of the agent's `--credentials`).
    pub fn check_credential_bindings<'a>(&self, providers: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        for (name, position, provider) in self.credential_bindings() {
            if !providers.clone().any(|known| known == provider) {
                let known: Vec<&str> = providers.clone().collect();
                let known = if known.is_empty() {
                    "the agent runs without --credentials".to_owned()
                } else {
                    format!("--credentials has {}", known.join(", "))
                };
                bail!(
                    "network_policies.{name}.endpoints[{position}].credential_binding.provider: \
                     no credential provider '{provider}' ({known})"
                );
            }
        }
        Ok(())
    }

    fn endpoint(&self, policy: &str, position: usize) -> Result<&Endpoint> {
        self.policies
            .get(policy)
            .and_then(|found| found.endpoints.get(position))
            .with_context(|| format!("no endpoint {position} in policy '{policy}'"))
    }
}

/// Keeps `decision` for `key`; a full cache starts over (a policy serves a
/// bounded set of keys in practice, and a reload starts a new one anyway).
fn remember<K: std::hash::Hash + Eq, D: Clone>(cache: &Mutex<HashMap<K, D>>, key: K, decision: &D) {
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if cache.len() >= MAX_CACHED_DECISIONS {
        cache.clear();
    }
    cache.insert(key, decision.clone());
}

fn decision_key(request: &Request, host: &Option<String>, literal: Option<IpAddr>, ip: Option<IpAddr>) -> DecisionKey {
    DecisionKey {
        host: host.clone(),
        literal,
        ip,
        port: request.port,
        binary: request.binary.map(Path::to_path_buf),
        ancestors: request.ancestors.to_vec(),
        uid: request.uid,
        cgroup_id: request.cgroup_id,
    }
}

/// The decision, `host_named` for DNS, and `request_decision` for L7.
fn compile(
    data: serde_json::Value,
    globs: HashMap<String, GlobMatcher>,
) -> Result<(CompiledPolicy, CompiledPolicy, CompiledPolicy)> {
    let mut engine = regorus::Engine::new();
    engine.add_policy("policies/egress.rego".to_owned(), EGRESS_REGO.to_owned())?;
    engine.add_data(Value::from(data))?;
    let globs = Arc::new(globs);
    engine.add_extension(
        PATH_GLOB_EXTENSION.to_owned(),
        2,
        Box::new(move |args: Vec<Value>| path_glob(&globs, &args)),
    )?;
    Ok((
        engine.compile_with_entrypoint(&Arc::from(DECISION_RULE))?,
        engine.compile_with_entrypoint(&Arc::from(HOST_NAMED_RULE))?,
        engine.compile_with_entrypoint(&Arc::from(REQUEST_RULE))?,
    ))
}

/// `sandbox_egress.path_glob(pattern, path)`: whether `path` matches one of
/// the policy's binary globs.
fn path_glob(globs: &HashMap<String, GlobMatcher>, args: &[Value]) -> Result<Value> {
    let [pattern, path] = args else { bail!("{PATH_GLOB_EXTENSION} takes a pattern and a path") };
    let pattern = pattern.as_string()?;
    let glob = globs
        .get(pattern.as_ref())
        .with_context(|| format!("{PATH_GLOB_EXTENSION}: '{pattern}' is not a binary glob of this policy"))?;
    Ok(Value::from(glob.is_match(path.as_string()?.as_ref())))
}

/// Where a request goes, as egress.rego matches it.
struct Destination {
    /// A DNS name, canonical.
    host: Option<String>,
    /// What IP-literal endpoints are compared with.
    literal: Option<IpAddr>,
    /// The address, for `allowed_ips`.
    ip: Option<IpAddr>,
}

/// An IP-literal host is compared as written with IP-literal endpoints
/// (as OpenShell does; a v4-mapped one is its IPv4 address) and stands in
/// for a missing address; without a host, the address is.
fn destination(request: &Request) -> Destination {
    let host = request.host.map(canonical_host).filter(|host| !host.is_empty());
    match host.as_deref().map(str::parse::<IpAddr>) {
        Some(Ok(literal)) => {
            let literal = literal.to_canonical();
            Destination { host: None, literal: Some(literal), ip: request.ip.or(Some(literal)) }
        }
        Some(Err(_)) => Destination { host, literal: None, ip: request.ip },
        None => Destination { host: None, literal: request.ip.map(|ip| ip.to_canonical()), ip: request.ip },
    }
}

/// The Rego input (see the top of egress.rego).
fn input_document(request: &Request, host: Option<&str>, literal: Option<IpAddr>, ip: Option<IpAddr>) -> Result<Value> {
    let mut input = Value::new_object();
    let fields = input.as_object_mut()?;
    fields.insert("host_domains".into(), Value::from(host.map(host_domains).unwrap_or_default()));
    if let Some(host) = host {
        fields.insert("host".into(), Value::from(host));
    }
    if let Some(literal) = literal {
        fields.insert("literal".into(), Value::from(literal.to_string()));
    }
    if let Some(ip) = ip {
        fields.insert("ip".into(), Value::from(ip.to_canonical().to_string()));
    }
    fields.insert("port".into(), Value::from(u64::from(request.port)));
    if let Some(binary) = request.binary {
        fields.insert("binary".into(), Value::from(binary.to_string_lossy().as_ref()));
    }
    let exe_paths: Vec<Value> = request
        .binary
        .into_iter()
        .chain(request.ancestors.iter().map(PathBuf::as_path))
        .map(|path| Value::from(path.to_string_lossy().as_ref()))
        .collect();
    fields.insert("exe_paths".into(), Value::from(exe_paths));
    fields.insert("uid".into(), Value::from(u64::from(request.uid)));
    fields.insert("cgroup_id".into(), Value::from(request.cgroup_id));
    Ok(input)
}

/// `input.request.message` (see the top of egress.rego).
fn message_document(message: &Message) -> Result<Value> {
    let document = match message {
        Message::Http => serde_json::json!({ "kind": "http" }),
        Message::JsonRpcCall { method, tool } => {
            serde_json::json!({ "kind": "jsonrpc", "method": method, "tool": tool })
        }
        Message::JsonRpcResponse => serde_json::json!({ "kind": "jsonrpc_response" }),
        Message::ReceiveStream => serde_json::json!({ "kind": "receive_stream" }),
        Message::SessionEnd => serde_json::json!({ "kind": "session_end" }),
        Message::GraphQl(operation) => serde_json::json!({
            "kind": "graphql",
            "operation_type": operation.operation_type,
            "operation_name": operation.operation_name,
            "fields": operation.fields,
        }),
        Message::GraphQlUnregistered => serde_json::json!({ "kind": "graphql_unregistered" }),
    };
    Ok(Value::from(document))
}

/// ".b.example.com", ".example.com", ".com" for "a.b.example.com".
fn host_domains(host: &str) -> Vec<Value> {
    host.match_indices('.').map(|(at, _)| Value::from(&host[at..])).collect()
}

fn describe_endpoint(endpoint: &Endpoint) -> String {
    let ports: Vec<String> = endpoint.ports.iter().map(u16::to_string).collect();
    let host = match &endpoint.host {
        Some(host) if host.contains(':') => format!("[{host}]"),
        Some(host) => host.clone(),
        None => "(any host)".to_owned(),
    };
    let mut description = format!("{host}:{}", ports.join(","));
    let nets: Vec<String> = endpoint.allowed_ips.iter().map(IpNet::to_string).collect();
    if !nets.is_empty() {
        let _ = write!(description, " allowed_ips {}", nets.join(","));
    }
    if let Some(protocol) = &endpoint.protocol {
        let _ = write!(description, " protocol {protocol}");
    }
    if endpoint.enforcement == Enforcement::Audit {
        description.push_str(" audit");
    }
    if endpoint.tls_skip {
        description.push_str(" tls skip");
    }
    if let Some(inspection) = &endpoint.inspection {
        let _ = write!(description, " inspected ({}", inspection.protocol);
        if let Some(path) = &inspection.path {
            let _ = write!(description, ", path {path}");
        }
        let _ = write!(description, ", {}", inspection.rules);
        if inspection.deny_rules > 0 {
            let _ = write!(description, ", {} deny rules", inspection.deny_rules);
        }
        if inspection.allow_encoded_slash {
            description.push_str(", allow_encoded_slash");
        }
        if let Some(provider) = &endpoint.credential_provider {
            let _ = write!(description, ", credential provider {provider}");
        }
        description.push(')');
    }
    if !endpoint.not_enforced.is_empty() {
        let _ = write!(description, " (not yet enforced: {})", endpoint.not_enforced.join(", "));
    }
    description
}

fn plural<'a>(count: usize, one: &'a str, many: &'a str) -> &'a str {
    if count == 1 {
        one
    } else {
        many
    }
}
