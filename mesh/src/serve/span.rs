//! The request's span as OpenTelemetry's GenAI conventions name and describe it.

use super::{
    endpoint::Endpoint,
    request::{Request, Work},
};
use crate::telemetry;

/// The span of one request on the serve path, named and typed as OpenTelemetry's GenAI
/// conventions ask (`{operation} {model}`); the rest of its attributes come as they are known.
pub(super) fn request_span(req: &Request, id: &str) -> tracing::Span {
    let op = match req.endpoint {
        Endpoint::V2Infer => "infer", // named once the model says what it does
        e => operation(e, &req.work),
    };
    let span = tracing::info_span!("serve", otel.name = %format_args!("{op} {}", req.model), endpoint = req.endpoint.label(), request_id = %id);
    telemetry::attr(&span, "gen_ai.provider.name", "flatmesh");
    telemetry::attr(&span, "gen_ai.request.model", req.model.clone());
    telemetry::attr(&span, "gen_ai.response.id", id.to_string());
    if req.stream {
        telemetry::attr(&span, "flatmesh.stream", true);
    }
    span
}

/// The attributes of a request known once its model says what the work is.
pub(super) fn describe(span: &tracing::Span, req: &Request, work: &Work) {
    let op = operation(req.endpoint, work);
    if req.endpoint == Endpoint::V2Infer {
        telemetry::rename(span, format!("{op} {}", req.model));
    }
    telemetry::attr(span, "gen_ai.operation.name", op);
    telemetry::attr(span, "flatmesh.tenant", req.caller.tenant.clone());
    telemetry::attr(span, "flatmesh.tier", req.caller.tier.name.clone());
    if let Work::Generate(g) = work {
        if let Some(n) = g.max_tokens {
            telemetry::attr(span, "gen_ai.request.max_tokens", n as i64);
        }
        telemetry::attr(
            span,
            "gen_ai.request.temperature",
            f64::from(g.sampling.temperature),
        );
        if let Some(seed) = g.sampling.seed {
            telemetry::attr(span, "gen_ai.request.seed", seed as i64);
        }
    }
}

/// The GenAI operation of the work (`chat`, `text_completion`, `embeddings`).
fn operation(endpoint: Endpoint, work: &Work) -> &'static str {
    match (endpoint, work) {
        (_, Work::Embed { .. }) => "embeddings",
        (Endpoint::ChatCompletions, _) => "chat",
        _ => "text_completion",
    }
}
