//! An inspected endpoint's rules, checked as OpenShell checks them and
//! written into the form egress.rego matches: each rule with its `kind`
//! (`http` for REST and WebSocket, `jsonrpc`, `mcp`, `graphql`), access
//! presets expanded, MCP's `tool` shorthand and method profile resolved.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value as Json};

use super::{
    schema::{Access, EndpointDef, MatcherDef, PersistedOperationDef, Protocol, RequestMatchDef},
    Operation,
};

/// The rule of a bound endpoint without `access` or `rules`: every request.
pub(super) const BINDING_ONLY_RULES: &str = "credential_binding (no rules)";
/// OpenShell's default limit on a body read to decide it.
pub(super) const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Characters that make an MCP method or tool a glob.
const GLOB_CHARS: [char; 5] = ['*', '?', '[', ']', '{'];

/// An endpoint's rules for egress.rego, and how `policy check` names them.
pub(super) struct Rules {
    pub allow: Vec<Json>,
    pub deny: Vec<Json>,
    /// `access: read-only`, `3 rules`...
    pub text: String,
    /// MCP `allow_all_known_mcp_methods`: calls without a rule of their own pass.
    pub mcp_allow_all: bool,
    /// MCP: some allow rule names a tool, so a `tools/call` must match one.
    pub mcp_tool_narrowed: bool,
    /// A websocket endpoint whose client messages are GraphQL operations.
    pub websocket_graphql: bool,
}

/// The protocol's name as the rooms and egress.rego know it.
pub(super) fn protocol_name(definition: &EndpointDef) -> &'static str {
    match definition.protocol {
        Some(Protocol::Websocket) => "websocket",
        Some(Protocol::Graphql) => "graphql",
        Some(Protocol::JsonRpc) => "json-rpc",
        Some(Protocol::Mcp) => "mcp",
        _ => "rest",
    }
}

pub(super) fn normalize(definition: &EndpointDef, protocol: &'static str, context: &str) -> Result<Rules> {
    let mcp_options = definition.mcp.as_ref();
    let mcp_allow_all = protocol == "mcp" && mcp_options.and_then(|mcp| mcp.allow_all_known_mcp_methods) == Some(true);
    let strict_tool_names = mcp_options.and_then(|mcp| mcp.strict_tool_names).unwrap_or(true);
    let websocket_graphql = protocol == "websocket" && has_graphql_policy(definition);
    let reader = RuleReader { protocol, mcp_allow_all, strict_tool_names, websocket_graphql };
    let mut allow = Vec::new();
    let text = match (definition.access, &definition.rules) {
        (Some(_), Some(_)) => bail!("{context}: set either `access` or `rules`, not both"),
        (Some(_), None) if matches!(protocol, "json-rpc" | "mcp") => bail!(
            "{context}.access: protocol {protocol} takes no access presets: write `rules` with `allow.method` \
             (or, for mcp, set `mcp.allow_all_known_mcp_methods: true`)"
        ),
        (Some(access), None) => {
            allow = preset(access, protocol);
            format!("access: {}", access.name())
        }
        // A binding alone inspects only to apply the credential.
        (None, None) if definition.credential_binding.is_some() && protocol == "rest" => {
            allow
                .push(json!({ "label": BINDING_ONLY_RULES, "kind": "http", "method": "*", "path": "**", "query": {} }));
            BINDING_ONLY_RULES.to_owned()
        }
        (None, None) if mcp_allow_all => "mcp.allow_all_known_mcp_methods".to_owned(),
        (None, None) => bail!(
            "{context}: an inspected endpoint needs `access` (read-only, read-write, full) or `rules`{}; \
             without either it would allow no request",
            if protocol == "mcp" { ", or `mcp.allow_all_known_mcp_methods: true`" } else { "" }
        ),
        (None, Some(definitions)) => {
            if definitions.is_empty() {
                bail!("{context}.rules: an empty list allows nothing (use `access: full`, or leave `rules` out)");
            }
            for (position, rule) in definitions.iter().enumerate() {
                let Some(matcher) = &rule.allow else { continue };
                let label = format!("rules[{position}]");
                allow.push(reader.read(matcher, &label, &format!("{context}.{label}.allow"), Side::Allow)?);
            }
            if allow.is_empty() {
                bail!("{context}.rules: no entry has an `allow`, so the rules would deny every request");
            }
            format!("{} {}", allow.len(), if allow.len() == 1 { "rule" } else { "rules" })
        }
    };
    let mut deny = Vec::new();
    if let Some(definitions) = &definition.deny_rules {
        if definitions.is_empty() {
            bail!("{context}.deny_rules: an empty list denies nothing: leave `deny_rules` out");
        }
        for (position, rule) in definitions.iter().enumerate() {
            let label = format!("deny_rules[{position}]");
            deny.push(reader.read(rule, &label, &format!("{context}.{label}"), Side::Deny)?);
        }
    }
    let mcp_tool_narrowed = allow.iter().any(|rule| rule["tool"].is_array());
    if protocol == "mcp" {
        check_tool_conflicts(&allow, &deny, context)?;
    }
    Ok(Rules { allow, deny, text, mcp_allow_all, mcp_tool_narrowed, websocket_graphql })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Allow,
    Deny,
}

