//! The sandbox's DNS, answered by the agent (the eBPF side sends every UDP
//! query to port 53 here, and TCP connects to port 53 reach the proxy).
//!
//! `inference.local` gets reserved addresses that the proxy recognises as
//! the managed inference route. Every other query goes to the host's
//! resolver unchanged; the A/AAAA answers are recorded, so the proxy can
//! check that a name the sandbox claims (SNI, Host) stands for the address
//! it connected to, as the sandbox itself was told.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
};

pub const INFERENCE_HOST: &str = "inference.local";
/// From 240.0.0.0/4 (class E) and 100::/64 (RFC 6666, discard-only): never
/// routed, so never a real destination a sandbox could need.
pub const INFERENCE_V4: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 1);
pub const INFERENCE_V6: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1);
const INFERENCE_TTL: u32 = 60;

const RESOLV_CONF: &str = "/etc/resolv.conf";
const DNS_PORT: u16 = 53;
const MAX_MESSAGE: usize = 4096;
/// Well under the 5 s a glibc client waits per try, so a dead upstream
/// becomes a SERVFAIL the client still hears.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries forwarded at once; beyond this a query is dropped and the
/// client's resolver retries.
const MAX_IN_FLIGHT: usize = 256;
/// Names remembered for consistency checks; TTLs are clamped to this range.
const MAX_RECORDED_NAMES: usize = 16_384;
const MIN_RECORD_TTL: u64 = 5;
const MAX_RECORD_TTL: u64 = 3600;

pub fn is_inference_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip == IpAddr::V4(INFERENCE_V4) || ip == IpAddr::V6(INFERENCE_V6)
}

/// Addresses the sandbox was given for each name, until their TTL runs out.
#[derive(Default)]
pub struct DnsRecords {
    names: Mutex<HashMap<String, Vec<(IpAddr, Instant)>>>,
}

impl DnsRecords {
    pub fn addresses(&self, name: &str) -> Vec<IpAddr> {
        let now = Instant::now();
        let names = self.names.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        names
            .get(&normalize(name))
            .map(|entries| entries.iter().filter(|(_, expiry)| *expiry > now).map(|(ip, _)| *ip).collect())
            .unwrap_or_default()
    }

    fn record(&self, name: String, answers: Vec<(IpAddr, u32)>) {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if names.len() >= MAX_RECORDED_NAMES && !names.contains_key(&name) {
            names.retain(|_, entries| entries.iter().any(|(_, expiry)| *expiry > now));
            if names.len() >= MAX_RECORDED_NAMES {
                // Still full of live names: forget an arbitrary one rather than grow.
                if let Some(victim) = names.keys().next().cloned() {
                    names.remove(&victim);
                }
            }
        }
        let entries = names.entry(name).or_default();
        entries.retain(|(_, expiry)| *expiry > now);
        for (ip, ttl) in answers {
            let expiry = now + Duration::from_secs(u64::from(ttl).clamp(MIN_RECORD_TTL, MAX_RECORD_TTL));
            entries.retain(|(known, _)| *known != ip);
            entries.push((ip, expiry));
        }
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

pub struct DnsResponder {
    upstream: SocketAddr,
    pub records: Arc<DnsRecords>,
    in_flight: Arc<Semaphore>,
}

impl DnsResponder {
    /// `upstream`: where other queries go (default: the first nameserver of /etc/resolv.conf).
    pub fn new(upstream: Option<SocketAddr>) -> Result<Self> {
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
        tracing::info!(%upstream, "DNS: answering the sandbox, forwarding to this resolver");
        Ok(Self { upstream, records: Arc::default(), in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)) })
    }

