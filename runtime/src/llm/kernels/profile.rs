//! Per-operation timers of the CPU backend: where a decode step and a prefill chunk spend
//! their time. Off by default; when off, each operation pays one relaxed atomic load.
//!
//! `llm_bench --profile` turns them on, runs, and prints a [`Snapshot`]. Times of work split
//! over the worker pool count once per wall-clock second: the busy time of all workers
//! divided by the worker count goes to the operation, and the rest of the parallel region's
//! wall time (hand-off, waiting for the slowest worker, join) goes to [`Op::Pool`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// A class of operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Quantized (or float) matrix × activation rows, including the output head.
    MatVec,
    /// Quantizing activation rows to the weights' activation format.
    Quantize,
    /// Writing K/V to the cache and attention over it.
    Attention,
    /// Embedding lookup, RMSNorm, RoPE, SiLU·mul, residual adds, bias, transposes.
    Elementwise,
    /// Worker-pool hand-off and join of the matmuls (wall time beyond the workers' busy share).
    Pool,
}

impl Op {
    /// Every class, in print order.
    pub const ALL: [Op; 5] = [
        Op::MatVec,
        Op::Quantize,
        Op::Attention,
        Op::Elementwise,
        Op::Pool,
    ];

    /// A short label.
    pub fn name(self) -> &'static str {
        match self {
            Op::MatVec => "matvec",
            Op::Quantize => "act_quantize",
            Op::Attention => "attention",
            Op::Elementwise => "norm_rope_silu_add",
            Op::Pool => "pool_dispatch_join",
        }
    }
}

/// Decode steps (one token) or prefill chunks (several).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Decode,
    Prefill,
}

impl Phase {
    /// The phase of a forward step of `tokens` tokens.
    pub fn of(tokens: usize) -> Phase {
        if tokens <= 1 {
            Phase::Decode
        } else {
            Phase::Prefill
        }
    }
}

const OPS: usize = Op::ALL.len();

struct Counters {
    ns: [AtomicU64; OPS],
    /// Wall time of whole forward steps.
    forward_ns: AtomicU64,
    steps: AtomicU64,
    tokens: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const COUNTERS: Counters = Counters {
    ns: [ZERO; OPS],
    forward_ns: ZERO,
    steps: ZERO,
    tokens: ZERO,
};

static ON: AtomicBool = AtomicBool::new(false);
static PHASES: [Counters; 2] = [COUNTERS, COUNTERS];

/// Turn the timers on or off (process-wide).
pub fn enable(on: bool) {
    ON.store(on, Relaxed);
}

/// Whether the timers are on.
#[inline]
pub fn enabled() -> bool {
    ON.load(Relaxed)
}

/// A start time when the timers are on.
#[inline]
pub fn start() -> Option<Instant> {
    if enabled() {
        Some(Instant::now())
    } else {
        None
    }
}

/// Nanoseconds since `t` (0 when off).
#[inline]
pub fn since(t: Option<Instant>) -> u64 {
    t.map_or(0, |t| t.elapsed().as_nanos() as u64)
}

/// Add `ns` to `op` of `phase`.
#[inline]
pub fn add_ns(phase: Phase, op: Op, ns: u64) {
    if ns > 0 {
        PHASES[phase as usize].ns[op as usize].fetch_add(ns, Relaxed);
    }
}

/// Add the time since `t` to `op` of `phase`.
#[inline]
pub fn add(phase: Phase, op: Op, t: Option<Instant>) {
    add_ns(phase, op, since(t));
}

/// Count one forward step of `tokens` tokens that took the time since `t`.
pub fn step(phase: Phase, tokens: usize, t: Option<Instant>) {
    if let Some(t) = t {
        let c = &PHASES[phase as usize];
        c.forward_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        c.steps.fetch_add(1, Relaxed);
        c.tokens.fetch_add(tokens as u64, Relaxed);
    }
}

/// Zero every counter.
pub fn reset() {
    for c in &PHASES {
        for n in &c.ns {
            n.store(0, Relaxed);
        }
        c.forward_ns.store(0, Relaxed);
        c.steps.store(0, Relaxed);
        c.tokens.store(0, Relaxed);
    }
}

/// Totals of one phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub steps: u64,
    pub tokens: u64,
    /// Wall time of the forward steps.
    pub forward_ns: u64,
    /// Per [`Op::ALL`] entry.
    pub ns: [u64; OPS],
}

impl Totals {
    /// Time of `op`.
    pub fn get(&self, op: Op) -> u64 {
        self.ns[op as usize]
    }
}

/// Totals of both phases.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub decode: Totals,
    pub prefill: Totals,
}

/// Read the counters.
pub fn snapshot() -> Snapshot {
    let read = |c: &Counters| Totals {
        steps: c.steps.load(Relaxed),
        tokens: c.tokens.load(Relaxed),
        forward_ns: c.forward_ns.load(Relaxed),
        ns: std::array::from_fn(|i| c.ns[i].load(Relaxed)),
    };
    Snapshot {
        decode: read(&PHASES[0]),
        prefill: read(&PHASES[1]),
    }
}
