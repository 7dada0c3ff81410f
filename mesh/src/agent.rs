//! The agent: built from the config (subsystems wired, listeners bound), then run until shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::{
    api::{self, AppState},
    cache::{Cache, Registry},
    cluster::{Cluster, MeshRegistry},
    config::Config,
    ledger::Ledger,
    metrics::Metrics,
    policy::Policies,
    serve::{Mesh, Serve},
    tenancy::{limits::Limits, Tenancy},
};

/// A wired agent with its listeners bound, ready to [`run`](Agent::run).
pub struct Agent {
    config: Config,
    state: AppState,
    listeners: Listeners,
}

/// The two front doors' sockets, bound before anything is served.
struct Listeners {
    http: TcpListener,
    http_addr: SocketAddr,
    grpc: TcpListener,
    grpc_addr: SocketAddr,
}

/// The subsystems the serve path and the mesh share.
struct Core {
    metrics: Metrics,
    cache: Cache,
    ledger: Ledger,
    limits: Limits,
    tenancy: Tenancy,
}

impl Agent {
    /// Open the state, find the devices, load the policies, bind the listeners and make the
    /// mesh handle (not yet joined).
    pub async fn build(config: Config) -> anyhow::Result<Agent> {
        let metrics = Metrics::new();
        let (cache, mesh_registry) = open_cache(&config, &metrics).await?;
        let ledger = Ledger::open(&config.state_dir)?;
        if config.ledger.postgres.is_some() {
            ledger.share(&config.ledger, &node_name(&config))?;
        }
        let gpus = discover_gpus().await?;
        let policies = open_policies(&config, &cache, &metrics).await?;
        let limits = Limits::new(ledger.clone());
        let tenancy = Tenancy::new(&config.tenancy, Some(&config.state_dir))?;
        let core = Core {
            metrics,
            cache,
            ledger,
            limits,
            tenancy,
        };
        let listeners = Listeners::bind(&config).await?;
        let cluster = match (&config.mesh, mesh_registry) {
            (Some(_), Some(registry)) => Some(mesh_handle(&config, &listeners, &core, registry)),
            _ => None,
        };
        let serve = serve(&config, &core, policies, cluster.as_ref());
        let state = app_state(&config, core, serve, gpus, cluster);
        Ok(Agent {
            config,
            state,
            listeners,
        })
    }

    /// Join the mesh, start the background tasks and both front doors, and serve until
    /// `shutdown` resolves; then leave the mesh and drain.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // One signal stops everything: the servers, the reaper, preloading, the policy watch.
        let (stop_tx, stop_rx) = watch::channel(false);
        let Agent {
            config,
            state,
            listeners,
        } = self;
        if let Some(cluster) = &state.cluster {
            cluster.start();
        }
        announce(&config, &listeners)?;
        spawn_background(&config, &state, &stop_rx);
        let grpc = spawn_grpc(&config, &state, listeners.grpc, stopped(stop_rx.clone()));
        let cluster = state.cluster.clone();
        let unready = state.draining.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Not ready from now on (a load balancer stops sending here), and peers stop
            // forwarding here before this node stops taking requests.
            unready.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(c) = cluster {
                c.leave().await;
            }
            let _ = stop_tx.send(true);
        });
        let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
        serve_http(&config, state, listeners.http, stopped(stop_rx), grace).await?;
        match tokio::time::timeout(grace, grpc).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server failed"),
            Err(_) => tracing::warn!("gRPC streams still open after the grace period"),
            _ => {}
        }
        tracing::info!("Stopped");
        Ok(())
    }
}