struct RuleReader {
    protocol: &'static str,
    mcp_allow_all: bool,
    strict_tool_names: bool,
    websocket_graphql: bool,
}

impl RuleReader {
    fn read(&self, rule: &RequestMatchDef, label: &str, context: &str, side: Side) -> Result<Json> {
        if rule.command.is_some() {
            bail!("{context}: `command` belongs to SQL rules, which sandbox-egress does not enforce");
        }
        match self.protocol {
            "json-rpc" => jsonrpc_rule(rule, label, context),
            "mcp" => self.mcp_rule(rule, label, context),
            "graphql" => graphql_rule(rule, label, context),
            "websocket" if has_graphql_fields(rule) => {
                if rule.method.is_some() || rule.path.is_some() || rule.query.is_some() {
                    bail!(
                        "{context}: a WebSocket rule matches either the upgrade and messages (`method`, `path`, \
                         `query`) or GraphQL operations (`operation_type`, `operation_name`, `fields`), not both"
                    );
                }
                graphql_rule(rule, label, context)
            }
            _ => {
                if self.websocket_graphql && side == Side::Allow && rule.method.as_deref() == Some("WEBSOCKET_TEXT") {
                    bail!(
                        "{context}.method: this WebSocket endpoint decides client messages as GraphQL operations: \
                         allow them with `operation_type`/`operation_name`/`fields` rules, not WEBSOCKET_TEXT"
                    );
                }
                http_rule(rule, label, context)
            }
        }
    }

    fn mcp_rule(&self, rule: &RequestMatchDef, label: &str, context: &str) -> Result<Json> {
        if rule.path.is_some() || rule.query.is_some() {
            bail!("{context}: mcp rules match `method` and `tool`, not `path` or `query`");
        }
        reject_fields(rule, context, &["operation_type", "operation_name", "fields"], "mcp")?;
        let mut tool = match (&rule.tool, &rule.params) {
            (Some(_), Some(_)) => bail!("{context}: give the tool as `tool` or as `params.name`, not both"),
            (Some(tool), None) => Some(matcher_globs(tool, &format!("{context}.tool"))?),
            (None, Some(params)) => {
                if let Some(other) = params.keys().find(|key| *key != "name") {
                    bail!("{context}.params.{other}: MCP tool argument matching is not supported (only `params.name`)");
                }
                match params.get("name") {
                    Some(name) => Some(matcher_globs(name, &format!("{context}.params.name"))?),
                    None => None,
                }
            }
            (None, None) => None,
        };
        if let Some(globs) = &tool {
            if !self.strict_tool_names && globs.iter().any(|glob| glob.contains(GLOB_CHARS)) {
                bail!("{context}.tool: wildcard tool matchers require `mcp.strict_tool_names` to stay enabled");
            }
        }
        let method = match rule.method.as_deref() {
            Some(method) => {
                if method.is_empty() {
                    bail!("{context}.method: must not be empty");
                }
                if method.contains(GLOB_CHARS) && !method.starts_with("tools/") {
                    bail!(
                        "{context}.method: MCP method globs are only valid within `tools/` (e.g. `tools/*`); \
                         leave `method` out to use the endpoint's method profile"
                    );
                }
                if tool.is_some() && method != "tools/call" {
                    bail!("{context}.method: must be `tools/call` when the rule names a tool, got '{method}'");
                }
                validate_glob(method).with_context(|| format!("{context}.method"))?;
                method.to_owned()
            }
            None if self.mcp_allow_all => if tool.is_some() { "tools/call" } else { "*" }.to_owned(),
            None => bail!("{context}.method: required unless `mcp.allow_all_known_mcp_methods` is true"),
        };
        Ok(json!({ "label": label, "kind": "mcp", "method": method, "tool": tool.take() }))
    }
}

