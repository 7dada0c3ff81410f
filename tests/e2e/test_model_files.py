"""Crafted model files against the real agent: each once took the agent down or cost it far more
memory than the file's size. A bad file fails its load with a reason; the agent serves the rest."""
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import BIN, LLM, MODELS, Agent
from gguf_craft import header, kv, with_rows, without_dims

SMOLLM = MODELS / "smollm2-135m-instruct" / "model.gguf"


@pytest.fixture(scope="module")
def files():
    with tempfile.TemporaryDirectory(prefix="flatmesh-files-") as d:
        yield Path(d)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(files: Path, state: Path) -> Agent:
    return Agent(config=f"""
[cache]
preload = false
[server]
model_roots = ["{files}"]
""", extra_args=("--state-dir", str(state)), env={"RUST_BACKTRACE": "1"})


def chat(agent: Agent, model: str) -> httpx.Response:
    return httpx.post(f"{agent.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def test_crafted_files_fail_their_load_and_a_bad_file_at_start_is_marked_failed(files):
    state = files / "state"
    agent = start(files, state)
    try:
        # Finding 1: rows × row bytes wrapped; the file registered and the first chat aborted.
        for name, rows, dtype in (("f16", 49152 + (1 << 57), 1), ("q8", 49152 + (1 << 62), 8)):
            path = with_rows(SMOLLM, files / f"{name}.gguf", "token_embd.weight", rows, dtype)
            r = httpx.post(f"{agent.url}/admin/models", json={"id": name, "path": str(path)}, timeout=60)
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert "token_embd.weight" in message, message
            assert "backtrace" not in r.text and ".rs:" not in r.text and "\n" not in message
            path.unlink()
        # Finding 5: a huge string length answered with a backtrace and symbolized the binary.
        huge = files / "huge-string.gguf"
        huge.write_bytes(header([kv("general.name", 8, struct.pack("<Q", 1 << 62))]))
        before = rss_kib(agent.proc.pid)
        r = httpx.post(f"{agent.url}/admin/models", json={"id": "huge", "path": str(huge)}, timeout=60)
        assert r.status_code == 400, r.text
        assert "backtrace" not in r.text and ".rs:" not in r.text, r.text
        assert rss_kib(agent.proc.pid) - before < 64 << 10, "no symbolization"
        # Finding 6: 32 MiB of one-byte array elements took a gigabyte.
        amp = files / "amplify.gguf"
        amp.write_bytes(header([kv("a", 9, struct.pack("<IQ", 0, 32 << 20) + b"\1" * (32 << 20))]))
        r = httpx.post(f"{agent.url}/admin/models", json={"id": "amp", "path": str(amp)}, timeout=60)
        assert r.status_code == 400, r.text
        assert "limit" in r.json()["error"]["message"], r.text
        assert rss_kib(agent.proc.pid) - before < 128 << 10
        # Finding 2: a registered model's file goes bad while the agent is down.
        good = files / "mine.gguf"
        shutil.copyfile(SMOLLM, good)
        r = httpx.post(f"{agent.url}/admin/models", json={"id": "mine", "path": str(good)}, timeout=60)
        assert r.status_code in (200, 201), r.text
        assert chat(agent, "mine").status_code == 200
        assert chat(agent, LLM).status_code == 200
    finally:
        agent.stop()
    without_dims(SMOLLM, good, "token_embd.weight")
    agent = start(files, state)
    try:
        models = {m["id"]: m for m in httpx.get(f"{agent.url}/admin/models").json()["models"]}
        assert models["mine"]["state"] == "failed", models["mine"]
        assert "0 dimensions" in models["mine"]["error"], models["mine"]
        r = chat(agent, "mine")
        assert r.status_code >= 400 and "0 dimensions" in r.text, r.text
        assert chat(agent, LLM).status_code == 200, "the agent serves the rest"
    finally:
        agent.stop()
