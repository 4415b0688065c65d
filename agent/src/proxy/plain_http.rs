//! Plain HTTP/1.x, request by request: every request on a keep-alive
//! connection is decided on its own Host (through the private-IP gate),
//! forwarded with hop-by-hop headers stripped and a Via added, and its
//! response relayed; a `101 Switching Protocols` turns the connection into a
//! raw splice, bytes already read past the 101 forwarded first.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{early::Early, sandbox::Sandbox};
use crate::{
    conn::{
        connect_upstream,
        refuse::{self, bad_request, deny_http, ErrorBody},
        CloseLog, Denial, Origin,
    },
    credentials::check_unbound,
    http1::{self, HeadReader, RequestHead, TargetForm},
    l7::{check_request, exchange, Checked, Exchanged, Target, KEEP_ALIVE_IDLE, VIA},
    relay::{self, Prefill},
    wire::host::Host,
};

pub enum HttpMode {
    /// Redirected by the kernel: the upstream is the address the sandbox
    /// chose; `preconnected`, a connection to it made before the client spoke.
    Transparent { destination: SocketAddr, preconnected: Option<Box<Early>> },
    /// Sent to the agent's listener as a proxy request (absolute-form).
    Explicit,
}

/// [`HttpMode`] without its connection, for every request of the loop.
#[derive(Clone, Copy)]
enum Mode {
    Transparent { destination: SocketAddr },
    Explicit,
}

impl HttpMode {
    fn split(self) -> (Mode, Option<Box<Early>>) {
        match self {
            Self::Transparent { destination, preconnected } => (Mode::Transparent { destination }, preconnected),
            Self::Explicit => (Mode::Explicit, None),
        }
    }
}

struct Upstream {
    address: SocketAddr,
    reader: HeadReader<TcpStream>,
}

