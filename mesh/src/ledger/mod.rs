//! The ledger: a durable record of usage (one SQLite row per finished request, committed
//! before the response completes), and the usage and invoices summed from it; in a mesh with
//! `[ledger] postgres`, the SQLite file is the outbox of the shared ledger (see README.md).

mod import;
pub mod month;
pub mod outbox;
pub mod postgres;
pub mod record;
mod shared;
pub mod shipper;
mod sqlite;
#[cfg(test)]
mod tests;
pub mod tls;
mod writer;

use parking_lot::Mutex;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, OnceLock},
};

use anyhow::Context;
use rusqlite::Connection;
use serde::Serialize;

use crate::tenancy::Tier;
pub use import::{Imported, JSONL};
pub use postgres::LedgerConfig;
pub use record::{Record, Usage};
pub use shared::{Shared, ShipState};
pub use sqlite::Who;

/// The ledger's database in the state directory.
pub const FILE: &str = "ledger.sqlite3";
/// Reader connections kept open between queries.
const IDLE_READERS: usize = 4;

pub use crate::util::now_ms;

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

/// Records and commits since the ledger opened (records per commit shows the grouping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub records: u64,
    pub commits: u64,
}

/// The cloneable handle to the ledger database.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: writer::Writer,
    readers: Mutex<Vec<Connection>>,
    /// This file's id among the shared ledger's origins.
    origin: i64,
    /// The shared ledger, once attached.
    shared: OnceLock<Arc<Shared>>,
}

