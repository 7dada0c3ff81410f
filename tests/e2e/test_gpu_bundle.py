"""The GPU device check (`tests/gpu/run`) on a machine without a GPU, against the normal debug
build (no packing: `--bin-dir target/debug`): it must end with the NO-GPU verdict, exit 0 and
write a valid report, never claim what it did not check, and refuse a damaged bundle. The GPU
side itself runs only on a GPU machine (runtime/src/cuda/README.md, "Verifying on a GPU")."""
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "tests" / "gpu" / "run"
TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
NOT_BUILT = {"fifty_models", "two_budgets", "pagein_benchmark", "decode_benchmark"}

pytestmark = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="a GPU machine: run tests/gpu/run there instead"
)


@pytest.fixture(scope="module")
def test_bin() -> Path:
    """The runtime's unit-test binary (holds the cuda:: tests) of the workspace build that
    `cargo test --workspace` made (fresh there, so this asks cargo only for its name)."""
    if os.environ.get("FLATMESH_RUNTIME_TEST_BIN"):
        return Path(os.environ["FLATMESH_RUNTIME_TEST_BIN"])
    out = subprocess.run(
        ["cargo", "test", "--workspace", "--no-run", "--message-format=json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=1800, check=True,
    ).stdout
    exes = [m["executable"] for m in map(json.loads, filter(None, out.splitlines()))
            if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]
            and m["target"]["name"] == "flatmesh_runtime" and "lib" in m["target"]["kind"]]
    assert len(exes) == 1, exes
    return Path(exes[0])


def run(outdir: Path, test_bin: Path, *args) -> subprocess.CompletedProcess:
    agent = ROOT / "target" / "debug" / "flatmesh"
    assert agent.exists(), f"{agent} is missing: cargo build -p flatmesh"
    return subprocess.run(
        [sys.executable, str(RUN), str(outdir), "--bin-dir", str(agent.parent), "--test-bin", str(test_bin), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )


def test_without_a_gpu_the_check_ends_no_gpu_with_a_valid_report(tmp_path, test_bin):
    p = run(tmp_path, test_bin, "--only", "cuda::backend_tests", "--only", "cuda::tests::")
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0, p.stdout[-3000:]
    assert lines[-1].startswith("NO-GPU"), lines[-1]
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["verdict"] == "NO-GPU" and r["gpu_present"] is False
    assert r["failures"] == [], r["failures"]
    assert r["verdict_line"] == lines[-1]
    # The GPU test ran and said why there is no GPU; no type is claimed checked.
    assert r["kernels"]["device"]["gpu"] is False and r["kernels"]["device"]["error"]
    assert {t: v["status"] for t, v in r["backend"].items()} == {t: "no GPU" for t in TYPES}
    tests = {t["name"]: t["status"] for t in r["tests"]}
    backend = [n for n in tests if n.startswith("cuda::backend_tests::")]
    assert len(backend) == 1 and tests[backend[0]] == "passed"
    assert any(n.startswith("cuda::emu_tests::") and s == "not run (--only)" for n, s in tests.items())
    if os.environ.get("FLATMESH_SKIP_NVRTC") != "1":
        # NVRTC (the pinned wheel) compiled every kernel for both architectures.
        assert r["kernels"]["nvrtc_version"].startswith("13."), r["kernels"]
        compiled = r["kernels"]["compiled"]
        assert compiled["sm_90"] == compiled["sm_75"] > 20, compiled
        assert r["cuda_libs"]["chosen_nvrtc_dir"], r["cuda_libs"]
    # The agent came up and said it found no driver.
    assert r["agent"]["started"] and r["agent"]["gpus_found"] == 0
    assert r["agent"]["version"].startswith("flatmesh ")
    assert any("No CUDA" in ln for ln in r["agent"]["gpu_lines"]), r["agent"]
    # The device checks without code are reported as not built, never as passed.
    assert set(r["not_built"]) == NOT_BUILT
    assert all(v["status"] == "not built" for v in r["not_built"].values())
    log = (tmp_path / "log.txt").read_text()
    assert lines[-1] in log and "GPU-CHECK" in log


def test_a_spent_time_budget_is_reported_not_hidden(tmp_path, test_bin):
    p = run(tmp_path, test_bin, "--budget", "1")
    r = json.loads((tmp_path / "report.json").read_text())
    assert p.returncode == 0 and r["verdict"] == "NO-GPU", p.stdout[-2000:]
    assert any("not run (time budget)" in f for f in r["failures"]), r["failures"]
    assert "not run (time budget)" in p.stdout.strip().splitlines()[-1]


def test_a_damaged_bundle_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy2(RUN, bundle / "run")
    with lzma.open(bundle / "flatmesh.xz", "wb") as f:
        f.write(b"#!/bin/sh\necho damaged\n")
    manifest = {"files": [{"name": "flatmesh", "file": "flatmesh.xz", "sha256": "0" * 64}]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    p = subprocess.run([sys.executable, str(bundle / "run"), "--check-bundle"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert p.returncode == 2, p.stdout
    assert "does not match the manifest" in p.stdout
