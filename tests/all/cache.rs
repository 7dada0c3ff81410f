//! The model cache end to end: many fixture models, little memory, the real binary.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use flatmesh_runtime::{footprint, Format};
use flatmesh_tests::{
    fixtures::{write_llama_gguf, Size},
    Agent,
};
use serde_json::json;

/// `n` fixture models in a temp dir, and the bytes one copy needs (1 sequence).
fn fixtures(n: usize) -> (tempfile::TempDir, Vec<PathBuf>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = dir.path().join(format!("m{i}.gguf"));
            write_llama_gguf(&p, Size::SMALL, i as u64).unwrap();
            p
        })
        .collect();
    let need = footprint(&paths[0], Format::Gguf)
        .unwrap()
        .with_kv_tokens(flatmesh_runtime::BatchConfig::default().kv_tokens);
    (dir, paths, need)
}

/// A config with one host device of `capacity` bytes and the given models.
fn config(paths: &[PathBuf], capacity: u64, extra: &str) -> String {
    let mut c = format!(
        "[cache]\npreload = false\nkeep_alive = -1\nmin_residency = 0\n{extra}\n\
         [[cache.devices]]\nname = \"host0\"\ncapacity = {capacity}\n"
    );
    for (i, p) in paths.iter().enumerate() {
        c += &format!(
            "[[models]]\nid = \"m{i}\"\npath = \"{}\"\nmax_concurrency = 1\n",
            p.display()
        );
    }
    c
}

fn complete(agent: &Agent, model: &str) -> reqwest::blocking::Response {
    agent.post(
        "/v1/completions",
        json!({"model": model, "prompt": "hi", "max_tokens": 2}),
    )
}

