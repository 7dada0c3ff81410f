//! What constrained decoding costs per token on a real vocabulary: the first-use build of the
//! token trie, compiling a schema, and the mask and commit of each step, timed over a long
//! answer (logits drawn at random, the best allowed token taken, as greedy would).
//!
//!     cargo run --release -p flatmesh-runtime --example constrain_bench -- models/smollm2-135m-instruct/model.gguf

use std::{sync::Arc, time::Instant};

use flatmesh_runtime::{
    constrain::{Grammar, Grammars},
    tokenizer::GgufTokenizer,
};

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/smollm2-135m-instruct/model.gguf".into());
    let mut file = std::fs::File::open(&path).expect("open the GGUF");
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file).expect("read the GGUF");
    let tok = GgufTokenizer::from_gguf(&ct).expect("tokenizer");
    let vocab = tok.tokenizer.get_vocab_size(true);
    let schema = serde_json::json!({"type": "object", "properties": {
        "names": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 200},
        "count": {"type": "integer"}}, "required": ["names"]});
    let grammars = Grammars::new(Arc::new(tok), vocab);
    let t = Instant::now();
    grammars.constraint(Some(&Grammar::JsonObject)).unwrap();
    println!("token trie of {vocab} tokens, first use: {:.1} ms", ms(t));
    let t = Instant::now();
    let mut c = grammars
        .constraint(Some(&Grammar::JsonSchema(schema)))
        .unwrap()
        .unwrap();
    println!("compile the schema: {:.2} ms", ms(t));
    let (mut mask, mut commit, mut seed) = (0.0, 0.0, 1u64);
    let steps = 256;
    for _ in 0..steps {
        let mut logits: Vec<f32> = (0..vocab)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (seed >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        let t = Instant::now();
        c.mask(&mut logits).unwrap();
        mask += ms(t);
        let best = (0..vocab)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        let t = Instant::now();
        let done = c.commit(best as u32).unwrap();
        commit += ms(t);
        assert!(!done, "the schema keeps the answer open");
    }
    let per = |x: f64| 1000.0 * x / steps as f64;
    println!(
        "per token over {steps} tokens: mask {:.0} µs, commit {:.0} µs",
        per(mask),
        per(commit)
    );
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