pub async fn serve(
    client: TcpStream,
    mut buffered: Vec<u8>,
    first: RequestHead,
    mode: HttpMode,
    origin: &Origin,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) {
    let (mode, mut preconnected) = mode.split();
    let after_head = buffered.split_off(first.head_len);
    let mut client = HeadReader::with_buffered(client, after_head);
    let mut upstream: Option<Upstream> = None;
    let mut head = first;
    loop {
        if head.form == TargetForm::Authority {
            let reason = "CONNECT through another proxy is not allowed: this agent is the sandbox's proxy".to_owned();
            log.verdict = "denied";
            log.reason = Some(reason.clone());
            let denial = Denial { kind: "policy_denied", reason, address_class: None };
            drop(preconnected.take());
            return deny_http(client.into_parts().0, &format!("CONNECT {}", head.target), &denial).await;
        }
        let Some(authority) = head.authority.clone() else {
            drop(preconnected.take());
            return bad_request(client.into_parts().0, log, "request without Host".into()).await;
        };
        let host_text = authority.host.to_string();
        let (port, destination) = match mode {
            Mode::Transparent { destination } => (authority.port.unwrap_or(destination.port()), Some(destination.ip())),
            Mode::Explicit => (authority.port.unwrap_or(80), None),
        };
        let lookup_name = match &authority.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        };
        log.host = Some(host_text.clone());
        let verdict = sandbox.context.decider.plain_http(origin, &lookup_name, port, destination).await;
        let allowed = match log.decided(verdict) {
            Ok(allowed) => allowed,
            Err(denial) => {
                // Reset before the 403: no upstream connection outlives a denial.
                drop(preconnected.take());
                let (mut stream, _) = client.into_parts();
                deny_http(&mut stream, &format!("{} {host_text}:{port}", head.method), &denial).await;
                // Answered at once; a client sending the body anyway must still read the 403.
                if http1::has_request_body(&head) {
                    http1::linger(&mut stream).await;
                }
                return;
            }
        };
        let mut read_body = None;
        match allowed.inspect.clone() {
            Some(inspection) => {
                // Its requests are checked one by one, possibly at length: not kept for them.
                drop(preconnected.take());
                let upstream = SocketAddr::new(allowed.upstream.ip(), port);
                let target = Target { name: lookup_name.clone(), upstream, inspection, tls: false, via_gate: true };
                match check_request(&mut client, &mut head, &target, origin, &sandbox.context, log).await {
                    // Without TLS to the origin no credential is applied:
                    // check_request refuses placeholders instead.
                    Checked::Allowed(allowed) => read_body = allowed.body,
                    Checked::Denied { close: true } => return,
                    Checked::Denied { close: false } => {
                        match next_request(&mut client, sandbox, log).await {
                            Some(next) => head = next,
                            None => return,
                        }
                        continue;
                    }
                }
            }
            None => {
                let reason = "plain HTTP goes to no endpoint bound to a credential provider (credentials are only \
                              sent over TLS the agent terminates)";
                if let Err(refusal) = check_unbound(&head, &host_text, reason) {
                    drop(preconnected.take());
                    log.credential_refused(&refusal, origin, &host_text);
                    let body = ErrorBody::new(refusal.kind, &refusal.detail, &refusal.reason);
                    return refuse::error(client.get_mut(), refusal.status, &body).await;
                }
            }
        }
        // A keep-alive request for another address needs another upstream.
        if upstream.as_ref().map(|u| u.address) != Some(allowed.upstream) {
            // A connection made before the client spoke serves the first request to its address.
            // (Another address: that one is reset unused.)
            let ready =
                preconnected.take().filter(|early| early.address() == allowed.upstream).map(|early| early.adopt().1);
            let connected = match ready {
                Some(stream) => Some(stream),
                None => connect_upstream(allowed.upstream, &sandbox.context, log).await,
            };
            let Some(stream) = connected else {
                let (mut stream, _) = client.into_parts();
                let reason = log.reason.clone().unwrap_or_default();
                return refuse::upstream_failed(&mut stream, &format!("{} {host_text}:{port}", head.method), &reason)
                    .await;
            };
            upstream = Some(Upstream { address: allowed.upstream, reader: HeadReader::new(stream) });
        }
        let up = upstream.as_mut().expect("connected above");
        let forwarded_head = http1::forward_request_head(&head, matches!(mode, Mode::Explicit), VIA);
        let what = format!("{} {host_text}:{port}", head.method);
        match exchange(
            &mut client,
            &mut up.reader,
            &head,
            &forwarded_head,
            read_body.as_deref().map(Vec::as_slice),
            sandbox.context.config.idle_timeout,
            &what,
            log,
        )
        .await
        {
            Exchanged::Complete { close: false } => {}
            Exchanged::Complete { close: true } | Exchanged::Failed => return,
            // Part of a response went out: a reset, not a close, tells the
            // client it is incomplete (a close-delimited body would pass).
            Exchanged::FailedMidResponse => return relay::reset_when_flushed(client.get_mut()).await,
            Exchanged::Switched { .. } => {
                let upstream = upstream.take().expect("connected above");
                let (upstream_stream, to_client) = upstream.reader.into_parts();
                let (client_stream, to_upstream) = client.into_parts();
                log.protocol = "http-upgrade";
                let prefill = Prefill { to_upstream, to_client };
                return log.relay_after(client_stream, upstream_stream, prefill, sandbox.context.config.idle_timeout);
            }
        }
        match next_request(&mut client, sandbox, log).await {
            Some(next) => head = next,
            None => return,
        }
    }
}

/// The next request head on a keep-alive connection; `None` when the
/// connection ends (closed, idle, or a malformed head answered with a 400).
async fn next_request(
    client: &mut HeadReader<TcpStream>,
    sandbox: &Sandbox,
    log: &mut CloseLog,
) -> Option<RequestHead> {
    match client.read_request_head(KEEP_ALIVE_IDLE, sandbox.context.config.sniff.head_timeout).await {
        Ok(next) => next,
        // The client left a keep-alive connection idle: a normal end.
        Err(error) if error.kind() == std::io::ErrorKind::TimedOut => None,
        Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
            bad_request(client.get_mut(), log, error.to_string()).await;
            None
        }
        Err(error) => {
            log.error = Some(error.to_string());
            None
        }
    }
}
