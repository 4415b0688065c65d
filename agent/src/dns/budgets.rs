//! Each sandbox's query rate, queries in flight and refusal lines, beside
//! the total in flight: one flooding sandbox is refused while the others
//! are still answered.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Sandbox, MAX_SANDBOXES};

/// A refused name is logged once per sandbox in this interval...
pub(super) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
pub(super) const MAX_LOGGED_NAMES: usize = 4096;
/// ...and each sandbox logs at most this many refusal lines a second.
pub(super) const LOG_LINES_PER_SECOND: u32 = 5;

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

/// Per-sandbox query budgets and log limits, beside the total in flight.
pub(super) struct Budgets {
    pub(super) limits: DnsLimits,
    total: Arc<Semaphore>,
    state: Mutex<BudgetState>,
}

#[derive(Default)]
pub(super) struct BudgetState {
    pub(super) sandboxes: HashMap<Sandbox, SandboxBudget>,
    /// When each (sandbox, refused name) was last logged.
    pub(super) logged: HashMap<(Sandbox, String), Instant>,
}

pub(super) struct SandboxBudget {
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
pub(super) struct QueryPermit {
    budgets: Arc<Budgets>,
    pub(super) sandbox: Sandbox,
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
    pub(super) fn new(limits: DnsLimits) -> Self {
        Self { limits, total: Arc::new(Semaphore::new(limits.max_in_flight)), state: Mutex::default() }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn burst(&self) -> f64 {
        f64::from(self.limits.queries_per_second)
    }

    pub(super) fn take_token(&self, sandbox: Sandbox, now: Instant) -> bool {
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

    pub(super) fn acquire(self: &Arc<Self>, sandbox: Sandbox) -> Option<QueryPermit> {
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
    pub(super) fn may_log(&self, sandbox: Sandbox, name: Option<&str>, now: Instant) -> Option<u64> {
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