    /// Serves DNS over UDP on `socket` (the agent's loopback port).
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut buffer = vec![0u8; MAX_MESSAGE];
        loop {
            let (len, client) = match socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(%error, "DNS: receive failed");
                    continue;
                }
            };
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                tracing::warn!(%client, "DNS: too many queries in flight, dropping one");
                continue;
            };
            let query = buffer[..len].to_vec();
            let (responder, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                if let Some(reply) = responder.answer(&query).await {
                    let _ = socket.send_to(&reply, client).await;
                }
                drop(permit);
            });
        }
    }

    /// Every address `name` has (A and AAAA), asked of the same upstream as
    /// the sandbox's queries, and recorded like them. An IP literal is its
    /// own answer. The upstream socket is connected, so a refusing server
    /// fails at once instead of after a timeout.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // Fully qualified: the answer must not depend on search domains.
        let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
            .map_err(|error| format!("cannot resolve {name}: {error}"))?;
        let (v4, v6) = tokio::join!(self.ask(&fqdn, RecordType::A), self.ask(&fqdn, RecordType::AAAA));
        let addresses: Vec<IpAddr> = match (v4, v6) {
            (Err(error), Err(_)) => return Err(format!("cannot resolve {name}: {error}")),
            (v4, v6) => v4.into_iter().chain(v6).flatten().collect(),
        };
        if addresses.is_empty() {
            return Err(format!("{name} has no addresses"));
        }
        Ok(addresses)
    }

    async fn ask(&self, name: &Name, record_type: RecordType) -> Result<Vec<IpAddr>, String> {
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
        self.record_answers(&reply);
        Ok(addresses_in(&message).map(|(ip, _)| ip).collect())
    }

    /// Serves DNS over TCP (two-byte length prefixes) on a redirected connection.
    pub async fn serve_tcp(&self, mut stream: TcpStream) -> io::Result<()> {
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
                Ok(Ok(len)) => usize::from(len),
                Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(error)) => return Err(error),
                Err(_) => return Ok(()),
            };
            let mut query = vec![0u8; len];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
                .await
                .map_err(|_| io::ErrorKind::TimedOut)??;
            let Some(reply) = self.answer(&query).await else { return Ok(()) };
            let len = u16::try_from(reply.len()).map_err(|_| io::ErrorKind::InvalidData)?;
            stream.write_all(&[&len.to_be_bytes()[..], &reply].concat()).await?;
        }
    }

    /// The reply to one query, or `None` to stay silent (unparseable query).
    async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        if let Some(question) = request.queries.first() {
            if normalize(&question.name().to_ascii()) == INFERENCE_HOST {
                return answer_inference(&request).to_vec().ok();
            }
        }
        match self.forward(query).await {
            Ok(reply) => {
                self.record_answers(&reply);
                Some(reply)
            }
            Err(error) => {
                tracing::warn!(%error, upstream = %self.upstream, "DNS: upstream resolver failed");
                let mut failure =
                    Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::ServFail);
                failure.queries = request.queries.clone();
                failure.to_vec().ok()
            }
        }
    }

    async fn forward(&self, query: &[u8]) -> io::Result<Vec<u8>> {
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

    fn record_answers(&self, reply: &[u8]) {
        let Ok(message) = Message::from_vec(reply) else { return };
        let Some(question) = message.queries.first() else { return };
        // Answers may come through CNAMEs: the name asked for is what the sandbox will claim.
        let answers: Vec<(IpAddr, u32)> = addresses_in(&message).collect();
        if !answers.is_empty() {
            self.records.record(normalize(&question.name().to_ascii()), answers);
        }
    }
}

/// The A and AAAA answers of a reply, with their TTLs.
fn addresses_in(message: &Message) -> impl Iterator<Item = (IpAddr, u32)> + '_ {
    message.answers.iter().filter_map(|record| match &record.data {
        RData::A(A(ip)) => Some((IpAddr::V4(*ip), record.ttl)),
        RData::AAAA(AAAA(ip)) => Some((IpAddr::V6(*ip), record.ttl)),
        _ => None,
    })
}

