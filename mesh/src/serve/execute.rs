//! The serve path's last step: the engine runs the work under its limit (or the response cache
//! has the answer), and what was computed is recorded whether or not the client waited for it.

use std::sync::Arc;

use flatmesh_runtime::{Embeddings, Engine, Generation};
use tokio::sync::oneshot;

use super::{
    bill::Bill,
    error::ServeError,
    generate::{self, Finish, Generating, Limit},
    held::Held,
    request::{Output, Served, Work},
    track::{TokenCounter, Tracker},
};
use crate::{policy::CachePrompt, tenancy::limits::Admission};

/// What the steps before the engine came to.
pub(super) enum Prepared {
    /// A peer served it.
    Answered(Served),
    /// The response cache has the answer.
    Hit(Box<Hit>),
    /// A copy and a slot here: the engine runs it.
    Ready(Box<Ready>),
}

/// An answer of the response cache, admitted and not yet recorded.
pub(super) struct Hit {
    pub bill: Bill,
    pub model: String,
    pub route: Option<String>,
    pub generation: Generation,
    pub admission: Admission,
}

impl Hit {
    /// Record the answer and give it.
    pub async fn answer(
        self: Box<Self>,
        id: String,
        tracker: &mut Option<Tracker>,
    ) -> Result<Served, ServeError> {
        let g = self.generation;
        self.bill
            .record(&self.model, g.prompt_tokens, g.completion_tokens)
            .await?;
        if let Some(t) = tracker {
            t.first_token();
            t.tokens(g.prompt_tokens, g.completion_tokens);
        }
        drop(self.admission);
        Ok(Served {
            id,
            model: self.model,
            route: self.route,
            cache: Some("hit"),
            node: None,
            output: Output::Text(Generating::ready(g)),
        })
    }
}

/// A request with a copy and a slot: what the engine needs, and what its answer carries.
pub(super) struct Ready {
    pub engine: Arc<dyn Engine>,
    pub held: Held,
    pub work: Work,
    pub bill: Bill,
    pub model: String,
    pub route: Option<String>,
    /// `miss` when the response cache was asked.
    pub cache: Option<&'static str>,
    /// Offer the answer to the response cache under this prompt.
    pub remember: Option<CachePrompt>,
}

/// Run the work on the engine: embeddings whole, a generation as a stream. A generation takes
/// the tracker with it (it ends the request when the engine ends).
pub(super) async fn run(
    id: String,
    ready: Box<Ready>,
    limit: Limit,
    tracker: &mut Option<Tracker>,
) -> Result<Served, ServeError> {
    let Ready {
        engine,
        held,
        work,
        bill,
        model,
        route,
        cache,
        remember,
    } = *ready;
    let output = match work {
        Work::Embed { inputs, dimensions } => {
            let dims = engine.info().embedding_dims;
            if let Some(d) = dimensions.filter(|&d| Some(d as usize) != dims) {
                drop(held);
                return Err(ServeError::bad_request(
                    "dimensions",
                    format!("{d} is not supported; this model has {}", dims.unwrap_or(0)),
                ));
            }
            let counter = tracker.as_ref().map(Tracker::counter);
            let out = embed(engine, inputs, held, (bill, &model, counter), limit).await?;
            Output::Embeddings(out)
        }
        Work::Generate(gen) | Work::Infer { generate: gen, .. } => {
            let finish = Finish {
                bill,
                tracker: tracker.take().expect("taken once"),
                model: model.clone(),
                remember,
                limit,
            };
            Output::Text(generate::start(engine, gen, held, finish).await?)
        }
    };
    Ok(Served {
        id,
        model,
        route,
        cache,
        node: None,
        output,
    })
}

/// Embed on the blocking pool. An embedding cannot be stopped halfway: `held` lives with the
/// engine (lease and slot go back when it ends), and it is recorded then, even when the client
/// left or was told its time was up.
async fn embed(
    engine: Arc<dyn Engine>,
    inputs: Vec<String>,
    held: Held,
    (bill, model, counter): (Bill, &str, Option<TokenCounter>),
    limit: Limit,
) -> Result<Embeddings, ServeError> {
    let model = model.to_string();
    let task = tokio::task::spawn_blocking(move || (engine.embed(&inputs), held));
    let (tx, answer) = oneshot::channel();
    let record = async move {
        let result = match task.await {
            Err(e) => Err(ServeError::internal(format!("embedding task failed: {e}"))),
            // Refused for its own content (inputs over the context) after the work of
            // reading them: it keeps its rate count, so the refusal cannot be farmed.
            Ok((Err(e), held)) => {
                drop(held);
                Err(ServeError::from(e))
            }
            Ok((Ok(out), held)) => {
                drop(held); // back before the ledger write
                let recorded = bill.record(&model, out.prompt_tokens, 0).await;
                if let (Ok(()), Some(c)) = (&recorded, &counter) {
                    c.count(out.prompt_tokens, 0);
                }
                recorded.map(|()| out)
            }
        };
        let _ = tx.send(result);
    };
    tokio::spawn(tracing::Instrument::instrument(
        record,
        tracing::Span::current(),
    ));
    match tokio::time::timeout_at(limit.until.into(), answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(ServeError::internal(
            "the embedding ended without an answer",
        )),
        Err(_) => Err(limit.error),
    }
}
