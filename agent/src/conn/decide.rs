//! Decisions: the Rego policy, plus the checks the agent makes itself
//! whatever the policy says (sensitive addresses, host/address consistency,
//! the private-IP gate for plain HTTP).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use ipnet::IpNet;

use super::{
    origin::Origin,
    verdict::{Allowed, Denial, Verdict},
};
use crate::{
    dns::{DnsRecords, Resolver},
    observe::SandboxMetrics,
    policy::{Decision, HttpRequest, Inspection, PolicyStore, Request, RequestDecision},
    ssrf::{sensitive_address_allowed, AddressClass},
};

pub struct Decider {
    pub policies: PolicyStore,
    /// What the agent's DNS told each sandbox.
    pub records: Arc<DnsRecords>,
    /// The agent's own lookups.
    pub resolver: Arc<Resolver>,
    /// Where the time each decision takes is counted.
    pub observed: Arc<SandboxMetrics>,
}

impl Decider {
    /// A stream relayed to the destination the sandbox chose: TLS (host from
    /// SNI) or opaque TCP (no host). Without a host of its own, a stream is
    /// decided by the names this sandbox resolved to the address through the
    /// agent's DNS (by the address alone if none).
    pub async fn stream(&self, origin: &Origin, host: Option<&str>, destination: SocketAddr) -> Verdict {
        let request = request(origin, host, Some(destination.ip()), destination.port());
        let resolved = host.is_none().then(|| self.records.names(origin.cgroup_id, destination.ip()));
        let (generation, decision, resolved_host) = self.evaluate(&request, resolved.as_deref());
        let outcome = async {
            let allowed = allowed_by_policy(decision)?;
            allowed.check_sensitive(destination.ip())?;
            if let Some(host) = host {
                self.check_consistent(origin.cgroup_id, host, destination.ip()).await?;
            }
            Ok(Allowed { resolved_host, ..allowed.to(destination) })
        };
        Verdict { outcome: outcome.await, generation, port: destination.port(), address: Some(destination.ip()) }
    }

    /// Whether the kernel may let `origin`'s executable connect to
    /// `destination` on its own from now on: the same decision by the
    /// executable alone (no ancestor), by an endpoint declared `protocol:
    /// tcp` (L4: no byte is looked at), not inspected, without a host of its
    /// own (an IP literal, or a name this cgroup resolved through the
    /// agent's DNS: then only while that answer lives), and not a sensitive
    /// address unless listed.
    pub fn fast_path(&self, origin: &Origin, destination: SocketAddr) -> Option<FastAllow> {
        origin.exe.as_ref()?;
        let request = Request { ancestors: &[], ..request(origin, None, Some(destination.ip()), destination.port()) };
        let resolved = self.records.names(origin.cgroup_id, destination.ip());
        let (generation, decision, resolved_host) = self.evaluate(&request, Some(&resolved));
        let l4 = decision.endpoint.as_ref().is_some_and(|endpoint| endpoint.protocol.as_deref() == Some("tcp"));
        if !decision.allow || decision.inspect.is_some() || !l4 {
            return None;
        }
        let allowed = allowed_by_policy(decision).ok()?;
        allowed.check_sensitive(destination.ip()).ok()?;
        let expires = match resolved_host {
            Some(name) => Some(self.records.expiry(origin.cgroup_id, &name, destination.ip())?),
            None => None,
        };
        Some(FastAllow { generation, policy: allowed.policy?, expires })
    }

    /// An explicit `CONNECT host:port`: the agent resolves the host and
    /// connects to an address it checked.
    pub async fn connect(&self, origin: &Origin, host: &str, port: u16) -> Verdict {
        let addresses = match self.resolver.lookup(host).await {
            Ok(addresses) => addresses,
            Err(reason) => return self.unresolved(reason, port),
        };
        let mut last = None;
        for ip in addresses {
            let (generation, decision, _) = self.evaluate(&request(origin, Some(host), Some(ip), port), None);
            let outcome = allowed_by_policy(decision).and_then(|allowed| {
                allowed.check_sensitive(ip)?;
                Ok(allowed.to(SocketAddr::new(ip, port)))
            });
            let verdict = Verdict { outcome, generation, port, address: Some(ip) };
            if verdict.outcome.is_ok() {
                return verdict;
            }
            last = Some(verdict);
        }
        last.expect("lookup returns at least one address")
    }

