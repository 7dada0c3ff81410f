//! The command line: `flatmesh serve` and its flags, merged into the config the agent runs.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, LogFormat},
    units::Secs,
};

#[derive(Parser, Debug)]
#[command(
    name = "flatmesh",
    version,
    about = "A serving mesh for a shared, flat-rate model service"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    Serve(ServeArgs),
    /// Print the effective configuration (defaults, file and overrides merged) as TOML.
    Config(ServeArgs),
    /// Manage the models of a running agent through its admin API.
    Models(crate::admin_client::ModelsArgs),
    /// Manage tenants and API keys of a running agent.
    Tenants(crate::admin_client::TenantsArgs),
    /// Usage and invoices from a running agent's ledger (JSON or CSV).
    Ledger(crate::admin_client::LedgerArgs),
    /// List and reload the policy plugins of a running agent.
    Policies(crate::admin_client::PoliciesArgs),
    /// The mesh as a running agent sees it (`mesh status`).
    Mesh(crate::admin_client::MeshArgs),
}

/// Every flag overrides the config file; every flag is also an environment variable.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML config file. Without one, built-in defaults serve the demo models.
    #[arg(long, short, env = "FLATMESH_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address (server.http_addr).
    #[arg(long, env = "FLATMESH_HTTP_ADDR")]
    http_addr: Option<String>,
    /// gRPC listen address (server.grpc_addr).
    #[arg(long, env = "FLATMESH_GRPC_ADDR")]
    grpc_addr: Option<String>,
    /// Directory of relative model paths (models_dir).
    #[arg(long, env = "FLATMESH_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Log format (log.format).
    #[arg(long, env = "FLATMESH_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Log filter (log.level).
    #[arg(long, env = "FLATMESH_LOG_LEVEL")]
    log_level: Option<String>,
    /// Write bound addresses as JSON to this file (server.addr_file).
    #[arg(long, env = "FLATMESH_ADDR_FILE")]
    addr_file: Option<PathBuf>,
    /// Directory for state that survives restarts (state_dir).
    #[arg(long, env = "FLATMESH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Bearer token of the admin API (server.admin_token).
    #[arg(long, env = "FLATMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Bearer token `/metrics` requires (server.metrics_token).
    #[arg(long, env = "FLATMESH_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// HTTP and gRPC connections open at once, each (server.max_connections).
    #[arg(long, env = "FLATMESH_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// How long a client may take to send request headers, e.g. `10s`
    /// (server.header_read_timeout).
    #[arg(long, env = "FLATMESH_HEADER_READ_TIMEOUT", value_parser = parse_secs)]
    header_read_timeout: Option<Secs>,
    /// How long a client may take to send a request body, e.g. `30s`
    /// (server.body_read_timeout).
    #[arg(long, env = "FLATMESH_BODY_READ_TIMEOUT", value_parser = parse_secs)]
    body_read_timeout: Option<Secs>,
    /// Base URL of an OTLP/HTTP trace receiver (telemetry.otlp_endpoint).
    #[arg(long, env = "FLATMESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// etcd endpoints, comma-separated; joins the mesh (mesh.etcd).
    #[arg(long, env = "FLATMESH_MESH_ETCD", value_delimiter = ',')]
    mesh_etcd: Option<Vec<String>>,
    /// This node's name in the mesh (mesh.node).
    #[arg(long, env = "FLATMESH_MESH_NODE")]
    mesh_node: Option<String>,
    /// This node's pool (mesh.pool): `onprem`, `spot`, ...
    #[arg(long, env = "FLATMESH_MESH_POOL")]
    mesh_pool: Option<String>,
    /// The URL peers reach this node's HTTP front door at (mesh.advertise).
    #[arg(long, env = "FLATMESH_MESH_ADVERTISE")]
    mesh_advertise: Option<String>,
    /// The URL peers reach this node's gRPC front door at (mesh.advertise_grpc).
    #[arg(long, env = "FLATMESH_MESH_ADVERTISE_GRPC")]
    mesh_advertise_grpc: Option<String>,
    /// The token the nodes of the mesh prove themselves to each other with (mesh.token).
    #[arg(long, env = "FLATMESH_MESH_TOKEN", hide_env_values = true)]
    mesh_token: Option<String>,
    /// The shared ledger's PostgreSQL URL (ledger.postgres).
    #[arg(long, env = "FLATMESH_LEDGER_POSTGRES", hide_env_values = true)]
    ledger_postgres: Option<String>,
}

fn parse_secs(s: &str) -> Result<Secs, String> {
    crate::units::parse_duration(s).map(Secs)
}

