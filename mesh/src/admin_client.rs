//! `flatmesh models|tenants|ledger|policies|mesh ...`: the admin API from the command line.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

/// Where the agent is and how to authenticate to its admin API.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The agent's HTTP address.
    #[arg(long, env = "FLATMESH_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Admin token (server.admin_token), if the agent requires one.
    #[arg(long, env = "FLATMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ModelsArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(clap::Args, Debug)]
pub struct TenantsArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: TenantsCommand,
}

#[derive(Subcommand, Debug)]
enum TenantsCommand {
    /// List tenants and tiers.
    List,
    /// Add a tenant on a tier.
    Add { id: String, tier: String },
    /// Create an API key for a tenant (printed once; stored hashed).
    Key { id: String },
    /// Revoke an API key.
    Revoke { key: String },
}

#[derive(clap::Args, Debug)]
pub struct LedgerArgs {
    #[command(flatten)]
    target: Target,
    /// Period start, Unix seconds.
    #[arg(long, global = true)]
    from: Option<u64>,
    /// Period end (exclusive), Unix seconds.
    #[arg(long, global = true)]
    to: Option<u64>,
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(clap::Args, Debug)]
pub struct PoliciesArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: PoliciesCommand,
}

#[derive(Subcommand, Debug)]
enum PoliciesCommand {
    /// The policy slots: what is loaded in each and how it fares.
    List,
    /// Load a plugin into a slot again, or a new file or config (the old one stays if the new
    /// one is rejected).
    Reload {
        /// router, cache, pricing or residency
        slot: String,
        /// A new component file (a path on the agent's machine).
        #[arg(long)]
        plugin: Option<String>,
        /// A new config: JSON, or any string given to the plugin as it is.
        #[arg(long)]
        config: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct MeshArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: MeshCommand,
}

#[derive(Subcommand, Debug)]
enum MeshCommand {
    /// Every live node as the agent sees it: front door, draining, devices, models ready.
    Status,
}

pub fn mesh(args: MeshArgs) -> ExitCode {
    match args.command {
        MeshCommand::Status => send(&args.target, reqwest::Method::GET, "mesh", None),
    }
}

pub fn policies(args: PoliciesArgs) -> ExitCode {
    use reqwest::Method;
    let t = &args.target;
    match args.command {
        PoliciesCommand::List => send(t, Method::GET, "policies", None),
        PoliciesCommand::Reload {
            slot,
            plugin,
            config,
        } => {
            let mut body = json!({});
            if let Some(p) = plugin {
                body["plugin"] = json!(p);
            }
            if let Some(c) = config {
                body["config"] = serde_json::from_str(&c).unwrap_or(Value::String(c));
            }
            send(
                t,
                Method::POST,
                &format!("policies/{slot}/reload"),
                Some(body),
            )
        }
    }
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Usage per tenant over the period.
    Usage {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The invoice of the period.
    Invoice {
        /// json or csv
        #[arg(long, default_value = "json")]
        format: String,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// List models with their state, devices and vmodels.
    List,
    /// Register a model (kept across restarts).
    Register {
        id: String,
        /// A GGUF file or model directory (relative paths are under the agent's models_dir).
        path: String,
        #[arg(long)]
        format: Option<String>,
        #[arg(long)]
        keep_alive: Option<String>,
        #[arg(long)]
        max_concurrency: Option<usize>,
        #[arg(long)]
        pinned: bool,
    },
    /// Unregister a model registered through the API.
    Unregister { id: String },
    /// Load a model now and wait until it is ready.
    Load { id: String },
    /// Unload a model (after its running requests finish).
    Unload { id: String },
    /// Point a vmodel at a model (the model loads first).
    Alias { name: String, target: String },
}

pub fn models(args: ModelsArgs) -> ExitCode {
    use reqwest::Method;
    let t = &args.target;
    match args.command {
        ModelsCommand::List => send(t, Method::GET, "models", None),
        ModelsCommand::Register {
            id,
            path,
            format,
            keep_alive,
            max_concurrency,
            pinned,
        } => {
            let mut body = json!({"id": id, "path": path, "pinned": pinned});
            if let Some(f) = format {
                body["format"] = json!(f);
            }
            if let Some(k) = keep_alive {
                body["keep_alive"] = json!(k);
            }
            if let Some(m) = max_concurrency {
                body["max_concurrency"] = json!(m);
            }
            send(t, Method::POST, "models", Some(body))
        }
        ModelsCommand::Unregister { id } => send(t, Method::DELETE, &format!("models/{id}"), None),
        ModelsCommand::Load { id } => send(t, Method::POST, &format!("models/{id}/load"), None),
        ModelsCommand::Unload { id } => send(t, Method::POST, &format!("models/{id}/unload"), None),
        ModelsCommand::Alias { name, target } => send(
            t,
            Method::PUT,
            &format!("vmodels/{name}"),
            Some(json!({"target": target})),
        ),
    }
}

pub fn tenants(args: TenantsArgs) -> ExitCode {
    use reqwest::Method;
    let t = &args.target;
    match args.command {
        TenantsCommand::List => send(t, Method::GET, "tenants", None),
        TenantsCommand::Add { id, tier } => send(
            t,
            Method::POST,
            "tenants",
            Some(json!({"id": id, "tier": tier})),
        ),
        TenantsCommand::Key { id } => send(t, Method::POST, &format!("tenants/{id}/keys"), None),
        TenantsCommand::Revoke { key } => {
            send(t, Method::POST, "keys/revoke", Some(json!({"key": key})))
        }
    }
}

pub fn ledger(args: LedgerArgs) -> ExitCode {
    let mut query = Vec::new();
    if let Some(f) = args.from {
        query.push(format!("from={f}"));
    }
    if let Some(t) = args.to {
        query.push(format!("to={t}"));
    }
    let path = match args.command {
        LedgerCommand::Usage { tenant } => {
            if let Some(t) = tenant {
                query.push(format!("tenant={t}"));
            }
            "usage"
        }
        LedgerCommand::Invoice { format } => {
            query.push(format!("format={format}"));
            "invoice"
        }
    };
    send(
        &args.target,
        reqwest::Method::GET,
        &format!("{path}?{}", query.join("&")),
        None,
    )
}

/// One admin call; prints the answer (pretty JSON where it is JSON).
fn send(t: &Target, method: reqwest::Method, path: &str, body: Option<Value>) -> ExitCode {
    let base = t.url.trim_end_matches('/');
    let mut req = reqwest::blocking::Client::new().request(method, format!("{base}/admin/{path}"));
    if let Some(token) = &t.admin_token {
        req = req.bearer_auth(token);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send() {
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().unwrap_or_default();
            let pretty = serde_json::from_str::<Value>(&text)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or(text.clone()))
                .unwrap_or(text);
            if status.is_success() {
                if !pretty.is_empty() {
                    println!("{}", pretty.trim_end());
                }
                ExitCode::SUCCESS
            } else {
                eprintln!("flatmesh: {status}: {pretty}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("flatmesh: cannot reach {base}: {e}");
            ExitCode::FAILURE
        }
    }
}