    /// The private-IP gate: plain HTTP is forwarded only when the policy
    /// allows the host, its endpoint lists `allowed_ips`, and every address
    /// the host resolves to is private (or an explicitly listed sensitive
    /// address) and inside `allowed_ips`. `destination` is the address the
    /// sandbox connected to (transparent) or `None` (explicit proxy request).
    pub async fn plain_http(&self, origin: &Origin, host: &str, port: u16, destination: Option<IpAddr>) -> Verdict {
        let (generation, decision, _) = self.evaluate(&request(origin, Some(host), destination, port), None);
        let outcome = async {
            let allowed = allowed_by_policy(decision)?;
            let addresses = self.resolver.lookup(host).await.map_err(Denial::unresolved)?;
            if let Some(destination) = destination {
                let connected = addresses.iter().any(|ip| ip.to_canonical() == destination.to_canonical());
                if !connected && !self.was_told(origin.cgroup_id, host, destination) {
                    return Err(mismatch(host, destination));
                }
            }
            if allowed.allowed_ips.is_empty() {
                return Err(Denial::ssrf(
                    addresses[0],
                    format!("plain HTTP to {host}:{port} is forwarded only to endpoints that list allowed_ips"),
                ));
            }
            for &ip in &addresses {
                allowed.check_sensitive(ip)?;
                let class = AddressClass::of(ip);
                if !class.is_sensitive() && class != AddressClass::Private {
                    return Err(Denial::ssrf(
                        ip,
                        format!("plain HTTP to {host}:{port} is forwarded only to private addresses, and {host} resolves to {ip} ({})", class.name()),
                    ));
                }
                if !allowed.allowed_ips.iter().any(|net| net.contains(&ip.to_canonical())) {
                    return Err(Denial::ssrf(
                        ip,
                        format!("{host} resolves to {ip}, which is outside the endpoint's allowed_ips"),
                    ));
                }
            }
            Ok(allowed.to(SocketAddr::new(destination.unwrap_or(addresses[0]), port)))
        };
        Verdict { outcome: outcome.await, generation, port, address: destination }
    }

    /// One HTTP request on a connection an inspected endpoint allowed,
    /// decided by the current policy (a reload applies to the next request
    /// of an open connection): the connection itself first, then the rules.
    pub fn request(
        &self,
        origin: &Origin,
        host: &str,
        destination: SocketAddr,
        http: &HttpRequest,
    ) -> (u64, RequestDecision) {
        let started = Instant::now();
        let current = self.policies.current();
        let connection = request(origin, Some(host), Some(destination.ip()), destination.port());
        let decided = current.policy.evaluate(&connection).and_then(|decision| match decision {
            Decision { allow: false, reason, .. } => Ok(RequestDecision::denied(reason)),
            // No longer inspected since a reload: the connection's allow stands for its requests.
            Decision { inspect: None, policy, .. } => Ok(RequestDecision {
                allow: true,
                audit: false,
                policy,
                rule: None,
                reason: None,
                credential_provider: None,
            }),
            Decision { inspect: Some(_), .. } => current.policy.evaluate_request(&connection, http),
        });
        let decision = decided.unwrap_or_else(|error| {
            tracing::error!(%error, "policy evaluation failed: denying");
            RequestDecision::denied(Some(format!("policy evaluation failed: {error}")))
        });
        self.observed.decided_in(started.elapsed());
        (current.generation, decision)
    }

    /// With `resolved`, a stream without a host decided by those names (see
    /// [`crate::policy::Policy::evaluate_resolved`]); also returns the name that allowed.
    fn evaluate(&self, request: &Request, resolved: Option<&[String]>) -> (u64, Decision, Option<String>) {
        let started = Instant::now();
        let current = self.policies.current();
        let evaluated = match resolved {
            None => current.policy.evaluate(request).map(|decision| (decision, None)),
            Some(names) => current.policy.evaluate_resolved(request, names),
        };
        let (decision, resolved_host) = evaluated.unwrap_or_else(|error| {
            tracing::error!(%error, "policy evaluation failed: denying");
            let decision = Decision {
                allow: false,
                audit: false,
                policy: None,
                reason: Some(format!("policy evaluation failed: {error}")),
                endpoint: None,
                matched_binary: None,
                matched_exe: None,
                inspect: None,
            };
            (decision, None)
        });
        self.observed.decided_in(started.elapsed());
        (current.generation, decision, resolved_host)
    }

