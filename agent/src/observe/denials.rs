//! The most frequent recent denials, aggregated by (sandbox, host, port,
//! binary): what an operator looks at to decide what to allow, and what
//! `policy suggest` writes allow rules from.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Distinct (sandbox, host, port, binary) kept; past this the oldest and
/// rarest go first, so a sandbox trying many hosts cannot grow the table.
const MAX_KEYS: usize = 1024;
/// Denials not seen again for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Distinct denied requests kept per key; later ones are counted apart.
const MAX_REQUESTS_PER_KEY: usize = 16;
/// Longer request paths are counted, not kept (a suggestion needs them whole).
const MAX_PATH: usize = 1024;

/// One denied connection, or an allowed one whose requests were denied.
pub struct Denied {
    pub host: String,
    pub port: u16,
    pub binary: Option<String>,
    pub reason: String,
    /// `policy_denied`, `ssrf_denied`, `host_mismatch`...
    pub kind: &'static str,
    /// tls, http, connect, opaque...
    pub protocol: &'static str,
    /// The address decided on, when known.
    pub address: Option<IpAddr>,
    /// Denied as a connection; `false`: allowed, some of its requests denied.
    pub connection: bool,
    /// Requests the L7 rules refused on it.
    pub requests: Vec<DeniedRequest>,
}

/// A request the rules refused.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeniedRequest {
    pub method: String,
    /// Canonical, as the rules saw it.
    pub path: String,
    /// The JSON-RPC or GraphQL call the request was refused for, if it
    /// was decided call by call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    sandbox: String,
    host: String,
    port: u16,
    binary: Option<String>,
}

struct Seen {
    count: u64,
    connections_denied: u64,
    last: Instant,
    first_unix: u64,
    last_unix: u64,
    reason: String,
    /// Names the agent gives, or carried over an upgrade.
    kind: Cow<'static, str>,
    protocol: Cow<'static, str>,
    address: Option<IpAddr>,
    requests: BTreeMap<DeniedRequest, u64>,
    requests_not_kept: u64,
}

/// A row of `status` and of `policy suggest`'s request.
#[derive(Debug, Serialize)]
pub struct DenialRow {
    pub sandbox: String,
    pub host: String,
    pub port: u16,
    pub binary: Option<String>,
    /// Connections denied, or with a request denied.
    pub count: u64,
    /// Of those, denied as connections (not by their requests).
    pub connections_denied: u64,
    /// Unix seconds of the first and the latest.
    pub first_seen: u64,
    pub last_seen: u64,
    pub last_reason: String,
    pub last_kind: Cow<'static, str>,
    pub last_protocol: Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// Requests denied on these connections, most frequent first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRow>,
    /// Denied requests past the ones kept (too many, or too long a path).
    #[serde(skip_serializing_if = "is_zero")]
    pub requests_not_kept: u64,
}

#[derive(Debug, Serialize)]
pub struct RequestRow {
    #[serde(flatten)]
    pub request: DeniedRequest,
    pub count: u64,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// Which rows [`RecentDenials::rows`] returns.
#[derive(Default)]
pub struct DenialFilter<'a> {
    pub sandbox: Option<&'a str>,
    /// Only those seen in the last this long.
    pub since: Option<Duration>,
}

#[derive(Default)]
pub struct RecentDenials {
    seen: Mutex<HashMap<Key, Seen>>,
}

impl RecentDenials {
    pub fn record(&self, sandbox: &str, denied: Denied) {
        let now = Instant::now();
        let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        let key = Key { sandbox: sandbox.to_owned(), host: denied.host, port: denied.port, binary: denied.binary };
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !seen.contains_key(&key) && seen.len() >= MAX_KEYS {
            seen.retain(|_, entry| now.duration_since(entry.last) < FORGET_AFTER);
            if seen.len() >= MAX_KEYS {
                let rarest = seen.iter().min_by_key(|(_, entry)| (entry.count, entry.last)).map(|(key, _)| key.clone());
                if let Some(rarest) = rarest {
                    seen.remove(&rarest);
                }
            }
        }
        let entry = seen.entry(key).or_insert(Seen {
            count: 0,
            connections_denied: 0,
            last: now,
            first_unix: now_unix,
            last_unix: now_unix,
            reason: String::new(),
            kind: Cow::Borrowed(""),
            protocol: Cow::Borrowed(""),
            address: None,
            requests: BTreeMap::new(),
            requests_not_kept: 0,
        });
        entry.count += 1;
        entry.connections_denied += u64::from(denied.connection);
        entry.last = now;
        entry.last_unix = now_unix;
        entry.reason = denied.reason;
        entry.kind = Cow::Borrowed(denied.kind);
        entry.protocol = Cow::Borrowed(denied.protocol);
        entry.address = denied.address.or(entry.address);
        for request in denied.requests {
            let keep = request.path.len() <= MAX_PATH
                && (entry.requests.len() < MAX_REQUESTS_PER_KEY || entry.requests.contains_key(&request));
            if keep {
                *entry.requests.entry(request).or_default() += 1;
            } else {
                entry.requests_not_kept += 1;
            }
        }
    }

