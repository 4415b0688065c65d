//! Provider profiles: which API each provider type speaks, how it
//! authenticates, which client headers reach it, and where it lives.
//!
//! | type                | API     | credential header        | client headers kept (besides the common ones) |
//! |---------------------|---------|--------------------------|-----------------------------------------------|
//! | `openai`            | OpenAI  | `Authorization: Bearer`  | `openai-beta`                                 |
//! | `anthropic`         | Messages| `x-api-key`              | `anthropic-version`, `anthropic-beta`         |
//! | `nvidia`            | OpenAI  | `Authorization: Bearer`  | none                                          |
//! | `openai-compatible` | OpenAI  | `Authorization: Bearer`  | none                                          |
//!
//! NVIDIA's hosted endpoints and "OpenAI-compatible" servers (vLLM, Ollama,
//! LiteLLM...) are reached with the OpenAI API: its whole path set is
//! offered, and a path such a server lacks gets the server's own 404.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{
    credentials::Secret,
    wire::host::{Authority, Host},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderType {
    Openai,
    Anthropic,
    Nvidia,
    OpenaiCompatible,
}

/// The API family a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::OpenAi => "the OpenAI API",
            Api::Anthropic => "the Anthropic Messages API",
        })
    }
}

/// Sent by every client that means it; forwarded to any provider. Content
/// type is not among them: the body is re-serialised JSON, so it is always
/// `application/json`.
const COMMON_CLIENT_HEADERS: [&str; 3] = ["accept", "accept-encoding", "user-agent"];

/// The Messages API version sent when the client names none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

impl ProviderType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Openai => "openai",
            ProviderType::Anthropic => "anthropic",
            ProviderType::Nvidia => "nvidia",
            ProviderType::OpenaiCompatible => "openai-compatible",
        }
    }

    pub fn api(self) -> Api {
        match self {
            ProviderType::Anthropic => Api::Anthropic,
            ProviderType::Openai | ProviderType::Nvidia | ProviderType::OpenaiCompatible => Api::OpenAi,
        }
    }

    /// Where the provider lives when the config gives no `base_url`; an
    /// OpenAI-compatible server has no well-known home.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderType::Openai => Some("https://api.openai.com"),
            ProviderType::Anthropic => Some("https://api.anthropic.com"),
            ProviderType::Nvidia => Some("https://integrate.api.nvidia.com"),
            ProviderType::OpenaiCompatible => None,
        }
    }

    /// The header carrying the credential, with its value.
    pub fn auth_header(self, key: &Secret) -> (&'static str, String) {
        match self {
            ProviderType::Anthropic => ("x-api-key", key.expose().to_owned()),
            ProviderType::Openai | ProviderType::Nvidia | ProviderType::OpenaiCompatible => {
                ("Authorization", format!("Bearer {}", key.expose()))
            }
        }
    }

    /// Headers the API needs, sent unless the client sent its own.
    pub fn default_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ProviderType::Anthropic => &[("anthropic-version", DEFAULT_ANTHROPIC_VERSION)],
            ProviderType::Openai | ProviderType::Nvidia | ProviderType::OpenaiCompatible => &[],
        }
    }

    /// Provider-specific client headers kept. `openai-organization` and
    /// `openai-project` are left out on purpose: they pick which account the
    /// credential bills, which is the operator's choice (set them in the
    /// provider's `headers`), not the sandbox's.
    fn client_headers(self) -> &'static [&'static str] {
        match self {
            ProviderType::Anthropic => &["anthropic-version", "anthropic-beta"],
            ProviderType::Openai => &["openai-beta"],
            ProviderType::Nvidia | ProviderType::OpenaiCompatible => &[],
        }
    }

    /// Whether a client header called `name` is forwarded to this provider.
    /// Credentials (`authorization`, `x-api-key`) never are.
    pub fn keeps_client_header(self, name: &str) -> bool {
        COMMON_CLIENT_HEADERS.iter().chain(self.client_headers()).any(|kept| kept.eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for ProviderType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The requests inference.local serves; anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Responses,
    Embeddings,
    Messages,
    ListModels,
    GetModel,
}

/// Longest model id accepted in `GET /v1/models/{id}`.
const MAX_MODEL_ID_LEN: usize = 256;

impl Endpoint {
    /// The endpoint `method` and `path` (no query) name, if any.
    pub fn recognise(method: &str, path: &str) -> Option<Endpoint> {
        let endpoint = match (method, path) {
            ("POST", "/v1/chat/completions") => Endpoint::ChatCompletions,
            ("POST", "/v1/completions") => Endpoint::Completions,
            ("POST", "/v1/responses") => Endpoint::Responses,
            ("POST", "/v1/embeddings") => Endpoint::Embeddings,
            ("POST", "/v1/messages") => Endpoint::Messages,
            ("GET", "/v1/models") => Endpoint::ListModels,
            ("GET", _) => {
                let id = path.strip_prefix("/v1/models/")?;
                return is_safe_model_id(id).then_some(Endpoint::GetModel);
            }
            _ => return None,
        };
        Some(endpoint)
    }

    /// The API family the endpoint belongs to; `None`: every provider has it.
    pub fn api(self) -> Option<Api> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses | Endpoint::Embeddings => {
                Some(Api::OpenAi)
            }
            Endpoint::Messages => Some(Api::Anthropic),
            Endpoint::ListModels | Endpoint::GetModel => None,
        }
    }

    /// Whether the request carries a JSON body naming a model.
    pub fn has_model_body(self) -> bool {
        !matches!(self, Endpoint::ListModels | Endpoint::GetModel)
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "POST /v1/chat/completions",
            Endpoint::Completions => "POST /v1/completions",
            Endpoint::Responses => "POST /v1/responses",
            Endpoint::Embeddings => "POST /v1/embeddings",
            Endpoint::Messages => "POST /v1/messages",
            Endpoint::ListModels => "GET /v1/models",
            Endpoint::GetModel => "GET /v1/models/{id}",
        }
    }
}

