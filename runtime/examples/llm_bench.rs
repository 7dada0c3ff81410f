//! Times the LLM engine in-process: prefill and decode tokens/s for one sequence.
//!
//! `cargo run --release -p flatmesh-runtime --example llm_bench -- MODEL.gguf [PROMPT_TOKENS] [NEW_TOKENS] [--runs N] [--streams S] [--profile]`
//! prints one JSON line, so scripts can set it beside other engines. With `--runs N` it
//! runs N times (each prompt distinct, so no prefix-cache hit) and reports the best prefill
//! and the best decode rate. With `--streams S` each run is S sequences submitted at once,
//! batched by the step loop as concurrent requests are; it adds `batch_tok_s`, the completion
//! tokens of all S over the run's wall time (the best run), and the profile's multi-token
//! steps are then the last run's batched decode steps (counted from its streams' first tokens).
//! `--profile` adds the time per operation class of an average decode step and prefill
//! chunk over all runs (`kernels::profile`), the engine's time around the forward passes (sampling,
//! detokenization, scheduling), and standalone timings of greedy sampling and streaming
//! detokenization per token. `FLATMESH_KERNELS=avx2` forces the AVX2 kernels on an
//! AVX-512 machine.

use std::{ops::ControlFlow, path::Path, time::Instant};

use flatmesh_runtime::{
    device::Device,
    kernels::profile::{self, Op, Totals},
    sampling::Sampler,
    tokenizer::{GgufTokenizer, StreamDecoder},
    BatchConfig, Engine, GenerateEvent, GenerateRequest, LlmEngine, Prompt, SamplingParams,
};

const USAGE: &str =
    "usage: llm_bench MODEL.gguf [PROMPT_TOKENS] [NEW_TOKENS] [--runs N] [--streams S] [--profile]";

/// First words of the prompts: each run starts differently, so none reuses another's KV.
const FIRST: [&str; 12] = [
    "The", "A", "In", "On", "It", "We", "He", "She", "They", "This", "One", "All",
];

struct Run {
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    prefill_s: f64,
    decode_s: f64,
    text: String,
}

fn greedy(prompt: String, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Text(prompt),
        max_tokens: Some(max_tokens),
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: vec![],
        n: 1,
        logprobs: None,
    }
}

/// A prompt of exactly `tokens` tokens: " the" is one token in byte-level BPE vocabularies.
fn prompt(engine: &LlmEngine, first: &str, tokens: usize) -> String {
    let mut p = first.to_string();
    while engine.count_tokens(&p).unwrap() < tokens {
        p.push_str(" the");
    }
    p
}

/// One request to its end. `on_start` runs when its first token is out.
fn run(engine: &LlmEngine, req: &GenerateRequest, on_start: &dyn Fn()) -> Run {
    let start = Instant::now();
    let mut prefilled = None;
    let g = engine
        .generate(req, &mut |ev| {
            if let GenerateEvent::Started { .. } = ev {
                prefilled = Some(Instant::now());
                on_start();
            }
            ControlFlow::Continue(())
        })
        .expect("generate");
    let end = Instant::now();
    let prefilled = prefilled.expect("started");
    Run {
        prompt_tokens: g.prompt_tokens,
        completion_tokens: g.completion_tokens,
        cached_tokens: g.cached_tokens,
        prefill_s: (prefilled - start).as_secs_f64(),
        decode_s: (end - prefilled).as_secs_f64(),
        text: g.text,
    }
}

