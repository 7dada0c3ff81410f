//! Per-tenant limits of a tier: requests and tokens per minute (sliding windows), a token
//! budget per calendar month (UTC, counted from the ledger), and concurrent requests.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Caller, Tier};
use crate::{ledger::Ledger, util::now_ms};

const WINDOW: Duration = Duration::from_secs(60);

/// A refusal, with what the client needs to back off.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitError {
    pub message: String,
    pub retry_after: u64,
    /// The tier's per-minute windows as they stood at the refusal.
    pub quotas: Quotas,
}

/// One window of a tier as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// What the window allows.
    pub limit: u64,
    /// What is left of it now.
    pub remaining: u64,
    /// Seconds until the oldest use leaves the window (at least 1).
    pub reset: u64,
}

/// The per-minute windows a tier sets, by kind (a window the tier does not limit is `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    pub requests: Option<Quota>,
    pub tokens: Option<Quota>,
}

/// Which limit a request is over: the message and the seconds to wait.
struct Over(String, u64);

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
    /// While this node cannot see the other nodes' usage: what it may still spend.
    cut: Arc<Mutex<Option<Cut>>>,
}

/// A node cut off from the mesh's usage (etcd lost) admits each budgeted tenant only an equal
/// share of what was left of its budget when it lost sight, one share per node it last saw:
/// so the nodes on the other side, which do not know of its spending, can overshoot the
/// budget by at most that share.
struct Cut {
    /// Nodes last seen, this one included.
    nodes: u64,
    /// Per tenant: (start of the month, this node's tokens when its share was set, the share).
    shares: HashMap<String, (u64, u64, u64)>,
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

/// Seconds until the oldest use in a window leaves it (at least 1).
fn reset(oldest: Option<Instant>, now: Instant) -> u64 {
    oldest.map_or(1, |t| (WINDOW - now.duration_since(t)).as_secs().max(1))
}

impl Window {
    /// Let the uses older than the window go.
    fn expire(&mut self, now: Instant) {
        while self
            .requests
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.requests.pop_front();
        }
        while self
            .tokens
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW)
        {
            self.tokens.pop_front();
        }
    }

    fn tokens_used(&self) -> u64 {
        self.tokens.iter().map(|(_, n)| n).sum()
    }

    fn requests_reset(&self, now: Instant) -> u64 {
        reset(self.requests.front().copied(), now)
    }

    fn tokens_reset(&self, now: Instant) -> u64 {
        reset(self.tokens.front().map(|(t, _)| *t), now)
    }

    /// The tier's per-minute windows as they stand now.
    fn quotas(&self, tier: &Tier, now: Instant) -> Quotas {
        Quotas {
            requests: (tier.requests_per_minute > 0).then(|| Quota {
                limit: tier.requests_per_minute,
                remaining: tier
                    .requests_per_minute
                    .saturating_sub(self.requests.len() as u64),
                reset: self.requests_reset(now),
            }),
            tokens: (tier.tokens_per_minute > 0).then(|| Quota {
                limit: tier.tokens_per_minute,
                remaining: tier.tokens_per_minute.saturating_sub(self.tokens_used()),
                reset: self.tokens_reset(now),
            }),
        }
    }

    /// Over the tier's requests or tokens per minute?
    fn over_per_minute(&self, tier: &Tier, now: Instant) -> Option<Over> {
        if tier.requests_per_minute > 0 && self.requests.len() as u64 >= tier.requests_per_minute {
            return Some(Over(
                format!(
                    "tier {:?} allows {} requests per minute",
                    tier.name, tier.requests_per_minute
                ),
                self.requests_reset(now),
            ));
        }
        if tier.tokens_per_minute > 0 && self.tokens_used() >= tier.tokens_per_minute {
            return Some(Over(
                format!(
                    "tier {:?} allows {} tokens per minute",
                    tier.name, tier.tokens_per_minute
                ),
                self.tokens_reset(now),
            ));
        }
        None
    }

    /// Over the tier's concurrent requests?
    fn over_concurrency(&self, tier: &Tier) -> Option<Over> {
        (tier.max_concurrency > 0 && self.running >= tier.max_concurrency).then(|| {
            Over(
                format!(
                    "tier {:?} allows {} concurrent requests",
                    tier.name, tier.max_concurrency
                ),
                1,
            )
        })
    }
}

