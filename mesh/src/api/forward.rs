//! The mesh's side of a forwarded request: `POST /internal/v1/serve` takes a request that a
//! peer routed, looked up in its cache and placed here, serves it on the serve path and
//! streams the answer back as JSON lines. Every answer of a mesh node names the node that
//! served it.

use std::convert::Infallible;

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Extension,
};
use futures::StreamExt;

use super::AppState;
use crate::{
    serve::{
        peer::{self, WireRequest},
        Forwarded,
    },
    tenancy::Caller,
};

/// The node that served the request.
pub const NODE: &str = "x-flatmesh-node";

/// The endpoints a forwarded request may name (ledger and metric labels).
const ENDPOINTS: &[&str] = &[
    "chat_completions",
    "completions",
    "embeddings",
    "v2_infer",
    "v2_generate",
    "v2_generate_stream",
    "v2_stream",
];

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

/// Name the peer that served a request (this node's name is added later to every answer).
pub fn served_by(resp: &mut Response, node: Option<String>) {
    if let Some(v) = node.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert(NODE, v);
    }
}

/// Serve a request a peer sent here: the peer proves it is a node of the mesh with the
/// mesh's admin token, and the caller is authenticated here with its own key. Only mounted
/// in a mesh.
pub async fn serve_forwarded(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let refuse = |status: StatusCode, code: &str, m: String| {
        (
            status,
            axum::Json(serde_json::json!({"error": {"message": m, "code": code}})),
        )
            .into_response()
    };
    if let Some(token) = &state.admin_token {
        let given = headers.get(peer::MESH_TOKEN).and_then(|v| v.to_str().ok());
        if !given.is_some_and(|g| super::guard::same_secret(g, token)) {
            return refuse(
                StatusCode::FORBIDDEN,
                "not_a_peer",
                format!("{} is for the nodes of the mesh", peer::PATH),
            );
        }
    }
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, "invalid_forward", m);
    if let Some(origin) = headers.get(peer::FORWARDED).and_then(|v| v.to_str().ok()) {
        crate::telemetry::attr(
            &tracing::Span::current(),
            "flatmesh.origin",
            origin.to_string(),
        );
    }
    let wire: WireRequest = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => return bad(format!("a forwarded request: {e}")),
    };
    let Some(endpoint) = ENDPOINTS.iter().find(|e| **e == wire.endpoint) else {
        return bad(format!("unknown endpoint {:?}", wire.endpoint));
    };
    let request = crate::serve::Request {
        caller,
        model: wire.model,
        endpoint,
        work: wire.work.into(),
        keep_alive: wire.keep_alive,
        client_id: crate::serve::client_id(wire.client_id.as_deref()),
        stream: wire.stream,
        forwarded: Some(Forwarded {
            fallbacks: wire.fallbacks,
        }),
        // The peer's clock is not ours: what was left, from now.
        deadline: wire.timeout_ms.and_then(|ms| {
            std::time::Instant::now().checked_add(std::time::Duration::from_millis(ms))
        }),
    };
    let result = state.serve.run(request).await;
    let node = state.cluster.as_ref().map_or("", |c| c.node());
    let lines = tokio_stream::wrappers::ReceiverStream::new(peer::answer(result, node)).map(|ev| {
        let mut line = serde_json::to_vec(&ev).expect("an event serializes");
        line.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(line))
    });
    let mut resp = Body::from_stream(lines).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}
