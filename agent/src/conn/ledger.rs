//! One close record per connection: filled in as the connection goes, and
//! written as one log line (plus its metrics) when it ends.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::net::TcpStream;

use super::{
    origin::Origin,
    verdict::{Allowed, Denial, Verdict},
};
use crate::{
    credentials::Refusal,
    observe::{ocsf::ACTIVITY, Denied, DeniedRequest, Ended, SandboxMetrics},
    relay::{self, Prefill},
};

/// Requests refused by the rules kept per connection for `policy suggest`.
const MAX_DENIED_REQUESTS: usize = 16;

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
    /// The port and address the connection was decided on (see [`Verdict`]).
    pub port: Option<u16>,
    pub address: Option<IpAddr>,
    /// Distinct requests the rules refused, what `policy suggest` reads.
    pub denied_requests: Vec<DeniedRequest>,
    /// Who opened it, for its open line; taken at its first allowed decision.
    pub(crate) opener: Option<Box<Opener>>,
    /// The raw relay its route left to run after it (see [`Self::relay_after`]).
    pub(crate) then_relay: Option<Box<relay::Later>>,
}

/// What the open line says of the process, kept only while that line is
/// logged (the OCSF format, or `debug`).
pub(crate) struct Opener {
    pid: u32,
    uid: u32,
    cgroup_id: u64,
    comm: String,
    exe: Option<PathBuf>,
    client: SocketAddr,
    destination: SocketAddr,
}

impl CloseLog {
    /// The record of a connection `origin` opened; its open line is logged
    /// at its first allowed decision.
    pub fn opened_by(origin: &Origin) -> Self {
        let opener = tracing::enabled!(target: ACTIVITY, tracing::Level::DEBUG).then(|| {
            Box::new(Opener {
                pid: origin.pid,
                uid: origin.uid,
                cgroup_id: origin.cgroup_id,
                comm: origin.comm.clone(),
                exe: origin.exe.clone(),
                client: origin.client,
                destination: origin.destination,
            })
        });
        Self { opener, ..Self::default() }
    }

