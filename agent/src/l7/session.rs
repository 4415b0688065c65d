//! Connections an inspected endpoint allowed, over HTTP/1: every request is
//! classified by its endpoint's room, decided on its own by the endpoint's
//! L7 rules, given its credential, logged, and only then sent upstream (to
//! the origin over TLS verified for its name when the client spoke TLS).

use std::net::SocketAddr;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use zeroize::Zeroizing;

use super::{
    exchange::{exchange, Exchanged, KEEP_ALIVE_IDLE, VIA},
    Refusal,
};
use crate::{
    conn::{
        connect_upstream,
        refuse::{self, bad_request, ErrorBody, Response},
        CloseLog, Context, Origin,
    },
    credentials::CredentialedHead,
    http1::{self, forward::wants_close, BodyFraming, HeadReader, RequestHead, TargetForm},
    policy::{HttpRequest, Inspection, RequestDecision},
    relay::{self, Prefill},
    tls::Io,
    wire::host::Host,
};

pub enum Checked {
    /// Forward the request: `head` as it is, or this head with the bound
    /// provider's credential in it.
    Allowed(Option<CredentialedHead>),
    /// A 403 (or a 502 for an unavailable credential) went out; `close`:
    /// the connection ended with it.
    Denied { close: bool },
}

/// The L7 step of one request on a connection to `target`: the request
/// target canonicalised (and `head` rewritten to forward it so), the request
/// decided by the current policy, the credential of the deciding endpoint's
/// provider applied (placeholders anywhere else refused), one log line, and
/// a JSON error for a refusal. A refused request without a body leaves a
/// keep-alive connection open; one with a body closes it (its body is never
/// read).
pub async fn check_request<W: AsyncWrite + Unpin>(
    client: &mut W,
    head: &mut RequestHead,
    target: &Target,
    origin: &Origin,
    context: &Context,
    log: &mut CloseLog,
) -> Checked {
    let Target { name: host, upstream: destination, inspection, .. } = target;
    let (host, destination) = (host.as_str(), *destination);
    let room = super::room(inspection);
    let (generation, decision, path) = match room.classify(head, inspection) {
        Ok(classified) => {
            let http = HttpRequest { method: &classified.method, path: &classified.path, query: &classified.query };
            let (generation, decision) = context.decider.request(origin, host, destination, &http);
            if decision.allow {
                head.target = classified.target;
                head.form = TargetForm::Origin;
            }
            (generation, decision, classified.path)
        }
        Err(reason) => {
            let generation = context.decider.policies.current().generation;
            (generation, RequestDecision::denied(Some(reason)), head.origin_form_target())
        }
    };
    let credential = if decision.allow {
        match context.credentials.apply(head, decision.credential_provider.as_deref(), host, target.tls) {
            Ok(credential) => credential,
            Err(refusal) => {
                let what = Request { method: &head.method, path: &path, generation };
                let reason = Some(format!("{}: {}", refusal.detail, refusal.reason));
                let refused = RequestDecision { allow: false, audit: false, reason, ..decision };
                log_request(origin, host, destination, &what, &refused, Some(&refusal.provider));
                log.credential_refused(&refusal, origin, host);
                log.requests += 1;
                log.requests_denied += 1;
                let response = room.refuse(&Refusal {
                    status: refusal.status,
                    kind: refusal.kind,
                    detail: &refusal.detail,
                    reason: &refusal.reason,
                    policy: refused.policy.as_deref(),
                    rule: None,
                });
                return refuse(client, head, &response).await;
            }
        }
    } else {
        None
    };
    let what = Request { method: &head.method, path: &path, generation };
    log_request(origin, host, destination, &what, &decision, credential.as_ref().map(CredentialedHead::provider));
    log.requests += 1;
    if decision.allow {
        if decision.audit {
            log.audit = decision.reason.clone();
        }
        return Checked::Allowed(credential);
    }
    log.requests_denied += 1;
    if log.verdict.is_empty() {
        log.verdict = "denied";
        log.denial = Some("policy_denied");
    }
    let detail = decision.reason.unwrap_or_else(|| format!("{} {path} not permitted by policy", head.method));
    let reason = match (&decision.policy, &decision.rule) {
        (Some(policy), Some(rule)) => format!("decided by {rule} of policy '{policy}'"),
        _ => "no inspected endpoint allows the request".to_owned(),
    };
    log.reason = Some(detail.clone());
    let response = room.refuse(&Refusal {
        status: 403,
        kind: "policy_denied",
        detail: &detail,
        reason: &reason,
        policy: decision.policy.as_deref(),
        rule: decision.rule.as_deref(),
    });
    refuse(client, head, &response).await
}

/// Answers a refused request; the connection stays open unless the request
/// has a body (never read) or the client asked to close.
async fn refuse<W: AsyncWrite + Unpin>(client: &mut W, head: &RequestHead, response: &Response) -> Checked {
    let has_body = !matches!(http1::request_framing(head), BodyFraming::Empty | BodyFraming::Length(0));
    let close = has_body || wants_close(head.version, &head.headers);
    let written = refuse::refused(client, response, close).await;
    Checked::Denied { close: close || !written }
}

/// What a request log line says of the request itself.
struct Request<'a> {
    method: &'a str,
    /// Canonical, placeholders as sent: never a secret.
    path: &'a str,
    generation: u64,
}

