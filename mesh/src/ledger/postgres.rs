//! The mesh's shared ledger in PostgreSQL: its `[ledger]` config, the versioned schema
//! (migrated at start under an advisory lock), the idempotent batch insert, and the sums
//! usage, invoices and budgets are read from.

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::{
    record::{Record, Usage},
    tls::Target,
};
use crate::units::Secs;

/// `[ledger]`: the shared ledger (off unless `postgres` is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// `postgres://user:password@host:port/database?sslmode=verify-full&sslrootcert=ca.pem`
    /// (or `FLATMESH_LEDGER_POSTGRES`; `sslmode` as libpq reads it, see `tls`): every node
    /// ships its records there, and usage, invoices and budgets are read from there. Unset: each node's SQLite ledger is all there is, and
    /// mesh-wide queries ask every live node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// How often a node ships what it recorded since (default 1 s); a full batch is followed
    /// by the next at once.
    pub ship_interval: Secs,
    /// Most records one shipment carries (default 2000).
    pub ship_batch: usize,
    /// The longest wait between tries while PostgreSQL cannot be reached (default 30 s); the
    /// wait starts at `ship_interval` and doubles.
    pub max_backoff: Secs,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            postgres: None,
            ship_interval: Secs(Duration::from_secs(1)),
            ship_batch: 2000,
            max_backoff: Secs(Duration::from_secs(30)),
        }
    }
}

impl LedgerConfig {
    /// Check the URL and the numbers; errors name the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.postgres {
            Target::parse(url)?;
        }
        if self.ship_interval.0 < Duration::from_millis(10) {
            bail!("ledger.ship_interval: must be at least 10ms");
        }
        if !(1..=50_000).contains(&self.ship_batch) {
            bail!(
                "ledger.ship_batch: {} is not in [1, 50000]",
                self.ship_batch
            );
        }
        if self.max_backoff.0 < self.ship_interval.0 {
            bail!("ledger.max_backoff: must not be shorter than ledger.ship_interval");
        }
        Ok(())
    }
}

/// The table of applied migrations.
const VERSIONS: &str = "CREATE TABLE IF NOT EXISTS flatmesh_schema_versions (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// The schema, one step per version, applied in order, each in its own transaction.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE flatmesh_ledger_records (
        id text PRIMARY KEY,
        client_id text,
        node text NOT NULL,
        origin bigint NOT NULL,
        seq bigint NOT NULL,
        tenant text NOT NULL,
        tier text NOT NULL,
        model text NOT NULL,
        endpoint text NOT NULL,
        input_tokens bigint NOT NULL,
        output_tokens bigint NOT NULL,
        device_seconds double precision NOT NULL,
        cache_hit boolean NOT NULL,
        started_ms bigint NOT NULL,
        finished_ms bigint NOT NULL,
        shipped_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX flatmesh_ledger_records_by_time ON flatmesh_ledger_records (finished_ms);
    CREATE INDEX flatmesh_ledger_records_by_tenant ON flatmesh_ledger_records (tenant, finished_ms);
    CREATE INDEX flatmesh_ledger_records_by_origin ON flatmesh_ledger_records (origin, seq);",
    ),
    (2, ROLLUPS),
];

