//! inference.local: the managed inference route (provider auth injection, model rewrite, streaming).
//!
//! A sandboxed program calls `https://inference.local/v1/...` (or plain
//! http) without credentials and with any model name; the agent sends the
//! request to the one routed provider with that provider's credential and
//! the routed model, and streams the answer back.
//!
//! - `config`: the YAML file (providers, route, limits), loaded and written back;
//! - `provider`: what each provider type speaks, its auth and kept headers;
//! - `route`: where the proxy hands inference.local connections over ([`InferenceRoute`]);
//! - `session`: the request loop on one client connection ([`Inference::serve`]);
//! - `stream`: the response relay, SSE error events on failure;
//! - `cli`: `sandbox-egress inference get|set|update`.

pub mod cli;
mod config;
mod provider;
mod respond;
mod route;
mod session;
mod stream;
#[cfg(test)]
mod tests;
mod upstream;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use anyhow::{bail, Context, Result};

use self::config::{check_route, serialise, write_atomic, Config, ConfigFile, Limits, Provider};
pub use self::{
    config::Route,
    route::{is_inference, names_inference, no_route, route_or_refuse, InferenceRoute},
};

/// What the control socket asks of the route.
pub enum RouteChange {
    Get,
    Set { provider: String, model: String },
    Update { provider: Option<String>, model: Option<String> },
}

/// The configured providers and the current route, shared by every
/// connection and the control socket (Send + Sync; share it in an `Arc`).
#[derive(Debug)]
pub struct Inference {
    providers: BTreeMap<String, Arc<Provider>>,
    limits: Limits,
    route: RwLock<Option<Route>>,
    /// The file and its parsed contents, rewritten on every route change;
    /// the lock also orders concurrent changes.
    persisted: Mutex<Persisted>,
}

#[derive(Debug)]
struct Persisted {
    path: PathBuf,
    file: ConfigFile,
}

impl Inference {
    /// Loads and validates the config file. Credentials are not read here
    /// but for each request, so a missing one fails requests, not startup.
    pub fn load(path: &Path) -> Result<Inference> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read inference config {}", path.display()))?;
        let config = Config::from_yaml(&text).with_context(|| format!("inference config {}", path.display()))?;
        Ok(Inference {
            providers: config.providers,
            limits: config.limits,
            route: RwLock::new(config.file.route.clone()),
            persisted: Mutex::new(Persisted { path: path.to_owned(), file: config.file }),
        })
    }

    /// The current route; `None` until one is set.
    /// A route change (or read) from the control socket, off the async
    /// threads (it writes the config file): the reply's `route` and `providers`.
    pub async fn answer_control(self: Arc<Self>, change: RouteChange) -> Result<serde_json::Value> {
        let inference = self.clone();
        let route = tokio::task::spawn_blocking(move || match change {
            RouteChange::Get => Ok(inference.route()),
            RouteChange::Set { provider, model } => inference.set_route(&provider, &model).map(Some),
            RouteChange::Update { provider, model } => {
                inference.update_route(provider.as_deref(), model.as_deref()).map(Some)
            }
        })
        .await
        .context("the route change failed")??;
        Ok(serde_json::json!({"route": route, "providers": self.provider_names()}))
    }

    pub fn route(&self) -> Option<Route> {
        self.route.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn provider_names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    /// Routes inference.local to `provider` with `model`, and writes the
    /// route to the config file. The provider must be configured; on any
    /// error nothing changes.
    pub fn set_route(&self, provider: &str, model: &str) -> Result<Route> {
        self.change_route(|_| Ok(Route { provider: provider.to_owned(), model: model.to_owned() }))
    }

    /// Changes the given parts of the route and keeps the others. Without a
    /// current route both are needed.
    pub fn update_route(&self, provider: Option<&str>, model: Option<&str>) -> Result<Route> {
        self.change_route(|current| {
            let (provider, model) = match (provider, model, current) {
                (None, None, _) => bail!("nothing to update: give a provider, a model or both"),
                (Some(provider), Some(model), _) => (provider, model),
                (provider, model, Some(current)) => {
                    (provider.unwrap_or(&current.provider), model.unwrap_or(&current.model))
                }
                (_, _, None) => bail!("no route is set yet: give both a provider and a model"),
            };
            Ok(Route { provider: provider.to_owned(), model: model.to_owned() })
        })
    }

    fn change_route(&self, change: impl FnOnce(Option<&Route>) -> Result<Route>) -> Result<Route> {
        let mut persisted = self.persisted.lock().unwrap_or_else(PoisonError::into_inner);
        let route = change(self.route().as_ref())?;
        check_route(&self.providers, &route)?;
        let mut file = persisted.file.clone();
        file.route = Some(route.clone());
        write_atomic(&persisted.path, serialise(&file)?.as_bytes())?;
        persisted.file = file;
        *self.route.write().unwrap_or_else(PoisonError::into_inner) = Some(route.clone());
        tracing::info!(provider = %route.provider, model = %route.model, "inference route changed");
        Ok(route)
    }

    /// The route a previous daemon had (an upgrade carries it; set at run
    /// time, it is already in the file): the file's own is replaced.
    pub fn carry_route(&self, route: Route) -> Result<()> {
        check_route(&self.providers, &route)?;
        *self.route.write().unwrap_or_else(PoisonError::into_inner) = Some(route);
        Ok(())
    }

    /// The route and its provider, read once per request.
    fn routed_provider(&self) -> Option<(Route, Arc<Provider>)> {
        let route = self.route()?;
        let provider = self.providers.get(&route.provider)?.clone();
        Some((route, provider))
    }
}
