//! The client's deadline at the edge: HTTP's `x-request-timeout` (seconds) or gRPC's own
//! `grpc-timeout`, read once by the authentication layer and handed to the serve path.

use std::time::{Duration, Instant};

use crate::serve::ServeError;

/// The HTTP header a client gives its timeout in: seconds, a decimal (`2.5`).
pub const HTTP: &str = "x-request-timeout";
/// gRPC's deadline header: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub const GRPC: &str = "grpc-timeout";
/// gRPC's transport ends a call at its deadline by itself (as CANCELLED); the serve path's
/// deadline comes this much sooner, so the client gets DEADLINE_EXCEEDED from the agent and
/// the agent counts a timeout.
const GRPC_MARGIN: Duration = Duration::from_millis(10);

/// When the client stops waiting, if it said; rides in a request's extensions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadline(pub Option<Instant>);

impl Deadline {
    /// From an `x-request-timeout` value.
    pub fn http(value: Option<&str>) -> Result<Deadline, ServeError> {
        let Some(v) = value else {
            return Ok(Deadline(None));
        };
        let seconds = v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| invalid(HTTP, v, "a number of seconds above 0, such as 2.5"))?;
        Ok(Deadline::after(Duration::from_secs_f64(seconds.min(1e9))))
    }

    /// From a `grpc-timeout` value.
    pub fn grpc(value: Option<&str>) -> Result<Deadline, ServeError> {
        let Some(v) = value else {
            return Ok(Deadline(None));
        };
        let unit_at = v.len().saturating_sub(1);
        let (digits, unit) = v.split_at(unit_at);
        let n = (1..=8)
            .contains(&digits.len())
            .then(|| digits.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| invalid(GRPC, v, GRPC_FORM))?;
        let timeout = match unit {
            "H" => Duration::from_secs(n * 3600),
            "M" => Duration::from_secs(n * 60),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return Err(invalid(GRPC, v, GRPC_FORM)),
        };
        Ok(Deadline::after(timeout.saturating_sub(GRPC_MARGIN)))
    }

    /// `timeout` from now (none where it lies beyond what the clock can say).
    fn after(timeout: Duration) -> Deadline {
        Deadline(Instant::now().checked_add(timeout))
    }
}

const GRPC_FORM: &str = "1 to 8 digits then a unit: H, M, S, m, u or n";

/// A bad header value, named (`x-request-timeout: "soon" is not ...`).
fn invalid(header: &str, value: &str, expected: &str) -> ServeError {
    let shown: String = value.chars().take(32).collect();
    ServeError::bad_request(header, format!("{shown:?} is not {expected}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(d: Deadline) -> Duration {
        d.0.expect("a deadline")
            .saturating_duration_since(Instant::now())
    }

    #[test]
    fn http_timeouts_are_seconds() {
        assert!(Deadline::http(None).unwrap().0.is_none());
        let d = left(Deadline::http(Some("2.5")).unwrap());
        assert!(d > Duration::from_millis(2400) && d <= Duration::from_millis(2500));
        for bad in ["", "0", "-1", "soon", "NaN", "inf"] {
            let e = Deadline::http(Some(bad)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(HTTP), "{bad:?}");
            assert!(e.message.contains(HTTP));
        }
        // A timeout beyond any sensible wait is still a deadline, far away.
        assert!(left(Deadline::http(Some("1e300")).unwrap()) > Duration::from_secs(3600));
    }

    #[test]
    fn grpc_timeouts_follow_the_grpc_format() {
        assert!(Deadline::grpc(None).unwrap().0.is_none());
        let cases = [
            ("1H", 3_600_000_000),
            ("2M", 120_000_000),
            ("3S", 3_000_000),
            ("250m", 250_000),
            ("99999999u", 99_999_999),
            ("5000000n", 5_000),
        ];
        for (v, micros) in cases {
            let d = left(Deadline::grpc(Some(v)).unwrap());
            let want = Duration::from_micros(micros);
            assert!(
                d <= want && d + Duration::from_millis(50) > want,
                "{v}: {d:?}"
            );
        }
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10"] {
            let e = Deadline::grpc(Some(bad)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(GRPC), "{bad:?}");
        }
    }
}
