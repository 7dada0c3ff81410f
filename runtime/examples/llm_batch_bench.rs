//! Times batched decode in-process: N sequences generate at once on one copy (continuous
//! batching), and the total decode tokens/s is printed beside one sequence's.
//!
//! `cargo run --release -p flatmesh-runtime --example llm_batch_bench -- MODEL.gguf [STREAMS] [NEW_TOKENS]`
//! prints one JSON line.

use std::{ops::ControlFlow, path::Path, sync::Arc, time::Instant};

use flatmesh_runtime::{
    device::Device, BatchConfig, Engine, GenerateRequest, LlmEngine, Prompt, SamplingParams,
};

/// Total new tokens per second of `streams` sequences generating `new` tokens each at once.
fn decode(engine: &Arc<LlmEngine>, streams: usize, new: usize) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let req = GenerateRequest {
                    prompt: Prompt::Text(format!("Story {i}: once upon a time")),
                    max_tokens: Some(new),
                    sampling: SamplingParams {
                        temperature: 0.0,
                        ..Default::default()
                    },
                    stop: vec![],
                    n: 1,
                    logprobs: None,
                };
                let g = engine
                    .generate(&req, &mut |_| ControlFlow::Continue(()))
                    .expect("generate");
                g.completion_tokens
            })
        })
        .collect();
    let tokens: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    tokens as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: llm_batch_bench MODEL.gguf [STREAMS] [NEW_TOKENS]");
    let streams: usize = args.get(2).map_or(8, |s| s.parse().expect("STREAMS"));
    let new: usize = args.get(3).map_or(128, |s| s.parse().expect("NEW_TOKENS"));
    let device = Device::host("host0", u64::MAX);
    let engine =
        Arc::new(LlmEngine::load(Path::new(path), &device, BatchConfig::default()).expect("load"));
    let _ = decode(&engine, 1, 4); // warm-up
    let one = decode(&engine, 1, new);
    let many = decode(&engine, streams, new);
    println!(
        "{{\"engine\":\"flatmesh\",\"kernels\":\"{}\",\"streams\":{streams},\"new_tokens\":{new},\"one_tok_s\":{one:.1},\"total_tok_s\":{many:.1},\"ratio\":{:.2}}}",
        engine.kernels(),
        many / one
    );
}
