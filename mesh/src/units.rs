//! Human-friendly config values: durations (`30s`, `5m`, `-1` = forever) and sizes (`512MiB`).

use std::{fmt, time::Duration};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// How long an idle copy stays loaded: a duration, or forever (`-1`). `0` unloads right
/// after the last request that used it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

/// The longest duration accepted anywhere (ten years): longer ones are refused rather than
/// overflowing timers.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Seconds as a duration, refused when not finite, negative or above [`MAX_DURATION`].
pub fn checked_secs(secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!(
            "{secs} is not a duration (a number of seconds >= 0)"
        ));
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "{secs} seconds is longer than the longest duration allowed ({} s, ten years)",
            MAX_DURATION.as_secs()
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{secs} seconds: {e}"))
}

/// A duration written as `250ms`, `30s`, `5m`, `2h`, or a number of seconds, at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 1h"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    checked_secs(secs).map_err(|e| format!("{s:?}: {e}"))
}

impl std::str::FromStr for KeepAlive {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "-1" | "-1s" | "forever" => Ok(KeepAlive::Forever),
            other => parse_duration(other).map(KeepAlive::For),
        }
    }
}

impl fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepAlive::Forever => f.write_str("-1"),
            KeepAlive::For(d) => write!(f, "{}s", d.as_secs_f64()),
        }
    }
}

/// Accepts a string or a number of seconds, as Ollama's `keep_alive` does; `-1` is forever.
/// Other negative numbers, NaN and durations over [`MAX_DURATION`] are refused.
impl<'de> Deserialize<'de> for KeepAlive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(-1.0) => Ok(KeepAlive::Forever),
            Raw::N(n) => checked_secs(n)
                .map(KeepAlive::For)
                .map_err(de::Error::custom),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

impl Serialize for KeepAlive {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A duration in config: `30s`, `5m`, or seconds as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Secs(pub Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match KeepAlive::deserialize(d)? {
            KeepAlive::For(x) => Ok(Secs(x)),
            KeepAlive::Forever => Err(de::Error::custom("must not be negative")),
        }
    }
}

impl Serialize for Secs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        KeepAlive::For(self.0).serialize(s)
    }
}

/// A size in bytes: a number, or `512MiB`, `2GiB`, `100MB`, `64KiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl std::str::FromStr for Bytes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 512MiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, MB, GB)"
                ))
            }
        };
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{s:?} is larger than any size this agent handles"));
        }
        Ok(Bytes(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Bytes(n)),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_forms() {
        assert_eq!(
            "5m".parse::<KeepAlive>().unwrap(),
            KeepAlive::For(Duration::from_secs(300))
        );
        assert_eq!(
            "0".parse::<KeepAlive>().unwrap(),
            KeepAlive::For(Duration::ZERO)
        );
        assert_eq!("-1".parse::<KeepAlive>().unwrap(), KeepAlive::Forever);
        let v: KeepAlive = serde_json::from_str("-1").unwrap();
        assert_eq!(v, KeepAlive::Forever);
        let v: KeepAlive = serde_json::from_str("2.5").unwrap();
        assert_eq!(v, KeepAlive::For(Duration::from_millis(2500)));
        assert!("5 parsecs".parse::<KeepAlive>().is_err());
    }

    #[test]
    fn out_of_range_durations_are_errors_not_panics() {
        for bad in ["1e20", "1e400", "-5", "-0.5", "NaN"] {
            assert!(
                serde_json::from_str::<KeepAlive>(bad).is_err(),
                "{bad} accepted"
            );
        }
        assert!(serde_json::from_str::<KeepAlive>("18446744073709551616").is_err());
        assert!(serde_json::from_str::<KeepAlive>("\"99999999999999999999h\"").is_err());
        assert!("315360001".parse::<KeepAlive>().is_err());
        assert!(toml::from_str::<std::collections::BTreeMap<String, Secs>>("x = nan").is_err());
        assert!(toml::from_str::<std::collections::BTreeMap<String, Secs>>("x = inf").is_err());
        let e = serde_json::from_str::<KeepAlive>("1e20")
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than the longest duration"), "{e}");
        assert_eq!(
            serde_json::from_str::<KeepAlive>("315360000").unwrap(),
            KeepAlive::For(MAX_DURATION)
        );
        assert_eq!(
            serde_json::from_str::<KeepAlive>("-1.0").unwrap(),
            KeepAlive::Forever
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("512MiB".parse::<Bytes>().unwrap(), Bytes(512 << 20));
        assert_eq!("1.5GiB".parse::<Bytes>().unwrap(), Bytes(3 << 29));
        assert_eq!("100MB".parse::<Bytes>().unwrap(), Bytes(100_000_000));
        assert!("12 apples".parse::<Bytes>().is_err());
        assert!("99999999999999999999TiB".parse::<Bytes>().is_err());
    }
}
