//! A connect to some destination, redirected here by the kernel: checked
//! against what no policy may allow, then routed by what its first bytes
//! say (DNS over TCP, server-first, inference.local, plain HTTP, TLS,
//! opaque), each route owning the connection to its end.

use std::sync::Arc;

use agent_common::DNS_PORT;
use tokio::net::TcpStream;

use super::{
    early::{self, FirstSpeaker},
    passthrough,
    plain_http::{self, HttpMode},
    sandbox::Sandbox,
    terminate,
};
use crate::{
    conn::{
        refuse::{bad_request, deny_http, reset},
        Allowed, CloseLog, Origin,
    },
    dns::{is_inference_address, CountAnswer, INFERENCE_HOST},
    http1::RequestHead,
    inference::{is_inference, names_inference, no_route, route_or_refuse},
    l7::{h2, Target},
    rewound::Rewound,
    sniff::{self, Sniffed, StreamKind},
};

pub async fn transparent(mut client: TcpStream, origin: &Origin, sandbox: &Sandbox, log: &mut CloseLog) {
    let destination = origin.destination;
    if destination.ip().is_unspecified() || destination.port() == 0 {
        log.verdict = "denied";
        log.reason = Some(format!("{destination} is not a valid destination"));
        return;
    }
    if let Some(reason) = agent_side_only(origin, sandbox) {
        log.verdict = "denied";
        log.denial = Some("agent_address");
        log.reason = Some(reason);
        return reset(client);
    }
    if destination.port() == DNS_PORT {
        return dns_over_tcp(client, origin, sandbox, log).await;
    }
    let mut early = None;
    if !is_inference_address(destination.ip()) {
        match early::race(&client, origin, &sandbox.context, &sandbox.greeters).await {
            Some(FirstSpeaker::Server(connected)) => {
                return passthrough::server_first(client, connected, origin, sandbox, log).await
            }
            Some(FirstSpeaker::Client(connected)) => early = Some(connected),
            None => {}
        }
    }
    let limits = &sandbox.context.config.sniff;
    let mut sniffed = sniff::sniff(&mut client, limits).await;
    if sniffed.kind == StreamKind::Silent && inspected_by_address(origin, sandbox).await {
        // An inspected endpoint's clients speak first (TLS, HTTP): a slow
        // one (a JVM warming up on a busy machine) is waited for up to the
        // head timeout, not taken for a server-first protocol and reset.
        let patient = sniff::Limits { first_byte_timeout: limits.head_timeout, ..*limits };
        sniffed = sniff::sniff(&mut client, &patient).await;
    }
    if is_inference_address(destination.ip()) && !matches!(sniffed.kind, StreamKind::Http(_) | StreamKind::Tls(_)) {
        // Only TLS and HTTP to inference.local are served; nothing else goes anywhere.
        log.protocol = "inference";
        log.verdict = "denied";
        log.reason = Some(format!("{destination} is the inference.local address: only HTTP and TLS are served there"));
        return reset(client);
    }
    let Sniffed { kind, buffered } = sniffed;
    // Only plain HTTP and streams relayed as they are use an early
    // connection; every other branch drops (resets) it before it answers.
    let host = match kind {
        StreamKind::Closed => {
            log.protocol = "closed";
            log.verdict = "closed";
            return;
        }
        StreamKind::Http(head) if is_inference(destination, None) || names_inference(head.authority.as_ref()) => {
            drop(early);
            return inference_http(client, buffered, head, sandbox, log).await;
        }
        StreamKind::Http(head) => {
            log.protocol = "http";
            let mode = HttpMode::Transparent { destination, preconnected: early.map(Box::new) };
            return plain_http::serve(client, buffered, head, mode, origin, sandbox, log).await;
        }
        StreamKind::Tls(hello) if is_inference(destination, hello.sni.as_deref()) => {
            drop(early);
            let Some(route) = route_or_refuse(sandbox.inference.as_ref(), log) else { return reset(client) };
            return Box::pin(route.serve_tls(client, buffered, log)).await;
        }
        // HTTP/2 with prior knowledge: no request of it could be decided.
        StreamKind::Invalid { protocol: "http", .. } if buffered.starts_with(h2::CLEARTEXT_PREFACE) => {
            log.protocol = "h2c";
            drop(early);
            return h2::refuse_cleartext(Rewound::new(buffered, client), log).await;
        }
        StreamKind::Invalid { protocol: "http", reason } if looks_like_http(&buffered) => {
            log.protocol = "http";
            drop(early);
            return bad_request(client, log, reason).await;
        }
        StreamKind::Invalid { protocol: "tls", reason } => {
            log.protocol = "tls";
            log.verdict = "denied";
            log.reason = Some(format!("invalid TLS ClientHello: {reason}"));
            return reset(client);
        }
        StreamKind::Tls(hello) => {
            log.protocol = "tls";
            hello.sni
        }
        StreamKind::Opaque | StreamKind::Invalid { .. } if starts_with_empty_line(&buffered) => {
            log.protocol = "opaque";
            log.verdict = "denied";
            log.reason = Some("a stream that starts with an empty line could be HTTP hidden from the checks".into());
            return reset(client);
        }
        // Not HTTP nor TLS (including text protocols that start with a
        // letter, like SSH banners): decided by the names the sandbox
        // resolved to the destination, or on the destination alone.
        StreamKind::Opaque | StreamKind::Invalid { .. } => {
            log.protocol = "opaque";
            None
        }
        StreamKind::Silent => {
            log.protocol = "silent";
            None
        }
    };
    log.host.clone_from(&host);
    let verdict = sandbox.context.decider.stream(origin, host.as_deref(), destination).await;
    match log.decided(verdict) {
        Ok(Allowed { inspect: Some(inspection), upstream, resolved_host, .. }) => {
            if log.protocol != "tls" || !inspection.terminate_tls {
                log.verdict = "denied";
                log.reason = Some(format!(
                    "{destination} is an inspected endpoint (L7 rules): only HTTP and TLS are served there, \
                     and this stream is {}",
                    log.protocol
                ));
                return reset(client);
            }
            drop(early);
            let name = host.or(resolved_host).unwrap_or_else(|| destination.ip().to_canonical().to_string());
            let target = Target { name, upstream, inspection, tls: true, via_gate: false };
            Box::pin(terminate::tls(client, buffered, target, None, origin, sandbox, log)).await
        }
        Ok(allowed) => passthrough::relay(client, buffered, allowed, early, origin, sandbox, log).await,
        Err(_) => {
            drop(early);
            reset(client);
        }
    }
}

