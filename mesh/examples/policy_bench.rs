//! Per-call cost of each policy slot with the example plugins, pooled instances against a fresh
//! instance per call. Build the plugins first (`plugins/build`), then:
//! `cargo run --release -p flatmesh --example policy_bench [-- ITERATIONS]`

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use flatmesh::{
    cache::residency::{Candidate as Idle, Verdict},
    metrics::Metrics,
    policy::{
        Answer, AnswerShape, CachePrompt, Candidate, PeriodUse, Policies, PolicyConfig,
        PromptFeatures, RequestInfo, ResponseFormat, SlotConfig, Usage,
    },
};
use serde_json::json;

fn plugin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(p.exists(), "{} is missing: run plugins/build", p.display());
    p
}

fn slot(name: &str, config: serde_json::Value) -> Option<SlotConfig> {
    Some(SlotConfig {
        plugin: plugin(name),
        config: Some(config),
        on_failure: Default::default(),
        deadline_ms: None,
        default_target: None,
    })
}

fn request(i: usize) -> RequestInfo {
    RequestInfo {
        id: format!("req-{i}"),
        tenant: "city-a".into(),
        tier: "gold".into(),
        model: "auto".into(),
        endpoint: "chat_completions".into(),
        prompt_tokens: 12,
        max_tokens: 64,
        streamed: false,
        features: PromptFeatures {
            chars: 48,
            messages: 1,
            code_blocks: 0,
            questions: 1,
        },
        shape: AnswerShape {
            choices: 1,
            logprobs: None,
            format: ResponseFormat::Text,
            tools: Vec::new(),
        },
    }
}

fn candidates() -> Vec<Candidate> {
    ["small", "large"]
        .iter()
        .map(|name| Candidate {
            name: name.to_string(),
            kind: "llm".into(),
            loaded: true,
            queue_depth: 0,
            size_bytes: 100 << 20,
            context_length: 8192,
        })
        .collect()
}

/// Mean, p50 and p99 of `n` runs of `f`, in microseconds.
async fn measure<F, Fut>(n: usize, mut f: F) -> (f64, f64, f64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for i in 0..n / 10 {
        f(i).await; // warm up
    }
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        times.push(t.elapsed());
    }
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = times.iter().map(|d| us(*d)).sum::<f64>() / n as f64;
    (mean, us(times[n / 2]), us(times[n * 99 / 100]))
}

async fn run(label: &str, instances: usize, n: usize) {
    let config = PolicyConfig {
        instances,
        router: slot(
            "cost_router",
            json!({"alias": "auto", "models": ["small", "large"]}),
        ),
        cache: slot("semantic_cache", json!({})),
        pricing: slot(
            "solidarity_pricing",
            json!({"budgets": {"gold": 1_000_000_000u64}}),
        ),
        residency: slot(
            "office_hours",
            json!({"keep": ["m0", "m1"], "from_hour": 0, "to_hour": 24}),
        ),
        ..PolicyConfig::default()
    };
    let policies = Policies::new(&config, None, Duration::from_secs(5), Metrics::new()).unwrap();
    policies.load_configured(&config).await.unwrap();
    let used = || PeriodUse {
        period: "2026-11".into(),
        requests: 10,
        tokens: 1000,
    };
    let prompt = |i: usize| CachePrompt {
        request: request(i),
        target: "small".into(),
        text: format!("user: what is the capital of country number {i}?"),
        temperature: 0.0,
        seed: None,
    };
    let answer = Answer {
        text: "Paris".into(),
        finish_reason: "stop".into(),
        completion_tokens: 2,
    };
    let usage = &Usage {
        prompt_tokens: 12,
        completion_tokens: 2,
        device_ms: 80,
        cache_hit: false,
    };
    println!("== {label}");
    let report = |name: &str, (mean, p50, p99): (f64, f64, f64)| {
        println!("{name:<28} mean {mean:8.2} µs   p50 {p50:8.2} µs   p99 {p99:8.2} µs");
    };
    let p = &policies;
    let answer = &answer;
    let prompt = &prompt;
    report(
        "router.route",
        measure(n, |i| async move {
            let r = p.route(&request(i), candidates(), false).await.unwrap();
            assert_eq!(r.unwrap().target, "small");
        })
        .await,
    );
    report(
        "cache.lookup (miss)",
        measure(n, |i| async move {
            assert!(p.lookup(&prompt(i + 1_000_000)).await.unwrap().is_none());
        })
        .await,
    );
    // 1000 distinct prompts: the store stays below its cap, so every later lookup hits.
    report(
        "cache.store",
        measure(
            n,
            |i| async move { p.store(&prompt(i % 1000), answer).await },
        )
        .await,
    );
    report(
        "cache.lookup (hit)",
        measure(n, |i| async move {
            assert!(p.lookup(&prompt(i % 1000)).await.unwrap().is_some());
        })
        .await,
    );
    report(
        "pricing.admit",
        measure(
            n,
            |i| async move { p.admit(&request(i), used).await.unwrap() },
        )
        .await,
    );
    report(
        "pricing.charge",
        measure(n, |i| async move { p.charge(&request(i), *usage).await }).await,
    );
    // One eviction decision over the idle copies of a node holding 12 models.
    let copies: Vec<Idle> = (0..12)
        .map(|m| Idle {
            model: format!("m{m}"),
            device: "host0".into(),
            bytes: 100 << 20,
            idle_ms: 1000 * m,
            age_ms: 60_000,
            demand: m as f64,
            load_ms: 300,
            favoured: false,
        })
        .collect();
    let copies = &copies;
    report(
        "residency.order (12 copies)",
        measure(n, |_| async move {
            let v = p.order(copies.clone()).await;
            assert!(matches!(v, Verdict::Order(o) if o.len() == 12));
        })
        .await,
    );
    report(
        "all slots of one request",
        measure(n, |i| async move {
            let req = request(i);
            p.route(&req, candidates(), false).await.unwrap();
            p.admit(&req, used).await.unwrap();
            let cp = prompt(i + 2_000_000);
            p.lookup(&cp).await.unwrap();
            p.store(&cp, answer).await;
            p.charge(&req, *usage).await;
        })
        .await,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ITERATIONS is a number"))
        .unwrap_or(20_000);
    run(
        "pooled instances (the agent's default: 4 kept ready per slot)",
        4,
        n,
    )
    .await;
    run(
        "a fresh instance per call (instantiate + init, no pool)",
        0,
        n / 10,
    )
    .await;
}