/// `method` only, exact or `*`.
fn jsonrpc_rule(rule: &RequestMatchDef, label: &str, context: &str) -> Result<Json> {
    if rule.path.is_some() || rule.query.is_some() {
        bail!("{context}: json-rpc rules match `method`, not `path` or `query`");
    }
    if rule.tool.is_some() {
        bail!("{context}.tool: tool matching is only valid for protocol mcp");
    }
    if rule.params.is_some() {
        bail!("{context}.params: JSON-RPC rules do not match params");
    }
    reject_fields(rule, context, &["operation_type", "operation_name", "fields"], "json-rpc")?;
    let method = rule.method.as_deref().with_context(|| format!("{context}.method: required for json-rpc rules"))?;
    if method.is_empty() || (method != "*" && method.contains(GLOB_CHARS)) {
        bail!("{context}.method: json-rpc rules match a method exactly, or `*` for every method; got '{method}'");
    }
    Ok(json!({ "label": label, "kind": "jsonrpc", "method": method }))
}

/// `operation_type` (required), `operation_name` and `fields` (globs).
fn graphql_rule(rule: &RequestMatchDef, label: &str, context: &str) -> Result<Json> {
    if rule.method.is_some() || rule.path.is_some() || rule.query.is_some() {
        bail!("{context}: GraphQL rules match `operation_type`, `operation_name` and `fields`, not `method`, `path` or `query`");
    }
    if rule.tool.is_some() || rule.params.is_some() {
        bail!("{context}: `tool` and `params` belong to mcp rules");
    }
    let operation = operation_document(
        rule.operation_type.as_deref(),
        rule.operation_name.as_deref(),
        rule.fields.as_deref(),
        context,
    )?;
    let mut document = json!({ "label": label, "kind": "graphql" });
    document.as_object_mut().expect("an object").extend(operation);
    Ok(document)
}

fn operation_document(
    operation_type: Option<&str>,
    operation_name: Option<&str>,
    fields: Option<&[String]>,
    context: &str,
) -> Result<Map<String, Json>> {
    let operation_type = operation_type
        .with_context(|| format!("{context}.operation_type: required for GraphQL rules"))?
        .to_ascii_lowercase();
    if !matches!(operation_type.as_str(), "query" | "mutation" | "subscription" | "*") {
        bail!("{context}.operation_type: expected query, mutation, subscription or *, got '{operation_type}'");
    }
    let operation_name = operation_name.filter(|name| !name.is_empty());
    if let Some(name) = operation_name {
        validate_glob(name).with_context(|| format!("{context}.operation_name"))?;
    }
    if let Some(fields) = fields {
        if fields.is_empty() {
            bail!("{context}.fields: must not be empty; leave `fields` out to match every root field");
        }
        for field in fields {
            if field.is_empty() {
                bail!("{context}.fields: a field glob must not be empty");
            }
            validate_glob(field).with_context(|| format!("{context}.fields"))?;
        }
    }
    let mut document = Map::new();
    document.insert("operation_type".into(), json!(operation_type));
    document.insert("operation_name".into(), json!(operation_name));
    document.insert("fields".into(), json!(fields));
    Ok(document)
}

