//! From the file as written to what the agent enforces: validates every
//! value, collects the load warnings, and builds the data document that
//! policies/egress.rego matches against (see the comment at its top).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use globset::{GlobBuilder, GlobMatcher};
use ipnet::IpNet;
use serde_json::{json, Map, Value as Json};

use super::{
    rules::{self, validate_path_glob, BINDING_ONLY_RULES},
    schema::{EndpointDef, NetworkPolicyDef, PolicyFile, Protocol},
    Endpoint, Enforcement, Inspection, MessageRules, PathMatcher,
};
use crate::credentials::placeholder::is_valid_name as is_provider_name;

/// Longest DNS name in text form without the trailing dot (RFC 1035 §3.1).
const MAX_DNS_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

pub(super) struct NetworkPolicy {
    pub display_name: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// As written; empty: no binary.
    pub binaries: Vec<String>,
}

/// Everything `Policy` keeps from a file.
pub(super) struct Normalized {
    pub policies: BTreeMap<String, NetworkPolicy>,
    pub warnings: Vec<String>,
    /// The Rego data document.
    pub data: Json,
    /// Binary globs by pattern, compiled once for `sandbox_egress.path_glob`.
    pub globs: HashMap<String, GlobMatcher>,
}

pub(super) fn normalize(file: PolicyFile) -> Result<Normalized> {
    if file.version != 1 {
        bail!("version: unsupported policy version {} (expected 1)", file.version);
    }
    let mut warnings: Vec<String> = file
        .ignored_sections()
        .into_iter()
        .map(|section| format!("section `{section}` is not enforced by sandbox-egress and is ignored"))
        .collect();
    let mut policies = BTreeMap::new();
    let mut globs = HashMap::new();
    let mut index = RegoIndex::default();
    for (name, definition) in file.network_policies {
        let context = format!("network_policies.{name}");
        let (policy, patterns) = normalize_policy(&name, definition, &context, &mut warnings)?;
        let binaries =
            binaries_document(&policy.binaries, &mut globs).with_context(|| format!("{context}.binaries"))?;
        for (position, (endpoint, matching)) in policy.endpoints.iter().zip(&patterns).enumerate() {
            index.add(&name, position, endpoint, matching, &binaries);
        }
        policies.insert(name, policy);
    }
    check_inspection_overlaps(&policies)?;
    Ok(Normalized { policies, warnings, data: index.into_document(), globs })
}

fn normalize_policy(
    name: &str,
    definition: NetworkPolicyDef,
    context: &str,
    warnings: &mut Vec<String>,
) -> Result<(NetworkPolicy, Vec<Matching>)> {
    // field -> endpoint positions, so each field is reported once per policy.
    let mut not_enforced: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    // `tls` and `enforcement` values other than `skip` and `enforce`/`audit`.
    let mut other_tls: BTreeSet<String> = BTreeSet::new();
    let mut other_enforcement: BTreeSet<String> = BTreeSet::new();
    let mut port_ignored = Vec::new();
    let mut endpoints = Vec::with_capacity(definition.endpoints.len());
    let mut patterns = Vec::with_capacity(definition.endpoints.len());
    for (position, endpoint) in definition.endpoints.into_iter().enumerate() {
        let endpoint_context = format!("{context}.endpoints[{position}]");
        other_tls.extend(endpoint.tls.clone().filter(|tls| tls != "skip"));
        other_enforcement.extend(endpoint.enforcement.clone().filter(|value| value != "enforce" && value != "audit"));
        if endpoint.port.is_some() && endpoint.ports.as_ref().is_some_and(|ports| !ports.is_empty()) {
            port_ignored.push(position);
        }
        let enforcement_implicit = endpoint.enforcement.is_none();
        let mut notes = Vec::new();
        let (endpoint, pattern) = normalize_endpoint(endpoint, &endpoint_context, &mut notes)?;
        warnings.extend(notes.into_iter().map(|note| format!("policy '{name}': endpoint {position} {note}")));
        if let Some(inspection) = &endpoint.inspection {
            if enforcement_implicit && inspection.rules != BINDING_ONLY_RULES {
                warnings.push(format!(
                    "policy '{name}': endpoint {position} has rules but no `enforcement`: sandbox-egress enforces \
                     them, OpenShell would only audit them; write `enforcement: enforce` (or `audit`) to mean the \
                     same in both"
                ));
            }
            if endpoint.tls_skip {
                warnings.push(format!(
                    "policy '{name}': endpoint {position} has `tls: skip`, so its rules apply to plain HTTP only: \
                     TLS to it is relayed undecrypted and its requests are not decided"
                ));
            }
        }
        for &field in &endpoint.not_enforced {
            not_enforced.entry(field).or_default().push(position);
        }
        endpoints.push(endpoint);
        patterns.push(pattern);
    }
    for (field, positions) in not_enforced {
        warnings.push(format!(
            "policy '{name}': `{field}` is not yet enforced ({}), \
             which is decided on host, port and binary only",
            endpoint_list(&positions)
        ));
    }
    if !port_ignored.is_empty() {
        warnings.push(format!(
            "policy '{name}': `port` is ignored where `ports` is set too ({}), as in OpenShell",
            endpoint_list(&port_ignored)
        ));
    }
    for value in other_tls {
        let effect = match value.as_str() {
            "terminate" | "passthrough" => "is deprecated and has no effect",
            _ => "has no effect: OpenShell compares exactly, and only `skip` does anything",
        };
        warnings.push(format!("policy '{name}': `tls: {value}` {effect}"));
    }
    for value in other_enforcement {
        warnings.push(format!(
            "policy '{name}': `enforcement: {value}` means `audit`: OpenShell compares exactly, \
             and only `enforce` enforces"
        ));
    }
    if definition.binaries.is_empty() {
        warnings.push(format!("policy '{name}' has no `binaries`: no binary may use its endpoints"));
    }
    if definition.binaries.iter().any(|binary| binary.harness.is_some()) {
        warnings.push(format!("policy '{name}': binary field `harness` is deprecated and ignored"));
    }
    let binaries = definition.binaries.into_iter().map(|binary| binary.path).collect();
    Ok((NetworkPolicy { display_name: definition.name, endpoints, binaries }, patterns))
}