/// Resolves once the stop signal is sent.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The model cache over its registry. In a mesh the registry file is mirrored to etcd
/// (and that mirror is returned for the mesh); alone it is the registry.
async fn open_cache(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<(Cache, Option<Arc<MeshRegistry>>)> {
    let registry = Registry::open(&config.state_dir)?;
    match &config.mesh {
        Some(mesh) => {
            let shared = Arc::new(MeshRegistry::new(registry, &mesh.prefix)?);
            let store = shared.clone() as Arc<dyn crate::registry::ModelRegistry>;
            let cache = Cache::open(
                config.cache.clone(),
                &config.models,
                Some(store),
                metrics.clone(),
            )
            .await?;
            Ok((cache, Some(shared)))
        }
        None => {
            let cache = Cache::new(
                config.cache.clone(),
                &config.models,
                Some(registry),
                metrics.clone(),
            )?;
            Ok((cache, None))
        }
    }
}

/// The CUDA GPUs of this machine, reported (copies go to a GPU through the `kind = "cuda"`
/// devices of `cache.devices`).
async fn discover_gpus() -> anyhow::Result<Vec<flatmesh_runtime::device::GpuInfo>> {
    let gpus = tokio::task::spawn_blocking(flatmesh_runtime::device::discover_cuda).await?;
    Ok(match gpus {
        Ok(gpus) if gpus.is_empty() => {
            tracing::info!("No CUDA GPUs found; the pool is host memory");
            gpus
        }
        Ok(gpus) => {
            for g in &gpus {
                tracing::info!(gpu = g.ordinal, name = %g.name, total_bytes = g.total_bytes, free_bytes = g.free_bytes,
                    "Found a CUDA GPU (copies go to it through cache.devices of kind \"cuda\")");
            }
            gpus
        }
        Err(reason) => {
            tracing::info!(%reason, "No CUDA driver; only host devices take copies");
            Vec::new()
        }
    })
}

/// The policy slots with their configured plugins; the residency plugin advises the cache.
async fn open_policies(
    config: &Config,
    cache: &Cache,
    metrics: &Metrics,
) -> anyhow::Result<Policies> {
    let policies = Policies::new(
        &config.policy,
        Some(Arc::new(crate::serve::CacheEmbedder(cache.clone()))),
        config.scheduler.max_wait.0,
        metrics.clone(),
    )?;
    policies.load_configured(&config.policy).await?;
    cache.set_advisor(Arc::new(crate::policy::residency::PluginAdvisor(
        policies.clone(),
    )));
    Ok(policies)
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let (http, http_addr) = api::bind(config.http_addr()?).await?;
        let (grpc, grpc_addr) = api::bind(config.grpc_addr()?).await?;
        Ok(Listeners {
            http,
            http_addr,
            grpc,
            grpc_addr,
        })
    }
}

/// This node's handle on the mesh, advertising the bound addresses unless configured.
fn mesh_handle(
    config: &Config,
    listeners: &Listeners,
    core: &Core,
    registry: Arc<MeshRegistry>,
) -> Cluster {
    let mesh = config.mesh.as_ref().expect("called with a mesh");
    let http = mesh
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{}", listeners.http_addr));
    let grpc = mesh
        .advertise_grpc
        .clone()
        .unwrap_or_else(|| format!("http://{}", listeners.grpc_addr));
    Cluster::new(
        mesh.clone(),
        (http, grpc),
        core.cache.clone(),
        registry,
        core.tenancy.clone(),
        core.limits.clone(),
        core.metrics.clone(),
    )
}

/// The serve path's handle, with the mesh (if any) already in it.
fn serve(config: &Config, core: &Core, policies: Policies, cluster: Option<&Cluster>) -> Serve {
    Serve {
        cache: core.cache.clone(),
        scheduler: crate::scheduler::Scheduler::new(
            config.scheduler.slots,
            config.scheduler.max_queue,
            config.scheduler.max_wait.0,
            core.metrics.clone(),
        ),
        limits: core.limits.clone(),
        policies,
        ledger: core.ledger.clone(),
        metrics: core.metrics.clone(),
        max_run: config.scheduler.max_run.0,
        mesh: cluster.map(|cluster| {
            Arc::new(Mesh {
                cluster: cluster.clone(),
                token: config.mesh.as_ref().and_then(|m| m.token.clone()),
            })
        }),
    }
}

