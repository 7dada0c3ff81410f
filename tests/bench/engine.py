#!/usr/bin/env python3
"""The LLM engine beside llama.cpp at its best, in one run, on the same GGUF file.

    python3 tests/bench/engine.py [--prompt-tokens 128] [--new-tokens 128] [--runs 3]
    python3 tests/bench/engine.py --llama-bench /path/to/llama-bench   # a reference of your own
    python3 tests/bench/engine.py --kernels avx2 --profile   # AVX2 kernels on an AVX-512 CPU; per-op times

flatmesh's engine is timed by `runtime/examples/llm_bench.rs` (in-process, no HTTP);
llama.cpp by its own `llama-bench`, built for this CPU with every SIMD extension it has by
`tests/bench/llama-cpp-build` (ten minutes or more the first time; cached). Both use all cores;
the runs alternate, so both see the same machine state. The CPU model, the kernels flatmesh
picked at run time and the flags llama.cpp was built with are printed with the figures.
"""
import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-135m-instruct" / "model.gguf"
BUILD = ROOT / "tests" / "bench" / "llama-cpp-build"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def flatmesh(prompt_tokens, new_tokens, kernels=None, profile=False):
    env = dict(os.environ)
    if kernels:
        env["FLATMESH_KERNELS"] = kernels
    cmd = [str(ROOT / "target/release/examples/llm_bench"), str(MODEL), str(prompt_tokens), str(new_tokens)]
    out = subprocess.run(cmd + (["--profile"] if profile else []), check=True, capture_output=True,
                         text=True, env=env)
    r = json.loads(out.stdout)
    return r["prefill_tok_s"], r["decode_tok_s"], r["kernels"], r.get("profile")


def llama_bench(binary, prompt_tokens, new_tokens):
    """One llama-bench run of a prefill and a decode test (its own repetitions: 1)."""
    out = subprocess.run([str(binary), "-m", str(MODEL), "-p", str(prompt_tokens), "-n", str(new_tokens),
                          "-t", str(os.cpu_count()), "-r", "1", "-o", "json"],
                         check=True, capture_output=True, text=True)
    tests = json.loads(out.stdout)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    decode = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return prefill, decode, tests[0].get("cpu_info", "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-bench", help="a llama-bench binary instead of tests/bench/llama-cpp-build's")
    ap.add_argument("--kernels", choices=["scalar", "avx2-rows", "avx2", "avx512-vnni-rows", "avx512-vnni"],
                    help="flatmesh's kernel level (FLATMESH_KERNELS); default: the best this CPU has")
    ap.add_argument("--profile", action="store_true",
                    help="also print flatmesh's time per operation (llm_bench --profile, last run)")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "-p", "flatmesh-runtime", "--example", "llm_bench"],
                   cwd=ROOT, check=True)
    if args.llama_bench:
        reference, flags = Path(args.llama_bench), "(given with --llama-bench)"
    else:
        print("llama.cpp: tests/bench/llama-cpp-build (ten minutes or more the first time) ...", flush=True)
        bindir = Path(subprocess.run([str(BUILD)], check=True, stdout=subprocess.PIPE,
                                     text=True).stdout.strip().splitlines()[-1])
        reference = bindir / "llama-bench"
        flags = (bindir.parents[1] / "flags").read_text().strip()

    rows = {"flatmesh": [], "llama.cpp": []}
    for _ in range(args.runs):
        rows["flatmesh"].append(flatmesh(args.prompt_tokens, args.new_tokens, args.kernels, args.profile))
        rows["llama.cpp"].append(llama_bench(reference, args.prompt_tokens, args.new_tokens))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    print(f"flatmesh kernels: {rows['flatmesh'][0][2]}")
    print(f"llama.cpp build: {flags}; llama-bench reports CPU '{rows['llama.cpp'][0][2]}'")
    print(f"SmolLM2-135M Q4_1, {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, "
          f"median of {args.runs} alternating runs")
    print(f"  {'engine':10s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    med = {}
    for name, rs in rows.items():
        med[name] = (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        print(f"  {name:10s} {med[name][0]:14.1f} {med[name][1]:13.1f}")
    print(f"  ratio flatmesh/llama.cpp: prefill {med['flatmesh'][0] / med['llama.cpp'][0]:.2f}x, "
          f"decode {med['flatmesh'][1] / med['llama.cpp'][1]:.2f}x")
    if args.profile:
        print("flatmesh per-operation profile (microseconds per step, last run):")
        print(json.dumps(rows["flatmesh"][-1][3], indent=1))


if __name__ == "__main__":
    main()