impl ServeArgs {
    fn config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.http_addr {
            c.server.http_addr = v;
        }
        if let Some(v) = self.grpc_addr {
            c.server.grpc_addr = v;
        }
        if let Some(v) = self.models_dir {
            c.models_dir = v;
        }
        if let Some(v) = self.log_format {
            c.log.format = v;
        }
        if let Some(v) = self.log_level {
            c.log.level = v;
        }
        if let Some(v) = self.addr_file {
            c.server.addr_file = Some(v);
        }
        if let Some(v) = self.state_dir {
            c.state_dir = v;
        }
        if let Some(v) = self.admin_token {
            c.server.admin_token = Some(v);
        }
        if let Some(v) = self.metrics_token {
            c.server.metrics_token = Some(v);
        }
        if let Some(v) = self.max_connections {
            c.server.max_connections = v;
        }
        if let Some(v) = self.header_read_timeout {
            c.server.header_read_timeout = v;
        }
        if let Some(v) = self.body_read_timeout {
            c.server.body_read_timeout = v;
        }
        if let Some(v) = self.otlp_endpoint {
            c.telemetry.otlp_endpoint = Some(v);
        }
        if let Some(v) = self.ledger_postgres {
            c.ledger.postgres = Some(v);
        }
        if let Some(v) = self.mesh_etcd {
            match &mut c.mesh {
                Some(m) => m.etcd = v,
                None => c.mesh = Some(crate::cluster::MeshConfig::new(v)),
            }
        }
        let mesh_flags = [
            ("--mesh-node", self.mesh_node.is_some()),
            ("--mesh-pool", self.mesh_pool.is_some()),
            ("--mesh-advertise", self.mesh_advertise.is_some()),
            ("--mesh-advertise-grpc", self.mesh_advertise_grpc.is_some()),
            ("--mesh-token", self.mesh_token.is_some()),
        ];
        match &mut c.mesh {
            Some(m) => {
                if let Some(v) = self.mesh_node {
                    m.node = v;
                }
                if let Some(v) = self.mesh_pool {
                    m.pool = v;
                }
                if let Some(v) = self.mesh_advertise {
                    m.advertise = Some(v);
                }
                if let Some(v) = self.mesh_advertise_grpc {
                    m.advertise_grpc = Some(v);
                }
                if let Some(v) = self.mesh_token {
                    m.token = Some(v);
                }
            }
            None => {
                if let Some((flag, _)) = mesh_flags.iter().find(|(_, set)| *set) {
                    anyhow::bail!(
                        "{flag} needs a mesh: give etcd endpoints ([mesh] etcd or --mesh-etcd)"
                    );
                }
            }
        }
        c.finish()
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let print_only = matches!(cli.command, Command::Config(_));
    let args = match cli.command {
        Command::Serve(a) | Command::Config(a) => a,
        Command::Models(m) => return crate::admin_client::models(m),
        Command::Tenants(t) => return crate::admin_client::tenants(t),
        Command::Ledger(l) => return crate::admin_client::ledger(l),
        Command::Policies(p) => return crate::admin_client::policies(p),
        Command::Mesh(m) => return crate::admin_client::mesh(m),
    };
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flatmesh: bad configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    if print_only {
        // Tokens (and the shared ledger's URL, which holds a password) are shown as set,
        // never printed (an init container's log keeps this).
        let mut shown = config.clone();
        let mesh_token = shown.mesh.as_mut().map(|m| &mut m.token);
        for token in [
            Some(&mut shown.server.admin_token),
            Some(&mut shown.server.metrics_token),
            mesh_token,
            Some(&mut shown.ledger.postgres),
        ]
        .into_iter()
        .flatten()
        {
            if token.is_some() {
                *token = Some("<set>".into());
            }
        }
        print!(
            "{}",
            toml::to_string_pretty(&shown).expect("config serializes")
        );
        return ExitCode::SUCCESS;
    }
    let telemetry = match init_logs(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("flatmesh: bad configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Agent stopped");
            eprintln!("flatmesh: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    if let Some(t) = telemetry {
        t.shutdown();
    }
    code
}

/// Logs to stderr, and spans to an OTLP receiver when one is configured.
fn init_logs(config: &Config) -> anyhow::Result<Option<crate::telemetry::Telemetry>> {
    use tracing_subscriber::{filter::filter_fn, prelude::*, EnvFilter, Layer};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // Colours only on a terminal: a log file or journald gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let fmt = match config.log.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let logs = fmt
        .with_filter(filter)
        .with_filter(filter_fn(crate::telemetry::logged));
    let instance = config
        .mesh
        .as_ref()
        .map_or_else(crate::cluster::host_name, |m| m.node.clone());
    match crate::telemetry::Telemetry::start(&config.telemetry, &instance)? {
        Some((telemetry, traces)) => {
            tracing_subscriber::registry()
                .with(logs)
                .with(traces.with_filter(filter_fn(crate::telemetry::traced)))
                .init();
            Ok(Some(telemetry))
        }
        None => {
            tracing_subscriber::registry().with(logs).init();
            Ok(None)
        }
    }
}

/// Build the agent from the config, and run it until SIGTERM or Ctrl-C.
async fn serve(config: Config) -> anyhow::Result<()> {
    crate::agent::Agent::build(config)
        .await?
        .run(shutdown_signal())
        .await
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
