//! The shared ledger as one node sees it: where PostgreSQL is, who this node is in it, a
//! connection for queries, and what the other nodes used this month (for the budgets).

use std::{collections::HashMap, future::Future, time::Duration};

use parking_lot::Mutex;
use tokio_postgres::Client;

use super::{outbox, postgres, postgres::LedgerConfig, record::Usage, tls::Target};

/// How long a reader's connection attempt may take.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reader's query may take (a month's sums over many records).
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared ledger as one node sees it: where it is, who this node is in it, a
/// connection for queries, and what the other nodes used this month.
pub struct Shared {
    /// Where PostgreSQL is and how TLS reaches it.
    pub(super) target: Target,
    pub(super) settings: LedgerConfig,
    /// This node's name (a label in the shared ledger only).
    pub(super) node: String,
    /// This node's ledger file's origin id.
    pub(super) origin: i64,
    reader: tokio::sync::Mutex<Option<Client>>,
    /// (start of month, tokens per tenant of the other origins).
    pub(super) others: Mutex<Option<(u64, HashMap<String, u64>)>>,
    /// How the last shipping round went.
    pub(super) state: Mutex<ShipState>,
}

/// How this node's shipping to the shared ledger stands (the status page shows it).
#[derive(Debug, Clone, PartialEq)]
pub enum ShipState {
    /// No round has finished yet.
    Starting,
    /// The last round shipped everything waiting, at this time (ms since the epoch).
    Shipping { at_ms: u64 },
    /// Rounds fail since `since_ms`; records stay in the outbox and rounds are retried.
    Failing { since_ms: u64, error: String },
    /// The database was migrated by a newer agent: nothing is shipped until this node is
    /// upgraded (rounds are retried, in case it was restored to an older version). Not
    /// shipping since `since_ms`.
    NewerSchema {
        since_ms: u64,
        schema: postgres::NewerSchema,
    },
}

impl ShipState {
    /// Since when nothing has been shipped, while rounds fail.
    pub fn failing_since(&self) -> Option<u64> {
        match self {
            ShipState::Failing { since_ms, .. } | ShipState::NewerSchema { since_ms, .. } => {
                Some(*since_ms)
            }
            ShipState::Starting | ShipState::Shipping { .. } => None,
        }
    }
}

impl Shared {
    pub fn new(settings: &LedgerConfig, node: &str, origin: i64) -> anyhow::Result<Shared> {
        let url = settings
            .postgres
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("ledger.postgres is not set"))?;
        Ok(Shared {
            target: Target::parse(url)?,
            settings: settings.clone(),
            node: node.to_string(),
            origin,
            reader: tokio::sync::Mutex::new(None),
            others: Mutex::new(None),
            state: Mutex::new(ShipState::Starting),
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
        let client = take_or_connect(&mut reader, &self.target).await?;
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
        let client = take_or_connect(&mut reader, &self.target).await?;
        let me = (self.origin, shipped);
        let got = bounded(postgres::by_day_and_model(&client, tenant, period, me)).await;
        if got.is_ok() {
            *reader = Some(client);
        }
        got
    }

    /// How shipping stands.
    pub fn state(&self) -> ShipState {
        self.state.lock().clone()
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
async fn take_or_connect(reader: &mut Option<Client>, target: &Target) -> anyhow::Result<Client> {
    match reader.take() {
        Some(c) if !c.is_closed() => Ok(c),
        _ => postgres::connect(target, READ_TIMEOUT).await,
    }
}

/// A reader's query, bounded by `QUERY_TIMEOUT`.
async fn bounded<T>(query: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(QUERY_TIMEOUT, query)
        .await
        .map_err(|_| anyhow::anyhow!("the shared ledger did not answer in {QUERY_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_keeps_the_time_it_began_across_kinds_of_failure() {
        let newer = ShipState::NewerSchema {
            since_ms: 5,
            schema: postgres::NewerSchema { found: 3, ours: 2 },
        };
        assert_eq!(newer.failing_since(), Some(5));
        let failing = ShipState::Failing {
            since_ms: 7,
            error: "connection refused".into(),
        };
        assert_eq!(failing.failing_since(), Some(7));
        assert_eq!(ShipState::Shipping { at_ms: 9 }.failing_since(), None);
        assert_eq!(ShipState::Starting.failing_since(), None);
    }
}