/// Whether the destination's address alone is allowed by an inspected
/// endpoint (as a stream without a host of its own would be decided).
async fn inspected_by_address(origin: &Origin, sandbox: &Sandbox) -> bool {
    let verdict = sandbox.context.decider.stream(origin, None, origin.destination).await;
    verdict.outcome.is_ok_and(|allowed| allowed.inspect.is_some())
}

/// Plain HTTP to inference.local (by address or Host): its route serves it.
async fn inference_http(
    client: TcpStream,
    mut buffered: Vec<u8>,
    head: RequestHead,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) {
    let Some(route) = route_or_refuse(sandbox.inference.as_ref(), log) else {
        return deny_http(client, &format!("{} {INFERENCE_HOST}", head.method), &no_route()).await;
    };
    let after_head = buffered.split_off(head.head_len);
    Box::pin(route.serve_http(client, after_head, head, log)).await
}

/// DNS over TCP: the agent is the sandbox's resolver, whatever address it asked.
async fn dns_over_tcp(client: TcpStream, origin: &Origin, sandbox: &Sandbox, log: &mut CloseLog) {
    log.protocol = "dns";
    log.verdict = "answered";
    let observed = sandbox.context.observed.clone();
    let count: CountAnswer = Arc::new(move |answer| observed.dns_answer(answer));
    let policies = &sandbox.context.decider.policies;
    if let Err(error) = sandbox.dns.serve_tcp(client, Some(origin.cgroup_id), policies, &count).await {
        log.error = Some(error.to_string());
    }
}

/// Destinations the agent never connects to for a sandbox, whatever its
/// policy: its metrics listener, and the agent's loopback for a sandbox
/// whose loopback is its own (it meant its own namespace's).
fn agent_side_only(origin: &Origin, sandbox: &Sandbox) -> Option<String> {
    let destination = origin.destination;
    if sandbox.observer.is_metrics_address(destination) {
        return Some(format!("{destination} is the agent's metrics listener, never reachable from a sandbox"));
    }
    (sandbox.own_netns && destination.ip().to_canonical().is_loopback()).then(|| {
        format!(
            "{destination} is the loopback of the sandbox's own network namespace: the agent does not relay it to \
             the host's"
        )
    })
}

/// The start of an HTTP request line (`METHOD /`, `METHOD *`, `METHOD
/// http://`, `CONNECT host`), complete or not: too long, too slow or
/// malformed, it is still HTTP, gets a 400, and is never relayed as opaque
/// bytes around the HTTP checks. SSH banners and the like do not match.
fn looks_like_http(buffered: &[u8]) -> bool {
    let Some(space) = buffered.iter().take(32).position(|&b| b == b' ') else { return false };
    let (method, target) = (&buffered[..space], &buffered[space + 1..]);
    let is_token = !method.is_empty() && method.iter().all(|b| b.is_ascii_uppercase() || *b == b'-');
    is_token
        && (method == b"CONNECT"
            || target.first().is_some_and(|&b| b == b'/' || b == b'*')
            || target.starts_with(b"http://")
            || target.starts_with(b"https://"))
}

/// HTTP servers skip empty lines before a request line (RFC 9112 2.2), so
/// a stream that starts with one may be HTTP that the sniffer cannot see.
fn starts_with_empty_line(buffered: &[u8]) -> bool {
    buffered.first().is_some_and(|&b| b == b'\r' || b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_recognised_even_incomplete() {
        for http in
            [&b"GET /"[..], b"POST /v1 HTTP/1.1\r\n", b"OPTIONS *", b"GET http://h/", b"CONNECT h:443", b"M-SEARCH *"]
        {
            assert!(looks_like_http(http), "{}", String::from_utf8_lossy(http));
        }
        for other in
            [&b"SSH-2.0-OpenSSH_9.2\r\n"[..], b"GET", b"SET key value", b"get /", b"\x00GET /", b"PING\r\n", b""]
        {
            assert!(!looks_like_http(other), "{}", String::from_utf8_lossy(other));
        }
    }
}
