//! One client connection to inference.local, request by request: checked,
//! rewritten for the routed provider, sent on the connection's provider
//! connection (kept alive across requests), the response streamed back.
//!
//! Order of checks, each answered with the JSON error of `respond` and the
//! end of the connection:
//! 1. HTTP/1.1 and a Host of inference.local, else 400 / 403;
//! 2. a recognised endpoint (`provider::Endpoint`), else 403;
//! 3. a route, else 503 with the command that sets one;
//! 4. an endpoint the routed provider's API has, else 400 naming both;
//! 5. the provider's credential readable, else 503;
//! 6. the body: none for GET (400), at most `max_request_body` (413, before
//!    reading when Content-Length says so), a JSON object for POST (400);
//! 7. the provider reached (502; 504 on timeout) and its response head
//!    received in `response_timeout` (504) and valid (502).

use std::{pin::pin, sync::Arc, time::Duration};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{
    config::Provider,
    provider::Endpoint,
    respond::{write_refusal, Refusal},
    stream::{is_event_stream, relay_body, StreamEnd},
    upstream::{is_connection_gone, ConnectError},
    Inference,
};
use crate::{
    conn::InferenceLog,
    credentials::{check_unbound, Secret},
    dns::{Resolver, INFERENCE_HOST},
    http1::{
        expect::continue_before_reading,
        forward::{forward_response_head, wants_close},
        has_request_body, request_framing, response_framing, BodyError, BodyFraming, BodySource, HeadReader, Piece,
        RequestHead, ResponseHead,
    },
    tls::Io,
    wire::host::Host,
};

const VIA: &str = "sandbox-egress";
/// How long a keep-alive connection may sit between requests.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time for a whole request head, from its first byte.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Interim (1xx) responses skipped before giving up on a final one.
const MAX_INTERIM_RESPONSES: usize = 8;

impl Inference {
    /// Serves the client connection whose first request head `first` was
    /// already read; `buffered` holds the bytes read past that head (not the
    /// head itself). Returns when the connection ends; the client stream is
    /// shut down by then.
    pub async fn serve<S>(
        &self,
        client: S,
        buffered: Vec<u8>,
        first: RequestHead,
        dns: &Resolver,
        log: &mut InferenceLog,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut session =
            Session { inference: self, dns, client: HeadReader::with_buffered(client, buffered), upstream: None, log };
        session.run(Some(first)).await;
    }

    /// Serves a client connection of which nothing was read yet, e.g. one
    /// just decrypted. A first head that does not parse gets a 400.
    pub async fn serve_connection<S>(&self, client: S, dns: &Resolver, log: &mut InferenceLog)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut session = Session { inference: self, dns, client: HeadReader::new(client), upstream: None, log };
        session.run(None).await;
    }
}

struct Session<'a, S> {
    inference: &'a Inference,
    /// Resolves the providers' names.
    dns: &'a Resolver,
    client: HeadReader<S>,
    upstream: Option<Upstream>,
    log: &'a mut InferenceLog,
}

/// The connection to the provider that served the previous request.
struct Upstream {
    provider: Arc<Provider>,
    reader: HeadReader<Box<dyn Io>>,
}

/// A request checked and rewritten, ready for the provider.
struct Prepared {
    provider: Arc<Provider>,
    method: String,
    /// Head and body as sent upstream. Holds the credential: never logged.
    wire: Vec<u8>,
    /// The client asked to close after this response.
    client_close: bool,
}

/// Why a request goes no further.
enum Stop {
    /// Answered with an error response.
    Refuse(Refusal),
    /// The client went away or broke off; nothing to answer.
    Abort(String),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Stop {
        Stop::Refuse(refusal)
    }
}

enum Flow {
    KeepAlive,
    Close,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    async fn run(&mut self, first: Option<RequestHead>) {
        let mut next = match first {
            Some(head) => Some(head),
            None => self.next_head().await,
        };
        while let Some(head) = next {
            match self.exchange(&head).await {
                Ok(Flow::KeepAlive) => next = self.next_head().await,
                Ok(Flow::Close) => break,
                Err(Stop::Refuse(refusal)) => {
                    self.refuse(&refusal).await;
                    return;
                }
                Err(Stop::Abort(reason)) => {
                    self.log.error = Some(reason);
                    break;
                }
            }
        }
        let _ = self.client.get_mut().shutdown().await;
    }

