"""Agent lifecycle: graceful shutdown, bad configuration, a model that fails to load."""
import signal
import subprocess
import threading
import time

import httpx

from conftest import BIN, LLM, Agent


def test_sigterm_lets_an_in_flight_stream_finish():
    a = Agent()
    got = {}

    def consume():
        with httpx.stream("POST", a.url + "/v1/completions", timeout=120, json={
                "model": LLM, "prompt": "Once upon a time", "max_tokens": 40,
                "temperature": 0, "stream": True}) as r:
            got["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    code = a.stop(signal.SIGTERM)
    t.join(60)
    assert code == 0
    assert got["lines"][-1] == "data: [DONE]"
    assert len(got["lines"]) > 5


def test_bad_config_exits_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nhttp_adr = '127.0.0.1:0'\n")
    p = subprocess.run([str(BIN), "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "http_adr" in p.stderr and "bad configuration" in p.stderr


def test_failed_model_reports_reason_and_others_serve(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    a = Agent(config=f"""
[[models]]
id = "broken"
path = "{bad}"

[[models]]
id = "{LLM}"
path = "smollm2-135m-instruct/model.gguf"
""")
    try:
        r = httpx.post(a.url + "/v1/completions", json={"model": "broken", "prompt": "x"})
        assert r.status_code == 503
        assert "broken.gguf" in r.json()["error"]["message"]
        assert "retry-after" in r.headers
        ok = httpx.post(a.url + "/v1/completions", timeout=60,
                        json={"model": LLM, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200
        states = {m["id"]: m for m in httpx.get(a.url + "/v1/models").json()["data"]}
        assert states["broken"]["state"] == "failed"
    finally:
        a.stop()
