//! The sampling kernels under the launch emulation: greedy equal to the CPU sampler's, and
//! seeded draws that are reproducible, stay inside top-k and top-p, and follow the softmax.
#![allow(unsafe_code)]

use super::emu::{run, Emu};
use super::Launch;
use crate::sampling::Sampler;
use crate::SamplingParams;
use flatmesh_cuda_emu::params;

fn cpu_greedy(logits: &[f32]) -> u32 {
    let mut s = Sampler::new(SamplingParams {
        temperature: 0.0,
        ..Default::default()
    });
    s.sample(&mut logits.to_vec())
}

fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..rows * vocab)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

/// Per-row settings of one `sample` launch.
struct Draw {
    temperature: Vec<f32>,
    top_k: Vec<i32>,
    top_p: Vec<f32>,
    seeds: Vec<u64>,
    steps: Vec<u32>,
}

impl Draw {
    fn same(rows: usize, t: f32, k: i32, p: f32, seed: u64) -> Draw {
        Draw {
            temperature: vec![t; rows],
            top_k: vec![k; rows],
            top_p: vec![p; rows],
            seeds: vec![seed; rows],
            steps: (0..rows as u32).collect(),
        }
    }

    fn run(&self, l: &[f32], vocab: usize) -> Vec<usize> {
        let rows = self.temperature.len();
        let mut out = vec![0i32; rows];
        let (mut lp, mut v) = (l.as_ptr(), vocab as i32);
        let (mut t, mut k, mut p) = (
            self.temperature.as_ptr(),
            self.top_k.as_ptr(),
            self.top_p.as_ptr(),
        );
        let (mut s, mut st, mut o) = (self.seeds.as_ptr(), self.steps.as_ptr(), out.as_mut_ptr());
        run(
            "sample",
            Launch::per_row(rows),
            &mut params![lp, v, t, k, p, s, st, o],
        );
        out.into_iter().map(|t| t as usize).collect()
    }
}

#[test]
fn greedy_picks_the_cpu_samplers_token_ties_included() {
    let vocab = 1000;
    let mut l = logits(6, vocab, 3);
    // Ties of the maximum: the lowest id wins on both.
    let m = l[..vocab].iter().cloned().fold(f32::MIN, f32::max);
    l[vocab - 1] = m;
    l[vocab + 500] = 100.0;
    l[vocab + 20] = 100.0;
    l[2 * vocab..3 * vocab].fill(1.5);
    l[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
    l[3 * vocab + 999] = -1e30;
    let want: Vec<u32> = l.chunks(vocab).map(cpu_greedy).collect();
    assert_eq!(Emu::argmax(&l, vocab), want);
    let greedy = Draw::same(6, 0.0, 0, 1.0, 1).run(&l, vocab);
    let greedy: Vec<u32> = greedy.iter().map(|&t| t as u32).collect();
    assert_eq!(
        greedy, want,
        "temperature 0 in `sample` is the same greedy choice"
    );
}

#[test]
fn seeded_draws_repeat_and_stay_inside_top_k_and_top_p() {
    let (vocab, rows) = (500, 64);
    let one = logits(1, vocab, 11);
    let l: Vec<f32> = (0..rows).flat_map(|_| one.iter().copied()).collect();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| one[b].total_cmp(&one[a]));
    let rank = |t: usize| order.iter().position(|&o| o == t).unwrap();

    let a = Draw::same(rows, 1.0, 0, 1.0, 42).run(&l, vocab);
    assert_eq!(
        a,
        Draw::same(rows, 1.0, 0, 1.0, 42).run(&l, vocab),
        "same seed"
    );
    assert_ne!(
        a,
        Draw::same(rows, 1.0, 0, 1.0, 43).run(&l, vocab),
        "another seed"
    );
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(
        distinct.len() > 5,
        "the steps draw different numbers: {a:?}"
    );

    for t in Draw::same(rows, 1.0, 3, 1.0, 7).run(&l, vocab) {
        assert!(rank(t) < 3, "top_k 3 drew rank {}", rank(t));
    }
    // The nucleus of 0.6 at temperature 0.5, from the CPU's softmax.
    let p: Vec<f64> = order
        .iter()
        .map(|&i| ((one[i] - one[order[0]]) / 0.5).exp() as f64)
        .collect();
    let total: f64 = p.iter().sum();
    let mut acc = 0.0;
    let nucleus = 1 + p
        .iter()
        .take_while(|&&x| {
            acc += x;
            acc < 0.6 * total
        })
        .count();
    for t in Draw::same(rows, 0.5, 0, 0.6, 9).run(&l, vocab) {
        assert!(
            rank(t) < nucleus + 1,
            "top_p 0.6 drew rank {} of a nucleus of {nucleus}",
            rank(t)
        );
    }
}

#[test]
fn draws_follow_the_softmax_at_the_temperature() {
    let (vocab, rows, t) = (8, 4000, 0.7f32);
    let one = [1.0f32, 0.2, -0.5, 1.5, 0.0, -2.0, 0.9, 0.3];
    let l: Vec<f32> = (0..rows).flat_map(|_| one).collect();
    let mut count = [0usize; 8];
    for tok in Draw::same(rows, t, 0, 1.0, 2024).run(&l, vocab) {
        count[tok] += 1;
    }
    let e: Vec<f64> = one.iter().map(|x| ((x - 1.5) / t).exp() as f64).collect();
    let sum: f64 = e.iter().sum();
    for (i, (&c, e)) in count.iter().zip(&e).enumerate() {
        let p = e / sum;
        let f = c as f64 / rows as f64;
        let sigma = (p * (1.0 - p) / rows as f64).sqrt();
        assert!(
            (f - p).abs() < 4.5 * sigma + 1e-3,
            "token {i}: {f:.4} drawn, {p:.4} expected"
        );
    }
}

#[test]
fn penalties_lower_exactly_the_given_logits() {
    let vocab = 50;
    let mut l = logits(2, vocab, 5);
    let before = l.clone();
    let (rows, tokens, amounts) = (vec![0i32, 1, 1], vec![7i32, 7, 49], vec![0.5f32, 1.25, 2.0]);
    let (mut lp, mut v, mut r) = (l.as_mut_ptr(), vocab as i32, rows.as_ptr());
    let (mut tp, mut ap, mut n) = (tokens.as_ptr(), amounts.as_ptr(), 3i32);
    run(
        "apply_penalties",
        Launch::elementwise(3),
        &mut params![lp, v, r, tp, ap, n],
    );
    let mut want = before;
    want[7] -= 0.5;
    want[vocab + 7] -= 1.25;
    want[vocab + 49] -= 2.0;
    assert_eq!(l, want);
}

#[test]
fn the_emulation_refuses_a_barrier_that_not_every_thread_reaches() {
    let mut out = vec![0i32; 32];
    let mut o = out.as_mut_ptr();
    // SAFETY: the self-test kernel takes one pointer to 32 ints.
    let err = unsafe {
        flatmesh_cuda_emu::launch(
            "emu_selftest_divergent_sync",
            [1, 1, 1],
            [32, 1, 1],
            &params![o],
        )
    }
    .unwrap_err();
    assert!(err.contains("never reach"), "{err}");
}
