//! One redirected connection, from accept to its close log line:
//! attribute -> sniff -> decide -> relay (or refuse).

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use agent_common::DNS_PORT;

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    decide::{Allowed, Decider, Denial, Verdict},
    http_proxy::{self, HttpMode},
    inference_route::{is_inference, names_inference, InferenceRoute},
    inspect,
    limits::SandboxSlots,
    origin::Origin,
    respond, Config, Stats,
};
use crate::{
    credentials::{check_stream, check_unbound, Credentials},
    dns::{is_inference_address, CountAnswer, DnsResponder, INFERENCE_HOST},
    inference::InferenceLog,
    observe::{Denied, Ended, Observer, SandboxMetrics},
    redirect::Redirect,
    relay::{self, Prefill},
    rewound::Rewound,
    sniff::{self, host::Host, http::TargetForm, StreamKind},
};

/// One sandbox, as its connections see it; the daemon-wide parts are shared
/// by every sandbox.
pub struct Shared {
    pub name: Arc<str>,
    /// Its listener's port: a connect to it is an explicit proxy request.
    pub listen_port: u16,
    /// The sandbox has a network namespace of its own: its loopback is not the agent's.
    pub own_netns: bool,
    pub redirect: Redirect,
    pub config: Arc<Config>,
    pub stats: Arc<Stats>,
    pub sandbox_slots: SandboxSlots,
    pub decider: Decider,
    pub dns: Arc<DnsResponder>,
    /// `None` when the sandbox has no inference config.
    pub inference: Option<InferenceRoute>,
    /// Empty when the agent runs without `--credentials`.
    pub credentials: Arc<Credentials>,
    pub observer: Arc<Observer>,
    pub observed: Arc<SandboxMetrics>,
}

/// Everything the close log line says about a connection, filled in as it goes.
#[derive(Default)]
pub struct CloseLog {
    pub verdict: &'static str,
    pub reason: Option<String>,
    /// The kind of denial (`policy_denied`, `ssrf_denied`...), for the metrics.
    pub denial: Option<&'static str>,
    /// tls, http, connect, opaque, silent, closed, invalid.
    pub protocol: &'static str,
    pub host: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub policy: Option<String>,
    pub generation: Option<u64>,
    pub audit: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub error: Option<String>,
    pub inference: Option<InferenceLog>,
    /// Requests decided by L7 rules on an inspected connection, and how many were denied.
    pub requests: u64,
    pub requests_denied: u64,
}

impl CloseLog {
    /// Records the decision; returns the allowance if there is one.
    pub fn decided(&mut self, verdict: Verdict) -> Result<Allowed, Denial> {
        self.generation = Some(verdict.generation);
        match verdict.outcome {
            Ok(allowed) => {
                self.upstream = Some(allowed.upstream);
                if allowed.resolved_host.is_some() {
                    self.host.clone_from(&allowed.resolved_host);
                }
                self.policy.clone_from(&allowed.policy);
                self.audit.clone_from(&allowed.audit);
                Ok(allowed)
            }
            Err(denial) => {
                self.verdict = "denied";
                self.reason = Some(denial.reason.clone());
                self.denial = Some(denial.kind);
                Err(denial)
            }
        }
    }

    pub fn relayed(&mut self, outcome: relay::Outcome) {
        self.verdict = "relayed";
        self.bytes_up += outcome.bytes_up;
        self.bytes_down += outcome.bytes_down;
        self.error = outcome.error.map(|error| error.to_string());
    }

    pub fn upstream_failed(&mut self, reason: String) {
        self.verdict = "upstream_failed";
        self.reason = Some(reason);
    }
}

/// When the agent accepted a connection: an `Instant` for its duration, and
/// CLOCK_MONOTONIC in nanoseconds for its log line (`accepted_monotonic_ns`),
/// the clock other processes on the host can read too, so a client that
/// notes when it connected and closed can tell its connections apart even
/// when one (client address, destination) is used again at once.
#[derive(Clone, Copy)]
pub struct Accepted {
    at: Instant,
    monotonic_ns: u64,
}

