//! The v2 protocol over gRPC (`inference.GRPCInferenceService`), ModelMesh-style model
//! selection by `mm-vmodel-id` / `mm-model-id` metadata.

use std::{collections::BTreeMap, pin::Pin};

use futures::Stream;
use serde_json::Value;
use tonic::{metadata::MetadataMap, Request, Response, Status, Streaming};

use super::{
    codec::encode_binary,
    embedding_tensor, infer, infer_request, is_ready, metadata, model_status,
    rest::{repo_state, triton_type, EXTENSIONS},
    Data, InferRequest, Tensor,
};
use crate::{
    api::{auth::Operator, deadline::Deadline, AppState},
    cache::ModelState,
    serve::{self, Endpoint, Output, ServeError},
    tenancy::{AuthError, Caller, Tenancy},
};

use super::pb::{
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
    infer_parameter::ParameterChoice,
    model_infer_response::InferOutputTensor,
    model_metadata_response::TensorMetadata,
    *,
};

/// The gRPC service over the agent's state.
pub fn service(state: AppState, max_message_bytes: usize) -> GrpcInferenceServiceServer<Grpc> {
    GrpcInferenceServiceServer::new(Grpc { state })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

/// What the gRPC server's responses pass through.
pub type StatusFix =
    fn(axum::http::Response<tonic::body::Body>) -> axum::http::Response<tonic::body::Body>;

/// tonic answers a message over `server.grpc_max_message_bytes` with OUT_OF_RANGE; gRPC's own
/// servers, and the error table, say RESOURCE_EXHAUSTED. The agent answers OUT_OF_RANGE for
/// nothing else, so every such status is rewritten.
pub fn size_limit_status() -> tower::util::MapResponseLayer<StatusFix> {
    tower::util::MapResponseLayer::new(resource_exhausted as StatusFix)
}

fn resource_exhausted(
    mut resp: axum::http::Response<tonic::body::Body>,
) -> axum::http::Response<tonic::body::Body> {
    let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
    if resp
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes())
    {
        let code = (tonic::Code::ResourceExhausted as i32).to_string();
        if let Ok(v) = axum::http::HeaderValue::from_str(&code) {
            resp.headers_mut().insert("grpc-status", v);
        }
    }
    resp
}

/// In a mesh, every gRPC answer names the node that served it (`x-flatmesh-node`), as HTTP
/// answers do; a forwarded answer keeps the peer's name.
pub fn name_the_node(
    node: Option<String>,
) -> tower::util::MapResponseLayer<
    impl Fn(axum::http::Response<tonic::body::Body>) -> axum::http::Response<tonic::body::Body> + Clone,
> {
    let value = node.and_then(|n| axum::http::HeaderValue::from_str(&n).ok());
    tower::util::MapResponseLayer::new(move |mut resp: axum::http::Response<tonic::body::Body>| {
        if let Some(v) = &value {
            if !resp.headers().contains_key("x-flatmesh-node") {
                resp.headers_mut().insert("x-flatmesh-node", v.clone());
            }
        }
        resp
    })
}

pub struct Grpc {
    state: AppState,
}

impl Grpc {
    /// Repository load/unload: operator actions once tenancy is on.
    fn repository_change<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let ext = req.extensions();
        crate::api::auth::repository_change(
            &self.state.tenancy,
            ext.get::<Operator>().is_some(),
            ext.get::<Caller>(),
        )
        .map_err(Status::from)
    }

    /// The model a call addresses, after checking the caller's tier may use it.
    fn model<T>(&self, req: &Request<T>, name: &str) -> Result<String, Status> {
        let model = target(req.metadata(), name)?;
        authorize(&self.state, req.extensions(), &model)?;
        Ok(model)
    }
}

/// The caller of a call; every call but server health and metadata needs one.
fn caller_of(ext: &tonic::Extensions) -> Result<Caller, Status> {
    ext.get::<Caller>()
        .cloned()
        .ok_or_else(|| ServeError::from(AuthError::Missing).into())
}

/// The call's deadline (`grpc-timeout`), read by the interceptor.
fn deadline_of(ext: &tonic::Extensions) -> Deadline {
    ext.get::<Deadline>().copied().unwrap_or_default()
}

fn authorize(state: &AppState, ext: &tonic::Extensions, model: &str) -> Result<(), Status> {
    let caller = caller_of(ext)?;
    crate::api::auth::check(state, &caller, model).map_err(|e| ServeError::from(e).into())
}

/// The model a call addresses: `mm-vmodel-id`, then `mm-model-id`, then the request's name.
fn target(md: &MetadataMap, name: &str) -> Result<String, Status> {
    for key in ["mm-vmodel-id", "mm-model-id"] {
        if let Some(v) = md.get(key) {
            return v
                .to_str()
                .map(String::from)
                .map_err(|_| Status::invalid_argument(format!("{key} is not ASCII")));
        }
    }
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "model_name is empty (or set mm-model-id / mm-vmodel-id)",
        ));
    }
    Ok(name.to_string())
}

