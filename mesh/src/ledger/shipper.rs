//! The shipper: a background task that moves this node's records from its SQLite outbox to
//! the shared ledger in PostgreSQL, in batches, idempotently, and marks them shipped;
//! while PostgreSQL is away it retries with a doubling wait and the outbox grows.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio_postgres::Client;

use super::{outbox, postgres, postgres::LedgerConfig, record::Usage, Ledger};
use crate::{metrics::Metrics, util::now_ms};

/// How long a reader's connection attempt may take.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reader's query may take (a month's sums over many records).
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the other nodes' use this month is read for the budgets, at most.
const BUDGET_EVERY: Duration = Duration::from_secs(2);
/// The last shipment after the stop signal may take this long.
const LAST_SHIPMENT: Duration = Duration::from_secs(3);

/// The shared ledger as one node sees it: where it is, who this node is in it, a
/// connection for queries, and what the other nodes used this month.
pub struct Shared {
    config: tokio_postgres::Config,
    settings: LedgerConfig,
    /// This node's name (a label in the shared ledger only).
    node: String,
    /// This node's ledger file's origin id.
    origin: i64,
    reader: tokio::sync::Mutex<Option<Client>>,
    /// (start of month, tokens per tenant of the other origins).
    others: Mutex<Option<(u64, HashMap<String, u64>)>>,
}

impl Shared {
    pub fn new(settings: &LedgerConfig, node: &str, origin: i64) -> anyhow::Result<Shared> {
        let url = settings
            .postgres
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("ledger.postgres is not set"))?;
        Ok(Shared {
            config: postgres::pg_config(url)?,
            settings: settings.clone(),
            node: node.to_string(),
            origin,
            reader: tokio::sync::Mutex::new(None),
            others: Mutex::new(None),
        })
    }

    /// Usage per tenant from the shared ledger, without this origin's records above
    /// `shipped`; one connection kept for queries, opened again after a failure.
    pub async fn usage(
        &self,
        tenant: Option<&str>,
        period: (u64, u64),
        shipped: i64,
    ) -> anyhow::Result<Vec<Usage>> {
        let mut reader = self.reader.lock().await;
        let client = take_or_connect(&mut reader, &self.config).await?;
        let me = (self.origin, shipped);
        let got = bounded(postgres::usage(&client, tenant, period, me)).await;
        if got.is_ok() {
            *reader = Some(client);
        }
        got
    }

    /// One tenant's usage by UTC day and model from the shared ledger, without this
    /// origin's records above `shipped`.
    pub async fn by_day_and_model(
        &self,
        tenant: &str,
        period: (u64, u64),
        shipped: i64,
    ) -> anyhow::Result<Vec<outbox::DayModel>> {
        let mut reader = self.reader.lock().await;
        let client = take_or_connect(&mut reader, &self.config).await?;
        let me = (self.origin, shipped);
        let got = bounded(postgres::by_day_and_model(&client, tenant, period, me)).await;
        if got.is_ok() {
            *reader = Some(client);
        }
        got
    }

    /// What the other nodes used this month, as last read (`None`: not read yet or another
    /// month).
    pub fn others_tokens(&self, tenant: &str, month_start: u64) -> Option<u64> {
        match &*self.others.lock() {
            Some((start, by)) if *start == month_start => {
                Some(by.get(tenant).copied().unwrap_or(0))
            }
            _ => None,
        }
    }
}

/// The readers' connection if it is open, else a new one.
async fn take_or_connect(
    reader: &mut Option<Client>,
    config: &tokio_postgres::Config,
) -> anyhow::Result<Client> {
    match reader.take() {
        Some(c) if !c.is_closed() => Ok(c),
        _ => postgres::connect(config, READ_TIMEOUT).await,
    }
}

/// A reader's query, bounded by `QUERY_TIMEOUT`.
async fn bounded<T>(query: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(QUERY_TIMEOUT, query)
        .await
        .map_err(|_| anyhow::anyhow!("the shared ledger did not answer in {QUERY_TIMEOUT:?}"))?
}

/// Ship until `stop`, then make one last, short try.
pub async fn run(
    ledger: Ledger,
    shared: Arc<Shared>,
    metrics: Metrics,
    stop: impl Future<Output = ()> + Send,
) {
    tokio::pin!(stop);
    let interval = shared.settings.ship_interval.0;
    let mut ship = Shipper {
        ledger,
        shared,
        metrics,
        client: None,
        budgets_read: None,
    };
    let mut wait = interval;
    loop {
        let result = tokio::select! {
            _ = &mut stop => break,
            r = ship.round() => r,
        };
        match result {
            Ok(()) => wait = interval,
            Err(e) => {
                ship.client = None;
                ship.metrics.ledger_ship_errors.inc();
                tracing::warn!(error = format!("{e:#}"), retry_in = ?wait,
                    "Could not ship to the shared ledger; records stay in the outbox");
                wait = (wait * 2).min(ship.shared.settings.max_backoff.0);
            }
        }
        ship.measure().await;
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    match tokio::time::timeout(LAST_SHIPMENT, ship.round()).await {
        Ok(Ok(())) => {}
        _ => tracing::warn!("Stopping with records not shipped; they go at the next start"),
    }
    ship.measure().await;
}

struct Shipper {
    ledger: Ledger,
    shared: Arc<Shared>,
    metrics: Metrics,
    client: Option<Client>,
    budgets_read: Option<Instant>,
}

impl Shipper {
    /// Connect (and migrate) if needed, ship every batch waiting, and read the others' use
    /// for the budgets when it is due.
    async fn round(&mut self) -> anyhow::Result<()> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let timeout = self.shared.settings.ship_interval.0.max(READ_TIMEOUT);
            let mut client = postgres::connect(&self.shared.config, timeout).await?;
            postgres::migrate(&mut client).await?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        let limit = self.shared.settings.ship_batch;
        loop {
            let ledger = self.ledger.clone();
            let batch = tokio::task::spawn_blocking(move || {
                ledger.read(|c| {
                    let after = outbox::shipped(c)?;
                    outbox::batch(c, after, limit)
                })
            })
            .await??;
            let Some(&(last, _)) = batch.last() else {
                break;
            };
            let added =
                postgres::insert(client, &self.shared.node, self.shared.origin, &batch).await?;
            self.ledger.mark_shipped(last).await?;
            let shipped = &self.metrics.ledger_shipped;
            shipped.with_label_values(&["new"]).inc_by(added);
            shipped
                .with_label_values(&["duplicate"])
                .inc_by(batch.len() as u64 - added.min(batch.len() as u64));
            if batch.len() < limit {
                break;
            }
        }
        if self
            .budgets_read
            .is_none_or(|t| t.elapsed() >= BUDGET_EVERY)
        {
            let month = super::month::month_bounds(now_ms()).0;
            let by = postgres::others_tokens(client, month, self.shared.origin).await?;
            *self.shared.others.lock() = Some((month, by));
            self.budgets_read = Some(Instant::now());
        }
        Ok(())
    }

    /// The backlog and lag gauges, from the outbox.
    async fn measure(&self) {
        let ledger = self.ledger.clone();
        let got = tokio::task::spawn_blocking(move || ledger.read(outbox::backlog)).await;
        if let Ok(Ok(b)) = got {
            self.metrics.ledger_unshipped.set(b.records as i64);
            let lag = b
                .oldest_ms
                .map_or(0.0, |t| now_ms().saturating_sub(t) as f64 / 1000.0);
            self.metrics.ledger_ship_lag_seconds.set(lag);
        }
    }
}
