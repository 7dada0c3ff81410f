//! The admin API under `/admin`: register, list, load, unload models; point vmodels.

use axum::{
    extract::{Path, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    error::{ApiError, ApiJson},
    mesh_ledger::Period,
    AppState,
};
use crate::{
    config::ModelConfig,
    files,
    policy::{AnySlot, NoSuchSlot, SlotName},
};

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/models", get(list).post(register))
        .route(
            "/admin/models/{id}",
            axum::routing::delete(unregister).get(one),
        )
        .route("/admin/models/{id}/load", post(load))
        .route("/admin/models/{id}/unload", post(unload))
        .route(
            "/admin/vmodels/{name}",
            put(set_vmodel).delete(remove_vmodel),
        )
        .route("/admin/tenants", get(list_tenants).post(add_tenant))
        .route("/admin/tenants/{id}/keys", post(create_key))
        .route("/admin/keys/revoke", post(revoke_key))
        .route("/admin/usage", get(usage))
        .route("/admin/invoice", get(invoice))
        .route("/admin/policies", get(policies))
        .route("/admin/policies/{slot}/reload", post(reload_policy))
        .route("/admin/mesh", get(mesh))
        .route("/admin/drain", get(drain_status).post(drain))
        .route(
            "/admin/ledger/records",
            get(super::mesh_ledger::own_records),
        )
        // Route layers: a path that does not exist is the router's 404 for everyone, not an
        // admin 401 that tells a stranger apart from an operator.
        .route_layer(middleware::from_fn_with_state(state, authorize))
        .route_layer(middleware::from_fn(super::guard::same_origin_json))
}

/// The mesh as this node sees it: every live node's record (404 on a single node).
async fn mesh(State(state): State<AppState>) -> Response {
    match &state.cluster {
        Some(c) => Json(c.status()).into_response(),
        None => single_node(),
    }
}

/// Start draining this node (a spot instance told it goes away): not ready from now on, no
/// new work (peers stop forwarding here, its arrivals go to peers), its pinned models loaded
/// elsewhere. It keeps running until stopped; the answer (and `GET`) says whether it is
/// drained yet. 404 on a single node.
async fn drain(State(state): State<AppState>) -> Response {
    let Some(c) = &state.cluster else {
        return single_node();
    };
    state
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    c.drain();
    (StatusCode::ACCEPTED, Json(c.drain_status())).into_response()
}

/// Where this node's drain stands.
async fn drain_status(State(state): State<AppState>) -> Response {
    match &state.cluster {
        Some(c) => Json(c.drain_status()).into_response(),
        None => single_node(),
    }
}

fn single_node() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": "this agent is a single node: no [mesh] is configured", "code": "not_found"}})),
    )
        .into_response()
}

/// With `server.admin_token` set, every admin call needs `Authorization: Bearer <token>`.
async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.admin_token {
        if !super::guard::has_bearer(req.headers(), token) {
            let mut e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_admin_token",
                "the admin API needs Authorization: Bearer <server.admin_token>".into(),
            );
            e.param = None;
            return e.into_response();
        }
    }
    // In a mesh, changes go to etcd: while it is away they are refused, not made on this
    // node alone (reads and loads of this node's copies still work).
    let shared_write = req.method() != axum::http::Method::GET
        && !req.uri().path().ends_with("/load")
        && !req.uri().path().ends_with("/unload");
    if let Some(c) = state
        .cluster
        .as_ref()
        .filter(|c| shared_write && !c.connected())
    {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "mesh_unavailable",
            format!(
                "etcd is unreachable from node {:?}: admin changes are refused until it is back",
                c.node()
            ),
        );
        e.param = None;
        let mut resp = e.into_response();
        resp.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        return resp;
    }
    next.run(req).await
}

