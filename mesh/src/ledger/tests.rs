//! Unit tests of the ledger: durability across reopening, group commit, the JSON-lines
//! import, corrupt and foreign files, and the sums invoices are made from.

use std::io::Write;

use super::*;

fn rec(id: &str, tenant: &str, out: u64, at: u64) -> Record {
    Record {
        id: id.into(),
        client_id: None,
        tenant: tenant.into(),
        tier: "gold".into(),
        model: "m".into(),
        endpoint: "completions".into(),
        input_tokens: 10,
        output_tokens: out,
        device_seconds: 0.5,
        cache_hit: false,
        started_ms: at - 1,
        finished_ms: at,
    }
}

fn gold() -> Vec<Arc<Tier>> {
    vec![Arc::new(
        toml::from_str("name = 'gold'\nprice = 1000.0\n").unwrap(),
    )]
}

/// A JSON-lines ledger as the agent wrote it before, with a torn last line; and the usage the
/// old code (summing every record in Rust) made of it.
fn jsonl(dir: &Path, n: u64) -> Vec<Usage> {
    let h = sqlite::HOUR_MS as u64;
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let mut r = rec(
                &format!("r{i}"),
                ["city-a", "city-b", "city-c"][(i % 3) as usize],
                i % 17,
                1 + i * h / 7,
            );
            r.tier = if i % 3 == 2 {
                "basic".into()
            } else {
                "gold".into()
            };
            r.client_id = (i % 5 == 0).then(|| format!("client-{i}"));
            r
        })
        .collect();
    let mut f = std::fs::File::create(dir.join(JSONL)).unwrap();
    for r in &records {
        writeln!(f, "{}", serde_json::to_string(r).unwrap()).unwrap();
    }
    f.write_all(b"{\"id\":\"torn").unwrap();
    let mut by: BTreeMap<String, Usage> = BTreeMap::new();
    for r in &records {
        let u = by.entry(r.tenant.clone()).or_insert_with(|| Usage {
            tenant: r.tenant.clone(),
            tier: r.tier.clone(),
            ..Default::default()
        });
        u.requests += 1;
        u.input_tokens += r.input_tokens;
        u.output_tokens += r.output_tokens;
        u.device_seconds += r.device_seconds;
    }
    by.into_values().collect()
}

#[test]
fn records_survive_reopening_in_the_order_written() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    l.append_blocking(rec("b", "city-b", 7, 200)).unwrap();
    l.append_blocking(rec("a", "city-a", 5, 100)).unwrap();
    drop(l);
    let again = Ledger::open(dir.path()).unwrap();
    let all = again.records(None, 0, u64::MAX).unwrap();
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["b", "a"]
    );
    assert_eq!(all[0], rec("b", "city-b", 7, 200));
    assert_eq!(again.records(Some("city-a"), 0, u64::MAX).unwrap().len(), 1);
    assert_eq!(again.records(None, 150, 250).unwrap()[0].id, "b");
    let e = again
        .append_blocking(rec("a", "city-a", 1, 300))
        .unwrap_err();
    assert!(e.to_string().contains("\"a\""), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_finishing_together_share_a_commit_and_all_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let writes = (0..256u64).map(|i| {
        let l = l.clone();
        tokio::spawn(async move { l.append(rec(&format!("r{i}"), "city-a", i, 1000 + i)).await })
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap().unwrap();
    }
    let stats = l.stats();
    assert_eq!(stats.records, 256);
    assert!(
        stats.commits < 256,
        "{stats:?}: some records shared a commit"
    );
    drop(l);
    // Every acknowledged record is in the file, read by another connection from scratch.
    let again = Ledger::open(dir.path()).unwrap();
    let [u] = &again.usage(None, 0, u64::MAX).unwrap()[..] else {
        panic!("one tenant")
    };
    assert_eq!((u.requests, u.output_tokens), (256, (0..256).sum()));
}

#[test]
fn a_jsonl_ledger_is_imported_once_with_the_same_invoice_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let before = jsonl(dir.path(), 1000);
    let file = std::fs::read(dir.path().join(JSONL)).unwrap();
    let tenants: Vec<(String, String)> = before
        .iter()
        .map(|u| (u.tenant.clone(), u.tier.clone()))
        .collect();
    let l = Ledger::open(dir.path()).unwrap();
    assert_eq!(l.records(None, 0, u64::MAX).unwrap().len(), 1000);
    let after = l.usage(None, 0, u64::MAX).unwrap();
    assert_eq!(
        flat_rate_invoice(&tenants, &gold(), &after),
        flat_rate_invoice(&tenants, &gold(), &before)
    );
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(
            (&a.tenant, &a.tier, a.requests),
            (&b.tenant, &b.tier, b.requests)
        );
        assert!((a.device_seconds - b.device_seconds).abs() < 1e-6);
    }
    l.append_blocking(rec("new", "city-a", 1, 5)).unwrap();
    drop(l);
    assert_eq!(std::fs::read(dir.path().join(JSONL)).unwrap(), file);
    // Again, at the same size: nothing read. Forced again (a changed size): nothing doubled.
    let mut conn = sqlite::open(&dir.path().join(FILE)).unwrap();
    assert_eq!(import::jsonl_once(&mut conn, dir.path()).unwrap(), None);
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join(JSONL))
        .unwrap()
        .write_all(b"\n")
        .unwrap();
    let again = import::jsonl_once(&mut conn, dir.path()).unwrap().unwrap();
    assert_eq!((again.added, again.read, again.skipped), (0, 1000, 1));
    drop(conn);
    let l = Ledger::open(dir.path()).unwrap();
    assert_eq!(l.records(None, 0, u64::MAX).unwrap().len(), 1001);
}