/// A parameter as JSON. JSON has no NaN or infinity (a non-finite double would read as no
/// value, and the default would apply unseen), so one is refused by the parameter's name.
fn param_json(key: &str, p: &InferParameter) -> Result<Value, ServeError> {
    Ok(match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::Bool(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::StringParam(s)) => Value::String(s.clone()),
        Some(ParameterChoice::DoubleParam(d)) if !d.is_finite() => {
            return Err(ServeError::bad_request(
                format!("parameters.{key}"),
                format!("must be a finite number, got {d}"),
            ))
        }
        Some(ParameterChoice::DoubleParam(d)) => Value::from(*d),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        None => Value::Null,
    })
}

pub(super) fn decode(req: ModelInferRequest) -> Result<InferRequest, ServeError> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(ServeError::invalid(format!(
            "{} inputs but {} raw_input_contents",
            req.inputs.len(),
            req.raw_input_contents.len()
        )));
    }
    let mut inputs = Vec::new();
    for (i, t) in req.inputs.into_iter().enumerate() {
        let data = if raw {
            super::codec::decode_binary(&t.name, &t.datatype, &req.raw_input_contents[i])?
        } else {
            let c = t.contents.unwrap_or_default();
            match t.datatype.as_str() {
                "BYTES" => Data::Bytes(c.bytes_contents),
                "FP32" => Data::F32(c.fp32_contents),
                other => Data::Other(other.to_string()),
            }
        };
        inputs.push(Tensor {
            name: t.name,
            datatype: t.datatype,
            shape: t.shape,
            data,
        });
    }
    let parameters: BTreeMap<String, Value> = req
        .parameters
        .iter()
        .map(|(k, v)| Ok((k.clone(), param_json(k, v)?)))
        .collect::<Result<_, ServeError>>()?;
    Ok(InferRequest {
        id: (!req.id.is_empty()).then_some(req.id),
        parameters,
        inputs,
    })
}

fn encode(resp: super::InferResponse) -> ModelInferResponse {
    let mut raw = Vec::new();
    let outputs = resp
        .outputs
        .into_iter()
        .map(|t| {
            let mut bytes = Vec::new();
            encode_binary(&t.data, &mut bytes);
            raw.push(bytes);
            InferOutputTensor {
                name: t.name,
                datatype: t.datatype,
                shape: t.shape,
                ..Default::default()
            }
        })
        .collect();
    ModelInferResponse {
        model_name: resp.model,
        model_version: "1".into(),
        id: resp.id.unwrap_or_default(),
        outputs,
        raw_output_contents: raw,
        ..Default::default()
    }
}