impl Ledger {
    /// Open `state_dir/ledger.sqlite3` (created if absent), import `ledger.jsonl` if there is
    /// one not imported yet, and start the writer. A corrupt or foreign database is an error.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let path = state_dir.join(FILE);
        let mut conn = sqlite::open(&path)?;
        import::jsonl_once(&mut conn, state_dir)?;
        let origin = outbox::origin(&conn)
            .with_context(|| format!("cannot write the ledger {}", path.display()))?;
        let writer = writer::Writer::start(conn)?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                path,
                writer,
                readers: Mutex::new(Vec::new()),
                origin,
                shared: OnceLock::new(),
            }),
        })
    }

    /// Make this ledger the outbox of the shared one (`ledger.postgres`), as node `node`;
    /// nothing is connected yet. Returns the handle the shipper runs with.
    pub fn share(&self, config: &LedgerConfig, node: &str) -> anyhow::Result<Arc<Shared>> {
        let shared = Arc::new(Shared::new(config, node, self.inner.origin)?);
        self.inner
            .shared
            .set(shared.clone())
            .map_err(|_| anyhow::anyhow!("the ledger is shared already"))?;
        Ok(shared)
    }

    /// The shared ledger, when attached.
    pub fn shared(&self) -> Option<Arc<Shared>> {
        self.inner.shared.get().cloned()
    }

    /// This ledger file's id among the shared ledger's origins.
    pub fn origin(&self) -> i64 {
        self.inner.origin
    }

    /// Usage per tenant in `[from, to)` from the shared ledger plus this node's records not
    /// shipped yet, each record counted once; `None` when there is no shared ledger.
    pub async fn shared_usage(
        &self,
        tenant: Option<&str>,
        from: u64,
        to: u64,
    ) -> Option<anyhow::Result<Vec<Usage>>> {
        let shared = self.inner.shared.get()?.clone();
        let me = self.clone();
        let who = tenant.map(str::to_string);
        let got = async move {
            let (shipped, here) = tokio::task::spawn_blocking(move || {
                me.read(|c| outbox::unshipped_usage(c, who.as_deref(), from, to))
            })
            .await??;
            let there = shared.usage(tenant, (from, to), shipped).await?;
            Ok(merge_usage(there, here))
        };
        Some(got.await)
    }

    /// One tenant's usage in `[from, to)` by UTC day and model, from the shared ledger plus
    /// this node's records not shipped yet (each record once), summed per (day start in Unix
    /// ms, model); `None` when there is no shared ledger.
    pub async fn shared_by_day_and_model(
        &self,
        tenant: &str,
        from: u64,
        to: u64,
    ) -> Option<anyhow::Result<Vec<outbox::DayModel>>> {
        let shared = self.inner.shared.get()?.clone();
        let me = self.clone();
        let who = tenant.to_string();
        let got = async move {
            let (shipped, here) = tokio::task::spawn_blocking(move || {
                me.read(|c| outbox::unshipped_by_day_and_model(c, &who, from, to))
            })
            .await??;
            let there = shared.by_day_and_model(tenant, (from, to), shipped).await?;
            let mut by: BTreeMap<(u64, String), Usage> = BTreeMap::new();
            for (day, model, u) in there.into_iter().chain(here) {
                let sum = by.entry((day, model)).or_default();
                sum.tenant = u.tenant;
                sum.requests += u.requests;
                sum.input_tokens += u.input_tokens;
                sum.output_tokens += u.output_tokens;
                sum.device_seconds += u.device_seconds;
            }
            Ok(by.into_iter().map(|((d, m), u)| (d, m, u)).collect())
        };
        Some(got.await)
    }

    /// Tokens the other nodes used this month (starting `month_start`) as the shared ledger
    /// last said; `None` without one, or before it was first read.
    pub fn others_tokens(&self, tenant: &str, month_start: u64) -> Option<u64> {
        self.inner.shared.get()?.others_tokens(tenant, month_start)
    }

    /// What waits in the outbox.
    pub fn backlog(&self) -> anyhow::Result<outbox::Backlog> {
        self.read(outbox::backlog)
    }

    /// Every record up to rowid `seq` is in the shared ledger (durable when this returns).
    pub async fn mark_shipped(&self, seq: i64) -> anyhow::Result<()> {
        let wait = self.inner.writer.shipped(seq).map_err(anyhow::Error::msg)?;
        match wait.await {
            Ok(result) => result.map_err(anyhow::Error::msg),
            Err(_) => Err(anyhow::anyhow!("the ledger's writer has stopped")),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Write a record; returns once its transaction has committed (records arriving together
    /// share one). The response must not complete before this returns.
    pub async fn append(&self, record: Record) -> std::io::Result<()> {
        let wait = self
            .inner
            .writer
            .append(record)
            .map_err(std::io::Error::other)?;
        match wait.await {
            Ok(result) => result.map_err(std::io::Error::other),
            Err(_) => Err(std::io::Error::other("the ledger's writer has stopped")),
        }
    }

    /// Write a record from a thread outside the async runtime, as `append`.
    pub fn append_blocking(&self, record: Record) -> std::io::Result<()> {
        let wait = self
            .inner
            .writer
            .append(record)
            .map_err(std::io::Error::other)?;
        match wait.blocking_recv() {
            Ok(result) => result.map_err(std::io::Error::other),
            Err(_) => Err(std::io::Error::other("the ledger's writer has stopped")),
        }
    }

    /// Add records in one transaction, skipping those whose id is known (blocking); returns
    /// how many were new.
    pub fn import(&self, records: &[Record]) -> anyhow::Result<u64> {
        self.inner
            .writer
            .import(records.to_vec())
            .map_err(anyhow::Error::msg)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.writer.counters;
        Stats {
            records: c.records.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
        }
    }

    /// Run a query on a reader connection (blocking: it reads the disk).
    fn read<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        let idle = self.inner.readers.lock().pop();
        let mut conn = match idle {
            Some(c) => c,
            None => sqlite::open_reader(&self.inner.path)
                .with_context(|| format!("cannot open the ledger {}", self.inner.path.display()))?,
        };
        let out = f(&mut conn)
            .with_context(|| format!("cannot read the ledger {}", self.inner.path.display()))?;
        let mut idle = self.inner.readers.lock();
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        Ok(out)
    }

    /// Records that finished in `[from_ms, to_ms)`, optionally of one tenant, in the order
    /// they were written.
    pub fn records(
        &self,
        tenant: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> anyhow::Result<Vec<Record>> {
        self.read(|c| sqlite::records(c, tenant, from_ms, to_ms))
    }

    /// Usage per tenant in `[from_ms, to_ms)`, sorted by tenant, summed by SQLite (whole
    /// hours from the hourly rollup, the ragged ends from the records).
    pub fn usage(
        &self,
        tenant: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> anyhow::Result<Vec<Usage>> {
        let who = tenant.map_or(Who::All, Who::Tenant);
        self.read(|c| sqlite::usage(c, who, from_ms, to_ms))
    }

    /// Requests and tokens (input and output) of a tier in `[from_ms, to_ms)`.
    pub fn tier_totals(&self, tier: &str, from_ms: u64, to_ms: u64) -> anyhow::Result<(u64, u64)> {
        self.read(|c| sqlite::totals(c, Who::Tier(tier), from_ms, to_ms))
    }

    /// Tokens (input and output) of a tenant in `[from_ms, to_ms)`.
    pub fn tenant_tokens(&self, tenant: &str, from_ms: u64, to_ms: u64) -> anyhow::Result<u64> {
        self.read(|c| sqlite::totals(c, Who::Tenant(tenant), from_ms, to_ms))
            .map(|(_, tokens)| tokens)
    }
}

/// Add `more` (another node's usage) into `into`, per tenant; a tenant's tier stays the one
/// seen first. The result is sorted by tenant.
pub fn merge_usage(into: Vec<Usage>, more: Vec<Usage>) -> Vec<Usage> {
    let mut by: BTreeMap<String, Usage> = into.into_iter().map(|u| (u.tenant.clone(), u)).collect();
    for m in more {
        match by.get_mut(&m.tenant) {
            Some(u) => {
                u.requests += m.requests;
                u.input_tokens += m.input_tokens;
                u.output_tokens += m.output_tokens;
                u.device_seconds += m.device_seconds;
            }
            None => {
                by.insert(m.tenant.clone(), m);
            }
        }
    }
    by.into_values().collect()
}

/// The built-in flat-rate invoice: every tenant pays its tier's flat fee for the period,
/// whatever it used; usage is shown beside it.
pub fn flat_rate_invoice(
    tenants: &[(String, String)],
    tiers: &[Arc<Tier>],
    usage: &[Usage],
) -> Vec<InvoiceLine> {
    let used: BTreeMap<&str, &Usage> = usage.iter().map(|u| (u.tenant.as_str(), u)).collect();
    let zero = Usage::default();
    tenants
        .iter()
        .map(|(tenant, tier)| {
            let u = used.get(tenant.as_str()).copied().unwrap_or(&zero);
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
