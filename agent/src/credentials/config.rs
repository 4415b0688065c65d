//! The credentials file (`run --credentials FILE`):
//!
//! ```yaml
//! providers:
//!   - name: github                           # [A-Za-z0-9_-]{1,64}; endpoints bind to it
//!     credential: { file: /etc/sandbox-egress/github.token }   # root-only (0600), or { env: NAME }
//!   - name: rest
//!     credential: { env: REST_TOKEN }
//!     inject: { header: Authorization, format: "Bearer {}" }   # optional; or
//!     # inject: { basic: { user: x-access-token } }            #   Authorization: Basic user:secret
//!     # inject: { query: api_key }                              #   a query parameter, set or replaced
//! ```
//!
//! Unknown keys are errors naming the key; every error names where it is.
//! This module checks the file's shape only: [`super::Credentials::load`]
//! reads the secrets.

use std::{collections::BTreeSet, path::Path};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::{placeholder::is_valid_name, CredentialSource};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    providers: Vec<ProviderDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderDef {
    name: String,
    credential: CredentialSource,
    inject: Option<InjectDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectDef {
    header: Option<String>,
    format: Option<String>,
    basic: Option<BasicDef>,
    query: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicDef {
    user: String,
}

/// How a provider's secret is added to every request to a bound endpoint,
/// replacing what the sandbox sent there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inject {
    /// `name: {prefix}{secret}{suffix}`.
    Header { name: String, prefix: String, suffix: String },
    /// `Authorization: Basic base64(user:secret)`.
    Basic { user: String },
    /// The query parameter `name`, set to the secret.
    Query { name: String },
}

/// One provider as the file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    pub name: String,
    pub credential: CredentialSource,
    pub inject: Option<Inject>,
}

/// Header fields an injection must not set: they frame the message, route
/// it, or belong to one connection (the proxy drops or rewrites them).
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "via",
];

pub fn parse(text: &str) -> Result<Vec<ProviderConfig>> {
    let file: CredentialsFile = serde_norway::from_str(text)?;
    let mut names = BTreeSet::new();
    let mut providers = Vec::with_capacity(file.providers.len());
    for (index, definition) in file.providers.into_iter().enumerate() {
        let key = format!("providers[{index}]");
        let provider = validate(definition).with_context(|| key.clone())?;
        if !names.insert(provider.name.clone()) {
            bail!("{key}.name: '{}' is used by an earlier provider", provider.name);
        }
        providers.push(provider);
    }
    Ok(providers)
}

/// The provider names of the file at `path` (read, not its secrets).
pub fn provider_names(path: &Path) -> Result<BTreeSet<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read credentials file {}", path.display()))?;
    let providers = parse(&text).with_context(|| format!("credentials file {}", path.display()))?;
    Ok(providers.into_iter().map(|provider| provider.name).collect())
}

fn validate(definition: ProviderDef) -> Result<ProviderConfig> {
    if !is_valid_name(&definition.name) {
        bail!("name: {:?} must be 1 to 64 letters, digits, '-' or '_'", definition.name);
    }
    definition.credential.check().map_err(|reason| anyhow::anyhow!("credential: {reason}"))?;
    let inject = definition.inject.map(validate_inject).transpose().context("inject")?;
    Ok(ProviderConfig { name: definition.name, credential: definition.credential, inject })
}

