//! Choosing the next token from logits: greedy, temperature, top-k, top-p, penalties.

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Sampling settings of one request. The defaults sample at temperature 1 with no cut-off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (always the most likely token; deterministic).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability adds up to at least this.
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Same seed, same request → same output.
    pub seed: Option<u64>,
    /// Subtracted from a token's logit once it has appeared (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once for each time it has appeared.
    pub frequency_penalty: f32,
    /// Never end the generation with an end-of-generation token (their logits are masked):
    /// it runs to `max_tokens` or a stop string.
    #[serde(default)]
    pub ignore_eos: bool,
    /// What the output must be (JSON mode, a JSON schema): tokens that would break it are
    /// masked before sampling (`crate::constrain`). `None`: free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<crate::constrain::Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            ignore_eos: false,
            grammar: None,
        }
    }
}

/// Samples tokens for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: std::collections::HashMap<u32, u32>,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            counts: Default::default(),
            scratch: Vec::new(),
        }
    }

    /// Pick the next token from the logits and remember it for the penalties. The penalties
    /// are applied to `logits` in place (what `logprobs` then reads); temperature, top-k and
    /// top-p work on a copy.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let token = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        *self.counts.entry(token).or_default() += 1;
        token
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence == 0.0 && frequency == 0.0 {
            return;
        }
        for (&token, &n) in &self.counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= presence + frequency * n as f32;
            }
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cands.truncate(k);
        }
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        // Softmax over the survivors, then the top-p cut.
        let max = cands[0].1;
        let mut sum = 0.0;
        for c in cands.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        let top_p = self.params.top_p.clamp(0.0, 1.0) * sum;
        let mut acc = 0.0;
        let mut keep = cands.len();
        for (i, c) in cands.iter().enumerate() {
            acc += c.1;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        cands.truncate(keep);
        let mut r = self.rng.random::<f32>() * acc;
        for c in cands.iter() {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        cands[cands.len() - 1].0
    }
}

/// A sampled token's log-probability and the most likely tokens at its step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScores {
    pub logprob: f32,
    /// Best first; ties in token order (so greedy's choice is the first).
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and the `k` most likely tokens with theirs.
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> TokenScores {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - log_z) as f32;
    let mut top = Vec::new();
    if k > 0 {
        let better = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        top.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if k < top.len() {
            top.select_nth_unstable_by(k - 1, better);
            top.truncate(k);
        }
        top.sort_unstable_by(better);
        for t in &mut top {
            t.1 = lp(t.1);
        }
    }
    TokenScores {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top,
    }
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
            ..Default::default()
        }
    }

    fn draw(p: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n).map(|_| s.sample(&mut logits())).collect()
    }

    #[test]
    fn temperature_zero_is_greedy() {
        assert!(draw(params(0.0, 1.0, 0, 1), 20).iter().all(|&t| t == 1));
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let a = draw(params(1.0, 1.0, 0, 42), 64);
        assert_eq!(a, draw(params(1.0, 1.0, 0, 42), 64));
        assert_ne!(a, draw(params(1.0, 1.0, 0, 43), 64));
    }

    #[test]
    fn top_k_limits_the_choice() {
        let got = draw(params(5.0, 1.0, 2, 7), 200);
        assert!(got.iter().all(|&t| t == 1 || t == 4));
        assert!(got.contains(&1) && got.contains(&4));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // At temperature 1, tokens 1 and 4 hold ~0.69 of the mass; top_p 0.6 keeps only them.
        let got = draw(params(1.0, 0.6, 0, 3), 200);
        assert!(got.iter().all(|&t| t == 1 || t == 4), "{got:?}");
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_best_first() {
        let l = logits();
        let s = logprobs(&l, 2, 3);
        let z: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((f64::from(s.logprob) - (2.0 - z.ln())).abs() < 1e-5);
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 4, 2]);
        assert_eq!(
            s.top[2].1, s.logprob,
            "the chosen token's entry in the top list"
        );
        let total: f32 = l
            .iter()
            .map(|&x| logprobs(&l, 0, 0).logprob - l[0] + x)
            .map(f32::exp)
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(s.top.iter().all(|t| t.1 <= 0.0));
        assert_eq!(logprobs(&l, 1, 0).top, [], "no alternatives unless asked");
        assert_eq!(logprobs(&l, 1, 9).top.len(), 5, "at most the vocabulary");
        // A greedy choice is the top of the list, even on a tie (the lower id wins both).
        let tie = [0.5, 2.0, 2.0];
        assert_eq!(logprobs(&tie, argmax(&tie), 2).top[0].0, argmax(&tie));
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits()), 1);
        // 3.0 - 0.5 = 2.5 < 2.9: token 4 wins next.
        assert_eq!(s.sample(&mut logits()), 4);
    }
}
