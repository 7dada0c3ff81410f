//! The ledger's SQLite file: opening it (refusing a corrupt or foreign one), its schema, and
//! the indexed queries usage, invoices and budgets are answered from.

use std::{collections::BTreeMap, io::Read, path::Path, time::Duration};

use anyhow::{bail, Context};
use rusqlite::{params, Connection, OptionalExtension};

use super::record::{Record, Usage};

/// `PRAGMA application_id` of a flatmesh ledger ("FMLG"): a file without it is not ours.
pub const APPLICATION_ID: i32 = 0x464d_4c47;
/// `PRAGMA user_version` of the schema below.
pub const SCHEMA_VERSION: i32 = 1;
/// The rollup's granularity: usage is kept per hour, tenant and tier beside the records.
pub const HOUR_MS: i64 = 3_600_000;

const SCHEMA: &str = "
CREATE TABLE records (
    id TEXT PRIMARY KEY NOT NULL,
    client_id TEXT,
    tenant TEXT NOT NULL,
    tier TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    device_seconds REAL NOT NULL,
    cache_hit INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL
);
CREATE INDEX records_by_time ON records (finished_ms);
CREATE INDEX records_by_tenant ON records (tenant, finished_ms);
CREATE INDEX records_by_tier ON records (tier, finished_ms);
CREATE TABLE usage_hours (
    hour INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    tier TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    device_seconds REAL NOT NULL,
    PRIMARY KEY (hour, tenant, tier)
) WITHOUT ROWID;
CREATE TRIGGER records_count AFTER INSERT ON records BEGIN
    INSERT INTO usage_hours VALUES (NEW.finished_ms - NEW.finished_ms % 3600000, NEW.tenant,
        NEW.tier, NEW.finished_ms, 1, NEW.input_tokens, NEW.output_tokens, NEW.device_seconds)
    ON CONFLICT (hour, tenant, tier) DO UPDATE SET first_ms = min(first_ms, excluded.first_ms),
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        device_seconds = device_seconds + excluded.device_seconds;
END;
CREATE TRIGGER records_uncount AFTER DELETE ON records BEGIN
    UPDATE usage_hours SET requests = requests - 1,
        input_tokens = input_tokens - OLD.input_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        device_seconds = device_seconds - OLD.device_seconds
    WHERE hour = OLD.finished_ms - OLD.finished_ms % 3600000 AND tenant = OLD.tenant
        AND tier = OLD.tier;
END;
CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value ANY) WITHOUT ROWID;
";

/// Open (or create) the ledger database at `path` for writing: WAL, `synchronous = FULL`,
/// the schema in place. A file that is not a flatmesh ledger is an error, never replaced.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    check_header(path)?;
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open the ledger {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let unreadable = |e: rusqlite::Error| {
        anyhow::anyhow!(
            "the ledger {} cannot be read ({e}): it is corrupt or not a ledger; it is never \
             recreated over: move it away or restore it, then start again",
            path.display()
        )
    };
    let app: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(unreadable)?;
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(unreadable)?;
    if app != APPLICATION_ID && !(app == 0 && objects == 0) {
        bail!(
            "{} is an SQLite database of something else (application_id {app:#x}, {objects} \
             schema objects), not a flatmesh ledger: move it away, then start again",
            path.display()
        );
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(unreadable)?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "the ledger {} cannot use WAL mode (got {mode})",
            path.display()
        );
    }
    // Every commit's WAL frames are fsync'd before it returns: a record acknowledged to a
    // request survives a power cut, as it did with one fsync per JSON line.
    conn.pragma_update(None, "synchronous", "FULL")?;
    let version: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    match version {
        0 => {
            let schema = format!(
                "BEGIN; {SCHEMA} PRAGMA application_id = {APPLICATION_ID}; \
                 PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            );
            conn.execute_batch(&schema)
                .with_context(|| format!("cannot create the ledger {}", path.display()))?;
        }
        SCHEMA_VERSION => {}
        v => bail!(
            "the ledger {} has schema version {v}, newer than this agent's {SCHEMA_VERSION}",
            path.display()
        ),
    }
    Ok(conn)
}

