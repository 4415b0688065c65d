//! Connections to inspected endpoints: TLS is terminated here (a leaf for
//! the name, signed by the agent's CA) and the requests inside go to the L7
//! session; a CONNECT tunnel to such an endpoint is handled the same way.

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::sandbox::Sandbox;
use crate::{
    conn::{CloseLog, Origin},
    l7::{self, Target},
    rewound::Rewound,
    sniff::{self, StreamKind},
};

/// Terminates the client's TLS for `target.name` (`hello`: the ClientHello
/// bytes already read), then serves its requests.
pub async fn tls<S>(
    client: S,
    hello: Vec<u8>,
    target: Target,
    preconnected: Option<TcpStream>,
    origin: &Origin,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    log.protocol = "tls-inspected";
    let context = &sandbox.context;
    let tls = match context.config.leaf_certs.accept(&target.name, Rewound::new(hello, client)).await {
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
    l7::serve(tls, Vec::new(), target, preconnected, origin, context, log).await;
}

/// A CONNECT tunnel to an inspected endpoint: TLS inside is terminated,
/// plain HTTP served request by request, anything else refused.
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
            l7::serve(tunnel, inner.buffered, target, Some(upstream), origin, &sandbox.context, log).await
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