fn validate_inject(definition: InjectDef) -> Result<Inject> {
    let is_token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    // Written into a header as is: visible ASCII and spaces only.
    let is_header_text = |text: &str| text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if definition.format.is_some() && definition.header.is_none() {
        bail!("format: only used with `header`");
    }
    match (definition.header, definition.basic, definition.query) {
        (Some(name), None, None) => {
            if name.is_empty() || !name.bytes().all(is_token_char) {
                bail!("header: {name:?} is not a valid header name");
            }
            if RESERVED_HEADERS.iter().any(|reserved| reserved.eq_ignore_ascii_case(&name)) {
                bail!("header: {name} frames or routes the request, and cannot carry a credential");
            }
            let format = definition.format.unwrap_or_else(|| "{}".to_owned());
            let (prefix, suffix) =
                format.split_once("{}").with_context(|| format!("format: {format:?} has no `{{}}` for the secret"))?;
            if suffix.contains("{}") {
                bail!("format: {format:?} has `{{}}` more than once");
            }
            if !is_header_text(&format) {
                bail!("format: {format:?} has characters not allowed in a header");
            }
            Ok(Inject::Header { name, prefix: prefix.to_owned(), suffix: suffix.to_owned() })
        }
        (None, Some(BasicDef { user }), None) => {
            if user.is_empty() || user.contains(':') || !is_header_text(&user) {
                bail!("basic.user: {user:?} must be visible ASCII without ':'");
            }
            Ok(Inject::Basic { user })
        }
        (None, None, Some(name)) => {
            if name.is_empty() || name.chars().any(char::is_control) {
                bail!("query: {name:?} is not a parameter name");
            }
            Ok(Inject::Query { name })
        }
        _ => bail!("give exactly one of `header` (with `format`), `basic` or `query`"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn the_three_inject_forms_and_none() {
        let providers = parse(
            "providers:\n\
             - { name: plain, credential: { env: PLAIN } }\n\
             - { name: bearer, credential: { file: /k }, inject: { header: Authorization, format: 'Bearer {}' } }\n\
             - { name: raw, credential: { env: RAW }, inject: { header: X-Api-Key } }\n\
             - { name: git, credential: { env: GIT }, inject: { basic: { user: x-access-token } } }\n\
             - { name: q, credential: { env: Q }, inject: { query: api_key } }\n",
        )
        .unwrap();
        let injects: Vec<Option<Inject>> = providers.iter().map(|p| p.inject.clone()).collect();
        assert_eq!(
            injects,
            [
                None,
                Some(Inject::Header { name: "Authorization".into(), prefix: "Bearer ".into(), suffix: String::new() }),
                Some(Inject::Header { name: "X-Api-Key".into(), prefix: String::new(), suffix: String::new() }),
                Some(Inject::Basic { user: "x-access-token".into() }),
                Some(Inject::Query { name: "api_key".into() }),
            ]
        );
        assert_eq!(providers[1].credential.file, Some(PathBuf::from("/k")));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key_and_its_place() {
        for (text, key, place) in [
            ("providers: []\nprovider: x\n", "provider", ""),
            ("providers:\n- { name: a, credential: { env: A }, scope: x }\n", "scope", "providers[0]"),
            ("providers:\n- { name: a, credential: { env: A, path: x } }\n", "path", "providers[0].credential"),
            (
                "providers:\n- { name: a, credential: { env: A }, inject: { headr: X } }\n",
                "headr",
                "providers[0].inject",
            ),
            (
                "providers:\n- { name: a, credential: { env: A }, inject: { basic: { usr: u } } }\n",
                "usr",
                "providers[0].inject.basic",
            ),
        ] {
            let error = error(text);
            assert!(error.contains(&format!("unknown field `{key}`")), "{text}: {error}");
            assert!(error.contains(place), "{text}: {error}");
        }
    }

    #[test]
    fn invalid_values_are_errors_naming_the_key() {
        for (provider, expected) in [
            ("{ name: 'a b', credential: { env: A } }", "providers[0]: name: \"a b\" must be"),
            ("{ name: a, credential: {} }", "providers[0]: credential: needs exactly one of env and file"),
            ("{ name: a, credential: { env: A, file: /f } }", "credential: needs exactly one"),
            ("{ name: a, credential: { env: 'A=B' } }", "credential: env: \"A=B\" is not"),
            ("{ name: a, credential: { env: A }, inject: {} }", "inject: give exactly one of"),
            ("{ name: a, credential: { env: A }, inject: { header: X, query: q } }", "inject: give exactly one"),
            ("{ name: a, credential: { env: A }, inject: { query: q, format: '{}' } }", "inject: format: only"),
            ("{ name: a, credential: { env: A }, inject: { header: X, format: 'Bearer' } }", "has no `{}`"),
            ("{ name: a, credential: { env: A }, inject: { header: X, format: '{}{}' } }", "more than once"),
            ("{ name: a, credential: { env: A }, inject: { header: 'X Y' } }", "inject: header: \"X Y\" is not"),
            ("{ name: a, credential: { env: A }, inject: { header: Host } }", "frames or routes"),
            ("{ name: a, credential: { env: A }, inject: { header: Content-Length } }", "frames or routes"),
            ("{ name: a, credential: { env: A }, inject: { basic: { user: 'a:b' } } }", "basic.user"),
            ("{ name: a, credential: { env: A }, inject: { query: '' } }", "inject: query"),
        ] {
            let error = error(&format!("providers:\n- {provider}\n"));
            assert!(error.contains(expected), "{provider}: {error}");
        }
        let error = error("providers:\n- { name: a, credential: { env: A } }\n- { name: a, credential: { env: B } }\n");
        assert!(error.contains("providers[1].name: 'a' is used by an earlier provider"), "{error}");
    }
}
