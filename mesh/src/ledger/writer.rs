//! Group commit: one thread owns the ledger's write connection and commits every record
//! waiting for it in one transaction, then answers each writer once its record is durable.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    mpsc, Arc,
};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::{sqlite, Record};

/// Most records one transaction takes.
const MAX_BATCH: usize = 4096;

/// What waits for the writer.
enum Job {
    /// One finished request's record: answered once committed (a known id is refused).
    Append(Record, oneshot::Sender<Result<(), String>>),
    /// Records taken over from elsewhere: those with a known id are skipped; answered with
    /// how many were new.
    Import(Vec<Record>, oneshot::Sender<Result<u64, String>>),
    /// Every record up to this rowid is in the shared ledger: the outbox's watermark moves
    /// there (never back).
    Shipped(i64, oneshot::Sender<Result<(), String>>),
}

/// Records and transactions committed since the ledger opened.
#[derive(Debug, Default)]
pub struct Counters {
    pub records: AtomicU64,
    pub commits: AtomicU64,
}

/// The cloneable way to the writer thread; it ends when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    pub counters: Arc<Counters>,
}

fn stopped<T>(_: T) -> String {
    "the ledger's writer has stopped".to_string()
}

impl Writer {
    pub fn start(conn: Connection) -> std::io::Result<Writer> {
        let (jobs, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || run(conn, rx, &c))?;
        Ok(Writer { jobs, counters })
    }

    /// Queue a record; the receiver answers once it is committed (or why not).
    pub fn append(&self, record: Record) -> Result<oneshot::Receiver<Result<(), String>>, String> {
        let (done, wait) = oneshot::channel();
        self.jobs.send(Job::Append(record, done)).map_err(stopped)?;
        Ok(wait)
    }

    /// Import records in one transaction (blocking); returns how many were new.
    pub fn import(&self, records: Vec<Record>) -> Result<u64, String> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job::Import(records, done))
            .map_err(stopped)?;
        wait.blocking_recv().map_err(stopped)?
    }

    /// Move the outbox's watermark up to `seq`; the receiver answers once committed.
    pub fn shipped(&self, seq: i64) -> Result<oneshot::Receiver<Result<(), String>>, String> {
        let (done, wait) = oneshot::channel();
        self.jobs.send(Job::Shipped(seq, done)).map_err(stopped)?;
        Ok(wait)
    }
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Job>, counters: &Counters) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        commit(&mut conn, jobs, counters);
    }
}

/// What one job came to inside the transaction, answered only after the commit.
enum Outcome {
    Appended(Result<(), String>),
    Imported(Result<u64, String>),
    Marked(Result<(), String>),
}

/// Apply every job in one transaction and commit it; then answer each job. A job that fails
/// on its own (a known id) fails alone; a failed commit fails them all.
fn commit(conn: &mut Connection, jobs: Vec<Job>, counters: &Counters) {
    let result = (|| -> rusqlite::Result<(Vec<Outcome>, u64)> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut added = 0;
        let outcomes = jobs
            .iter()
            .map(|job| match job {
                Job::Append(r, _) => Outcome::Appended(match sqlite::insert(&tx, r, false) {
                    Ok(_) => {
                        added += 1;
                        Ok(())
                    }
                    Err(e) => Err(format!("record {:?} not written: {e}", r.id)),
                }),
                Job::Import(rs, _) => Outcome::Imported(
                    rs.iter()
                        .try_fold(0, |n, r| sqlite::insert(&tx, r, true).map(|k| n + k as u64))
                        .inspect(|n| added += n)
                        .map_err(|e| format!("import failed: {e}")),
                ),
                Job::Shipped(seq, _) => Outcome::Marked(
                    mark(&tx, *seq).map_err(|e| format!("the watermark did not move: {e}")),
                ),
            })
            .collect();
        tx.commit()?;
        Ok((outcomes, added))
    })();
    match result {
        Ok((outcomes, added)) => {
            counters.records.fetch_add(added, Ordering::Relaxed);
            counters.commits.fetch_add(1, Ordering::Relaxed);
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                match (job, outcome) {
                    (Job::Append(_, done), Outcome::Appended(r)) => drop(done.send(r)),
                    (Job::Import(_, done), Outcome::Imported(r)) => drop(done.send(r)),
                    (Job::Shipped(_, done), Outcome::Marked(r)) => drop(done.send(r)),
                    _ => unreachable!("one outcome per job, in order"),
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, records = jobs.len(), "The ledger could not commit");
            let why = format!("the ledger could not commit: {e}");
            for job in jobs {
                match job {
                    Job::Append(_, done) => drop(done.send(Err(why.clone()))),
                    Job::Import(_, done) => drop(done.send(Err(why.clone()))),
                    Job::Shipped(_, done) => drop(done.send(Err(why.clone()))),
                }
            }
        }
    }
}

/// Move the outbox's watermark up to `seq` (a lower one leaves it).
fn mark(conn: &Connection, seq: i64) -> rusqlite::Result<()> {
    if super::outbox::shipped(conn)? < seq {
        sqlite::set_meta(conn, super::outbox::SHIPPED, seq)?;
    }
    Ok(())
}
