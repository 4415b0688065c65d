//! A connect to the agent's own listener: an explicit proxy request
//! (`CONNECT host:port`, or an absolute-form `GET http://host/...`).

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    plain_http::{self, HttpMode},
    sandbox::Sandbox,
    terminate,
};
use crate::{
    conn::{
        connect_upstream,
        refuse::{self, bad_request, deny_http, reset, ErrorBody, CONNECT_ESTABLISHED},
        CloseLog, Origin,
    },
    credentials::{check_stream, check_unbound},
    dns::INFERENCE_HOST,
    http1::{RequestHead, TargetForm},
    inference::{names_inference, no_route, route_or_refuse, InferenceRoute},
    l7::Target,
    relay::Prefill,
    rewound::Rewound,
    sniff::{self, StreamKind},
    wire::host::Host,
};

pub async fn serve(mut client: TcpStream, origin: &Origin, sandbox: &Sandbox, log: &mut CloseLog) {
    let sniffed = sniff::sniff(&mut client, &sandbox.context.config.sniff).await;
    let head = match sniffed.kind {
        StreamKind::Http(head) => head,
        StreamKind::Invalid { protocol: "http", reason } => {
            log.protocol = "http";
            return bad_request(client, log, reason).await;
        }
        _ => {
            log.protocol = "invalid";
            log.verdict = "denied";
            log.reason =
                Some("the agent's own listener only takes HTTP proxy requests (CONNECT or absolute-form)".into());
            return reset(client);
        }
    };
    let mut buffered = sniffed.buffered;
    match (head.form, head.authority.is_some()) {
        (TargetForm::Authority, true) if names_inference(head.authority.as_ref()) => {
            let Some(route) = route_or_refuse(sandbox.inference.as_ref(), log) else {
                return deny_http(client, &format!("CONNECT {}", head.target), &no_route()).await;
            };
            inference_tunnel(client, buffered.split_off(head.head_len), route, sandbox, log).await
        }
        (TargetForm::Absolute, true) if names_inference(head.authority.as_ref()) => {
            let Some(route) = route_or_refuse(sandbox.inference.as_ref(), log) else {
                return deny_http(client, &format!("{} {INFERENCE_HOST}", head.method), &no_route()).await;
            };
            let after_head = buffered.split_off(head.head_len);
            Box::pin(route.serve_http(client, after_head, head, log)).await;
        }
        (TargetForm::Authority, true) => connect(client, buffered, head, origin, sandbox, log).await,
        (TargetForm::Absolute, true) => {
            log.protocol = "http";
            plain_http::serve(client, buffered, head, HttpMode::Explicit, origin, sandbox, log).await;
        }
        _ => {
            log.protocol = "http";
            bad_request(
                client,
                log,
                "this is an egress proxy: send CONNECT host:port or an absolute-form request".into(),
            )
            .await;
        }
    }
}

/// `CONNECT inference.local:443`: the tunnel carries TLS (terminated here)
/// or plain HTTP, served by the inference route.
async fn inference_tunnel(
    mut client: TcpStream,
    tunnel_start: Vec<u8>,
    route: &InferenceRoute,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) {
    if let Err(error) = client.write_all(CONNECT_ESTABLISHED).await {
        log.error = Some(error.to_string());
        return;
    }
    let mut tunnel = Rewound::new(tunnel_start, client);
    let inner = sniff::sniff(&mut tunnel, &sandbox.context.config.sniff).await;
    match inner.kind {
        StreamKind::Tls(_) => Box::pin(route.serve_tls(tunnel, inner.buffered, log)).await,
        StreamKind::Http(inner_head) => {
            let mut buffered = inner.buffered;
            let after_head = buffered.split_off(inner_head.head_len);
            Box::pin(route.serve_http(tunnel, after_head, inner_head, log)).await;
        }
        _ => {
            log.protocol = "inference";
            log.verdict = "denied";
            log.reason = Some("a CONNECT tunnel to inference.local must carry TLS or HTTP".into());
        }
    }
}

/// `CONNECT host:port`: decided on the authority; the agent resolves the
/// host, connects to an address it checked, and relays the tunnel (an
/// inspected endpoint's tunnel is terminated instead).
async fn connect(
    mut client: TcpStream,
    mut buffered: Vec<u8>,
    head: RequestHead,
    origin: &Origin,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) {
    log.protocol = "connect";
    let authority = head.authority.clone().expect("CONNECT has an authority");
    let host = authority.host.to_string();
    let port = authority.port.unwrap_or_default();
    log.host = Some(host.clone());
    let target = match &authority.host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    let reason = "a CONNECT request is for this proxy, and no credential is sent through it";
    if let Err(refusal) = check_unbound(&head, &host, reason) {
        log.credential_refused(&refusal, origin, &host);
        let body = ErrorBody::new(refusal.kind, &refusal.detail, &refusal.reason);
        return refuse::error(&mut client, refusal.status, &body).await;
    }
    let verdict = sandbox.context.decider.connect(origin, &target, port).await;
    let allowed = match log.decided(verdict) {
        Err(denial) => return deny_http(client, &format!("CONNECT {host}:{port}"), &denial).await,
        Ok(allowed) => allowed,
    };
    let Some(upstream) = connect_upstream(allowed.upstream, &sandbox.context, log).await else {
        let reason = log.reason.clone().unwrap_or_default();
        return refuse::upstream_failed(&mut client, &format!("CONNECT {host}:{port}"), &reason).await;
    };
    if let Err(error) = client.write_all(CONNECT_ESTABLISHED).await {
        log.error = Some(error.to_string());
        return;
    }
    // Bytes after the CONNECT head already belong to the tunnel; the sniff
    // buffer is not kept for the tunnel's lifetime.
    let tunnel_start = buffered.split_off(head.head_len);
    drop(buffered);
    if let Some(inspection) = allowed.inspect {
        let target = Target { name: target, upstream: allowed.upstream, inspection, tls: true, via_gate: false };
        let tunnel = Rewound::new(tunnel_start, client);
        return Box::pin(terminate::tunnel(tunnel, target, upstream, origin, sandbox, log)).await;
    }
    if let Err(refusal) = check_stream(&tunnel_start, &host, "connect") {
        log.credential_refused(&refusal, origin, &host);
        return reset(client);
    }
    let prefill = Prefill { to_upstream: tunnel_start, ..Prefill::default() };
    log.relay_after(client, upstream, prefill, sandbox.context.config.idle_timeout);
}