/// A second connection to an opened ledger, for queries only.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

/// A non-empty file whose first bytes are not SQLite's is refused before SQLite sees it.
fn check_header(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("cannot read the ledger {}: {e}", path.display()),
    };
    if !meta.is_file() {
        bail!("the ledger {} is not a regular file", path.display());
    }
    if meta.len() == 0 {
        return Ok(());
    }
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .with_context(|| format!("cannot read the ledger {}", path.display()))?;
    if n < head.len() || &head != b"SQLite format 3\0" {
        bail!(
            "{} is not an SQLite database ({} bytes that do not start with SQLite's header): \
             corrupt or foreign; it is never recreated over: move it away or restore it, then \
             start again",
            path.display(),
            meta.len()
        );
    }
    Ok(())
}

/// Milliseconds as SQLite's integers (which are signed).
pub fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Add one record (a new one: a known id is an error). Returns rows added.
pub fn insert(conn: &Connection, r: &Record, or_ignore: bool) -> rusqlite::Result<usize> {
    let sql = if or_ignore {
        "INSERT OR IGNORE INTO records VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    } else {
        "INSERT INTO records VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    };
    conn.prepare_cached(sql)?.execute(params![
        r.id,
        r.client_id,
        r.tenant,
        r.tier,
        r.model,
        r.endpoint,
        ms(r.input_tokens),
        ms(r.output_tokens),
        r.device_seconds,
        r.cache_hit,
        ms(r.started_ms),
        ms(r.finished_ms),
    ])
}

/// A value of the `meta` table.
pub fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

pub fn set_meta(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(drop)
}

/// Records that finished in `[from, to)`, optionally of one tenant, in the order written.
pub fn records(
    conn: &Connection,
    tenant: Option<&str>,
    from: u64,
    to: u64,
) -> rusqlite::Result<Vec<Record>> {
    let cols = "id, client_id, tenant, tier, model, endpoint, input_tokens, output_tokens, \
                device_seconds, cache_hit, started_ms, finished_ms";
    let sql = match tenant {
        Some(_) => format!(
            "SELECT {cols} FROM records WHERE tenant = ?3 AND finished_ms >= ?1 \
             AND finished_ms < ?2 ORDER BY rowid"
        ),
        None => format!(
            "SELECT {cols} FROM records WHERE finished_ms >= ?1 AND finished_ms < ?2 \
             AND ?3 IS NULL ORDER BY rowid"
        ),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![ms(from), ms(to), tenant], |r| {
        Ok(Record {
            id: r.get(0)?,
            client_id: r.get(1)?,
            tenant: r.get(2)?,
            tier: r.get(3)?,
            model: r.get(4)?,
            endpoint: r.get(5)?,
            input_tokens: r.get::<_, i64>(6)? as u64,
            output_tokens: r.get::<_, i64>(7)? as u64,
            device_seconds: r.get(8)?,
            cache_hit: r.get(9)?,
            started_ms: r.get::<_, i64>(10)? as u64,
            finished_ms: r.get::<_, i64>(11)? as u64,
        })
    })?;
    rows.collect()
}

/// Whose use a query sums.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    All,
    Tenant(&'a str),
    Tier(&'a str),
}

/// Where a piece of a period is summed from: the records themselves (the ragged ends of a
/// period), or the hourly rollup (every whole hour in between).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    Records,
    Hours,
}

/// `[from, to)` cut into pieces in time order: whole hours from the rollup, the rest from
/// the records.
fn pieces(from: u64, to: u64) -> Vec<(Source, i64, i64)> {
    let (from, to) = (ms(from), ms(to));
    if from >= to {
        return vec![];
    }
    let first_hour = match from % HOUR_MS {
        0 => from,
        r => from.saturating_add(HOUR_MS - r),
    };
    let last_hour = to - to % HOUR_MS;
    if first_hour >= last_hour {
        return vec![(Source::Records, from, to)];
    }
    [
        (Source::Records, from, first_hour),
        (Source::Hours, first_hour, last_hour),
        (Source::Records, last_hour, to),
    ]
    .into_iter()
    .filter(|(_, a, b)| a < b)
    .collect()
}

fn sum_sql(source: Source, who: Who, grouped: bool) -> String {
    let (table, time, first, count) = match source {
        Source::Records => ("records", "finished_ms", "finished_ms", "count(*)"),
        Source::Hours => ("usage_hours", "hour", "first_ms", "sum(requests)"),
    };
    let filter = match who {
        Who::All => " AND ?3 IS NULL",
        Who::Tenant(_) => " AND tenant = ?3",
        Who::Tier(_) => " AND tier = ?3",
    };
    // With exactly one min(), SQLite takes the bare `tier` from that row: the tier of the
    // tenant's first use in the piece.
    let (cols, group) = if grouped {
        ("tenant, tier", " GROUP BY tenant")
    } else {
        ("NULL, NULL", "")
    };
    format!(
        "SELECT {cols}, min({first}), coalesce({count}, 0), coalesce(sum(input_tokens), 0), \
         coalesce(sum(output_tokens), 0), coalesce(sum(device_seconds), 0.0) FROM {table} \
         WHERE {time} >= ?1 AND {time} < ?2{filter}{group}"
    )
}

fn who_param(who: Who<'_>) -> Option<&str> {
    match who {
        Who::All => None,
        Who::Tenant(t) | Who::Tier(t) => Some(t),
    }
}

/// Usage per tenant in `[from, to)` (sorted by tenant), summed in SQL over the records at
/// the period's ragged ends and the hourly rollup in between, in one read transaction.
pub fn usage(conn: &mut Connection, who: Who, from: u64, to: u64) -> rusqlite::Result<Vec<Usage>> {
    let tx = conn.transaction()?;
    let mut by: BTreeMap<String, Usage> = BTreeMap::new();
    for (source, a, b) in pieces(from, to) {
        let mut stmt = tx.prepare_cached(&sum_sql(source, who, true))?;
        let mut rows = stmt.query(params![a, b, who_param(who)])?;
        while let Some(r) = rows.next()? {
            let tenant: String = r.get(0)?;
            let u = by.entry(tenant.clone()).or_insert_with(|| Usage {
                tenant,
                ..Default::default()
            });
            if u.tier.is_empty() {
                u.tier = r.get(1)?;
            }
            u.requests += r.get::<_, i64>(3)? as u64;
            u.input_tokens += r.get::<_, i64>(4)? as u64;
            u.output_tokens += r.get::<_, i64>(5)? as u64;
            u.device_seconds += r.get::<_, f64>(6)?;
        }
    }
    Ok(by.into_values().filter(|u| u.requests > 0).collect())
}

/// Requests and tokens (input and output) of `who` in `[from, to)`.
pub fn totals(conn: &mut Connection, who: Who, from: u64, to: u64) -> rusqlite::Result<(u64, u64)> {
    let tx = conn.transaction()?;
    let mut sum = (0, 0);
    for (source, a, b) in pieces(from, to) {
        let mut stmt = tx.prepare_cached(&sum_sql(source, who, false))?;
        let (n, i, o): (i64, i64, i64) = stmt.query_row(params![a, b, who_param(who)], |r| {
            Ok((r.get(3)?, r.get(4)?, r.get(5)?))
        })?;
        sum.0 += n as u64;
        sum.1 += (i + o) as u64;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_is_cut_into_whole_hours_and_ragged_ends() {
        let h = HOUR_MS as u64;
        assert_eq!(pieces(0, 3 * h), [(Source::Hours, 0, 3 * HOUR_MS)]);
        assert_eq!(
            pieces(10, 2 * h + 5),
            [
                (Source::Records, 10, HOUR_MS),
                (Source::Hours, HOUR_MS, 2 * HOUR_MS),
                (Source::Records, 2 * HOUR_MS, 2 * HOUR_MS + 5)
            ]
        );
        assert_eq!(pieces(10, 20), [(Source::Records, 10, 20)]);
        assert_eq!(pieces(20, 10), []);
        let all = pieces(0, u64::MAX);
        assert_eq!(all.last().unwrap(), &(Source::Records, all[0].2, i64::MAX));
    }
}
