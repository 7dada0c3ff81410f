//! Times a page-in of an LLM: from "load" to the first token, from the page cache (the file
//! mapped) and from the warm tier (the file's bytes in memory), beside a memory copy of the
//! same bytes; and the copy's accounted bytes with 4 active sequences of 1k tokens.
//!
//! `cargo run --release -p flatmesh-runtime --example pagein_bench -- MODEL.gguf [RUNS]`
//! prints one JSON line.

use std::{ops::ControlFlow, path::Path, sync::Arc, time::Instant};

use flatmesh_runtime::{
    device::Device, BatchConfig, Engine, GenerateRequest, LlmEngine, Prompt, SamplingParams,
};

fn first_token(engine: &LlmEngine) {
    let req = GenerateRequest {
        prompt: Prompt::Text("Hello".into()),
        max_tokens: Some(1),
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: vec![],
        n: 1,
        logprobs: None,
    };
    engine
        .generate(&req, &mut |_| ControlFlow::Continue(()))
        .expect("generate");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = Path::new(args.get(1).expect("usage: pagein_bench MODEL.gguf [RUNS]"));
    let runs: usize = args.get(2).map_or(5, |s| s.parse().expect("RUNS"));
    let device = Device::host("host0", u64::MAX);
    let config = BatchConfig::default();
    let image = Arc::new(std::fs::read(path).expect("read the model"));
    // Warm the page cache and the worker pool; the warm tier keeps the text parts with the
    // image, as the cache does.
    let text = LlmEngine::load(path, &device, config).expect("load");
    first_token(&text);
    let text = text.text_parts();

    let (mut copy, mut mapped, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let copied = image.as_slice().to_vec();
        copy.push(t.elapsed().as_secs_f64());
        drop(std::hint::black_box(copied));

        let t = Instant::now();
        first_token(&LlmEngine::load(path, &device, config).expect("load"));
        mapped.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let engine = LlmEngine::load_image(image.clone(), Some(text.clone()), &device, config)
            .expect("load");
        first_token(&engine);
        warm.push(t.elapsed().as_secs_f64());
    }

    // Accounted bytes of a copy whose KV pool holds exactly 4 sequences of 1024 tokens.
    let four = BatchConfig {
        kv_tokens: 4 * 1024,
        ..config
    };
    let sized = LlmEngine::load(path, &device, four).expect("load");
    let default = LlmEngine::load(path, &device, config).expect("load");
    let (copy, mapped, warm) = (median(copy), median(mapped), median(warm));
    println!(
        "{{\"bytes\":{},\"memcpy_ms\":{:.2},\"memcpy_gb_s\":{:.2},\"page_cache_to_first_token_ms\":{:.2},\"warm_to_first_token_ms\":{:.2},\"warm_over_memcpy\":{:.2},\"accounted_bytes_4x1k\":{},\"accounted_bytes_default_pool\":{},\"kv_bytes_per_token\":{}}}",
        image.len(),
        copy * 1e3,
        image.len() as f64 / copy / 1e9,
        mapped * 1e3,
        warm * 1e3,
        warm / copy,
        sized.size_bytes(),
        default.size_bytes(),
        sized.kv_bytes() / (4 * 1024),
    );
}
