//! The agent's HTTP front door: routes, shared state, and serving with graceful shutdown.

pub mod admin;
pub mod auth;
pub mod deadline;
pub mod error;
pub mod forward;
mod guard;
mod health;
pub mod mesh_ledger;
mod openai;
mod pages;
mod server;
mod status;
pub mod v2;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{extract::DefaultBodyLimit, Router};
use tokio::net::TcpListener;

pub use self::server::ServerLimits;

/// What every handler can reach: the serve path (and through it the cache, scheduler, limits,
/// policies, ledger and metrics), and what only the front doors use. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The one serve path every protocol's requests take.
    pub serve: crate::serve::Serve,
    /// Set once shutdown begins: `/readyz` turns 503 so balancers stop sending work.
    pub draining: Arc<AtomicBool>,
    /// Base of relative model paths registered through the admin API.
    pub models_dir: std::path::PathBuf,
    /// When set, the admin API requires it as a bearer token.
    pub admin_token: Option<String>,
    /// When set, `/metrics` requires it as a bearer token.
    pub metrics_token: Option<String>,
    /// In a mesh: what a peer sends in `x-flatmesh-mesh-token` on the internal endpoints
    /// (and nowhere else).
    pub mesh_token: Option<String>,
    /// Where model and plugin files named through the admin API may come from.
    pub files: Arc<crate::files::FileRules>,
    pub v2_stats: Arc<v2::Stats>,
    pub tenancy: crate::tenancy::Tenancy,
    /// CUDA GPUs found at start (reported only: engines run on host memory).
    pub gpus: Arc<Vec<flatmesh_runtime::device::GpuInfo>>,
    /// The mesh this node belongs to, if any.
    pub cluster: Option<crate::cluster::Cluster>,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let openai_auth = || axum::middleware::from_fn_with_state(state.clone(), auth::openai);
    // Each part's authentication is a route layer: it guards that part's routes only, and
    // a path no part has gets the one 404 below, whoever asks.
    let mut router = Router::new().merge(openai::routes().route_layer(openai_auth()));
    if state.cluster.is_some() {
        // What the other nodes of the mesh ask of this one, with the mesh token: requests
        // they place here, and this node's ledger records and usage.
        let peers_only =
            || axum::middleware::from_fn_with_state(state.clone(), forward::peers_only);
        router = router
            .route(
                crate::serve::peer::PATH,
                axum::routing::post(forward::serve_forwarded)
                    .layer(openai_auth())
                    .layer(peers_only()),
            )
            .route(
                mesh_ledger::PATH,
                axum::routing::get(mesh_ledger::own_records).layer(peers_only()),
            )
            .route(
                mesh_ledger::USAGE_PATH,
                axum::routing::get(mesh_ledger::own_usage).layer(peers_only()),
            );
    }
    router
        .merge(health::routes())
        .merge(status::routes())
        .merge(pages::routes())
        .merge(
            v2::rest::routes().route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                auth::v2,
            )),
        )
        .merge(admin::routes(state.clone()))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward::name_the_node,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(crate::telemetry::trace_http))
        .with_state(state)
}

/// A path that does not exist: 404 in the API's error shape, naming the path.
async fn not_found(uri: axum::http::Uri) -> error::ApiError {
    let path: String = uri.path().chars().take(256).collect();
    error::ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found_error",
        "not_found",
        format!("{path} does not exist"),
    )
}

/// Serve until `shutdown` resolves, then stop accepting and give in-flight requests
/// (streams included) up to `grace` to finish. Default limits; see [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    serve_with(
        listener,
        app,
        state,
        shutdown,
        grace,
        ServerLimits::default(),
    )
    .await
}

/// [`serve`] with header and body read timeouts and a bound on open connections.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    limits: ServerLimits,
) -> std::io::Result<()> {
    let on_shutdown = move || {
        state.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            grace_seconds = grace.as_secs_f64(),
            "Shutting down: draining in-flight requests"
        );
    };
    server::run(listener, app, limits, shutdown, on_shutdown, grace).await
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
