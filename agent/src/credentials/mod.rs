//! Credentials that never enter the sandbox.
//!
//! Providers (`run --credentials FILE`, see [`config`]) hold secrets the
//! agent reads itself: from its environment at start-up, or from a root-only
//! file read on every use (so a rotated file takes effect on the next
//! request). An endpoint's `credential_binding: {provider: NAME}` ties it to
//! one; on requests to that endpoint, over TLS the agent terminates, the
//! agent replaces the provider's placeholder ([`placeholder::placeholder`])
//! wherever the sandbox put it (header values, Basic credentials, the path
//! and the query) and applies the provider's `inject`. A placeholder seen
//! anywhere else is refused, never forwarded.
//!
//! The inference route reads its provider keys through [`CredentialSource`]
//! too.

mod body;
pub mod cli;
mod config;
pub mod placeholder;
mod rewrite;
mod secret;
mod source;

use std::{collections::BTreeMap, path::Path, sync::Arc};

use anyhow::{Context, Result};

use self::source::{read_env, SecretFile};
pub use self::{
    body::MAX_REWRITTEN_BODY,
    config::{provider_names, Inject},
    rewrite::{check_stream, check_unbound, CredentialedHead, Refusal},
    secret::Secret,
    source::CredentialSource,
};

/// The providers of the credentials file; empty without one.
#[derive(Default)]
pub struct Credentials {
    providers: BTreeMap<String, Provider>,
}

pub struct Provider {
    name: String,
    secret: SecretSource,
    inject: Option<Inject>,
}

enum SecretSource {
    /// Read once at start-up: the agent's environment does not change.
    Env(Arc<Secret>),
    File(SecretFile),
}

impl Credentials {
    /// Reads and checks the file and every secret in it now (environment
    /// variables set, files root-only and readable), so a mistake stops the
    /// agent at start-up rather than failing requests.
    pub fn load(path: &Path) -> Result<Credentials> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read credentials file {}", path.display()))?;
        let providers = config::parse(&text).with_context(|| format!("credentials file {}", path.display()))?;
        let mut loaded = BTreeMap::new();
        for (index, provider) in providers.into_iter().enumerate() {
            let secret = match (&provider.credential.env, &provider.credential.file) {
                (Some(variable), _) => read_env(variable).map(|value| SecretSource::Env(value.into())),
                (None, Some(file)) => SecretFile::open(file).map(SecretSource::File),
                (None, None) => unreachable!("config::parse checked the credential"),
            }
            .map_err(|reason| anyhow::anyhow!("providers[{index}].credential: {reason}"))
            .with_context(|| format!("credentials file {}", path.display()))?;
            let name = provider.name;
            loaded.insert(name.clone(), Provider { name, secret, inject: provider.inject });
        }
        tracing::info!(
            credentials_file = %path.display(),
            providers = %loaded.keys().cloned().collect::<Vec<_>>().join(", "),
            "credentials loaded"
        );
        Ok(Credentials { providers: loaded })
    }

    pub fn provider_names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.get(name)
    }
}

impl Provider {
    /// The secret now; the reason names where it was looked for.
    fn secret(&self) -> Result<Arc<Secret>, String> {
        match &self.secret {
            SecretSource::Env(value) => Ok(value.clone()),
            SecretSource::File(file) => file.current().map(Arc::new),
        }
    }
}
