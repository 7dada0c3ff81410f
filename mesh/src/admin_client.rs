//! `flatmesh models ...`: the admin API from the command line.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct ModelsArgs {
    /// The agent's HTTP address.
    #[arg(long, env = "FLATMESH_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Admin token (server.admin_token), if the agent requires one.
    #[arg(long, env = "FLATMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: ModelsCommand,
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

pub fn run(args: ModelsArgs) -> ExitCode {
    let client = reqwest::blocking::Client::new();
    let base = args.url.trim_end_matches('/');
    let req = |method: reqwest::Method, path: String| {
        let mut r = client.request(method, format!("{base}/admin/{path}"));
        if let Some(t) = &args.admin_token {
            r = r.bearer_auth(t);
        }
        r
    };
    use reqwest::Method;
    let call = match args.command {
        ModelsCommand::List => req(Method::GET, "models".into()),
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
            req(Method::POST, "models".into()).json(&body)
        }
        ModelsCommand::Unregister { id } => req(Method::DELETE, format!("models/{id}")),
        ModelsCommand::Load { id } => req(Method::POST, format!("models/{id}/load")),
        ModelsCommand::Unload { id } => req(Method::POST, format!("models/{id}/unload")),
        ModelsCommand::Alias { name, target } => {
            req(Method::PUT, format!("vmodels/{name}")).json(&json!({"target": target}))
        }
    };
    match call.send() {
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().unwrap_or_default();
            let pretty = serde_json::from_str::<Value>(&text)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or(text.clone()))
                .unwrap_or(text);
            if status.is_success() {
                if !pretty.is_empty() {
                    println!("{pretty}");
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
