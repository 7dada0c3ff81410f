//! The names of the four policy slots, as the config, the metrics and the admin API spell them.

use serde::Serialize;

/// A policy slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotName {
    Router,
    Cache,
    Pricing,
    Residency,
}

impl SlotName {
    /// Every slot, in the order they are configured, loaded and shown.
    pub const ALL: [SlotName; 4] = [
        SlotName::Router,
        SlotName::Cache,
        SlotName::Pricing,
        SlotName::Residency,
    ];

    /// `router`, `cache`, `pricing` or `residency`: the `[policy.*]` table, the `slot`
    /// label, the admin path.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::Router => "router",
            SlotName::Cache => "cache",
            SlotName::Pricing => "pricing",
            SlotName::Residency => "residency",
        }
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of the slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoSuchSlot(pub String);

impl std::fmt::Display for NoSuchSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = SlotName::ALL.iter().map(|s| s.as_str()).collect();
        write!(f, "no policy slot {:?} ({})", self.0, names.join(", "))
    }
}

impl std::str::FromStr for SlotName {
    type Err = NoSuchSlot;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SlotName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| NoSuchSlot(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_others_are_refused_with_the_list() {
        for n in SlotName::ALL {
            assert_eq!(n.as_str().parse::<SlotName>(), Ok(n));
            assert_eq!(serde_json::to_value(n).unwrap(), n.as_str());
        }
        assert_eq!(
            "Router".parse::<SlotName>().unwrap_err().to_string(),
            "no policy slot \"Router\" (router, cache, pricing, residency)"
        );
    }
}
