//! Per-tenant limits of a tier: requests and tokens per minute (sliding windows), a token
//! budget per calendar month (UTC, counted from the ledger), and concurrent requests.

use parking_lot::Mutex;
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::Caller;
use crate::{ledger::Ledger, util::now_ms};

const WINDOW: Duration = Duration::from_secs(60);

/// A refusal, with what the client needs to back off.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitError {
    pub message: String,
    pub retry_after: u64,
    /// `x-ratelimit-*` headers.
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Default)]
struct Window {
    requests: VecDeque<Instant>,
    tokens: VecDeque<(Instant, u64)>,
    running: u32,
    /// (start of the month in Unix ms, tokens used in it)
    budget: Option<(u64, u64)>,
}

/// (start of the month in Unix ms, requests, tokens)
type TierMonth = (u64, u64, u64);

#[derive(Clone)]
pub struct Limits {
    tenants: Arc<Mutex<HashMap<String, Window>>>,
    /// Per tier: what it used this month — read from the ledger once a month, then counted
    /// as requests finish.
    tiers: Arc<Mutex<HashMap<String, TierMonth>>>,
    ledger: Ledger,
    /// In a mesh: tokens the other nodes report for each tenant this month (their start of
    /// month, tokens), counted against budgets beside this node's own.
    peers: Arc<Mutex<HashMap<String, (u64, u64)>>>,
}

/// Counts toward the tenant's concurrency while held.
pub struct Admission {
    limits: Limits,
    tenant: String,
    /// When it was counted in the tenant's request window.
    at: Instant,
}

impl Admission {
    /// Take the request back out of the tenant's request window: it leaves this node
    /// (placed on a peer, which admits it against its own window). A request refused after
    /// admission for its own content is not refunded: the work of reading it was done.
    pub fn refund(self) {
        if let Some(w) = self.limits.tenants.lock().get_mut(&self.tenant) {
            if let Some(i) = w.requests.iter().rposition(|t| *t == self.at) {
                w.requests.remove(i);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(w) = self.limits.tenants.lock().get_mut(&self.tenant) {
            w.running = w.running.saturating_sub(1);
        }
    }
}

/// The UTC (year, month) containing Unix milliseconds `ms` (H. Hinnant's civil date).
fn year_month(ms: u64) -> (i64, i64) {
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month)
}

/// Unix milliseconds at the start of the UTC month containing `ms`, and of the next one.
pub fn month_bounds(ms: u64) -> (u64, u64) {
    let (year, month) = year_month(ms);
    let to_days = |y: i64, m: i64| {
        let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * m + 2) / 5;
        era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
    };
    let start = to_days(year, month);
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    (
        (start * 86_400_000) as u64,
        (to_days(ny, nm) * 86_400_000) as u64,
    )
}

/// `YYYY-MM` of the UTC month containing `ms`.
pub fn month_label(ms: u64) -> String {
    let (year, month) = year_month(ms);
    format!("{year:04}-{month:02}")
}

impl Limits {
    pub fn new(ledger: Ledger) -> Self {
        Limits {
            tenants: Arc::default(),
            tiers: Arc::default(),
            ledger,
            peers: Arc::default(),
        }
    }

