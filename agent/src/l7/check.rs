//! The L7 step of one request, written once for every room: the target
//! canonicalised, the endpoint whose `path` selects it found, the body read
//! if its room decides on it, each call decided by the current policy (one
//! log line each), the credential applied, and a refusal in the room's own
//! terms.

use std::{future::Future, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use super::{
    body,
    grpc::{self, GrpcCall},
    log::{describe_call, log_request, GrpcLine, Line},
    room,
    target::Target,
    websocket, Call, Cause, Classified, Refusal, Room,
};
use crate::{
    conn::{
        refuse::{self, Response},
        CloseLog, Context, Origin,
    },
    credentials::CredentialedHead,
    http1::{self, forward::wants_close, list_elements, BodyFraming, HeadReader, RequestHead, TargetForm},
    policy::{HttpRequest, Inspection, Message, RequestDecision},
    wire::path::{canonicalize, CanonicalTarget},
};

pub enum Checked {
    Allowed(Box<Allowed>),
    /// A refusal went out; `close`: the connection ended with it.
    Denied {
        close: bool,
    },
}

/// What the request decision made of one request, before any byte of an
/// answer: HTTP/1 and each HTTP/2 stream answer it in their own framing.
pub enum Decided {
    Allowed(Box<Allowed>),
    Refused(Box<Refused>),
}

/// A request to forward.
pub struct Allowed {
    /// `head` with the bound provider's credential in it, if any.
    pub credential: Option<CredentialedHead>,
    /// The body, when the agent read it to decide it: sent in place of the
    /// client's (whose bytes are consumed), with a `Content-Length`.
    pub body: Option<Zeroizing<Vec<u8>>>,
    /// The endpoint that read the request: after a 101, its messages are
    /// decided by it.
    pub inspection: Inspection,
    /// A WebSocket upgrade whose messages will be inspected.
    pub websocket: Option<Upgrade>,
    /// The line of a request that is one call, for the caller to log (a
    /// batch's lines are logged already).
    pub line: Option<Line>,
}

/// A refused request: the room's answer, and what a gRPC refusal says.
pub struct Refused {
    pub response: Response,
    pub status: u16,
    /// Detail and reason in one line, for `grpc-message`.
    pub message: String,
    /// The body was read whole: nothing of the request is left unread.
    pub body_read: bool,
    /// The body was cut off while being read: the connection cannot go on.
    pub broken: bool,
}

/// An upgrade to an endpoint that inspects WebSocket messages.
pub struct Upgrade {
    /// The client's permessage-deflate offers, as forwarded.
    pub offer: websocket::Offer,
    /// Its canonical path and query, which its messages are decided against.
    pub target: CanonicalTarget,
    /// The endpoint's provider, for `websocket_credential_rewrite`.
    pub credential_provider: Option<String>,
}

/// Where a request's body comes from, for a decision that reads it whole:
/// an HTTP/1 connection, or an HTTP/2 stream.
pub trait RequestBody {
    /// Whether the request carries a body.
    fn has_body(&self, head: &RequestHead) -> bool;

    /// Reads the body whole, at most `limit` bytes, each read waiting at
    /// most `idle`; then frames `head` for forwarding it ([`body::reframe`]).
    fn read_whole(
        &mut self,
        head: &mut RequestHead,
        limit: usize,
        idle: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, body::ReadError>>;
}

impl<C: AsyncRead + AsyncWrite + Unpin> RequestBody for HeadReader<C> {
    fn has_body(&self, head: &RequestHead) -> bool {
        has_body(head)
    }

    async fn read_whole(
        &mut self,
        head: &mut RequestHead,
        limit: usize,
        idle: Duration,
    ) -> Result<Vec<u8>, body::ReadError> {
        body::read(self, head, limit, idle).await
    }
}

/// Decides one HTTP/1 request on a connection to `target`. `head` is
/// rewritten to forward its canonical target. A refused request leaves a
/// keep-alive connection open when its body was read whole or it had none;
/// else the connection closes (an unread body is never read, nor
/// forwarded).
pub async fn check_request<C>(
    client: &mut HeadReader<C>,
    head: &mut RequestHead,
    target: &Target,
    origin: &Origin,
    context: &Context,
    log: &mut CloseLog,
) -> Checked
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(reason) = refuse_h2c(head) {
        return refuse(client.get_mut(), head, &rejected(head, target, origin, context, log, reason).response, false)
            .await;
    }
    match decide_request(client, head, target, origin, context, log).await {
        Decided::Allowed(mut allowed) => {
            if let Some(line) = allowed.line.take() {
                line.emit(origin, target, None, None);
            }
            Checked::Allowed(allowed)
        }
        Decided::Refused(refused) if refused.broken => {
            let _ = refuse::refused(client.get_mut(), &refused.response, true).await;
            Checked::Denied { close: true }
        }
        Decided::Refused(refused) => refuse(client.get_mut(), head, &refused.response, refused.body_read).await,
    }
}

/// HTTP/2 by `Upgrade: h2c` would carry requests past the decision (the
/// origin's answer to them is a raw stream): refused, whatever the rules.
fn refuse_h2c(head: &RequestHead) -> Result<(), String> {
    if list_elements(&head.headers, "upgrade").any(|protocol| protocol.eq_ignore_ascii_case(b"h2c")) {
        return Err(format!(
            "{} {} refused: `Upgrade: h2c` (HTTP/2 in clear text) is not served on inspected paths; \
             use HTTP/1.1, or HTTP/2 over TLS",
            head.method,
            head.origin_form_target()
        ));
    }
    Ok(())
}

/// The request refused before any rule for `reason`, logged as such.
fn rejected(
    head: &RequestHead,
    target: &Target,
    origin: &Origin,
    context: &Context,
    log: &mut CloseLog,
    reason: String,
) -> Refused {
    let decision = Decision { target, origin, context, grpc: None };
    let path = head.origin_form_target();
    decision.reject(head, &path, &super::rest::Rest, None, Cause::Invalid, reason, false, log)
}

/// The request decision of one request on a connection to `target`,
/// whatever its framing: canonical target, the endpoint's room, its body
/// read from `source` if the room or a rewrite needs it, each call decided
/// (denials logged), the credential applied. `head` is rewritten to
/// forward its canonical target.
pub async fn decide_request<B: RequestBody>(
    source: &mut B,
    head: &mut RequestHead,
    target: &Target,
    origin: &Origin,
    context: &Context,
    log: &mut CloseLog,
) -> Decided {
    let decision = Decision { target, origin, context, grpc: None };
    let refused = |refused| Decided::Refused(Box::new(refused));
    let canonical = match canonicalize(&head.origin_form_target(), target.inspection.allow_encoded_slash) {
        Ok(canonical) => canonical,
        Err(reason) => {
            let reason = format!("{} {} refused: {reason}", head.method, head.origin_form_target());
            let path = head.origin_form_target();
            return refused(decision.reject(head, &path, &super::rest::Rest, None, Cause::Invalid, reason, false, log));
        }
    };
    let grpc = grpc::call(head, &canonical.path);
    let decision = Decision { grpc: grpc.as_ref(), ..decision };
    let (inspection, room) = reader(&target.inspection, &canonical.path);
    let mut read = None;
    if room.reads_body(head) || (inspection.messages.rewrite_body && source.has_body(head)) {
        let limit = if room.reads_body(head) { inspection.messages.max_body_bytes } else { body::MAX_REWRITTEN_BODY };
        match source.read_whole(head, limit, context.config.idle_timeout).await {
            Ok(bytes) => read = Some(bytes),
            Err(error) => {
                let (status, cause) = match error {
                    body::ReadError::TooLarge(_) => (413, Cause::Invalid),
                    body::ReadError::Unreadable(_) => (400, Cause::Unparsable),
                };
                let reason = error.to_string();
                let path = canonical.path.clone();
                return refused(decision.reject_with_status(head, &path, room, status, cause, reason, log));
            }
        }
    }
    let body_read = read.is_some();
    let classified = match room.classify(head, &canonical, read.as_deref().map_or(&[][..], |body| body), inspection) {
        Ok(classified) => classified,
        Err(rejected) => {
            let cause = if rejected.unparsable { Cause::Unparsable } else { Cause::Invalid };
            let path = canonical.path.clone();
            return refused(decision.reject(head, &path, room, None, cause, rejected.reason, body_read, log));
        }
    };
    let single = classified.calls.len() == 1;
    let decided = decide_calls(&classified, |call| {
        let (generation, verdict) = decision.decide(head, &canonical, &call.message);
        log.requests += 1;
        if verdict.audit {
            log.audit = verdict.reason.clone();
        }
        // A lone call's line waits for its credential.
        if !single || !verdict.allow {
            let status = (!verdict.allow).then_some(403);
            decision.log(&head.method, &canonical.path, call, generation, &verdict, None, status);
        }
        (generation, verdict)
    });
    let (generation, verdict) = match decided {
        Ok(allowed) => allowed,
        Err((call, verdict)) => {
            return refused(decision.deny(head, &canonical, room, &classified, call, verdict, body_read, log));
        }
    };
    head.target = canonical.origin_form();
    head.form = TargetForm::Origin;
    let inspects_messages = inspection.protocol == "websocket" || inspection.messages.rewrite_websocket;
    let websocket = (inspects_messages && is_websocket_upgrade(head)).then(|| Upgrade {
        offer: websocket::offer(head),
        target: canonical.clone(),
        credential_provider: verdict.credential_provider.clone(),
    });
    let host = target.name.as_str();
    let provider = verdict.credential_provider.as_deref();
    // The body first: the head is then framed for the body as rewritten.
    let rewritten = match (&read, inspection.messages.rewrite_body) {
        (Some(body), true) => context.credentials.rewrite_body(head, body, provider, host, target.tls).map(|body| {
            body::reframe(head, body.len());
            Some(body)
        }),
        _ => Ok(None),
    };
    let applied = rewritten.and_then(|rewritten| {
        let credential = context.credentials.apply(head, provider, host, target.tls)?;
        Ok((credential, rewritten))
    });
    let (credential, rewritten) = match applied {
        Ok(applied) => applied,
        Err(refusal) => {
            let reason = Some(format!("{}: {}", refusal.detail, refusal.reason));
            let denied = RequestDecision { allow: false, audit: false, reason, ..verdict };
            let call = &classified.calls[0];
            let provider = Some(refusal.provider.as_str());
            let status = Some(refusal.status);
            decision.log(&head.method, &canonical.path, call, generation, &denied, provider, status);
            log.credential_refused(&refusal, origin, host);
            log.requests_denied += 1;
            let refusal = Refusal {
                status: refusal.status,
                kind: refusal.kind,
                detail: &refusal.detail,
                reason: &refusal.reason,
                policy: denied.policy.as_deref(),
                rule: None,
                cause: Cause::Credential,
            };
            return refused(Refused::new(room, &refusal, Some(&classified), body_read));
        }
    };
    let line = single.then(|| Line {
        method: head.method.clone(),
        path: canonical.path.clone(),
        call: classified.calls.into_iter().next().expect("one call"),
        generation,
        decision: verdict,
        credential: credential.as_ref().map(|credential| credential.provider().to_owned()),
    });
    let body = rewritten.or_else(|| read.map(Zeroizing::new));
    Decided::Allowed(Box::new(Allowed { credential, body, inspection: inspection.clone(), websocket, line }))
}

impl Refused {
    /// `room`'s answer to `refusal`.
    fn new(room: &dyn Room, refusal: &Refusal, classified: Option<&Classified>, body_read: bool) -> Self {
        let message = match (refusal.policy, refusal.rule) {
            (Some(policy), Some(rule)) if !refusal.reason.contains(policy) => {
                format!("{}: {} (rule {rule} of policy '{policy}')", refusal.detail, refusal.reason)
            }
            _ => format!("{}: {}", refusal.detail, refusal.reason),
        };
        Refused {
            response: room.refuse(refusal, classified),
            status: refusal.status,
            message: format!("sandbox-egress: {message}"),
            body_read,
            broken: false,
        }
    }
}

/// The endpoint that reads a request for `path`, and its room: with several
/// inspected endpoints, the one whose `path` selects it most specifically;
/// with none selecting it, REST (the rules then deny it).
pub fn reader<'a>(inspection: &'a Inspection, path: &str) -> (&'a Inspection, &'static dyn Room) {
    match inspection.select(path) {
        Some(selected) => (selected, room(selected)),
        None => (inspection, &super::rest::Rest),
    }
}

