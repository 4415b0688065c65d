//! Connections an inspected endpoint allowed, over HTTP/1: every request is
//! checked (`check`: classified by its endpoint's room, each call decided,
//! its credential applied, logged), and only then sent upstream, to the
//! origin over TLS verified for its name when the client spoke TLS.

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use zeroize::Zeroizing;

use super::{
    check::{check_request, Allowed, Checked, Upgrade},
    exchange::{exchange, Exchanged, KEEP_ALIVE_IDLE, VIA},
    grpc::is_grpc,
    messages::MessageInspector,
    target::{Target, Unserved},
    websocket,
};
use crate::{
    conn::{
        connect_upstream,
        refuse::{self, bad_request, ErrorBody},
        CloseLog, Context, Origin,
    },
    credentials::CredentialedHead,
    http1::{self, HeadReader, RequestHead, ResponseHead, TargetForm},
    policy::Inspection,
    relay::{self, Prefill},
    tls::{speaks_h2, Io},
    wire::host::Host,
};

/// The origin of an inspected HTTP/1 connection as its session starts.
pub enum Upstream {
    /// Connected at the first allowed request (over `Some`, a connection
    /// made already).
    Later(Option<TcpStream>),
    /// Connected already (TLS agreed on HTTP/1.1).
    Connected(Box<dyn Io>),
    /// It could not be: every allowed request is told why.
    Failed(Unserved),
}

/// An origin connected, and whether its TLS agreed on `h2`.
pub struct Connected {
    pub io: Box<dyn Io>,
    pub h2: bool,
}