/// "endpoint 2", "endpoints 0, 3".
fn endpoint_list(positions: &[usize]) -> String {
    match positions {
        [position] => format!("endpoint {position}"),
        _ => format!("endpoints {}", positions.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// An endpoint as egress.rego matches it: its host, and its L7 rules if inspected.
struct Matching {
    pattern: HostPattern,
    rules: Option<Json>,
}

/// `notes`: load warnings about this endpoint, to follow "endpoint N".
fn normalize_endpoint(definition: EndpointDef, context: &str, notes: &mut Vec<String>) -> Result<(Endpoint, Matching)> {
    if let Some(binding) = &definition.credential_binding {
        if !definition.inspected() {
            bail!(
                "{context}.credential_binding: a bound endpoint is inspected, and sandbox-egress does not inspect \
                 `protocol: {}`",
                definition.protocol.map_or("tcp", Protocol::name)
            );
        }
        if definition.tls.as_deref() == Some("skip") {
            bail!(
                "{context}.credential_binding: the agent must terminate TLS to apply credentials: remove `tls: skip`"
            );
        }
        if !is_provider_name(&binding.provider) {
            bail!(
                "{context}.credential_binding.provider: {:?} must be 1 to 64 letters, digits, '-' or '_'",
                binding.provider
            );
        }
    }
    let not_enforced = definition.not_enforced_fields();
    let (inspection, rules) = normalize_inspection(&definition, context, notes)?.unzip();
    let enforcement = enforcement(&definition);
    // OpenShell writes a hostless endpoint as an empty host.
    let host = definition.host.map(|host| canonical_host(&host)).filter(|host| !host.is_empty());
    let pattern = HostPattern::parse(host.as_deref()).with_context(|| format!("{context}.host"))?;
    // As OpenShell: a non-empty `ports` wins over `port`.
    let ports = match (definition.port, definition.ports) {
        (_, Some(ports)) if !ports.is_empty() => ports,
        (Some(port), _) => vec![port],
        (None, Some(_)) => bail!("{context}.ports: must not be empty"),
        (None, None) => bail!("{context}: `port` or `ports` is required"),
    };
    if ports.contains(&0) {
        bail!("{context}: port 0 is not a valid destination port");
    }
    let ports: Vec<u16> = ports.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
    let allowed_ips = definition
        .allowed_ips
        .iter()
        .enumerate()
        .map(|(position, text)| parse_allowed_ip(text).with_context(|| format!("{context}.allowed_ips[{position}]")))
        .collect::<Result<Vec<_>>>()?;
    if host.is_none() && allowed_ips.is_empty() {
        bail!("{context}: an endpoint needs a `host`, or `allowed_ips` to be reached by address");
    }
    let endpoint = Endpoint {
        inspection,
        host,
        ports,
        allowed_ips,
        tls_skip: definition.tls.as_deref() == Some("skip"),
        enforcement,
        protocol: definition.protocol.map(|protocol| protocol.name().to_owned()),
        credential_provider: definition.credential_binding.map(|binding| binding.provider),
        not_enforced,
    };
    Ok((endpoint, Matching { pattern, rules }))
}

/// Inspected endpoints of one host, port and `path` must agree on how
/// requests are read and enforced, as OpenShell requires: a request there
/// cannot be decided two ways.
fn check_inspection_overlaps(policies: &BTreeMap<String, NetworkPolicy>) -> Result<()> {
    // (host, port, path) -> the first inspected endpoint there: (policy, position, endpoint).
    type Place<'a> = (String, u16, Option<&'a str>);
    let mut seen: HashMap<Place, (&str, usize, &Endpoint)> = HashMap::new();
    for (name, policy) in policies {
        for (position, endpoint) in policy.endpoints.iter().enumerate() {
            let Some(inspection) = &endpoint.inspection else { continue };
            let host = endpoint
                .host
                .clone()
                .unwrap_or_else(|| endpoint.allowed_ips.iter().map(IpNet::to_string).collect::<Vec<_>>().join(","));
            for &port in &endpoint.ports {
                let key = (host.clone(), port, inspection.path.as_deref());
                let Some(&(other_name, other_position, other)) = seen.get(&key) else {
                    seen.insert(key, (name, position, endpoint));
                    continue;
                };
                let theirs = other.inspection.as_ref().expect("only inspected endpoints are kept");
                let differs = [
                    ("protocol", inspection.protocol != theirs.protocol),
                    ("enforcement", endpoint.enforcement != other.enforcement),
                    ("allow_encoded_slash", inspection.allow_encoded_slash != theirs.allow_encoded_slash),
                    ("tls", endpoint.tls_skip != other.tls_skip),
                    ("credential_binding", endpoint.credential_provider != other.credential_provider),
                    ("max_body_bytes", inspection.messages.max_body_bytes != theirs.messages.max_body_bytes),
                    (
                        "mcp.strict_tool_names",
                        inspection.messages.strict_tool_names != theirs.messages.strict_tool_names,
                    ),
                    ("persisted_queries", inspection.messages.persisted != theirs.messages.persisted),
                    (
                        "request_body_credential_rewrite",
                        inspection.messages.rewrite_body != theirs.messages.rewrite_body,
                    ),
                    (
                        "websocket_credential_rewrite",
                        inspection.messages.rewrite_websocket != theirs.messages.rewrite_websocket,
                    ),
                    ("operation_type", inspection.messages.websocket_graphql != theirs.messages.websocket_graphql),
                ];
                if let Some((field, _)) = differs.iter().find(|(_, differs)| *differs) {
                    bail!(
                        "network_policies.{name}.endpoints[{position}] and \
                         network_policies.{other_name}.endpoints[{other_position}] both inspect {host}:{port}{} \
                         but differ in `{field}`: make them agree, or give each its own `path`",
                        inspection.path.as_deref().map(|path| format!(" path {path}")).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

/// OpenShell enforces on exactly `enforce`, and audits on any other value.
/// Left out, it enforces here (OpenShell audits an L7 endpoint then: see
/// the load warning).
fn enforcement(definition: &EndpointDef) -> Enforcement {
    match definition.enforcement.as_deref() {
        None | Some("enforce") => Enforcement::Enforce,
        Some(_) => Enforcement::Audit,
    }
}

/// An inspected endpoint's rules and settings, checked as OpenShell checks
/// them, and its document for egress.rego.
fn normalize_inspection(
    definition: &EndpointDef,
    context: &str,
    notes: &mut Vec<String>,
) -> Result<Option<(Inspection, Json)>> {
    check_protocol_options(definition, context, notes)?;
    if !definition.inspected() {
        return Ok(None);
    }
    let protocol = rules::protocol_name(definition);
    if protocol == "mcp" && definition.host.as_deref().is_none_or(str::is_empty) {
        bail!("{context}: protocol mcp needs a `host`: the protocol alone is not a wildcard endpoint");
    }
    let rules = rules::normalize(definition, protocol, context)?;
    if let Some(path) = &definition.path {
        validate_path_glob(path).with_context(|| format!("{context}.path"))?;
    }
    let audit = enforcement(definition) == Enforcement::Audit;
    let graphql_reads = protocol == "graphql" || rules.websocket_graphql;
    let document = json!({
        "protocol": protocol,
        "path": definition.path.as_deref().filter(|path| !path.is_empty()),
        "rules": rules.allow,
        "deny_rules": rules.deny,
        "audit": audit,
        "graphql_authoritative": graphql_reads,
        "mcp_allow_all": rules.mcp_allow_all,
        "mcp_tool_narrowed": rules.mcp_tool_narrowed,
    });
    let path = definition.path.as_deref().filter(|path| !path.is_empty());
    let messages = MessageRules {
        path_matcher: path.map(PathMatcher::new).transpose().with_context(|| format!("{context}.path"))?,
        max_body_bytes: rules::max_body_bytes(definition, protocol, context)?,
        strict_tool_names: definition.mcp.as_ref().and_then(|mcp| mcp.strict_tool_names).unwrap_or(true),
        persisted: if graphql_reads { rules::persisted_queries(definition, context)? } else { None },
        websocket_graphql: rules.websocket_graphql,
        rewrite_body: protocol == "rest" && definition.request_body_credential_rewrite == Some(true),
        rewrite_websocket: matches!(protocol, "rest" | "websocket")
            && definition.websocket_credential_rewrite == Some(true),
    };
    let inspection = Inspection {
        protocol,
        path: definition.path.clone().filter(|path| !path.is_empty()),
        allow_encoded_slash: definition.allow_encoded_slash.unwrap_or(false),
        terminate_tls: definition.tls.as_deref() != Some("skip"),
        rules: rules.text,
        deny_rules: rules.deny.len(),
        audit,
        messages: Arc::new(messages),
        others: Vec::new(),
    };
    Ok(Some((inspection, document)))
}

/// Options of one protocol on another: an error where OpenShell's gateway
/// refuses them, a warning where it ignores them.
fn check_protocol_options(definition: &EndpointDef, context: &str, notes: &mut Vec<String>) -> Result<()> {
    let protocol = definition.protocol.filter(|protocol| protocol.needs_inspection()).map(Protocol::name);
    if definition.mcp.is_some() && protocol != Some("mcp") {
        bail!("{context}.mcp: `mcp` options are only valid for protocol mcp");
    }
    if definition.json_rpc.is_some() && !matches!(protocol, Some("json-rpc" | "mcp")) {
        notes.push("has `json_rpc` options, which only json-rpc and mcp endpoints read: ignored".into());
    }
    let graphql_fields = definition.persisted_queries.is_some()
        || definition.graphql_persisted_queries.is_some()
        || definition.graphql_max_body_bytes.is_some();
    if graphql_fields && !matches!(protocol, Some("graphql" | "websocket")) {
        notes.push("has GraphQL options, which only graphql and websocket endpoints read: ignored".into());
    }
    if definition.request_body_credential_rewrite == Some(true) {
        if !matches!(protocol, None | Some("rest")) {
            notes.push("has `request_body_credential_rewrite`, which only rest endpoints read: ignored".into());
        } else if definition.credential_binding.is_none() {
            notes.push(
                "has `request_body_credential_rewrite` but no `credential_binding`: there is no provider whose \
                 placeholders it would replace"
                    .into(),
            );
        }
    }
    if definition.websocket_credential_rewrite == Some(true) {
        if !matches!(protocol, None | Some("rest" | "websocket")) {
            notes.push(
                "has `websocket_credential_rewrite`, which only rest and websocket endpoints read: ignored".into(),
            );
        } else if definition.credential_binding.is_none() {
            notes.push(
                "has `websocket_credential_rewrite` but no `credential_binding`: there is no provider whose \
                 placeholders it would replace"
                    .into(),
            );
        }
    }
    Ok(())
}

/// Lower-cased, without the root's trailing dot: the form both the policy
/// and the request are compared in.
pub(super) fn canonical_host(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// A CIDR, or a single address. Host bits are cleared (`10.1.2.3/8` is
/// `10.0.0.0/8`) so that the policy shows what it matches.
fn parse_allowed_ip(text: &str) -> Result<IpNet> {
    match text.parse::<IpNet>() {
        Ok(net) => Ok(net.trunc()),
        Err(_) => text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| anyhow::anyhow!("'{text}' is not an IP address or CIDR")),
    }
}

/// An endpoint's `host`, classified for matching.
enum HostPattern {
    Exact(String),
    Ip(IpAddr),
    /// A wildcard in the first label only, `first` (`[prefix]*[suffix]` or
    /// `**`), then `domain`: `.rest`.
    Wildcard {
        domain: String,
        first: LabelPattern,
    },
    /// Whole-label `*`s past the first label too (`*.s3.*.amazonaws.com`):
    /// `labels` up to the last `*` label, then the fixed `suffix` after it
    /// (`.amazonaws.com`; empty when the host ends in `*`).
    Labels {
        labels: Vec<LabelPattern>,
        suffix: String,
    },
    /// No host: reached by destination address, through `allowed_ips`.
    Addresses,
}

/// One label of a wildcard host.
enum LabelPattern {
    Exact(String),
    /// `[prefix]*[suffix]`: one label with that text around the `*`.
    Star {
        prefix: String,
        suffix: String,
    },
    /// `**`, first label only: one or more labels.
    AnyLabels,
}

impl HostPattern {
    /// `host` is already canonical (see [`canonical_host`]).
    fn parse(host: Option<&str>) -> Result<HostPattern> {
        let Some(host) = host else { return Ok(HostPattern::Addresses) };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(HostPattern::Ip(ip));
        }
        if !host.contains('*') {
            validate_dns_name(host)?;
            return Ok(HostPattern::Exact(host.to_owned()));
        }
        if host == "*" || host == "**" {
            bail!("'{host}' would match every host: list the hosts, or leave `host` out and use `allowed_ips`");
        }
        let (first, rest) = host.split_once('.').unwrap_or((host, ""));
        if rest.split('.').any(|label| label.contains('*') && label != "*") {
            bail!("'{host}': past the first label, a wildcard must be a whole label `*`");
        }
        if !rest.contains('.') {
            bail!("'{host}': a wildcard directly over a top-level domain is not allowed");
        }
        let first = LabelPattern::parse(first).with_context(|| format!("'{host}'"))?;
        let rest: Vec<&str> = rest.split('.').collect();
        let Some(last_star) = rest.iter().rposition(|&label| label == "*") else {
            let rest = rest.join(".");
            validate_dns_name(&rest).with_context(|| format!("'{host}'"))?;
            return Ok(HostPattern::Wildcard { domain: format!(".{rest}"), first });
        };
        let suffix = rest[last_star + 1..].join(".");
        if !suffix.is_empty() {
            validate_dns_name(&suffix).with_context(|| format!("'{host}'"))?;
        }
        let mut labels = vec![first];
        for label in &rest[..=last_star] {
            labels.push(LabelPattern::parse(label).with_context(|| format!("'{host}'"))?);
        }
        let suffix = if suffix.is_empty() { suffix } else { format!(".{suffix}") };
        Ok(HostPattern::Labels { labels, suffix })
    }
}

impl LabelPattern {
    fn parse(label: &str) -> Result<LabelPattern> {
        if label == "**" {
            return Ok(LabelPattern::AnyLabels);
        }
        let Some((prefix, suffix)) = label.split_once('*') else {
            validate_dns_name(label)?;
            return Ok(LabelPattern::Exact(label.to_owned()));
        };
        if suffix.contains('*') {
            bail!("the first label may hold a single `*`, or be exactly `**`");
        }
        for part in [prefix, suffix] {
            if !part.chars().all(is_label_char) {
                bail!("'{part}' is not valid in a DNS label");
            }
        }
        Ok(LabelPattern::Star { prefix: prefix.to_owned(), suffix: suffix.to_owned() })
    }

    /// How egress.rego sees it (`wildcard_matches`, `label_matches`).
    fn document(&self) -> Json {
        match self {
            LabelPattern::Exact(label) => json!({ "label": label }),
            LabelPattern::Star { prefix, suffix } => json!({
                "multi_label": false,
                // A `*` label is never empty.
                "min_label_len": (prefix.len() + suffix.len()).max(1),
                "label_prefix": prefix,
                "label_suffix": suffix,
            }),
            LabelPattern::AnyLabels => json!({ "multi_label": true }),
        }
    }
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

/// Letters, digits, `-` and `_` in labels of 1 to 63 characters. `name` is
/// lower-cased already.
pub(super) fn validate_dns_name(name: &str) -> Result<()> {
    if name.len() > MAX_DNS_NAME_LEN {
        bail!("'{name}' is longer than {MAX_DNS_NAME_LEN} characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN || !label.chars().all(is_label_char) {
            bail!("'{name}' is not a valid DNS name");
        }
    }
    Ok(())
}

/// How egress.rego sees a policy's `binaries`: exact paths by path (to their
/// position in the list and the entry as written), globs as a list.
fn binaries_document(binaries: &[String], globs: &mut HashMap<String, GlobMatcher>) -> Result<Json> {
    let mut exact = Map::new();
    let mut patterns = Vec::new();
    for (position, path) in binaries.iter().enumerate() {
        if !path.starts_with('/') {
            bail!("'{path}' is not an absolute path");
        }
        if path.contains('*') {
            if !globs.contains_key(path) {
                // Separators are literal: `*` stays within one path segment.
                let glob = GlobBuilder::new(path)
                    .literal_separator(true)
                    .build()
                    .with_context(|| format!("'{path}' is not a valid glob"))?;
                globs.insert(path.clone(), glob.compile_matcher());
            }
            patterns.push(json!({ "index": position, "path": path }));
        } else {
            exact.entry(path.clone()).or_insert(json!([position, path]));
        }
    }
    // /proc/<pid>/exe names the file a symlink leads to (`/usr/bin/python3`
    // runs as `/usr/bin/python3.11`): as OpenShell does, an exact path also
    // matches its target on this host, unless that is an entry of its own.
    for (position, path) in binaries.iter().enumerate().filter(|(_, path)| !path.contains('*')) {
        let target = std::fs::canonicalize(path).ok();
        if let Some(target) = target.as_ref().and_then(|target| target.to_str()).filter(|target| target != path) {
            exact.entry(target.to_owned()).or_insert(json!([position, path]));
        }
    }
    Ok(json!({ "exact": exact, "globs": patterns }))
}

/// Endpoints filed under the keys a request is looked up by, so that an
/// evaluation reads only the endpoints that can match.
#[derive(Default)]
struct RegoIndex {
    by_host: BTreeMap<String, Vec<Json>>,
    by_domain: BTreeMap<String, Vec<Json>>,
    /// `Labels` patterns, by their fixed suffix.
    by_suffix: BTreeMap<String, Vec<Json>>,
    by_ip: BTreeMap<String, Vec<Json>>,
    hostless: Vec<Json>,
}

impl RegoIndex {
    fn add(&mut self, policy: &str, position: usize, endpoint: &Endpoint, matching: &Matching, binaries: &Json) {
        let mut document = json!({
            "policy": policy,
            "index": position,
            "ports": endpoint.ports,
            "binaries": binaries,
        });
        if let Some(rules) = &matching.rules {
            document["l7"] = rules.clone();
        }
        let (table, key) = match &matching.pattern {
            HostPattern::Exact(host) => (&mut self.by_host, host.clone()),
            HostPattern::Ip(ip) => (&mut self.by_ip, ip.to_canonical().to_string()),
            HostPattern::Wildcard { domain, first } => {
                if let (Some(fields), Json::Object(label)) = (document.as_object_mut(), first.document()) {
                    fields.extend(label);
                }
                document["domain"] = json!(domain);
                (&mut self.by_domain, domain.clone())
            }
            HostPattern::Labels { labels, suffix } => {
                document["labels"] = labels.iter().map(LabelPattern::document).collect();
                document["suffix"] = json!(suffix);
                (&mut self.by_suffix, suffix.clone())
            }
            HostPattern::Addresses => {
                let nets: Vec<String> = endpoint.allowed_ips.iter().map(IpNet::to_string).collect();
                document["allowed_ips"] = json!(nets);
                self.hostless.push(document);
                return;
            }
        };
        table.entry(key).or_default().push(document);
    }

    fn into_document(self) -> Json {
        json!({
            "endpoints_by_host": self.by_host,
            "endpoints_by_domain": self.by_domain,
            "endpoints_by_suffix": self.by_suffix,
            "endpoints_by_ip": self.by_ip,
            "hostless_endpoints": self.hostless,
        })
    }
}
