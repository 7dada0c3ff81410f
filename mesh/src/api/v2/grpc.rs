//! The v2 protocol over gRPC (`inference.GRPCInferenceService`), ModelMesh-style model
//! selection by `mm-vmodel-id` / `mm-model-id` metadata.

use std::{collections::BTreeMap, pin::Pin};

use futures::Stream;
use serde_json::Value;
use tonic::{metadata::MetadataMap, Request, Response, Status, Streaming};

use super::{
    codec::encode_binary,
    generate_request, infer, is_ready, metadata, model_status, require_llm,
    rest::{repo_state, triton_type, EXTENSIONS},
    Data, InferRequest, Tensor, V2Error,
};
use crate::api::AppState;

pub mod pb {
    tonic::include_proto!("inference");
}

use pb::{
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

pub struct Grpc {
    state: AppState,
}

impl From<V2Error> for Status {
    fn from(e: V2Error) -> Self {
        match e {
            V2Error::BadRequest(m) => Status::invalid_argument(m),
            V2Error::NotFound(m) => Status::not_found(m),
            V2Error::Unavailable(m, secs) => {
                let mut md = MetadataMap::new();
                md.insert(
                    "retry-after",
                    secs.to_string().parse().expect("digits are ASCII"),
                );
                Status::with_metadata(tonic::Code::Unavailable, m, md)
            }
            V2Error::TooMany(m, _) => Status::resource_exhausted(m),
            V2Error::Forbidden(m) => Status::permission_denied(m),
            V2Error::Internal(m) => Status::internal(m),
        }
    }
}

impl Grpc {
    /// The model a call addresses, after checking the caller's tier may use it.
    fn model<T>(&self, req: &Request<T>, name: &str) -> Result<String, Status> {
        let model = target(req.metadata(), name)?;
        authorize(&self.state, req.extensions(), &model)?;
        Ok(model)
    }
}

fn caller_of(ext: &tonic::Extensions) -> Result<crate::tenancy::Caller, Status> {
    ext.get::<crate::tenancy::Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated(crate::tenancy::AuthError::Missing.to_string()))
}

fn authorize(state: &AppState, ext: &tonic::Extensions, model: &str) -> Result<(), Status> {
    match ext.get::<crate::tenancy::Caller>() {
        Some(caller) => crate::api::auth::check(state, caller, model)
            .map_err(|e| Status::permission_denied(e.to_string())),
        None => Err(Status::unauthenticated(
            crate::tenancy::AuthError::Missing.to_string(),
        )),
    }
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

fn param_json(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::Bool(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::StringParam(s)) => Value::String(s.clone()),
        Some(ParameterChoice::DoubleParam(d)) => Value::from(*d),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        None => Value::Null,
    }
}

fn decode(req: ModelInferRequest) -> Result<InferRequest, V2Error> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(V2Error::BadRequest(format!(
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
        .map(|(k, v)| (k.clone(), param_json(v)))
        .collect();
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
                .cache
                .status()
                .iter()
                .all(|m| m.state != "loading");
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
        let caller = caller_of(req.extensions())?;
        let started = std::time::Instant::now();
        let result = match decode(req.into_inner()) {
            Ok(r) => infer(&self.state, &caller, &name, r).await,
            Err(e) => Err(e),
        };
        let model = self.state.cache.resolve(&name).unwrap_or_default();
        self.state
            .v2_stats
            .record(&model, result.is_ok(), started.elapsed());
        Ok(Response::new(encode(result?)))
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
        tokio::spawn(async move {
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
                if let Err(e) = stream_one(&state, &caller, &name, r, &tx).await {
                    if tx.send(Ok(error(e.message().to_string()))).await.is_err() {
                        return;
                    }
                }
            }
        });
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
        caller_of(req.extensions())?;
        let models = self
            .state
            .cache
            .status()
            .into_iter()
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
        self.state
            .cache
            .load(&req.get_ref().model_name)
            .await
            .map_err(V2Error::from)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.state
            .cache
            .unload(&req.get_ref().model_name)
            .map_err(V2Error::from)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// Serve one request of a stream.
async fn stream_one(
    state: &AppState,
    caller: &crate::tenancy::Caller,
    name: &str,
    r: ModelInferRequest,
    tx: &tokio::sync::mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
) -> Result<(), V2Error> {
    let id = r.id.clone();
    let req = decode(r)?;
    let lease = state
        .cache
        .acquire_for(name, None, caller.tier.residency_bonus.0)
        .await?;
    if require_llm(lease.engine.as_ref(), name).is_err() {
        drop(lease);
        let resp = infer(state, caller, name, req).await?;
        let _ = tx
            .send(Ok(ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(encode(resp)),
            }))
            .await;
        return Ok(());
    }
    let prompt = match req
        .inputs
        .iter()
        .find(|t| t.name == "text_input")
        .map(|t| &t.data)
    {
        Some(Data::Bytes(b)) if b.len() == 1 => String::from_utf8(b[0].clone())
            .map_err(|_| V2Error::BadRequest("text_input is not UTF-8".into()))?,
        _ => {
            return Err(V2Error::BadRequest(
                "missing input \"text_input\" (BYTES, one element)".into(),
            ))
        }
    };
    let gen = generate_request(prompt, &req.parameters)?;
    let model = lease.model.clone();
    let tx = tx.clone();
    let info = crate::api::usage::request_info(
        &id,
        caller,
        &model,
        "v2_stream",
        Some(&gen.prompt),
        gen.max_tokens.map(|n| n as u32),
        true,
    );
    let (_held, bill) = crate::api::usage::admit(state, caller, "v2_stream", info).await?;
    let result = tokio::task::spawn_blocking(move || {
        let engine = lease.engine.clone();
        let r = engine.generate(&gen, &mut |ev| {
            if let flatmesh_runtime::GenerateEvent::Text(t) = ev {
                if tx
                    .blocking_send(Ok(text_response(&model, &id, t, false)))
                    .is_err()
                {
                    return std::ops::ControlFlow::Break(());
                }
            }
            std::ops::ControlFlow::Continue(())
        });
        (r, tx, model, id)
    })
    .await
    .map_err(|e| V2Error::Internal(e.to_string()))?;
    let (r, tx, model, id) = result;
    let g = r?;
    // The record is durable before the final response goes out.
    let record_id = if id.is_empty() {
        format!("v2-{}", uuid::Uuid::new_v4().simple())
    } else {
        id.clone()
    };
    bill.record(&record_id, &model, g.prompt_tokens, g.completion_tokens)
        .await?;
    let _ = tx
        .send(Ok(text_response(&model, &id, String::new(), true)))
        .await;
    Ok(())
}
