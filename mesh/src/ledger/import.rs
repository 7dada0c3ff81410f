//! The one-time import of a JSON-lines ledger (`ledger.jsonl`, one record per line, as the
//! agent kept it before SQLite) into the database; the file itself is left as it was.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use anyhow::Context;
use rusqlite::Connection;

use super::{record::Record, sqlite};

/// The file the agent kept its records in before.
pub const JSONL: &str = "ledger.jsonl";
/// `meta` key: the size of `ledger.jsonl` when it was last imported whole.
const IMPORTED_BYTES: &str = "jsonl_imported_bytes";
/// Records per transaction of an import.
const CHUNK: usize = 50_000;

/// What an import did.
#[derive(Debug, Default, PartialEq)]
pub struct Imported {
    /// Records new to the database.
    pub added: u64,
    /// Records read (new and already known).
    pub read: u64,
    /// Lines that were no record (a torn last line of a crash, or damage), skipped.
    pub skipped: u64,
}

/// Import `state_dir/ledger.jsonl` if it is there and not imported yet at its current size.
/// Idempotent: a record whose id the database knows is skipped, so a second import (or one
/// cut short by a crash and run again) adds nothing twice.
pub fn jsonl_once(conn: &mut Connection, state_dir: &Path) -> anyhow::Result<Option<Imported>> {
    let path = state_dir.join(JSONL);
    let size = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let done = sqlite::meta(conn, IMPORTED_BYTES)?;
    if done == Some(sqlite::ms(size)) {
        return Ok(None);
    }
    let file = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let got = import(conn, BufReader::new(file), size)
        .with_context(|| format!("cannot import {}", path.display()))?;
    tracing::info!(
        file = %path.display(),
        added = got.added,
        read = got.read,
        skipped = got.skipped,
        "Imported the JSON-lines ledger"
    );
    Ok(Some(got))
}

fn import(conn: &mut Connection, lines: impl BufRead, size: u64) -> anyhow::Result<Imported> {
    let mut got = Imported::default();
    let mut chunk: Vec<Record> = Vec::with_capacity(CHUNK);
    for line in lines.split(b'\n') {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) => chunk.push(r),
            Err(_) => got.skipped += 1,
        }
        if chunk.len() == CHUNK {
            got.added += commit(conn, &chunk, None)?;
            got.read += chunk.len() as u64;
            chunk.clear();
        }
    }
    got.read += chunk.len() as u64;
    got.added += commit(conn, &chunk, Some(size))?;
    Ok(got)
}

/// One transaction of records; the last also notes the file as imported.
fn commit(conn: &mut Connection, records: &[Record], done: Option<u64>) -> anyhow::Result<u64> {
    let tx = conn.transaction()?;
    let mut added = 0;
    for r in records {
        added += sqlite::insert(&tx, r, true)? as u64;
    }
    if let Some(size) = done {
        sqlite::set_meta(&tx, IMPORTED_BYTES, sqlite::ms(size))?;
    }
    tx.commit()?;
    Ok(added)
}