fn answer_inference(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = request.queries.clone();
    if let Some(question) = request.queries.first() {
        let data = match question.query_type() {
            RecordType::A => Some(RData::A(A(INFERENCE_V4))),
            RecordType::AAAA => Some(RData::AAAA(AAAA(INFERENCE_V6))),
            _ => None,
        };
        if let Some(data) = data {
            reply.answers.push(Record::from_rdata(question.name().clone(), INFERENCE_TTL, data));
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, record_type: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.queries.push(Query::query(Name::from_ascii(name).unwrap(), record_type));
        message.to_vec().unwrap()
    }

    /// A fake upstream resolver on loopback answering every A query with `ip`.
    async fn fake_upstream(ip: Ipv4Addr) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; MAX_MESSAGE];
            while let Ok((len, client)) = socket.recv_from(&mut buffer).await {
                let request = Message::from_vec(&buffer[..len]).unwrap();
                let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
                reply.queries = request.queries.clone();
                let question = &request.queries[0];
                if question.query_type() == RecordType::A {
                    reply.answers.push(Record::from_rdata(question.name().clone(), 120, RData::A(A(ip))));
                }
                socket.send_to(&reply.to_vec().unwrap(), client).await.unwrap();
            }
        });
        address
    }

    #[tokio::test]
    async fn inference_local_gets_the_reserved_addresses() {
        let responder = DnsResponder::new(Some("127.0.0.1:9".parse().unwrap())).unwrap();
        for (record_type, expected) in
            [(RecordType::A, IpAddr::V4(INFERENCE_V4)), (RecordType::AAAA, IpAddr::V6(INFERENCE_V6))]
        {
            let reply =
                Message::from_vec(&responder.answer(&query("Inference.Local.", record_type)).await.unwrap()).unwrap();
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            let addresses: Vec<IpAddr> = reply
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(A(ip)) => Some(IpAddr::V4(*ip)),
                    RData::AAAA(AAAA(ip)) => Some(IpAddr::V6(*ip)),
                    _ => None,
                })
                .collect();
            assert_eq!(addresses, vec![expected]);
            assert!(is_inference_address(expected));
        }
        let mx =
            Message::from_vec(&responder.answer(&query("inference.local.", RecordType::MX)).await.unwrap()).unwrap();
        assert!(mx.answers.is_empty());
    }

    #[tokio::test]
    async fn other_names_are_forwarded_and_their_answers_recorded() {
        let upstream = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let responder = DnsResponder::new(Some(upstream)).unwrap();
        let reply =
            Message::from_vec(&responder.answer(&query("api.example.test.", RecordType::A)).await.unwrap()).unwrap();
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(responder.records.addresses("API.example.test"), vec![IpAddr::from([10, 1, 2, 3])]);
        assert!(responder.records.addresses("other.test").is_empty());
    }

    #[tokio::test]
    async fn lookups_go_to_the_same_upstream_and_are_recorded() {
        let upstream = fake_upstream(Ipv4Addr::new(10, 9, 8, 7)).await;
        let responder = DnsResponder::new(Some(upstream)).unwrap();
        assert_eq!(responder.lookup("svc.test").await.unwrap(), vec![IpAddr::from([10, 9, 8, 7])]);
        assert_eq!(responder.records.addresses("svc.test"), vec![IpAddr::from([10, 9, 8, 7])]);
        assert_eq!(responder.lookup("10.0.0.5").await.unwrap(), vec![IpAddr::from([10, 0, 0, 5])]);
        let refused = DnsResponder::new(Some("127.0.0.1:9".parse().unwrap())).unwrap();
        let started = Instant::now();
        assert!(refused.lookup("svc.test").await.unwrap_err().starts_with("cannot resolve svc.test: 127.0.0.1:9"));
        assert!(started.elapsed() < Duration::from_millis(500), "a refusing upstream must fail at once");
    }

    #[tokio::test]
    async fn a_dead_upstream_gives_servfail() {
        // Nothing answers on the discard port of loopback.
        let responder = DnsResponder::new(Some("127.0.0.1:9".parse().unwrap())).unwrap();
        let reply = Message::from_vec(&responder.answer(&query("x.test.", RecordType::A)).await.unwrap()).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn garbage_gets_no_reply() {
        let responder = DnsResponder::new(Some("127.0.0.1:9".parse().unwrap())).unwrap();
        assert!(responder.answer(b"\x00\x01garbage").await.is_none());
    }

    #[test]
    fn recorded_names_are_bounded() {
        let records = DnsRecords::default();
        for i in 0..MAX_RECORDED_NAMES + 10 {
            records.record(format!("n{i}.test"), vec![(IpAddr::from([10, 0, 0, 1]), 60)]);
        }
        assert_eq!(records.names.lock().unwrap().len(), MAX_RECORDED_NAMES);
    }
}
