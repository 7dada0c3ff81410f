//! Continuous batching: one step loop per copy. Sequences join at the next step, prompts are
//! prefilled in chunks beside other sequences' decode steps, and finished or cancelled
//! sequences leave at once; each step reads every weight once for the whole batch.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
};

use super::{
    cpu::Cpu,
    forward::{forward, Batch},
    kv::BlockTable,
    model::Model,
};
use crate::{device::Lane, engine::FinishReason, sampling::Sampler, SamplingParams};

/// How a copy batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Positions of KV cache the copy holds, all sequences together.
    pub kv_tokens: usize,
    /// Positions per KV block.
    pub block_tokens: usize,
    /// Tokens one step computes at most (decodes first, then prompt chunks).
    pub step_tokens: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            kv_tokens: 8192,
            block_tokens: 16,
            step_tokens: 256,
        }
    }
}

/// What a sequence reports to the caller waiting on it.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// A new token (end-of-generation tokens included); the first follows the prefill.
    Token(u32),
    /// No more tokens: `max_tokens` reached or an end-of-generation token sampled.
    Done(FinishReason),
    /// The step computing this sequence failed; the copy goes on with the others.
    Failed(String),
}

/// A sequence handed to a copy's step loop.
#[derive(Debug)]
pub struct Submit {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub events: mpsc::Sender<SeqEvent>,
    /// Set by the caller when it stops listening: the sequence leaves at the next step.
    pub cancel: Arc<AtomicBool>,
}

struct Seq {
    submit: Submit,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose K and V are in the cache.
    cached: usize,
    generated: usize,
    table: BlockTable,
    sampler: Sampler,
}

impl Seq {
    fn gone(&self) -> bool {
        self.submit.cancel.load(Ordering::Relaxed)
    }
}

/// The step loop of one copy: owns its KV pool and scratch; runs until the engine is dropped
/// and every sequence has left.
pub struct StepLoop {
    pub model: Arc<Model>,
    pub cpu: Cpu,
    pub lane: Lane,
    pub config: BatchConfig,
    pub end_of_generation: Vec<u32>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    logits: Vec<f32>,
}

impl StepLoop {
    pub fn new(
        model: Arc<Model>,
        cpu: Cpu,
        lane: Lane,
        config: BatchConfig,
        end_of_generation: Vec<u32>,
    ) -> StepLoop {
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
            let _ = s.submit.events.send(SeqEvent::Failed(reason.to_string()));
            self.cpu.kv.release(&mut s.table);
        }
    }

    fn enqueue(&mut self, submit: Submit) {
        if submit.prompt.is_empty() || submit.max_tokens == 0 {
            let _ = submit.events.send(SeqEvent::Done(FinishReason::Length));
            return;
        }
        let fits = self.cpu.kv.blocks_for(submit.prompt.len() + 1) <= self.cpu.kv.total_blocks();
        if !fits {
            let reason = format!(
                "{} prompt tokens do not fit this copy's KV cache",
                submit.prompt.len()
            );
            let _ = submit.events.send(SeqEvent::Failed(reason));
            return;
        }
        let sampler = Sampler::new(submit.sampling.clone());
        self.waiting.push_back(Seq {
            tokens: submit.prompt.clone(),
            cached: 0,
            generated: 0,
            table: BlockTable::default(),
            sampler,
            submit,
        });
    }

    /// Drop cancelled sequences, admit waiting ones while their tokens fit the pool, plan
    /// and run one forward pass, and sample.
    fn step(&mut self) {
        let kv = &mut self.cpu.kv;
        for s in self.running.iter_mut().filter(|s| s.gone()) {
            kv.release(&mut s.table);
        }
        self.running.retain(|s| !s.gone());
        self.waiting.retain(|s| !s.gone());
        // Admit in arrival order (the fair scheduler above chose that order), each with room
        // for all its tokens so far and the next one.
        while let Some(s) = self.waiting.front() {
            if kv.blocks_for(s.tokens.len() + 1) > kv.free_blocks() {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            kv.grow(&mut s.table, s.tokens.len() + 1);
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
        let (model, cpu) = (&self.model, &mut self.cpu);
        let logits = self.lane.run(|| forward(cpu, model, &batch).to_vec());
        drop(batch);
        self.logits = logits;
        self.sample(&plan);
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
                let s = &self.running[i];
                let left = s.tokens.len() - s.cached;
                if (left == 1) != decoding {
                    i += 1;
                    continue;
                }
                let n = left.min(budget);
                let want = s.cached + n + 1;
                if !self.cpu.kv.grow(&mut self.running[i].table, want) {
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
        self.cpu.kv.release(&mut s.table);
        s.cached = 0;
        self.waiting.push_front(s);
    }

    fn sample(&mut self, plan: &[(usize, usize)]) {
        let vocab = self.model.shape.vocab;
        let mut rows = self.logits.chunks_mut(vocab);
        let mut done = Vec::new();
        for &(si, n) in plan {
            let s = &mut self.running[si];
            s.cached += n;
            if s.cached < s.tokens.len() {
                continue;
            }
            let row = rows.next().expect("a logits row per finished run");
            if s.submit.sampling.ignore_eos {
                for &t in &self.end_of_generation {
                    if let Some(logit) = row.get_mut(t as usize) {
                        *logit = f32::NEG_INFINITY;
                    }
                }
            }
            let token = s.sampler.sample(row);
            s.tokens.push(token);
            s.generated += 1;
            let finish = if self.end_of_generation.contains(&token) {
                Some(FinishReason::Stop)
            } else if s.generated >= s.submit.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            let sent = s.submit.events.send(SeqEvent::Token(token)).is_ok();
            if let Some(f) = finish {
                let _ = s.submit.events.send(SeqEvent::Done(f));
            }
            if finish.is_some() || !sent {
                done.push(si);
            }
        }
        done.sort_unstable();
        for si in done.into_iter().rev() {
            let mut s = self.running.remove(si);
            self.cpu.kv.release(&mut s.table);
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a batch step panicked".into())
}