    /// The next request on the connection, `None` once it ends.
    async fn next_head(&mut self) -> Option<RequestHead> {
        match self.client.read_request_head(KEEP_ALIVE_IDLE, REQUEST_HEAD_TIMEOUT).await {
            Ok(head) => head,
            // Ambiguous framing (Content-Length with Transfer-Encoding, two
            // lengths...) is refused by the parser as InvalidData.
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                self.log.requests += 1;
                self.refuse(&Refusal::bad_request(error.to_string())).await;
                None
            }
            // An idle keep-alive connection ends quietly.
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut && self.client.buffered().is_empty() => None,
            Err(error) => {
                self.log.error = Some(error.to_string());
                None
            }
        }
    }

    async fn refuse(&mut self, refusal: &Refusal) {
        self.log.last_status = Some(refusal.status);
        self.log.error = Some(format!("{}: {}", refusal.kind, refusal.message));
        self.log.bytes_down += write_refusal(self.client.get_mut(), refusal).await;
    }

    async fn exchange(&mut self, head: &RequestHead) -> Result<Flow, Stop> {
        self.log.requests += 1;
        let prepared = self.prepare(head).await?;
        let answer = self.send(&prepared).await?;
        Ok(self.relay(&prepared, &answer).await)
    }

    async fn prepare(&mut self, head: &RequestHead) -> Result<Prepared, Stop> {
        if head.version != 1 {
            return Err(Refusal::bad_request("inference.local speaks HTTP/1.1 only").into());
        }
        let is_inference_host =
            matches!(&head.authority, Some(authority) if authority.host == Host::Name(INFERENCE_HOST.into()));
        if !is_inference_host {
            let host = head.authority.as_ref().map_or_else(|| "(none)".into(), |authority| authority.host.to_string());
            return Err(Refusal::new(
                403,
                "forbidden",
                format!("this connection serves {INFERENCE_HOST} only, not {host}"),
            )
            .into());
        }
        // inference.local sends the routed provider's own credential: a
        // placeholder of `--credentials` belongs to no request here.
        let reason = "inference.local is bound to no credential provider";
        if let Err(refusal) = check_unbound(head, INFERENCE_HOST, reason) {
            return Err(
                Refusal::new(refusal.status, refusal.kind, format!("{}: {}", refusal.detail, refusal.reason)).into()
            );
        }
        // Absolute-form (explicit proxy) targets become origin-form here.
        let target = head.origin_form_target();
        let path = target.split('?').next().unwrap_or_default();
        let Some(endpoint) = Endpoint::recognise(&head.method, path) else {
            return Err(Refusal::new(
                403,
                "forbidden",
                format!("{} {path} is not an inference endpoint served by {INFERENCE_HOST}", head.method),
            )
            .into());
        };
        self.log.endpoint = Some(endpoint.name());
        let Some((route, provider)) = self.inference.routed_provider() else {
            return Err(Refusal::no_route().into());
        };
        self.log.provider = Some(route.provider.clone());
        self.log.model = Some(route.model.clone());
        if let Some(api) = endpoint.api().filter(|&api| api != provider.kind.api()) {
            return Err(Refusal::new(
                400,
                "protocol_mismatch",
                format!(
                    "{} is {api}, but the routed provider '{}' (type {}) speaks {}",
                    endpoint.name(),
                    provider.name,
                    provider.kind,
                    provider.kind.api()
                ),
            )
            .into());
        }
        let secret = provider.credential.read().map_err(|reason| {
            Refusal::new(503, "credential_unavailable", format!("provider '{}' credential: {reason}", provider.name))
        })?;
        let body = if endpoint.has_model_body() {
            let body = self.read_body(head).await?;
            Some(rewrite_model(&body, &route.model).map_err(Refusal::bad_request)?)
        } else {
            if has_request_body(head) {
                return Err(Refusal::bad_request(format!("{} takes no request body", endpoint.name())).into());
            }
            None
        };
        let wire = upstream_request(&provider, &head.method, &target, &head.headers, body.as_deref(), &secret);
        Ok(Prepared {
            provider,
            method: head.method.clone(),
            wire,
            client_close: wants_close(head.version, &head.headers),
        })
    }

    /// The whole request body, de-chunked, within `max_request_body`.
    async fn read_body(&mut self, head: &RequestHead) -> Result<Vec<u8>, Stop> {
        let limits = self.inference.limits;
        let max = limits.max_request_body;
        let too_large = || Refusal::new(413, "request_too_large", format!("the request body exceeds {max} bytes"));
        let framing = request_framing(head);
        if let BodyFraming::Length(length) = framing {
            if length > max {
                return Err(too_large().into());
            }
        }
        // Every check the head allows is passed: the client may send the body.
        self.log.bytes_down += continue_before_reading(self.client.get_mut(), head)
            .await
            .map_err(|error| Stop::Abort(format!("writing 100 Continue failed: {error}")))?;
        let mut source = BodySource::new(framing);
        let mut body = Vec::new();
        loop {
            match source.next(&mut self.client, limits.stream_idle_timeout).await {
                Ok(Piece::Data(data)) => {
                    if (body.len() + data.len()) as u64 > max {
                        return Err(too_large().into());
                    }
                    body.extend_from_slice(&data);
                }
                Ok(Piece::End { .. }) => return Ok(body),
                Err(BodyError::Idle(idle)) => {
                    return Err(
                        Refusal::new(408, "request_timeout", format!("no request body bytes for {idle:?}")).into()
                    )
                }
                Err(BodyError::Malformed(reason)) => return Err(Refusal::bad_request(reason).into()),
                Err(BodyError::Closed) => return Err(Stop::Abort("client closed inside the request body".into())),
                Err(BodyError::Io(error)) => {
                    return Err(Stop::Abort(format!("reading the request body failed: {error}")))
                }
            }
        }
    }

    /// Sends the request and returns the final response head. A kept-alive
    /// provider connection that turns out closed is replaced once: the
    /// provider may close idle connections at any time.
    async fn send(&mut self, prepared: &Prepared) -> Result<Answer, Stop> {
        let reusable = matches!(&self.upstream, Some(upstream) if Arc::ptr_eq(&upstream.provider, &prepared.provider));
        if !reusable {
            self.connect(&prepared.provider).await?;
        }
        match self.try_send(prepared).await {
            Err(SendError::Gone(_)) if reusable => {
                self.connect(&prepared.provider).await?;
                self.try_send(prepared).await.map_err(|error| error.refusal(&prepared.provider).into())
            }
            result => result.map_err(|error| error.refusal(&prepared.provider).into()),
        }
    }

    async fn connect(&mut self, provider: &Arc<Provider>) -> Result<(), Refusal> {
        self.upstream = None;
        let limit = self.inference.limits.connect_timeout;
        let stream = provider.connector.connect(limit, self.dns).await.map_err(|error| match error {
            ConnectError::Timeout(limit) => Refusal::new(
                504,
                "upstream_timeout",
                format!("provider '{}' ({}) not reached within {limit:?}", provider.name, provider.base_url),
            ),
            ConnectError::Failed(reason) => {
                Refusal::new(502, "upstream_unreachable", format!("provider '{}': {reason}", provider.name))
            }
        })?;
        self.upstream = Some(Upstream { provider: provider.clone(), reader: HeadReader::new(stream) });
        Ok(())
    }

    /// Writes the request while reading the provider's answer, so an early
    /// response (a 401 or 413 before the body is read) is not held back by
    /// a body the provider does not read; interim responses other than 100
    /// (the client had the agent's) go to the client as they arrive.
    async fn try_send(&mut self, prepared: &Prepared) -> Result<Answer, SendError> {
        let response_timeout = self.inference.limits.response_timeout;
        // Taken while in use: any failure below leaves no connection behind.
        let Some(mut upstream) = self.upstream.take() else {
            return Err(SendError::Failed("no provider connection".into()));
        };
        let answer = {
            let mut split = upstream.reader.split();
            let writer = &mut split.writer;
            let mut sending = pin!(async {
                writer.write_all(&prepared.wire).await?;
                writer.flush().await
            });
            let mut sent: Option<std::io::Result<()>> = None;
            let mut interim_responses = 0;
            loop {
                let response = tokio::select! {
                    biased;
                    result = &mut sending, if sent.is_none() => {
                        if result.is_ok() {
                            self.log.bytes_up += prepared.wire.len() as u64;
                        }
                        sent = Some(result);
                        continue;
                    }
                    response = split.reader.read_response_head(response_timeout) => response,
                };
                let response = match response {
                    Ok(response) => response,
                    Err(error) => {
                        let nothing_received = split.reader.buffered().is_empty();
                        // A reused connection the provider had closed fails the write first.
                        let gone = match &sent {
                            Some(Err(write_error)) => is_connection_gone(write_error),
                            _ => is_connection_gone(&error),
                        };
                        return Err(match error.kind() {
                            std::io::ErrorKind::TimedOut => SendError::Timeout(response_timeout),
                            _ if nothing_received && gone => SendError::Gone(error.to_string()),
                            _ => SendError::Failed(error.to_string()),
                        });
                    }
                };
                match response.status {
                    // Nothing asked for a switch; a provider that does is broken.
                    101 => break None,
                    100..=199 if interim_responses == MAX_INTERIM_RESPONSES => break None,
                    100..=199 => {
                        interim_responses += 1;
                        if response.status != 100 {
                            self.relay_interim(&response).await?;
                        }
                    }
                    _ => break Some(Answer { head: response, request_sent: matches!(sent, Some(Ok(()))) }),
                }
            }
        };
        let Some(answer) = answer else {
            return Err(SendError::Failed("no final response: too many interim responses, or a 101".into()));
        };
        self.upstream = Some(upstream);
        Ok(answer)
    }

    async fn relay_interim(&mut self, response: &ResponseHead) -> Result<(), SendError> {
        let head = forward_response_head(response, false, VIA);
        let written = async {
            self.client.get_mut().write_all(&head).await?;
            self.client.get_mut().flush().await
        };
        written.await.map_err(|error| SendError::Failed(format!("writing to the client failed: {error}")))?;
        self.log.bytes_down += head.len() as u64;
        Ok(())
    }

    /// Streams the response to the client; whether the connection goes on.
    async fn relay(&mut self, prepared: &Prepared, answer: &Answer) -> Flow {
        let response = &answer.head;
        let Some(mut upstream) = self.upstream.take() else {
            return Flow::Close;
        };
        let framing = response_framing(&prepared.method, response);
        let close = prepared.client_close || framing == BodyFraming::UntilClose;
        let head = forward_response_head(response, close, VIA);
        self.log.last_status = Some(response.status);
        if let Err(error) = self.client.get_mut().write_all(&head).await {
            self.log.error = Some(format!("writing to the client failed: {error}"));
            return Flow::Close;
        }
        self.log.bytes_down += head.len() as u64;
        let relayed = relay_body(
            &mut upstream.reader,
            self.client.get_mut(),
            framing,
            is_event_stream(response),
            &self.inference.limits,
        )
        .await;
        self.log.bytes_down += relayed.bytes;
        match relayed.end {
            StreamEnd::Complete => {
                let provider_closes =
                    framing == BodyFraming::UntilClose || wants_close(response.version, &response.headers);
                // A request cut short by an early response leaves the connection mid-message.
                if !provider_closes && answer.request_sent {
                    self.upstream = Some(upstream);
                }
                if close {
                    Flow::Close
                } else {
                    Flow::KeepAlive
                }
            }
            StreamEnd::Failed { kind, message, notified } => {
                let outcome = if notified { "ended with an error event" } else { "connection closed" };
                self.log.error = Some(format!("{kind}: {message} ({outcome})"));
                Flow::Close
            }
            StreamEnd::ClientGone(reason) => {
                self.log.error = Some(format!("writing to the client failed: {reason}"));
                Flow::Close
            }
        }
    }
}