fn main() {
    let mut pos = Vec::new();
    let (mut runs, mut streams, mut with_profile) = (1usize, 1usize, false);
    let mut args = std::env::args().skip(1);
    let count = |args: &mut dyn Iterator<Item = String>| -> usize {
        args.next()
            .and_then(|n| n.parse().ok())
            .filter(|n| *n > 0)
            .expect(USAGE)
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--profile" => with_profile = true,
            "--runs" => runs = count(&mut args),
            "--streams" => streams = count(&mut args),
            _ => pos.push(a),
        }
    }
    let path = pos.first().expect(USAGE);
    let prompt_tokens: usize = pos.get(1).map_or(128, |s| s.parse().expect(USAGE));
    let new_tokens: usize = pos.get(2).map_or(128, |s| s.parse().expect(USAGE));

    let t = Instant::now();
    let device = Device::host("host0", u64::MAX);
    let engine = LlmEngine::load(Path::new(path), &device, BatchConfig::default()).expect("load");
    let load_s = t.elapsed().as_secs_f64();

    // Warm-up (its own prompt), then the measured runs.
    let _ = engine.generate(
        &greedy(prompt(&engine, "Once", prompt_tokens), 2),
        &mut |_| ControlFlow::Continue(()),
    );
    profile::enable(with_profile);
    profile::reset();
    let mut all = Vec::new();
    let mut batch_tok_s = 0f64;
    for i in 0..runs {
        let reqs: Vec<_> = (0..streams)
            .map(|j| {
                let k = i * streams + j;
                let p = format!("{} {}", FIRST[k % FIRST.len()], k / FIRST.len());
                greedy(prompt(&engine, &p, prompt_tokens), new_tokens)
            })
            .collect();
        let t = Instant::now();
        // With several streams the profile starts over once every stream has its first token,
        // so its multi-token steps are batched decode steps, not the prompts' prefill.
        let started = std::sync::atomic::AtomicUsize::new(0);
        let on_start = || {
            if streams > 1
                && started.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == streams
            {
                profile::reset();
            }
        };
        let done: Vec<Run> = std::thread::scope(|s| {
            let (engine, on_start) = (&engine, &on_start);
            let all: Vec<_> = reqs
                .iter()
                .map(|r| s.spawn(move || run(engine, r, on_start)))
                .collect();
            all.into_iter().map(|h| h.join().expect("run")).collect()
        });
        let tokens: usize = done.iter().map(|r| r.completion_tokens).sum();
        batch_tok_s = batch_tok_s.max(tokens as f64 / t.elapsed().as_secs_f64());
        all.extend(done);
    }
    let snap = profile::snapshot();
    // Best of the runs for each phase (the machine is shared; the fastest run is the least
    // disturbed one).
    let best = |f: &dyn Fn(&Run) -> f64| all.iter().map(f).fold(0f64, f64::max);
    let prefill_tok_s = best(&|r| (r.prompt_tokens - r.cached_tokens) as f64 / r.prefill_s);
    let decode_tok_s = best(&|r| (r.completion_tokens - 1) as f64 / r.decode_s);
    let r = &all[0];
    let mut line = format!(
        "{{\"engine\":\"flatmesh\",\"kernels\":\"{}\",\"load_s\":{load_s:.3},\"runs\":{runs},\"prompt_tokens\":{},\"cached_tokens\":{},\"new_tokens\":{},\"prefill_tok_s\":{prefill_tok_s:.1},\"decode_tok_s\":{decode_tok_s:.1}",
        engine.kernels(),
        r.prompt_tokens,
        r.cached_tokens,
        r.completion_tokens,
    );
    if with_profile {
        let (sample_us, detok_us) = standalone(Path::new(path), &r.text);
        // Decode wall time not spent in forward passes: sampling, detokenization, the step loop
        // (one stream only: streams overlap in time, and their steps are batched ones).
        let decode_ns: f64 = all.iter().map(|r| r.decode_s * 1e9).sum();
        let engine_us = match streams {
            1 => format!(
                "{:.1}",
                (decode_ns - snap.decode.forward_ns as f64).max(0.0)
                    / 1e3
                    / snap.decode.steps.max(1) as f64
            ),
            _ => "null".to_string(),
        };
        line.push_str(&format!(
            ",\"profile\":{{\"decode_step_us\":{},\"prefill_chunk_us\":{},\"decode_engine_other_us\":{engine_us},\"sample_greedy_us\":{sample_us:.1},\"detokenize_us\":{detok_us:.2}}}",
            per_step(&snap.decode),
            per_step(&snap.prefill),
        ));
        eprintln!("per decode step (us):   {}", per_step(&snap.decode));
        match streams {
            1 => eprintln!("per prefill chunk (us): {}", per_step(&snap.prefill)),
            _ => eprintln!(
                "per batched decode step, last run (us): {}",
                per_step(&snap.prefill)
            ),
        }
        eprintln!("decode engine time outside forward per step: {engine_us} us");
        eprintln!("greedy sampling {sample_us:.1} us/token, detokenization {detok_us:.2} us/token (standalone)");
    }
    if streams > 1 {
        line.push_str(&format!(
            ",\"streams\":{streams},\"batch_tok_s\":{batch_tok_s:.1}"
        ));
    }
    line.push('}');
    println!("{line}");
}

/// `{"steps":..,"tokens":..,"forward":..,"<op>":..}`: microseconds per step.
fn per_step(t: &Totals) -> String {
    let n = t.steps.max(1) as f64;
    let us = |ns: u64| ns as f64 / 1e3 / n;
    let mut s = format!(
        "{{\"steps\":{},\"tokens_per_step\":{:.1},\"forward\":{:.1}",
        t.steps,
        t.tokens as f64 / n,
        us(t.forward_ns)
    );
    let mut known = 0;
    for op in Op::ALL {
        s.push_str(&format!(",\"{}\":{:.1}", op.name(), us(t.get(op))));
        known += t.get(op);
    }
    s.push_str(&format!(
        ",\"unaccounted\":{:.1}}}",
        us(t.forward_ns.saturating_sub(known))
    ));
    s
}

/// Microseconds per token of greedy sampling over a vocabulary-long row and of streaming
/// detokenization of `text`'s tokens, measured outside the engine.
fn standalone(path: &Path, text: &str) -> (f64, f64) {
    use candle_core::quantized::gguf_file::{Content, Value};
    let mut f = std::fs::File::open(path).expect("open");
    let ct = Content::read(&mut f).expect("gguf");
    let vocab = match ct.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => v.len(),
        _ => 32000,
    };
    let tok = GgufTokenizer::from_gguf(&ct).expect("tokenizer");
    let mut logits: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let mut s = Sampler::new(SamplingParams {
        temperature: 0.0,
        ..Default::default()
    });
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(s.sample(&mut logits));
    }
    let sample_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let ids = tok.encode(text).expect("encode");
    let mut dec = StreamDecoder::default();
    let t = Instant::now();
    for &id in &ids {
        std::hint::black_box(dec.push(&tok, id).expect("decode"));
    }
    let detok_us = t.elapsed().as_secs_f64() * 1e6 / ids.len().max(1) as f64;
    (sample_us, detok_us)
}