/// Version 2: sums by hour (tenant, tier, model) and by day (origin, tenant), kept by a
/// trigger on every insert of records (whatever agent version inserts them; only the rows an
/// insert really added, so a batch shipped twice counts once), and filled from the records
/// already there. Creating the trigger locks out inserts until the migration commits, so each
/// record is summed exactly once. A month's usage, invoice or budget then reads at most
/// ~750 hours per tenant and model instead of every record. The lock comes first: it waits
/// for inserts in flight and takes no snapshot, so the fill sees every record committed
/// before it whatever the server's default isolation level.
const ROLLUPS: &str = "LOCK TABLE flatmesh_ledger_records IN SHARE ROW EXCLUSIVE MODE;
    CREATE TABLE flatmesh_ledger_hours (
        hour_ms bigint NOT NULL,
        tenant text NOT NULL,
        tier text NOT NULL,
        model text NOT NULL,
        requests bigint NOT NULL,
        input_tokens bigint NOT NULL,
        output_tokens bigint NOT NULL,
        device_seconds double precision NOT NULL,
        first_ms bigint NOT NULL,
        PRIMARY KEY (hour_ms, tenant, tier, model)
    );
    CREATE INDEX flatmesh_ledger_hours_by_tenant ON flatmesh_ledger_hours (tenant, hour_ms);
    CREATE TABLE flatmesh_ledger_origin_days (
        day_ms bigint NOT NULL,
        origin bigint NOT NULL,
        tenant text NOT NULL,
        tokens bigint NOT NULL,
        PRIMARY KEY (day_ms, origin, tenant)
    );
    CREATE FUNCTION flatmesh_ledger_roll_up() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO flatmesh_ledger_hours AS h
        SELECT (finished_ms / 3600000) * 3600000, tenant, tier, model, count(*),
            sum(input_tokens), sum(output_tokens), sum(device_seconds), min(finished_ms)
        FROM added GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (hour_ms, tenant, tier, model) DO UPDATE SET
            requests = h.requests + excluded.requests,
            input_tokens = h.input_tokens + excluded.input_tokens,
            output_tokens = h.output_tokens + excluded.output_tokens,
            device_seconds = h.device_seconds + excluded.device_seconds,
            first_ms = least(h.first_ms, excluded.first_ms);
        INSERT INTO flatmesh_ledger_origin_days AS d
        SELECT (finished_ms / 86400000) * 86400000, origin, tenant,
            sum(input_tokens + output_tokens)
        FROM added GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (day_ms, origin, tenant) DO UPDATE SET tokens = d.tokens + excluded.tokens;
        RETURN NULL;
    END $$;
    CREATE TRIGGER flatmesh_ledger_roll_up AFTER INSERT ON flatmesh_ledger_records
        REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION flatmesh_ledger_roll_up();
    INSERT INTO flatmesh_ledger_hours
    SELECT (finished_ms / 3600000) * 3600000, tenant, tier, model, count(*),
        sum(input_tokens), sum(output_tokens), sum(device_seconds), min(finished_ms)
    FROM flatmesh_ledger_records GROUP BY 1, 2, 3, 4;
    INSERT INTO flatmesh_ledger_origin_days
    SELECT (finished_ms / 86400000) * 86400000, origin, tenant, sum(input_tokens + output_tokens)
    FROM flatmesh_ledger_records GROUP BY 1, 2, 3;";

/// The schema version this agent writes.
pub fn schema_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// The shared ledger was migrated by a newer agent: this one must not write to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared ledger has schema version {found}, newer than this agent's {ours}")]
pub struct NewerSchema {
    pub found: i32,
    pub ours: i32,
}

/// `pg_advisory_lock` key of the migrations ("FMLG").
const MIGRATION_LOCK: i64 = 0x464d_4c47;

/// Connect (bounded by `timeout`); the connection runs on its own task until the client
/// is dropped.
pub async fn connect(target: &Target, timeout: Duration) -> anyhow::Result<Client> {
    let mut config = target.config.clone();
    config.connect_timeout(timeout);
    if config.get_application_name().is_none() {
        config.application_name("flatmesh");
    }
    let client = tokio::time::timeout(timeout, target.connect(&config))
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out after {timeout:?}"))??;
    Ok(client)
}

/// Bring the schema up to this agent's version: whichever node holds the advisory lock
/// applies the missing steps; the others wait on it, then find nothing to do. Returns the
/// version found before. A database newer than this agent is an error.
pub async fn migrate(client: &mut Client) -> anyhow::Result<i32> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("cannot take the migration lock")?;
    let applied = apply(client).await;
    // Closing the session would release it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    applied
}

async fn apply(client: &mut Client) -> anyhow::Result<i32> {
    client.batch_execute(VERSIONS).await?;
    let found: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM flatmesh_schema_versions",
            &[],
        )
        .await?
        .get(0);
    if found > schema_version() {
        return Err(NewerSchema {
            found,
            ours: schema_version(),
        }
        .into());
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version} failed"))?;
        tx.execute(
            "INSERT INTO flatmesh_schema_versions (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "Migrated the shared ledger");
    }
    Ok(found)
}