    /// Admit a request of `caller` now, or say which limit it is over.
    pub fn admit(&self, caller: &Caller) -> Result<Admission, LimitError> {
        let tier = &caller.tier;
        let now = Instant::now();
        let month = month_bounds(now_ms());
        let used_this_month = if tier.token_budget > 0 {
            Some(self.month_usage(&caller.tenant, month))
        } else {
            None
        };
        let mut all = self.tenants.lock();
        let w = all.entry(caller.tenant.clone()).or_default();
        while w
            .requests
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            w.requests.pop_front();
        }
        while w
            .tokens
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW)
        {
            w.tokens.pop_front();
        }
        let reset = |oldest: Option<Instant>| {
            oldest.map_or(1, |t| (WINDOW - now.duration_since(t)).as_secs().max(1))
        };
        let tokens: u64 = w.tokens.iter().map(|(_, n)| n).sum();
        let headers = |w: &Window| {
            let mut h = Vec::new();
            if tier.requests_per_minute > 0 {
                h.push((
                    "x-ratelimit-limit-requests",
                    tier.requests_per_minute.to_string(),
                ));
                h.push((
                    "x-ratelimit-remaining-requests",
                    (tier.requests_per_minute as usize)
                        .saturating_sub(w.requests.len())
                        .to_string(),
                ));
                h.push((
                    "x-ratelimit-reset-requests",
                    format!("{}s", reset(w.requests.front().copied())),
                ));
            }
            if tier.tokens_per_minute > 0 {
                h.push((
                    "x-ratelimit-limit-tokens",
                    tier.tokens_per_minute.to_string(),
                ));
                h.push((
                    "x-ratelimit-remaining-tokens",
                    tier.tokens_per_minute.saturating_sub(tokens).to_string(),
                ));
                h.push((
                    "x-ratelimit-reset-tokens",
                    format!("{}s", reset(w.tokens.front().map(|(t, _)| *t))),
                ));
            }
            h
        };
        let refuse = |message: String, retry_after: u64, w: &Window| LimitError {
            message,
            retry_after,
            headers: headers(w),
        };
        if tier.requests_per_minute > 0 && w.requests.len() as u64 >= tier.requests_per_minute {
            return Err(refuse(
                format!(
                    "tier {:?} allows {} requests per minute",
                    tier.name, tier.requests_per_minute
                ),
                reset(w.requests.front().copied()),
                w,
            ));
        }
        if tier.tokens_per_minute > 0 && tokens >= tier.tokens_per_minute {
            return Err(refuse(
                format!(
                    "tier {:?} allows {} tokens per minute",
                    tier.name, tier.tokens_per_minute
                ),
                reset(w.tokens.front().map(|(t, _)| *t)),
                w,
            ));
        }
        if let Some(used) = used_this_month {
            let used = match w.budget {
                Some((start, n)) if start == month.0 => n,
                _ => used,
            };
            w.budget = Some((month.0, used));
            let used = used + self.peer_usage(&caller.tenant, month.0);
            if used >= tier.token_budget {
                let secs = (month.1.saturating_sub(now_ms())) / 1000;
                return Err(refuse(
                    format!(
                        "the token budget of tier {:?} for this month ({}) is spent",
                        tier.name, tier.token_budget
                    ),
                    secs.max(1),
                    w,
                ));
            }
        }
        if tier.max_concurrency > 0 && w.running >= tier.max_concurrency {
            return Err(refuse(
                format!(
                    "tier {:?} allows {} concurrent requests",
                    tier.name, tier.max_concurrency
                ),
                1,
                w,
            ));
        }
        w.requests.push_back(now);
        w.running += 1;
        Ok(Admission {
            limits: self.clone(),
            tenant: caller.tenant.clone(),
            at: now,
        })
    }

    /// What a tier used in the current month: for the pricing policy.
    pub fn period_use(&self, tier: &str) -> crate::policy::PeriodUse {
        let month = month_bounds(now_ms());
        let (requests, tokens) = self.tier_month(tier, month);
        crate::policy::PeriodUse {
            period: month_label(month.0),
            requests,
            tokens,
        }
    }

    /// Requests and tokens of `tier` in the current month (status page).
    pub fn tier_this_month(&self, tier: &str) -> (u64, u64) {
        self.tier_month(tier, month_bounds(now_ms()))
    }

    fn tier_month(&self, tier: &str, (start, end): (u64, u64)) -> (u64, u64) {
        if let Some(&(s, r, t)) = self.tiers.lock().get(tier) {
            if s == start {
                return (r, t);
            }
        }
        let (r, t) = self
            .ledger
            .records(None, start, end)
            .map(|rs| {
                rs.iter()
                    .filter(|r| r.tier == tier)
                    .fold((0, 0), |(n, t), r| {
                        (n + 1, t + r.input_tokens + r.output_tokens)
                    })
            })
            .unwrap_or((0, 0));
        self.tiers.lock().insert(tier.to_string(), (start, r, t));
        (r, t)
    }

    /// Count tokens a finished request used.
    pub fn add_tokens(&self, tenant: &str, tier: &str, tokens: u64) {
        {
            let mut tiers = self.tiers.lock();
            if let Some((start, r, t)) = tiers.get_mut(tier) {
                if *start == month_bounds(now_ms()).0 {
                    *r += 1;
                    *t += tokens;
                }
            }
        }
        let mut all = self.tenants.lock();
        let w = all.entry(tenant.to_string()).or_default();
        w.tokens.push_back((Instant::now(), tokens));
        if let Some((_, used)) = &mut w.budget {
            *used += tokens;
        }
    }

    /// This node's tokens per tenant in the current month, for tenants on tiers with a
    /// budget that have been admitted here (what a node publishes to the mesh).
    pub fn month_usage_here(&self) -> Vec<(String, u64, u64)> {
        let start = month_bounds(now_ms()).0;
        self.tenants
            .lock()
            .iter()
            .filter_map(|(t, w)| match w.budget {
                Some((s, used)) if s == start => Some((t.clone(), s, used)),
                _ => None,
            })
            .collect()
    }

    /// Per budgeted tier, the largest share of its monthly budget a tenant of the tier has
    /// used this month (this node's tokens and the peers' together). Tenants seen neither here
    /// nor by a peer this month have used nothing.
    pub fn largest_budget_shares(&self, tenancy: &super::Tenancy) -> HashMap<String, f64> {
        let start = month_bounds(now_ms()).0;
        let mut used: HashMap<String, u64> = self
            .peers
            .lock()
            .iter()
            .filter(|(_, (s, _))| *s == start)
            .map(|(t, (_, n))| (t.clone(), *n))
            .collect();
        for (tenant, _, n) in self.month_usage_here() {
            *used.entry(tenant).or_default() += n;
        }
        let mut most: HashMap<String, f64> = HashMap::new();
        for (tenant, n) in used {
            if let Some(tier) = tenancy.tier_of(&tenant).filter(|t| t.token_budget > 0) {
                let share = n as f64 / tier.token_budget as f64;
                let m = most.entry(tier.name.clone()).or_default();
                *m = m.max(share);
            }
        }
        most
    }

    /// Set the budget gauges: each budgeted tier's monthly budget and its largest share used.
    pub fn publish_budgets(&self, tenancy: &super::Tenancy, metrics: &crate::metrics::Metrics) {
        let most = self.largest_budget_shares(tenancy);
        for tier in tenancy.tiers().iter().filter(|t| t.token_budget > 0) {
            metrics
                .tier_token_budget
                .with_label_values(&[&tier.name])
                .set(tier.token_budget as i64);
            metrics
                .tier_budget_used_ratio
                .with_label_values(&[&tier.name])
                .set(most.get(&tier.name).copied().unwrap_or(0.0));
        }
    }

    /// Replace what the other nodes report: (tenant, start of month, tokens), summed over
    /// the nodes. Budgets then hold mesh-wide, late by at most one publish interval.
    pub fn set_peer_usage(&self, usage: HashMap<String, (u64, u64)>) {
        *self.peers.lock() = usage;
    }

    fn peer_usage(&self, tenant: &str, month_start: u64) -> u64 {
        match self.peers.lock().get(tenant) {
            Some((start, tokens)) if *start == month_start => *tokens,
            _ => 0,
        }
    }

    fn month_usage(&self, tenant: &str, (start, end): (u64, u64)) -> u64 {
        if let Some(Window {
            budget: Some((s, used)),
            ..
        }) = self.tenants.lock().get(tenant)
        {
            if *s == start {
                return *used;
            }
        }
        self.ledger
            .records(Some(tenant), start, end)
            .map(|rs| rs.iter().map(|r| r.input_tokens + r.output_tokens).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refunded_request_leaves_the_window_but_a_finished_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits::new(Ledger::open(dir.path()).unwrap());
        let tier: super::super::Tier =
            toml::from_str("name = 'one'\nrequests_per_minute = 1\n").unwrap();
        let caller = Caller {
            tenant: "t".into(),
            tier: std::sync::Arc::new(tier),
            authorization: None,
        };
        limits.admit(&caller).unwrap().refund();
        let kept = limits.admit(&caller).unwrap();
        drop(kept);
        let e = limits.admit(&caller).err().expect("the second one counts");
        assert!(e.message.contains("1 requests per minute"), "{}", e.message);
    }

    #[test]
    fn month_bounds_are_utc_calendar_months() {
        // 2026-11-21T23:31:56Z
        let (start, end) = month_bounds(1_795_303_916_000);
        assert_eq!(start, 1_793_491_200_000); // 2026-11-01
        assert_eq!(end, 1_796_083_200_000); // 2026-12-01
        assert_eq!(month_label(start), "2026-11");
        let (s, e) = month_bounds(1_798_761_600_000 - 1); // last ms of 2026
        assert_eq!((s, e), (1_796_083_200_000, 1_798_761_600_000));
    }
}
