//! Times the LLM engine in-process: prefill and decode tokens/s for one sequence.
//!
//! `cargo run --release -p flatmesh-runtime --example llm_bench -- MODEL.gguf [PROMPT_TOKENS] [NEW_TOKENS]`
//! prints one JSON line, so scripts can set it beside other engines.

use std::{ops::ControlFlow, path::Path, time::Instant};

use flatmesh_runtime::{
    device::Device, BatchConfig, Engine, GenerateEvent, GenerateRequest, LlmEngine, Prompt,
    SamplingParams,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: llm_bench MODEL.gguf [PROMPT_TOKENS] [NEW_TOKENS]");
    let prompt_tokens: usize = args
        .get(2)
        .map_or(128, |s| s.parse().expect("PROMPT_TOKENS"));
    let new_tokens: usize = args.get(3).map_or(128, |s| s.parse().expect("NEW_TOKENS"));

    let t = Instant::now();
    let device = Device::host("host0", u64::MAX);
    let engine = LlmEngine::load(Path::new(path), &device, BatchConfig::default()).expect("load");
    let load_s = t.elapsed().as_secs_f64();

    // A prompt of exactly `prompt_tokens` tokens: " the" is one token in byte-level BPE vocabularies.
    let mut prompt = "The".to_string();
    while engine.count_tokens(&prompt).unwrap() < prompt_tokens {
        prompt.push_str(" the");
    }
    let req = GenerateRequest {
        prompt: Prompt::Text(prompt),
        max_tokens: Some(new_tokens),
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: vec![],
        n: 1,
        logprobs: None,
    };
    // Warm-up, then the measured run.
    let _ = engine.generate(
        &GenerateRequest {
            max_tokens: Some(2),
            ..req.clone()
        },
        &mut |_| ControlFlow::Continue(()),
    );
    let start = Instant::now();
    let mut prefilled = None;
    let g = engine
        .generate(&req, &mut |ev| {
            if let GenerateEvent::Started { .. } = ev {
                prefilled = Some(Instant::now());
            }
            ControlFlow::Continue(())
        })
        .expect("generate");
    let end = Instant::now();
    let prefilled = prefilled.expect("started");
    let prefill_s = (prefilled - start).as_secs_f64();
    let decode_s = (end - prefilled).as_secs_f64();
    println!(
        "{{\"engine\":\"flatmesh\",\"kernels\":\"{}\",\"load_s\":{load_s:.3},\"prompt_tokens\":{},\"new_tokens\":{},\"prefill_tok_s\":{:.1},\"decode_tok_s\":{:.1}}}",
        engine.kernels(),
        g.prompt_tokens,
        g.completion_tokens,
        g.prompt_tokens as f64 / prefill_s,
        (g.completion_tokens - 1) as f64 / decode_s,
    );
}
