//! The sandbox's DNS, answered by the agent (the eBPF side sends every UDP
//! query to port 53 here, and TCP connects to port 53 reach the proxy).
//!
//! `inference.local` gets reserved addresses that the proxy recognises as
//! the managed inference route. Otherwise only names the policy could allow
//! are answered (a host or wildcard of some endpoint, whatever its ports and
//! binaries: DNS has no process to check), for the query types a client
//! needs to connect (A, AAAA, CNAME, HTTPS, SVCB, SRV): those queries go to
//! the host's resolver unchanged. Anything else gets REFUSED without leaving
//! the machine, so DNS cannot carry data out (tunnelling encodes it in the
//! names asked, and reads TXT or NULL answers).
//!
//! Each sandbox (cgroup) has its own query rate and queries in flight, so
//! one flooding sandbox is refused while the others are still answered.
//!
//! The A/AAAA answers are recorded per sandbox (see [`DnsRecords`]): the
//! proxy decides opaque streams by the names the sandbox resolved to the
//! address it connects to, and checks that a name the sandbox claims (SNI,
//! Host) stands for that address, as the sandbox itself was told.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        DNSClass, Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use tracing::Instrument;

use crate::proxy::PolicyStore;

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
/// What a client needs to connect to a name; TXT, NULL, MX, ANY and the
/// rest are refused (TXT and NULL are what DNS tunnels read data from).
const ANSWERED_TYPES: [RecordType; 6] =
    [RecordType::A, RecordType::AAAA, RecordType::CNAME, RecordType::HTTPS, RecordType::SVCB, RecordType::SRV];
/// Sandboxes with budget state kept; idle ones (no query in flight, a full
/// bucket) are forgotten first, as they equal a fresh entry.
const MAX_SANDBOXES: usize = 4096;
/// A refused name is logged once per sandbox in this interval...
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
const MAX_LOGGED_NAMES: usize = 4096;
/// ...and each sandbox logs at most this many refusal lines a second.
const LOG_LINES_PER_SECOND: u32 = 5;
/// (name, address) pairs recorded per sandbox, beyond which the oldest go.
pub const RECORDS_PER_SANDBOX: usize = 4096;

pub fn is_inference_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip == IpAddr::V4(INFERENCE_V4) || ip == IpAddr::V6(INFERENCE_V6)
}

/// How long answers are kept, and how many.
#[derive(Clone, Copy, Debug)]
pub struct RecordLimits {
    /// An answer is kept for its TTL, but at least this long (a TTL of 0
    /// must still cover the connect that follows the lookup)...
    pub min_ttl: Duration,
    /// ...and at most this long; longer TTLs in the replies to the sandbox
    /// are lowered to this, so its own cache expires no later than the record.
    pub max_ttl: Duration,
    /// (name, address) pairs kept per sandbox; the oldest go first.
    pub per_sandbox: usize,
}

/// What the agent's DNS told each sandbox: the names it answered and the
/// addresses in each answer, until their (clamped) TTL runs out. The proxy
/// decides a stream without a host of its own by the names its sandbox
/// resolved to the address, and checks a claimed name (SNI, Host) against
/// the addresses its sandbox was given.
pub struct DnsRecords {
    limits: RecordLimits,
    sandboxes: Mutex<HashMap<u64, VecDeque<Answer>>>,
}

struct Answer {
    name: String,
    ip: IpAddr,
    expiry: Instant,
}

impl DnsRecords {
    pub fn new(limits: RecordLimits) -> Self {
        Self { limits, sandboxes: Mutex::default() }
    }

    /// The live addresses `sandbox` was given for `name`.
    pub fn addresses(&self, sandbox: u64, name: &str) -> Vec<IpAddr> {
        let name = normalize(name);
        self.live(sandbox, Instant::now(), |answer| (answer.name == name).then_some(answer.ip))
    }

    /// The names `sandbox` resolved to `ip` whose answers are still live,
    /// the most recent first.
    pub fn names(&self, sandbox: u64, ip: IpAddr) -> Vec<String> {
        self.names_at(sandbox, ip, Instant::now())
    }

    fn names_at(&self, sandbox: u64, ip: IpAddr, now: Instant) -> Vec<String> {
        let ip = ip.to_canonical();
        self.live(sandbox, now, |answer| (answer.ip == ip).then(|| answer.name.clone()))
    }

    /// A scan, newest first: at most `per_sandbox` entries, cheap next to
    /// the policy evaluation that follows, and no second index to keep in step.
    fn live<T: PartialEq>(&self, sandbox: u64, now: Instant, pick: impl Fn(&Answer) -> Option<T>) -> Vec<T> {
        let sandboxes = self.lock();
        let mut found = Vec::new();
        for answer in sandboxes.get(&sandbox).into_iter().flatten().rev().filter(|answer| answer.expiry > now) {
            if let Some(value) = pick(answer).filter(|value| !found.contains(value)) {
                found.push(value);
            }
        }
        found
    }

