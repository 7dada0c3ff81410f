//! cost-router: serves an alias (e.g. `auto`) by sending short, simple prompts to the cheapest
//! model and long or complex ones to the most capable one the tier may use.
//!
//! Config (JSON):
//! ```json
//! { "alias": "auto", "models": ["small", "large"], "long_prompt_tokens": 256,
//!   "max_questions": 2, "large_max_tokens": 512, "low_latency_tiers": ["interactive"] }
//! ```
//! `models` go from cheapest to most capable. A tier in `low_latency_tiers` gets a loaded model
//! rather than waiting for a page-in, when one of its allowed models is loaded.

use std::cell::RefCell;

use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit", world: "router" });

use flatmesh::policy::log::{log, Level};
use flatmesh::policy::types::ResponseFormat;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    alias: String,
    models: Vec<String>,
    #[serde(default = "default_long_prompt")]
    long_prompt_tokens: u32,
    #[serde(default = "default_max_questions")]
    max_questions: u32,
    #[serde(default = "default_large_max_tokens")]
    large_max_tokens: u32,
    #[serde(default)]
    low_latency_tiers: Vec<String>,
}

fn default_long_prompt() -> u32 {
    256
}
fn default_max_questions() -> u32 {
    2
}
fn default_large_max_tokens() -> u32 {
    512
}

thread_local! {
    static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
}

struct CostRouter;

impl Guest for CostRouter {
    fn init(config: String) -> Result<(), String> {
        let config: Config =
            serde_json::from_str(&config).map_err(|e| format!("cost-router config: {e}"))?;
        if config.models.is_empty() {
            return Err("cost-router config: `models` must name at least one model".into());
        }
        log(
            Level::Info,
            &format!("routing `{}` over {:?}", config.alias, config.models),
        );
        CONFIG.with(|c| *c.borrow_mut() = Some(config));
        Ok(())
    }

    fn route(request: RequestInfo, candidates: Vec<Candidate>) -> Result<Option<Decision>, String> {
        CONFIG.with(|c| {
            let config = c.borrow();
            let config = config.as_ref().ok_or("cost-router: not initialised")?;
            if request.model != config.alias {
                return Ok(None);
            }
            Ok(decide(config, &request, &candidates))
        })
    }
}

/// Why a prompt needs the capable model, if it does.
fn complexity(config: &Config, request: &RequestInfo) -> Option<String> {
    if request.prompt_tokens >= config.long_prompt_tokens {
        return Some(format!(
            "long prompt ({} tokens >= {})",
            request.prompt_tokens, config.long_prompt_tokens
        ));
    }
    if request.features.code_blocks > 0 {
        return Some(format!("{} code block(s)", request.features.code_blocks));
    }
    if request.features.questions > config.max_questions {
        return Some(format!("{} questions", request.features.questions));
    }
    if !request.shape.tools.is_empty() {
        return Some(format!("tools offered ({})", request.shape.tools.join(", ")));
    }
    if !matches!(request.shape.format, ResponseFormat::Text) {
        return Some("structured output".to_string());
    }
    if request.max_tokens >= config.large_max_tokens {
        return Some(format!("long answer ({} max tokens)", request.max_tokens));
    }
    None
}

fn decide(config: &Config, request: &RequestInfo, candidates: &[Candidate]) -> Option<Decision> {
    // The alias's models that this tier may use, cheapest first.
    let allowed: Vec<&Candidate> = config
        .models
        .iter()
        .filter_map(|m| candidates.iter().find(|c| &c.name == m))
        .collect();
    if allowed.is_empty() {
        return None;
    }
    let why = complexity(config, request);
    let mut order: Vec<&Candidate> = allowed.clone();
    if why.is_some() {
        order.reverse();
    }
    let mut reason = match &why {
        Some(w) => format!("{w}: most capable allowed model"),
        None => "short, simple prompt: cheapest allowed model".to_string(),
    };
    if config.low_latency_tiers.contains(&request.tier) && !order[0].loaded {
        if let Some(i) = order.iter().position(|c| c.loaded) {
            let loaded = order.remove(i);
            order.insert(0, loaded);
            reason.push_str("; loaded model preferred for a low-latency tier");
        }
    }
    Some(Decision {
        target: order[0].name.clone(),
        fallbacks: order[1..].iter().map(|c| c.name.clone()).collect(),
        reason,
    })
}

export!(CostRouter);
