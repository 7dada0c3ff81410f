//! Continuous batching: one step loop per copy. Sequences join at the next step, prompts are
//! prefilled in chunks beside other sequences' decode steps, and finished or cancelled
//! sequences leave at once; each step reads every weight once for the whole batch. The `n`
//! choices of one prompt share its prefill and KV blocks; full blocks stay in the prefix
//! cache for later prompts that start the same way.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
};

use super::{
    cpu::Cpu,
    forward::{layers, Backend, Batch, DeviceSampling},
    kv::{BlockTable, KvPool},
    model::Model,
};
use crate::{
    constrain::Constraint,
    device::Lane,
    engine::FinishReason,
    sampling::{logprobs, Sampler, TokenScores},
    SamplingParams,
};

/// How a copy batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Positions of KV cache the copy holds, all sequences together.
    pub kv_tokens: usize,
    /// Positions per KV block.
    pub block_tokens: usize,
    /// Tokens one step computes at most (decodes first, then prompt chunks).
    pub step_tokens: usize,
    /// Keep full KV blocks for later prompts that start with the same tokens (the prefix
    /// cache); they stay in the pool until a sequence needs the room.
    pub prefix_cache: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            kv_tokens: 8192,
            block_tokens: 16,
            step_tokens: 256,
            prefix_cache: true,
        }
    }
}

/// What a sequence reports to the caller waiting on it.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// A new token of one choice (end-of-generation tokens included), with its scores when
    /// asked for; the first follows the prefill.
    Token {
        choice: usize,
        token: u32,
        scores: Option<TokenScores>,
    },
    /// No more tokens for this choice: `max_tokens` reached or an end-of-generation token.
    Done { choice: usize, reason: FinishReason },
    /// The prompt's first this-many tokens came from the prefix cache (sent when admitted).
    Reused(usize),
    /// The step computing this sequence failed; the copy goes on with the others.
    Failed(String),
}

/// A sequence handed to a copy's step loop.
#[derive(Debug)]
pub struct Submit {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Choices sampled from the one prefill: choice `i` seeds its sampler with `seed + i`.
    pub n: usize,
    /// Score each sampled token with this many alternatives; `None` scores none.
    pub logprobs: Option<usize>,
    pub events: mpsc::Sender<SeqEvent>,
    /// Set by the caller when it stops listening: every choice leaves at the next step.
    pub cancel: Arc<AtomicBool>,
    /// One flag per choice, set when that choice alone is done (it met a stop string).
    pub stopped: Arc<[AtomicBool]>,
    /// The grammar the output must follow (`sampling.grammar` compiled), fresh: each choice
    /// starts from a clone.
    pub constraint: Option<Constraint>,
}

/// What the choices of one request share.
#[derive(Debug)]
struct Shared {
    max_tokens: usize,
    sampling: SamplingParams,
    logprobs: Option<usize>,
    events: mpsc::Sender<SeqEvent>,
    cancel: Arc<AtomicBool>,
    stopped: Arc<[AtomicBool]>,
    constraint: Option<Constraint>,
}

struct Seq {
    shared: Arc<Shared>,
    choice: usize,
    /// Choices still to start from this one's prompt once it is prefilled.
    forks: usize,
    prompt_len: usize,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose K and V are in the cache.
    cached: usize,
    generated: usize,
    table: BlockTable,
    sampler: Sampler,
    constraint: Option<Constraint>,
    /// The seed of the device sampler: the request's (`+ choice`), or drawn at random.
    device_seed: u64,
}

impl Seq {
    fn gone(&self) -> bool {
        let stopped = self.shared.stopped.get(self.choice);
        self.shared.cancel.load(Ordering::Relaxed)
            || stopped.is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// How this sequence's next token is chosen on a device that samples, or `None` when
    /// its logits are needed on the host: a grammar to mask, scores to report, penalties,
    /// masked end-of-generation tokens, or choices still to fork from the same logits.
    fn device_sampling(&self) -> Option<DeviceSampling> {
        let p = &self.shared.sampling;
        let host = self.constraint.is_some()
            || self.shared.logprobs.is_some()
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || p.ignore_eos
            || self.forks > 0;
        if host {
            return None;
        }
        Some(DeviceSampling {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            seed: self.device_seed,
            step: self.generated as u32,
        })
    }

    /// Choice `choice` of the same prompt, its own sampler seeded `seed + choice`.
    fn sampler_for(sampling: &SamplingParams, choice: usize) -> Sampler {
        let mut p = sampling.clone();
        p.seed = p.seed.map(|s| s.wrapping_add(choice as u64));
        Sampler::new(p)
    }
}

/// A backend a step loop drives: the forward pass's operations and the copy's KV pool (its
/// block tables; the values may live on the backend's device).
pub trait StepBackend: Backend + Send + 'static {
    fn kv(&mut self) -> &mut KvPool;
}

