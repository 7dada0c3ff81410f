//! Forwarding to a peer: a request for a model that another node holds ready, and this one
//! does not, goes there in one hop with the caller's headers, and the answer (streams
//! included) flows back. Every answer of a mesh node names the node that served it.

use std::{sync::OnceLock, time::Duration};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue, Method},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::AppState;

/// Set on a forwarded request (to the node it came from): it is never forwarded again.
pub const FORWARDED: &str = "x-flatmesh-forwarded";
/// The node that served the request.
pub const NODE: &str = "x-flatmesh-node";

/// The HTTP client for peers: connections kept, a short connect timeout (a dead peer is
/// skipped quickly), no overall timeout (streams run as long as the request may).
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("the peer client builds")
    })
}

#[derive(Deserialize)]
struct Named {
    model: Option<String>,
}

/// The model a request names: in a v2 path (`/v2/models/{name}/...`) or the JSON body.
fn model_of(path: &str, body: &[u8]) -> Option<String> {
    if let Some(rest) = path.strip_prefix("/v2/models/") {
        return rest.split('/').next().map(str::to_string);
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// Every answer of a mesh node names the node that served it (a forwarded answer keeps
/// the peer's name).
pub async fn name_the_node(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if let Some(c) = &state.cluster {
        if !resp.headers().contains_key(NODE) {
            if let Ok(v) = HeaderValue::from_str(c.node()) {
                resp.headers_mut().insert(NODE, v);
            }
        }
    }
    resp
}

/// The middleware: here, or to the peer `Cluster::place` names. A peer that cannot be
/// reached (nothing sent to the client yet) is skipped and the request is served here.
pub async fn forward(
    State((state, max_body)): State<(AppState, usize)>,
    req: Request,
    next: Next,
) -> Response {
    let Some(cluster) = state.cluster.clone() else {
        return next.run(req).await;
    };
    let node = cluster.node().to_string();
    if req.method() != Method::POST || req.headers().contains_key(FORWARDED) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, max_body).await {
        Ok(b) => b,
        Err(_) => {
            return (
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(serde_json::json!({"error": {"message": format!("request body: larger than {max_body} bytes"), "code": "request_too_large"}})),
            )
                .into_response()
        }
    };
    let model = model_of(parts.uri.path(), &bytes).and_then(|m| state.cache.resolve(&m));
    let peer = match model {
        Some(id) => cluster.place(&id).await.map(|p| p.http),
        None => None,
    };
    if let Some(peer) = peer {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(target: crate::telemetry::TARGET, "forward", otel.name = "forward", otel.kind = "client", flatmesh.peer = %peer);
        let sent = proxy(&peer, &node, &parts, bytes.clone(), &span);
        match tracing::Instrument::instrument(sent, span.clone()).await {
            Ok(resp) => {
                let m = cluster.metrics();
                m.mesh_forwarded.with_label_values(&[&peer, "ok"]).inc();
                m.mesh_forward_seconds
                    .with_label_values(&[&peer])
                    .observe(started.elapsed().as_secs_f64());
                return resp;
            }
            Err(e) => {
                crate::telemetry::failed(&span, "unreachable", &e.to_string());
                cluster
                    .metrics()
                    .mesh_forwarded
                    .with_label_values(&[&peer, "error"])
                    .inc();
                tracing::warn!(%peer, error = %e, "Peer unreachable; serving here");
            }
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Send the request to `peer` and hand back its answer as it streams.
async fn proxy(
    peer: &str,
    origin: &str,
    parts: &axum::http::request::Parts,
    body: bytes::Bytes,
    span: &tracing::Span,
) -> anyhow::Result<Response> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = parts.headers.clone();
    for h in [header::HOST, header::CONTENT_LENGTH, header::CONNECTION] {
        headers.remove(h);
    }
    // When traced, the peer's spans are children of the forwarding span.
    headers.extend(crate::telemetry::trace_headers(span));
    let resp = client()
        .post(format!("{}{path}", peer.trim_end_matches('/')))
        .headers(headers)
        .header(FORWARDED, origin)
        .body(body)
        .send()
        .await?;
    let mut back = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if k != header::TRANSFER_ENCODING && k != header::CONNECTION && k != header::CONTENT_LENGTH
        {
            back = back.header(k.as_str(), v.as_bytes());
        }
    }
    Ok(back.body(Body::from_stream(resp.bytes_stream()))?)
}

#[cfg(test)]
mod tests {
    use super::model_of;

    #[test]
    fn the_model_comes_from_the_v2_path_or_the_json_body() {
        assert_eq!(
            model_of("/v2/models/m1/infer", b"{}").as_deref(),
            Some("m1")
        );
        assert_eq!(
            model_of("/v1/chat/completions", br#"{"model":"x","messages":[]}"#).as_deref(),
            Some("x")
        );
        assert_eq!(model_of("/v1/embeddings", b"not json"), None);
    }
}