/// What the endpoint's room reads of a request whose body (if its room
/// reads one) is `body`, as the live session classifies it: the canonical
/// target, the endpoint that read it, and its calls; `Err`, the reason it
/// is refused before any rule. For `policy eval` and the fuzz targets.
pub fn classify_request<'a>(
    inspection: &'a Inspection,
    head: &RequestHead,
    body: &[u8],
) -> Result<(CanonicalTarget, &'a Inspection, Classified), String> {
    let canonical = canonicalize(&head.origin_form_target(), inspection.allow_encoded_slash)?;
    let (selected, room) = reader(inspection, &canonical.path);
    let classified = room.classify(head, &canonical, body, selected).map_err(|rejected| rejected.reason)?;
    Ok((canonical, selected, classified))
}

/// Decides each call in order with `decide` (generation, verdict): the
/// first allowed verdict, or the first call denied and its verdict (the
/// request is then refused whole). Audited calls count as allowed.
pub fn decide_calls<'a>(
    classified: &'a Classified,
    mut decide: impl FnMut(&'a Call) -> (u64, RequestDecision),
) -> Result<(u64, RequestDecision), (&'a Call, RequestDecision)> {
    let mut first = None;
    for call in &classified.calls {
        let (generation, verdict) = decide(call);
        if !verdict.allow {
            return Err((call, verdict));
        }
        first.get_or_insert((generation, verdict));
    }
    Ok(first.expect("a room classifies at least one call"))
}

