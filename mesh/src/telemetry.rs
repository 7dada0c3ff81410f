//! Traces: OpenTelemetry spans exported over OTLP/HTTP when `[telemetry] otlp_endpoint` is set,
//! and the W3C `traceparent` read from requests and passed on to peers.
//!
//! Spans are `tracing` spans. The serve span (one per request, with the GenAI attributes) is
//! also the logs' context; the spans only a trace needs (the request at the front door, queue
//! wait, page-in, policy calls, forwarding) use the target [`TARGET`], which the log output
//! leaves out, so without an exporter they are never even created.

use std::time::Duration;

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
    KeyValue,
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
    Resource,
};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::units::Secs;

/// The target of spans made for traces only (not logged).
pub const TARGET: &str = "flatmesh::trace";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (a collector), e.g. `http://otel-collector:4318`;
    /// spans go to `{otlp_endpoint}/v1/traces` as protobuf. Unset: no traces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// The share of new traces kept (0..=1); a request that arrives with a sampled
    /// `traceparent` is always kept, one with an unsampled one never.
    pub sample_ratio: f64,
    /// How often spans are sent in a batch.
    pub export_interval: Secs,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "flatmesh".into(),
            sample_ratio: 1.0,
            export_interval: Secs(Duration::from_secs(2)),
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            anyhow::bail!(
                "telemetry.sample_ratio: {} is not between 0 and 1",
                self.sample_ratio
            );
        }
        if let Some(url) = &self.otlp_endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("telemetry.otlp_endpoint: {url:?} is not an http(s) URL");
            }
        }
        if self.export_interval.0.is_zero() {
            anyhow::bail!("telemetry.export_interval must be more than zero");
        }
        Ok(())
    }
}

/// The exporter while the agent runs; [`Telemetry::shutdown`] sends what is left.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// The exporter and the `tracing` layer that feeds it, when an endpoint is configured.
    /// `instance` names this agent (`service.instance.id`: the mesh node name or the host).
    pub fn start<S>(
        config: &TelemetryConfig,
        instance: &str,
    ) -> anyhow::Result<Option<(Telemetry, impl tracing_subscriber::Layer<S>)>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let Some(base) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let url = format!("{}/v1/traces", base.trim_end_matches('/'));
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(&url)
            .with_timeout(Duration::from_secs(5))
            .with_headers(Default::default())
            .build()
            .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint {url}: {e}"))?;
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(config.export_interval.0)
                    .build(),
            )
            .build();
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.instance.id", instance.to_string()))
            .with_attribute(KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION").to_string(),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .build();
        let tracer = provider.tracer("flatmesh");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false);
        Ok(Some((Telemetry { provider }, layer)))
    }

    /// Export the spans still buffered and stop.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("flatmesh: exporting the last spans failed: {e}");
        }
    }
}

/// Whether the trace layer sees `meta`: this crate's spans, and its warnings and errors
/// (they become events on the span they happen in).
pub fn traced(meta: &tracing::Metadata<'_>) -> bool {
    meta.target().starts_with("flatmesh")
        && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
}

/// Whether the logs see `meta`: everything but the spans made for traces only.
pub fn logged(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() != TARGET
}

/// Make `span` a child of the trace a request's `traceparent` header names, if any.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}

/// The `traceparent` (and `tracestate`) that make a peer's spans children of `span`; empty
/// when nothing is traced.
pub fn trace_headers(span: &tracing::Span) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if !span.is_disabled() {
        TraceContextPropagator::new().inject_context(
            &span.context(),
            &mut opentelemetry_http::HeaderInjector(&mut headers),
        );
    }
    headers
}

/// The span of one HTTP request at the front door: the root of this node's part of a trace.
pub fn http_span(req: &http::Request<axum::body::Body>) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        "http",
        otel.name = %format_args!("{} {}", req.method(), req.uri().path()),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
    );
    continue_trace(&span, req.headers());
    span
}

/// The span of one gRPC call at the front door.
pub fn grpc_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let method = path.rsplit('/').next().unwrap_or(path);
    let span = tracing::info_span!(
        target: TARGET,
        "grpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = %method,
    );
    continue_trace(&span, req.headers());
    span
}

/// The front-door middleware: each HTTP request in its own span, kept open until the answer's
/// body (a stream included) has been sent.
pub async fn trace_http(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let span = http_span(&req);
    if span.is_disabled() {
        return next.run(req).await;
    }
    let resp = next.run(req).instrument(span.clone()).await;
    http_status(&span, resp.status().as_u16());
    resp.map(|body| axum::body::Body::new(SpanBody { body, _span: span }))
}

/// A body that holds its request's span until it is sent in full or dropped.
struct SpanBody {
    body: axum::body::Body,
    _span: tracing::Span,
}

impl http_body::Body for SpanBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Record an HTTP answer's status on its span (5xx marks the span as an error).
pub fn http_status(span: &tracing::Span, status: u16) {
    attr(span, "http.response.status_code", i64::from(status));
    if status >= 500 {
        span.set_status(opentelemetry::trace::Status::error(""));
    }
}

/// Set an attribute on a span's exported form (logs do not show it).
pub fn attr(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if !span.is_disabled() {
        span.set_attribute(key, value);
    }
}

/// Rename a span's exported form (for a name known only once it runs).
pub fn rename(span: &tracing::Span, name: String) {
    if !span.is_disabled() {
        span.context().span().update_name(name);
    }
}

/// Mark a span as failed, with the error's kind as `error.type`.
pub fn failed(span: &tracing::Span, kind: &str, message: &str) {
    if !span.is_disabled() {
        span.set_attribute("error.type", kind.to_string());
        span.set_status(opentelemetry::trace::Status::error(message.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_named() {
        let mut c = TelemetryConfig {
            sample_ratio: 1.5,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sample_ratio"));
        c.sample_ratio = 0.5;
        c.otlp_endpoint = Some("collector:4318".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("otlp_endpoint"));
        c.otlp_endpoint = Some("http://collector:4318".into());
        c.validate().unwrap();
    }

    #[test]
    fn untraced_spans_carry_no_trace_headers() {
        assert!(trace_headers(&tracing::Span::none()).is_empty());
    }
}