/// The provider's final response head.
struct Answer {
    head: ResponseHead,
    /// The whole request went out before it: the connection can carry the next one.
    request_sent: bool,
}

enum SendError {
    /// The connection was closed under us before any response byte.
    Gone(String),
    Timeout(Duration),
    Failed(String),
}

impl SendError {
    fn refusal(self, provider: &Provider) -> Refusal {
        match self {
            SendError::Timeout(limit) => Refusal::new(
                504,
                "upstream_timeout",
                format!("provider '{}' sent no response within {limit:?}", provider.name),
            ),
            SendError::Gone(reason) | SendError::Failed(reason) => {
                Refusal::new(502, "upstream_failed", format!("provider '{}': {reason}", provider.name))
            }
        }
    }
}

/// Sets the top-level `model` of a JSON object body, adding it when absent:
/// requests for every served endpoint need one, and the client's choice
/// never counts. Key order is not kept (serde_json sorts object keys).
fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, String> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|error| format!("the request body is not valid JSON: {error}"))?;
    let Some(object) = value.as_object_mut() else {
        return Err("the request body is not a JSON object".into());
    };
    object.insert("model".into(), Value::String(model.into()));
    serde_json::to_vec(&value).map_err(|error| format!("re-serialising the request body failed: {error}"))
}

