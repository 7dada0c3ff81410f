//! Residency figures: hit ratio and mean added latency (load seconds of misses per request)
//! of LRU, the built-in demand policy (`cache::residency::Demand`, the code the agent runs)
//! and Belady's offline optimum, on traces over 120 models of mixed sizes and load costs
//! with room for about 12: Zipf s = 0.8, 1.0, 1.2; a popular set that moves every 300
//! requests; and a scan (one-off models mixed into steady Zipf traffic). Rows marked `=`
//! repeat a trace with every model the same size and load time.
//!
//! `cargo run --release -p flatmesh --example residency_bench [requests] [seeds]`

use std::collections::HashMap;

use flatmesh::cache::residency::Demand;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A model: bytes (GB) and seconds to load it.
#[derive(Clone, Copy)]
struct Model {
    gb: f64,
    load: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Lru,
    Demand,
    Belady,
}

fn zipf(rng: &mut StdRng, models: usize, n: usize, s: f64) -> Vec<usize> {
    let w: Vec<f64> = (0..models)
        .map(|k| 1.0 / ((k + 1) as f64).powf(s))
        .collect();
    let total: f64 = w.iter().sum();
    let mut order: Vec<usize> = (0..models).collect();
    for i in (1..models).rev() {
        order.swap(i, rng.random_range(0..=i)); // popularity unrelated to the id
    }
    (0..n)
        .map(|_| {
            let mut x = rng.random::<f64>() * total;
            let k = w.iter().position(|p| {
                x -= p;
                x <= 0.0
            });
            order[k.unwrap_or(models - 1)]
        })
        .collect()
}

fn shifting(rng: &mut StdRng, models: usize, n: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let hot: Vec<usize> = (0..10).map(|_| rng.random_range(0..models)).collect();
        for _ in 0..300 {
            out.push(if rng.random::<f64>() < 0.8 {
                hot[rng.random_range(0..hot.len())]
            } else {
                rng.random_range(0..models)
            });
        }
    }
    out.truncate(n);
    out
}

/// Steady Zipf traffic with one-off requests for never-seen models mixed in (30%).
fn scan(rng: &mut StdRng, models: usize, n: usize) -> Vec<usize> {
    let mut next = models;
    let mut out = Vec::new();
    for m in zipf(rng, models, n, 1.0) {
        out.push(m);
        if rng.random::<f64>() < 0.3 {
            out.push(next);
            next += 1;
        }
    }
    out
}

/// (hit ratio, mean load seconds added per request)
fn run(trace: &[usize], models: &[Model], room: f64, policy: Policy) -> (f64, f64) {
    let mut next_use = vec![usize::MAX; trace.len()];
    let mut last = HashMap::new();
    for i in (0..trace.len()).rev() {
        next_use[i] = *last.get(&trace[i]).unwrap_or(&usize::MAX);
        last.insert(trace[i], i);
    }
    let mut demand = Demand::default();
    let mut resident: HashMap<usize, usize> = HashMap::new(); // model → last use or next use
    let (mut used, mut hits, mut added) = (0.0, 0usize, 0.0);
    for (i, &m) in trace.iter().enumerate() {
        let key = m.to_string();
        demand.request(&key);
        if resident.contains_key(&m) {
            hits += 1;
        } else {
            added += models[m].load;
            while used + models[m].gb > room && !resident.is_empty() {
                let victim = match policy {
                    Policy::Lru => *resident.iter().min_by_key(|(_, &t)| t).unwrap().0,
                    Policy::Belady => *resident.iter().max_by_key(|(_, &t)| t).unwrap().0,
                    Policy::Demand => *resident
                        .keys()
                        .min_by(|a, b| {
                            let v = |k: usize| {
                                let bytes = (models[k].gb * 1e9) as u64;
                                demand.value(&k.to_string(), bytes, Some(models[k].load))
                            };
                            v(**a).total_cmp(&v(**b))
                        })
                        .unwrap(),
                };
                used -= models[victim].gb;
                resident.remove(&victim);
            }
            used += models[m].gb;
        }
        let stamp = if policy == Policy::Belady {
            next_use[i]
        } else {
            i
        };
        resident.insert(m, stamp);
    }
    let n = trace.len() as f64;
    (hits as f64 / n, added / n)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4000);
    let seeds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let n_models = 120;
    println!("{requests} requests per trace, {n_models} models of 0.1-4 GB (load 0.28-3.4 s), room for ~12, mean of {seeds} seeds");
    println!(
        "{:<10} {:>8} {:>8} {:>8}   {:>7} {:>7}   {:>8} {:>8} {:>8}",
        "trace", "LRU", "demand", "Belady", "d/B", "L/B", "LRU s", "demand s", "Belady s"
    );
    let names = [
        "zipf-0.8",
        "zipf-1.0",
        "zipf-1.2",
        "shifting",
        "scan",
        "zipf-1.0 =",
        "shifting =",
    ];
    let mut sums = vec![[0.0f64; 6]; names.len()];
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut models: Vec<Model> = (0..n_models)
            .map(|_| {
                let gb = [0.1, 0.3, 1.0, 1.0, 2.0, 4.0][rng.random_range(0..6)];
                let load = gb * 0.8 + 0.2 + rng.random::<f64>() * 0.1;
                Model { gb, load }
            })
            .collect();
        let room = models.iter().map(|m| m.gb).sum::<f64>() / n_models as f64 * 12.0;
        let traces = [
            zipf(&mut rng, n_models, requests, 0.8),
            zipf(&mut rng, n_models, requests, 1.0),
            zipf(&mut rng, n_models, requests, 1.2),
            shifting(&mut rng, n_models, requests),
            scan(&mut rng, n_models, requests),
        ];
        let extra = traces[4].iter().max().copied().unwrap_or(0) + 1;
        while models.len() < extra {
            let m = models[rng.random_range(0..n_models)];
            models.push(m);
        }
        // The last two rows: every model the same size and load time (room for exactly 12).
        let same = vec![Model { gb: 1.0, load: 1.0 }; models.len()];
        let runs = traces
            .iter()
            .map(|t| (t, &models, room))
            .chain([(&traces[1], &same, 12.0), (&traces[3], &same, 12.0)]);
        for (t, (trace, models, room)) in runs.enumerate() {
            for (p, policy) in [Policy::Lru, Policy::Demand, Policy::Belady]
                .into_iter()
                .enumerate()
            {
                let (hit, secs) = run(trace, models, room, policy);
                sums[t][p] += hit / seeds as f64;
                sums[t][p + 3] += secs / seeds as f64;
            }
        }
    }
    for (name, s) in names.iter().zip(&sums) {
        println!(
            "{:<10} {:>8.3} {:>8.3} {:>8.3}   {:>7.2} {:>7.2}   {:>8.3} {:>8.3} {:>8.3}",
            name,
            s[0],
            s[1],
            s[2],
            s[1] / s[2],
            s[0] / s[2],
            s[3],
            s[4],
            s[5]
        );
    }
}