pub use crate::ledger::month::{month_bounds, month_label};

impl Limits {
    pub fn new(ledger: Ledger) -> Self {
        Limits {
            tenants: Arc::default(),
            tiers: Arc::default(),
            ledger,
            peers: Arc::default(),
            cut: Arc::default(),
        }
    }

    /// This node lost sight of the other nodes' usage, having last seen `nodes` nodes (itself
    /// included): from now on each budgeted tenant may spend here only its share of what is
    /// left ([`Cut`]), until [`Limits::regained_sight`].
    pub fn lost_sight(&self, nodes: usize) {
        *self.cut.lock() = Some(Cut {
            nodes: nodes.max(1) as u64,
            shares: HashMap::new(),
        });
    }

    /// The other nodes' usage is seen again: budgets count it as before.
    pub fn regained_sight(&self) {
        *self.cut.lock() = None;
    }

    /// Cut off from the mesh, is `tenant`'s share of what was left spent here? `own` is this
    /// node's use this month, `total` the mesh's as last seen.
    fn over_share(
        &self,
        tier: &Tier,
        tenant: &str,
        start: u64,
        own: u64,
        total: u64,
    ) -> Option<Over> {
        let mut cut = self.cut.lock();
        let cut = cut.as_mut()?;
        let nodes = cut.nodes;
        let left = tier.token_budget.saturating_sub(total);
        let share = cut
            .shares
            .entry(tenant.to_string())
            .or_insert((start, own, left / nodes));
        if share.0 != start {
            *share = (start, own, left / nodes); // a new month began meanwhile
        }
        let (_, at, allowed) = *share;
        (own.saturating_sub(at) >= allowed).then(|| {
            Over(
                format!(
                    "this node cannot see the rest of the mesh (etcd is unreachable), so it admits \
                     only its share (1/{nodes}) of what was left of the token budget of tier {:?}: \
                     {allowed} tokens, spent",
                    tier.name
                ),
                5,
            )
        })
    }

    /// Admit a request of `caller` now, or say which limit it is over: requests and tokens
    /// per minute, then the month's token budget, then concurrency.
    pub fn admit(&self, caller: &Caller) -> Result<Admission, LimitError> {
        let tier = &caller.tier;
        let now = Instant::now();
        let month = month_bounds(now_ms());
        let used_this_month =
            (tier.token_budget > 0).then(|| self.month_usage(&caller.tenant, month));
        let mut all = self.tenants.lock();
        let w = all.entry(caller.tenant.clone()).or_default();
        w.expire(now);
        let over = w
            .over_per_minute(tier, now)
            .or_else(|| {
                let used = used_this_month?;
                self.over_budget(w, caller, month, used)
            })
            .or_else(|| w.over_concurrency(tier));
        if let Some(Over(message, retry_after)) = over {
            return Err(LimitError {
                message,
                retry_after,
                quotas: w.quotas(tier, now),
            });
        }
        w.requests.push_back(now);
        w.running += 1;
        Ok(Admission {
            limits: self.clone(),
            tenant: caller.tenant.clone(),
            at: now,
        })
    }