impl StepBackend for Cpu {
    fn kv(&mut self) -> &mut KvPool {
        &mut self.kv
    }
}

/// The step loop of one copy: owns its KV pool and scratch; runs until the engine is dropped
/// and every sequence has left.
pub struct StepLoop<B: StepBackend = Cpu> {
    pub model: Arc<Model>,
    pub cpu: B,
    pub lane: Lane,
    pub config: BatchConfig,
    pub end_of_generation: Vec<u32>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    logits: Vec<f32>,
}

impl<B: StepBackend> StepLoop<B> {
    pub fn new(
        model: Arc<Model>,
        cpu: B,
        lane: Lane,
        config: BatchConfig,
        end_of_generation: Vec<u32>,
    ) -> Self {
        StepLoop {
            model,
            cpu,
            lane,
            config,
            end_of_generation,
            waiting: VecDeque::new(),
            running: Vec::new(),
            logits: Vec::new(),
        }
    }

    pub fn run(mut self, rx: mpsc::Receiver<Submit>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(s) => self.enqueue(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.enqueue(s);
            }
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if let Err(panic) = stepped {
                self.fail_running(&panic_message(&*panic));
            }
        }
    }

    /// A step panicked: its sequences end with the reason and leave; waiting ones go on.
    fn fail_running(&mut self, reason: &str) {
        tracing::error!(
            reason,
            sequences = self.running.len(),
            "A batch step failed"
        );
        for mut s in self.running.drain(..) {
            let _ = s.shared.events.send(SeqEvent::Failed(reason.to_string()));
            self.cpu.kv().release(&mut s.table);
        }
    }

    fn enqueue(&mut self, submit: Submit) {
        if submit.prompt.is_empty() || submit.max_tokens == 0 {
            for choice in 0..submit.n.max(1) {
                let reason = FinishReason::Length;
                let _ = submit.events.send(SeqEvent::Done { choice, reason });
            }
            return;
        }
        let fits =
            self.cpu.kv().blocks_for(submit.prompt.len() + 1) <= self.cpu.kv().total_blocks();
        if !fits {
            let reason = format!(
                "{} prompt tokens do not fit this copy's KV cache",
                submit.prompt.len()
            );
            let _ = submit.events.send(SeqEvent::Failed(reason));
            return;
        }
        let shared = Arc::new(Shared {
            max_tokens: submit.max_tokens,
            sampling: submit.sampling,
            logprobs: submit.logprobs,
            events: submit.events,
            cancel: submit.cancel,
            stopped: submit.stopped,
            constraint: submit.constraint,
        });
        self.waiting.push_back(Seq {
            sampler: Seq::sampler_for(&shared.sampling, 0),
            device_seed: shared.sampling.seed.unwrap_or_else(rand::random),
            constraint: shared.constraint.clone(),
            shared,
            choice: 0,
            forks: submit.n.saturating_sub(1),
            prompt_len: submit.prompt.len(),
            tokens: submit.prompt,
            cached: 0,
            generated: 0,
            table: BlockTable::default(),
        });
    }

    /// Drop cancelled sequences, admit waiting ones while their tokens fit the pool, plan
    /// and run one forward pass, and sample.
    fn step(&mut self) {
        let kv = self.cpu.kv();
        for s in self.running.iter_mut().filter(|s| s.gone()) {
            kv.release(&mut s.table);
        }
        self.running.retain(|s| !s.gone());
        self.waiting.retain(|s| !s.gone());
        // Admit in arrival order (the fair scheduler above chose that order), each with room
        // for all its tokens so far and the next one.
        while let Some(s) = self.waiting.front_mut() {
            if !admit(kv, s) {
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            self.running.push(s);
        }
        let plan = self.plan();
        if plan.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        for (i, &(si, n)) in plan.iter().enumerate() {
            let s = &self.running[si];
            for p in s.cached..s.cached + n {
                batch.tokens.push(s.tokens[p]);
                batch.positions.push(p);
                batch.seq_of.push(i);
            }
            batch.tables.push(&s.table);
            if s.cached + n == s.tokens.len() {
                batch.logits_for.push(batch.tokens.len() - 1);
            }
        }
        let copies = self.cpu.kv().take_copies();
        // Rows whose sequence is sampled where the logits are (only token ids come back),
        // and rows whose logits the host needs.
        let on_device = self.cpu.samples();
        let (mut device, mut host, mut how) = (Vec::new(), Vec::new(), Vec::new());
        for (&(si, n), &row) in plan
            .iter()
            .filter(|&&(si, n)| self.running[si].cached + n == self.running[si].tokens.len())
            .zip(&batch.logits_for)
        {
            let _ = n;
            match self.running[si].device_sampling().filter(|_| on_device) {
                Some(h) => {
                    device.push(row);
                    how.push(h);
                }
                None => host.push(row),
            }
        }
        let (model, cpu) = (&self.model, &mut self.cpu);
        let (logits, tokens) = self.lane.run(|| {
            cpu.copy_blocks(&copies);
            layers(cpu, model, &batch);
            let tokens = match device.is_empty() {
                true => Vec::new(),
                false => cpu.sample(model, &device, &how),
            };
            let logits = match host.is_empty() {
                true => Vec::new(),
                false => cpu.logits(model, &host).to_vec(),
            };
            (logits, tokens)
        });
        drop(batch);
        if let Some(reason) = self.cpu.take_error() {
            self.fail_running(&reason);
            return;
        }
        self.logits = logits;
        self.sample(&plan, &tokens);
    }

    /// Tokens each running sequence computes this step: one for each decoding sequence,
    /// then prompt chunks up to the step's budget. A sequence that needs a KV block when
    /// none is free preempts the newest sequence (itself if it is the newest), which waits
    /// at the head of the queue and is recomputed later.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.config.step_tokens;
        let mut plan = Vec::new();
        // Decodes first (they are latency-bound), prefills after.
        for decoding in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let s = &mut self.running[i];
                let left = s.tokens.len() - s.cached;
                if (left == 1) != decoding {
                    i += 1;
                    continue;
                }
                let n = left.min(budget);
                let (kv, table) = (self.cpu.kv(), &mut s.table);
                // Room for the new positions, in blocks of this sequence's own.
                let room =
                    kv.grow(table, s.cached + n + 1) && kv.writable(table, s.cached, s.cached + n);
                if !room {
                    let newest = self.running.len() - 1;
                    self.preempt(newest);
                    plan.retain(|&(j, _)| j != newest);
                    continue;
                }
                plan.push((i, n));
                budget -= n;
                i += 1;
            }
        }
        plan
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.cpu.kv().release(&mut s.table);
        s.cached = 0;
        self.waiting.push_front(s);
    }

    fn sample(&mut self, plan: &[(usize, usize)], device_tokens: &[u32]) {
        let vocab = self.model.shape.vocab;
        let on_device = self.cpu.samples();
        let mut rows = self.logits.chunks_mut(vocab);
        let mut tokens = device_tokens.iter();
        let mut done = Vec::new();
        let mut forks = Vec::new();
        for &(si, n) in plan {
            let s = &mut self.running[si];
            s.cached += n;
            self.cpu.kv().remember(&mut s.table, &s.tokens, s.cached);
            if s.cached < s.tokens.len() {
                continue;
            }
            if on_device && s.device_sampling().is_some() {
                let token = *tokens
                    .next()
                    .expect("a token per run sampled on the device");
                if !emit(s, token, &self.end_of_generation) {
                    done.push(si);
                }
                continue;
            }
            let row = rows.next().expect("a logits row per finished run");
            if s.forks > 0 {
                forks.push((si, row.to_vec()));
            }
            if !pick(s, row, &self.end_of_generation) {
                done.push(si);
            }
        }
        for (si, row) in forks {
            self.fork(si, &row);
        }
        done.sort_unstable();
        for si in done.into_iter().rev() {
            let mut s = self.running.remove(si);
            self.cpu.kv().release(&mut s.table);
        }
    }

    /// Start the other choices of a prompt just prefilled: each shares its KV blocks and
    /// samples its first token from the same logits.
    fn fork(&mut self, si: usize, row: &[f32]) {
        let forks = std::mem::take(&mut self.running[si].forks);
        for choice in 1..=forks {
            let parent = &self.running[si];
            let mut s = Seq {
                shared: parent.shared.clone(),
                choice,
                forks: 0,
                prompt_len: parent.prompt_len,
                tokens: parent.tokens[..parent.prompt_len].to_vec(),
                cached: parent.prompt_len,
                generated: 0,
                table: self.cpu.kv().share(&parent.table),
                sampler: Seq::sampler_for(&parent.shared.sampling, choice),
                device_seed: parent.device_seed.wrapping_add(choice as u64),
                constraint: parent.shared.constraint.clone(),
            };
            if pick(&mut s, &mut row.to_vec(), &self.end_of_generation) {
                self.running.push(s);
            } else {
                self.cpu.kv().release(&mut s.table);
            }
        }
    }
}