#[test]
fn a_corrupt_or_foreign_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE);
    let garbage = b"not a database, just some bytes that happen to be here".repeat(100);
    std::fs::write(&path, &garbage).unwrap();
    let e = Ledger::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("is not an SQLite database"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);

    let mut damaged = b"SQLite format 3\0".to_vec();
    damaged.extend(std::iter::repeat_n(0xa5u8, 8192));
    std::fs::write(&path, &damaged).unwrap();
    let e = format!("{:#}", Ledger::open(dir.path()).err().unwrap());
    assert!(e.contains("cannot be read") && e.contains("corrupt"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), damaged);

    std::fs::remove_file(&path).unwrap();
    let other = Connection::open(&path).unwrap();
    other
        .execute_batch("CREATE TABLE photos (name TEXT)")
        .unwrap();
    drop(other);
    let e = Ledger::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("of something else"), "{e}");
}

#[test]
fn sums_over_hours_and_ragged_ends_equal_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let h = sqlite::HOUR_MS as u64;
    let records: Vec<Record> = (0..500u64)
        .map(|i| {
            let mut r = rec(
                &format!("r{i}"),
                ["a", "b"][(i % 2) as usize],
                i,
                10 * h + i * h / 50,
            );
            r.tier = ["gold", "basic"][(i % 4 / 2) as usize].into();
            r
        })
        .collect();
    assert_eq!(l.import(&records).unwrap(), 500);
    assert_eq!(l.import(&records).unwrap(), 0, "known ids are skipped");
    for (from, to) in [
        (0, u64::MAX),
        (10 * h + 7, 14 * h + 3),
        (11 * h, 12 * h),
        (5, 9),
    ] {
        let inside: Vec<&Record> = records
            .iter()
            .filter(|r| r.finished_ms >= from && r.finished_ms < to)
            .collect();
        let usage = l.usage(None, from, to).unwrap();
        let mut want: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for r in &inside {
            let w = want.entry(&r.tenant).or_default();
            *w = (w.0 + 1, w.1 + r.output_tokens);
        }
        let got: BTreeMap<&str, (u64, u64)> = usage
            .iter()
            .map(|u| (u.tenant.as_str(), (u.requests, u.output_tokens)))
            .collect();
        assert_eq!(got, want, "[{from}, {to})");
        let first_tier = |t: &str| {
            inside
                .iter()
                .find(|r| r.tenant == t)
                .map(|r| r.tier.clone())
        };
        for u in &usage {
            assert_eq!(
                Some(u.tier.clone()),
                first_tier(&u.tenant),
                "[{from}, {to})"
            );
        }
        let tokens = |f: &dyn Fn(&Record) -> bool| -> (u64, u64) {
            let rs: Vec<_> = inside.iter().filter(|r| f(r)).collect();
            (
                rs.len() as u64,
                rs.iter().map(|r| r.input_tokens + r.output_tokens).sum(),
            )
        };
        assert_eq!(
            l.tier_totals("gold", from, to).unwrap(),
            tokens(&|r| r.tier == "gold")
        );
        assert_eq!(
            l.tenant_tokens("b", from, to).unwrap(),
            tokens(&|r| r.tenant == "b").1
        );
        let only_b = l.usage(Some("b"), from, to).unwrap();
        assert!(only_b.iter().all(|u| u.tenant == "b"));
    }
}

#[test]
fn usage_of_nodes_merges_per_tenant() {
    let u = |t: &str, n| Usage {
        tenant: t.into(),
        tier: "gold".into(),
        requests: n,
        input_tokens: n,
        output_tokens: n,
        device_seconds: 1.0,
    };
    let merged = merge_usage(vec![u("b", 1)], vec![u("a", 2), u("b", 3)]);
    assert_eq!(
        merged,
        [
            u("a", 2),
            Usage {
                device_seconds: 2.0,
                ..u("b", 4)
            }
        ]
    );
}

#[test]
fn flat_rate_invoice_charges_the_tier_fee_whatever_the_usage() {
    let tenants = vec![
        ("city-a".to_string(), "gold".to_string()),
        ("city-b".to_string(), "gold".to_string()),
    ];
    let used = Usage {
        tenant: "city-a".into(),
        tier: "gold".into(),
        requests: 2,
        input_tokens: 20,
        output_tokens: 12,
        device_seconds: 1.0,
    };
    let lines = flat_rate_invoice(&tenants, &gold(), &[used]);
    assert_eq!(lines[0].amount, 1000.0);
    assert_eq!(lines[0].output_tokens, 12);
    assert_eq!(lines[1].amount, 1000.0);
    assert_eq!(lines[1].requests, 0);
    assert!(invoice_csv(&lines).starts_with("tenant,tier,description,amount"));
}