/// Serves the HTTP requests of an inspected connection, one by one, on one
/// upstream connection (made at the first allowed request unless it is
/// already). `buffered`: request bytes already read (a CONNECT tunnel's
/// first head).
pub async fn serve<C>(
    client: C,
    buffered: Vec<u8>,
    target: Target,
    upstream: Upstream,
    origin: &Origin,
    context: &Context,
    log: &mut CloseLog,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = HeadReader::with_buffered(client, buffered);
    let (mut preconnected, mut failed) = (None, None);
    let mut upstream: Option<HeadReader<Box<dyn Io>>> = match upstream {
        Upstream::Later(tcp) => {
            preconnected = tcp;
            None
        }
        Upstream::Connected(io) => Some(HeadReader::new(io)),
        Upstream::Failed(unserved) => {
            failed = Some(unserved);
            None
        }
    };
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
        if is_grpc(&head) {
            // gRPC needs HTTP/2 (trailers, streams both ways): never downgraded.
            let reason = format!(
                "gRPC needs HTTP/2, and this connection speaks HTTP/1.1 ({}): the call is not relayed",
                if target.tls { "TLS agreed on http/1.1" } else { "plain HTTP" }
            );
            log.verdict = "denied";
            log.reason = Some(reason.clone());
            let what = format!("{} {}", head.method, head.target);
            return refuse::error(client.get_mut(), 502, &ErrorBody::new("grpc_needs_http2", &what, &reason)).await;
        }
        let Allowed { credential, body, inspection, websocket, .. } =
            match check_request(&mut client, &mut head, &target, origin, context, log).await {
                Checked::Allowed(allowed) => *allowed,
                Checked::Denied { close: true } => return,
                Checked::Denied { close: false } => continue,
            };
        let what = format!("{} {}", head.method, target.name);
        if upstream.is_none() {
            let connected = match failed.take() {
                Some(unserved) => Err(unserved),
                None => connect(&target, preconnected.take(), false, context, log).await,
            };
            match connected {
                Ok(connected) => upstream = Some(HeadReader::new(connected.io)),
                Err(Unserved { status, kind, reason }) => {
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
        let body = body.as_deref().map(Vec::as_slice);
        match exchange(&mut client, up, &head, &forwarded_head, body, context.config.idle_timeout, &what, log).await {
            Exchanged::Complete { close: false } => {}
            Exchanged::Complete { close: true } | Exchanged::Failed | Exchanged::FailedMidResponse => return,
            Exchanged::Switched { response } => {
                log.protocol = "websocket";
                let (client, to_upstream) = client.into_parts();
                let (upstream, to_client) = upstream.take().expect("connected above").into_parts();
                let prefill = Prefill { to_upstream, to_client };
                let idle = context.config.idle_timeout;
                let Some(upgrade) = websocket else {
                    return log.relayed(relay::copy(client, upstream, prefill, idle).await);
                };
                let session = Session { target: &target, origin, context, inspection, upgrade };
                return session.relay(client, upstream, prefill, &response, log).await;
            }
        }
    }
}

/// A request on an inspected connection must be for the name the
/// connection was decided on: another Host would reach another site on the
/// same server (domain fronting) past the decision.
pub(super) fn names_target(head: &RequestHead, target: &Target) -> Result<(), String> {
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
/// TLS (offering `h2` if `h2`); else why not, for the client.
pub async fn connect(
    target: &Target,
    preconnected: Option<TcpStream>,
    h2: bool,
    context: &Context,
    log: &mut CloseLog,
) -> Result<Connected, Unserved> {
    let tcp = match preconnected {
        Some(tcp) => tcp,
        None => connect_upstream(target.upstream, context, log).await.ok_or_else(|| Unserved {
            status: 502,
            kind: "upstream_failed",
            reason: log.reason.clone().unwrap_or_default(),
        })?,
    };
    if !target.tls {
        return Ok(Connected { io: Box::new(tcp), h2: false });
    }
    match context.config.upstream_tls.connect(&target.name, tcp, h2).await {
        Ok(tls) => Ok(Connected { h2: speaks_h2(&tls), io: Box::new(tls) }),
        Err(error) => {
            let status = if error.kind == crate::tls::UpstreamTlsErrorKind::Timeout { 504 } else { 502 };
            log.upstream_failed(error.reason.clone());
            Err(Unserved { status, kind: error.kind.as_str(), reason: error.reason })
        }
    }
}

/// A WebSocket session whose client text messages are each decided.
struct Session<'a> {
    target: &'a Target,
    origin: &'a Origin,
    context: &'a Context,
    inspection: Inspection,
    upgrade: Upgrade,
}

impl Session<'_> {
    /// Relays the session after the origin's `101` (`response`), until either
    /// side closes, a message is refused, or the policy is reloaded.
    async fn relay<C, U>(self, client: C, upstream: U, prefill: Prefill, response: &ResponseHead, log: &mut CloseLog)
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let Upgrade { offer, target, credential_provider } = self.upgrade;
        let deflate = match websocket::accept(&offer, response) {
            Ok(deflate) => deflate,
            Err(reason) => {
                // Never relayed uninspected: both connections end here.
                log.error = Some(format!("the origin's WebSocket extensions are refused: {reason}"));
                return;
            }
        };
        // A reload from here on ends the session.
        let mut reload = self.context.decider.policies.generations();
        reload.borrow_and_update();
        let mut inspector = MessageInspector {
            target: self.target,
            origin: self.origin,
            context: self.context,
            log: &mut *log,
            inspection: self.inspection,
            upgrade: target,
            credential_provider,
            decided: 0,
            denied: 0,
        };
        let limits = websocket::Limits::default();
        let idle = self.context.config.idle_timeout;
        let outcome = websocket::relay(client, upstream, prefill, deflate, &mut inspector, reload, limits, idle).await;
        let (decided, denied) = (inspector.decided, inspector.denied);
        log.requests += decided;
        log.requests_denied += denied;
        log.relayed(outcome.relayed);
        let close = match outcome.ended {
            websocket::Ended::Closed => return,
            websocket::Ended::Policy(close) | websocket::Ended::Refused(close) => close,
            websocket::Ended::Reload => websocket::Close { code: 1012, reason: "the policy was reloaded".into() },
        };
        log.error = Some(format!("WebSocket closed by the agent with {}: {}", close.code, close.reason));
    }
}
