//! What the agent's DNS told each sandbox, per sandbox and bounded.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{normalize, MAX_SANDBOXES};

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
    pub(super) limits: RecordLimits,
    sandboxes: Mutex<HashMap<u64, VecDeque<Answer>>>,
}

/// One answer as an upgrade carries it to the next daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedRecord {
    /// The sandbox's cgroup id.
    pub sandbox: u64,
    pub name: String,
    pub ip: IpAddr,
    /// Milliseconds it has left.
    pub left_ms: u64,
}

pub(super) struct Answer {
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

    /// Until when `sandbox` knows `ip` for `name` (its latest live answer).
    pub fn expiry(&self, sandbox: u64, name: &str, ip: IpAddr) -> Option<Instant> {
        let (name, ip, now) = (normalize(name), ip.to_canonical(), Instant::now());
        let sandboxes = self.lock();
        let answers = sandboxes.get(&sandbox).into_iter().flatten();
        answers.filter(|answer| answer.expiry > now && answer.ip == ip && answer.name == name).map(|a| a.expiry).max()
    }

    pub(super) fn names_at(&self, sandbox: u64, ip: IpAddr, now: Instant) -> Vec<String> {
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

    pub(super) fn record(&self, sandbox: u64, name: &str, answers: &[(IpAddr, u32)], now: Instant) {
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

    /// Every live answer, for the next daemon.
    pub fn export(&self) -> Vec<CarriedRecord> {
        let now = Instant::now();
        let sandboxes = self.lock();
        let live = sandboxes.iter().flat_map(|(sandbox, answers)| {
            answers.iter().filter(|answer| answer.expiry > now).map(|answer| CarriedRecord {
                sandbox: *sandbox,
                name: answer.name.clone(),
                ip: answer.ip,
                left_ms: u64::try_from((answer.expiry - now).as_millis()).unwrap_or(u64::MAX),
            })
        });
        live.collect()
    }

    /// Takes the previous daemon's answers, each for the time it had left
    /// (an answer given again replaces the one before, as in [`Self::record`]).
    pub fn import(&self, carried: &[CarriedRecord]) {
        let now = Instant::now();
        let mut sandboxes = self.lock();
        for record in carried {
            if sandboxes.len() >= MAX_SANDBOXES && !sandboxes.contains_key(&record.sandbox) {
                continue;
            }
            let left = Duration::from_millis(record.left_ms).min(self.limits.max_ttl);
            let name = normalize(&record.name);
            let ip = record.ip.to_canonical();
            let entries = sandboxes.entry(record.sandbox).or_default();
            entries.retain(|answer| !(answer.ip == ip && answer.name == name));
            entries.push_back(Answer { name, ip, expiry: now + left });
            while entries.len() > self.limits.per_sandbox {
                entries.pop_front();
            }
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<Answer>>> {
        self.sandboxes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