/// Add a batch of `(seq, record)` of one origin in one statement; a known id is skipped
/// (shipped before, by a try whose acknowledgement was lost). Returns the records added.
pub async fn insert(
    client: &Client,
    node: &str,
    origin: i64,
    batch: &[(i64, Record)],
) -> anyhow::Result<u64> {
    let seq: Vec<i64> = batch.iter().map(|(s, _)| *s).collect();
    let col = |f: fn(&Record) -> String| batch.iter().map(|(_, r)| f(r)).collect::<Vec<_>>();
    let int = |f: fn(&Record) -> u64| {
        batch
            .iter()
            .map(|(_, r)| i64::try_from(f(r)).unwrap_or(i64::MAX))
            .collect::<Vec<_>>()
    };
    let client_id: Vec<Option<String>> = batch.iter().map(|(_, r)| r.client_id.clone()).collect();
    let device: Vec<f64> = batch.iter().map(|(_, r)| r.device_seconds).collect();
    let hit: Vec<bool> = batch.iter().map(|(_, r)| r.cache_hit).collect();
    let n = client
        .execute(
            "INSERT INTO flatmesh_ledger_records (id, client_id, node, origin, seq, tenant, tier,
                model, endpoint, input_tokens, output_tokens, device_seconds, cache_hit,
                started_ms, finished_ms)
             SELECT u.id, u.client_id, $1, $2, u.seq, u.tenant, u.tier, u.model, u.endpoint,
                u.input_tokens, u.output_tokens, u.device_seconds, u.cache_hit, u.started_ms,
                u.finished_ms
             FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::float8[],
                $13::bool[], $14::bigint[], $15::bigint[])
                AS u(seq, id, client_id, tenant, tier, model, endpoint, input_tokens,
                     output_tokens, device_seconds, cache_hit, started_ms, finished_ms)
             ON CONFLICT (id) DO NOTHING",
            &[
                &node,
                &origin,
                &seq,
                &col(|r| r.id.clone()),
                &client_id,
                &col(|r| r.tenant.clone()),
                &col(|r| r.tier.clone()),
                &col(|r| r.model.clone()),
                &col(|r| r.endpoint.clone()),
                &int(|r| r.input_tokens),
                &int(|r| r.output_tokens),
                &device,
                &hit,
                &int(|r| r.started_ms),
                &int(|r| r.finished_ms),
            ],
        )
        .await?;
    Ok(n)
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const HOUR_MS: u64 = 3_600_000;

/// The whole multiples of `unit` inside `[from, to)`, `[start, end)`, read from a rollup; the
/// ragged ends `[from, start)` and `[end, to)` are read from the records. `(to, to)` when
/// there are none.
fn whole(unit: u64, (from, to): (u64, u64)) -> (i64, i64) {
    let start = from.div_ceil(unit).saturating_mul(unit);
    let end = to / unit * unit;
    match start < end {
        true => (ms(start), ms(end)),
        false => (ms(to), ms(to)),
    }
}

/// Usage per tenant in `[from, to)` (sorted by tenant), without `origin`'s records above
/// `shipped` (the caller counts those from its outbox). A tenant's tier is the one of its
/// first record in the period. Whole hours come from `flatmesh_ledger_hours`, less this
/// origin's records above `shipped` that they hold (a batch shipped after the caller read
/// its outbox); the ragged ends from the records.
pub async fn usage(
    client: &Client,
    tenant: Option<&str>,
    (from, to): (u64, u64),
    (origin, shipped): (i64, i64),
) -> anyhow::Result<Vec<Usage>> {
    let (h0, h1) = whole(HOUR_MS, (from, to));
    let rows = client
        .query(
            "WITH parts AS (
                SELECT tenant, tier, first_ms, requests, input_tokens, output_tokens,
                    device_seconds
                FROM flatmesh_ledger_hours
                WHERE hour_ms >= $6 AND hour_ms < $7 AND ($3::text IS NULL OR tenant = $3)
              UNION ALL
                SELECT tenant, tier, finished_ms, 1, input_tokens, output_tokens, device_seconds
                FROM flatmesh_ledger_records
                WHERE (finished_ms >= $1 AND finished_ms < $6
                       OR finished_ms >= $7 AND finished_ms < $2)
                  AND ($3::text IS NULL OR tenant = $3) AND NOT (origin = $4 AND seq > $5)
              UNION ALL
                SELECT tenant, tier, 9223372036854775807, -1, -input_tokens, -output_tokens,
                    -device_seconds
                FROM flatmesh_ledger_records
                WHERE origin = $4 AND seq > $5 AND finished_ms >= $6 AND finished_ms < $7
                  AND ($3::text IS NULL OR tenant = $3)
             )
             , tiers AS (
                SELECT tenant, tier, min(first_ms) AS first_ms, sum(requests) AS requests,
                    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                    sum(device_seconds) AS device_seconds
                FROM parts GROUP BY tenant, tier HAVING sum(requests) > 0
             )
             SELECT tenant, (array_agg(tier ORDER BY first_ms))[1], sum(requests)::bigint,
                sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                sum(device_seconds)::float8
             FROM tiers GROUP BY tenant ORDER BY tenant",
            &[&ms(from), &ms(to), &tenant, &origin, &shipped, &h0, &h1],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Usage {
            tenant: r.get(0),
            tier: r.get(1),
            requests: r.get::<_, i64>(2) as u64,
            input_tokens: r.get::<_, i64>(3) as u64,
            output_tokens: r.get::<_, i64>(4) as u64,
            device_seconds: r.get(5),
        })
        .collect())
}