async fn list(State(state): State<AppState>) -> Json<Value> {
    // Cuda devices add their GPU, the driver's free and total bytes of it (null when the
    // driver cannot say) and why the device takes no copies (null when it does).
    let devices: Vec<Value> = state
        .serve
        .cache
        .device_views()
        .into_iter()
        .map(|(v, driver)| {
            let d = &v.device;
            let mut j = json!({"name": d.name(), "kind": v.kind(), "gpu": v.gpu(),
                "used_bytes": d.used(), "capacity_bytes": d.capacity()});
            if v.gpu().is_some() {
                j["driver_free_bytes"] = json!(driver.map(|m| m.0));
                j["driver_total_bytes"] = json!(driver.map(|m| m.1));
                j["unusable"] = json!(v.unusable);
            }
            j
        })
        .collect();
    Json(
        json!({"models": state.serve.cache.status(), "vmodels": state.serve.cache.vmodels(), "devices": devices}),
    )
}

fn status_of(state: &AppState, id: &str) -> Result<Value, ApiError> {
    let s = state
        .serve
        .cache
        .status()
        .into_iter()
        .find(|m| m.id == id)
        .ok_or_else(|| ApiError::not_found(format!("model {id:?} does not exist")))?;
    Ok(json!(s))
}

async fn one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id("model id", &id)?;
    status_of(&state, &id).map(Json)
}

async fn register(
    State(state): State<AppState>,
    body: Result<ApiJson<ModelConfig>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(config) = body?;
    let config = checked_model(&state, config).await?;
    let id = config.id.clone();
    // The cache reads the file's header on the blocking pool, outside its lock.
    state.serve.cache.register(config).await?;
    tracing::info!(model = %id, "Registered model");
    Ok((StatusCode::CREATED, Json(status_of(&state, &id)?)).into_response())
}

/// A model from the API made safe to hand to the cache: a valid id, numbers in range, the
/// path inside the model roots, and its files regular and within the size limit. The file
/// checks run off the async runtime and never open the files.
async fn checked_model(state: &AppState, mut config: ModelConfig) -> Result<ModelConfig, ApiError> {
    let models_dir = state.models_dir.clone();
    let rules = state.files.clone();
    let checked = tokio::task::spawn_blocking(move || -> Result<ModelConfig, String> {
        crate::ids::check_id("model id", &config.id).map_err(|e| format!("id: {e}"))?;
        config.path = files::confine("path", &config.path, &models_dir, &rules.model_roots)?;
        config.finish(&models_dir)?;
        let format = config.format.ok_or("format: cannot tell the format")?;
        files::check_model(&config.path, format, rules.max_model_file_bytes)?;
        Ok(config)
    })
    .await
    .map_err(|e| ApiError::internal(format!("checking the model failed: {e}")))?;
    checked.map_err(|e| ApiError::bad_request("", e))
}

async fn unregister(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_id("model id", &id)?;
    state.serve.cache.unregister(&id).await?;
    tracing::info!(model = %id, "Unregistered model");
    Ok(StatusCode::NO_CONTENT)
}

async fn load(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id("model id", &id)?;
    state.serve.cache.load(&id).await?;
    status_of(&state, &id).map(Json)
}

async fn unload(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id("model id", &id)?;
    state.serve.cache.unload(&id)?;
    status_of(&state, &id).map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmodelBody {
    target: String,
}

async fn set_vmodel(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<ApiJson<VmodelBody>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let ApiJson(body) = body?;
    check_id("vmodel", &name)?;
    check_id("target", &body.target)?;
    state.serve.cache.set_vmodel(&name, &body.target).await?;
    Ok(Json(json!({"name": name, "target": body.target})))
}

/// An id from a request, checked by the one id rule; a 400 naming the field otherwise.
fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    crate::ids::check_id(what, id).map_err(|e| ApiError::bad_request("", e))
}