    /// Records the decision; returns the allowance if there is one.
    pub fn decided(&mut self, verdict: Verdict) -> Result<Allowed, Denial> {
        self.generation = Some(verdict.generation);
        self.port = Some(verdict.port);
        self.address = verdict.address;
        match verdict.outcome {
            Ok(allowed) => {
                self.upstream = Some(allowed.upstream);
                if allowed.resolved_host.is_some() {
                    self.host.clone_from(&allowed.resolved_host);
                }
                self.policy.clone_from(&allowed.policy);
                self.audit.clone_from(&allowed.audit);
                if let Some(opener) = self.opener.take() {
                    self.log_open(&opener);
                }
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

    /// Leaves the relay of `client` and `upstream` to the end of the
    /// connection, which runs it (and records it as [`Self::relayed`]) once
    /// the route has returned and its state is freed.
    pub fn relay_after(&mut self, client: TcpStream, upstream: TcpStream, prefill: Prefill, idle_timeout: Duration) {
        self.then_relay = Some(Box::new(relay::Later { client, upstream, prefill, idle_timeout }));
    }

    pub fn relayed(&mut self, outcome: relay::Outcome) {
        self.verdict = "relayed";
        self.bytes_up += outcome.bytes_up;
        self.bytes_down += outcome.bytes_down;
        self.error = outcome.error.map(|error| error.to_string());
    }

    /// Reset by the agent when its drain timeout ran out (an upgrade or a
    /// shutdown): the bytes relayed so far are not known.
    pub fn cut(&mut self) {
        self.verdict = "cut";
        self.reason = Some("the daemon's drain timeout ran out: connection reset".into());
    }

    pub fn upstream_failed(&mut self, reason: String) {
        self.verdict = "upstream_failed";
        self.reason = Some(reason);
    }

    /// Adds what one stream of a multiplexed connection (HTTP/2) recorded:
    /// its counts and last reason; `relayed` once any stream was, as for
    /// HTTP/1 requests one after the other.
    pub fn absorb(&mut self, part: CloseLog) {
        self.requests += part.requests;
        self.requests_denied += part.requests_denied;
        self.bytes_up += part.bytes_up;
        self.bytes_down += part.bytes_down;
        if self.verdict.is_empty() || part.verdict == "relayed" {
            self.verdict = part.verdict;
        }
        self.denial = self.denial.or(part.denial);
        if part.reason.is_some() {
            self.reason = part.reason;
        }
        if part.audit.is_some() {
            self.audit = part.audit;
        }
        self.error = self.error.take().or(part.error);
        for denied in part.denied_requests {
            if self.denied_requests.len() < MAX_DENIED_REQUESTS && !self.denied_requests.contains(&denied) {
                self.denied_requests.push(denied);
            }
        }
    }

    /// A request the rules refused (`call`: the JSON-RPC or GraphQL call
    /// in it that was), kept once for `policy suggest`.
    pub fn request_denied(&mut self, method: &str, path: &str, call: Option<String>) {
        let denied = DeniedRequest { method: method.to_owned(), path: path.to_owned(), call };
        if self.denied_requests.len() < MAX_DENIED_REQUESTS && !self.denied_requests.contains(&denied) {
            self.denied_requests.push(denied);
        }
    }

    /// The line of a connection allowed, before it is relayed (`debug`, on
    /// in the OCSF format): long connections are seen while they last.
    fn log_open(&self, opener: &Opener) {
        tracing::debug!(
            target: ACTIVITY,
            event = "connection_open",
            protocol = self.protocol,
            host = self.host,
            pid = opener.pid,
            exe = opener.exe.as_ref().map(|exe| exe.display().to_string()),
            comm = opener.comm,
            uid = opener.uid,
            cgroup_id = opener.cgroup_id,
            client = %opener.client,
            destination = %opener.destination,
            upstream = self.upstream.map(|upstream| upstream.to_string()),
            policy = self.policy,
            policy_generation = self.generation,
            audit = self.audit,
        );
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

impl CloseLog {
    /// The one line every connection logs when it ends.
    pub fn emit(&self, observed: &SandboxMetrics, origin: &Origin, peer: SocketAddr, accepted: Accepted) {
        let denial = (self.verdict == "denied").then(|| self.denial.unwrap_or("other"));
        observed.connection_ended(&Ended {
            verdict: self.verdict,
            protocol: self.protocol,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            denial,
        });
        // A connection relayed after a denied request (a keep-alive or
        // WebSocket session) is kept too: its requests are what was denied.
        let denied_kind = denial.or_else(|| (!self.denied_requests.is_empty()).then_some("policy_denied"));
        if let Some(kind) = denied_kind {
            observed.denied(Denied {
                host: self.host.clone().unwrap_or_else(|| origin.destination.ip().to_canonical().to_string()),
                port: self.port.unwrap_or(origin.destination.port()),
                binary: origin.exe.as_ref().map(|exe| exe.display().to_string()),
                reason: self.reason.clone().unwrap_or_default(),
                kind,
                protocol: self.protocol,
                address: self.address.map(|address| address.to_canonical()),
                // An allowed connection is denied by its requests.
                connection: self.upstream.is_none(),
                requests: self.denied_requests.clone(),
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

    /// A placeholder where it does not belong, or a bound credential that
    /// cannot be applied: a warning of its own (the sandbox may be
    /// misconfigured, or trying to send a placeholder elsewhere), and the
    /// connection's close line says why.
    pub fn credential_refused(&mut self, refusal: &Refusal, origin: &Origin, host: &str) {
        tracing::warn!(
            event = "credential_refused",
            error = refusal.kind,
            provider = refusal.provider,
            host,
            pid = origin.pid,
            exe = origin.exe.as_ref().map(|exe| exe.display().to_string()),
            cgroup_id = origin.cgroup_id,
            "{}: {}",
            refusal.detail,
            refusal.reason,
        );
        if self.verdict.is_empty() {
            self.verdict = "denied";
            self.denial = Some(refusal.kind);
        }
        self.reason = Some(format!("{}: {}", refusal.detail, refusal.reason));
    }
}

/// What one connection did, for the connection's close log line. Never
/// holds a credential.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct InferenceLog {
    /// Requests received, refused ones included.
    pub requests: u64,
    /// The status of the last response, the provider's or the agent's own.
    pub last_status: Option<u16>,
    /// `POST /v1/chat/completions`..., of the last recognised request.
    pub endpoint: Option<&'static str>,
    /// Provider and model of the last routed request.
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Bytes sent to the provider (heads and bodies).
    pub bytes_up: u64,
    /// Bytes sent to the client (heads and bodies, agent errors included).
    pub bytes_down: u64,
    /// The last error or refusal, `type: message`.
    pub error: Option<String>,
}
