//! The model comparison page (`/pages/compare`): one prompt sent to several models the
//! caller's tier may use, one after the other, through the serve path (admitted, limited and
//! recorded like any chat completion), shown side by side: the answer, time to first token,
//! output tokens per second, tokens used and what they cost on the caller's tier.

use std::time::{Duration, Instant};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use flatmesh_runtime::{ChatMessage, GenerateRequest, ModelKind, Prompt, SamplingParams};
use maud::{html, Markup};

use super::{cross_site, error_page, layout, page, signed_in, Form};
use crate::{
    api::{error::ApiError, AppState},
    serve::{self, Endpoint, Output, Work},
    tenancy::{Caller, Tenancy, Tier},
};

/// Most models one comparison runs.
const MAX_MODELS: usize = 6;
/// Longest prompt, in characters.
const MAX_PROMPT_CHARS: usize = 16_384;
/// Most new tokens per answer, and the form's default.
const MAX_TOKENS: usize = 512;
const DEFAULT_TOKENS: usize = 64;
/// How long one model may take.
const PER_MODEL: Duration = Duration::from_secs(300);

/// The chat models the caller's tier may use (embedding models cannot answer a prompt).
fn chat_models(state: &AppState, caller: &Caller) -> Vec<String> {
    state
        .serve
        .cache
        .status()
        .into_iter()
        .filter(|m| m.kind != Some(ModelKind::Embedding))
        .filter(|m| Tenancy::check_model(caller, &m.id).is_ok())
        .map(|m| m.id)
        .collect()
}

/// `GET /pages/compare`: the form.
pub(super) async fn form_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match signed_in(&state, &headers, true) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let asked = Asked {
        prompt: String::new(),
        models: vec![],
        max_tokens: DEFAULT_TOKENS,
    };
    page(StatusCode::OK, compare_page(&state, &caller, &asked, &[]))
}

/// What the form asked for.
#[derive(Debug)]
struct Asked {
    prompt: String,
    models: Vec<String>,
    max_tokens: usize,
}

impl Asked {
    /// The form's fields, checked; the message names the field at fault.
    fn from_form(form: &Form) -> Result<Asked, String> {
        let prompt = form.one("prompt").unwrap_or_default();
        if prompt.trim().is_empty() {
            return Err("prompt: must not be empty".into());
        }
        if prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(format!("prompt: at most {MAX_PROMPT_CHARS} characters"));
        }
        let mut models = form.all("model");
        let mut seen = std::collections::HashSet::new();
        models.retain(|m| seen.insert(m.clone()));
        if models.is_empty() {
            return Err("model: choose at least one model".into());
        }
        if models.len() > MAX_MODELS {
            return Err(format!("model: at most {MAX_MODELS} models at once"));
        }
        let max_tokens = match form.one("max_tokens").filter(|s| !s.trim().is_empty()) {
            None => DEFAULT_TOKENS,
            Some(s) => s
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_TOKENS).contains(n))
                .ok_or_else(|| {
                    format!("max_tokens: {s:?} is not a number from 1 to {MAX_TOKENS}")
                })?,
        };
        Ok(Asked {
            prompt,
            models,
            max_tokens,
        })
    }
}

/// What came of one model.
struct Answer {
    model: String,
    result: Result<Measured, ApiError>,
}

struct Measured {
    /// The ledger's id of the request.
    id: String,
    /// The model that served it (a vmodel resolved).
    served_by: String,
    text: String,
    ttft: Option<Duration>,
    /// From the start to the last token.
    total: Duration,
    prompt_tokens: usize,
    completion_tokens: usize,
    cache: Option<&'static str>,
}

impl Measured {
    /// Output tokens per second after the first: (tokens − 1) / (last − first token).
    fn tokens_per_second(&self) -> Option<f64> {
        let first = self.ttft?;
        let decode = self.total.checked_sub(first)?.as_secs_f64();
        (self.completion_tokens > 1 && decode > 0.0)
            .then(|| (self.completion_tokens - 1) as f64 / decode)
    }
}

