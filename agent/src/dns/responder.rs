//! The sandbox-facing DNS: each query answered for the policy of the
//! sandbox that asked (UDP on its loopback port, TCP on a redirected
//! connection to port 53), within its budgets.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        DNSClass, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use tracing::Instrument;

use super::{
    budgets::{Budgets, DnsLimits, QueryPermit},
    normalize,
    records::DnsRecords,
    resolver::{addresses_in, Resolver},
    Sandbox, INFERENCE_HOST, INFERENCE_V4, INFERENCE_V6, MAX_MESSAGE,
};
use crate::{observe::ocsf::ACTIVITY, policy::PolicyStore};

const INFERENCE_TTL: u32 = 60;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// What a client needs to connect to a name; TXT, NULL, MX, ANY and the
/// rest are refused (TXT and NULL are what DNS tunnels read data from).
const ANSWERED_TYPES: [RecordType; 6] =
    [RecordType::A, RecordType::AAAA, RecordType::CNAME, RecordType::HTTPS, RecordType::SVCB, RecordType::SRV];

/// Where a query came from: the client's address, over `udp` or `tcp`.
#[derive(Clone, Copy)]
pub struct Client {
    pub address: SocketAddr,
    pub transport: &'static str,
}

/// Who sent a UDP query: its cgroup, its sandbox's policy, where its
/// answers are counted, and its sandbox's span (every line names it).
pub struct Asker {
    pub cgroup: Sandbox,
    pub policies: PolicyStore,
    pub count: CountAnswer,
    pub span: tracing::Span,
}

/// Who sent a UDP query, from its source address; `None` when no sandbox
/// served here did (the query is dropped).
pub type AskerOf = Arc<dyn Fn(SocketAddr) -> Option<Asker> + Send + Sync>;

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

pub struct DnsResponder {
    pub(super) resolver: Arc<Resolver>,
    pub(super) records: Arc<DnsRecords>,
    budgets: Arc<Budgets>,
}

fn names_host(policies: &PolicyStore, name: &str) -> bool {
    let current = policies.current();
    current.policy.names_host(name).unwrap_or_else(|error| {
        tracing::error!(generation = current.generation, "DNS: policy evaluation failed, refusing: {error:#}");
        false
    })
}

/// What to do with one query.
pub(super) enum Step {
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
    /// One responder serves every sandbox: each query is answered for the
    /// policy of the sandbox whose socket it came to, forwarded by
    /// `resolver`, its answers kept in `records`.
    pub fn new(resolver: Arc<Resolver>, records: Arc<DnsRecords>, limits: DnsLimits) -> Self {
        tracing::info!(
            upstream = %resolver.upstream(),
            max_in_flight = limits.max_in_flight,
            max_in_flight_per_sandbox = limits.max_in_flight_per_sandbox,
            queries_per_second = limits.queries_per_second,
            record_min_ttl_s = records.limits.min_ttl.as_secs(),
            record_max_ttl_s = records.limits.max_ttl.as_secs(),
            "DNS: answering the sandbox for the policy's hosts, forwarding to this resolver"
        );
        Self { resolver, records, budgets: Arc::new(Budgets::new(limits)) }
    }

