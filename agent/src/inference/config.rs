//! The inference configuration file: providers, the route and limits.
//!
//! ```yaml
//! providers:
//!   - name: openai                     # what the route and the CLI call it
//!     type: openai                     # openai | anthropic | nvidia | openai-compatible
//!     base_url: https://api.openai.com # optional for the first three types; may carry a
//!                                      #   path prefix (https://h/api), never /v1
//!     credential: { env: OPENAI_API_KEY }   # or { file: /etc/sandbox-egress/openai.key }
//!     headers:                         # optional, sent unless the client sent its own
//!       openai-project: proj_123
//!   - name: local
//!     type: openai-compatible
//!     base_url: https://llm.internal:8443
//!     credential: { file: /etc/sandbox-egress/local.key }
//!     ca_file: /etc/sandbox-egress/internal-ca.pem   # trusted on top of the system roots
//! route:                               # optional: without it inference.local answers 503
//!   provider: openai
//!   model: gpt-4o-mini
//! limits:                              # all optional; defaults shown
//!   max_request_body: 10485760         # bytes
//!   max_response_bytes: 268435456      # bytes of one response body
//!   stream_idle_timeout: 60s           # longest gap in a request or response body (ms, s or m)
//!   connect_timeout: 10s               # resolve + TCP + TLS
//!   response_timeout: 300s             # request sent to response head
//! ```
//!
//! Unknown keys are errors, and every error names the key. Credentials are
//! references: their values are read for each request and never written
//! back. Route changes rewrite the file (see [`write_atomic`]); comments
//! are not kept.

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};

use super::{
    provider::{BaseUrl, ProviderType},
    upstream::Connector,
};
use crate::credentials::CredentialSource;

pub const DEFAULT_MAX_REQUEST_BODY: u64 = 10 << 20;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 256 << 20;
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Non-streamed completions of long outputs take minutes.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest model name a route may hold.
const MAX_MODEL_LEN: usize = 256;
/// Header fields the agent sets itself, which configured headers must not replace.
const RESERVED_HEADERS: [&str; 8] = [
    "host",
    "authorization",
    "x-api-key",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "expect",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub providers: Vec<ProviderConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    #[serde(default, skip_serializing_if = "LimitsConfig::is_empty")]
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ProviderType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    pub credential: CredentialSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Where inference.local sends requests, and the model it asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<String>,
}

impl LimitsConfig {
    fn is_empty(&self) -> bool {
        *self == LimitsConfig::default()
    }
}

