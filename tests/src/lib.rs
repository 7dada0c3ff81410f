//! Shared fixtures for end-to-end tests: start the real `flatmesh` binary on loopback.

pub mod fixtures;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The agent binary: `$FLATMESH_BIN`, or `target/debug/flatmesh` of this workspace.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLATMESH_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let bin = root.join("target/debug/flatmesh");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p flatmesh` first",
        bin.display()
    );
    bin
}

/// A policy plugin of `plugins/` as a component file, building the plugins once if needed.
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("plugins");
    let path = root.join(format!("target/wasm32-wasip2/release/{name}.wasm"));
    if !path.exists() {
        BUILT.call_once(|| {
            let status = Command::new(root.join("build"))
                .status()
                .expect("run plugins/build");
            assert!(status.success(), "plugins/build failed");
        });
    }
    assert!(
        path.exists(),
        "{} is missing after plugins/build",
        path.display()
    );
    path
}

/// The admin token tests configure where they need one (sent always; ignored when unset).
pub const ADMIN_TOKEN: &str = "s3cret";

/// A running agent on a free port; killed on drop.
pub struct Agent {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Start with this TOML config and wait until it listens.
    pub fn start(config: &str, args: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("flatmesh.toml");
        std::fs::write(&cfg, config).expect("write config");
        let addr_file = dir.path().join("addr.json");
        let mut cmd = Command::new(agent_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--addr-file",
            ])
            .arg(&addr_file)
            .args(args);
        if !args.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(dir.path().join("state"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("FLATMESH_TEST_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn flatmesh");
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    break format!("http://{}", v["http"].as_str().expect("http address"));
                }
            }
            assert!(Instant::now() < deadline, "agent did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        };
        Agent {
            child,
            url,
            _dir: dir,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        reqwest::blocking::get(format!("{}{path}", self.url)).expect("GET")
    }

    /// POST to the admin API with the test admin token.
    pub fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .expect("POST")
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .expect("POST")
    }

    /// Poll `path` until it answers 200.
    pub fn wait_for(&self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.get(path).status() != 200 {
            assert!(Instant::now() < deadline, "{path} never answered 200");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// The value of one Prometheus sample (`name{labels}`), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").text().expect("metrics text");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// The state of a model as the admin API reports it.
    pub fn model_state(&self, id: &str) -> String {
        let v: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("{}/admin/models/{id}", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .expect("GET")
            .json()
            .expect("status");
        v["state"].as_str().unwrap_or("?").to_string()
    }
}
