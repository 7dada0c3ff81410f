//! The mesh's side of a forwarded request: `POST /internal/v1/serve` takes a request that a
//! peer routed, looked up in its cache and placed here, checks it as the front doors do,
//! serves it on the serve path and streams the answer back as JSON lines. The internal
//! endpoints are for the nodes of the mesh only (the mesh token). Every answer of a mesh
//! node names the node that served it.

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
        check,
        peer::{self, WireRequest},
        Endpoint, Forwarded,
    },
    tenancy::Caller,
};

/// The node that served the request.
pub const NODE: &str = "x-flatmesh-node";

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

fn refuse(status: StatusCode, code: &str, m: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"message": m, "code": code}})),
    )
        .into_response()
}

/// The internal endpoints are for the nodes of the mesh: a request without the mesh token
/// (`mesh.token`, sent as `x-flatmesh-mesh-token`) gets 403. The admin token is not it.
pub async fn peers_only(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(peer::MESH_TOKEN)
        .and_then(|v| v.to_str().ok());
    let peer = match (&state.mesh_token, given) {
        (Some(token), Some(given)) => super::guard::same_secret(given, token),
        _ => false,
    };
    if !peer {
        let path: String = req.uri().path().chars().take(256).collect();
        let m = format!("{path} is for the nodes of the mesh");
        return refuse(StatusCode::FORBIDDEN, "not_a_peer", m);
    }
    next.run(req).await
}

/// Serve a request a peer sent here (`peers_only` has seen the mesh token); the caller is
/// authenticated here with its own key. Only mounted in a mesh.
pub async fn serve_forwarded(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
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
    let Some(endpoint) = Endpoint::from_label(&wire.endpoint) else {
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
    // The peer's front door checked the work; checked again here, as every front door
    // does, so that a node (or whoever holds the mesh token) cannot send what no client may.
    let result = match check::work(&request.work) {
        Ok(()) => state.serve.run(request).await,
        Err(e) => Err(e),
    };
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
