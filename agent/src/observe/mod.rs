//! What the operator sees besides the log: Prometheus metrics per sandbox
//! (served by [`serve_metrics`]), the most frequent recent denials
//! (`sandbox-egress status`, `policy suggest`), and the log lines as OCSF
//! events ([`ocsf`]).

mod denials;
pub mod ocsf;
mod server;

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicI64, Arc, RwLock},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

pub use denials::{CarriedDenial, DenialFilter, DenialRow, Denied, DeniedRequest, RecentDenials};
pub use server::{serve_metrics, Gauges, MetricsServer};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabel {
    sandbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    sandbox: String,
    verdict: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    sandbox: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    sandbox: String,
    answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    sandbox: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

type Histograms = Family<SandboxLabel, Histogram, fn() -> Histogram>;

fn decision_histogram() -> Histogram {
    // 5 µs to about 80 ms.
    Histogram::new(exponential_buckets(5e-6, 2.0, 15))
}

/// The daemon's metrics and recent denials, and the addresses the agent
/// itself listens on (never a destination a sandbox may reach).
pub struct Observer {
    registry: Registry,
    connections: Family<ConnectionLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    active: Family<SandboxLabel, Gauge>,
    dns_queries: Family<AnswerLabels, Counter>,
    denials: Family<ReasonLabels, Counter>,
    decision_seconds: Histograms,
    generation: Family<SandboxLabel, Gauge>,
    reload_failures: Family<SandboxLabel, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    fast_closes_lost: Counter,
    sandboxes: Gauge,
    pub recent_denials: RecentDenials,
    metrics_address: RwLock<Option<SocketAddr>>,
}

impl Default for Observer {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sandbox_egress");
        let observer = Self {
            connections: Family::default(),
            bytes: Family::default(),
            active: Family::default(),
            dns_queries: Family::default(),
            denials: Family::default(),
            decision_seconds: Family::new_with_constructor(decision_histogram),
            generation: Family::default(),
            reload_failures: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            fast_closes_lost: Counter::default(),
            sandboxes: Gauge::default(),
            recent_denials: RecentDenials::default(),
            metrics_address: RwLock::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Connections ended, by sandbox, verdict and protocol",
            observer.connections.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed, by sandbox and direction (up: sandbox to destination)",
            observer.bytes.clone(),
        );
        registry.register("connections_active", "Connections in flight, by sandbox", observer.active.clone());
        registry.register(
            "dns_queries",
            "DNS queries of sandboxes, by the answer's response code (dropped: unparseable, no answer)",
            observer.dns_queries.clone(),
        );
        registry.register("denials", "Connections denied, by sandbox and reason", observer.denials.clone());
        registry.register(
            "decision_seconds",
            "Time to decide a connection or request against the policy",
            observer.decision_seconds.clone(),
        );
        registry.register(
            "policy_generation",
            "Generation of each sandbox's policy in force (1 at load, +1 per reload)",
            observer.generation.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Policy reloads refused (the previous policy stayed in force), by sandbox",
            observer.reload_failures.clone(),
        );
        registry.register(
            "fast_path_closes_lost",
            "Kernel fast-path connections that ended without a close line (the kernel's ring of closes was full)",
            observer.fast_closes_lost.clone(),
        );
        registry.register(
            "ebpf_map_entries",
            "Entries in each eBPF map, shared by every sandbox",
            observer.map_entries.clone(),
        );
        registry.register(
            "ebpf_map_capacity",
            "Most entries each eBPF map holds (sandboxes: a full map refuses another; the others are LRU: the \
             oldest go beyond it)",
            observer.map_capacity.clone(),
        );
        registry.register("sandboxes", "Sandboxes served", observer.sandboxes.clone());
        Self { registry, ..observer }
    }
}

/// One sandbox's handles into the daemon's metrics.
pub struct SandboxMetrics {
    name: String,
    observer: Arc<Observer>,
    active: Gauge,
    decision_seconds: Histogram,
}

/// What a sandbox reports at scrape time.
pub struct SandboxGauges {
    pub generation: u64,
    pub reload_failures: u64,
}

/// What the daemon reports at scrape time.
#[derive(Default)]
pub struct Scrape {
    pub sandboxes: Vec<(String, SandboxGauges)>,
    /// The eBPF maps, shared by every sandbox: (map name, entries, capacity).
    pub maps: Vec<(&'static str, usize, u32)>,
}

impl Observer {
    pub fn sandbox(self: &Arc<Self>, name: &str) -> Arc<SandboxMetrics> {
        let label = SandboxLabel { sandbox: name.to_owned() };
        Arc::new(SandboxMetrics {
            name: name.to_owned(),
            observer: self.clone(),
            active: self.active.get_or_create(&label).clone(),
            decision_seconds: self.decision_seconds.get_or_create(&label).clone(),
        })
    }

    /// Fast-path closes the kernel could not report.
    pub fn fast_closes_lost(&self, lost: u64) {
        self.fast_closes_lost.inc_by(lost);
    }

    pub fn set_metrics_address(&self, address: SocketAddr) {
        *self.metrics_address.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(address);
    }

    /// Whether `destination` is the metrics listener: a sandbox must never
    /// reach it, whatever its policy says.
    pub fn is_metrics_address(&self, destination: SocketAddr) -> bool {
        let Some(metrics) = *self.metrics_address.read().unwrap_or_else(std::sync::PoisonError::into_inner) else {
            return false;
        };
        let ip = destination.ip().to_canonical();
        destination.port() == metrics.port()
            && (metrics.ip().is_unspecified() || ip == metrics.ip().to_canonical() || ip.is_loopback())
    }