impl Accepted {
    pub fn now() -> Self {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime only writes into the timespec passed; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        Self { at: Instant::now(), monotonic_ns: now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64 }
    }
}

pub async fn handle(client: TcpStream, peer: SocketAddr, accepted: Accepted, shared: &Shared) {
    let Some(origin) = attribute(peer, shared) else { return };
    let _active = shared.observed.connection_started();
    if let Some(reason) = origin.identity_lost {
        reset(client);
        let log = CloseLog {
            verdict: "denied",
            reason: Some(reason.into()),
            denial: Some("identity_lost"),
            protocol: "unknown",
            ..CloseLog::default()
        };
        return log.emit(shared, &origin, peer, accepted);
    }
    let Some(_sandbox_slot) = shared.sandbox_slots.try_acquire(origin.cgroup_id) else {
        let max = shared.sandbox_slots.max_per_sandbox();
        refuse(
            client,
            &origin,
            peer,
            accepted,
            shared,
            format!("too many connections in flight from this sandbox (--max-connections-per-sandbox {max})"),
        );
        return;
    };
    let _ = client.set_nodelay(true);
    let mut log = CloseLog::default();
    if is_own_listener(origin.destination, shared.listen_port) {
        explicit(client, &origin, shared, &mut log).await;
    } else {
        transparent(client, &origin, shared, &mut log).await;
    }
    log.emit(shared, &origin, peer, accepted);
}

/// Turns away a connection beyond `--max-connections`, logged like any other.
pub fn refuse_over_limit(client: TcpStream, peer: SocketAddr, accepted: Accepted, shared: &Shared) {
    let Some(origin) = attribute(peer, shared) else { return reset(client) };
    let reason = format!("too many connections in flight (--max-connections {})", shared.config.max_connections);
    refuse(client, &origin, peer, accepted, shared, reason);
}

/// Resets a connection over a limit and logs it (a warning too: the
/// sandbox sees only a reset).
fn refuse(client: TcpStream, origin: &Origin, peer: SocketAddr, accepted: Accepted, shared: &Shared, reason: String) {
    reset(client);
    shared.stats.over_limit.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(pid = origin.pid, cgroup_id = origin.cgroup_id, "connection refused: {reason}");
    let log = CloseLog {
        verdict: "denied",
        reason: Some(reason),
        denial: Some("over_limit"),
        protocol: "unknown",
        ..CloseLog::default()
    };
    log.emit(shared, origin, peer, accepted);
}

/// Who made the connection, from the kernel's record; a connection without
/// one is closed and counted, never guessed.
fn attribute(peer: SocketAddr, shared: &Shared) -> Option<Origin> {
    let Some(record) = shared.redirect.take_record(peer) else {
        let unattributed = shared.stats.unattributed.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(client = %peer, unattributed, "connection closed: no kernel record of its origin");
        return None;
    };
    let with_ancestors = shared.decider.policies.current().policy.matches_binaries();
    Some(Origin::from_record(&record, with_ancestors, |pid| shared.redirect.process_times(pid)))
}

impl CloseLog {
    /// The one line every connection logs when it ends.
    fn emit(&self, shared: &Shared, origin: &Origin, peer: SocketAddr, accepted: Accepted) {
        let denial = (self.verdict == "denied").then(|| self.denial.unwrap_or("other"));
        shared.observed.connection_ended(&Ended {
            verdict: self.verdict,
            protocol: self.protocol,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            denial,
        });
        if denial.is_some() {
            shared.observed.denied(Denied {
                host: self.host.clone().unwrap_or_else(|| origin.destination.ip().to_canonical().to_string()),
                port: origin.destination.port(),
                binary: origin.exe.as_ref().map(|exe| exe.display().to_string()),
                reason: self.reason.clone().unwrap_or_default(),
            });
        }
        let inference = self.inference.as_ref();
        tracing::info!(
            event = "connection",
            verdict = self.verdict,
            reason = self.reason,
            protocol = self.protocol,
            host = self.host,
            pid = origin.pid,
            exe = origin.exe.as_ref().map(|exe| exe.display().to_string()),
            comm = origin.comm,
            uid = origin.uid,
            cgroup_id = origin.cgroup_id,
            client = %peer,
            destination = %origin.destination,
            upstream = self.upstream.map(|upstream| upstream.to_string()),
            policy = self.policy,
            policy_generation = self.generation,
            audit = self.audit,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            accepted_monotonic_ns = accepted.monotonic_ns,
            duration_ms = accepted.at.elapsed().as_secs_f64() * 1e3,
            error = self.error,
            requests = (self.requests > 0).then_some(self.requests),
            requests_denied = (self.requests > 0).then_some(self.requests_denied),
            inference_requests = inference.map(|i| i.requests),
            inference_last_status = inference.and_then(|i| i.last_status),
            inference_endpoint = inference.and_then(|i| i.endpoint),
            inference_provider = inference.and_then(|i| i.provider.as_deref()),
            inference_model = inference.and_then(|i| i.model.as_deref()),
        );
    }
}

