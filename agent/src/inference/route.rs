//! Hands inference.local traffic to the managed inference route: TLS is
//! terminated with the agent CA's certificate, plain HTTP goes as it is.
//! Recognised by name (SNI, Host, CONNECT authority) or by the reserved
//! address the agent's DNS gives the name.

use std::{net::SocketAddr, sync::Arc};

use tokio_rustls::TlsAcceptor;

use super::Inference;
use crate::{
    conn::{CloseLog, Denial, InferenceLog},
    dns::{is_inference_address, Resolver, INFERENCE_HOST},
    http1::RequestHead,
    rewound::Rewound,
    wire::host::{Authority, Host},
};

pub struct InferenceRoute {
    pub inference: Arc<Inference>,
    /// Serves a certificate for inference.local signed by the agent's CA.
    pub tls: TlsAcceptor,
    /// Resolves the providers' names, like every name the agent looks up.
    pub dns: Arc<Resolver>,
}

pub fn names_inference(authority: Option<&Authority>) -> bool {
    matches!(authority, Some(Authority { host: Host::Name(name), .. }) if name == INFERENCE_HOST)
}

/// Whether a transparent stream is for inference.local.
pub fn is_inference(destination: SocketAddr, name: Option<&str>) -> bool {
    is_inference_address(destination.ip()) || name == Some(INFERENCE_HOST)
}

impl InferenceRoute {
    /// `sniffed`: the ClientHello bytes already read, replayed to the TLS acceptor.
    pub async fn serve_tls<S>(&self, client: S, sniffed: Vec<u8>, log: &mut CloseLog)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        log.protocol = "inference-tls";
        log.host = Some(INFERENCE_HOST.into());
        let tls = match self.tls.accept(Rewound::new(sniffed, client)).await {
            Ok(tls) => tls,
            Err(error) => {
                log.verdict = "denied";
                log.reason = Some(format!("TLS handshake for inference.local failed (does the client trust `sandbox-egress ca export`?): {error}"));
                return;
            }
        };
        let mut inference_log = InferenceLog::default();
        self.inference.serve_connection(tls, &self.dns, &mut inference_log).await;
        record(log, inference_log);
    }

    /// `after_head`: bytes already read past the first request head.
    pub async fn serve_http<S>(&self, client: S, after_head: Vec<u8>, head: RequestHead, log: &mut CloseLog)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        log.protocol = "inference-http";
        log.host = Some(INFERENCE_HOST.into());
        let mut inference_log = InferenceLog::default();
        self.inference.serve(client, after_head, head, &self.dns, &mut inference_log).await;
        record(log, inference_log);
    }
}

fn record(log: &mut CloseLog, inference: InferenceLog) {
    log.verdict = "inference";
    log.bytes_up += inference.bytes_up;
    log.bytes_down += inference.bytes_down;
    log.error.clone_from(&inference.error);
    log.inference = Some(inference);
}

/// The sandbox's inference route, or `None` after logging why there is none.
pub fn route_or_refuse<'a>(route: Option<&'a InferenceRoute>, log: &mut CloseLog) -> Option<&'a InferenceRoute> {
    if route.is_none() {
        log.protocol = "inference";
        log.verdict = "denied";
        log.reason = Some(no_route().reason);
    }
    route
}

/// Why a request for inference.local is refused when the sandbox has no route.
pub fn no_route() -> Denial {
    let reason = "inference.local is not configured: the agent runs without --inference-config".into();
    Denial { kind: "policy_denied", reason, address_class: None }
}