/// One line per request on an inspected connection; `credential`: the
/// provider whose credential it carried (or whose placeholder was refused).
fn log_request(
    origin: &Origin,
    host: &str,
    destination: SocketAddr,
    request: &Request,
    decision: &RequestDecision,
    credential: Option<&str>,
) {
    let Request { method, path, generation } = *request;
    let verdict = match (decision.allow, decision.audit) {
        (true, false) => "allowed",
        (true, true) => "audit",
        (false, _) => "denied",
    };
    tracing::info!(
        event = "request",
        verdict,
        method,
        path,
        host,
        destination = %destination,
        policy = decision.policy,
        rule = decision.rule,
        policy_generation = generation,
        reason = decision.reason,
        credential,
        pid = origin.pid,
        exe = origin.exe.as_ref().map(|exe| exe.display().to_string()),
        cgroup_id = origin.cgroup_id,
    );
}

/// Where an inspected connection's requests go: the address the policy
/// allowed, over TLS verified for `name` when the client spoke TLS (plain
/// HTTP decides each request's own upstream, and names it here per request).
pub struct Target {
    /// The name the connection was decided on (SNI, CONNECT host, or the
    /// name the sandbox resolved): requests must name it in Host.
    pub name: String,
    pub upstream: SocketAddr,
    pub inspection: Inspection,
    pub tls: bool,
}

/// Serves the HTTP requests of an inspected connection, one by one, on one
/// upstream connection made at the first allowed request. `buffered`:
/// request bytes already read (a CONNECT tunnel's first head).
pub async fn serve<C>(
    client: C,
    buffered: Vec<u8>,
    target: Target,
    mut preconnected: Option<TcpStream>,
    origin: &Origin,
    context: &Context,
    log: &mut CloseLog,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = HeadReader::with_buffered(client, buffered);
    let mut upstream: Option<HeadReader<Box<dyn Io>>> = None;
    loop {
        let mut head = match client.read_request_head(KEEP_ALIVE_IDLE, context.config.sniff.head_timeout).await {
            Ok(Some(head)) => head,
            // Closed, or idle between requests: a normal end.
            Ok(None) => return,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => return,
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                return bad_request(client.get_mut(), log, error.to_string()).await
            }
            Err(error) => {
                log.error = Some(error.to_string());
                return;
            }
        };
        if let Err(reason) = names_target(&head, &target) {
            log.verdict = "denied";
            log.reason = Some(reason.clone());
            let body = ErrorBody::new("host_mismatch", &head.target, &reason);
            return refuse::error(client.get_mut(), 403, &body).await;
        }
        let credential = match check_request(client.get_mut(), &mut head, &target, origin, context, log).await {
            Checked::Allowed(credential) => credential,
            Checked::Denied { close: true } => return,
            Checked::Denied { close: false } => continue,
        };
        let what = format!("{} {}", head.method, target.name);
        if upstream.is_none() {
            match connect(&target, preconnected.take(), context, log).await {
                Ok(stream) => upstream = Some(HeadReader::new(stream)),
                Err((status, kind, reason)) => {
                    return refuse::error(client.get_mut(), status, &ErrorBody::new(kind, &what, &reason)).await;
                }
            }
        }
        let up = upstream.as_mut().expect("connected above");
        // Wiped once sent, as the credentialed head is when dropped.
        let forwarded_head = Zeroizing::new(http1::forward_request_head(
            credential.as_ref().map_or(&head, CredentialedHead::head),
            true,
            VIA,
        ));
        match exchange(&mut client, up, &head, &forwarded_head, context.config.idle_timeout, &what, log).await {
            Exchanged::Complete { close: false } => {}
            Exchanged::Complete { close: true } | Exchanged::Failed | Exchanged::FailedMidResponse => return,
            Exchanged::Switched => {
                log.protocol = "websocket";
                let (client, to_upstream) = client.into_parts();
                let (upstream, to_client) = upstream.take().expect("connected above").into_parts();
                let prefill = Prefill { to_upstream, to_client };
                return log.relayed(relay::copy(client, upstream, prefill, context.config.idle_timeout).await);
            }
        }
    }
}

/// A request on an inspected connection must be for the name the
/// connection was decided on: another Host would reach another site on the
/// same server (domain fronting) past the decision.
fn names_target(head: &RequestHead, target: &Target) -> Result<(), String> {
    if head.form == TargetForm::Authority {
        return Err("CONNECT inside an inspected connection is not allowed".into());
    }
    let Some(authority) = &head.authority else { return Err("a request without Host".into()) };
    let same = match &authority.host {
        Host::Name(name) => name.trim_end_matches('.').eq_ignore_ascii_case(target.name.trim_end_matches('.')),
        Host::Ip(ip) => target.name.trim_start_matches('[').trim_end_matches(']').parse().ok() == Some(*ip),
    };
    if same {
        Ok(())
    } else {
        Err(format!("Host {} is not {}, the name this connection was decided on", authority.host, target.name))
    }
}

/// The upstream, TLS verified for the target's name when the client spoke
/// TLS; else the status, error kind and reason for the client.
async fn connect(
    target: &Target,
    preconnected: Option<TcpStream>,
    context: &Context,
    log: &mut CloseLog,
) -> Result<Box<dyn Io>, (u16, &'static str, String)> {
    let tcp = match preconnected {
        Some(tcp) => tcp,
        None => connect_upstream(target.upstream, context, log)
            .await
            .ok_or_else(|| (502, "upstream_failed", log.reason.clone().unwrap_or_default()))?,
    };
    if !target.tls {
        return Ok(Box::new(tcp));
    }
    match context.config.upstream_tls.connect(&target.name, tcp).await {
        Ok(tls) => Ok(Box::new(tls)),
        Err(error) => {
            let status = if error.kind == crate::tls::UpstreamTlsErrorKind::Timeout { 504 } else { 502 };
            log.upstream_failed(error.reason.clone());
            Err((status, error.kind.as_str(), error.reason))
        }
    }
}