fn is_own_listener(destination: SocketAddr, listen_port: u16) -> bool {
    destination.ip().to_canonical().is_loopback() && destination.port() == listen_port
}

/// Destinations the agent never connects to for a sandbox, whatever its
/// policy: its metrics listener, and the agent's loopback for a sandbox
/// whose loopback is its own (it meant its own namespace's).
fn agent_side_only(destination: SocketAddr, shared: &Shared) -> Option<String> {
    if shared.observer.is_metrics_address(destination) {
        return Some(format!("{destination} is the agent's metrics listener, never reachable from a sandbox"));
    }
    (shared.own_netns && destination.ip().to_canonical().is_loopback()).then(|| {
        format!(
            "{destination} is the loopback of the sandbox's own network namespace: the agent does not relay it to \
             the host's"
        )
    })
}

/// A connect to some destination, redirected here by the kernel.
async fn transparent(mut client: TcpStream, origin: &Origin, shared: &Shared, log: &mut CloseLog) {
    let destination = origin.destination;
    if destination.ip().is_unspecified() || destination.port() == 0 {
        log.verdict = "denied";
        log.reason = Some(format!("{destination} is not a valid destination"));
        return;
    }
    if let Some(reason) = agent_side_only(destination, shared) {
        log.verdict = "denied";
        log.denial = Some("agent_address");
        log.reason = Some(reason);
        return reset(client);
    }
    if destination.port() == DNS_PORT {
        // DNS over TCP: the agent is the sandbox's resolver, whatever address it asked.
        log.protocol = "dns";
        log.verdict = "answered";
        let observed = shared.observed.clone();
        let count: CountAnswer = Arc::new(move |answer| observed.dns_answer(answer));
        let policies = &shared.decider.policies;
        if let Err(error) = shared.dns.serve_tcp(client, Some(origin.cgroup_id), policies, &count).await {
            log.error = Some(error.to_string());
        }
        return;
    }
    // A client that has sent nothing yet may be waiting for the server (SSH,
    // SMTP, MySQL): if the address alone allows the stream, connect now and
    // let whichever side speaks first go, instead of waiting on the sniffer.
    let mut early = None;
    if !is_inference_address(destination.ip()) && !has_bytes_or_end(&client) {
        if let Some(connected) = connect_early(origin, shared).await {
            let first_byte_timeout = shared.config.sniff.first_byte_timeout;
            let server_first = tokio::select! {
                biased;
                () = spoke(&client) => false,
                () = spoke(&connected.upstream) => true,
                _ = tokio::time::sleep(first_byte_timeout) => true,
            };
            if server_first {
                log.protocol = "silent";
                let Early { upstream, verdict } = connected;
                if log.decided(verdict).is_ok() {
                    log.relayed(relay::relay(client, upstream, Prefill::default(), shared.config.idle_timeout).await);
                }
                return;
            }
            early = Some(connected);
        }
    }
    let sniffed = sniff::sniff(&mut client, &shared.config.sniff).await;
    if is_inference_address(destination.ip()) && !matches!(sniffed.kind, StreamKind::Http(_) | StreamKind::Tls(_)) {
        // Only TLS and HTTP to inference.local are served; nothing else goes anywhere.
        log.protocol = "inference";
        log.verdict = "denied";
        log.reason = Some(format!("{destination} is the inference.local address: only HTTP and TLS are served there"));
        return reset(client);
    }
    let host = match sniffed.kind {
        StreamKind::Closed => {
            log.protocol = "closed";
            log.verdict = "closed";
            return;
        }
        StreamKind::Http(head) if is_inference(destination, None) || names_inference(head.authority.as_ref()) => {
            let Some(route) = inference_or_refuse(shared, log) else {
                return deny_http(client, &format!("{} {INFERENCE_HOST}", head.method), &no_inference_route()).await;
            };
            let mut buffered = sniffed.buffered;
            let after_head = buffered.split_off(head.head_len);
            return Box::pin(route.serve_http(client, after_head, head, log)).await;
        }
        StreamKind::Http(head) => {
            log.protocol = "http";
            let mode = HttpMode::Transparent { destination, preconnected: early.map(Early::into_stream) };
            return http_proxy::serve(client, sniffed.buffered, head, mode, origin, shared, log).await;
        }
        StreamKind::Tls(hello) if is_inference(destination, hello.sni.as_deref()) => {
            let Some(route) = inference_or_refuse(shared, log) else { return reset(client) };
            return Box::pin(route.serve_tls(client, sniffed.buffered, log)).await;
        }
        StreamKind::Invalid { protocol: "http", reason } if looks_like_http(&sniffed.buffered) => {
            log.protocol = "http";
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
        StreamKind::Opaque | StreamKind::Invalid { .. } if starts_with_empty_line(&sniffed.buffered) => {
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
    let verdict = shared.decider.stream(origin, host.as_deref(), destination).await;
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
            let name = host.or(resolved_host).unwrap_or_else(|| destination.ip().to_canonical().to_string());
            let target = inspect::Target { name, upstream, inspection, tls: true };
            Box::pin(inspect::terminate(client, sniffed.buffered, target, None, origin, shared, log)).await
        }
        Ok(allowed) => {
            // Relayed as it is: a placeholder in what was read never leaves.
            let host = log.host.clone().unwrap_or_else(|| destination.ip().to_canonical().to_string());
            if let Err(refusal) = check_stream(&sniffed.buffered, &host, log.protocol) {
                inspect::log_refusal(&refusal, origin, &host, log);
                return reset(client);
            }
            let prefill = Prefill { to_upstream: sniffed.buffered, ..Prefill::default() };
            match early.map(Early::into_stream) {
                Some((address, upstream)) if address == allowed.upstream => {
                    log.relayed(relay::relay(client, upstream, prefill, shared.config.idle_timeout).await)
                }
                _ => relay_to(client, allowed.upstream, prefill, shared, log).await,
            }
        }
        Err(_) => reset(client),
    }
}

/// An upstream connected before the client spoke, with the decision (on the
/// address alone) that allowed it.
struct Early {
    upstream: TcpStream,
    verdict: Verdict,
}

impl Early {
    fn into_stream(self) -> (SocketAddr, TcpStream) {
        let address = self.verdict.outcome.as_ref().map(|allowed| allowed.upstream).expect("only allowed ones connect");
        (address, self.upstream)
    }
}

/// Connects to the destination if the address alone allows the stream
/// (an IP-literal or `allowed_ips` endpoint, or a name this sandbox
/// resolved); `None` otherwise, or if the connect fails (the usual path
/// then reports it).
async fn connect_early(origin: &Origin, shared: &Shared) -> Option<Early> {
    let verdict = shared.decider.stream(origin, None, origin.destination).await;
    // An inspected endpoint's bytes are never relayed raw, whoever speaks first.
    let address = verdict.outcome.as_ref().ok().filter(|allowed| allowed.inspect.is_none())?.upstream;
    let upstream = tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(address)).await.ok()?.ok()?;
    let _ = upstream.set_nodelay(true);
    Some(Early { upstream, verdict })
}