/// The request as the provider gets it: path under the base_url's prefix,
/// Host and credential of the provider, the API's default headers and the
/// configured ones unless the client sent the same (kept) header, and the
/// client's headers reduced to what the provider type keeps.
fn upstream_request(
    provider: &Provider,
    method: &str,
    target: &str,
    client_headers: &[(String, Vec<u8>)],
    body: Option<&[u8]>,
    secret: &Secret,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + body.map_or(0, <[u8]>::len));
    let mut field = |name: &[u8], value: &[u8]| {
        for part in [name, b": ", value, b"\r\n"] {
            out.extend_from_slice(part);
        }
    };
    let kept: Vec<&(String, Vec<u8>)> =
        client_headers.iter().filter(|(name, _)| provider.kind.keeps_client_header(name)).collect();
    let client_sent = |name: &str| kept.iter().any(|(kept_name, _)| kept_name.eq_ignore_ascii_case(name));
    let request_line = format!("{method} {}{target} HTTP/1.1\r\n", provider.base_url.path_prefix);
    field(b"Host", provider.base_url.host_header.as_bytes());
    let (auth_name, auth_value) = provider.kind.auth_header(secret);
    field(auth_name.as_bytes(), auth_value.as_bytes());
    let defaults = provider.kind.default_headers().iter().map(|&(name, value)| (name, value));
    let configured = provider.headers.iter().map(|(name, value)| (name.as_str(), value.as_str()));
    for (name, value) in defaults.chain(configured) {
        if !client_sent(name) {
            field(name.as_bytes(), value.as_bytes());
        }
    }
    for (name, value) in &kept {
        field(name.as_bytes(), value);
    }
    if let Some(body) = body {
        field(b"Content-Type", b"application/json");
        field(b"Content-Length", body.len().to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    [request_line.into_bytes(), out].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_replaced_or_added_and_only_objects_pass() {
        let rewritten =
            rewrite_model(br#"{"model":"whatever","messages":[{"role":"user","content":"hi"}]}"#, "m1").unwrap();
        let value: Value = serde_json::from_slice(&rewritten).unwrap();
        assert_eq!(value["model"], "m1");
        assert_eq!(value["messages"][0]["content"], "hi");
        let added: Value = serde_json::from_slice(&rewrite_model(br#"{"input":"x"}"#, "m2").unwrap()).unwrap();
        assert_eq!(added, serde_json::json!({"input": "x", "model": "m2"}));
        assert!(rewrite_model(b"[1,2]", "m").unwrap_err().contains("not a JSON object"));
        assert!(rewrite_model(b"", "m").unwrap_err().contains("not valid JSON"));
        assert!(rewrite_model(br#"{"model":"a""#, "m").unwrap_err().contains("not valid JSON"));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(rewrite_model(deep.as_bytes(), "m").is_err(), "nesting is bounded, not a stack overflow");
    }
}
