//! The engine against the demo model: `n` choices from one prefill, logprobs, and the prefix
//! cache giving what a full prefill gives.

use std::{ops::ControlFlow, sync::Arc};

use super::{tests::demo_path, BatchConfig, LlmEngine};
use crate::{
    device::Device, Engine, GenerateEvent, GenerateRequest, Generation, Prompt, SamplingParams,
};

fn engine(config: BatchConfig) -> LlmEngine {
    LlmEngine::load(&demo_path(), &Device::host("host0", u64::MAX), config).unwrap()
}

fn req(prompt: &str, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest::new(
        Prompt::Text(prompt.into()),
        Some(max_tokens),
        sampling,
        vec![],
    )
}

fn run(e: &LlmEngine, r: &GenerateRequest) -> Generation {
    e.generate(r, &mut |_| ControlFlow::Continue(())).unwrap()
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn each_of_n_choices_is_what_its_own_seed_gives_alone() {
    let e = engine(BatchConfig::default());
    let prompt = "Once upon a time, in a small village,";
    let mut r = req(prompt, 20, seeded(7));
    r.n = 3;
    let mut streamed = vec![String::new(); 3];
    let g = e
        .generate(&r, &mut |ev| {
            if let GenerateEvent::Text(d) = ev {
                streamed[d.choice].push_str(&d.text);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(g.others.len(), 2);
    let texts: Vec<&str> = std::iter::once(g.text.as_str())
        .chain(g.others.iter().map(|c| c.text.as_str()))
        .collect();
    assert_eq!(streamed, texts);
    for (i, text) in texts.iter().enumerate() {
        let alone = run(&e, &req(prompt, 20, seeded(7 + i as u64)));
        assert_eq!(*text, alone.text, "choice {i}");
    }
    assert_ne!(texts[0], texts[1], "other seeds, other texts");
    let per_choice: usize = 20 + g.others.iter().map(|c| c.completion_tokens).sum::<usize>();
    assert_eq!(g.completion_tokens, per_choice, "every choice's tokens");
    assert_eq!(
        g.prompt_tokens,
        run(&e, &req(prompt, 1, seeded(1))).prompt_tokens
    );
}

#[test]
fn n_choices_with_a_stop_string_end_each_on_its_own() {
    let e = engine(BatchConfig::default());
    let mut r = req("1, 2, 3, 4,", 24, seeded(3));
    r.n = 4;
    r.stop = vec![",".into()];
    let g = run(&e, &r);
    for c in std::iter::once(&g.text).chain(g.others.iter().map(|c| &c.text)) {
        assert!(!c.contains(','), "{c:?}");
    }
}

#[test]
fn logprobs_are_sorted_at_most_zero_and_greedy_picks_the_top() {
    let e = engine(BatchConfig::default());
    let mut r = req(
        "The capital of France is",
        8,
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
    );
    r.logprobs = Some(5);
    let g = run(&e, &r);
    let lps = g.logprobs.as_ref().unwrap();
    assert_eq!(lps.len(), 8);
    let bytes: Vec<u8> = lps.iter().flat_map(|t| t.chosen.bytes.clone()).collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), g.text);
    for t in lps {
        assert_eq!(t.top.len(), 5);
        assert_eq!(t.top[0], t.chosen, "greedy picks the most likely token");
        assert!(t.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(t.top.iter().all(|a| a.logprob <= 0.0));
    }
    // The same text without logprobs: scoring changes nothing.
    r.logprobs = None;
    assert_eq!(run(&e, &r).text, g.text);
    assert_eq!(run(&e, &r).logprobs, None);
}

#[test]
fn token_bytes_undo_the_byte_level_encoding() {
    let e = engine(BatchConfig::default());
    let text = "Café — 東京 ✓ <|im_end|>";
    let ids = e.tokenizer().encode(text).unwrap();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&id| e.tokenizer().token_bytes(id))
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), text);
}

#[test]
fn a_prefix_cache_hit_gives_the_text_of_a_full_prefill() {
    let system = "You are a careful assistant for the city archive. Answer briefly. ".repeat(6);
    let on = engine(BatchConfig::default());
    let off = engine(BatchConfig {
        prefix_cache: false,
        ..Default::default()
    });
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    for q in ["Where is the town hall?", "When does the library open?"] {
        let r = req(
            &format!("{system}\nQuestion: {q}\nAnswer:"),
            16,
            greedy.clone(),
        );
        let miss = run(&off, &r);
        assert_eq!(miss.cached_tokens, 0);
        let first = run(&on, &r);
        let hit = run(&on, &r);
        assert_eq!(hit.text, miss.text, "{q}");
        assert_eq!(first.text, miss.text, "{q}");
        assert!(hit.cached_tokens >= first.cached_tokens, "{q}");
        assert!(hit.cached_tokens >= hit.prompt_tokens - 16, "{q}");
        assert!(hit.cached_tokens < hit.prompt_tokens);
    }
    // The second question shares the system prompt with the first.
    let r = req(
        &format!("{system}\nQuestion: Who are you?\nAnswer:"),
        4,
        greedy,
    );
    let shared = on.count_tokens(&system).unwrap() / 16 * 16;
    assert!(shared >= 64);
    assert!(run(&on, &r).cached_tokens >= shared - 16);
}

#[test]
fn prefix_cache_blocks_give_way_when_the_pool_is_full() {
    // 192 positions: each 100-token prompt leaves its blocks cached, and later ones evict them.
    let small = BatchConfig {
        kv_tokens: 192,
        ..Default::default()
    };
    let e = Arc::new(engine(small));
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Story {i}: ") + &"the river ran past the mill and on. ".repeat(10))
        .collect();
    let first: Vec<String> = prompts
        .iter()
        .map(|p| run(&e, &req(p, 12, greedy.clone())).text)
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (e, g) = (e.clone(), greedy.clone());
                s.spawn(move || run(&e, &req(p, 12, g)).text)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, first);
}
