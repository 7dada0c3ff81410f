//! One forward pass over a batch of tokens from several sequences, written once over a
//! small backend trait (the CPU backend today; a GPU backend implements the same calls).

use super::{
    kv::BlockTable,
    model::{Matrix, Model},
};

/// The activation buffers a forward pass works in, each `tokens × width` f32 rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// The residual stream.
    X,
    /// A normalised copy of `X`, or the output of a projection added back into it.
    H,
    Q,
    K,
    V,
    /// Attention output, before the output projection.
    Att,
    Gate,
    Up,
}

impl Buf {
    pub const COUNT: usize = 8;
}

/// The tokens of one step: consecutive runs, one per sequence.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    pub tokens: Vec<u32>,
    /// The position of each token in its sequence.
    pub positions: Vec<usize>,
    /// For each token, the index of its run in `tables`.
    pub seq_of: Vec<usize>,
    /// Each run's KV block table.
    pub tables: Vec<&'a BlockTable>,
    /// Indices of the tokens whose next-token logits are wanted (the last of a run that
    /// reaches the end of its sequence).
    pub logits_for: Vec<usize>,
}

/// The operations of a forward pass. Buffers live on the backend's device; only token ids
/// go in and logits come out.
pub trait Backend {
    /// Start a step of `tokens` tokens: size the buffers.
    fn begin(&mut self, tokens: usize);
    /// `X` ← the embedding rows of `ids`.
    fn embed(&mut self, model: &Model, ids: &[u32]);
    /// `to` ← RMSNorm(`from`) · `weight`.
    fn rms_norm(&mut self, from: Buf, weight: &[f32], eps: f32, to: Buf);
    /// Each `(w, out)`: `out` ← `from` · wᵀ. All read the same input, in one dispatch.
    fn matmul(&mut self, model: &Model, from: Buf, outs: &[(&Matrix, Buf)]);
    /// `to` += `bias` on every row.
    fn add_bias(&mut self, to: Buf, bias: &[f32]);
    /// Rotate `buf`'s heads (of `head_dim`) by each token's position.
    fn rope(&mut self, buf: Buf, head_dim: usize, base: f32, positions: &[usize]);
    /// Write `K` and `V` of every token into the KV cache at its position, then `Att` ←
    /// causal attention of `Q` over each sequence's cached positions.
    fn attention(&mut self, model: &Model, layer: usize, batch: &Batch);
    /// `Gate` ← SiLU(`Gate`) · `Up`.
    fn silu_mul(&mut self);
    /// `to` += `from`.
    fn add(&mut self, to: Buf, from: Buf);
    /// Logits of the given token rows of `X` (after the final norm and the output head),
    /// one `vocab`-long row each.
    fn logits(&mut self, model: &Model, rows: &[usize]) -> &[f32];

    /// Whether `sample` chooses tokens where the logits are (a GPU backend): then only token
    /// ids come back. The host backend reads the logits and samples on the host.
    fn samples(&self) -> bool {
        false
    }

    /// The next token of each of the given token rows of `X` (after the final norm and the
    /// output head), chosen where the logits are, one `how` per row. Only called when
    /// `samples()`; the default computes the logits and picks on the host.
    fn sample(&mut self, model: &Model, rows: &[usize], how: &[DeviceSampling]) -> Vec<u32> {
        let vocab = model.shape.vocab;
        let logits = self.logits(model, rows);
        logits
            .chunks(vocab)
            .zip(how)
            .map(|(row, h)| h.pick_on_host(row))
            .collect()
    }

    /// Copy whole KV blocks `(from, to)` before the step's writes, for a backend whose KV
    /// cache is not the `KvPool`'s own memory (it records the copies instead of making them).
    fn copy_blocks(&mut self, _copies: &[(u32, u32)]) {}

    /// The first failure of a call since the last `take_error` (a device error); the host
    /// backend never fails this way.
    fn take_error(&mut self) -> Option<String> {
        None
    }
}

/// How one sequence's next token is chosen on the device (`Backend::sample`): greedy when
/// `temperature <= 0`, otherwise the device sampler's seeded draw (see `cuda/README.md`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    /// Tokens sampled so far in the sequence.
    pub step: u32,
}

impl DeviceSampling {
    /// The greedy choice of a row (largest logit, lowest id on ties, NaN never); what a
    /// backend that cannot sample uses for a greedy row.
    pub fn pick_on_host(&self, row: &[f32]) -> u32 {
        let mut best = (0u32, f32::NEG_INFINITY);
        for (i, &v) in row.iter().enumerate() {
            if v > best.1 {
                best = (i as u32, v);
            }
        }
        best.0
    }
}

/// Run the model over `batch`; returns one row of logits per `batch.logits_for` entry.
#[cfg(test)]
pub fn forward<'b, B: Backend>(b: &'b mut B, model: &Model, batch: &Batch) -> &'b [f32] {
    layers(b, model, batch);
    b.logits(model, &batch.logits_for)
}

/// Every layer of the model over `batch`, leaving the residual stream in `X`.
pub fn layers<B: Backend>(b: &mut B, model: &Model, batch: &Batch) {
    let s = &model.shape;
    b.begin(batch.tokens.len());
    b.embed(model, &batch.tokens);
    for (i, l) in model.layers.iter().enumerate() {
        b.rms_norm(Buf::X, &l.attn_norm, s.eps, Buf::H);
        b.matmul(
            model,
            Buf::H,
            &[(&l.wq, Buf::Q), (&l.wk, Buf::K), (&l.wv, Buf::V)],
        );
        if let Some([bq, bk, bv]) = &l.bias {
            b.add_bias(Buf::Q, bq);
            b.add_bias(Buf::K, bk);
            b.add_bias(Buf::V, bv);
        }
        b.rope(Buf::Q, s.head_dim, s.rope_base, &batch.positions);
        b.rope(Buf::K, s.head_dim, s.rope_base, &batch.positions);
        b.attention(model, i, batch);
        b.matmul(model, Buf::Att, &[(&l.wo, Buf::H)]);
        b.add(Buf::X, Buf::H);
        b.rms_norm(Buf::X, &l.ffn_norm, s.eps, Buf::H);
        b.matmul(model, Buf::H, &[(&l.gate, Buf::Gate), (&l.up, Buf::Up)]);
        b.silu_mul();
        b.matmul(model, Buf::Gate, &[(&l.down, Buf::H)]);
        b.add(Buf::X, Buf::H);
    }
}