    fn unresolved(&self, reason: String, port: u16) -> Verdict {
        let generation = self.policies.current().generation;
        Verdict { outcome: Err(Denial::unresolved(reason)), generation, port, address: None }
    }

    /// A name the sandbox claims (SNI, Host) must stand for the address it
    /// connected to, by what the agent's DNS told this sandbox or by the
    /// agent's own lookup: an allowed name must not be a ticket to any address.
    async fn check_consistent(&self, sandbox: u64, host: &str, destination: IpAddr) -> Result<(), Denial> {
        if self.was_told(sandbox, host, destination) {
            return Ok(());
        }
        let addresses = self.resolver.lookup(host).await.map_err(Denial::unresolved)?;
        if addresses.iter().any(|ip| ip.to_canonical() == destination.to_canonical()) {
            Ok(())
        } else {
            Err(mismatch(host, destination))
        }
    }

    /// Whether the agent's DNS gave `sandbox` the address `destination` for `host`.
    fn was_told(&self, sandbox: u64, host: &str, destination: IpAddr) -> bool {
        self.records.addresses(sandbox, host).contains(&destination.to_canonical())
    }
}

fn request<'a>(origin: &'a Origin, host: Option<&'a str>, ip: Option<IpAddr>, port: u16) -> Request<'a> {
    Request {
        host,
        ip,
        port,
        binary: origin.exe.as_deref(),
        ancestors: &origin.ancestors,
        uid: origin.uid,
        cgroup_id: origin.cgroup_id,
    }
}

fn mismatch(host: &str, destination: IpAddr) -> Denial {
    Denial::mismatch(format!("{host} does not resolve to {destination}, the address the sandbox connected to"))
}

/// A decision the kernel may repeat on its own (see [`Decider::fast_path`]).
pub struct FastAllow {
    /// The policy generation it was made under.
    pub generation: u64,
    pub policy: String,
    /// When the DNS answer it rests on expires; `None`: never (an address).
    pub expires: Option<Instant>,
}

/// The policy's allow, before the agent's own checks pick the upstream.
struct PolicyAllow {
    policy: Option<String>,
    audit: Option<String>,
    /// The matched endpoint's, as listed.
    allowed_ips: Vec<IpNet>,
    /// The matched endpoint's host when it is an IP literal.
    literal_host: Option<IpAddr>,
    inspect: Option<Inspection>,
}

impl PolicyAllow {
    fn to(self, upstream: SocketAddr) -> Allowed {
        Allowed { upstream, policy: self.policy, audit: self.audit, resolved_host: None, inspect: self.inspect }
    }

    /// Sensitive addresses need an explicit listing: in `allowed_ips`, or as
    /// the endpoint's own IP-literal host (`host: 127.0.0.1`).
    fn check_sensitive(&self, ip: IpAddr) -> Result<(), Denial> {
        let literal = self.literal_host.map(IpNet::from);
        let listed: Vec<IpNet> = self.allowed_ips.iter().copied().chain(literal).collect();
        if sensitive_address_allowed(ip, &listed) {
            return Ok(());
        }
        let class = AddressClass::of(ip);
        Err(Denial::ssrf(ip, format!("{ip} is a {} address and no endpoint lists it explicitly", class.name())))
    }
}

fn allowed_by_policy(decision: Decision) -> Result<PolicyAllow, Denial> {
    if !decision.allow {
        return Err(Denial::policy(decision.reason.unwrap_or_else(|| "denied by policy".into())));
    }
    let (allowed_ips, literal_host) = decision
        .endpoint
        .map(|endpoint| (endpoint.allowed_ips, endpoint.host.and_then(|host| host.parse().ok())))
        .unwrap_or_default();
    Ok(PolicyAllow {
        inspect: decision.inspect,
        allowed_ips,
        literal_host,
        audit: decision.audit.then(|| decision.reason.unwrap_or_default()),
        policy: decision.policy,
    })
}
