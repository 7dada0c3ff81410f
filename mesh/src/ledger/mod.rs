//! The ledger: a durable, append-only record of usage (one JSON line per finished request,
//! fsync'd before the response completes), and the invoices computed from it.

use parking_lot::Mutex;
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::tenancy::Tier;

/// One finished request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The agent's own unique id of the request (also the OpenAI response's id).
    pub id: String,
    /// The id the client gave its request (v2 `id`), bounded; never relied on as unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub tenant: String,
    pub tier: String,
    pub model: String,
    pub endpoint: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Seconds the request held its model copy.
    pub device_seconds: f64,
    pub cache_hit: bool,
    /// Unix milliseconds.
    pub started_ms: u64,
    pub finished_ms: u64,
}

pub use crate::util::now_ms;

/// Usage of one tenant over a period.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    pub tenant: String,
    pub tier: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub device_seconds: f64,
}

/// One line of an invoice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvoiceLine {
    pub tenant: String,
    pub tier: String,
    /// What the amount is for.
    pub description: String,
    pub amount: f64,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The cloneable handle to the ledger file.
#[derive(Clone)]
pub struct Ledger {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl Ledger {
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join("ledger.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open ledger {}: {e}", path.display()))?;
        Ok(Ledger {
            path,
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Append a record and make it durable (blocking: call from a blocking thread).
    pub fn append_blocking(&self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let mut f = self.file.lock();
        f.write_all(&line)?;
        f.sync_data()
    }

    /// Append from async code; the response must not complete before this returns.
    pub async fn append(&self, record: Record) -> std::io::Result<()> {
        let ledger = self.clone();
        tokio::task::spawn_blocking(move || ledger.append_blocking(&record))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Records that finished in `[from_ms, to_ms)`, optionally of one tenant. A torn last line
    /// (a crash mid-write, before the response completed) is skipped.
    pub fn records(
        &self,
        tenant: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> std::io::Result<Vec<Record>> {
        let reader = BufReader::new(File::open(&self.path)?);
        let mut out = Vec::new();
        for line in reader.lines() {
            let line = line?;
            let Ok(r) = serde_json::from_str::<Record>(&line) else {
                continue;
            };
            if r.finished_ms >= from_ms
                && r.finished_ms < to_ms
                && tenant.is_none_or(|t| t == r.tenant)
            {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// Usage per tenant of the given records.
pub fn usage(records: &[Record]) -> Vec<Usage> {
    let mut by: BTreeMap<&str, Usage> = BTreeMap::new();
    for r in records {
        let u = by.entry(&r.tenant).or_insert_with(|| Usage {
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

/// The built-in flat-rate invoice: every tenant pays its tier's flat fee for the period,
/// whatever it used; usage is shown beside it.
pub fn flat_rate_invoice(
    tenants: &[(String, String)],
    tiers: &[Arc<Tier>],
    records: &[Record],
) -> Vec<InvoiceLine> {
    let used: BTreeMap<String, Usage> = usage(records)
        .into_iter()
        .map(|u| (u.tenant.clone(), u))
        .collect();
    tenants
        .iter()
        .map(|(tenant, tier)| {
            let u = used.get(tenant).cloned().unwrap_or_default();
            InvoiceLine {
                tenant: tenant.clone(),
                tier: tier.clone(),
                description: format!("flat fee, tier {tier}"),
                amount: tiers
                    .iter()
                    .find(|t| &t.name == tier)
                    .map_or(0.0, |t| t.price),
                requests: u.requests,
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
            }
        })
        .collect()
}

/// An invoice as CSV.
pub fn invoice_csv(lines: &[InvoiceLine]) -> String {
    let mut out =
        String::from("tenant,tier,description,amount,requests,input_tokens,output_tokens\n");
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for l in lines {
        out += &format!(
            "{},{},{},{:.2},{},{},{}\n",
            l.tenant,
            l.tier,
            quote(&l.description),
            l.amount,
            l.requests,
            l.input_tokens,
            l.output_tokens
        );
    }
    out
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn records_survive_reopen_and_a_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        l.append_blocking(&rec("a", "city-a", 5, 100)).unwrap();
        l.append_blocking(&rec("b", "city-b", 7, 200)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("ledger.jsonl"))
            .unwrap()
            .write_all(b"{\"id\":\"torn")
            .unwrap();
        let again = Ledger::open(dir.path()).unwrap();
        let all = again.records(None, 0, u64::MAX).unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(again.records(Some("city-a"), 0, u64::MAX).unwrap().len(), 1);
        assert_eq!(again.records(None, 150, 250).unwrap()[0].id, "b");
    }

    #[test]
    fn flat_rate_invoice_charges_the_tier_fee_whatever_the_usage() {
        let tiers = vec![Arc::new(Tier {
            name: "gold".into(),
            price: 1000.0,
            weight: 3,
            max_concurrency: 0,
            models: vec!["*".into()],
            requests_per_minute: 0,
            tokens_per_minute: 0,
            token_budget: 0,
            residency_bonus: Default::default(),
        })];
        let tenants = vec![
            ("city-a".to_string(), "gold".to_string()),
            ("city-b".to_string(), "gold".to_string()),
        ];
        let lines = flat_rate_invoice(
            &tenants,
            &tiers,
            &[rec("a", "city-a", 5, 1), rec("b", "city-a", 7, 2)],
        );
        assert_eq!(lines[0].amount, 1000.0);
        assert_eq!(lines[0].output_tokens, 12);
        assert_eq!(lines[1].amount, 1000.0);
        assert_eq!(lines[1].requests, 0);
        assert!(invoice_csv(&lines).starts_with("tenant,tier,description,amount"));
    }
}
