//! The engine's step loop over the emulated GPU backend against the same loop over the CPU
//! backend: continuous batching of sequences of different lengths, the KV cache held by the
//! backend (block copies for shared blocks included), tokens sampled by the device's
//! `sample` kernel. What the `Cuda` backend is driven by, checked in CI without a GPU.

use std::sync::{atomic::AtomicBool, mpsc, Arc};

use super::emu::Emu;
use crate::device::Lane;
use crate::llm::{
    batch::{BatchConfig, SeqEvent, StepBackend, StepLoop, Submit},
    cpu::Cpu,
    fixture,
    kernels::QType,
    kv::KvPool,
};
use crate::SamplingParams;

const CONFIG: BatchConfig = BatchConfig {
    kv_tokens: 96,
    block_tokens: 4,
    step_tokens: 8,
    prefix_cache: true,
};

/// One request: its prompt, tokens to generate, choices.
struct Req {
    prompt: Vec<u32>,
    max_tokens: usize,
    n: usize,
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..Default::default()
    }
}

/// Every request submitted at once to a step loop over `backend`; each request's tokens by
/// choice, in the order they came.
fn run<B: StepBackend>(backend: B, q: QType, lane: Lane, reqs: &[Req]) -> Vec<Vec<Vec<u32>>> {
    let model = Arc::new(fixture::model(q, 5, false));
    let step = StepLoop::new(model, backend, lane, CONFIG, vec![]);
    let (tx, rx) = mpsc::channel();
    let looper = std::thread::spawn(move || step.run(rx));
    let waits: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (events, got) = mpsc::channel();
            tx.send(Submit {
                prompt: r.prompt.clone(),
                max_tokens: r.max_tokens,
                sampling: greedy(),
                n: r.n,
                logprobs: None,
                events,
                cancel: Arc::new(AtomicBool::new(false)),
                stopped: (0..r.n).map(|_| AtomicBool::new(false)).collect(),
                constraint: None,
            })
            .unwrap();
            (got, r.n)
        })
        .collect();
    let out = waits
        .into_iter()
        .map(|(got, n)| {
            let mut tokens = vec![Vec::new(); n];
            let mut open = n;
            while open > 0 {
                match got.recv().expect("the step loop answers") {
                    SeqEvent::Token { choice, token, .. } => tokens[choice].push(token),
                    SeqEvent::Done { .. } => open -= 1,
                    SeqEvent::Reused(_) => {}
                    SeqEvent::Failed(e) => panic!("a sequence failed: {e}"),
                }
            }
            tokens
        })
        .collect();
    drop(tx);
    looper.join().unwrap();
    out
}

fn requests() -> Vec<Req> {
    let p = |n: usize, s: u32| (0..n as u32).map(|i| (i * 37 + s) % 290 + 1).collect();
    vec![
        Req {
            prompt: p(9, 3),
            max_tokens: 6,
            n: 1,
        },
        Req {
            prompt: p(1, 8),
            max_tokens: 9,
            n: 1,
        },
        // Two choices of one prompt share its blocks: the shared last block is copied
        // before either writes it (a block copy the backend makes).
        Req {
            prompt: p(6, 11),
            max_tokens: 5,
            n: 2,
        },
        // The first request's prompt again: its full blocks come from the prefix cache.
        Req {
            prompt: p(9, 3),
            max_tokens: 4,
            n: 1,
        },
    ]
}

#[test]
fn the_step_loop_over_the_emulated_gpu_gives_the_cpus_greedy_tokens() {
    for q in [QType::Q4_0, QType::Q8_0, QType::Q4K, QType::Q6K, QType::F16] {
        let m = fixture::model(q, 5, false);
        let (layers, kv_dim) = (m.shape.layers, m.shape.kv_dim());
        let pool = || {
            KvPool::new(CONFIG.kv_tokens, CONFIG.block_tokens, layers, kv_dim)
                .with_prefix_cache(true)
        };
        let cpu = run(Cpu::new(pool(), 1), q, Lane::new(), &requests());
        let blocks = KvPool::blocks_only(CONFIG.kv_tokens, CONFIG.block_tokens, layers, kv_dim)
            .with_prefix_cache(true);
        let emu = run(
            Emu::with_pool(blocks, layers, kv_dim),
            q,
            Lane::gpu(),
            &requests(),
        );
        assert_eq!(emu, cpu, "{}: greedy tokens differ", q.name());
        assert_eq!(cpu[0][0].len(), 6);
        assert_eq!(cpu[2].len(), 2);
        assert_eq!(cpu[2][0], cpu[2][1], "greedy choices of one prompt agree");
    }
}

#[test]
fn a_blocks_only_pool_records_block_copies_instead_of_making_them() {
    let mut pool = KvPool::blocks_only(16, 4, 2, 8);
    let mut a = crate::llm::kv::BlockTable::default();
    assert!(pool.grow(&mut a, 6));
    let mut b = pool.share(&a);
    assert!(pool.writable(&mut b, 5, 6));
    assert_eq!(pool.take_copies(), vec![(a.blocks[1], b.blocks[1])]);
    assert!(pool.take_copies().is_empty());
    assert_eq!(pool.bytes(), KvPool::new(16, 4, 2, 8).bytes());
}
