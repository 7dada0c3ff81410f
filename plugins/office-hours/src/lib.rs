//! office-hours: a residency policy. During office hours the models staff use all day (for
//! example the premium tiers' models) stay resident: when a device needs room, every other
//! idle copy leaves first. Outside office hours the built-in policy decides alone.
//!
//! Config (JSON):
//! ```json
//! { "keep": ["smollm2-*", "all-minilm-l6-v2"], "from_hour": 7, "to_hour": 18,
//!   "utc_offset_minutes": 60, "weekdays_only": true }
//! ```
//! `keep` patterns may end in `*`. Hours are local (`utc_offset_minutes` east of UTC);
//! `from_hour` 0 and `to_hour` 24 keep them all day.

use std::cell::RefCell;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit", world: "residency" });

use flatmesh::policy::{
    clock::now_ms,
    log::{log, Level},
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    keep: Vec<String>,
    #[serde(default = "default_from")]
    from_hour: u32,
    #[serde(default = "default_to")]
    to_hour: u32,
    #[serde(default)]
    utc_offset_minutes: i32,
    #[serde(default)]
    weekdays_only: bool,
}

fn default_from() -> u32 {
    7
}
fn default_to() -> u32 {
    18
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

struct OfficeHours;

impl Guest for OfficeHours {
    fn init(config: String) -> Result<(), String> {
        let config: Config =
            serde_json::from_str(&config).map_err(|e| format!("office-hours config: {e}"))?;
        if config.from_hour > 24 || config.to_hour > 24 || config.from_hour > config.to_hour {
            return Err(
                "office-hours config: hours must satisfy 0 <= from_hour <= to_hour <= 24".into(),
            );
        }
        if config.utc_offset_minutes.abs() > 14 * 60 {
            return Err("office-hours config: utc_offset_minutes is beyond ±14 h".into());
        }
        log(
            Level::Info,
            &format!(
                "keeping {:?} resident from {}:00 to {}:00",
                config.keep, config.from_hour, config.to_hour
            ),
        );
        CONFIG.with(|c| *c.borrow_mut() = Some(config));
        Ok(())
    }

    fn order(copies: Vec<Resident>) -> Result<Vec<u32>, String> {
        CONFIG.with(|c| {
            let c = c.borrow();
            let config = c.as_ref().ok_or("office-hours: not initialised")?;
            if !in_office_hours(config, now_ms()) {
                return Ok(Vec::new()); // The built-in policy decides.
            }
            // Copies of other models leave first (least demand, then longest idle); the kept
            // models' copies last, in the same order among themselves.
            let mut order: Vec<u32> = (0..copies.len() as u32).collect();
            order.sort_by(|&a, &b| {
                let (a, b) = (&copies[a as usize], &copies[b as usize]);
                let kept = |r: &Resident| config.keep.iter().any(|p| matches(p, &r.model));
                kept(a)
                    .cmp(&kept(b))
                    .then(a.demand.total_cmp(&b.demand))
                    .then(b.idle_ms.cmp(&a.idle_ms))
            });
            Ok(order)
        })
    }
}

fn matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// Whether `ms` (Unix milliseconds) falls in office hours of the configured zone.
fn in_office_hours(config: &Config, ms: u64) -> bool {
    let local_minutes = (ms / 60_000) as i64 + i64::from(config.utc_offset_minutes);
    let day = local_minutes.div_euclid(24 * 60);
    let hour = (local_minutes.rem_euclid(24 * 60) / 60) as u32;
    // 1970-01-01 was a Thursday: day 0 → Thursday (3 with Monday = 0).
    let weekday = (day + 3).rem_euclid(7);
    if config.weekdays_only && weekday >= 5 {
        return false;
    }
    (config.from_hour..config.to_hour).contains(&hour)
}

export!(OfficeHours);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(from: u32, to: u32, offset: i32, weekdays_only: bool) -> Config {
        Config {
            keep: vec![],
            from_hour: from,
            to_hour: to,
            utc_offset_minutes: offset,
            weekdays_only,
        }
    }

    #[test]
    fn office_hours_follow_the_zone_and_the_week() {
        // 2026-11-23 is a Monday; 08:30 UTC.
        let monday_0830 = 1_795_422_600_000;
        assert!(in_office_hours(&config(8, 18, 0, true), monday_0830));
        assert!(!in_office_hours(&config(9, 18, 0, true), monday_0830));
        assert!(in_office_hours(&config(9, 18, 60, true), monday_0830));
        let saturday = monday_0830 - 2 * 86_400_000;
        assert!(!in_office_hours(&config(8, 18, 0, true), saturday));
        assert!(in_office_hours(&config(0, 24, 0, false), saturday));
    }

    #[test]
    fn patterns_match_prefixes_or_whole_names() {
        assert!(matches("smollm2-*", "smollm2-135m"));
        assert!(matches("m0", "m0"));
        assert!(!matches("m0", "m01"));
    }
}
