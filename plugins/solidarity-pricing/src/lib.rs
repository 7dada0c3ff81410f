//! solidarity-pricing: a flat fee per tier per period, a token budget per tier and period, and
//! settlement that shares the pool's cost across tenants by tier weight, not by use.
//!
//! Config (JSON):
//! ```json
//! { "budgets": { "basic": 200000 }, "tokens_per_minute": { "basic": 20000 },
//!   "pool_cost": 12000.0 }
//! ```
//! Each tenant's invoice has its tier's flat fee and, when `pool_cost` is set, its share of
//! what the pool cost beyond the fees (a credit when the fees cover more than the cost):
//! `(pool_cost - sum of fees) * weight / sum of weights` over all tenants.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit", world: "pricing" });

use flatmesh::policy::clock::now_ms;
use flatmesh::policy::counters;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    budgets: BTreeMap<String, u64>,
    #[serde(default)]
    tokens_per_minute: BTreeMap<String, u64>,
    #[serde(default)]
    pool_cost: Option<f64>,
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

fn with_config<R>(f: impl FnOnce(&Config) -> Result<R, String>) -> Result<R, String> {
    CONFIG.with(|c| {
        f(c.borrow()
            .as_ref()
            .ok_or("solidarity-pricing: not initialised")?)
    })
}

const MINUTE_MS: u64 = 60_000;

/// Seconds from `now_ms` to the start of the next calendar month (UTC).
fn seconds_to_next_month(now_ms: u64) -> u32 {
    let days = (now_ms / 86_400_000) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    };
    let into_day_ms = now_ms % 86_400_000;
    let left_ms = (days_in_month - day + 1) as u64 * 86_400_000 - into_day_ms;
    left_ms.div_ceil(1000) as u32
}

struct SolidarityPricing;

impl Guest for SolidarityPricing {
    fn init(config: String) -> Result<(), String> {
        let config: Config = if config.trim().is_empty() {
            Config::default()
        } else {
            serde_json::from_str(&config).map_err(|e| format!("solidarity-pricing config: {e}"))?
        };
        if let Some(cost) = config.pool_cost {
            if !cost.is_finite() || cost < 0.0 {
                return Err(format!(
                    "solidarity-pricing config: pool_cost {cost} is not a price"
                ));
            }
        }
        CONFIG.with(|c| *c.borrow_mut() = Some(config));
        Ok(())
    }

    fn admit(request: RequestInfo, used: PeriodUse) -> Result<Admission, String> {
        with_config(|config| {
            if let Some(&budget) = config.budgets.get(&request.tier) {
                if used.tokens >= budget {
                    return Ok(Admission::Deny(Denial {
                        status: 429,
                        message: format!(
                            "tier '{}' has spent its budget of {budget} tokens for {} ({} used)",
                            request.tier, used.period, used.tokens
                        ),
                        retry_after_s: Some(seconds_to_next_month(now_ms())),
                    }));
                }
            }
            if let Some(&limit) = config.tokens_per_minute.get(&request.tier) {
                let recent = counters::sum(&format!("tokens/{}", request.tier), MINUTE_MS);
                if recent >= limit {
                    return Ok(Admission::Wait(1000));
                }
            }
            Ok(Admission::Admit)
        })
    }

    fn charge(request: RequestInfo, usage: Usage) -> Result<(), String> {
        let tokens = u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens);
        counters::add(&format!("tokens/{}", request.tier), tokens, MINUTE_MS);
        Ok(())
    }

    fn settle(
        period: String,
        tiers: Vec<TierInfo>,
        tenants: Vec<TenantUse>,
    ) -> Result<Vec<InvoiceLine>, String> {
        with_config(|config| {
            let tier = |name: &str| {
                tiers
                    .iter()
                    .find(|t| t.name == name)
                    .ok_or_else(|| format!("tenant tier '{name}' is not a known tier"))
            };
            let mut lines = Vec::new();
            let mut fees = 0.0;
            let mut weights = 0u64;
            for t in &tenants {
                let info = tier(&t.tier)?;
                fees += info.price;
                weights += u64::from(info.weight);
                lines.push(InvoiceLine {
                    tenant: t.tenant.clone(),
                    tier: t.tier.clone(),
                    description: format!(
                        "flat fee, tier {} for {period} ({} requests, {} tokens)",
                        t.tier,
                        t.requests,
                        t.prompt_tokens + t.completion_tokens
                    ),
                    amount: info.price,
                });
            }
            if let (Some(cost), true) = (config.pool_cost, weights > 0) {
                let rest = cost - fees;
                for t in &tenants {
                    let weight = tier(&t.tier)?.weight;
                    lines.push(InvoiceLine {
                        tenant: t.tenant.clone(),
                        tier: t.tier.clone(),
                        description: format!(
                            "solidarity share of pool cost beyond fees (weight {weight} of {weights})"
                        ),
                        amount: rest * f64::from(weight) / weights as f64,
                    });
                }
            }
            Ok(lines)
        })
    }
}

export!(SolidarityPricing);

#[cfg(test)]
mod tests {
    use super::seconds_to_next_month;

    #[test]
    fn month_boundaries() {
        // 2026-11-30T23:59:59Z → one second to December.
        assert_eq!(seconds_to_next_month(1_796_083_199_000), 1);
        // 2024-02-01T00:00:00Z → all of a leap February.
        assert_eq!(seconds_to_next_month(1_706_745_600_000), 29 * 86_400);
    }
}
