//! Shipping lag of the shared ledger under a steady record rate: a node's ledger (SQLite, in a
//! temporary directory) takes `RATE` durable records per second for `SECONDS`, its shipper
//! moves them to the PostgreSQL at `URL` as the agent's does, and each record's lag — from its
//! append returning (durable locally) to its row being in PostgreSQL — is measured by polling
//! the rows shipped every 10 ms:
//! `cargo run --release -p flatmesh --example ledger_ship_bench -- URL [RATE] [SECONDS]`
//! (defaults: 1000 records/s for 20 s). `tests/bench/ledger_pg.py --ship-rate 1000` starts a
//! PostgreSQL and runs it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use flatmesh::{
    ledger::{shipper, Ledger, LedgerConfig, Record},
    metrics::Metrics,
    util::now_ms,
};
use parking_lot::Mutex;

fn record(i: u64) -> Record {
    let at = now_ms();
    Record {
        id: format!("ship-bench-{i:010}"),
        client_id: None,
        tenant: format!("city-{}", i % 100),
        tier: ["gold", "basic"][(i % 2) as usize].into(),
        model: "smollm2-135m-instruct".into(),
        endpoint: "chat_completions".into(),
        input_tokens: 20 + i % 50,
        output_tokens: 10 + i % 200,
        device_seconds: 0.25,
        cache_hit: false,
        started_ms: at.saturating_sub(250),
        finished_ms: at,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("usage: ledger_ship_bench POSTGRES_URL [RATE] [SECONDS]"))?;
    let rate: u64 = args.get(2).map_or(Ok(1000), |s| s.parse())?;
    let seconds: u64 = args.get(3).map_or(Ok(20), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(dir.path())?;
    let config = LedgerConfig {
        postgres: Some(url.clone()),
        ..Default::default()
    };
    let shared = ledger.share(&config, "ship-bench")?;
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let shipping = tokio::spawn(shipper::run(ledger.clone(), shared, metrics.clone(), stop));

    // Polls how many of this origin's rows PostgreSQL holds; shipping follows the outbox's
    // order, so n rows there are the first n records committed.
    let (mut target, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    flatmesh::ledger::postgres::migrate(&mut target).await?;
    let origin = ledger.origin();
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let total = rate * seconds;
    let poller = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let n: i64 = target
                    .query_one(
                        "SELECT count(*) FROM flatmesh_ledger_records WHERE origin = $1",
                        &[&origin],
                    )
                    .await?
                    .get(0);
                let now = Instant::now();
                let all = {
                    let mut s = seen.lock();
                    while (s.len() as i64) < n {
                        s.push(now);
                    }
                    s.len() as u64 >= total
                };
                if all {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // The records, at a steady rate; each append returns once it is durable. The order they
    // became durable in is the order their rows are shipped in.
    let durable: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let started = Instant::now();
    let mut writers = Vec::new();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (ledger, durable) = (ledger.clone(), durable.clone());
        writers.push(tokio::spawn(async move {
            ledger.append(record(i)).await?;
            durable.lock().push(Instant::now());
            std::io::Result::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let wrote = started.elapsed().as_secs_f64();
    let backlog_at_end = ledger.backlog()?.records;
    tokio::time::timeout(Duration::from_secs(60), poller).await???;
    let drained = started.elapsed().as_secs_f64() - wrote;
    let _ = stop_tx.send(());
    shipping.await?;

    let durable = durable.lock().clone();
    let mut lags: Vec<f64> = durable
        .iter()
        .zip(seen.lock().iter())
        .map(|(d, s)| s.saturating_duration_since(*d).as_secs_f64() * 1000.0)
        .collect();
    lags.sort_by(f64::total_cmp);
    println!(
        "{total} records at {rate}/s for {seconds} s (written in {wrote:.1} s, {:.0}/s), \
         ship_interval {:?}",
        total as f64 / wrote,
        config.ship_interval.0
    );
    println!(
        "  lag, durable locally to row in PostgreSQL (ms): p50 {:.0}  p99 {:.0}  max {:.0}",
        pct(&lags, 50.0),
        pct(&lags, 99.0),
        pct(&lags, 100.0)
    );
    println!(
        "  records waiting when the writing stopped: {backlog_at_end}; all in PostgreSQL \
         {drained:.2} s after"
    );
    Ok(())
}
