//! Billing months: UTC calendar months as Unix-millisecond bounds and `YYYY-MM` labels.

use jiff::{
    civil::{Date, Time},
    tz::TimeZone,
    Timestamp,
};

/// The UTC month containing Unix milliseconds `ms`, as its first day.
fn month_of(ms: u64) -> Date {
    let at = i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::MAX);
    TimeZone::UTC.to_datetime(at).date().first_of_month()
}

/// Unix milliseconds at midnight UTC starting `day` (jiff's range ends in 9999: past it, the
/// end of its range).
fn start_ms(day: Date) -> u64 {
    let at = TimeZone::UTC
        .to_timestamp(day.to_datetime(Time::midnight()))
        .unwrap_or(Timestamp::MAX);
    u64::try_from(at.as_millisecond()).unwrap_or(0)
}

/// Unix milliseconds at the start of the UTC month containing `ms`, and of the next one.
pub fn month_bounds(ms: u64) -> (u64, u64) {
    let month = month_of(ms);
    let next = month
        .checked_add(jiff::Span::new().months(1))
        .map_or(u64::MAX, start_ms);
    (start_ms(month), next)
}

/// `YYYY-MM` of the UTC month containing `ms`.
pub fn month_label(ms: u64) -> String {
    let month = month_of(ms);
    format!("{:04}-{:02}", month.year(), month.month())
}
