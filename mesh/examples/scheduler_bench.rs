//! Scheduler figures: the cost of taking and returning an execution slot, and the shares two
//! saturating tiers get.
//!
//! `cargo run --release -p flatmesh --example scheduler_bench`

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use flatmesh::{metrics::Metrics, scheduler::Scheduler};

#[tokio::main]
async fn main() {
    let s = Scheduler::new(4, 1024, Duration::from_secs(60), Metrics::new());
    let n = 1_000_000;
    let t = Instant::now();
    for _ in 0..n {
        drop(s.acquire("gold", 3).await.expect("slot"));
    }
    let per = t.elapsed().as_nanos() as f64 / n as f64;
    println!("uncontended acquire + release: {per:.0} ns per request");

    // Contention: one slot, 8 clients per tier, each holding the slot for ~200 µs of work.
    let s = Scheduler::new(1, 1024, Duration::from_secs(60), Metrics::new());
    let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::default()).collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for (i, (tier, weight)) in [("gold", 3u32), ("basic", 1)].into_iter().enumerate() {
        for _ in 0..8 {
            let (s, count) = (s.clone(), counts[i].clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let _slot = s.acquire(tier, weight).await.expect("slot");
                    let work = Instant::now();
                    while work.elapsed() < Duration::from_micros(200) {
                        std::hint::spin_loop();
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let (g, b) = (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
    );
    println!(
        "contended shares, weights 3:1, one slot: gold {g}, basic {b}, ratio {:.2} (ideal 3.00)",
        g as f64 / b as f64
    );
}