/// What the front doors' handlers reach, beside the serve path.
fn app_state(
    config: &Config,
    core: Core,
    serve: Serve,
    gpus: Vec<flatmesh_runtime::device::GpuInfo>,
    cluster: Option<Cluster>,
) -> AppState {
    AppState {
        serve,
        gpus: Arc::new(gpus),
        draining: Arc::default(),
        models_dir: config.models_dir.clone(),
        admin_token: config.server.admin_token.clone(),
        metrics_token: config.server.metrics_token.clone(),
        mesh_token: config.mesh.as_ref().and_then(|m| m.token.clone()),
        files: Arc::new(crate::files::FileRules {
            model_roots: std::iter::once(config.models_dir.clone())
                .chain(config.server.model_roots.iter().cloned())
                .collect(),
            plugin_roots: config.policy.roots(),
            max_model_file_bytes: config.server.max_model_file_bytes.0,
        }),
        v2_stats: Arc::default(),
        tenancy: core.tenancy,
        cluster,
    }
}

/// Log the bound addresses, and write them to `server.addr_file` when set.
fn announce(config: &Config, listeners: &Listeners) -> anyhow::Result<()> {
    let (addr, grpc_addr) = (listeners.http_addr, listeners.grpc_addr);
    tracing::info!(http = %addr, grpc = %grpc_addr, models = config.models.len(), "Listening");
    if let Some(path) = &config.server.addr_file {
        let json = serde_json::json!({"http": addr.to_string(), "grpc": grpc_addr.to_string()});
        // Written beside and renamed into place: whoever waits for the file never reads half.
        let mut part = path.clone().into_os_string();
        part.push(".part");
        std::fs::write(&part, json.to_string())
            .and_then(|()| std::fs::rename(&part, path))
            .map_err(|e| {
                anyhow::anyhow!("cannot write server.addr_file {}: {e}", path.display())
            })?;
    }
    Ok(())
}

/// The tasks beside the front doors, each stopped by the stop signal: the policy watch,
/// the reaper of idle copies, preloading, and the shipper of the shared ledger.
fn spawn_background(config: &Config, state: &AppState, stop_rx: &watch::Receiver<bool>) {
    if config.policy.watch {
        state.serve.policies.watch(stopped(stop_rx.clone()));
    }
    let reaper = state.serve.cache.clone();
    let stop = stopped(stop_rx.clone());
    tokio::spawn(async move { reaper.run_reaper(stop).await });
    if let Some(shared) = state.serve.ledger.shared() {
        let ledger = state.serve.ledger.clone();
        let metrics = state.serve.metrics.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(crate::ledger::shipper::run(ledger, shared, metrics, stop));
    }
    let preload = state.serve.cache.clone();
    let stop = stopped(stop_rx.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = stop => {}
            _ = preload.preload() => {}
        }
    });
}

/// The gRPC front door on its own task, until `stop`.
fn spawn_grpc(
    config: &Config,
    state: &AppState,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    // Keepalive pings close connections whose peer is gone.
    let grpc = tonic::transport::Server::builder()
        .trace_fn(crate::telemetry::grpc_span)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(api::v2::grpc::size_limit_status())
        .layer(api::v2::grpc::name_the_node(
            state.cluster.as_ref().map(|c| c.node().to_string()),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            api::v2::grpc::service(state.clone(), config.server.grpc_max_message_bytes),
            api::auth::grpc(state.tenancy.clone(), state.admin_token.clone()),
        ))
        .serve_with_incoming_shutdown(
            api::v2::incoming::bounded(
                listener,
                api::v2::incoming::Limits {
                    max: config.server.max_connections,
                    per_peer: config.server.grpc_per_peer(),
                    handshake: config.server.grpc_handshake_timeout.0,
                },
            ),
            stop,
        );
    tokio::spawn(grpc)
}

/// The HTTP front door until `stop`, then its drain of up to `grace`.
async fn serve_http(
    config: &Config,
    state: AppState,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = api::router(state.clone(), config.server.max_body_bytes);
    let limits = api::ServerLimits {
        header_read_timeout: config.server.header_read_timeout.0,
        body_read_timeout: config.server.body_read_timeout.0,
        max_connections: config.server.max_connections,
        max_body_bytes: config.server.max_body_bytes,
    };
    api::serve_with(listener, app, state, stop, grace, limits).await
}

/// This node's name in the shared ledger: its mesh name, else the host's.
fn node_name(config: &Config) -> String {
    match &config.mesh {
        Some(m) => m.node.clone(),
        None => std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map_or_else(|| "local".to_string(), |h| h.trim().to_string()),
    }
}
