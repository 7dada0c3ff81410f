//! Policy plugins end to end: hostile plugins are contained by the real agent, and a bad
//! reload leaves the working plugin in place.

use std::time::Duration;

use flatmesh_tests::{
    fixtures::{write_llama_gguf, Size},
    plugin, Agent, ADMIN_TOKEN,
};
use serde_json::{json, Value};

/// An agent with one tiny model `tiny` and the hostile router in `mode`. The deadline counts
/// the plugin's CPU time, so a machine busy with other tests does not trip it.
fn agent(mode: &str, on_failure: &str) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_llama_gguf(&model, Size::TINY, 7).unwrap();
    let config = format!(
        "[server]\nadmin_token = \"{ADMIN_TOKEN}\"\n\
         [cache]\npreload = true\nkeep_alive = -1\n\
         [[models]]\nid = \"tiny\"\npath = \"{}\"\n\
         [policy]\ndeadline_ms = 20\nmemory_mib = 32\nhost_wait_ms = 500\nwatch = false\n\
         plugin_roots = [\"{}\", \"{}\"]\n\
         [policy.router]\nplugin = \"{}\"\nconfig = \"{mode}\"\non_failure = \"{on_failure}\"\n\
         default_target = \"tiny\"\n",
        model.display(),
        dir.path().display(),
        plugin("hostile").parent().unwrap().display(),
        plugin("hostile").display()
    );
    let agent = Agent::start(&config, &[]);
    agent.wait_for("/readyz", Duration::from_secs(60));
    (agent, dir)
}