    /// The `limit` most frequent, most recent first among equals.
    pub fn top(&self, limit: usize) -> Vec<DenialRow> {
        self.rows(&DenialFilter::default(), limit)
    }

    /// The `limit` most frequent that `filter` lets through.
    pub fn rows(&self, filter: &DenialFilter, limit: usize) -> Vec<DenialRow> {
        let now = Instant::now();
        let recent = filter.since.unwrap_or(FORGET_AFTER).min(FORGET_AFTER);
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rows: Vec<(&Key, &Seen)> = seen
            .iter()
            .filter(|(key, entry)| {
                now.duration_since(entry.last) < recent && filter.sandbox.is_none_or(|sandbox| key.sandbox == sandbox)
            })
            .collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(b.1.last.cmp(&a.1.last)));
        rows.into_iter()
            .take(limit)
            .map(|(key, entry)| {
                let mut requests: Vec<RequestRow> = entry
                    .requests
                    .iter()
                    .map(|(request, &count)| RequestRow { request: request.clone(), count })
                    .collect();
                requests.sort_by_key(|row| std::cmp::Reverse(row.count));
                DenialRow {
                    sandbox: key.sandbox.clone(),
                    host: key.host.clone(),
                    port: key.port,
                    binary: key.binary.clone(),
                    count: entry.count,
                    connections_denied: entry.connections_denied,
                    first_seen: entry.first_unix,
                    last_seen: entry.last_unix,
                    last_reason: entry.reason.clone(),
                    last_kind: entry.kind.clone(),
                    last_protocol: entry.protocol.clone(),
                    address: entry.address,
                    requests,
                    requests_not_kept: entry.requests_not_kept,
                }
            })
            .collect()
    }
}

/// One entry of [`RecentDenials`] as an upgrade carries it to the next daemon.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedDenial {
    sandbox: String,
    host: String,
    port: u16,
    binary: Option<String>,
    count: u64,
    connections_denied: u64,
    /// How long ago it was last seen, in milliseconds.
    age_ms: u64,
    first_unix: u64,
    last_unix: u64,
    reason: String,
    kind: String,
    protocol: String,
    address: Option<IpAddr>,
    requests: Vec<(DeniedRequest, u64)>,
    requests_not_kept: u64,
}

impl RecentDenials {
    /// Every entry, for the next daemon.
    pub fn export(&self) -> Vec<CarriedDenial> {
        let now = Instant::now();
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.iter()
            .map(|(key, entry)| CarriedDenial {
                sandbox: key.sandbox.clone(),
                host: key.host.clone(),
                port: key.port,
                binary: key.binary.clone(),
                count: entry.count,
                connections_denied: entry.connections_denied,
                age_ms: u64::try_from(now.duration_since(entry.last).as_millis()).unwrap_or(u64::MAX),
                first_unix: entry.first_unix,
                last_unix: entry.last_unix,
                reason: entry.reason.clone(),
                kind: entry.kind.clone().into_owned(),
                protocol: entry.protocol.clone().into_owned(),
                address: entry.address,
                requests: entry.requests.iter().map(|(request, count)| (request.clone(), *count)).collect(),
                requests_not_kept: entry.requests_not_kept,
            })
            .collect()
    }

