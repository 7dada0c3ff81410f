//! The shipper: a background task that moves this node's records from its SQLite outbox to
//! the shared ledger in PostgreSQL, in batches, idempotently, and marks them shipped;
//! while PostgreSQL is away it retries with a doubling wait and the outbox grows.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_postgres::Client;

use super::{
    outbox, postgres,
    shared::{Shared, ShipState, READ_TIMEOUT},
    Ledger,
};
use crate::{metrics::Metrics, util::now_ms};

/// How often the other nodes' use this month is read for the budgets, at most.
const BUDGET_EVERY: Duration = Duration::from_secs(2);
/// The last shipment after the stop signal may take this long.
const LAST_SHIPMENT: Duration = Duration::from_secs(3);

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
        // Measured as shipping starts: the backlog then is the most the node could lose.
        ship.measure().await;
        let result = tokio::select! {
            _ = &mut stop => break,
            r = ship.round() => r,
        };
        ship.note(&result);
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
            let mut client = postgres::connect(&self.shared.target, timeout).await?;
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
            // A failed read leaves the budgets on the last figures and is tried again next
            // round; the records shipped all the same.
            let month = super::month::month_bounds(now_ms()).0;
            match postgres::others_tokens(client, month, self.shared.origin).await {
                Ok(by) => {
                    *self.shared.others.lock() = Some((month, by));
                    self.budgets_read = Some(Instant::now());
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "Could not read the other nodes' use for the budgets; keeping the last"
                ),
            }
        }
        Ok(())
    }

    /// Keep how the round went for the status page: while rounds fail, the time the failing
    /// began is kept, whatever the failures.
    fn note(&self, result: &anyhow::Result<()>) {
        let mut state = self.shared.state.lock();
        let since_ms = state.failing_since().unwrap_or_else(now_ms);
        *state = match result {
            Ok(()) => ShipState::Shipping { at_ms: now_ms() },
            Err(e) => match e.downcast_ref::<postgres::NewerSchema>() {
                Some(schema) => ShipState::NewerSchema {
                    since_ms,
                    schema: *schema,
                },
                None => ShipState::Failing {
                    since_ms,
                    error: format!("{e:#}"),
                },
            },
        };
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
