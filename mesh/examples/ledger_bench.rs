//! Durable ledger records per second with 64 concurrent writers — the JSON-lines file of
//! before (one `fsync` per record, kept here for the comparison only) against the SQLite
//! ledger's group commit — and the latency of a month's invoice over generated ledgers:
//! `cargo run --release -p flatmesh --example ledger_bench [-- SECONDS [RECORDS...]]`
//! (defaults: 5 s per writer run; invoices at 1000000 and 10000000 records). The files go to
//! a temporary directory under `$TMPDIR` (10M records take about 3 GB).

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use flatmesh::ledger::{Ledger, Record};
use parking_lot::Mutex;

const WRITERS: usize = 64;

fn record(i: u64, at: u64) -> Record {
    Record {
        id: format!("req-{i:012}"),
        client_id: None,
        tenant: format!("city-{}", i % 100),
        tier: ["gold", "basic", "metered"][(i % 3) as usize].into(),
        model: "smollm2-135m-instruct".into(),
        endpoint: "chat_completions".into(),
        input_tokens: 20 + i % 50,
        output_tokens: 10 + i % 200,
        device_seconds: 0.25,
        cache_hit: i.is_multiple_of(7),
        started_ms: at.saturating_sub(250),
        finished_ms: at,
    }
}

/// The ledger of before: one JSON line per record, appended under a lock and `fsync`'d, from
/// a blocking thread of the async runtime.
#[derive(Clone)]
struct JsonLines(Arc<Mutex<File>>);

impl JsonLines {
    fn append_blocking(&self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let mut f = self.0.lock();
        f.write_all(&line)?;
        f.sync_data()
    }

    async fn append(&self, record: Record) -> std::io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.append_blocking(&record))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// Records per second that `append` made durable, `WRITERS` tasks appending for `secs`.
async fn rate<F, Fut>(secs: u64, append: F) -> f64
where
    F: Fn(Record) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS as u64)
        .map(|w| {
            let (append, done, stop) = (append.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = w << 40;
                while !stop.load(Ordering::Relaxed) {
                    append(record(i, flatmesh::ledger::now_ms()))
                        .await
                        .expect("append");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

async fn json_lines_rate(dir: &Path, secs: u64) -> f64 {
    std::fs::create_dir_all(dir).expect("dir");
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ledger.jsonl"))
        .expect("open");
    let jl = JsonLines(Arc::new(Mutex::new(file)));
    rate(secs, move |r| {
        let jl = jl.clone();
        async move { jl.append(r).await }
    })
    .await
}

async fn sqlite_rate(dir: &Path, secs: u64) -> (f64, f64) {
    let ledger = Ledger::open(dir).expect("open");
    let l = ledger.clone();
    let rate = rate(secs, move |r| {
        let l = l.clone();
        async move { l.append(r).await }
    })
    .await;
    let stats = ledger.stats();
    (rate, stats.records as f64 / stats.commits.max(1) as f64)
}

/// A ledger of `n` records spread evenly over March 2026 (UTC), and the latency of its
/// invoice query for the month (best of 3), and for a period not on hour bounds.
fn invoice_latency(dir: &Path, n: u64) {
    const MARCH: u64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z
    const APRIL: u64 = 1_775_001_600_000; // 2026-04-01T00:00:00Z
    let started = Instant::now();
    let ledger = Ledger::open(dir).expect("open");
    let step = (APRIL - MARCH) / n;
    let mut i = 0;
    while i < n {
        let batch: Vec<Record> = (i..(i + 100_000).min(n))
            .map(|j| record(j, MARCH + j * step))
            .collect();
        i += batch.len() as u64;
        ledger.import(&batch).expect("import");
    }
    let filled = started.elapsed();
    let time = |from: u64, to: u64| {
        let mut best = Duration::MAX;
        let mut tenants = 0;
        for _ in 0..3 {
            let t = Instant::now();
            let usage = ledger.usage(None, from, to).expect("usage");
            best = best.min(t.elapsed());
            tenants = usage.len();
            assert!(usage.iter().map(|u| u.requests).sum::<u64>() > 0);
        }
        (best, tenants)
    };
    let (month, tenants) = time(MARCH, APRIL);
    let (ragged, _) = time(MARCH + 1_234_567, APRIL - 7_654_321);
    let t = Instant::now();
    let tier = ledger.tier_totals("gold", MARCH, APRIL).expect("tier");
    let tier_time = t.elapsed();
    println!(
        "invoice, {n} records in the month ({tenants} tenants): {:.1} ms; a period off the hour \
         bounds: {:.1} ms; one tier's month ({} requests): {:.1} ms  [ledger filled in {:.0} s]",
        month.as_secs_f64() * 1e3,
        ragged.as_secs_f64() * 1e3,
        tier.0,
        tier_time.as_secs_f64() * 1e3,
        filled.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args.first().map_or(5, |s| s.parse().expect("SECONDS"));
    let sizes: Vec<u64> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|s| s.parse().expect("RECORDS"))
            .collect()
    } else {
        vec![1_000_000, 10_000_000]
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let jl = json_lines_rate(&dir.path().join("jsonl"), secs).await;
    println!("JSON lines, fsync per record, {WRITERS} writers: {jl:.0} durable records/s");
    let (sq, batch) = sqlite_rate(&dir.path().join("sqlite"), secs).await;
    println!(
        "SQLite group commit, {WRITERS} writers: {sq:.0} durable records/s ({batch:.1} records \
         per commit, {:.1}x the JSON lines)",
        sq / jl
    );
    for n in sizes {
        let d = dir.path().join(format!("invoice-{n}"));
        tokio::task::block_in_place(|| invoice_latency(&d, n));
    }
}