    /// The metrics in Prometheus text format, after `refresh` set the
    /// gauges read at scrape time.
    pub fn encode(&self, scrape: &Scrape) -> String {
        self.sandboxes.set(scrape.sandboxes.len() as i64);
        for (name, gauges) in &scrape.sandboxes {
            let label = SandboxLabel { sandbox: name.clone() };
            self.generation.get_or_create(&label).set(gauges.generation as i64);
            let failures = self.reload_failures.get_or_create(&label);
            failures.inc_by(gauges.reload_failures.saturating_sub(failures.get()));
        }
        for &(map, entries, capacity) in &scrape.maps {
            let labels = MapLabels { map };
            self.map_entries.get_or_create(&labels).set(entries as i64);
            self.map_capacity.get_or_create(&labels).set(i64::from(capacity));
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Counts a connection in flight until dropped.
pub struct ActiveConnection(Gauge<i64, AtomicI64>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a connection ended, as the metrics count it.
pub struct Ended<'a> {
    pub verdict: &'a str,
    pub protocol: &'a str,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The denial's kind (`policy_denied`, `ssrf_denied`...), if denied.
    pub denial: Option<&'static str>,
}

impl SandboxMetrics {
    pub fn connection_started(&self) -> ActiveConnection {
        self.active.inc();
        ActiveConnection(self.active.clone())
    }

    pub fn active(&self) -> i64 {
        self.active.get()
    }

    pub fn connection_ended(&self, ended: &Ended<'_>) {
        let observer = &self.observer;
        let labels = ConnectionLabels {
            sandbox: self.name.clone(),
            verdict: ended.verdict.to_owned(),
            protocol: ended.protocol.to_owned(),
        };
        observer.connections.get_or_create(&labels).inc();
        for (direction, bytes) in [("up", ended.bytes_up), ("down", ended.bytes_down)] {
            if bytes > 0 {
                observer.bytes.get_or_create(&DirectionLabels { sandbox: self.name.clone(), direction }).inc_by(bytes);
            }
        }
        if let Some(reason) = ended.denial {
            observer.denials.get_or_create(&ReasonLabels { sandbox: self.name.clone(), reason }).inc();
        }
    }

    pub fn dns_answer(&self, answer: &'static str) {
        self.observer.dns_queries.get_or_create(&AnswerLabels { sandbox: self.name.clone(), answer }).inc();
    }

    pub fn decided_in(&self, elapsed: Duration) {
        self.decision_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn denied(&self, denied: Denied) {
        self.observer.recent_denials.record(&self.name, denied);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_every_family_with_its_sandbox() {
        let observer = Arc::new(Observer::default());
        let web = observer.sandbox("web");
        let active = web.connection_started();
        web.connection_ended(&Ended {
            verdict: "denied",
            protocol: "tls",
            bytes_up: 0,
            bytes_down: 0,
            denial: Some("policy_denied"),
        });
        web.dns_answer("refused");
        web.decided_in(Duration::from_micros(20));
        let scrape = Scrape {
            sandboxes: vec![("web".to_owned(), SandboxGauges { generation: 3, reload_failures: 2 })],
            maps: vec![("dns_clients", 5, 4096)],
        };
        let text = observer.encode(&scrape);
        for expected in [
            r#"sandbox_egress_connections_total{sandbox="web",verdict="denied",protocol="tls"} 1"#,
            r#"sandbox_egress_connections_active{sandbox="web"} 1"#,
            r#"sandbox_egress_denials_total{sandbox="web",reason="policy_denied"} 1"#,
            r#"sandbox_egress_dns_queries_total{sandbox="web",answer="refused"} 1"#,
            r#"sandbox_egress_decision_seconds_count{sandbox="web"} 1"#,
            r#"sandbox_egress_policy_generation{sandbox="web"} 3"#,
            r#"sandbox_egress_policy_reload_failures_total{sandbox="web"} 2"#,
            r#"sandbox_egress_ebpf_map_entries{map="dns_clients"} 5"#,
            "sandbox_egress_sandboxes 1",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        drop(active);
        let again = observer.encode(&Scrape {
            sandboxes: vec![("web".to_owned(), SandboxGauges { generation: 3, reload_failures: 2 })],
            maps: vec![],
        });
        assert!(again.contains(r#"sandbox_egress_connections_active{sandbox="web"} 0"#), "{again}");
        assert!(
            again.contains(r#"sandbox_egress_policy_reload_failures_total{sandbox="web"} 2"#),
            "set, not added again"
        );
        assert_eq!(web.active(), 0);
    }

    #[test]
    fn the_metrics_address_is_recognised_on_any_loopback() {
        let observer = Observer::default();
        assert!(!observer.is_metrics_address("127.0.0.1:9464".parse().unwrap()));
        observer.set_metrics_address("127.0.0.1:9464".parse().unwrap());
        assert!(observer.is_metrics_address("127.0.0.1:9464".parse().unwrap()));
        assert!(observer.is_metrics_address("[::ffff:127.0.0.2]:9464".parse().unwrap()));
        assert!(!observer.is_metrics_address("127.0.0.1:9465".parse().unwrap()));
        assert!(!observer.is_metrics_address("10.0.0.1:9464".parse().unwrap()));
    }
}