fn complete(agent: &Agent, model: &str) -> (u16, Value) {
    let r = agent.post(
        "/v1/completions",
        json!({"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0}),
    );
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn calls(agent: &Agent, result: &str) -> f64 {
    agent.metric(&format!(
        "flatmesh_policy_calls_total{{result=\"{result}\",slot=\"router\"}}"
    ))
}

fn set_mode(agent: &Agent, mode: &str) {
    let r = agent.admin_post("/admin/policies/router/reload", json!({"config": mode}));
    assert_eq!(r.status(), 200, "reload to {mode}: {:?}", r.text());
}

/// Each misbehaviour and the failure kind the agent must see.
const HOSTILE: [(&str, &str); 7] = [
    ("loop", "timeout"),
    ("sleep", "timeout"),
    ("bomb", "memory"),
    ("trap", "trap"),
    ("panic", "trap"),
    ("huge", "invalid"),
    ("invalid", "invalid"),
];

/// Switch the agent's router through every misbehaviour, ask for `model` each time, and let
/// `check` judge the answer; every failure must be counted under its kind and leave the agent
/// healthy.
fn each_hostile_mode(agent: &Agent, model: &str, check: impl Fn(&str, &str, u16, &Value)) {
    for (mode, kind) in HOSTILE {
        set_mode(agent, mode);
        let before = calls(agent, kind);
        let (status, body) = complete(agent, model);
        check(mode, kind, status, &body);
        assert_eq!(calls(agent, kind), before + 1.0, "{mode} counted as {kind}");
        assert_eq!(agent.get("/healthz").status(), 200, "{mode}");
    }
}

#[test]
fn hostile_router_fails_open_and_the_request_is_served() {
    let (agent, _dir) = agent("route:tiny", "open");
    let (status, body) = complete(&agent, "tiny");
    assert_eq!(status, 200, "{body}");
    each_hostile_mode(&agent, "tiny", |mode, _, status, body| {
        assert_eq!(status, 200, "{mode}: {body}");
        assert_eq!(body["model"], "tiny", "{mode}");
    });
}

#[test]
fn hostile_router_fails_closed_with_503_and_a_reason() {
    let (agent, _dir) = agent("route:tiny", "closed");
    each_hostile_mode(&agent, "tiny", |mode, kind, status, body| {
        assert_eq!(status, 503, "{mode}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("router policy failed"),
            "{mode}: {message}"
        );
        assert!(message.contains(kind), "{mode}: {message}");
    });
}

#[test]
fn hostile_router_falls_back_to_the_built_in_default() {
    let (agent, _dir) = agent("route:tiny", "default");
    // `auto` is no model: only a router (or its built-in default) can serve it.
    each_hostile_mode(&agent, "auto", |mode, _, status, body| {
        assert_eq!(status, 200, "{mode}: {body}");
        assert_eq!(body["model"], "tiny", "{mode}");
    });
    // While a trapping plugin backs off it is not called, and requests are still served.
    set_mode(&agent, "trap");
    let statuses: Vec<u16> = (0..5).map(|_| complete(&agent, "auto").0).collect();
    assert_eq!(statuses, [200; 5]);
    assert!(calls(&agent, "unavailable") >= 1.0);
    assert_eq!(agent.get("/healthz").status(), 200);
}

#[test]
fn a_bad_reload_keeps_the_working_plugin() {
    let (agent, dir) = agent("route:tiny", "closed");
    let status = |agent: &Agent| -> Value {
        reqwest::blocking::Client::new()
            .get(format!("{}/admin/policies", agent.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let version = status(&agent)["slots"][0]["version"].clone();
    assert_eq!(version, 1);

    // A config the plugin rejects at init.
    let r = agent.admin_post("/admin/policies/router/reload", json!({"config": "reject"}));
    assert_eq!(r.status(), 422);
    assert!(r.text().unwrap().contains("rejected on purpose"));
    // A file that is not a component.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm but not really").unwrap();
    let r = agent.admin_post("/admin/policies/router/reload", json!({"plugin": junk}));
    assert_eq!(r.status(), 422);
    assert!(r.text().unwrap().contains("not a WebAssembly component"));
    // A component of another world.
    let r = agent.admin_post(
        "/admin/policies/router/reload",
        json!({"plugin": plugin("solidarity_pricing"), "config": "{}"}),
    );
    assert_eq!(r.status(), 422);
    assert!(r
        .text()
        .unwrap()
        .contains("does not fit the `router` world"));
    // An unknown slot.
    assert_eq!(
        agent
            .admin_post("/admin/policies/nope/reload", json!({}))
            .status(),
        404
    );

    assert_eq!(status(&agent)["slots"][0]["version"], version);
    let (code, body) = complete(&agent, "auto");
    assert_eq!(
        (code, body["model"].clone()),
        (200, json!("tiny")),
        "{body}"
    );
    assert_eq!(
        agent.metric("flatmesh_policy_reloads_total{result=\"rejected\",slot=\"router\"}"),
        3.0
    );

    // The same through the CLI.
    let cli = |args: &[&str]| {
        std::process::Command::new(flatmesh_tests::agent_bin())
            .args([
                "policies",
                "--url",
                &agent.url,
                "--admin-token",
                ADMIN_TOKEN,
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["reload", "router", "--config", "route:tiny"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"version\": 2"));
    let out = cli(&["reload", "router", "--config", "reject"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("422"));
    let out = cli(&["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"version\": 2"));
}

#[test]
fn a_plugin_file_that_changes_is_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_llama_gguf(&model, Size::TINY, 7).unwrap();
    let wasm = dir.path().join("router.wasm");
    std::fs::copy(plugin("hostile"), &wasm).unwrap();
    let config = format!(
        "[cache]\npreload = true\n[[models]]\nid = \"tiny\"\npath = \"{}\"\n\
         [policy.router]\nplugin = \"{}\"\nconfig = \"trap\"\non_failure = \"closed\"\n",
        model.display(),
        wasm.display()
    );
    let agent = Agent::start(&config, &[]);
    agent.wait_for("/readyz", Duration::from_secs(60));
    // Replace the file with a different plugin of the same world: the agent picks it up.
    std::fs::copy(plugin("cost_router"), &wasm).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // cost-router rejects the config "trap" (not JSON): the reload is refused, version 1 stays.
    while agent.metric("flatmesh_policy_reloads_total{result=\"rejected\",slot=\"router\"}") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "file change not noticed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        agent.metric("flatmesh_policy_version{slot=\"router\"}"),
        1.0
    );
    // The same plugin again, touched: loaded as version 2.
    std::fs::copy(plugin("hostile"), &wasm).unwrap();
    while agent.metric("flatmesh_policy_version{slot=\"router\"}") < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "file change not reloaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_agent_does_not_start_with_a_plugin_that_rejects_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("flatmesh.toml");
    std::fs::write(
        &cfg,
        format!(
            "[policy.router]\nplugin = \"{}\"\nconfig = \"reject\"\n",
            plugin("hostile").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(flatmesh_tests::agent_bin())
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.router") && err.contains("rejected on purpose"),
        "{err}"
    );
}

/// An agent with four tiny models in room for three, under the `office-hours` residency
/// plugin keeping `m0` resident all day (or a plugin file that is not one, with `on_failure`).
fn residency_agent(plugin_config: &str) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut need = 0;
    let mut models = String::new();
    for i in 0..4 {
        let path = dir.path().join(format!("m{i}.gguf"));
        write_llama_gguf(&path, Size::TINY, i).unwrap();
        need = flatmesh_runtime::footprint(&path, flatmesh_runtime::Format::Gguf)
            .unwrap()
            .with_kv_tokens(flatmesh_runtime::BatchConfig::default().kv_tokens);
        models += &format!(
            "[[models]]\nid = \"m{i}\"\npath = \"{}\"\nmax_concurrency = 1\n",
            path.display()
        );
    }
    let config = format!(
        "[server]\nadmin_token = \"{ADMIN_TOKEN}\"\n\
         [cache]\npreload = false\nkeep_alive = -1\nmin_residency = 0\nresidency = \"lru\"\n\
         [[cache.devices]]\nname = \"host0\"\ncapacity = {}\n{models}\
         [policy]\nwatch = false\n\
         [policy.residency]\nplugin = \"{}\"\nconfig = {plugin_config}\n",
        need * 3 + need / 2,
        plugin("office_hours").display()
    );
    let agent = Agent::start(&config, &[]);
    agent.wait_for("/readyz", Duration::from_secs(60));
    (agent, dir)
}

#[test]
fn a_residency_plugin_keeps_its_models_where_lru_would_evict_them() {
    let keep_m0 = r#"{ keep = ["m0"], from_hour = 0, to_hour = 24 }"#;
    let (agent, _dir) = residency_agent(keep_m0);
    // m0 is the least recently used when m3 needs room: LRU alone would evict it.
    for m in ["m0", "m1", "m2", "m3"] {
        assert_eq!(complete(&agent, m).0, 200, "{m}");
    }
    assert_eq!(agent.model_state("m0"), "ready", "the plugin keeps m0");
    assert_eq!(
        agent.model_state("m1"),
        "cold",
        "the oldest other copy left"
    );
    assert_eq!(
        agent.metric("flatmesh_evictions_total{reason=\"plugin\"}"),
        1.0
    );
    assert!(agent.metric("flatmesh_policy_calls_total{result=\"ok\",slot=\"residency\"}") >= 1.0);
    // Reloaded with nothing kept, the built-in order (LRU here) decides again: m0 leaves.
    let r = agent.admin_post(
        "/admin/policies/residency/reload",
        json!({"config": r#"{"keep": [], "from_hour": 0, "to_hour": 0}"#}),
    );
    assert_eq!(r.status(), 200, "{:?}", r.text());
    assert_eq!(complete(&agent, "m1").0, 200);
    assert_eq!(agent.model_state("m0"), "cold", "LRU again");
}
