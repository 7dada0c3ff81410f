//! gRPC forwarding in the mesh: `ModelInfer` and each request of `ModelStreamInfer` for a
//! model another node holds ready (and this one does not) go to that node's gRPC front door,
//! one hop, with the caller's metadata; the answer comes back as it streams.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tonic::{
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::Channel,
    Request, Status,
};

use super::pb::{
    grpc_inference_service_client::GrpcInferenceServiceClient, ModelInferRequest,
    ModelInferResponse, ModelStreamInferResponse,
};
use crate::api::{forward::FORWARDED, AppState};

/// Metadata passed on to the peer: the caller's key and the ModelMesh model selectors.
const PASSED: &[&str] = &["authorization", "mm-vmodel-id", "mm-model-id"];

/// Channels to peers, one per gRPC address, connected lazily and kept.
fn channel(url: &str) -> Result<Channel, Status> {
    static CHANNELS: Mutex<Option<HashMap<String, Channel>>> = Mutex::new(None);
    let mut all = CHANNELS.lock().unwrap_or_else(|e| e.into_inner());
    let all = all.get_or_insert_with(HashMap::new);
    if let Some(c) = all.get(url) {
        return Ok(c.clone());
    }
    let c = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| Status::internal(format!("peer address {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    all.insert(url.to_string(), c.clone());
    Ok(c)
}

/// The peer's gRPC front door for a request on `model`, if it should be forwarded.
pub async fn peer_for(state: &AppState, md: &MetadataMap, model: &str) -> Option<String> {
    let cluster = state.cluster.as_ref()?;
    if md.contains_key(FORWARDED) {
        return None;
    }
    let id = state.cache.resolve(model)?;
    cluster.place(&id).await.map(|p| p.grpc)
}

fn request<T>(message: T, md: &MetadataMap, origin: &str) -> Request<T> {
    let mut req = Request::new(message);
    for key in PASSED {
        if let Some(v) = md.get(*key) {
            req.metadata_mut().insert(*key, v.clone());
        }
    }
    if let Ok(v) = origin.parse() {
        req.metadata_mut().insert(FORWARDED, v);
    }
    // The peer's spans join this trace as children of the forwarding span.
    for (k, v) in &crate::telemetry::trace_headers(&tracing::Span::current()) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(k.as_str().as_bytes()),
            MetadataValue::try_from(v.as_bytes()),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
    req
}

/// The span of one call forwarded to `peer`.
fn forward_span(peer: &str) -> tracing::Span {
    tracing::info_span!(target: crate::telemetry::TARGET, "forward", otel.name = "forward", otel.kind = "client", flatmesh.peer = %peer)
}

/// Whether a failed call never reached the peer (so serving here is safe).
pub fn unreachable(s: &Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.metadata().get("x-flatmesh-node").is_none()
}

/// Forward one `ModelInfer`.
pub async fn infer(
    peer: &str,
    origin: &str,
    md: &MetadataMap,
    r: ModelInferRequest,
) -> Result<tonic::Response<ModelInferResponse>, Status> {
    let mut client = GrpcInferenceServiceClient::new(channel(peer)?);
    let call = async { client.model_infer(request(r, md, origin)).await };
    tracing::Instrument::instrument(call, forward_span(peer)).await
}

/// Forward one request of a `ModelStreamInfer` as a stream of its own, relaying every
/// response to `tx` until the peer's stream ends.
pub async fn stream_one(
    peer: &str,
    origin: &str,
    md: &MetadataMap,
    r: ModelInferRequest,
    tx: &tokio::sync::mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
) -> Result<(), Status> {
    let mut client = GrpcInferenceServiceClient::new(channel(peer)?);
    let relay = async {
        let one = tokio_stream::once(r);
        let mut answers = client
            .model_stream_infer(request(one, md, origin))
            .await?
            .into_inner();
        while let Some(a) = answers.message().await? {
            if tx.send(Ok(a)).await.is_err() {
                return Ok(()); // the client left: dropping the peer's stream stops it there
            }
        }
        Ok(())
    };
    tracing::Instrument::instrument(relay, forward_span(peer)).await
}
