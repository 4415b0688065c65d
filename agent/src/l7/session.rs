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
    check::{check_request, Allowed, Checked},
    exchange::{exchange, Exchanged, KEEP_ALIVE_IDLE, VIA},
    target::Target,
};
use crate::{
    conn::{
        connect_upstream,
        refuse::{self, bad_request, ErrorBody},
        CloseLog, Context, Origin,
    },
    credentials::CredentialedHead,
    http1::{self, HeadReader, RequestHead, TargetForm},
    relay::{self, Prefill},
    tls::Io,
    wire::host::Host,
};

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
        let Allowed { credential, body, inspection: _ } =
            match check_request(&mut client, &mut head, &target, origin, context, log).await {
                Checked::Allowed(allowed) => *allowed,
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
        let body = body.as_deref().map(Vec::as_slice);
        match exchange(&mut client, up, &head, &forwarded_head, body, context.config.idle_timeout, &what, log).await {
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
