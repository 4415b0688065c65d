//! The L7 step of one request, written once for every room: the target
//! canonicalised, the endpoint whose `path` selects it found, the body read
//! if its room decides on it, each call decided by the current policy (one
//! log line each), the credential applied, and a refusal in the room's own
//! terms.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use super::{
    body,
    log::{describe_call, log_request},
    room,
    target::Target,
    websocket, Call, Cause, Classified, Refusal, Room,
};
use crate::{
    conn::{refuse, CloseLog, Context, Origin},
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

/// Decides one request on a connection to `target`. `head` is rewritten to
/// forward its canonical target. A refused request leaves a keep-alive
/// connection open when its body was read whole or it had none; else the
/// connection closes (an unread body is never read, nor forwarded).
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
    let decision = Decision { target, origin, context };
    let canonical = match canonicalize(&head.origin_form_target(), target.inspection.allow_encoded_slash) {
        Ok(canonical) => canonical,
        Err(reason) => {
            let reason = format!("{} {} refused: {reason}", head.method, head.origin_form_target());
            let path = head.origin_form_target();
            return decision
                .reject(client, head, &path, &super::rest::Rest, None, Cause::Invalid, reason, false, log)
                .await;
        }
    };
    let (inspection, room) = reader(&target.inspection, &canonical.path);
    let mut read = None;
    if room.reads_body(head) || (inspection.messages.rewrite_body && has_body(head)) {
        let limit = if room.reads_body(head) { inspection.messages.max_body_bytes } else { body::MAX_REWRITTEN_BODY };
        match body::read(client, head, limit, context.config.idle_timeout).await {
            Ok(bytes) => read = Some(bytes),
            Err(error) => {
                let (status, cause) = match error {
                    body::ReadError::TooLarge(_) => (413, Cause::Invalid),
                    body::ReadError::Unreadable(_) => (400, Cause::Unparsable),
                };
                let reason = error.to_string();
                let path = canonical.path.clone();
                let response_status = status;
                return decision
                    .reject_with_status(client, head, &path, room, response_status, cause, reason, log)
                    .await;
            }
        }
    }
    let classified = match room.classify(head, &canonical, read.as_deref().map_or(&[][..], |body| body), inspection) {
        Ok(classified) => classified,
        Err(rejected) => {
            let cause = if rejected.unparsable { Cause::Unparsable } else { Cause::Invalid };
            let path = canonical.path.clone();
            return decision.reject(client, head, &path, room, None, cause, rejected.reason, read.is_some(), log).await;
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
            log_request(origin, target, &head.method, &canonical.path, call, generation, &verdict, None, status);
        }
        (generation, verdict)
    });
    let (generation, verdict) = match decided {
        Ok(allowed) => allowed,
        Err((call, verdict)) => {
            return decision.deny(client, head, &canonical, room, &classified, call, verdict, read.is_some(), log).await
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
            let refused = RequestDecision { allow: false, audit: false, reason, ..verdict };
            let call = &classified.calls[0];
            let provider = Some(refusal.provider.as_str());
            let status = Some(refusal.status);
            log_request(origin, target, &head.method, &canonical.path, call, generation, &refused, provider, status);
            log.credential_refused(&refusal, origin, host);
            log.requests_denied += 1;
            let response = room.refuse(
                &Refusal {
                    status: refusal.status,
                    kind: refusal.kind,
                    detail: &refusal.detail,
                    reason: &refusal.reason,
                    policy: refused.policy.as_deref(),
                    rule: None,
                    cause: Cause::Credential,
                },
                Some(&classified),
            );
            return refuse(client.get_mut(), head, &response, read.is_some()).await;
        }
    };
    if single {
        let provider = credential.as_ref().map(CredentialedHead::provider);
        let call = &classified.calls[0];
        log_request(origin, target, &head.method, &canonical.path, call, generation, &verdict, provider, None);
    }
    let body = rewritten.or_else(|| read.map(Zeroizing::new));
    Checked::Allowed(Box::new(Allowed { credential, body, inspection: inspection.clone(), websocket }))
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
struct Decision<'a> {
    target: &'a Target,
    origin: &'a Origin,
    context: &'a Context,
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

    /// A call the rules deny: the whole request is refused.
    #[allow(clippy::too_many_arguments)]
    async fn deny<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut HeadReader<C>,
        head: &RequestHead,
        canonical: &CanonicalTarget,
        room: &dyn Room,
        classified: &Classified,
        call: &Call,
        verdict: RequestDecision,
        body_read: bool,
        log: &mut CloseLog,
    ) -> Checked {
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
        let response = room.refuse(
            &Refusal {
                status: 403,
                kind: "policy_denied",
                detail: &detail,
                reason: &reason,
                policy: verdict.policy.as_deref(),
                rule: verdict.rule.as_deref(),
                cause: Cause::Policy,
            },
            Some(classified),
        );
        refuse(client.get_mut(), head, &response, body_read).await
    }

    /// A request refused before any rule: it could not be read as its
    /// endpoint's protocol (even under audit).
    #[allow(clippy::too_many_arguments)]
    async fn reject<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut HeadReader<C>,
        head: &RequestHead,
        path: &str,
        room: &dyn Room,
        classified: Option<&Classified>,
        cause: Cause,
        reason: String,
        body_read: bool,
        log: &mut CloseLog,
    ) -> Checked {
        self.log_rejected(head, path, &reason, 403, log);
        let response = room.refuse(
            &Refusal {
                status: 403,
                kind: "policy_denied",
                detail: &reason,
                reason: "refused before the rules: the request cannot be decided as its endpoint's protocol",
                policy: None,
                rule: None,
                cause,
            },
            classified,
        );
        refuse(client.get_mut(), head, &response, body_read).await
    }

    /// A body that could not be read whole (too large, malformed): the
    /// connection closes, the rest of the body unread.
    #[allow(clippy::too_many_arguments)]
    async fn reject_with_status<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut HeadReader<C>,
        head: &RequestHead,
        path: &str,
        room: &dyn Room,
        status: u16,
        cause: Cause,
        reason: String,
        log: &mut CloseLog,
    ) -> Checked {
        self.log_rejected(head, path, &reason, status, log);
        let response = room.refuse(
            &Refusal {
                status,
                kind: "policy_denied",
                detail: &reason,
                reason: "refused before the rules: the body cannot be read to decide it",
                policy: None,
                rule: None,
                cause,
            },
            None,
        );
        let _ = refuse::refused(client.get_mut(), &response, true).await;
        Checked::Denied { close: true }
    }

    fn log_rejected(&self, head: &RequestHead, path: &str, reason: &str, status: u16, log: &mut CloseLog) {
        let generation = self.context.decider.policies.current().generation;
        let refused = RequestDecision::denied(Some(reason.to_owned()));
        let call = Call { message: Message::Http, id: None };
        log_request(self.origin, self.target, &head.method, path, &call, generation, &refused, None, Some(status));
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