/// A day: longer is surely a typo, and keeps the arithmetic small.
const MAX_CONFIG_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A duration written `250ms`, `60s` or `5m`. Parsed here rather than by
/// serde so the error names the key, and the file keeps the text as written.
fn parse_duration(key: &str, text: &str) -> Result<Duration> {
    let digits_len = text.bytes().take_while(u8::is_ascii_digit).count();
    let (digits, unit) = text.split_at(digits_len);
    let amount: u64 =
        digits.parse().map_err(|_| anyhow!("limits.{key}: duration {text:?} does not start with a number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(amount),
        "s" => Duration::from_secs(amount),
        "m" => Duration::from_secs(amount.saturating_mul(60)),
        _ => bail!("limits.{key}: duration {text:?} needs a unit: ms, s or m"),
    };
    if duration.is_zero() || duration > MAX_CONFIG_DURATION {
        bail!("limits.{key}: duration {text:?} is outside 1ms..24h");
    }
    Ok(duration)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_body: u64,
    pub max_response_bytes: u64,
    pub stream_idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// A provider ready to be used: validated, with its TLS set up.
pub struct Provider {
    pub name: String,
    pub kind: ProviderType,
    pub base_url: BaseUrl,
    pub credential: CredentialSource,
    /// Configured headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub connector: Connector,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url.to_string())
            .field("credential", &self.credential)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// A loaded configuration: the file as parsed (to write back) and what was
/// validated from it.
#[derive(Debug)]
pub struct Config {
    pub file: ConfigFile,
    pub providers: BTreeMap<String, Arc<Provider>>,
    pub limits: Limits,
}

impl Config {
    pub fn from_yaml(text: &str) -> Result<Config> {
        let file: ConfigFile = serde_norway::from_str(text)?;
        let providers = validate_providers(&file.providers)?;
        if let Some(route) = &file.route {
            check_route(&providers, route).context("route")?;
        }
        let limits = validate_limits(&file.limits)?;
        Ok(Config { file, providers, limits })
    }
}

fn validate_providers(configs: &[ProviderConfig]) -> Result<BTreeMap<String, Arc<Provider>>> {
    let mut system_roots: Option<RootCertStore> = None;
    let mut providers = BTreeMap::new();
    for (index, config) in configs.iter().enumerate() {
        let key = format!("providers[{index}]");
        let provider = validate_provider(config, &mut system_roots).with_context(|| key.clone())?;
        if providers.insert(provider.name.clone(), Arc::new(provider)).is_some() {
            bail!("{key}.name: '{}' is used by an earlier provider", config.name);
        }
    }
    Ok(providers)
}

fn validate_provider(config: &ProviderConfig, system_roots: &mut Option<RootCertStore>) -> Result<Provider> {
    let valid_name = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if config.name.is_empty() || config.name.len() > 64 || !config.name.chars().all(valid_name) {
        bail!("name: {:?} must be 1 to 64 letters, digits, '-', '_' or '.'", config.name);
    }
    let base_url_text = match (&config.base_url, config.kind.default_base_url()) {
        (Some(text), _) => text.as_str(),
        (None, Some(default)) => default,
        (None, None) => bail!("base_url: required for type {}", config.kind),
    };
    let base_url = BaseUrl::parse(base_url_text).map_err(|reason| anyhow!("base_url: {reason}"))?;
    config.credential.check().map_err(|reason| anyhow!("credential: {reason}"))?;
    if config.ca_file.is_some() && !base_url.tls {
        bail!("ca_file: only meaningful for an https:// base_url");
    }
    let headers = validate_headers(&config.headers)?;
    let roots = if base_url.tls {
        system_roots.get_or_insert_with(crate::tls::system_roots).clone()
    } else {
        RootCertStore::empty()
    };
    let connector = Connector::new(&base_url, &roots, config.ca_file.as_deref()).with_context(|| {
        if config.ca_file.is_some() {
            "ca_file"
        } else {
            "base_url"
        }
    })?;
    Ok(Provider {
        name: config.name.clone(),
        kind: config.kind,
        base_url,
        credential: config.credential.clone(),
        headers,
        connector,
    })
}

fn validate_headers(configured: &BTreeMap<String, String>) -> Result<Vec<(String, String)>> {
    let is_token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let mut headers: Vec<(String, String)> = Vec::with_capacity(configured.len());
    for (name, value) in configured {
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(is_token_char) {
            bail!("headers.{name}: not a valid header name");
        }
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            bail!("headers.{name}: set by the agent itself, cannot be configured");
        }
        // Configured values may be sensitive: refuse them without quoting.
        if !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t') {
            bail!("headers.{name}: the value has characters not allowed in a header");
        }
        if headers.iter().any(|(seen, _)| *seen == lower) {
            bail!("headers.{name}: given twice (names are case-insensitive)");
        }
        headers.push((lower, value.trim().to_owned()));
    }
    Ok(headers)
}

/// Refuses a route naming an unknown provider or an unusable model name.
pub fn check_route(providers: &BTreeMap<String, Arc<Provider>>, route: &Route) -> Result<()> {
    if !providers.contains_key(&route.provider) {
        let known: Vec<&str> = providers.keys().map(String::as_str).collect();
        bail!("provider: no provider named {:?} (configured: {})", route.provider, known.join(", "));
    }
    if route.model.is_empty() || route.model.len() > MAX_MODEL_LEN || route.model.chars().any(char::is_control) {
        bail!("model: must be 1 to {MAX_MODEL_LEN} characters without control characters");
    }
    Ok(())
}

fn validate_limits(config: &LimitsConfig) -> Result<Limits> {
    let positive = |key: &str, value: Option<u64>, default: u64| match value {
        Some(0) => Err(anyhow!("limits.{key}: must be at least 1")),
        Some(value) => Ok(value),
        None => Ok(default),
    };
    let duration = |key: &str, value: &Option<String>, default| {
        value.as_deref().map_or(Ok(default), |text| parse_duration(key, text))
    };
    Ok(Limits {
        max_request_body: positive("max_request_body", config.max_request_body, DEFAULT_MAX_REQUEST_BODY)?,
        max_response_bytes: positive("max_response_bytes", config.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES)?,
        stream_idle_timeout: duration("stream_idle_timeout", &config.stream_idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT)?,
        connect_timeout: duration("connect_timeout", &config.connect_timeout, DEFAULT_CONNECT_TIMEOUT)?,
        response_timeout: duration("response_timeout", &config.response_timeout, DEFAULT_RESPONSE_TIMEOUT)?,
    })
}

/// What a rewritten file starts with, since the rewrite drops comments.
const REWRITTEN_HEADER: &str =
    "# Rewritten by sandbox-egress when the inference route changed; comments are not kept.\n";

pub fn serialise(file: &ConfigFile) -> Result<String> {
    Ok(format!("{REWRITTEN_HEADER}{}", serde_norway::to_string(file)?))
}

/// Replaces `path` with `contents` so a reader sees the old or the new file,
/// never a mix: a 0600 temporary file in the same directory, synced, then
/// renamed over it.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let file_name = path.file_name().with_context(|| format!("{} names no file", path.display()))?;
    let temporary = directory.join(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let written = (|| -> io::Result<()> {
        // A leftover from a crash; create_new below refuses to follow or reuse anything there.
        match fs::remove_file(&temporary) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        // The rename itself survives a crash once the directory is synced.
        fs::File::open(directory)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}