/// `POST /pages/compare`: run the prompt on each model in turn and show the answers.
pub(super) async fn run_page(State(state): State<AppState>, req: Request) -> Response {
    let authority = req.uri().authority().map(|a| a.to_string());
    if let Some(r) = cross_site(req.headers(), authority.as_deref()) {
        return r;
    }
    let caller = match signed_in(&state, req.headers(), true) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let body = match axum::body::to_bytes(req.into_body(), 256 << 10).await {
        Ok(b) => b,
        Err(_) => return error_page(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"),
    };
    let asked = match Form::parse(&body).and_then(|f| Asked::from_form(&f)) {
        Ok(a) => a,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
    };
    let mut answers = Vec::with_capacity(asked.models.len());
    for model in &asked.models {
        let result = one(&state, &caller, model, &asked).await;
        answers.push(Answer {
            model: model.clone(),
            result,
        });
    }
    page(
        StatusCode::OK,
        compare_page(&state, &caller, &asked, &answers),
    )
}

/// One model's answer through the serve path, timed.
async fn one(
    state: &AppState,
    caller: &Caller,
    model: &str,
    asked: &Asked,
) -> Result<Measured, ApiError> {
    let prompt = Prompt::Chat(vec![ChatMessage::new("user", asked.prompt.clone())]);
    let sampling = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let started = Instant::now();
    let served = state
        .serve
        .run(serve::Request {
            caller: caller.clone(),
            model: model.to_string(),
            endpoint: Endpoint::ChatCompletions,
            work: Work::Generate(GenerateRequest::new(
                prompt,
                Some(asked.max_tokens),
                sampling,
                vec![],
            )),
            keep_alive: None,
            client_id: None,
            stream: true,
            forwarded: None,
            deadline: Some(started + PER_MODEL),
        })
        .await?;
    let Output::Text(mut generating) = served.output else {
        return Err(ApiError::bad_request(
            "model",
            format!("{model:?} is not a chat model"),
        ));
    };
    let mut ttft = None;
    while let Some(event) = generating.next().await {
        match event {
            serve::Event::Text(t) if !t.text.is_empty() && ttft.is_none() => {
                ttft = Some(started.elapsed());
            }
            serve::Event::Text(_) => {}
            serve::Event::Done(done) => {
                let g = done?;
                return Ok(Measured {
                    id: served.id,
                    served_by: served.model,
                    text: g.text,
                    ttft,
                    total: started.elapsed(),
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: g.completion_tokens,
                    cache: served.cache,
                });
            }
        }
    }
    Err(ApiError::internal(
        "the generation ended without a result".into(),
    ))
}

fn compare_page(state: &AppState, caller: &Caller, asked: &Asked, answers: &[Answer]) -> Markup {
    let models = chat_models(state, caller);
    let body = html! {
        h1 { "Compare models" }
        nav {
            a href="/pages/tenants" { "My usage" }
        }
        p.muted {
            "As tenant " (caller.tenant) " on tier " (caller.tier.name)
            ". Each model answers in turn with greedy decoding; every answer is a request of "
            "yours, admitted, limited and recorded in the ledger like any other."
        }
        form method="post" action="/pages/compare" {
            p {
                label for="prompt" { "Prompt" } br;
                textarea #prompt name="prompt" rows="4" required { (asked.prompt) }
            }
            p {
                "Models: "
                @if models.is_empty() { span.error { "your tier may use no chat model" } }
                @for m in &models {
                    label {
                        input type="checkbox" name="model" value=(m) checked[asked.models.contains(m)];
                        " " (m)
                    }
                    " "
                }
            }
            p {
                label for="max_tokens" { "Most new tokens " }
                input #max_tokens type="number" name="max_tokens" min="1" max=(MAX_TOKENS) value=(asked.max_tokens);
                " " button type="submit" { "Compare" }
            }
        }
        @if !answers.is_empty() {
            div.answers {
                @for a in answers { (answer(a, &caller.tier)) }
            }
        }
    };
    layout("compare models", body)
}

fn answer(a: &Answer, tier: &Tier) -> Markup {
    html! {
        div.answer data-model=(a.model) {
            h2 { (a.model) }
            @match &a.result {
                Err(e) => {
                    p.error.failure { (e.status.as_u16()) " " (e.code) ": " (e.message) }
                }
                Ok(m) => {
                    pre.text { (m.text) }
                    table {
                        @if m.served_by != a.model { tr { th { "served by" } td { (m.served_by) } } }
                        tr { th { "time to first token" } td.n.ttft {
                            (m.ttft.map_or("—".into(), |t| format!("{:.3} s", t.as_secs_f64())))
                        } }
                        tr { th { "tokens per second" } td.n.tps {
                            (m.tokens_per_second().map_or("—".into(), |r| format!("{r:.1}")))
                        } }
                        tr { th { "input tokens" } td.n.input-tokens { (m.prompt_tokens) } }
                        tr { th { "output tokens" } td.n.output-tokens { (m.completion_tokens) } }
                        (cost(m.prompt_tokens + m.completion_tokens, tier))
                        @if let Some(c) = m.cache { tr { th { "response cache" } td { (c) } } }
                        tr { th { "request id" } td { code.id { (m.id) } } }
                    }
                }
            }
        }
    }
}

/// What the tokens cost on the tier: under a flat rate nothing per request; with a monthly
/// budget, the share of it they used, and that share of the tier's monthly price.
fn cost(tokens: usize, tier: &Tier) -> Markup {
    html! {
        @if tier.token_budget > 0 {
            @let share = tokens as f64 / tier.token_budget as f64;
            tr { th { "share of the month's budget" } td.n.budget-share { (format!("{:.4}%", share * 100.0)) } }
            tr { th { "cost on tier " (tier.name) } td.n.cost { (format!("{:.4}", share * tier.price)) } }
        } @else {
            tr { th { "cost on tier " (tier.name) } td.n.cost { "0.0000 (flat fee, no budget)" } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<Asked, String> {
        Asked::from_form(&Form::parse(body.as_bytes()).unwrap())
    }

    #[test]
    fn the_form_is_checked_field_by_field() {
        assert!(form("model=a").unwrap_err().starts_with("prompt:"));
        assert!(form("prompt=hi").unwrap_err().starts_with("model:"));
        let many = (0..7).map(|i| format!("&model=m{i}")).collect::<String>();
        assert!(form(&format!("prompt=hi{many}"))
            .unwrap_err()
            .starts_with("model:"));
        assert!(form("prompt=hi&model=a&max_tokens=0")
            .unwrap_err()
            .starts_with("max_tokens:"));
        assert!(form("prompt=hi&model=a&max_tokens=x")
            .unwrap_err()
            .starts_with("max_tokens:"));
        let a = form("prompt=hi&model=a&model=b&max_tokens=").unwrap();
        assert_eq!((a.models.len(), a.max_tokens), (2, DEFAULT_TOKENS));
    }

    #[test]
    fn tokens_per_second_counts_the_tokens_after_the_first() {
        let m = Measured {
            id: String::new(),
            served_by: String::new(),
            text: String::new(),
            ttft: Some(Duration::from_secs(1)),
            total: Duration::from_secs(3),
            prompt_tokens: 5,
            completion_tokens: 11,
            cache: None,
        };
        assert_eq!(m.tokens_per_second(), Some(5.0));
    }
}
