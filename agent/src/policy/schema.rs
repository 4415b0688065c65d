//! The policy file as written: OpenShell's sandbox policy schema, field for
//! field, so that OpenShell policy files deserialize unchanged. Every struct
//! denies unknown keys; serde_norway's error then names the key and its path.
//! Meaning and validation live in `normalize`.

use std::collections::BTreeMap;

use serde::{
    de::{Error as _, IgnoredAny},
    Deserialize, Deserializer,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    pub version: u32,
    #[serde(default)]
    pub network_policies: BTreeMap<String, NetworkPolicyDef>,
    // OpenShell sections this agent does not enforce: accepted so that the
    // same file serves both, then reported and ignored.
    pub filesystem_policy: Option<IgnoredAny>,
    pub landlock: Option<IgnoredAny>,
    pub process: Option<IgnoredAny>,
    pub network_middlewares: Option<IgnoredAny>,
}

impl PolicyFile {
    pub fn ignored_sections(&self) -> Vec<&'static str> {
        [
            ("filesystem_policy", self.filesystem_policy.is_some()),
            ("landlock", self.landlock.is_some()),
            ("process", self.process.is_some()),
            ("network_middlewares", self.network_middlewares.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
        .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NetworkPolicyDef {
    /// Display name; the map key identifies the policy in decisions.
    pub name: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointDef>,
    /// One entry must match; absent or empty, no binary may connect, as in
    /// OpenShell.
    #[serde(default)]
    pub binaries: Vec<BinaryDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EndpointDef {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub ports: Option<Vec<u16>>,
    pub protocol: Option<Protocol>,
    // Strings, since OpenShell takes any value and compares exactly (see
    // `normalize`).
    pub tls: Option<String>,
    pub enforcement: Option<String>,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Selects between L7 endpoints sharing a host and port.
    pub path: Option<String>,
    pub access: Option<Access>,
    pub rules: Option<Vec<RuleDef>>,
    pub deny_rules: Option<Vec<RequestMatchDef>>,
    pub allow_encoded_slash: Option<bool>,
    /// Placeholders of the bound provider in request bodies are replaced (REST).
    pub request_body_credential_rewrite: Option<bool>,
    /// The same for client text messages after a WebSocket upgrade.
    pub websocket_credential_rewrite: Option<bool>,
    /// `deny` (default) or `allow_registered`: GraphQL requests that carry
    /// only a persisted query's hash or id.
    pub persisted_queries: Option<String>,
    /// The trusted classification of each registered persisted query, by
    /// its sha256 hash or saved-query id.
    pub graphql_persisted_queries: Option<BTreeMap<String, PersistedOperationDef>>,
    pub graphql_max_body_bytes: Option<u64>,
    pub json_rpc: Option<JsonRpcOptions>,
    pub mcp: Option<McpOptions>,
    // Not enforced: kept only to be reported as such.
    pub allow_uninspected_credentials: Option<IgnoredAny>,
    pub credential_signing: Option<IgnoredAny>,
    pub signing_service: Option<IgnoredAny>,
    pub signing_region: Option<IgnoredAny>,
    /// Ties the endpoint to a credential provider (`run --credentials`):
    /// its requests get that provider's secret, so it is always inspected.
    pub credential_binding: Option<CredentialBinding>,
}

impl EndpointDef {
    /// Whether the agent inspects this endpoint's HTTP requests (and so
    /// terminates its TLS): an L7 protocol (REST, WebSocket, GraphQL,
    /// JSON-RPC, MCP), rules of any kind, or a credential binding. SQL is
    /// reported as not enforced instead.
    pub fn inspected(&self) -> bool {
        match self.protocol {
            Some(Protocol::Sql) => false,
            Some(protocol) if protocol.needs_inspection() => true,
            _ => {
                self.access.is_some()
                    || self.rules.is_some()
                    || self.deny_rules.is_some()
                    || self.path.is_some()
                    || self.credential_binding.is_some()
            }
        }
    }

    /// Fields present on this endpoint that L7 inspection would need and the
    /// agent does not enforce.
    pub fn not_enforced_fields(&self) -> Vec<&'static str> {
        let uninspected_protocol = self.protocol.is_some_and(Protocol::needs_inspection) && !self.inspected();
        [
            ("protocol", uninspected_protocol),
            ("path", uninspected_protocol && self.path.is_some()),
            ("access", uninspected_protocol && self.access.is_some()),
            ("rules", uninspected_protocol && self.rules.is_some()),
            ("deny_rules", uninspected_protocol && self.deny_rules.is_some()),
            ("allow_uninspected_credentials", self.allow_uninspected_credentials.is_some()),
            ("credential_signing", self.credential_signing.is_some()),
            ("signing_service", self.signing_service.is_some()),
            ("signing_region", self.signing_region.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, present)| present.then_some(field))
        .collect()
    }
}

/// OpenShell's access presets, expanded into rules at load.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Access {
    ReadOnly,
    ReadWrite,
    Full,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::ReadOnly => "read-only",
            Access::ReadWrite => "read-write",
            Access::Full => "full",
        }
    }
}