/// One tenant's usage in `[from, to)` by UTC day and model, without `origin`'s records above
/// `shipped` (read as `usage` reads it).
pub async fn by_day_and_model(
    client: &Client,
    tenant: &str,
    (from, to): (u64, u64),
    (origin, shipped): (i64, i64),
) -> anyhow::Result<Vec<super::outbox::DayModel>> {
    let (h0, h1) = whole(HOUR_MS, (from, to));
    let rows = client
        .query(
            "WITH parts AS (
                SELECT (hour_ms / $8) * $8 AS day, model, requests, input_tokens,
                    output_tokens, device_seconds
                FROM flatmesh_ledger_hours
                WHERE tenant = $3 AND hour_ms >= $6 AND hour_ms < $7
              UNION ALL
                SELECT (finished_ms / $8) * $8, model, 1, input_tokens, output_tokens,
                    device_seconds
                FROM flatmesh_ledger_records
                WHERE tenant = $3 AND (finished_ms >= $1 AND finished_ms < $6
                                       OR finished_ms >= $7 AND finished_ms < $2)
                  AND NOT (origin = $4 AND seq > $5)
              UNION ALL
                SELECT (finished_ms / $8) * $8, model, -1, -input_tokens, -output_tokens,
                    -device_seconds
                FROM flatmesh_ledger_records
                WHERE origin = $4 AND seq > $5 AND tenant = $3
                  AND finished_ms >= $6 AND finished_ms < $7
             )
             SELECT day, model, sum(requests)::bigint, sum(input_tokens)::bigint,
                sum(output_tokens)::bigint, sum(device_seconds)::float8
             FROM parts GROUP BY 1, 2 HAVING sum(requests) > 0",
            &[
                &ms(from),
                &ms(to),
                &tenant,
                &origin,
                &shipped,
                &h0,
                &h1,
                &super::outbox::DAY_MS,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let usage = Usage {
                tenant: tenant.to_string(),
                tier: String::new(),
                requests: r.get::<_, i64>(2) as u64,
                input_tokens: r.get::<_, i64>(3) as u64,
                output_tokens: r.get::<_, i64>(4) as u64,
                device_seconds: r.get(5),
            };
            (r.get::<_, i64>(0) as u64, r.get(1), usage)
        })
        .collect())
}

/// Tokens (input and output) per tenant since `from`, of every origin but `origin`: what
/// the other nodes used, for the budgets here (whole days from
/// `flatmesh_ledger_origin_days`, the ragged start from the records).
pub async fn others_tokens(
    client: &Client,
    from: u64,
    origin: i64,
) -> anyhow::Result<HashMap<String, u64>> {
    let day = super::outbox::DAY_MS as u64;
    let d0 = ms(from.div_ceil(day).saturating_mul(day));
    let rows = client
        .query(
            "WITH parts AS (
                SELECT tenant, tokens FROM flatmesh_ledger_origin_days
                WHERE day_ms >= $3 AND origin <> $2
              UNION ALL
                SELECT tenant, input_tokens + output_tokens FROM flatmesh_ledger_records
                WHERE finished_ms >= $1 AND finished_ms < $3 AND origin <> $2
             )
             SELECT tenant, sum(tokens)::bigint FROM parts GROUP BY tenant",
            &[&ms(from), &origin, &d0],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_by_name() {
        let bad_url = LedgerConfig {
            postgres: Some("postgres://db/l?sslmode=bogus".into()),
            ..Default::default()
        };
        assert!(bad_url.validate().is_err());
        let c = LedgerConfig {
            ship_batch: 0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("ledger.ship_batch"));
        assert_eq!(schema_version(), MIGRATIONS.len() as i32);
    }

    #[test]
    fn a_period_splits_into_whole_hours_and_ragged_ends() {
        let h = HOUR_MS;
        assert_eq!(whole(h, (0, 3 * h)), (0, 3 * h as i64));
        assert_eq!(whole(h, (h / 2, 3 * h + 5)), (h as i64, 3 * h as i64));
        // Inside one hour, or less than a whole one: records only.
        assert_eq!(
            whole(h, (h + 1, 2 * h - 1)),
            (2 * h as i64 - 1, 2 * h as i64 - 1)
        );
        assert_eq!(
            whole(h, (h / 2, h + h / 2)),
            (h as i64 + h as i64 / 2, h as i64 + h as i64 / 2)
        );
        assert_eq!(whole(h, (5, 5)), (5, 5));
        // The far future stays in range.
        assert_eq!(whole(h, (u64::MAX - 1, u64::MAX)).0, i64::MAX);
    }
}
