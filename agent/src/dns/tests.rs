//! The responder, records, budgets and resolver, against a fake upstream.

use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::rr::rdata::CNAME;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        DNSClass, Name, RData, Record, RecordType,
    },
};
use tokio::net::UdpSocket;

use super::{
    budgets::{Budgets, LOG_LINES_PER_SECOND, MAX_LOGGED_NAMES, REFUSAL_LOG_INTERVAL},
    resolver::{LookupCache, MAX_CACHED_LOOKUPS},
    responder::{Client, Step},
    *,
};
use crate::{observe::ocsf::ACTIVITY, policy::PolicyStore};

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

const CLIENT: Client = Client { address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5353), transport: "udp" };

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
        self.dns.answer(query, sandbox, CLIENT, &self.policies).await
    }

    fn prepare(&self, query: &[u8], sandbox: Sandbox) -> Step {
        self.dns.prepare(query, sandbox, CLIENT, &self.policies)
    }
}

fn new_responder(upstream: SocketAddr, limits: DnsLimits) -> DnsResponder {
    let resolver = Arc::new(Resolver::new(Some(upstream), RECORDS.max_ttl).unwrap());
    DnsResponder::new(resolver, Arc::new(DnsRecords::new(RECORDS)), limits)
}

fn responder(upstream: SocketAddr, limits: DnsLimits) -> Tested {
    let (policies, path) = store(POLICY);
    std::fs::remove_file(path).unwrap();
    Tested { dns: new_responder(upstream, limits), policies }
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
    let responder = Tested { dns: new_responder(upstream, LIMITS), policies: policies.clone() };
    assert_refused(&ask(&responder, "new.test.", RecordType::A, None).await, "new.test.");
    std::fs::write(&path, POLICY.replace("api.example.test", "new.test")).unwrap();
    policies.reload("test");
    std::fs::remove_file(path).unwrap();
    assert_eq!(ask(&responder, "new.test.", RecordType::A, None).await.metadata.response_code, ResponseCode::NoError);
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
    assert_eq!(responder.resolver.lookup("svc.test").await.unwrap(), vec![IpAddr::from([10, 9, 8, 7])]);
    assert!(responder.records.lock().is_empty(), "the agent's own lookups are no sandbox's answers");
    assert_eq!(responder.resolver.lookup("10.0.0.5").await.unwrap(), vec![IpAddr::from([10, 0, 0, 5])]);
    // A v4-mapped literal is its IPv4 address, as the host/address checks compare it.
    assert_eq!(responder.resolver.lookup("::ffff:127.0.0.1").await.unwrap(), vec![IpAddr::from([127, 0, 0, 1])]);
    let refused = self::responder("127.0.0.1:9".parse().unwrap(), LIMITS);
    let started = Instant::now();
    assert!(refused.resolver.lookup("svc.test").await.unwrap_err().starts_with("cannot resolve svc.test: 127.0.0.1:9"));
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
fn records_cross_an_upgrade_with_the_time_they_had_left() {
    let old = DnsRecords::new(RECORDS);
    let now = Instant::now();
    old.record(1, "a.test", &[(ip(1), 60)], now);
    old.record(2, "b.test", &[(ip(2), 0)], now);
    let carried: Vec<CarriedRecord> = serde_json::from_str(&serde_json::to_string(&old.export()).unwrap()).unwrap();
    assert_eq!(carried.len(), 2);
    let new = DnsRecords::new(RECORDS);
    new.record(1, "a.test", &[(ip(1), 60)], now);
    new.import(&carried);
    assert_eq!(new.lock()[&1].len(), 1, "the same answer is kept once");
    assert_eq!(new.names(1, ip(1)), vec!["a.test".to_owned()]);
    assert_eq!(new.addresses(2, "B.test."), vec![ip(2)]);
    let later = Instant::now() + Duration::from_secs(5);
    assert!(new.names_at(2, ip(2), later).is_empty(), "the 5 s minimum it had, not 5 s more");
    assert_eq!(new.names_at(1, ip(1), later), vec!["a.test".to_owned()]);
}

#[test]
fn a_cname_chain_is_recorded_under_the_name_asked_and_ttls_are_capped() {
    let responder = new_responder("127.0.0.1:9".parse().unwrap(), LIMITS);
    let (asked, target) = (Name::from_ascii("api.example.test.").unwrap(), Name::from_ascii("edge.cdn.test.").unwrap());
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

/// The `dns` lines (target [`ACTIVITY`]) logged while `run` runs, as JSON.
fn activity_lines(run: impl FnOnce()) -> Vec<serde_json::Value> {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(format!("off,{ACTIVITY}=debug"))
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, run);
    let output = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    output.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

#[tokio::test]
async fn each_query_within_the_rate_logs_one_line() {
    let responder = responder("127.0.0.1:9".parse().unwrap(), DnsLimits { queries_per_second: 3, ..LIMITS });
    let lines = activity_lines(|| {
        for _ in 0..5 {
            responder.prepare(&query("Not.Listed.test.", RecordType::A), Some(1));
        }
        responder.prepare(&query("inference.local.", RecordType::A), Some(2));
        responder.prepare(&query("api.example.test.", RecordType::TXT), Some(2));
    });
    assert_eq!(lines.len(), 5, "3 within sandbox 1's rate, 2 of sandbox 2: {lines:?}");
    let refused = &lines[0];
    assert_eq!((refused["event"].as_str(), refused["verdict"].as_str()), (Some("dns"), Some("refused")));
    assert_eq!((refused["name"].as_str(), refused["query_type"].as_str()), (Some("not.listed.test"), Some("A")));
    assert_eq!(
        (refused["rcode"].as_str(), refused["reason"].as_str()),
        (Some("refused"), Some("not a host of any policy"))
    );
    assert_eq!((refused["client"].as_str(), refused["transport"].as_str()), (Some("127.0.0.1:5353"), Some("udp")));
    assert_eq!(refused["cgroup_id"], 1);
    let inference = &lines[3];
    assert_eq!((inference["verdict"].as_str(), inference["rcode"].as_str()), (Some("answered"), Some("noerror")));
    assert_eq!(inference["answers"], "240.0.0.1");
    assert_eq!(lines[4]["reason"], "query type not answered");
}