    fn record(&self, sandbox: u64, name: &str, answers: &[(IpAddr, u32)], now: Instant) {
        let RecordLimits { min_ttl, max_ttl, per_sandbox } = self.limits;
        let name = normalize(name);
        let mut sandboxes = self.lock();
        if sandboxes.len() >= MAX_SANDBOXES && !sandboxes.contains_key(&sandbox) {
            sandboxes.retain(|_, entries| entries.iter().any(|answer| answer.expiry > now));
            if sandboxes.len() >= MAX_SANDBOXES {
                // All live: forget one sandbox's answers (it is then decided by address) rather than grow.
                if let Some(victim) = sandboxes.keys().next().copied() {
                    sandboxes.remove(&victim);
                }
            }
        }
        let entries = sandboxes.entry(sandbox).or_default();
        for &(ip, ttl) in answers {
            let ip = ip.to_canonical();
            entries.retain(|answer| answer.expiry > now && !(answer.ip == ip && answer.name == name));
            let expiry = now + Duration::from_secs(ttl.into()).clamp(min_ttl, max_ttl);
            entries.push_back(Answer { name: name.clone(), ip, expiry });
            while entries.len() > per_sandbox {
                entries.pop_front();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<Answer>>> {
        self.sandboxes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The cgroup id of the sandbox that sent a query; `None` when unknown
/// (such queries share one budget of their own).
pub type Sandbox = Option<u64>;

/// Which sandbox sent a UDP query, from its source address.
pub type SandboxOf = Arc<dyn Fn(SocketAddr) -> Sandbox + Send + Sync>;

/// Counts each query by its answer ([`answer_label`]), for the metrics.
pub type CountAnswer = Arc<dyn Fn(&'static str) + Send + Sync>;

/// The answer a reply gives, by its response code; `dropped` for none.
fn answer_label(reply: Option<&[u8]>) -> &'static str {
    match reply.and_then(|reply| reply.get(3)).map(|flags| flags & 0x0f) {
        None => "dropped",
        Some(0) => "noerror",
        Some(1) => "formerr",
        Some(2) => "servfail",
        Some(3) => "nxdomain",
        Some(4) => "notimp",
        Some(5) => "refused",
        Some(_) => "other",
    }
}

/// Budgets for the sandboxes' queries; over one, a query gets REFUSED at
/// once instead of being forwarded.
#[derive(Clone, Copy, Debug)]
pub struct DnsLimits {
    /// Queries forwarded at once, all sandboxes together.
    pub max_in_flight: usize,
    /// Queries forwarded at once for one sandbox.
    pub max_in_flight_per_sandbox: usize,
    /// Each sandbox's sustained rate, with bursts of as many queries.
    pub queries_per_second: u32,
}

pub struct DnsResponder {
    upstream: SocketAddr,
    pub records: DnsRecords,
    budgets: Arc<Budgets>,
    lookups: LookupCache,
}

/// The agent's own lookups (CONNECT, the plain-HTTP gate, SNI and Host
/// checks), kept for their answers' TTL, at most `--dns-record-max-ttl`: the
/// requests of a keep-alive connection then cost no round trip to the
/// resolver each. A TTL of 0 is not kept, nor is a failure.
struct LookupCache {
    max_ttl: Duration,
    entries: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

/// Names whose lookups are kept; past this the cache starts over.
const MAX_CACHED_LOOKUPS: usize = 4096;

impl LookupCache {
    fn get(&self, name: &str, now: Instant) -> Option<Vec<IpAddr>> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.get(name).filter(|(_, expiry)| *expiry > now).map(|(addresses, _)| addresses.clone())
    }

    fn put(&self, name: &str, answers: &[(IpAddr, u32)], now: Instant) {
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

fn names_host(policies: &PolicyStore, name: &str) -> bool {
    let current = policies.current();
    current.policy.names_host(name).unwrap_or_else(|error| {
        tracing::error!(generation = current.generation, "DNS: policy evaluation failed, refusing: {error:#}");
        false
    })
}

/// What to do with one query.
enum Step {
    /// Unparseable, or not a query: stay silent.
    Silent,
    Reply(Vec<u8>),
    /// Forward it upstream, holding its place in the budgets meanwhile.
    Forward(QueryPermit, Message),
}

#[derive(Clone, Copy)]
enum Refusal {
    /// Not a single IN-class question of an answered type.
    Unanswered,
    /// The name is no host of any policy.
    NotNamed,
    OverRate,
    OverInFlight,
}

impl DnsResponder {
    /// `upstream`: where allowed queries go (default: the first nameserver
    /// of /etc/resolv.conf). One responder serves every sandbox: each query
    /// is answered for the policy of the sandbox whose socket it came to.
    pub fn new(upstream: Option<SocketAddr>, limits: DnsLimits, records: RecordLimits) -> Result<Self> {
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
        tracing::info!(
            %upstream,
            max_in_flight = limits.max_in_flight,
            max_in_flight_per_sandbox = limits.max_in_flight_per_sandbox,
            queries_per_second = limits.queries_per_second,
            record_min_ttl_s = records.min_ttl.as_secs(),
            record_max_ttl_s = records.max_ttl.as_secs(),
            "DNS: answering the sandbox for the policy's hosts, forwarding to this resolver"
        );
        let budgets = Arc::new(Budgets::new(limits));
        let lookups = LookupCache { max_ttl: records.max_ttl, entries: Mutex::default() };
        Ok(Self { upstream, records: DnsRecords::new(records), budgets, lookups })
    }

    /// Serves DNS over UDP on `socket` (a sandbox's loopback port), for the
    /// names of `policies` (read per query: a reload changes them at once).
    pub async fn serve_udp(
        self: Arc<Self>,
        socket: UdpSocket,
        sandbox_of: SandboxOf,
        policies: PolicyStore,
        count: CountAnswer,
    ) {
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
            // Decided here, so refusals cost no task and tasks are bounded by the budgets.
            match self.prepare(&buffer[..len], sandbox_of(client), &policies) {
                Step::Silent => count(answer_label(None)),
                Step::Reply(reply) => {
                    count(answer_label(Some(&reply)));
                    let _ = socket.send_to(&reply, client).await;
                }
                Step::Forward(permit, request) => {
                    let query = buffer[..len].to_vec();
                    let (responder, socket, count) = (self.clone(), socket.clone(), count.clone());
                    tokio::spawn(
                        async move {
                            let reply = responder.forward_answer(&query, &request, permit.sandbox).await;
                            count(answer_label(reply.as_deref()));
                            if let Some(reply) = reply {
                                let _ = socket.send_to(&reply, client).await;
                            }
                            drop(permit);
                        }
                        .in_current_span(),
                    );
                }
            }
        }
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
        let (v4, v6) = tokio::join!(self.ask(&fqdn, RecordType::A), self.ask(&fqdn, RecordType::AAAA));
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

    /// Serves DNS over TCP (two-byte length prefixes) on a redirected
    /// connection of `sandbox`.
    pub async fn serve_tcp(
        &self,
        mut stream: TcpStream,
        sandbox: Sandbox,
        policies: &PolicyStore,
        count: &CountAnswer,
    ) -> io::Result<()> {
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
            let reply = self.answer(&query, sandbox, policies).await;
            count(answer_label(reply.as_deref()));
            let Some(reply) = reply else { return Ok(()) };
            let len = u16::try_from(reply.len()).map_err(|_| io::ErrorKind::InvalidData)?;
            stream.write_all(&[&len.to_be_bytes()[..], &reply].concat()).await?;
        }
    }

    /// The reply to one query, or `None` to stay silent (unparseable query).
    async fn answer(&self, query: &[u8], sandbox: Sandbox, policies: &PolicyStore) -> Option<Vec<u8>> {
        match self.prepare(query, sandbox, policies) {
            Step::Silent => None,
            Step::Reply(reply) => Some(reply),
            Step::Forward(_permit, request) => self.forward_answer(query, &request, sandbox).await,
        }
    }

    /// Everything but the forwarding: parse, budgets, policy.
    fn prepare(&self, query: &[u8], sandbox: Sandbox, policies: &PolicyStore) -> Step {
        let Ok(request) = Message::from_vec(query) else { return Step::Silent };
        if request.metadata.message_type != MessageType::Query {
            return Step::Silent;
        }
        // Every query costs a token, refused or not: refusals are work and log lines too.
        if !self.budgets.take_token(sandbox, Instant::now()) {
            return self.refuse(&request, sandbox, Refusal::OverRate);
        }
        let [question] = request.queries.as_slice() else {
            return self.refuse(&request, sandbox, Refusal::Unanswered);
        };
        let name = normalize(&question.name().to_ascii());
        if name == INFERENCE_HOST {
            return answer_inference(&request).to_vec().map_or(Step::Silent, Step::Reply);
        }
        if request.metadata.op_code != OpCode::Query
            || question.query_class() != DNSClass::IN
            || !ANSWERED_TYPES.contains(&question.query_type())
        {
            return self.refuse(&request, sandbox, Refusal::Unanswered);
        }
        if !names_host(policies, &name) {
            return self.refuse(&request, sandbox, Refusal::NotNamed);
        }
        match self.budgets.acquire(sandbox) {
            Some(permit) => Step::Forward(permit, request),
            None => self.refuse(&request, sandbox, Refusal::OverInFlight),
        }
    }

    /// REFUSED, with the question echoed, and a log line within the limits.
    fn refuse(&self, request: &Message, sandbox: Sandbox, why: Refusal) -> Step {
        self.log_refusal(request, sandbox, why);
        let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::Refused);
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.queries = request.queries.clone();
        reply.to_vec().map_or(Step::Silent, Step::Reply)
    }

    fn log_refusal(&self, request: &Message, sandbox: Sandbox, why: Refusal) {
        let question = request.queries.first();
        let name = question.map(|question| question.name().to_ascii()).unwrap_or_default();
        let record_type = question.map(|question| question.query_type().to_string()).unwrap_or_default();
        let per_name = matches!(why, Refusal::Unanswered | Refusal::NotNamed);
        let Some(suppressed) = self.budgets.may_log(sandbox, per_name.then_some(name.as_str()), Instant::now()) else {
            return;
        };
        if suppressed > 0 {
            tracing::warn!(cgroup_id = sandbox, suppressed, "DNS: {suppressed} refusal lines suppressed");
        }
        let limits = self.budgets.limits;
        match why {
            Refusal::Unanswered => {
                tracing::warn!(cgroup_id = sandbox, "DNS: refused {name} ({record_type}): query type not answered")
            }
            Refusal::NotNamed => {
                tracing::warn!(cgroup_id = sandbox, "DNS: refused {name} ({record_type}): not a host of any policy")
            }
            Refusal::OverRate => tracing::warn!(
                cgroup_id = sandbox,
                "DNS: refused {name} ({record_type}): over the sandbox's rate (--dns-queries-per-second {})",
                limits.queries_per_second
            ),
            Refusal::OverInFlight => tracing::warn!(
                cgroup_id = sandbox,
                "DNS: refused {name} ({record_type}): too many queries in flight \
                 (--dns-max-in-flight-per-sandbox {}, --dns-max-in-flight {})",
                limits.max_in_flight_per_sandbox,
                limits.max_in_flight
            ),
        }
    }

    /// The upstream's answer to a query `prepare` let through, or SERVFAIL.
    async fn forward_answer(&self, query: &[u8], request: &Message, sandbox: Sandbox) -> Option<Vec<u8>> {
        match self.forward(query).await {
            Ok(reply) => Some(self.record_answers(sandbox, reply)),
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

    /// Records the reply's addresses for `sandbox`, and returns the reply
    /// with no TTL longer than the records last (so the sandbox's own cache
    /// does not outlive them).
    fn record_answers(&self, sandbox: Sandbox, reply: Vec<u8>) -> Vec<u8> {
        let Ok(mut message) = Message::from_vec(&reply) else { return reply };
        let Some(question) = message.queries.first() else { return reply };
        // Answers may come through CNAMEs: the name asked for is what the sandbox knows.
        let answers: Vec<(IpAddr, u32)> = addresses_in(&message).collect();
        if let (Some(sandbox), false) = (sandbox, answers.is_empty()) {
            self.records.record(sandbox, &question.name().to_ascii(), &answers, Instant::now());
        }
        let max_ttl = u32::try_from(self.records.limits.max_ttl.as_secs()).unwrap_or(u32::MAX);
        if message.answers.iter().all(|record| record.ttl <= max_ttl) {
            return reply;
        }
        for record in &mut message.answers {
            record.ttl = record.ttl.min(max_ttl);
        }
        message.to_vec().unwrap_or(reply)
    }
}

/// Per-sandbox query budgets and log limits, beside the total in flight.
struct Budgets {
    limits: DnsLimits,
    total: Arc<Semaphore>,
    state: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    sandboxes: HashMap<Sandbox, SandboxBudget>,
    /// When each (sandbox, refused name) was last logged.
    logged: HashMap<(Sandbox, String), Instant>,
}

struct SandboxBudget {
    /// Token bucket: one per query, refilled at `queries_per_second`.
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
    /// Refusal lines logged in the second from `log_window`, and those not.
    log_window: Instant,
    log_lines: u32,
    suppressed: u64,
}

/// A query's place in its sandbox's and the total in-flight counts.
struct QueryPermit {
    budgets: Arc<Budgets>,
    sandbox: Sandbox,
    _total: OwnedSemaphorePermit,
}

impl Drop for QueryPermit {
    fn drop(&mut self) {
        let mut state = self.budgets.lock();
        if let Some(budget) = state.sandboxes.get_mut(&self.sandbox) {
            budget.in_flight -= 1;
        }
    }
}

impl Budgets {
    fn new(limits: DnsLimits) -> Self {
        Self { limits, total: Arc::new(Semaphore::new(limits.max_in_flight)), state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn burst(&self) -> f64 {
        f64::from(self.limits.queries_per_second)
    }

    fn take_token(&self, sandbox: Sandbox, now: Instant) -> bool {
        // The rate and the burst are the same number.
        let burst = self.burst();
        let mut state = self.lock();
        let budget = state.entry(sandbox, now, burst);
        budget.tokens = (budget.tokens + now.duration_since(budget.refilled).as_secs_f64() * burst).min(burst);
        budget.refilled = now;
        if budget.tokens < 1.0 {
            return false;
        }
        budget.tokens -= 1.0;
        true
    }

    fn acquire(self: &Arc<Self>, sandbox: Sandbox) -> Option<QueryPermit> {
        let mut state = self.lock();
        let budget = state.entry(sandbox, Instant::now(), self.burst());
        if budget.in_flight >= self.limits.max_in_flight_per_sandbox {
            return None;
        }
        let total = self.total.clone().try_acquire_owned().ok()?;
        budget.in_flight += 1;
        Some(QueryPermit { budgets: self.clone(), sandbox, _total: total })
    }

    /// Whether a refusal line may be logged: `None` if `name` was logged
    /// for this sandbox within the interval, or the sandbox is over its
    /// lines this second; else the lines suppressed since the last one.
    fn may_log(&self, sandbox: Sandbox, name: Option<&str>, now: Instant) -> Option<u64> {
        let burst = self.burst();
        let mut state = self.lock();
        if let Some(name) = name {
            let key = (sandbox, name.to_owned());
            if state.logged.get(&key).is_some_and(|&at| now.duration_since(at) < REFUSAL_LOG_INTERVAL) {
                return None;
            }
            if state.logged.len() >= MAX_LOGGED_NAMES {
                state.logged.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
                if state.logged.len() >= MAX_LOGGED_NAMES {
                    // All recent: forgetting them only repeats some lines, still rate-limited.
                    state.logged.clear();
                }
            }
            state.logged.insert(key, now);
        }
        let budget = state.entry(sandbox, now, burst);
        if now.duration_since(budget.log_window) >= Duration::from_secs(1) {
            budget.log_window = now;
            budget.log_lines = 0;
        }
        if budget.log_lines >= LOG_LINES_PER_SECOND {
            budget.suppressed += 1;
            return None;
        }
        budget.log_lines += 1;
        Some(std::mem::take(&mut budget.suppressed))
    }
}

impl BudgetState {
    fn entry(&mut self, sandbox: Sandbox, now: Instant, burst: f64) -> &mut SandboxBudget {
        if self.sandboxes.len() >= MAX_SANDBOXES && !self.sandboxes.contains_key(&sandbox) {
            self.sandboxes.retain(|_, budget| !budget.is_idle(now, burst));
            if self.sandboxes.len() >= MAX_SANDBOXES {
                // Busy refilling: forget a bucket (it starts full again) rather than grow.
                // Entries with queries in flight stay, and are at most --dns-max-in-flight.
                self.sandboxes.retain(|_, budget| budget.in_flight > 0);
            }
        }
        self.sandboxes.entry(sandbox).or_insert_with(|| SandboxBudget {
            tokens: burst,
            refilled: now,
            in_flight: 0,
            log_window: now,
            log_lines: 0,
            suppressed: 0,
        })
    }
}

impl SandboxBudget {
    /// As good as a new entry: nothing in flight or suppressed, the bucket full again.
    fn is_idle(&self, now: Instant, burst: f64) -> bool {
        let refill = now.duration_since(self.refilled).as_secs_f64() * burst;
        self.in_flight == 0 && self.suppressed == 0 && self.tokens + refill >= burst
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
    use std::sync::atomic::{AtomicU64, Ordering};

    use hickory_proto::rr::rdata::CNAME;

    use super::*;

    const POLICY: &str = r#"
version: 1
network_policies:
  api:
    endpoints:
      - host: api.example.test
        port: 443
      - host: "*.cdn.example.test"
        port: 443
      - host: 192.0.2.1
        port: 22
      - allowed_ips: [10.0.0.0/8]
        port: 5432
    binaries:
      - path: /usr/bin/curl
"#;

    const LIMITS: DnsLimits = DnsLimits { max_in_flight: 256, max_in_flight_per_sandbox: 64, queries_per_second: 100 };
    const RECORDS: RecordLimits =
        RecordLimits { min_ttl: Duration::from_secs(5), max_ttl: Duration::from_secs(3600), per_sandbox: 4 };

    /// A policy file of its own, and the store reading it.
    fn store(yaml: &str) -> (PolicyStore, std::path::PathBuf) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "sandbox-egress-dns-{}-{}.yaml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, yaml).unwrap();
        (PolicyStore::load(&path, Vec::new()).unwrap(), path)
    }

    /// A responder with the policy its queries are answered for.
    struct Tested {
        dns: DnsResponder,
        policies: PolicyStore,
    }

    impl std::ops::Deref for Tested {
        type Target = DnsResponder;

        fn deref(&self) -> &DnsResponder {
            &self.dns
        }
    }

    impl Tested {
        async fn answer(&self, query: &[u8], sandbox: Sandbox) -> Option<Vec<u8>> {
            self.dns.answer(query, sandbox, &self.policies).await
        }

        fn prepare(&self, query: &[u8], sandbox: Sandbox) -> Step {
            self.dns.prepare(query, sandbox, &self.policies)
        }
    }

    fn responder(upstream: SocketAddr, limits: DnsLimits) -> Tested {
        let (policies, path) = store(POLICY);
        std::fs::remove_file(path).unwrap();
        Tested { dns: DnsResponder::new(Some(upstream), limits, RECORDS).unwrap(), policies }
    }

    fn query(name: &str, record_type: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.queries.push(Query::query(Name::from_ascii(name).unwrap(), record_type));
        message.to_vec().unwrap()
    }

    async fn ask(responder: &Tested, name: &str, record_type: RecordType, sandbox: Sandbox) -> Message {
        Message::from_vec(&responder.answer(&query(name, record_type), sandbox).await.unwrap()).unwrap()
    }

    fn assert_refused(reply: &Message, name: &str) {
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused, "{name}");
        assert_eq!(reply.queries.len(), 1, "the question is echoed");
        assert_eq!(reply.queries[0].name().to_ascii(), name);
    }

    /// A fake upstream resolver on loopback answering every A query with
    /// `ip`; returns its address and the names it was asked.
    async fn fake_upstream(ip: Ipv4Addr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = asked.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; MAX_MESSAGE];
            while let Ok((len, client)) = socket.recv_from(&mut buffer).await {
                let request = Message::from_vec(&buffer[..len]).unwrap();
                let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
                reply.queries = request.queries.clone();
                let question = &request.queries[0];
                seen.lock().unwrap().push(question.name().to_ascii());
                if question.query_type() == RecordType::A {
                    reply.answers.push(Record::from_rdata(question.name().clone(), 120, RData::A(A(ip))));
                }
                socket.send_to(&reply.to_vec().unwrap(), client).await.unwrap();
            }
        });
        (address, asked)
    }

    #[tokio::test]
    async fn inference_local_gets_the_reserved_addresses() {
        let responder = responder("127.0.0.1:9".parse().unwrap(), LIMITS);
        for (record_type, expected) in
            [(RecordType::A, IpAddr::V4(INFERENCE_V4)), (RecordType::AAAA, IpAddr::V6(INFERENCE_V6))]
        {
            let reply = ask(&responder, "Inference.Local.", record_type, None).await;
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
        let mx = ask(&responder, "inference.local.", RecordType::MX, None).await;
        assert!(mx.answers.is_empty());
    }

    #[tokio::test]
    async fn policy_hosts_are_forwarded_and_their_answers_recorded() {
        let (upstream, asked) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let responder = responder(upstream, LIMITS);
        let reply = ask(&responder, "API.example.test.", RecordType::A, Some(1)).await;
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(responder.records.addresses(1, "api.example.test"), vec![IpAddr::from([10, 1, 2, 3])]);
        assert_eq!(responder.records.names(1, IpAddr::from([10, 1, 2, 3])), vec!["api.example.test".to_owned()]);
        assert!(responder.records.names(2, IpAddr::from([10, 1, 2, 3])).is_empty(), "another sandbox resolved nothing");
        for record_type in [RecordType::AAAA, RecordType::HTTPS, RecordType::SVCB, RecordType::CNAME, RecordType::SRV] {
            let reply = ask(&responder, "api.example.test.", record_type, Some(1)).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError, "{record_type}");
        }
        assert_eq!(asked.lock().unwrap().len(), 6);
    }

    #[tokio::test]
    async fn other_names_are_refused_and_never_reach_the_upstream() {
        let (upstream, asked) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let responder = responder(upstream, LIMITS);
        for name in [
            "other.test.",
            "example.test.",
            "deadbeef.api.example.test.",
            "cdn.example.test.",
            "a.b.cdn.example.test.",
            "192.0.2.1.",
            "1.0.0.10.in-addr.arpa.",
        ] {
            assert_refused(&ask(&responder, name, RecordType::A, Some(1)).await, name);
        }
        assert!(asked.lock().unwrap().is_empty());
        assert!(responder.records.addresses(1, "other.test").is_empty());
    }

    #[tokio::test]
    async fn wildcard_patterns_are_answered_as_the_policy_matches_them() {
        let (upstream, asked) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let responder = responder(upstream, LIMITS);
        let reply = ask(&responder, "img.cdn.example.test.", RecordType::A, Some(1)).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(*asked.lock().unwrap(), vec!["img.cdn.example.test.".to_owned()]);
    }

    #[tokio::test]
    async fn tunnelling_query_types_are_refused_even_for_policy_hosts() {
        let (upstream, asked) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let responder = responder(upstream, LIMITS);
        for record_type in [RecordType::TXT, RecordType::NULL, RecordType::MX, RecordType::ANY, RecordType::PTR] {
            assert_refused(&ask(&responder, "api.example.test.", record_type, Some(1)).await, "api.example.test.");
        }
        let mut chaos = Message::query();
        let mut question = Query::query(Name::from_ascii("api.example.test.").unwrap(), RecordType::A);
        question.set_query_class(DNSClass::CH);
        chaos.queries.push(question);
        let reply = Message::from_vec(&responder.answer(&chaos.to_vec().unwrap(), Some(1)).await.unwrap()).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(asked.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reload_changes_the_answered_names() {
        let (upstream, asked) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let (policies, path) = store(POLICY);
        let responder =
            Tested { dns: DnsResponder::new(Some(upstream), LIMITS, RECORDS).unwrap(), policies: policies.clone() };
        assert_refused(&ask(&responder, "new.test.", RecordType::A, None).await, "new.test.");
        std::fs::write(&path, POLICY.replace("api.example.test", "new.test")).unwrap();
        policies.reload("test");
        std::fs::remove_file(path).unwrap();
        assert_eq!(
            ask(&responder, "new.test.", RecordType::A, None).await.metadata.response_code,
            ResponseCode::NoError
        );
        assert_refused(&ask(&responder, "api.example.test.", RecordType::A, None).await, "api.example.test.");
        assert_eq!(*asked.lock().unwrap(), vec!["new.test.".to_owned()]);
    }

    #[tokio::test]
    async fn a_sandbox_over_its_queries_in_flight_does_not_stop_another() {
        let (upstream, asked) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let limits = DnsLimits { max_in_flight_per_sandbox: 2, ..LIMITS };
        let responder = responder(upstream, limits);
        // Sandbox 1's queries wait on a slow upstream: they hold their places until answered.
        let waiting: Vec<_> = (0..2)
            .map(|_| match responder.prepare(&query("api.example.test.", RecordType::A), Some(1)) {
                Step::Forward(permit, _) => permit,
                _ => panic!("the first two queries are forwarded"),
            })
            .collect();
        assert_refused(&ask(&responder, "api.example.test.", RecordType::A, Some(1)).await, "api.example.test.");
        let other = ask(&responder, "api.example.test.", RecordType::A, Some(2)).await;
        assert_eq!(other.answers.len(), 1, "another sandbox is still answered");
        let unknown = ask(&responder, "api.example.test.", RecordType::A, None).await;
        assert_eq!(unknown.answers.len(), 1, "so are queries from no known sandbox");
        drop(waiting);
        let again = ask(&responder, "api.example.test.", RecordType::A, Some(1)).await;
        assert_eq!(again.answers.len(), 1, "answered queries give their places back");
        assert_eq!(asked.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn the_total_in_flight_is_shared() {
        let (upstream, _) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let responder = responder(upstream, DnsLimits { max_in_flight: 1, ..LIMITS });
        let Step::Forward(_waiting, _) = responder.prepare(&query("api.example.test.", RecordType::A), Some(1)) else {
            panic!("forwarded")
        };
        assert_refused(&ask(&responder, "api.example.test.", RecordType::A, Some(2)).await, "api.example.test.");
    }

    #[tokio::test]
    async fn each_sandbox_has_its_own_query_rate() {
        let (upstream, asked) = fake_upstream(Ipv4Addr::new(10, 1, 2, 3)).await;
        let responder = responder(upstream, DnsLimits { queries_per_second: 3, ..LIMITS });
        for _ in 0..3 {
            let reply = ask(&responder, "api.example.test.", RecordType::A, Some(1)).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        }
        assert_refused(&ask(&responder, "api.example.test.", RecordType::A, Some(1)).await, "api.example.test.");
        let other = ask(&responder, "api.example.test.", RecordType::A, Some(2)).await;
        assert_eq!(other.metadata.response_code, ResponseCode::NoError);
        assert_eq!(asked.lock().unwrap().len(), 4);
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let budgets = Budgets::new(DnsLimits { queries_per_second: 2, ..LIMITS });
        let start = Instant::now();
        assert!(budgets.take_token(Some(1), start));
        assert!(budgets.take_token(Some(1), start));
        assert!(!budgets.take_token(Some(1), start));
        assert!(budgets.take_token(Some(1), start + Duration::from_millis(500)), "one token in half a second");
        assert!(!budgets.take_token(Some(1), start + Duration::from_millis(500)));
        let later = start + Duration::from_secs(60);
        assert!(budgets.take_token(Some(1), later) && budgets.take_token(Some(1), later));
        assert!(!budgets.take_token(Some(1), later), "the burst is capped");
    }

    #[test]
    fn refusal_lines_are_limited_per_name_and_per_sandbox() {
        let budgets = Budgets::new(LIMITS);
        let start = Instant::now();
        assert_eq!(budgets.may_log(Some(1), Some("a.test."), start), Some(0));
        assert_eq!(budgets.may_log(Some(1), Some("a.test."), start), None, "once per name");
        assert_eq!(budgets.may_log(Some(2), Some("a.test."), start), Some(0), "per sandbox");
        for i in 1..LOG_LINES_PER_SECOND {
            assert_eq!(budgets.may_log(Some(1), Some(&format!("n{i}.test.")), start), Some(0));
        }
        assert_eq!(budgets.may_log(Some(1), Some("over.test."), start), None, "over the lines per second");
        assert_eq!(budgets.may_log(Some(1), None, start), None);
        let next_second = start + Duration::from_secs(1);
        assert_eq!(budgets.may_log(Some(1), None, next_second), Some(2), "the next line says how many were not");
        let later = start + REFUSAL_LOG_INTERVAL;
        assert_eq!(budgets.may_log(Some(1), Some("a.test."), later), Some(0), "logged again after the interval");
    }

    #[test]
    fn budget_state_is_bounded() {
        let budgets = Budgets::new(LIMITS);
        let now = Instant::now();
        for sandbox in 0..MAX_SANDBOXES as u64 + 10 {
            budgets.take_token(Some(sandbox), now);
            budgets.may_log(Some(sandbox), Some(&format!("n{sandbox}.test.")), now);
        }
        let state = budgets.lock();
        assert!(state.sandboxes.len() <= MAX_SANDBOXES);
        assert!(state.logged.len() <= MAX_LOGGED_NAMES);
    }

    #[tokio::test]
    async fn lookups_go_to_the_same_upstream_and_are_not_recorded() {
        let (upstream, _) = fake_upstream(Ipv4Addr::new(10, 9, 8, 7)).await;
        let responder = responder(upstream, LIMITS);
        assert_eq!(responder.lookup("svc.test").await.unwrap(), vec![IpAddr::from([10, 9, 8, 7])]);
        assert!(responder.records.lock().is_empty(), "the agent's own lookups are no sandbox's answers");
        assert_eq!(responder.lookup("10.0.0.5").await.unwrap(), vec![IpAddr::from([10, 0, 0, 5])]);
        // A v4-mapped literal is its IPv4 address, as the host/address checks compare it.
        assert_eq!(responder.lookup("::ffff:127.0.0.1").await.unwrap(), vec![IpAddr::from([127, 0, 0, 1])]);
        let refused = self::responder("127.0.0.1:9".parse().unwrap(), LIMITS);
        let started = Instant::now();
        assert!(refused.lookup("svc.test").await.unwrap_err().starts_with("cannot resolve svc.test: 127.0.0.1:9"));
        assert!(started.elapsed() < Duration::from_millis(500), "a refusing upstream must fail at once");
    }

    #[tokio::test]
    async fn a_dead_upstream_gives_servfail() {
        // Nothing answers on the discard port of loopback.
        let responder = responder("127.0.0.1:9".parse().unwrap(), LIMITS);
        let reply = ask(&responder, "api.example.test.", RecordType::A, None).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn garbage_gets_no_reply() {
        let responder = responder("127.0.0.1:9".parse().unwrap(), LIMITS);
        assert!(responder.answer(b"\x00\x01garbage", None).await.is_none());
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn records_last_their_ttl_within_the_clamp() {
        let records = DnsRecords::new(RECORDS);
        let now = Instant::now();
        records.record(1, "Zero.Test.", &[(ip(1), 0)], now);
        records.record(1, "long.test", &[(ip(2), 86_400)], now);
        records.record(1, "mid.test", &[(ip(3), 60)], now);
        let names_at = |ip, secs| records.names_at(1, ip, now + Duration::from_secs(secs));
        assert_eq!(names_at(ip(1), 4), vec!["zero.test".to_owned()], "a TTL of 0 lasts the minimum");
        assert!(names_at(ip(1), 5).is_empty());
        assert_eq!(names_at(ip(3), 59), vec!["mid.test".to_owned()]);
        assert!(names_at(ip(3), 60).is_empty());
        assert_eq!(names_at(ip(2), 3599), vec!["long.test".to_owned()]);
        assert!(names_at(ip(2), 3600).is_empty(), "a day's TTL lasts the maximum");
    }

    #[test]
    fn records_are_per_sandbox_and_bounded_oldest_first() {
        let records = DnsRecords::new(RECORDS);
        let now = Instant::now();
        records.record(1, "a.test", &[(ip(1), 60)], now);
        records.record(1, "b.test", &[(ip(1), 60), (ip(2), 60)], now);
        assert_eq!(records.names_at(1, ip(1), now), vec!["b.test".to_owned(), "a.test".to_owned()]);
        assert!(records.names_at(2, ip(1), now).is_empty());
        records.record(1, "a.test", &[(ip(1), 60)], now);
        assert_eq!(records.names_at(1, ip(1), now), vec!["a.test".to_owned(), "b.test".to_owned()], "refreshed");
        // Four pairs fit: b.test/1, b.test/2, a.test/1 (refreshed last) and two more drop b.test/1.
        records.record(1, "c.test", &[(ip(3), 60), (IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, 4]), 60)], now);
        assert_eq!(records.lock()[&1].len(), RECORDS.per_sandbox);
        assert_eq!(records.names_at(1, ip(1), now), vec!["a.test".to_owned()], "b.test/1 was the oldest");
        assert_eq!(records.names_at(1, ip(2), now), vec!["b.test".to_owned()]);
        assert_eq!(records.names_at(1, ip(4), now), vec!["c.test".to_owned()], "v4-mapped answers count as v4");
    }

    #[test]
    fn a_cname_chain_is_recorded_under_the_name_asked_and_ttls_are_capped() {
        let responder = DnsResponder::new(Some("127.0.0.1:9".parse().unwrap()), LIMITS, RECORDS).unwrap();
        let (asked, target) =
            (Name::from_ascii("api.example.test.").unwrap(), Name::from_ascii("edge.cdn.test.").unwrap());
        let mut reply = Message::response(7, OpCode::Query);
        reply.queries.push(Query::query(asked.clone(), RecordType::A));
        reply.answers.push(Record::from_rdata(asked, 86_400, RData::CNAME(CNAME(target.clone()))));
        reply.answers.push(Record::from_rdata(target, 30, RData::A(A(Ipv4Addr::new(10, 0, 0, 9)))));
        let sent = Message::from_vec(&responder.record_answers(Some(1), reply.to_vec().unwrap())).unwrap();
        assert_eq!(responder.records.names(1, ip(9)), vec!["api.example.test".to_owned()]);
        assert!(responder.records.addresses(1, "edge.cdn.test").is_empty());
        assert_eq!(sent.answers.iter().map(|record| record.ttl).collect::<Vec<_>>(), vec![3600, 30]);
    }

    #[test]
    fn the_agents_lookups_are_kept_for_their_ttl_only() {
        let cache = LookupCache { max_ttl: Duration::from_secs(30), entries: Mutex::default() };
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap());
        cache.put("kept.test", &[(a, 10), (b, 60)], now);
        assert_eq!(cache.get("kept.test", now + Duration::from_secs(9)), Some(vec![a, b]));
        assert_eq!(cache.get("kept.test", now + Duration::from_secs(10)), None, "the shortest TTL bounds the entry");
        cache.put("long.test", &[(a, 86_400)], now);
        assert_eq!(cache.get("long.test", now + Duration::from_secs(31)), None, "at most max_ttl");
        cache.put("zero.test", &[(a, 0)], now);
        assert_eq!(cache.get("zero.test", now), None, "a TTL of 0 is not kept");
        for n in 0..MAX_CACHED_LOOKUPS + 10 {
            cache.put(&format!("n{n}.test"), &[(a, 10)], now);
        }
        assert!(cache.entries.lock().unwrap().len() <= MAX_CACHED_LOOKUPS, "bounded");
    }
}