/// Model ids such as `gpt-4o`, `ft:gpt-4o:org:x` or `meta/llama-3.1-8b`:
/// no dot segments and no percent-encoding, so the provider cannot resolve
/// the path to anything but the model.
fn is_safe_model_id(id: &str) -> bool {
    let is_id_char = |c: char| c.is_ascii_alphanumeric() || "-._:@+".contains(c);
    id.len() <= MAX_MODEL_ID_LEN
        && id
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != ".." && segment.chars().all(is_id_char))
}

/// A provider's `base_url`: scheme, authority and an optional path prefix
/// placed before the request's `/v1/...` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: Host,
    pub port: u16,
    /// The Host header: the authority as written.
    pub host_header: String,
    /// Empty, or `/segment...` without a trailing slash.
    pub path_prefix: String,
}

impl BaseUrl {
    /// Errors never quote the URL: a mistyped one may hold a secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        let scheme_rest = |scheme: &str| {
            text.get(..scheme.len()).filter(|found| found.eq_ignore_ascii_case(scheme)).map(|_| &text[scheme.len()..])
        };
        let (tls, rest) = match (scheme_rest("https://"), scheme_rest("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err("must start with https:// or http://".into()),
        };
        if rest.contains(['?', '#']) {
            return Err("must not have a query or fragment".into());
        }
        let (authority_text, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
        let authority =
            Authority::parse(authority_text.as_bytes()).map_err(|reason| format!("invalid host: {reason}"))?;
        let path_prefix = path.trim_end_matches('/');
        if !path_prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("path has a space or a character that is not printable ASCII".into());
        }
        // The prefix starts with '/': its first split element is empty.
        if path_prefix.split('/').skip(1).any(|segment| segment.is_empty() || segment == "." || segment == "..") {
            return Err("path has an empty, '.' or '..' segment".into());
        }
        if path_prefix.to_ascii_lowercase().ends_with("/v1") {
            return Err("ends in /v1, but the request path (/v1/...) is appended to it: leave /v1 out".into());
        }
        Ok(BaseUrl {
            tls,
            port: authority.port.unwrap_or(if tls { 443 } else { 80 }),
            host_header: authority.to_string(),
            host: authority.host,
            path_prefix: path_prefix.to_owned(),
        })
    }

    /// The name or address to resolve.
    pub fn lookup_host(&self) -> String {
        match &self.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host_header, self.path_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_recognised_by_method_and_exact_path() {
        for (method, path, expected) in [
            ("POST", "/v1/chat/completions", Some(Endpoint::ChatCompletions)),
            ("POST", "/v1/completions", Some(Endpoint::Completions)),
            ("POST", "/v1/responses", Some(Endpoint::Responses)),
            ("POST", "/v1/embeddings", Some(Endpoint::Embeddings)),
            ("POST", "/v1/messages", Some(Endpoint::Messages)),
            ("GET", "/v1/models", Some(Endpoint::ListModels)),
            ("GET", "/v1/models/gpt-4o", Some(Endpoint::GetModel)),
            ("GET", "/v1/models/meta/llama-3.1-8b-instruct", Some(Endpoint::GetModel)),
            ("GET", "/v1/models/ft:gpt-4o:org:abc", Some(Endpoint::GetModel)),
            ("GET", "/v1/chat/completions", None),
            ("POST", "/v1/models", None),
            ("HEAD", "/v1/models", None),
            ("POST", "/v1/chat/completions/", None),
            ("POST", "/v1/files", None),
            ("GET", "/v1/models/", None),
            ("GET", "/v1/models/..", None),
            ("GET", "/v1/models/a/../../files", None),
            ("GET", "/v1/models/%2e%2e", None),
            ("GET", "/v1/models/a//b", None),
            ("DELETE", "/v1/models/gpt-4o", None),
        ] {
            assert_eq!(Endpoint::recognise(method, path), expected, "{method} {path}");
        }
        assert!(Endpoint::recognise("GET", &format!("/v1/models/{}", "a".repeat(257))).is_none());
    }

    #[test]
    fn every_provider_speaks_models_and_only_its_own_generation_api() {
        assert_eq!(ProviderType::Anthropic.api(), Api::Anthropic);
        for kind in [ProviderType::Openai, ProviderType::Nvidia, ProviderType::OpenaiCompatible] {
            assert_eq!(kind.api(), Api::OpenAi, "{kind}");
        }
        assert_eq!(Endpoint::Messages.api(), Some(Api::Anthropic));
        assert_eq!(Endpoint::Embeddings.api(), Some(Api::OpenAi));
        assert_eq!(Endpoint::ListModels.api(), None);
        assert!(Endpoint::Messages.has_model_body() && !Endpoint::GetModel.has_model_body());
    }

    #[test]
    fn credentials_are_never_kept_from_the_client() {
        for kind in
            [ProviderType::Openai, ProviderType::Anthropic, ProviderType::Nvidia, ProviderType::OpenaiCompatible]
        {
            for name in
                ["Authorization", "x-api-key", "X-Api-Key", "proxy-authorization", "cookie", "openai-organization"]
            {
                assert!(!kind.keeps_client_header(name), "{kind} keeps {name}");
            }
            assert!(kind.keeps_client_header("User-Agent") && kind.keeps_client_header("accept"));
        }
        assert!(ProviderType::Anthropic.keeps_client_header("Anthropic-Version"));
        assert!(!ProviderType::Openai.keeps_client_header("anthropic-beta"));
        assert!(ProviderType::Openai.keeps_client_header("OpenAI-Beta"));
    }

    #[test]
    fn auth_styles() {
        let key = Secret::new(" sk-test \n").unwrap();
        assert_eq!(ProviderType::Openai.auth_header(&key), ("Authorization", "Bearer sk-test".into()));
        assert_eq!(ProviderType::Anthropic.auth_header(&key), ("x-api-key", "sk-test".into()));
    }

    #[test]
    fn base_urls_parse_with_prefix_and_default_ports() {
        let url = BaseUrl::parse("https://H.example/api/").unwrap();
        assert_eq!(
            url,
            BaseUrl {
                tls: true,
                host: Host::Name("h.example".into()),
                port: 443,
                host_header: "h.example".into(),
                path_prefix: "/api".into(),
            }
        );
        assert_eq!(url.to_string(), "https://h.example/api");
        let url = BaseUrl::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(
            (url.tls, url.port, url.host_header.as_str(), url.path_prefix.as_str()),
            (false, 8000, "127.0.0.1:8000", "")
        );
        assert_eq!(BaseUrl::parse("http://[::1]:9/x/y").unwrap().lookup_host(), "::1");
    }

    #[test]
    fn bad_base_urls_are_refused_without_quoting_them() {
        for (url, reason) in [
            ("ftp://h", "must start with https:// or http://"),
            ("h.example", "must start with https:// or http://"),
            ("https://user:sk-secret@h.example", "userinfo"),
            ("https://h.example/?key=sk-secret", "query or fragment"),
            ("https://h.example/v1", "leave /v1 out"),
            ("https://h.example/api/V1/", "leave /v1 out"),
            ("https://h.example/a/../b", "'..'"),
            ("https://h.example/a b", "printable"),
            ("https://", "invalid host"),
            ("https://h.example:0", "out of range"),
        ] {
            let error = BaseUrl::parse(url).unwrap_err();
            assert!(error.contains(reason), "{url}: {error}");
            assert!(!error.contains("sk-secret"), "{url}: {error}");
        }
    }
}