/// Whether the client has sent a byte (or closed) already.
fn has_bytes_or_end(client: &TcpStream) -> bool {
    !matches!(peek(client), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
}

/// Returns once the peer has sent a byte or closed. (Readiness alone can be
/// spurious, notably on a socket just accepted.)
async fn spoke(stream: &TcpStream) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_io(tokio::io::Interest::READABLE, || peek(stream)) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            _ => return,
        }
    }
}

/// A peek at one byte that does not wait: `WouldBlock` if none is there.
fn peek(stream: &TcpStream) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`; MSG_PEEK leaves it queued.
    let received =
        unsafe { libc::recv(stream.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if received < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(received as usize)
}

/// A connect to the agent's own listener: an explicit proxy request
/// (`CONNECT host:port`, or an absolute-form `GET http://host/...`).
async fn explicit(mut client: TcpStream, origin: &Origin, shared: &Shared, log: &mut CloseLog) {
    let mut sniffed = sniff::sniff(&mut client, &shared.config.sniff).await;
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
    match (head.form, head.authority.clone()) {
        (TargetForm::Authority, Some(_)) if names_inference(head.authority.as_ref()) => {
            let Some(route) = inference_or_refuse(shared, log) else {
                return deny_http(client, &format!("CONNECT {}", head.target), &no_inference_route()).await;
            };
            if let Err(error) = client.write_all(respond::CONNECT_ESTABLISHED).await {
                log.error = Some(error.to_string());
                return;
            }
            // The tunnel carries TLS (terminated here) or plain HTTP.
            let mut tunnel = Rewound::new(sniffed.buffered.split_off(head.head_len), client);
            let inner = sniff::sniff(&mut tunnel, &shared.config.sniff).await;
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
        (TargetForm::Absolute, Some(_)) if names_inference(head.authority.as_ref()) => {
            let Some(route) = inference_or_refuse(shared, log) else {
                return deny_http(client, &format!("{} {INFERENCE_HOST}", head.method), &no_inference_route()).await;
            };
            let after_head = sniffed.buffered.split_off(head.head_len);
            Box::pin(route.serve_http(client, after_head, head, log)).await;
        }
        (TargetForm::Authority, Some(authority)) => {
            log.protocol = "connect";
            let host = authority.host.to_string();
            let port = authority.port.unwrap_or_default();
            log.host = Some(host.clone());
            let target = match &authority.host {
                Host::Name(name) => name.clone(),
                Host::Ip(ip) => ip.to_string(),
            };
            let reason = "a CONNECT request is for this proxy, and no credential is sent through it";
            if let Err(refusal) = check_unbound(&head, &host, reason) {
                inspect::log_refusal(&refusal, origin, &host, log);
                let body = respond::ErrorBody::new(refusal.kind, &refusal.detail, &refusal.reason);
                return respond::error(&mut client, refusal.status, &body).await;
            }
            let verdict = shared.decider.connect(origin, &target, port).await;
            match log.decided(verdict) {
                Err(denial) => deny_http(client, &format!("CONNECT {host}:{port}"), &denial).await,
                Ok(allowed) => {
                    let Some(upstream) = connect_upstream(allowed.upstream, shared, log).await else {
                        let reason = log.reason.clone().unwrap_or_default();
                        return respond::upstream_failed(&mut client, &format!("CONNECT {host}:{port}"), &reason).await;
                    };
                    if let Err(error) = client.write_all(respond::CONNECT_ESTABLISHED).await {
                        log.error = Some(error.to_string());
                        return;
                    }
                    // Bytes after the CONNECT head already belong to the tunnel;
                    // the sniff buffer is not kept for the tunnel's lifetime.
                    let tunnel_start = sniffed.buffered[head.head_len..].to_vec();
                    drop(std::mem::take(&mut sniffed.buffered));
                    if let Some(inspection) = allowed.inspect {
                        let target =
                            inspect::Target { name: target, upstream: allowed.upstream, inspection, tls: true };
                        return Box::pin(inspect_tunnel(
                            Rewound::new(tunnel_start, client),
                            target,
                            upstream,
                            origin,
                            shared,
                            log,
                        ))
                        .await;
                    }
                    if let Err(refusal) = check_stream(&tunnel_start, &host, "connect") {
                        inspect::log_refusal(&refusal, origin, &host, log);
                        return reset(client);
                    }
                    log.relayed(
                        relay::relay(
                            client,
                            upstream,
                            Prefill { to_upstream: tunnel_start, ..Prefill::default() },
                            shared.config.idle_timeout,
                        )
                        .await,
                    );
                }
            }
        }
        (TargetForm::Absolute, Some(_)) => {
            log.protocol = "http";
            http_proxy::serve(client, sniffed.buffered, head, HttpMode::Explicit, origin, shared, log).await;
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

/// A CONNECT tunnel to an inspected endpoint: TLS inside is terminated,
/// plain HTTP served request by request, anything else refused.
async fn inspect_tunnel(
    mut tunnel: Rewound<TcpStream>,
    mut target: inspect::Target,
    upstream: TcpStream,
    origin: &Origin,
    shared: &Shared,
    log: &mut CloseLog,
) {
    let inner = sniff::sniff(&mut tunnel, &shared.config.sniff).await;
    match inner.kind {
        StreamKind::Tls(_) if target.inspection.terminate_tls => {
            inspect::terminate(tunnel, inner.buffered, target, Some(upstream), origin, shared, log).await
        }
        StreamKind::Http(_) => {
            log.protocol = "connect-http";
            target.tls = false;
            inspect::serve(tunnel, inner.buffered, target, Some(upstream), origin, shared, log).await
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

/// The inference route, or `None` after logging why there is none.
fn inference_or_refuse<'a>(shared: &'a Shared, log: &mut CloseLog) -> Option<&'a InferenceRoute> {
    if shared.inference.is_none() {
        log.protocol = "inference";
        log.verdict = "denied";
        log.reason = Some(no_inference_route().reason);
    }
    shared.inference.as_ref()
}

fn no_inference_route() -> Denial {
    let reason = "inference.local is not configured: the agent runs without --inference-config".into();
    Denial { kind: "policy_denied", reason, address_class: None }
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

pub async fn bad_request<W: tokio::io::AsyncWrite + Unpin>(mut client: W, log: &mut CloseLog, reason: String) {
    log.verdict = "denied";
    log.denial = Some("bad_request");
    let body = respond::ErrorBody::new("bad_request", "malformed HTTP request", &reason);
    respond::error(&mut client, 400, &body).await;
    log.reason = Some(reason);
}

/// A 403 with the decision's reason; `what` is e.g. `CONNECT h:p` or `GET h:p`.
pub async fn deny_http<W: tokio::io::AsyncWrite + Unpin>(mut client: W, what: &str, denial: &Denial) {
    let detail = format!("{what} not permitted by policy");
    let body = respond::ErrorBody {
        address_class: denial.address_class,
        ..respond::ErrorBody::new(denial.kind, &detail, &denial.reason)
    };
    respond::error(&mut client, 403, &body).await;
}

/// Closes with a reset: a TLS or opaque client gets no readable answer, and
/// a RST tells it at once that the connection was refused.
fn reset(client: TcpStream) {
    // Deprecated because a non-zero linger blocks on drop; zero resets at once.
    #[allow(deprecated)]
    let _ = client.set_linger(Some(std::time::Duration::ZERO));
}

pub async fn connect_upstream(upstream: SocketAddr, shared: &Shared, log: &mut CloseLog) -> Option<TcpStream> {
    let timeout = shared.config.connect_timeout;
    let reason = match tokio::time::timeout(timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            return Some(stream);
        }
        Ok(Err(error)) => format!("connect to {upstream} failed: {error}"),
        Err(_) => format!("connect to {upstream} timed out after {timeout:?}"),
    };
    log.upstream_failed(reason);
    None
}

async fn relay_to(client: TcpStream, upstream: SocketAddr, prefill: Prefill, shared: &Shared, log: &mut CloseLog) {
    if let Some(upstream) = connect_upstream(upstream, shared, log).await {
        log.relayed(relay::relay(client, upstream, prefill, shared.config.idle_timeout).await);
    }
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
