//! The CUDA backend where a GPU is: a batched forward pass of fixtures of every type against
//! the CPU backend. Without a driver, only that it is refused with a reason. Each result is
//! also printed as one `GPU-CHECK {json}` line, which `tests/gpu/run` gathers into its report.

use super::backend::{Cuda, Gpu};
use super::SOURCES;
use crate::llm::{
    cpu::Cpu,
    fixture,
    forward::{forward, Batch},
    kernels::QType,
    kv::{BlockTable, KvPool},
};

/// One machine-readable result line for `tests/gpu/run`.
fn check(v: serde_json::Value) {
    println!("GPU-CHECK {v}");
}

/// The greedy token of each row of `vocab` logits (lowest id on ties).
fn greedy(logits: &[f32], vocab: usize) -> Vec<usize> {
    let best = |r: &[f32]| (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b });
    logits.chunks(vocab).map(best).collect()
}

#[test]
fn on_a_gpu_the_cuda_backend_gives_the_cpus_greedy_tokens_else_it_is_refused() {
    let gpu = match Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            // No GPU here (CI): the reason is the error, nothing panics.
            assert!(!e.to_string().is_empty());
            println!("no GPU: {e}");
            check(serde_json::json!({"check": "device", "gpu": false, "error": e.to_string()}));
            return;
        }
    };
    let (major, minor) = gpu.ctx.compute_capability().unwrap_or_default();
    check(serde_json::json!({"check": "device", "gpu": true,
        "name": gpu.ctx.name().unwrap_or_default(), "arch": format!("sm_{major}{minor}"),
        "kernels_loaded": SOURCES.iter().map(|s| s.kernels.len()).sum::<usize>()}));
    let mut gpu = Some(gpu);
    let mut failed = Vec::new();
    for q in QType::ALL {
        let m = fixture::model(q, 9, q == QType::Q8_0);
        let s = &m.shape;
        let prompts: [&[u32]; 2] = [&[1, 17, 42, 99, 7], &[3, 1, 4]];
        // Two pools grown alike: the same block tables address both.
        let pool = || {
            let mut kv = KvPool::new(64, 4, s.layers, s.kv_dim());
            let tables: Vec<BlockTable> = prompts
                .iter()
                .map(|p| {
                    let mut t = BlockTable::default();
                    assert!(kv.grow(&mut t, p.len() + 4));
                    t
                })
                .collect();
            (kv, tables)
        };
        let (kv, tables) = pool();
        let (blocks, _) = pool();
        let mut cpu = Cpu::new(kv, 2);
        // A failed upload consumed the handle: open the GPU again for the next type.
        let opened = gpu.take().map(Ok).unwrap_or_else(|| Gpu::new(0));
        let mut cuda = match opened.and_then(|g| Cuda::new(g, &m, blocks, 4)) {
            Ok(cuda) => cuda,
            Err(e) => {
                check(
                    serde_json::json!({"check": "backend", "type": q.name(), "error": e.to_string()}),
                );
                failed.push(format!("{}: {e}", q.name()));
                continue;
            }
        };
        let mut b = Batch {
            tables: tables.iter().collect(),
            ..Default::default()
        };
        for (i, p) in prompts.iter().enumerate() {
            for (j, &t) in p.iter().enumerate() {
                b.tokens.push(t);
                b.positions.push(j);
                b.seq_of.push(i);
            }
            b.logits_for.push(b.tokens.len() - 1);
        }
        let want = forward(&mut cpu, &m, &b).to_vec();
        let got = forward(&mut cuda, &m, &b).to_vec();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        println!("{:>5}: logits within {err:.1e} of the CPU's", q.name());
        let vocab = s.vocab;
        let (cpu_tokens, gpu_tokens) = (greedy(&want, vocab), greedy(&got, vocab));
        let error = cuda.error.as_ref().map(|e| e.to_string());
        check(
            serde_json::json!({"check": "backend", "type": q.name(), "logits_rel_err": err,
            "greedy_equal": cpu_tokens == gpu_tokens, "cpu_tokens": cpu_tokens,
            "gpu_tokens": gpu_tokens, "error": error}),
        );
        // NaN fails too.
        let close = err < 1e-2;
        if error.is_some() || !close || cpu_tokens != gpu_tokens {
            let name = q.name();
            failed.push(format!(
                "{name}: error {error:?}, logits within {err:.1e}, greedy {cpu_tokens:?} vs \
                 {gpu_tokens:?}"
            ));
        }
        gpu = Some(cuda.into_gpu());
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
