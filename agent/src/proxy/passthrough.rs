//! Streams relayed as they are once allowed: TLS the agent does not
//! inspect (decided on its SNI), opaque TCP and silent clients. Bytes
//! already read go first; a credential placeholder in them never leaves.

use tokio::net::TcpStream;

use super::{early::Early, fast, sandbox::Sandbox};
use crate::{
    conn::{connect_upstream, refuse::reset, Allowed, CloseLog, Origin},
    credentials::check_stream,
    relay::Prefill,
};

/// A server-first stream connected early: relayed at once on the decision
/// the address alone made.
pub async fn server_first(client: TcpStream, connected: Early, origin: &Origin, sandbox: &Sandbox, log: &mut CloseLog) {
    log.protocol = "silent";
    let (verdict, upstream) = connected.adopt();
    if log.decided(verdict).is_ok() {
        fast::offer(origin, sandbox);
        log.relay_after(client, upstream, Prefill::default(), sandbox.context.config.idle_timeout);
    }
}

/// Relays an allowed stream whose first bytes are `buffered`, over the
/// connection made early if it went to the allowed address (else that one
/// is reset unused).
pub async fn relay(
    client: TcpStream,
    buffered: Vec<u8>,
    allowed: Allowed,
    early: Option<Early>,
    origin: &Origin,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) {
    let destination = origin.destination;
    let host = log.host.clone().unwrap_or_else(|| destination.ip().to_canonical().to_string());
    if let Err(refusal) = check_stream(&buffered, &host, log.protocol) {
        log.credential_refused(&refusal, origin, &host);
        return reset(client);
    }
    if matches!(log.protocol, "opaque" | "silent" | "tls") {
        fast::offer(origin, sandbox);
    }
    let idle = sandbox.context.config.idle_timeout;
    let prefill = Prefill { to_upstream: buffered, ..Prefill::default() };
    match early.filter(|early| early.address() == allowed.upstream) {
        Some(early) => log.relay_after(client, early.adopt().1, prefill, idle),
        None => {
            if let Some(upstream) = connect_upstream(allowed.upstream, &sandbox.context, log).await {
                log.relay_after(client, upstream, prefill, idle);
            }
        }
    }
}