    /// Serves DNS over UDP on `socket` (the loopback port of one sandbox, or
    /// of every sandbox sharing a listener), each query for the names of
    /// its sender's policy (read per query: a reload changes them at once).
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket, asker_of: AskerOf) {
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
            let Some(sender) = asker_of(client) else {
                tracing::debug!(client = %client, "DNS: a query from no sandbox served here, dropped");
                continue;
            };
            // Decided here, so refusals cost no task and tasks are bounded by the budgets.
            let asker = Client { address: client, transport: "udp" };
            let step = sender.span.in_scope(|| self.prepare(&buffer[..len], sender.cgroup, asker, &sender.policies));
            match step {
                Step::Silent => (sender.count)(answer_label(None)),
                Step::Reply(reply) => {
                    (sender.count)(answer_label(Some(&reply)));
                    let _ = socket.send_to(&reply, client).await;
                }
                Step::Forward(permit, request) => {
                    let query = buffer[..len].to_vec();
                    let (responder, socket, count) = (self.clone(), socket.clone(), sender.count.clone());
                    tokio::spawn(
                        async move {
                            let reply = responder.forward_answer(&query, &request, permit.sandbox, asker).await;
                            count(answer_label(reply.as_deref()));
                            if let Some(reply) = reply {
                                let _ = socket.send_to(&reply, client).await;
                            }
                            drop(permit);
                        }
                        .instrument(sender.span.clone()),
                    );
                }
            }
        }
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
        let client = Client { address: stream.peer_addr()?, transport: "tcp" };
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
            let reply = self.answer(&query, sandbox, client, policies).await;
            count(answer_label(reply.as_deref()));
            let Some(reply) = reply else { return Ok(()) };
            let len = u16::try_from(reply.len()).map_err(|_| io::ErrorKind::InvalidData)?;
            stream.write_all(&[&len.to_be_bytes()[..], &reply].concat()).await?;
        }
    }

    /// The reply to one query, or `None` to stay silent (unparseable query).
    pub(super) async fn answer(
        &self,
        query: &[u8],
        sandbox: Sandbox,
        client: Client,
        policies: &PolicyStore,
    ) -> Option<Vec<u8>> {
        match self.prepare(query, sandbox, client, policies) {
            Step::Silent => None,
            Step::Reply(reply) => Some(reply),
            Step::Forward(_permit, request) => self.forward_answer(query, &request, sandbox, client).await,
        }
    }

    /// Everything but the forwarding: parse, budgets, policy. Each query
    /// within the sandbox's rate logs one `dns` line (see [`log_query`]).
    pub(super) fn prepare(&self, query: &[u8], sandbox: Sandbox, client: Client, policies: &PolicyStore) -> Step {
        let Ok(request) = Message::from_vec(query) else { return Step::Silent };
        if request.metadata.message_type != MessageType::Query {
            return Step::Silent;
        }
        // Every query costs a token, refused or not: refusals are work and log lines too.
        if !self.budgets.take_token(sandbox, Instant::now()) {
            return self.refuse(&request, sandbox, None, Refusal::OverRate);
        }
        let [question] = request.queries.as_slice() else {
            return self.refuse(&request, sandbox, Some(client), Refusal::Unanswered);
        };
        let name = normalize(&question.name().to_ascii());
        if name == INFERENCE_HOST {
            let Ok(reply) = answer_inference(&request).to_vec() else { return Step::Silent };
            log_query(&request, sandbox, client, None, &reply);
            return Step::Reply(reply);
        }
        if request.metadata.op_code != OpCode::Query
            || question.query_class() != DNSClass::IN
            || !ANSWERED_TYPES.contains(&question.query_type())
        {
            return self.refuse(&request, sandbox, Some(client), Refusal::Unanswered);
        }
        if !names_host(policies, &name) {
            return self.refuse(&request, sandbox, Some(client), Refusal::NotNamed);
        }
        match self.budgets.acquire(sandbox) {
            Some(permit) => Step::Forward(permit, request),
            None => self.refuse(&request, sandbox, Some(client), Refusal::OverInFlight),
        }
    }

    /// REFUSED, with the question echoed, and a warning within the limits;
    /// the query's own line unless over the rate (`client: None`).
    fn refuse(&self, request: &Message, sandbox: Sandbox, client: Option<Client>, why: Refusal) -> Step {
        self.log_refusal(request, sandbox, why);
        let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::Refused);
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.queries = request.queries.clone();
        let Ok(reply) = reply.to_vec() else { return Step::Silent };
        if let Some(client) = client {
            log_query(request, sandbox, client, Some(self.refusal_reason(why)), &reply);
        }
        Step::Reply(reply)
    }

    fn refusal_reason(&self, why: Refusal) -> String {
        let limits = self.budgets.limits;
        match why {
            Refusal::Unanswered => "query type not answered".into(),
            Refusal::NotNamed => "not a host of any policy".into(),
            Refusal::OverRate => {
                format!("over the sandbox's rate (--dns-queries-per-second {})", limits.queries_per_second)
            }
            Refusal::OverInFlight => format!(
                "too many queries in flight (--dns-max-in-flight-per-sandbox {}, --dns-max-in-flight {})",
                limits.max_in_flight_per_sandbox, limits.max_in_flight
            ),
        }
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
        tracing::warn!(cgroup_id = sandbox, "DNS: refused {name} ({record_type}): {}", self.refusal_reason(why));
    }

    /// The upstream's answer to a query `prepare` let through, or SERVFAIL.
    async fn forward_answer(
        &self,
        query: &[u8],
        request: &Message,
        sandbox: Sandbox,
        client: Client,
    ) -> Option<Vec<u8>> {
        let reply = match self.resolver.forward(query).await {
            Ok(reply) => self.record_answers(sandbox, reply),
            Err(error) => {
                tracing::warn!(%error, upstream = %self.resolver.upstream(), "DNS: upstream resolver failed");
                let mut failure =
                    Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::ServFail);
                failure.queries = request.queries.clone();
                failure.to_vec().ok()?
            }
        };
        log_query(request, sandbox, client, None, &reply);
        Some(reply)
    }

    /// Records the reply's addresses for `sandbox`, and returns the reply
    /// with no TTL longer than the records last (so the sandbox's own cache
    /// does not outlive them).
    pub(super) fn record_answers(&self, sandbox: Sandbox, reply: Vec<u8>) -> Vec<u8> {
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

/// One line per query answered or refused (`debug`, target [`ACTIVITY`]:
/// on in the OCSF format): its name, type, the answer's code and
/// addresses; `refused`: why the agent refused it. Queries over the
/// sandbox's rate get none, so the lines are bounded by its budget.
fn log_query(request: &Message, sandbox: Sandbox, client: Client, refused: Option<String>, reply: &[u8]) {
    if !tracing::enabled!(target: ACTIVITY, tracing::Level::DEBUG) {
        return;
    }
    let question = request.queries.first();
    let addresses = Message::from_vec(reply).map_or_else(
        |_| Vec::new(),
        |reply| addresses_in(&reply).map(|(address, _)| address.to_string()).collect::<Vec<_>>(),
    );
    tracing::debug!(
        target: ACTIVITY,
        event = "dns",
        verdict = if refused.is_some() { "refused" } else { "answered" },
        name = question.map(|question| normalize(&question.name().to_ascii())),
        query_type = question.map(|question| question.query_type().to_string()),
        rcode = answer_label(Some(reply)),
        reason = refused,
        answers = (!addresses.is_empty()).then(|| addresses.join(",")),
        client = %client.address,
        transport = client.transport,
        cgroup_id = sandbox,
    );
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