fn text_response(model: &str, id: &str, text: String, last: bool) -> ModelStreamInferResponse {
    let mut parameters = std::collections::HashMap::new();
    parameters.insert(
        "triton_final_response".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(last)),
        },
    );
    let mut raw = Vec::new();
    encode_binary(&Data::Bytes(vec![text.into_bytes()]), &mut raw);
    ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(ModelInferResponse {
            model_name: model.to_string(),
            model_version: "1".into(),
            id: id.to_string(),
            parameters,
            outputs: vec![InferOutputTensor {
                name: "text_output".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                ..Default::default()
            }],
            raw_output_contents: vec![raw],
        }),
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = !self.state.is_draining()
            && self
                .state
                .serve
                .cache
                .status()
                .iter()
                .all(|m| m.state != ModelState::Loading);
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let name = self.model(&req, &req.get_ref().name)?;
        let ready = model_status(&self.state, &name)
            .map(|s| is_ready(&s))
            .unwrap_or(false);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "flatmesh".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let name = self.model(&req, &req.get_ref().name)?;
        let (name, inputs, outputs) = metadata(&self.state, &name).await?;
        let t = |s: &super::Signature| TensorMetadata {
            name: s.name.into(),
            datatype: s.datatype.into(),
            shape: s.shape.clone(),
        };
        Ok(Response::new(ModelMetadataResponse {
            name,
            versions: vec!["1".into()],
            platform: "flatmesh".into(),
            inputs: inputs.iter().map(t).collect(),
            outputs: outputs.iter().map(t).collect(),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let name = self.model(&req, &req.get_ref().model_name)?;
        let client = (caller_of(req.extensions())?, deadline_of(req.extensions()));
        let started = std::time::Instant::now();
        let request = decode(req.into_inner())
            .and_then(|r| infer_request(&self.state, client, &name, Endpoint::V2Infer, r))?;
        let result = infer(&self.state, request).await;
        let model = self.state.serve.cache.resolve(&name).unwrap_or_default();
        self.state
            .v2_stats
            .record(&model, result.is_ok(), started.elapsed());
        let result = result?;
        let node = result.node.clone();
        let mut resp = Response::new(encode(result));
        if let Some(v) = node.and_then(|n| n.parse().ok()) {
            resp.metadata_mut().insert("x-flatmesh-node", v);
        }
        Ok(resp)
    }

    type ModelStreamInferStream = StreamOf<ModelStreamInferResponse>;

    /// Each request's LLM output streams back as one response per text delta, the last one
    /// flagged `triton_final_response`; embedding requests answer once.
    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let md = req.metadata().clone();
        let ext = req.extensions().clone();
        let mut incoming = req.into_inner();
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ModelStreamInferResponse, Status>>(64);
        // The stream's requests are children of the call's span (its trace).
        let span = tracing::Span::current();
        let relay = async move {
            while let Ok(Some(r)) = incoming.message().await {
                let error = |m: String| ModelStreamInferResponse {
                    error_message: m,
                    infer_response: None,
                };
                let name = match target(&md, &r.model_name)
                    .and_then(|n| authorize(&state, &ext, &n).map(|_| n))
                {
                    Ok(n) => n,
                    Err(s) => {
                        let _ = tx.send(Ok(error(s.message().to_string()))).await;
                        continue;
                    }
                };
                let Ok(caller) = caller_of(&ext) else { return };
                let client = (caller, deadline_of(&ext));
                if let Err(e) = stream_one(&state, client, &name, r, &tx).await {
                    if tx.send(Ok(error(e.message))).await.is_err() {
                        return;
                    }
                }
            }
        };
        tokio::spawn(tracing::Instrument::instrument(relay, span));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let name = self.model(&req, &req.get_ref().name)?;
        let (name, inputs, outputs) = metadata(&self.state, &name).await?;
        let dt = |d: &str| {
            DataType::from_str_name(triton_type(d)).unwrap_or(DataType::TypeInvalid) as i32
        };
        Ok(Response::new(ModelConfigResponse {
            config: Some(ModelConfig {
                name,
                platform: "flatmesh".into(),
                backend: "flatmesh".into(),
                max_batch_size: 0,
                input: inputs
                    .iter()
                    .map(|s| ModelInput {
                        name: s.name.into(),
                        data_type: dt(s.datatype),
                        dims: s.shape.clone(),
                    })
                    .collect(),
                output: outputs
                    .iter()
                    .map(|s| ModelOutput {
                        name: s.name.into(),
                        data_type: dt(s.datatype),
                        dims: s.shape.clone(),
                    })
                    .collect(),
            }),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let name = self.model(&req, &req.get_ref().name)?;
        let id = model_status(&self.state, &name)?.id;
        let s = self.state.v2_stats.get(&id);
        let d = |(count, ns): (u64, u64)| Some(StatisticDuration { count, ns });
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: vec![ModelStatistics {
                name: id,
                version: "1".into(),
                last_inference: s.last_ms,
                inference_count: s.success.0,
                execution_count: s.success.0,
                inference_stats: Some(InferStatistics {
                    success: d(s.success),
                    fail: d(s.fail),
                    ..Default::default()
                }),
            }],
        }))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let caller = caller_of(req.extensions())?;
        let models = self
            .state
            .serve
            .cache
            .status()
            .into_iter()
            .filter(|m| Tenancy::check_model(&caller, &m.id).is_ok())
            .map(|m| {
                let (state, reason) = repo_state(&m);
                repository_index_response::ModelIndex {
                    name: m.id,
                    version: "1".into(),
                    state: state.into(),
                    reason,
                }
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.repository_change(&req)?;
        self.state
            .serve
            .cache
            .load(&req.get_ref().model_name)
            .await
            .map_err(ServeError::from)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.repository_change(&req)?;
        self.state
            .serve
            .cache
            .unload(&req.get_ref().model_name)
            .map_err(ServeError::from)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// Serve one request of a stream: an LLM's text streams back as it is made; an embedding
/// model answers once. A client that leaves drops the generation, which cancels it.
async fn stream_one(
    state: &AppState,
    client: (Caller, Deadline),
    name: &str,
    r: ModelInferRequest,
    tx: &tokio::sync::mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
) -> Result<(), ServeError> {
    let id = r.id.clone();
    let request = infer_request(state, client, name, Endpoint::V2Stream, decode(r)?)?;
    let client_id = request.client_id.clone();
    // A client that leaves while the request waits or is prefilled is noticed at once.
    let served = tokio::select! {
        r = state.serve.run(request) => r?,
        _ = tx.closed() => return Ok(()),
    };
    let mut generating = match served.output {
        Output::Embeddings(out) => {
            let resp = super::InferResponse {
                model: served.model,
                id: client_id,
                outputs: vec![embedding_tensor(out)],
                node: served.node,
            };
            let _ = tx
                .send(Ok(ModelStreamInferResponse {
                    error_message: String::new(),
                    infer_response: Some(encode(resp)),
                }))
                .await;
            return Ok(());
        }
        Output::Text(g) => g,
    };
    let model = served.model;
    while let Some(ev) = generating.next_for(tx).await {
        let last = match ev {
            serve::Event::Text(t) => text_response(&model, &id, t.text, false),
            // The record is durable before the final response goes out.
            serve::Event::Done(Ok(_)) => text_response(&model, &id, String::new(), true),
            serve::Event::Done(Err(e)) => return Err(e),
        };
        if tx.send(Ok(last)).await.is_err() {
            return Ok(()); // Client gone: dropping `generating` cancels the generation.
        }
    }
    Ok(())
}
