//! Connections to inspected endpoints: TLS is terminated here (a leaf for
//! the name, signed by the agent's CA) and the requests inside go to the L7
//! session, HTTP/1 or HTTP/2 as ALPN agreed; a CONNECT tunnel to such an
//! endpoint is handled the same way.
//!
//! ALPN both ways: a client offering `h2` has the origin asked first
//! (`h2`, then HTTP/1.1); the client is offered `h2` only if the origin
//! agreed on it, or if the client offers nothing else (it is then told per
//! request why its requests cannot be relayed, rather than failing its
//! handshake). HTTP/1.1 is always offered.

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::sandbox::Sandbox;
use crate::{
    conn::{CloseLog, Origin},
    l7::{self, h2, Connected, Target, Unserved, Upstream},
    rewound::Rewound,
    sniff::{self, tls::parse_client_hello, StreamKind},
    wire::Parse,
};

/// Terminates the client's TLS for `target.name` (`hello`: the ClientHello
/// bytes already read), then serves its requests.
pub async fn tls<S>(
    client: S,
    hello: Vec<u8>,
    target: Target,
    mut preconnected: Option<TcpStream>,
    origin: &Origin,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    log.protocol = "tls-inspected";
    let context = &sandbox.context;
    let offered = match parse_client_hello(&hello) {
        Parse::Done(hello) => hello.alpn,
        _ => Vec::new(),
    };
    let offered_h2 = offered.iter().any(|protocol| protocol == "h2");
    let h2_only = offered_h2 && !offered.iter().any(|protocol| protocol == "http/1.1");
    let early = match offered_h2 {
        true => Some(l7::connect(&target, preconnected.take(), true, context, log).await),
        false => None,
    };
    let origin_h2 = matches!(early, Some(Ok(Connected { h2: true, .. })));
    let leaves = &context.config.leaf_certs;
    let tls = match leaves.accept(&target.name, Rewound::new(hello, client), origin_h2 || h2_only).await {
        Ok(tls) => tls,
        Err(error) => {
            log.verdict = "denied";
            log.reason = Some(format!(
                "TLS handshake for {} failed (does the client trust `sandbox-egress ca export`?): {error}",
                target.name
            ));
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        let upstream = match early {
            Some(Ok(Connected { io, h2: true })) => h2::Upstream::Ready(io),
            Some(Err(unserved)) => h2::Upstream::Unserved(unserved),
            Some(Ok(Connected { h2: false, .. })) | None => h2::Upstream::Unserved(Unserved {
                status: 502,
                kind: "upstream_http1_only",
                reason: format!(
                    "{} speaks only HTTP/1.1 (its TLS agreed on no h2): this client's HTTP/2 requests, \
                     gRPC calls among them, cannot be relayed to it",
                    target.name
                ),
            }),
        };
        return h2::serve(tls, upstream, target, origin, context, log).await;
    }
    let upstream = match early {
        Some(Ok(Connected { io, h2: false })) => Upstream::Connected(io),
        // The origin agreed on h2 but the client did not: HTTP/1.1 anew.
        Some(Ok(Connected { h2: true, .. })) => Upstream::Later(None),
        Some(Err(unserved)) => Upstream::Failed(unserved),
        None => Upstream::Later(preconnected),
    };
    l7::serve(tls, Vec::new(), target, upstream, origin, context, log).await;
}

/// A CONNECT tunnel to an inspected endpoint: TLS inside is terminated,
/// plain HTTP served request by request, HTTP/2 in clear text refused,
/// anything else refused.
pub async fn tunnel(
    mut tunnel: Rewound<TcpStream>,
    mut target: Target,
    upstream: TcpStream,
    origin: &Origin,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) {
    let inner = sniff::sniff(&mut tunnel, &sandbox.context.config.sniff).await;
    match inner.kind {
        StreamKind::Tls(_) if target.inspection.terminate_tls => {
            tls(tunnel, inner.buffered, target, Some(upstream), origin, sandbox, log).await
        }
        StreamKind::Http(_) => {
            log.protocol = "connect-http";
            target.tls = false;
            let upstream = Upstream::Later(Some(upstream));
            l7::serve(tunnel, inner.buffered, target, upstream, origin, &sandbox.context, log).await
        }
        _ if inner.buffered.starts_with(h2::CLEARTEXT_PREFACE) => {
            log.protocol = "h2c";
            h2::refuse_cleartext(Rewound::new(inner.buffered, tunnel), log).await
        }
        _ => {
            log.verdict = "denied";
            log.reason = Some(format!(
                "CONNECT {}: an inspected endpoint's tunnel must carry TLS or HTTP (L7 rules decide its requests)",
                target.name
            ));
        }
    }
}