/// What every refusal and decision of one request needs.
#[derive(Clone, Copy)]
struct Decision<'a> {
    target: &'a Target,
    origin: &'a Origin,
    context: &'a Context,
    /// The call, for a gRPC request.
    grpc: Option<&'a GrpcCall>,
}

impl Decision<'_> {
    fn decide(&self, head: &RequestHead, canonical: &CanonicalTarget, message: &Message) -> (u64, RequestDecision) {
        let http = HttpRequest {
            method: &head.method,
            path: &canonical.path,
            query: &canonical.query,
            message,
            via_gate: self.target.via_gate,
        };
        self.context.decider.request(self.origin, &self.target.name, self.target.upstream, &http)
    }

    /// One call's line; a refused gRPC call's names the `grpc-status` it gets.
    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        method: &str,
        path: &str,
        call: &Call,
        generation: u64,
        decision: &RequestDecision,
        credential: Option<&str>,
        status: Option<u16>,
    ) {
        let grpc = self.grpc.map(|call| GrpcLine { call, status: status.map(grpc::status_for) });
        log_request(self.origin, self.target, method, path, call, generation, decision, credential, status, grpc);
    }

    /// A call the rules deny: the whole request is refused.
    #[allow(clippy::too_many_arguments)]
    fn deny(
        &self,
        head: &RequestHead,
        canonical: &CanonicalTarget,
        room: &dyn Room,
        classified: &Classified,
        call: &Call,
        verdict: RequestDecision,
        body_read: bool,
        log: &mut CloseLog,
    ) -> Refused {
        log.requests_denied += 1;
        if log.verdict.is_empty() {
            log.verdict = "denied";
            log.denial = Some("policy_denied");
        }
        let mut detail = verdict
            .reason
            .clone()
            .unwrap_or_else(|| format!("{} {} not permitted by policy", head.method, canonical.path));
        if let Some(what) = describe_call(&call.message) {
            detail = format!("{detail}: {what}");
        }
        let reason = match (&verdict.policy, &verdict.rule) {
            (Some(policy), Some(rule)) => format!("decided by {rule} of policy '{policy}'"),
            _ => "no inspected endpoint allows the request".to_owned(),
        };
        log.reason = Some(detail.clone());
        log.request_denied(&head.method, &canonical.path, describe_call(&call.message));
        let refusal = Refusal {
            status: 403,
            kind: "policy_denied",
            detail: &detail,
            reason: &reason,
            policy: verdict.policy.as_deref(),
            rule: verdict.rule.as_deref(),
            cause: Cause::Policy,
        };
        Refused::new(room, &refusal, Some(classified), body_read)
    }

    /// A request refused before any rule: it could not be read as its
    /// endpoint's protocol (even under audit).
    #[allow(clippy::too_many_arguments)]
    fn reject(
        &self,
        head: &RequestHead,
        path: &str,
        room: &dyn Room,
        classified: Option<&Classified>,
        cause: Cause,
        reason: String,
        body_read: bool,
        log: &mut CloseLog,
    ) -> Refused {
        self.log_rejected(head, path, &reason, 403, log);
        let refusal = Refusal {
            status: 403,
            kind: "policy_denied",
            detail: &reason,
            reason: "refused before the rules: the request cannot be decided as its endpoint's protocol",
            policy: None,
            rule: None,
            cause,
        };
        Refused::new(room, &refusal, classified, body_read)
    }

    /// A body that could not be read whole (too large, malformed): the
    /// connection closes, the rest of the body unread.
    #[allow(clippy::too_many_arguments)]
    fn reject_with_status(
        &self,
        head: &RequestHead,
        path: &str,
        room: &dyn Room,
        status: u16,
        cause: Cause,
        reason: String,
        log: &mut CloseLog,
    ) -> Refused {
        self.log_rejected(head, path, &reason, status, log);
        let refusal = Refusal {
            status,
            kind: "policy_denied",
            detail: &reason,
            reason: "refused before the rules: the body cannot be read to decide it",
            policy: None,
            rule: None,
            cause,
        };
        Refused { broken: true, ..Refused::new(room, &refusal, None, false) }
    }

    fn log_rejected(&self, head: &RequestHead, path: &str, reason: &str, status: u16, log: &mut CloseLog) {
        let generation = self.context.decider.policies.current().generation;
        let refused = RequestDecision::denied(Some(reason.to_owned()));
        let call = Call { message: Message::Http, id: None };
        self.log(&head.method, path, &call, generation, &refused, None, Some(status));
        log.requests += 1;
        log.requests_denied += 1;
        if log.verdict.is_empty() {
            log.verdict = "denied";
            log.denial = Some("policy_denied");
        }
        log.reason = Some(reason.to_owned());
    }
}

/// A request to switch to WebSocket (`Upgrade: websocket`).
fn is_websocket_upgrade(head: &RequestHead) -> bool {
    list_elements(&head.headers, "upgrade").any(|protocol| protocol.eq_ignore_ascii_case(b"websocket"))
}

/// Whether the request carries a body.
fn has_body(head: &RequestHead) -> bool {
    !matches!(http1::request_framing(head), BodyFraming::Empty | BodyFraming::Length(0))
}

/// Answers a refused request; the connection stays open if the request had
/// no body or the agent read it whole, and the client did not ask to close.
async fn refuse<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    head: &RequestHead,
    response: &refuse::Response,
    body_read: bool,
) -> Checked {
    let unread_body = has_body(head) && !body_read;
    let close = unread_body || wants_close(head.version, &head.headers);
    let written = refuse::refused(client, response, close).await;
    if !written {
        let _ = client.shutdown().await;
    }
    if unread_body {
        // A client sending the body without waiting must still read the refusal.
        http1::linger(client).await;
    }
    Checked::Denied { close: close || !written }
}