/// Take blocks for a waiting sequence: the prompt's blocks in the prefix cache, then free
/// ones for the rest and the next token. At least the last token is computed (its logits
/// are needed). `false` (nothing taken) when the pool has too few.
fn admit(kv: &mut KvPool, s: &mut Seq) -> bool {
    let most = (s.tokens.len() - 1) / kv.block_tokens();
    let found = kv.reuse(&s.tokens, most);
    let reused = found.blocks.len();
    s.table = BlockTable {
        blocks: found.blocks,
        hashed: reused,
        chain: found.chain,
    };
    if !kv.grow(&mut s.table, s.tokens.len() + 1) {
        kv.release(&mut s.table);
        return false;
    }
    s.cached = reused * kv.block_tokens();
    if s.cached > 0 && s.generated == 0 && s.choice == 0 {
        let _ = s.shared.events.send(SeqEvent::Reused(s.cached));
    }
    true
}

/// Sample a sequence's next token from its logits `row` and tell the caller. Returns whether
/// the sequence goes on.
fn pick(s: &mut Seq, row: &mut [f32], end_of_generation: &[u32]) -> bool {
    if s.shared.sampling.ignore_eos {
        for &t in end_of_generation {
            if let Some(logit) = row.get_mut(t as usize) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
    if let Some(Err(e)) = s.constraint.as_mut().map(|c| c.mask(row)) {
        let _ = s
            .shared
            .events
            .send(SeqEvent::Failed(format!("constrained decoding: {e}")));
        return false;
    }
    let token = s.sampler.sample(row);
    // `sample` left the penalties applied to `row`: the scores are of what it sampled from.
    let scores = s.shared.logprobs.map(|k| logprobs(row, token, k));
    emit_scored(s, token, scores, end_of_generation)
}

/// Tell the caller a token chosen on the device. Returns whether the sequence goes on.
fn emit(s: &mut Seq, token: u32, end_of_generation: &[u32]) -> bool {
    emit_scored(s, token, None, end_of_generation)
}

fn emit_scored(
    s: &mut Seq,
    token: u32,
    scores: Option<TokenScores>,
    end_of_generation: &[u32],
) -> bool {
    s.tokens.push(token);
    s.generated += 1;
    let eog = end_of_generation.contains(&token);
    // The grammar is told the token; a complete output ends as an end-of-generation would.
    let complete = match s
        .constraint
        .as_mut()
        .filter(|_| !eog)
        .map(|c| c.commit(token))
    {
        Some(Err(e)) => {
            let _ = s
                .shared
                .events
                .send(SeqEvent::Failed(format!("constrained decoding: {e}")));
            return false;
        }
        Some(Ok(complete)) => complete,
        None => false,
    };
    let finish = if eog || complete {
        Some(FinishReason::Stop)
    } else if s.generated >= s.shared.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    let choice = s.choice;
    let events = &s.shared.events;
    let sent = events
        .send(SeqEvent::Token {
            choice,
            token,
            scores,
        })
        .is_ok();
    if let Some(reason) = finish {
        let _ = events.send(SeqEvent::Done { choice, reason });
    }
    finish.is_none() && sent
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a batch step panicked".into())
}