    /// Is the month's token budget spent, this node's use and the peers' together? `used` is
    /// this node's use as the ledger knows it, unless the window counts this month already.
    fn over_budget(
        &self,
        w: &mut Window,
        caller: &Caller,
        (start, end): (u64, u64),
        used: u64,
    ) -> Option<Over> {
        let tier = &caller.tier;
        let used = match w.budget {
            Some((s, n)) if s == start => n,
            _ => used,
        };
        w.budget = Some((start, used));
        let total = used + self.peer_usage(&caller.tenant, start);
        if total >= tier.token_budget {
            let secs = (end.saturating_sub(now_ms())) / 1000;
            return Some(Over(
                format!(
                    "the token budget of tier {:?} for this month ({}) is spent",
                    tier.name, tier.token_budget
                ),
                secs.max(1),
            ));
        }
        self.over_share(tier, &caller.tenant, start, used, total)
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
        match self.ledger.tier_totals(tier, start, end) {
            Ok((r, t)) => {
                self.tiers.lock().insert(tier.to_string(), (start, r, t));
                (r, t)
            }
            Err(e) => {
                tracing::error!(error = %e, tier, "Could not sum the tier's month");
                (0, 0)
            }
        }
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
        // With a shared ledger, the other nodes' use is read from it (late by at most a few
        // seconds plus their shipping), dead nodes' records included.
        if let Some(tokens) = self.ledger.others_tokens(tenant, month_start) {
            return tokens;
        }
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
            .tenant_tokens(tenant, start, end)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, tenant, "Could not sum the tenant's month");
                0
            })
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

    #[test]
    fn month_bounds_cross_years_and_leap_februaries() {
        // The first ms of 2027 is in January 2027.
        let (s, e) = month_bounds(1_798_761_600_000);
        assert_eq!((s, e), (1_798_761_600_000, 1_801_440_000_000)); // 2027-01-01, 2027-02-01
        assert_eq!(month_label(s), "2027-01");
        // 2028-02-29T12:00:00Z: a leap February has 29 days.
        let (s, e) = month_bounds(1_835_438_400_000);
        assert_eq!(s, 1_832_976_000_000); // 2028-02-01
        assert_eq!(e, 1_835_481_600_000); // 2028-03-01
        assert_eq!((e - s) / 86_400_000, 29);
        assert_eq!(month_label(e - 1), "2028-02");
        // 2100 is not a leap year; 2000 is.
        let (s, e) = month_bounds(4_106_764_800_000); // 2100-02-20
        assert_eq!((e - s) / 86_400_000, 28);
        let (s, e) = month_bounds(950_486_400_000); // 2000-02-14
        assert_eq!((e - s) / 86_400_000, 29);
        assert_eq!(month_bounds(0), (0, 2_678_400_000));
        assert_eq!(month_label(0), "1970-01");
    }

    #[test]
    fn a_refusal_says_where_each_window_stands() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits::new(Ledger::open(dir.path()).unwrap());
        let tier: super::super::Tier =
            toml::from_str("name = 'two'\nrequests_per_minute = 2\ntokens_per_minute = 100\n")
                .unwrap();
        let caller = Caller {
            tenant: "t".into(),
            tier: std::sync::Arc::new(tier),
            authorization: None,
        };
        let _a = limits.admit(&caller).unwrap();
        limits.add_tokens("t", "two", 30);
        let _b = limits.admit(&caller).unwrap();
        let e = limits.admit(&caller).err().expect("over 2 per minute");
        let requests = e.quotas.requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (2, 0));
        assert!((1..=60).contains(&requests.reset), "{requests:?}");
        assert_eq!(e.retry_after, requests.reset);
        let tokens = e.quotas.tokens.unwrap();
        assert_eq!((tokens.limit, tokens.remaining), (100, 70));
    }

    #[test]
    fn cut_off_from_the_mesh_a_node_admits_only_its_share_of_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits::new(Ledger::open(dir.path()).unwrap());
        let tier: super::super::Tier =
            toml::from_str("name = 'metered'\ntoken_budget = 1000\n").unwrap();
        let caller = Caller {
            tenant: "t".into(),
            tier: std::sync::Arc::new(tier),
            authorization: None,
        };
        let month = month_bounds(now_ms()).0;
        drop(limits.admit(&caller).unwrap());
        limits.add_tokens("t", "metered", 100);
        // The two other nodes used 500: 400 are left, 100 for each of four nodes.
        limits.set_peer_usage([("t".to_string(), (month, 500))].into());
        limits.lost_sight(4);
        drop(limits.admit(&caller).unwrap());
        limits.add_tokens("t", "metered", 60);
        drop(limits.admit(&caller).unwrap());
        limits.add_tokens("t", "metered", 40);
        let e = limits.admit(&caller).err().expect("its share is spent");
        assert!(
            e.message.contains("1/4") && e.message.contains("100 tokens"),
            "{}",
            e.message
        );
        assert_eq!(e.retry_after, 5);
        // Sight back: the whole budget counts again (1000 - 200 - 500 left).
        limits.regained_sight();
        drop(limits.admit(&caller).unwrap());
        limits.add_tokens("t", "metered", 300);
        let e = limits.admit(&caller).err().expect("the budget is spent");
        assert!(e.message.contains("is spent"), "{}", e.message);
    }
}
