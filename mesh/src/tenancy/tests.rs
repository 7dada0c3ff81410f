//! Tenancy: keys, tiers, tenants, and what the mesh shares of them.

use super::*;

fn config() -> TenancyConfig {
    TenancyConfig {
        anonymous_tier: None,
        tiers: vec![Tier {
            name: "basic".into(),
            price: 100.0,
            weight: 1,
            max_concurrency: 0,
            models: vec!["small-*".into()],
            requests_per_minute: 0,
            tokens_per_minute: 0,
            token_budget: 0,
            residency_bonus: Default::default(),
            pools: Vec::new(),
            labels: BTreeMap::new(),
        }],
        tenants: vec![TenantConfig {
            id: "city-a".into(),
            tier: "basic".into(),
        }],
    }
}

#[test]
fn config_ids_follow_the_id_rule() {
    let bad: TenancyConfig =
        toml::from_str("[[tiers]]\nname = 'gold'\n[[tenants]]\nid = '../etc'\ntier = 'gold'\n")
            .unwrap();
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.starts_with("tenancy.tenants[0].id:"), "{e}");
    let bad: TenancyConfig = toml::from_str("[[tiers]]\nname = 'a b'\n").unwrap();
    assert!(bad.validate().is_err());
}

#[test]
fn glob_patterns() {
    assert!(glob("*", "anything"));
    assert!(glob("small-*", "small-llm"));
    assert!(!glob("small-*", "large-llm"));
    assert!(glob("*-v2", "minilm-v2"));
    assert!(glob("a*b*c", "aXXbYYc"));
    assert!(!glob("exact", "exactly"));
}

#[test]
fn keys_authenticate_and_are_stored_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tenancy::new(&config(), Some(dir.path())).unwrap();
    assert_eq!(t.authenticate(None).unwrap_err(), AuthError::Missing);
    assert_eq!(
        t.authenticate(Some("Bearer nope")).unwrap_err(),
        AuthError::Invalid
    );
    let key = t.create_key("city-a").unwrap();
    let caller = t.authenticate(Some(&format!("Bearer {key}"))).unwrap();
    assert_eq!(caller.tenant, "city-a");
    assert!(Tenancy::check_model(&caller, "small-llm").is_ok());
    assert!(matches!(
        Tenancy::check_model(&caller, "large-llm"),
        Err(AuthError::Forbidden { .. })
    ));
    let stored = std::fs::read_to_string(dir.path().join("tenancy.json")).unwrap();
    assert!(!stored.contains(&key) && stored.contains(&hash_key(&key)));
    // Keys survive a restart; a revoked key stops working.
    let again = Tenancy::new(&config(), Some(dir.path())).unwrap();
    assert!(again.authenticate(Some(&format!("Bearer {key}"))).is_ok());
    again.revoke_key(&key).unwrap();
    assert_eq!(
        again
            .authenticate(Some(&format!("Bearer {key}")))
            .unwrap_err(),
        AuthError::Invalid
    );
}

#[test]
fn without_tiers_everyone_is_anonymous_and_with_tiers_only_if_configured() {
    let open = Tenancy::new(&TenancyConfig::default(), None).unwrap();
    assert_eq!(open.authenticate(None).unwrap().tier.name, "open");
    let mut c = config();
    c.anonymous_tier = Some("basic".into());
    assert_eq!(
        Tenancy::new(&c, None)
            .unwrap()
            .authenticate(None)
            .unwrap()
            .tenant,
        "anonymous"
    );
}

#[test]
fn the_mesh_gets_configured_tiers_and_adopted_ones_can_leave() {
    let on = Tenancy::new(&config(), None).unwrap();
    let shared: Vec<_> = on.shared();
    assert!(matches!(&shared[0], Shared::Tier(t) if t.name == "basic"));
    let mut gold = config().tiers[0].clone();
    gold.name = "gold".into();
    on.apply(Shared::Tier(gold.clone()));
    assert!(on.tiers().iter().any(|t| t.name == "gold"), "adopted");
    assert!(
        !on.shared()
            .iter()
            .any(|c| matches!(c, Shared::Tier(t) if t.name == "gold")),
        "an adopted tier is not shared again"
    );
    on.apply(Shared::TierGone("basic".into()));
    on.apply(Shared::TierGone("gold".into()));
    let names: Vec<_> = on.tiers().iter().map(|t| t.name.clone()).collect();
    assert_eq!(
        names,
        ["basic"],
        "a configured tier stays; an adopted one leaves"
    );
    let mut bad = gold;
    bad.name = "has space".into();
    on.apply(Shared::Tier(bad));
    assert_eq!(on.tiers().len(), 1, "an invalid tier is not adopted");
}

#[test]
fn a_node_without_tiers_does_not_share_its_open_tier() {
    let open = Tenancy::new(&TenancyConfig::default(), None).unwrap();
    assert!(!open.shared().iter().any(|c| matches!(c, Shared::Tier(_))));
}

#[test]
fn a_tier_runs_only_on_nodes_of_its_pools_with_all_its_labels() {
    let mut t = config().tiers.remove(0);
    let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(!t.confined());
    assert!(t.runs_on("spot", &labels(&[])));
    t.pools = vec!["onprem".into(), "rented".into()];
    t.labels = labels(&[("region", "dk")]);
    assert!(t.confined());
    assert!(t.runs_on("onprem", &labels(&[("region", "dk"), ("kind", "gpu")])));
    assert!(t.runs_on("rented", &labels(&[("region", "dk")])));
    assert!(
        !t.runs_on("spot", &labels(&[("region", "dk")])),
        "not one of its pools"
    );
    assert!(
        !t.runs_on("onprem", &labels(&[("region", "de")])),
        "a label differs"
    );
    assert!(!t.runs_on("onprem", &labels(&[])), "a label is missing");
    assert_eq!(
        t.confinement(),
        "pools [onprem, rented], labels {region=dk}"
    );
    // Bad names are refused at start, naming the field.
    let mut c = config();
    c.tiers[0].pools = vec!["on prem".into()];
    let e = c.validate().unwrap_err().to_string();
    assert!(e.starts_with("tenancy.tiers[0].pools:"), "{e}");
}