    /// Takes the previous daemon's entries; counts of one key seen by both add up.
    pub fn import(&self, carried: Vec<CarriedDenial>) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for denial in carried {
            if seen.len() >= MAX_KEYS {
                break;
            }
            let key = Key { sandbox: denial.sandbox, host: denial.host, port: denial.port, binary: denial.binary };
            let last = now.checked_sub(Duration::from_millis(denial.age_ms)).unwrap_or(now);
            let requests: BTreeMap<DeniedRequest, u64> =
                denial.requests.into_iter().take(MAX_REQUESTS_PER_KEY).collect();
            match seen.get_mut(&key) {
                Some(entry) => {
                    entry.count += denial.count;
                    entry.connections_denied += denial.connections_denied;
                    entry.first_unix = entry.first_unix.min(denial.first_unix);
                    for (request, count) in requests {
                        *entry.requests.entry(request).or_default() += count;
                    }
                }
                None => {
                    let entry = Seen {
                        count: denial.count,
                        connections_denied: denial.connections_denied,
                        last,
                        first_unix: denial.first_unix,
                        last_unix: denial.last_unix,
                        reason: denial.reason,
                        kind: Cow::Owned(denial.kind),
                        protocol: Cow::Owned(denial.protocol),
                        address: denial.address,
                        requests,
                        requests_not_kept: denial.requests_not_kept,
                    };
                    seen.insert(key, entry);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(host: &str, binary: &str) -> Denied {
        Denied {
            host: host.into(),
            port: 443,
            binary: Some(binary.into()),
            reason: format!("{host} not allowed"),
            kind: "policy_denied",
            protocol: "tls",
            address: None,
            connection: true,
            requests: Vec::new(),
        }
    }

    fn request(path: &str) -> DeniedRequest {
        DeniedRequest { method: "POST".into(), path: path.into(), call: None }
    }

    #[test]
    fn denials_are_counted_by_host_port_and_binary_and_bounded() {
        let recent = RecentDenials::default();
        for _ in 0..3 {
            recent.record("web", denied("a.test", "/usr/bin/curl"));
        }
        recent.record("web", denied("a.test", "/usr/bin/python3"));
        recent.record("other", denied("a.test", "/usr/bin/curl"));
        let top = recent.top(2);
        assert_eq!((top[0].sandbox.as_str(), top[0].host.as_str(), top[0].count), ("web", "a.test", 3));
        assert_eq!(top[0].binary.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(top.len(), 2);
        let filter = DenialFilter { sandbox: Some("other"), since: None };
        assert_eq!(recent.rows(&filter, 10).len(), 1);
        let filter = DenialFilter { sandbox: None, since: Some(Duration::ZERO) };
        assert!(recent.rows(&filter, 10).is_empty(), "nothing seen in the last 0 s");
        for n in 0..MAX_KEYS * 2 {
            recent.record("web", denied(&format!("h{n}.test"), "/usr/bin/curl"));
        }
        assert!(recent.seen.lock().unwrap().len() <= MAX_KEYS);
        assert_eq!(recent.top(1)[0].count, 3, "the frequent one outlives a flood of one-offs");
    }

    #[test]
    fn denied_requests_are_counted_per_key_and_bounded() {
        let recent = RecentDenials::default();
        for _ in 0..2 {
            let requests = vec![request("/a"), request("/b")];
            recent.record("web", Denied { connection: false, requests, ..denied("api.test", "/usr/bin/curl") });
        }
        let requests = (0..MAX_REQUESTS_PER_KEY).map(|n| request(&format!("/n{n}"))).collect();
        recent.record("web", Denied { connection: false, requests, ..denied("api.test", "/usr/bin/curl") });
        let long = vec![request(&format!("/{}", "x".repeat(MAX_PATH)))];
        recent.record("web", Denied { connection: false, requests: long, ..denied("api.test", "/usr/bin/curl") });
        let row = &recent.top(1)[0];
        assert_eq!((row.count, row.connections_denied), (4, 0));
        assert_eq!(row.requests.len(), MAX_REQUESTS_PER_KEY);
        assert_eq!((row.requests[0].request.path.as_str(), row.requests[0].count), ("/a", 2));
        // Two of the 16 new paths past the 16 kept, and the long one.
        assert_eq!(row.requests_not_kept, 3);
    }

    #[test]
    fn denials_cross_an_upgrade_and_add_up() {
        let old = RecentDenials::default();
        let requests = vec![request("/a")];
        old.record("web", Denied { connection: false, requests, ..denied("api.test", "/usr/bin/curl") });
        old.record("web", denied("b.test", "/usr/bin/curl"));
        let carried: Vec<CarriedDenial> = serde_json::from_str(&serde_json::to_string(&old.export()).unwrap()).unwrap();
        let new = RecentDenials::default();
        new.record("web", denied("b.test", "/usr/bin/curl"));
        new.import(carried);
        let rows = new.top(10);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].host.as_str(), rows[0].count), ("b.test", 2));
        assert_eq!(
            (rows[1].host.as_str(), rows[1].last_kind.as_ref(), rows[1].last_protocol.as_ref()),
            ("api.test", "policy_denied", "tls")
        );
        assert_eq!(rows[1].requests[0].request.path, "/a");
    }
}
