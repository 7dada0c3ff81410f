//! The agent's behaviour without any model files: it starts, reports, and refuses clearly.

use std::{process::Command, time::Duration};

use flatmesh_tests::{agent_bin, Agent};
use serde_json::json;

#[test]
fn missing_model_files_are_reported_and_refused_without_taking_the_agent_down() {
    let agent = Agent::start("models_dir = '/nonexistent/flatmesh-models'\n", &[]);
    agent.wait_for("/readyz", Duration::from_secs(30));
    let models: serde_json::Value = agent.get("/v1/models").json().unwrap();
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for m in data {
        assert_eq!(m["state"], "failed", "{m}");
    }
    let r = agent.post(
        "/v1/chat/completions",
        json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("model file not found") && msg.contains("/nonexistent/flatmesh-models"),
        "{msg}"
    );
    assert_eq!(agent.get("/healthz").status(), 200);
    let metrics = agent.get("/metrics").text().unwrap();
    assert!(
        metrics.contains("flatmesh_model_load_failures_total{kind=\"model_file_not_found\""),
        "{metrics}"
    );
}

#[test]
fn config_command_prints_the_effective_config_with_overrides() {
    let out = Command::new(agent_bin())
        .args(["config", "--http-addr", "0.0.0.0:9999"])
        .env("FLATMESH_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("http_addr = \"0.0.0.0:9999\""), "{text}");
    assert!(text.contains("format = \"json\""), "{text}");
    assert!(text.contains("smollm2-135m-instruct"), "{text}");
}

#[test]
fn bad_listen_address_exits_with_the_key() {
    let out = Command::new(agent_bin())
        .args(["serve", "--http-addr", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("server.http_addr"), "{err}");
}
