//! semantic-cache: answers a repeated prompt from the cache, exactly or by embedding similarity,
//! in one namespace per model (the host scopes every namespace to the calling tenant).
//!
//! Config (JSON):
//! ```json
//! { "embedding_model": "all-minilm-l6-v2", "threshold": 0.95, "ttl_s": 600,
//!   "max_prompt_chars": 8000, "deterministic_only": true }
//! ```
//! Without `embedding_model` only exact repeats hit. With `deterministic_only` (the default) a
//! request sampled with temperature > 0 and no seed is neither looked up nor stored.

use std::cell::RefCell;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit", world: "cache" });

use flatmesh::policy::answers;
use flatmesh::policy::embedder::embed;
use flatmesh::policy::kv;
use flatmesh::policy::log::{log, Level};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    embedding_model: Option<String>,
    #[serde(default = "default_threshold")]
    threshold: f32,
    #[serde(default = "default_ttl")]
    ttl_s: u64,
    #[serde(default = "default_max_chars")]
    max_prompt_chars: u32,
    #[serde(default = "default_true")]
    deterministic_only: bool,
}

fn default_threshold() -> f32 {
    0.95
}
fn default_ttl() -> u64 {
    600
}
fn default_max_chars() -> u32 {
    8000
}
fn default_true() -> bool {
    true
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

fn with_config<R>(f: impl FnOnce(&Config) -> Result<R, String>) -> Result<R, String> {
    CONFIG.with(|c| {
        f(c.borrow()
            .as_ref()
            .ok_or("semantic-cache: not initialised")?)
    })
}

/// The exact-match key: the prompt and everything else that changes the answer.
fn key(prompt: &Prompt) -> String {
    let mut h = DefaultHasher::new();
    prompt.text.hash(&mut h);
    prompt.request.max_tokens.hash(&mut h);
    prompt.seed.hash(&mut h);
    prompt.temperature.to_bits().hash(&mut h);
    format!("{:016x}", h.finish())
}

fn cacheable(config: &Config, prompt: &Prompt) -> bool {
    prompt.request.features.chars <= config.max_prompt_chars
        && (!config.deterministic_only || prompt.temperature == 0.0 || prompt.seed.is_some())
}

/// Where the lookup leaves the prompt's vector for `store`, so it is embedded once.
fn vector_key(prompt: &Prompt) -> String {
    format!("vector/{}", prompt.request.id)
}

struct SemanticCache;

impl Guest for SemanticCache {
    fn init(config: String) -> Result<(), String> {
        let config: Config =
            serde_json::from_str(&config).map_err(|e| format!("semantic-cache config: {e}"))?;
        if !(0.0..=1.0).contains(&config.threshold) {
            return Err(format!(
                "semantic-cache config: threshold {} is not in [0, 1]",
                config.threshold
            ));
        }
        CONFIG.with(|c| *c.borrow_mut() = Some(config));
        Ok(())
    }

    fn lookup(prompt: Prompt) -> Result<Option<Answer>, String> {
        with_config(|config| {
            if !cacheable(config, &prompt) {
                return Ok(None);
            }
            if let Some(hit) = answers::get(&prompt.target, &key(&prompt)) {
                return Ok(Some(hit));
            }
            let Some(model) = &config.embedding_model else {
                return Ok(None);
            };
            let vector = match embed(model, &prompt.text) {
                Ok(v) => v,
                Err(e) => {
                    log(Level::Warn, &format!("no embedding, exact match only: {e}"));
                    return Ok(None);
                }
            };
            if let Some(near) = answers::nearest(&prompt.target, &vector, config.threshold) {
                return Ok(Some(near.answer));
            }
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            kv::set(&vector_key(&prompt), &bytes, 60_000)?;
            Ok(None)
        })
    }

    fn store(prompt: Prompt, answer: Answer) -> Result<(), String> {
        with_config(|config| {
            if !cacheable(config, &prompt) {
                return Ok(());
            }
            let vector = kv::get(&vector_key(&prompt)).map(|bytes| {
                kv::delete(&vector_key(&prompt));
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect::<Vec<f32>>()
            });
            answers::put(
                &prompt.target,
                &key(&prompt),
                &answer,
                vector.as_deref(),
                config.ttl_s * 1000,
            )
        })
    }
}

export!(SemanticCache);
