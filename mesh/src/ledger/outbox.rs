//! The SQLite ledger as the outbox of the shared one: which records are shipped (a
//! watermark on the records' rowid, in `meta`), the next batch to ship, the backlog, and the
//! usage of the records not shipped yet.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

use super::{
    record::{Record, Usage},
    sqlite::{self, ms},
};

/// `meta` key: every record with a rowid up to this one is in the shared ledger.
pub const SHIPPED: &str = "shipped_seq";
/// `meta` key: this ledger file's own random id, the `origin` of its records in the shared
/// ledger (a node whose disk is replaced starts a new origin: its old records stay apart).
pub const ORIGIN: &str = "origin";

/// This ledger's origin, made the first time (on the write connection).
pub fn origin(conn: &Connection) -> rusqlite::Result<i64> {
    if let Some(id) = sqlite::meta(conn, ORIGIN)? {
        return Ok(id);
    }
    // Positive, so that it reads the same everywhere it is printed.
    let id = (rand::random::<u64>() >> 1) as i64;
    sqlite::set_meta(conn, ORIGIN, id)?;
    Ok(id)
}

/// The watermark: records with a rowid above it are not known to be shipped.
pub fn shipped(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(sqlite::meta(conn, SHIPPED)?.unwrap_or(0))
}

/// Up to `limit` records after `after`, in the order written, each with its rowid (its
/// `seq` in the shared ledger).
pub fn batch(conn: &Connection, after: i64, limit: usize) -> rusqlite::Result<Vec<(i64, Record)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rowid, id, client_id, tenant, tier, model, endpoint, input_tokens, \
         output_tokens, device_seconds, cache_hit, started_ms, finished_ms FROM records \
         WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        Ok((
            r.get(0)?,
            Record {
                id: r.get(1)?,
                client_id: r.get(2)?,
                tenant: r.get(3)?,
                tier: r.get(4)?,
                model: r.get(5)?,
                endpoint: r.get(6)?,
                input_tokens: r.get::<_, i64>(7)? as u64,
                output_tokens: r.get::<_, i64>(8)? as u64,
                device_seconds: r.get(9)?,
                cache_hit: r.get(10)?,
                started_ms: r.get::<_, i64>(11)? as u64,
                finished_ms: r.get::<_, i64>(12)? as u64,
            },
        ))
    })?;
    rows.collect()
}

/// What waits to be shipped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// The watermark.
    pub shipped: i64,
    /// Records above it.
    pub records: u64,
    /// When the oldest of them finished (Unix ms).
    pub oldest_ms: Option<u64>,
}

/// The backlog, in one read transaction.
pub fn backlog(conn: &mut Connection) -> rusqlite::Result<Backlog> {
    let tx = conn.transaction()?;
    let shipped = shipped(&tx)?;
    let (records, oldest): (i64, Option<i64>) = tx.query_row(
        "SELECT count(*), min(finished_ms) FROM records WHERE rowid > ?1",
        [shipped],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(Backlog {
        shipped,
        records: records as u64,
        oldest_ms: oldest.map(|v| v as u64),
    })
}

/// The watermark and, in the same snapshot, the usage per tenant in `[from, to)` of the
/// records above it (sorted by tenant). The shared ledger is then read without this
/// origin's records above the watermark, so a record shipped in between counts once.
pub fn unshipped_usage(
    conn: &mut Connection,
    tenant: Option<&str>,
    from: u64,
    to: u64,
) -> rusqlite::Result<(i64, Vec<Usage>)> {
    let tx = conn.transaction()?;
    let shipped = shipped(&tx)?;
    let mut stmt = tx.prepare_cached(
        "SELECT tenant, tier, min(finished_ms), count(*), sum(input_tokens), \
         sum(output_tokens), sum(device_seconds) FROM records WHERE rowid > ?1 \
         AND finished_ms >= ?2 AND finished_ms < ?3 AND (?4 IS NULL OR tenant = ?4) \
         GROUP BY tenant",
    )?;
    let mut by = BTreeMap::new();
    let mut rows = stmt.query(params![shipped, ms(from), ms(to), tenant])?;
    while let Some(r) = rows.next()? {
        let u = Usage {
            tenant: r.get(0)?,
            tier: r.get(1)?,
            requests: r.get::<_, i64>(3)? as u64,
            input_tokens: r.get::<_, i64>(4)? as u64,
            output_tokens: r.get::<_, i64>(5)? as u64,
            device_seconds: r.get(6)?,
        };
        by.insert(u.tenant.clone(), u);
    }
    drop(rows);
    drop(stmt);
    tx.finish()?;
    Ok((shipped, by.into_values().collect()))
}

/// A day's start (Unix ms, UTC), a model, and the usage summed there.
pub type DayModel = (u64, String, Usage);

/// One UTC day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// The watermark and, in the same snapshot, one tenant's usage in `[from, to)` by day and
/// model of the records above it.
pub fn unshipped_by_day_and_model(
    conn: &mut Connection,
    tenant: &str,
    from: u64,
    to: u64,
) -> rusqlite::Result<(i64, Vec<DayModel>)> {
    let tx = conn.transaction()?;
    let shipped = shipped(&tx)?;
    let mut stmt = tx.prepare_cached(
        "SELECT (finished_ms / ?5) * ?5, model, count(*), sum(input_tokens), \
         sum(output_tokens), sum(device_seconds) FROM records WHERE rowid > ?1 \
         AND tenant = ?2 AND finished_ms >= ?3 AND finished_ms < ?4 GROUP BY 1, 2",
    )?;
    let rows = stmt.query_map(params![shipped, tenant, ms(from), ms(to), DAY_MS], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, String>(1)?,
            Usage {
                tenant: tenant.to_string(),
                tier: String::new(),
                requests: r.get::<_, i64>(2)? as u64,
                input_tokens: r.get::<_, i64>(3)? as u64,
                output_tokens: r.get::<_, i64>(4)? as u64,
                device_seconds: r.get(5)?,
            },
        ))
    })?;
    let out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    drop(stmt);
    tx.finish()?;
    Ok((shipped, out))
}