#[test]
fn fifty_models_in_room_for_five_all_answered_within_capacity() {
    let (_dir, paths, need) = fixtures(50);
    let capacity = need * 5 + need / 2;
    let agent = Arc::new(Agent::start(&config(&paths, capacity, ""), &[]));
    let over = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (agent, over, done) = (agent.clone(), over.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if agent.metric("flatmesh_device_used_bytes{device=\"host0\"}") > capacity as f64 {
                    over.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let failures = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let (agent, failures) = (agent.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut x = w * 7919 + 1;
                for _ in 0..25 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let model = format!("m{}", (x >> 33) % 50);
                    let r = complete(&agent, &model);
                    if r.status() != 200 {
                        eprintln!("{model}: {} {}", r.status(), r.text().unwrap_or_default());
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    monitor.join().unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "every request is answered"
    );
    assert!(
        !over.load(Ordering::Relaxed),
        "used bytes stayed within capacity"
    );
    assert!(agent.metric("flatmesh_copies_loaded") <= 5.0);
    assert!(agent.metric("flatmesh_evictions_total{reason=\"demand\"}") > 0.0);
}

#[test]
fn eviction_is_least_recently_used_under_lru() {
    let (_dir, paths, need) = fixtures(4);
    let agent = Agent::start(
        &config(&paths, need * 3 + need / 2, "residency = \"lru\""),
        &[],
    );
    for m in ["m0", "m1", "m2", "m0", "m3"] {
        assert_eq!(complete(&agent, m).status(), 200);
    }
    assert_eq!(
        agent.model_state("m1"),
        "cold",
        "m1 was the least recently used"
    );
    for m in ["m0", "m2", "m3"] {
        assert_eq!(agent.model_state(m), "ready", "{m}");
    }
}

#[test]
fn concurrent_requests_for_one_cold_model_share_one_load() {
    let (_dir, paths, need) = fixtures(2);
    let agent = Arc::new(Agent::start(&config(&paths, need * 4, ""), &[]));
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let agent = agent.clone();
            std::thread::spawn(move || complete(&agent, "m1").status())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(
        agent.metric("flatmesh_model_load_seconds_count{model=\"m1\"}"),
        1.0
    );
    assert!(agent.metric("flatmesh_cache_miss_seconds_count{model=\"m1\"}") >= 1.0);
}

#[test]
fn a_corrupt_model_fails_with_its_reason_and_others_serve() {
    let (dir, mut paths, need) = fixtures(2);
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 truncated").unwrap();
    paths.push(bad);
    let agent = Agent::start(&config(&paths, need * 4, ""), &[]);
    let r = complete(&agent, "m2");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let msg = r.text().unwrap();
    assert!(msg.contains("bad.gguf"), "{msg}");
    assert_eq!(complete(&agent, "m0").status(), 200);
    assert_eq!(agent.model_state("m2"), "failed");
}

#[test]
fn vmodel_switch_under_load_fails_no_request() {
    let (_dir, paths, need) = fixtures(2);
    let agent = Arc::new(Agent::start(&config(&paths, need * 4, ""), &[]));
    let put = |target: &str| {
        reqwest::blocking::Client::new()
            .put(format!("{}/admin/vmodels/live", agent.url))
            .json(&json!({"target": target}))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(put("m0"), 200);
    let stop = Arc::new(AtomicBool::new(false));
    let served: Vec<_> = (0..4)
        .map(|_| {
            let (agent, stop) = (agent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut models = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = complete(&agent, "live");
                    assert_eq!(r.status(), 200);
                    let v: serde_json::Value = r.json().unwrap();
                    models.push(v["model"].as_str().unwrap().to_string());
                }
                models
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(put("m1"), 200, "m1 is loaded, then traffic moves");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let all: Vec<String> = served.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(
        all.iter().any(|m| m == "m0"),
        "traffic ran before the switch"
    );
    let after: serde_json::Value = complete(&agent, "live").json().unwrap();
    assert_eq!(after["model"], "m1", "traffic moved after the switch");
}

#[test]
fn registrations_survive_a_restart_and_too_large_models_are_refused() {
    let (_dir, paths, need) = fixtures(2);
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let roots = format!(
        "[server]\nmodel_roots = [\"{}\"]",
        paths[0].parent().unwrap().display()
    );
    let cfg = config(&paths[..1], need * 3, &roots);
    let register = |agent: &Agent, id: &str, path: &Path| {
        agent.post(
            "/admin/models",
            json!({"id": id, "path": path, "max_concurrency": 1}),
        )
    };
    {
        let agent = Agent::start(&cfg, &["--state-dir", state_dir]);
        assert_eq!(register(&agent, "extra", &paths[1]).status(), 201);
        assert_eq!(register(&agent, "extra", &paths[1]).status(), 409);
        let too_big = agent.post(
            "/admin/models",
            json!({"id": "big", "path": paths[1], "kv_cache_tokens": 1 << 22}),
        );
        assert_eq!(too_big.status(), 400);
        assert!(too_big.text().unwrap().contains("largest device holds"));
        let v = reqwest::blocking::Client::new()
            .put(format!("{}/admin/vmodels/alias", agent.url))
            .json(&json!({"target": "extra"}))
            .send()
            .unwrap();
        assert_eq!(v.status(), 200);
    }
    let agent = Agent::start(&cfg, &["--state-dir", state_dir]);
    assert_eq!(complete(&agent, "extra").status(), 200);
    let listed: serde_json::Value = agent.get("/v1/models").json().unwrap();
    let alias = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "alias")
        .cloned();
    assert_eq!(
        alias.unwrap()["target"],
        "extra",
        "vmodels are listed with their target"
    );
    let r = complete(&agent, "alias");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().unwrap()["model"], "extra");
    let del = reqwest::blocking::Client::new()
        .delete(format!("{}/admin/models/m0", agent.url))
        .send()
        .unwrap();
    assert_eq!(
        del.status(),
        409,
        "models from the config file cannot be unregistered"
    );
    let gone = reqwest::blocking::Client::new()
        .delete(format!("{}/admin/vmodels/nope", agent.url))
        .send()
        .unwrap();
    assert_eq!(gone.status(), 404);
    let body: serde_json::Value = gone.json().unwrap();
    assert_eq!(body["error"]["message"], "vmodel \"nope\" does not exist");
}

#[test]
fn models_cli_drives_the_admin_api() {
    let (_dir, paths, need) = fixtures(2);
    let agent = Agent::start(
        &config(
            &paths[..1],
            need * 4,
            &format!(
                "[server]\nadmin_token = \"s3cret\"\nmodel_roots = [\"{}\"]\n",
                paths[0].parent().unwrap().display()
            ),
        ),
        &[],
    );
    let cli = |args: &[&str]| {
        std::process::Command::new(flatmesh_tests::agent_bin())
            .arg("models")
            .args(["--url", &agent.url, "--admin-token", "s3cret"])
            .args(args)
            .output()
            .unwrap()
    };
    let path = paths[1].to_str().unwrap();
    assert!(cli(&["register", "cli-model", path, "--keep-alive", "1m"])
        .status
        .success());
    assert!(cli(&["load", "cli-model"]).status.success());
    assert_eq!(agent.model_state("cli-model"), "ready");
    assert!(cli(&["unload", "cli-model"]).status.success());
    assert_eq!(agent.model_state("cli-model"), "cold");
    let list = String::from_utf8(cli(&["list"]).stdout).unwrap();
    assert!(
        list.contains("\"cli-model\"") && list.contains("\"host0\""),
        "{list}"
    );
    let missing = cli(&["load", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8(missing.stderr).unwrap().contains("404"));
    // Without the token the admin API refuses.
    assert_eq!(agent.get("/admin/models").status(), 401);
}

#[test]
fn eviction_by_demand_keeps_a_steady_model_over_recent_one_offs() {
    let (_dir, paths, need) = fixtures(4);
    let agent = Agent::start(&config(&paths, need * 3 + need / 2, ""), &[]);
    // m0 is asked for again and again, then m1 and m2 once each: under LRU m0 would be the
    // least recently used when m3 needs room; by demand a one-off leaves instead.
    for _ in 0..20 {
        assert_eq!(complete(&agent, "m0").status(), 200);
    }
    for m in ["m1", "m2", "m3"] {
        assert_eq!(complete(&agent, m).status(), 200);
    }
    assert_eq!(agent.model_state("m0"), "ready", "the steady model stays");
    let cold: Vec<String> = ["m1", "m2"]
        .into_iter()
        .filter(|m| agent.model_state(m) == "cold")
        .map(String::from)
        .collect();
    assert_eq!(cold.len(), 1, "one one-off left for m3: {cold:?}");
    assert_eq!(
        agent.metric("flatmesh_evictions_total{reason=\"demand\"}"),
        1.0
    );
}

#[test]
fn preload_fills_the_pool_without_evicting() {
    let (_dir, paths, need) = fixtures(6);
    let cfg = config(&paths, need * 2 + need / 2, "").replace("preload = false", "preload = true");
    let agent = Agent::start(&cfg, &[]);
    agent.wait_for("/readyz", Duration::from_secs(30));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while agent.metric("flatmesh_copies_loaded") < 2.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(agent.metric("flatmesh_copies_loaded"), 2.0);
    assert_eq!(
        agent.metric("flatmesh_evictions_total{reason=\"demand\"}"),
        0.0
    );
}

#[test]
fn an_evicted_model_pages_in_from_the_warm_tier_until_its_file_changes() {
    let (_dir, paths, need) = fixtures(1);
    let agent = Agent::start(&config(&paths, need * 2, "warm_capacity = \"64MiB\""), &[]);
    let page_ins = |source: &str| {
        agent.metric(&format!(
            "flatmesh_page_ins_total{{result=\"ok\",source=\"{source}\"}}"
        ))
    };
    let text = |agent: &Agent| -> String {
        let r = agent.post(
            "/v1/completions",
            json!({"model": "m0", "prompt": "hi", "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().unwrap()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = text(&agent);
    assert_eq!((page_ins("disk"), page_ins("warm")), (1.0, 0.0));
    assert!(agent.metric("flatmesh_warm_bytes") > 0.0);
    let unload = |agent: &Agent| {
        let r = agent.admin_post("/admin/models/m0/unload", json!({}));
        assert_eq!(r.status(), 200, "{:?}", r.text());
    };
    unload(&agent);
    assert_eq!(text(&agent), first, "same weights from the warm tier");
    assert_eq!((page_ins("disk"), page_ins("warm")), (1.0, 1.0));
    // A new file under the same path: the image is stale and the file is read again.
    unload(&agent);
    write_llama_gguf(&paths[0], Size::SMALL, 99).unwrap();
    text(&agent);
    assert_eq!((page_ins("disk"), page_ins("warm")), (2.0, 1.0));
}

#[test]
fn unregister_under_concurrent_load_never_fails_a_request_and_frees_every_byte() {
    let (_dir, paths, need) = fixtures(2);
    let roots = format!(
        "[server]\nmodel_roots = [\"{}\"]",
        paths[0].parent().unwrap().display()
    );
    let agent = Arc::new(Agent::start(&config(&paths[..1], need * 4, &roots), &[]));
    let client = reqwest::blocking::Client::new();
    let register = || {
        let r = agent.post(
            "/admin/models",
            json!({"id": "extra", "path": paths[1], "max_concurrency": 1}),
        );
        assert_eq!(r.status(), 201, "{:?}", r.text());
    };
    register();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (agent, stop) = (agent.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut gone) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let r = complete(&agent, "extra");
                    match r.status().as_u16() {
                        200 => ok += 1,
                        404 => gone += 1,
                        s => panic!("{s}: {}", r.text().unwrap_or_default()),
                    }
                }
                (ok, gone)
            })
        })
        .collect();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(40));
        let del = client
            .delete(format!("{}/admin/models/extra", agent.url))
            .send()
            .unwrap();
        assert_eq!(del.status(), 204);
        register();
    }
    stop.store(true, Ordering::Relaxed);
    let ok: u32 = workers.into_iter().map(|w| w.join().unwrap().0).sum();
    assert!(ok > 0, "requests were served between the changes");
    assert_eq!(
        complete(&agent, "m0").status(),
        200,
        "the agent keeps answering"
    );
    let del = client
        .delete(format!("{}/admin/models/extra", agent.url))
        .send()
        .unwrap();
    assert_eq!(del.status(), 204);
    // Only m0's copy is left on the device once the last loads of "extra" have finished.
    let m0 = agent.metric("flatmesh_model_bytes{model=\"m0\"}");
    assert!(m0 > 0.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let used = || agent.metric("flatmesh_device_used_bytes{device=\"host0\"}");
    while used() != m0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(used(), m0);
}

#[test]
fn a_busy_model_gets_a_copy_on_a_second_device() {
    let (_dir, paths, need) = fixtures(1);
    let room = need + need / 2;
    let cfg = format!(
        "[cache]\npreload = false\nkeep_alive = -1\nmin_residency = 0\n\
         [[cache.devices]]\nname = \"host0\"\ncapacity = {room}\n\
         [[cache.devices]]\nname = \"host1\"\ncapacity = {room}\n\
         [[models]]\nid = \"m0\"\npath = \"{}\"\nmax_concurrency = 1\ncopies = 2\n",
        paths[0].display()
    );
    let agent = Arc::new(Agent::start(&cfg, &[]));
    let copies = |agent: &Agent| -> Vec<serde_json::Value> {
        let v: serde_json::Value = agent.get("/admin/models/m0").json().unwrap();
        v["copies"].as_array().cloned().unwrap_or_default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (agent, stop) = (agent.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = agent.post(
                        "/v1/completions",
                        json!({"model": "m0", "prompt": "hi", "max_tokens": 32}),
                    );
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = |c: &[serde_json::Value]| c.iter().filter(|c| c["state"] == "ready").count();
    while ready(&copies(&agent)) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let c = copies(&agent);
    assert_eq!(ready(&c), 2, "{c:?}");
    assert_ne!(c[0]["device"], c[1]["device"], "one copy per device");
    let used = |d: &str| agent.metric(&format!("flatmesh_device_used_bytes{{device=\"{d}\"}}"));
    assert!(used("host0") > 0.0 && used("host1") > 0.0);
    assert_eq!(agent.metric("flatmesh_copies_loaded"), 2.0);
}
