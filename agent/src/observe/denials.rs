//! The most frequent recent denials, aggregated by (sandbox, host, port,
//! binary): what an operator looks at to decide what to allow.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// Distinct (sandbox, host, port, binary) kept; past this the oldest and
/// rarest go first, so a sandbox trying many hosts cannot grow the table.
const MAX_KEYS: usize = 1024;
/// Denials not seen again for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// One denied connection.
pub struct Denied {
    pub host: String,
    pub port: u16,
    pub binary: Option<String>,
    pub reason: String,
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
    last: Instant,
    last_unix: u64,
    reason: String,
}

/// A row of `status`.
#[derive(Debug, Serialize)]
pub struct DenialRow {
    pub sandbox: String,
    pub host: String,
    pub port: u16,
    pub binary: Option<String>,
    pub count: u64,
    /// Unix seconds of the latest.
    pub last_seen: u64,
    pub last_reason: String,
}

#[derive(Default)]
pub struct RecentDenials {
    seen: Mutex<HashMap<Key, Seen>>,
}

impl RecentDenials {
    pub fn record(&self, sandbox: &str, denied: Denied) {
        let now = Instant::now();
        let last_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
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
        let entry = seen.entry(key).or_insert(Seen { count: 0, last: now, last_unix, reason: String::new() });
        entry.count += 1;
        entry.last = now;
        entry.last_unix = last_unix;
        entry.reason = denied.reason;
    }

    /// The `limit` most frequent, most recent first among equals.
    pub fn top(&self, limit: usize) -> Vec<DenialRow> {
        let now = Instant::now();
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rows: Vec<(&Key, &Seen)> =
            seen.iter().filter(|(_, entry)| now.duration_since(entry.last) < FORGET_AFTER).collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(b.1.last.cmp(&a.1.last)));
        rows.into_iter()
            .take(limit)
            .map(|(key, entry)| DenialRow {
                sandbox: key.sandbox.clone(),
                host: key.host.clone(),
                port: key.port,
                binary: key.binary.clone(),
                count: entry.count,
                last_seen: entry.last_unix,
                last_reason: entry.reason.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(host: &str, binary: &str) -> Denied {
        Denied { host: host.into(), port: 443, binary: Some(binary.into()), reason: format!("{host} not allowed") }
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
        for n in 0..MAX_KEYS * 2 {
            recent.record("web", denied(&format!("h{n}.test"), "/usr/bin/curl"));
        }
        assert!(recent.seen.lock().unwrap().len() <= MAX_KEYS);
        assert_eq!(recent.top(1)[0].count, 3, "the frequent one outlives a flood of one-offs");
    }
}
