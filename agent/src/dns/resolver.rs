//! The agent's own lookups (CONNECT, the plain-HTTP gate, SNI and Host
//! checks, inference providers), asked of the same resolver the sandboxes'
//! queries are forwarded to, and never recorded as a sandbox's answers.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        Name, RData, RecordType,
    },
};
use tokio::net::UdpSocket;

use super::{normalize, MAX_MESSAGE};

const RESOLV_CONF: &str = "/etc/resolv.conf";
const DNS_PORT: u16 = 53;
/// Well under the 5 s a glibc client waits per try, so a dead upstream
/// becomes a SERVFAIL the client still hears.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The upstream resolver, and the answers of the agent's own lookups.
pub struct Resolver {
    upstream: SocketAddr,
    lookups: LookupCache,
}

/// The agent's own lookups (CONNECT, the plain-HTTP gate, SNI and Host
/// checks), kept for their answers' TTL, at most `--dns-record-max-ttl`: the
/// requests of a keep-alive connection then cost no round trip to the
/// resolver each. A TTL of 0 is not kept, nor is a failure.
pub(super) struct LookupCache {
    pub(super) max_ttl: Duration,
    pub(super) entries: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

/// Names whose lookups are kept; past this the cache starts over.
pub(super) const MAX_CACHED_LOOKUPS: usize = 4096;

impl LookupCache {
    pub(super) fn get(&self, name: &str, now: Instant) -> Option<Vec<IpAddr>> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.get(name).filter(|(_, expiry)| *expiry > now).map(|(addresses, _)| addresses.clone())
    }

    pub(super) fn put(&self, name: &str, answers: &[(IpAddr, u32)], now: Instant) {
        let Some(ttl) = answers.iter().map(|&(_, ttl)| ttl).min().filter(|&ttl| ttl > 0) else { return };
        let expiry = now + Duration::from_secs(ttl.into()).min(self.max_ttl);
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MAX_CACHED_LOOKUPS {
            entries.retain(|_, (_, kept_until)| *kept_until > now);
            if entries.len() >= MAX_CACHED_LOOKUPS {
                entries.clear();
            }
        }
        entries.insert(name.to_owned(), (answers.iter().map(|&(ip, _)| ip).collect(), expiry));
    }
}

impl Resolver {
    /// `upstream`: where queries go (default: the first nameserver of
    /// /etc/resolv.conf); lookups are kept at most `max_ttl`.
    pub fn new(upstream: Option<SocketAddr>, max_ttl: Duration) -> Result<Self> {
        let upstream = match upstream {
            Some(server) => server,
            None => {
                let text = std::fs::read(RESOLV_CONF).with_context(|| format!("read {RESOLV_CONF}"))?;
                let config = resolv_conf::Config::parse(text).with_context(|| format!("parse {RESOLV_CONF}"))?;
                let server = config
                    .nameservers
                    .first()
                    .cloned()
                    .with_context(|| format!("{RESOLV_CONF} lists no nameserver"))?;
                SocketAddr::new(server.into(), DNS_PORT)
            }
        };
        Ok(Self { upstream, lookups: LookupCache { max_ttl, entries: Mutex::default() } })
    }

    /// Where queries go.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Every address `name` has (A and AAAA), asked of the same upstream as
    /// the sandbox's queries. Not recorded: the records are what a sandbox
    /// was told, and decide its streams. An IP literal is its
    /// own answer. The upstream socket is connected, so a refusing server
    /// fails at once instead of after a timeout.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        // A v4-mapped literal is its IPv4 address, as every check compares it.
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip.to_canonical()]);
        }
        let key = normalize(name);
        // RFC 6761: localhost names are loopback, never asked of a server
        // (a provider at http://localhost:11434 resolves as it does for curl).
        if key == "localhost" || key.ends_with(".localhost") {
            return Ok(vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]);
        }
        if let Some(addresses) = self.lookups.get(&key, Instant::now()) {
            return Ok(addresses);
        }
        // Fully qualified: the answer must not depend on search domains.
        let fqdn = Name::from_ascii(format!("{key}.")).map_err(|error| format!("cannot resolve {name}: {error}"))?;
        // Boxed: only a cache miss pays for the queries' futures, not every
        // connection future that may look a name up.
        let (v4, v6) =
            Box::pin(async { tokio::join!(self.ask(&fqdn, RecordType::A), self.ask(&fqdn, RecordType::AAAA)) }).await;
        let answers: Vec<(IpAddr, u32)> = match (v4, v6) {
            (Err(error), Err(_)) => return Err(format!("cannot resolve {name}: {error}")),
            (v4, v6) => v4.into_iter().chain(v6).flatten().collect(),
        };
        if answers.is_empty() {
            return Err(format!("{name} has no addresses"));
        }
        self.lookups.put(&key, &answers, Instant::now());
        Ok(answers.into_iter().map(|(ip, _)| ip).collect())
    }

    /// The addresses in the answer, each with its TTL.
    async fn ask(&self, name: &Name, record_type: RecordType) -> Result<Vec<(IpAddr, u32)>, String> {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.queries.push(Query::query(name.clone(), record_type));
        let bytes = query.to_vec().map_err(|error| error.to_string())?;
        let reply = self.forward(&bytes).await.map_err(|error| format!("{} ({error})", self.upstream))?;
        let message =
            Message::from_vec(&reply).map_err(|error| format!("bad reply from {}: {error}", self.upstream))?;
        if message.metadata.id != query.metadata.id {
            return Err(format!("reply from {} answers another query", self.upstream));
        }
        match message.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            code => return Err(format!("{} answered {code}", self.upstream)),
        }
        Ok(addresses_in(&message).collect())
    }

    /// Sends one query upstream and returns the reply.
    pub(super) async fn forward(&self, query: &[u8]) -> io::Result<Vec<u8>> {
        let bind: SocketAddr =
            if self.upstream.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("valid");
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(self.upstream).await?;
        socket.send(query).await?;
        let mut reply = vec![0u8; MAX_MESSAGE];
        let len = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut reply))
            .await
            .map_err(|_| io::ErrorKind::TimedOut)??;
        reply.truncate(len);
        Ok(reply)
    }
}

/// The A and AAAA answers of a reply, with their TTLs.
pub(super) fn addresses_in(message: &Message) -> impl Iterator<Item = (IpAddr, u32)> + '_ {
    message.answers.iter().filter_map(|record| match &record.data {
        RData::A(A(ip)) => Some((IpAddr::V4(*ip), record.ttl)),
        RData::AAAA(AAAA(ip)) => Some((IpAddr::V6(*ip), record.ttl)),
        _ => None,
    })
}