/// A REST or WebSocket rule: `method` and `path` required, `query` globs.
fn http_rule(rule: &RequestMatchDef, label: &str, context: &str) -> Result<Json> {
    reject_fields(
        rule,
        context,
        &["operation_type", "operation_name", "fields", "tool", "params"],
        "REST and WebSocket",
    )?;
    let method = rule.method.as_deref().with_context(|| format!("{context}: `method` is required"))?;
    if method.is_empty()
        || !(method == "*" || method.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    {
        bail!("{context}.method: '{method}' is not an HTTP method or `*`");
    }
    let path = rule.path.as_deref().with_context(|| format!("{context}: `path` is required"))?;
    validate_path_glob(path).with_context(|| format!("{context}.path"))?;
    let mut query = Map::new();
    for (name, matcher) in rule.query.iter().flatten() {
        query.insert(name.clone(), json!(matcher_globs(matcher, &format!("{context}.query.{name}"))?));
    }
    Ok(json!({ "label": label, "kind": "http", "method": method, "path": path, "query": query }))
}

/// The fields a protocol's rules do not have are errors naming them.
fn reject_fields(rule: &RequestMatchDef, context: &str, fields: &[&str], protocol: &str) -> Result<()> {
    let present = |field: &str| match field {
        "operation_type" => rule.operation_type.is_some(),
        "operation_name" => rule.operation_name.is_some(),
        "fields" => rule.fields.is_some(),
        "tool" => rule.tool.is_some(),
        "params" => rule.params.is_some(),
        _ => false,
    };
    if let Some(field) = fields.iter().find(|field| present(field)) {
        bail!("{context}: `{field}` belongs to another protocol's rules; {protocol} rules do not have it");
    }
    Ok(())
}

/// A glob string, or `{glob: G}` / `{any: [G, ...]}`: the globs.
fn matcher_globs(matcher: &MatcherDef, context: &str) -> Result<Vec<String>> {
    let globs = match matcher {
        MatcherDef::Glob(glob) => vec![glob.clone()],
        MatcherDef::Object(object) => {
            if object.glob.is_some() && object.any.is_some() {
                bail!("{context}: give `glob` or `any`, not both");
            }
            let globs: Vec<String> = object.glob.iter().chain(object.any.iter().flatten()).cloned().collect();
            if globs.is_empty() {
                bail!("{context}: give `glob` or a non-empty `any`");
            }
            globs
        }
    };
    for glob in &globs {
        validate_glob(glob).with_context(|| context.to_owned())?;
    }
    Ok(globs)
}

/// OpenShell's presets, per protocol.
fn preset(access: Access, protocol: &str) -> Vec<Json> {
    let label = format!("access: {}", access.name());
    let http = |method: &str| json!({ "label": label, "kind": "http", "method": method, "path": "**", "query": {} });
    let graphql = |operation_type: &str| json!({ "label": label, "kind": "graphql", "operation_type": operation_type, "operation_name": null, "fields": null });
    match (protocol, access) {
        ("graphql", Access::ReadOnly) => vec![graphql("query")],
        ("graphql", Access::ReadWrite) => vec![graphql("query"), graphql("mutation")],
        ("graphql", Access::Full) => vec![graphql("*")],
        ("websocket", Access::ReadOnly) => vec![http("GET")],
        ("websocket", Access::ReadWrite | Access::Full) => vec![http("*")],
        (_, Access::ReadOnly) => ["GET", "HEAD", "OPTIONS"].map(http).to_vec(),
        (_, Access::ReadWrite) => ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH"].map(http).to_vec(),
        (_, Access::Full) => vec![http("*")],
    }
}

/// When an allow rule names a tool, no other rule may cover every tool
/// call: the tool rules would mean nothing (OpenShell's conflict rule).
fn check_tool_conflicts(allow: &[Json], deny: &[Json], context: &str) -> Result<()> {
    if !allow.iter().any(|rule| rule["tool"].is_array()) {
        return Ok(());
    }
    let covers_every_call = |rule: &Json| {
        rule["tool"].is_null() && rule["method"].as_str().is_some_and(|method| glob_covers(method, "tools/call"))
    };
    for (side, rules) in [("allows", allow), ("denies", deny)] {
        if let Some(rule) = rules.iter().find(|rule| covers_every_call(rule)) {
            bail!(
                "{context}.{}: its method {side} every tool call and conflicts with the rules naming tools: name a \
                 tool to narrow tools/call, or remove the tool rules",
                rule["label"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn glob_covers(pattern: &str, method: &str) -> bool {
    pattern == method || globset::Glob::new(pattern).is_ok_and(|glob| glob.compile_matcher().is_match(method))
}

/// Whether a websocket endpoint decides its client messages as GraphQL.
fn has_graphql_policy(definition: &EndpointDef) -> bool {
    let rules = definition.rules.iter().flatten().filter_map(|rule| rule.allow.as_ref());
    rules.chain(definition.deny_rules.iter().flatten()).any(has_graphql_fields)
        || definition.graphql_persisted_queries.as_ref().is_some_and(|registry| !registry.is_empty())
        || definition.persisted_queries.as_deref().is_some_and(|value| value != "deny")
}

fn has_graphql_fields(rule: &RequestMatchDef) -> bool {
    rule.operation_type.is_some() || rule.operation_name.is_some() || rule.fields.is_some()
}

/// `persisted_queries: allow_registered` and the registry: `None` when
/// persisted queries are denied.
pub(super) fn persisted_queries(
    definition: &EndpointDef,
    context: &str,
) -> Result<Option<BTreeMap<String, Operation>>> {
    let registry = |entries: &BTreeMap<String, PersistedOperationDef>| -> Result<BTreeMap<String, Operation>> {
        entries
            .iter()
            .map(|(key, entry)| {
                let entry_context = format!("{context}.graphql_persisted_queries.{key}");
                let document = operation_document(
                    entry.operation_type.as_deref(),
                    entry.operation_name.as_deref(),
                    entry.fields.as_deref(),
                    &entry_context,
                )?;
                if document["operation_type"] == "*" {
                    bail!("{entry_context}.operation_type: a registered query has one type: query, mutation or subscription");
                }
                let operation = Operation {
                    operation_type: document["operation_type"].as_str().unwrap_or_default().to_owned(),
                    operation_name: entry.operation_name.clone().unwrap_or_default(),
                    fields: entry.fields.clone().unwrap_or_default(),
                };
                Ok((key.clone(), operation))
            })
            .collect()
    };
    match definition.persisted_queries.as_deref() {
        None | Some("deny") => {
            if let Some(entries) = &definition.graphql_persisted_queries {
                registry(entries)?;
            }
            Ok(None)
        }
        Some("allow_registered") => {
            Ok(Some(definition.graphql_persisted_queries.as_ref().map(registry).transpose()?.unwrap_or_default()))
        }
        Some(other) => bail!("{context}.persisted_queries: must be `deny` or `allow_registered`, got '{other}'"),
    }
}

/// The body limit of a JSON-RPC, MCP or GraphQL endpoint.
pub(super) fn max_body_bytes(definition: &EndpointDef, protocol: &str, context: &str) -> Result<usize> {
    let positive = |value: u64, field: &str| -> Result<usize> {
        if value == 0 {
            bail!("{context}.{field}: must be a positive number of bytes");
        }
        usize::try_from(value).with_context(|| format!("{context}.{field}: too large"))
    };
    let json_rpc = definition.json_rpc.as_ref().and_then(|options| options.max_body_bytes);
    let mcp = definition.mcp.as_ref().and_then(|options| options.max_body_bytes);
    match protocol {
        "mcp" if json_rpc.is_some() && mcp.is_some() => {
            bail!("{context}: give the body limit once, in `mcp.max_body_bytes`")
        }
        "mcp" => {
            mcp.or(json_rpc).map_or(Ok(DEFAULT_MAX_BODY_BYTES), |value| positive(value.into(), "mcp.max_body_bytes"))
        }
        "json-rpc" => {
            json_rpc.map_or(Ok(DEFAULT_MAX_BODY_BYTES), |value| positive(value.into(), "json_rpc.max_body_bytes"))
        }
        _ => definition
            .graphql_max_body_bytes
            .map_or(Ok(DEFAULT_MAX_BODY_BYTES), |value| positive(value, "graphql_max_body_bytes")),
    }
}

/// `**`, or a glob over `/`-separated segments starting at the root.
pub(super) fn validate_path_glob(path: &str) -> Result<()> {
    if path != "**" && !path.starts_with('/') {
        bail!("'{path}' must start with `/` (or be `**`, any path)");
    }
    validate_glob(path)
}

/// Refuses at load what regorus's `glob.match` would fail on per request.
fn validate_glob(glob: &str) -> Result<()> {
    let mut engine = regorus::Engine::new();
    let check = format!("package check\nok := glob.match({}, [\"/\"], \"\")", serde_json::to_string(glob)?);
    engine.add_policy("check.rego".into(), check)?;
    engine.eval_rule("data.check.ok".into()).map(drop).map_err(|_| anyhow::anyhow!("'{glob}' is not a valid glob"))
}