/// One entry of `rules`; an entry without `allow` allows nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleDef {
    pub allow: Option<RequestMatchDef>,
}

/// What an allow rule (under `allow`) or a deny rule matches. REST and
/// WebSocket use `method`, `path` and `query`; JSON-RPC `method`; MCP
/// `method` and `tool` (or `params.name`); GraphQL `operation_type`,
/// `operation_name` and `fields`. SQL's `command` is accepted so OpenShell
/// files load.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RequestMatchDef {
    pub method: Option<String>,
    pub path: Option<String>,
    /// Name to a glob, or to `{glob: G}` / `{any: [G, ...]}`.
    pub query: Option<BTreeMap<String, MatcherDef>>,
    pub command: Option<IgnoredAny>,
    pub operation_type: Option<String>,
    pub operation_name: Option<String>,
    pub fields: Option<Vec<String>>,
    /// An MCP `tools/call`'s tool name: a glob, or `{glob: G}` / `{any: [G, ...]}`.
    pub tool: Option<MatcherDef>,
    /// MCP: `name` only, the same as `tool`.
    pub params: Option<BTreeMap<String, MatcherDef>>,
}

/// A registered persisted query: what its hidden document is trusted to be.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PersistedOperationDef {
    pub operation_type: Option<String>,
    pub operation_name: Option<String>,
    pub fields: Option<Vec<String>>,
}

pub(super) enum MatcherDef {
    Glob(String),
    Object(MatcherObject),
}

/// By hand rather than `untagged`, so that an unknown key inside the object
/// form is an error naming it.
impl<'de> Deserialize<'de> for MatcherDef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Matcher;
        impl<'de> serde::de::Visitor<'de> for Matcher {
            type Value = MatcherDef;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a glob string, or a map with `glob` or `any`")
            }

            fn visit_str<E: serde::de::Error>(self, glob: &str) -> Result<MatcherDef, E> {
                Ok(MatcherDef::Glob(glob.to_owned()))
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<MatcherDef, M::Error> {
                MatcherObject::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(MatcherDef::Object)
            }
        }
        deserializer.deserialize_any(Matcher)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MatcherObject {
    pub glob: Option<String>,
    pub any: Option<Vec<String>>,
}

/// `tcp` and `http` need no inspection beyond what the proxy already does;
/// the others are OpenShell's L7 protocols. In [`Protocol::NAMES`] order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Protocol {
    Tcp,
    Http,
    Rest,
    Websocket,
    Graphql,
    Mcp,
    JsonRpc,
    Sql,
}

impl Protocol {
    const ALL: [Protocol; 8] = [
        Protocol::Tcp,
        Protocol::Http,
        Protocol::Rest,
        Protocol::Websocket,
        Protocol::Graphql,
        Protocol::Mcp,
        Protocol::JsonRpc,
        Protocol::Sql,
    ];
    const NAMES: [&'static str; 8] = ["tcp", "http", "rest", "websocket", "graphql", "mcp", "json-rpc", "sql"];

    pub fn needs_inspection(self) -> bool {
        !matches!(self, Protocol::Tcp | Protocol::Http)
    }

    pub fn name(self) -> &'static str {
        Protocol::NAMES[self as usize]
    }
}

/// Any case, as OpenShell compares protocols.
impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Protocol, D::Error> {
        let text = String::deserialize(deserializer)?;
        Protocol::ALL
            .into_iter()
            .find(|protocol| protocol.name().eq_ignore_ascii_case(&text))
            .ok_or_else(|| D::Error::unknown_variant(&text, &Protocol::NAMES))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JsonRpcOptions {
    pub max_body_bytes: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct McpOptions {
    pub max_body_bytes: Option<u32>,
    pub strict_tool_names: Option<bool>,
    pub allow_all_known_mcp_methods: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialBinding {
    /// The provider whose secret this endpoint's requests get.
    pub provider: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BinaryDef {
    pub path: String,
    /// Deprecated in OpenShell and ignored there too.
    pub harness: Option<IgnoredAny>,
}
