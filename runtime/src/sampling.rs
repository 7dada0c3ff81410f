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

    /// Pick the next token from the logits and remember it for the penalties.
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