async fn remove_vmodel(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_id("vmodel", &name)?;
    state.serve.cache.remove_vmodel(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tenants(State(state): State<AppState>) -> Json<Value> {
    let tenants: Vec<Value> = state
        .tenancy
        .tenants()
        .into_iter()
        .map(|(id, tier)| json!({"id": id, "tier": tier}))
        .collect();
    Json(
        json!({"tenants": tenants, "tiers": state.tenancy.tiers().iter().map(|t| json!(**t)).collect::<Vec<_>>()}),
    )
}

async fn add_tenant(
    State(state): State<AppState>,
    body: Result<ApiJson<crate::tenancy::TenantConfig>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(t) = body?;
    check_id("tenant id", &t.id)?;
    let id = t.id.clone();
    state.tenancy.add_tenant(t)?;
    Ok((StatusCode::CREATED, Json(json!({"id": id}))).into_response())
}

/// A new API key, shown in this response only (stored hashed).
async fn create_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = state.tenancy.create_key(&id)?;
    tracing::info!(tenant = %id, "Created an API key");
    Ok((StatusCode::CREATED, Json(json!({"tenant": id, "key": key}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    key: String,
}

async fn revoke_key(
    State(state): State<AppState>,
    body: Result<ApiJson<KeyBody>, ApiError>,
) -> Result<StatusCode, ApiError> {
    let ApiJson(k) = body?;
    state.tenancy.revoke_key(&k.key)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Invoice lines from the pricing plugin, with each tenant's use beside them; `None` when the
/// built-in flat rate applies.
pub(super) async fn settle(
    state: &AppState,
    p: &Period,
    tenants: &[(String, String)],
    tiers: &[std::sync::Arc<crate::tenancy::Tier>],
    usage: &[crate::ledger::Usage],
) -> Result<Option<Vec<crate::ledger::InvoiceLine>>, ApiError> {
    use crate::policy::{TenantUse, TierInfo};
    let used: std::collections::BTreeMap<&str, &crate::ledger::Usage> =
        usage.iter().map(|u| (u.tenant.as_str(), u)).collect();
    let zero = crate::ledger::Usage::default();
    let period = p.from.map_or_else(
        || "all".to_string(),
        |s| crate::tenancy::limits::month_label(s.saturating_mul(1000)),
    );
    let lines = state
        .serve
        .policies
        .settle(
            &period,
            tiers
                .iter()
                .map(|t| TierInfo {
                    name: t.name.clone(),
                    price: t.price,
                    weight: t.weight,
                })
                .collect(),
            tenants
                .iter()
                .map(|(tenant, tier)| {
                    let u = used.get(tenant.as_str()).copied().unwrap_or(&zero);
                    TenantUse {
                        tenant: tenant.clone(),
                        tier: tier.clone(),
                        requests: u.requests,
                        prompt_tokens: u.input_tokens,
                        completion_tokens: u.output_tokens,
                        device_ms: (u.device_seconds * 1000.0) as u64,
                    }
                })
                .collect(),
        )
        .await?;
    Ok(lines.map(|lines| {
        lines
            .into_iter()
            .map(|l| {
                let u = used.get(l.tenant.as_str()).copied().unwrap_or(&zero);
                crate::ledger::InvoiceLine {
                    requests: u.requests,
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    tenant: l.tenant,
                    tier: l.tier,
                    description: l.description,
                    amount: l.amount,
                }
            })
            .collect()
    }))
}

/// The policy slots: what is loaded in each, and how it has fared.
async fn policies(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"slots": state.serve.policies.status()}))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reload {
    /// A new component file; absent: the loaded one's file again.
    #[serde(default)]
    plugin: Option<std::path::PathBuf>,
    /// A new config; absent: the loaded one's.
    #[serde(default)]
    config: Option<Value>,
}

/// Load a plugin into a slot (a new file or config, or the same again). The old one keeps
/// serving until the new one has compiled and accepted its config; if it does not, the old
/// one stays and the answer says why.
async fn reload_policy(
    State(state): State<AppState>,
    axum::extract::Path(slot): axum::extract::Path<String>,
    body: Option<Json<Reload>>,
) -> Result<Json<Value>, ApiError> {
    let mut r = body.map(|Json(r)| r).unwrap_or_default();
    if let Some(plugin) = r.plugin.take() {
        r.plugin = Some(checked_plugin(&state, plugin).await?);
    }
    let config = r.config.map(|v| match v {
        Value::String(s) => s,
        v => v.to_string(),
    });
    let name: SlotName = slot
        .parse()
        .map_err(|e: NoSuchSlot| ApiError::not_found(e.to_string()))?;
    let result = reload_slot(name, &*state.serve.policies.slot(name), r.plugin, config).await;
    match result {
        Ok(version) => Ok(Json(json!({"slot": name, "version": version}))),
        Err(message) => Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "plugin_rejected",
            message,
        )),
    }
}

/// A plugin path from the API: inside the plugin roots, a regular file within the plugin size
/// limit (checked off the async runtime, without opening it); a 400 saying why otherwise.
async fn checked_plugin(
    state: &AppState,
    plugin: std::path::PathBuf,
) -> Result<std::path::PathBuf, ApiError> {
    let roots = state.files.plugin_roots.clone();
    let max = state.serve.policies.router.settings.max_plugin_bytes;
    let checked = tokio::task::spawn_blocking(move || -> Result<std::path::PathBuf, String> {
        let path = files::confine("plugin", &plugin, std::path::Path::new("."), &roots)?;
        files::check_regular("plugin", &path, max)?;
        Ok(path)
    })
    .await
    .map_err(|e| ApiError::internal(format!("checking the plugin failed: {e}")))?;
    checked.map_err(|e| ApiError::bad_request("", e))
}

async fn reload_slot(
    name: SlotName,
    slot: &dyn AnySlot,
    plugin: Option<std::path::PathBuf>,
    config: Option<String>,
) -> Result<u64, String> {
    match (plugin, config) {
        (None, None) => slot.reload().await,
        (plugin, config) => {
            let current = slot.status();
            let plugin = plugin
                .or(current.path)
                .ok_or_else(|| format!("no plugin is loaded in the {name} slot: give `plugin`"))?;
            let config = match config {
                Some(c) => c,
                None => slot.config().unwrap_or_default(),
            };
            slot.load(&plugin, config).await
        }
    }
}

async fn usage(
    State(state): State<AppState>,
    axum::extract::Query(p): axum::extract::Query<Period>,
) -> Result<Json<Value>, ApiError> {
    let got = super::mesh_ledger::gather(&state, p.tenant.as_deref(), &p).await?;
    let mut answer = json!({"usage": got.usage});
    if state.cluster.is_some() {
        answer["mesh"] = got.describe();
    }
    Ok(Json(answer))
}

/// The invoice of a period from the ledger, as JSON or `format=csv`: through the pricing
/// plugin when one is loaded, else the built-in flat rate.
async fn invoice(
    State(state): State<AppState>,
    axum::extract::Query(p): axum::extract::Query<Period>,
) -> Result<Response, ApiError> {
    let got = super::mesh_ledger::gather(&state, None, &p).await?;
    let tenants = state.tenancy.tenants();
    let tiers = state.tenancy.tiers();
    let (lines, pricing) = match settle(&state, &p, &tenants, &tiers, &got.usage).await? {
        Some(lines) => (lines, "plugin"),
        None => (
            crate::ledger::flat_rate_invoice(&tenants, &tiers, &got.usage),
            "built-in",
        ),
    };
    Ok(match p.format.as_deref() {
        Some("csv") => {
            let mut resp = (
                [(header::CONTENT_TYPE, "text/csv")],
                crate::ledger::invoice_csv(&lines),
            )
                .into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&got.unreachable.join(",")) {
                if !got.unreachable.is_empty() {
                    resp.headers_mut().insert("x-flatmesh-unreachable", v);
                }
            }
            resp
        }
        None | Some("json") => {
            // + 0.0: an empty sum is -0.0, which would print as "-0.0".
            let total: f64 = lines.iter().map(|l| l.amount).sum::<f64>() + 0.0;
            let mut answer = json!({"pricing": pricing, "lines": lines, "total": total});
            if state.cluster.is_some() {
                answer["mesh"] = got.describe();
            }
            Json(answer).into_response()
        }
        Some(other) => {
            return Err(ApiError::bad_request(
                "format",
                format!("{other:?} is not json or csv"),
            ))
        }
    })
}
