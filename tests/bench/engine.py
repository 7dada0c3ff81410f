#!/usr/bin/env python3
"""The LLM engine beside llama.cpp, in one run, on the same GGUF file and the same prompt.

    python3 tests/bench/engine.py [--prompt-tokens 128] [--new-tokens 128] [--runs 3]

flatmesh's engine is timed by `runtime/examples/llm_bench.rs` (in-process, no HTTP);
llama.cpp through the `llama-cpp-python` package (built from source by pip on first use,
with portable AVX2 flags; skipped with a note when it is not installed and
`--install-llama-cpp` is not given). Both decode greedily on all cores.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-135m-instruct" / "model.gguf"
LLAMA_CPP_CMAKE = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
                   "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DLLAMA_CURL=OFF")


def flatmesh(prompt_tokens, new_tokens):
    subprocess.run(["cargo", "build", "--release", "-p", "flatmesh-runtime", "--example", "llm_bench"],
                   cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    out = subprocess.run([str(ROOT / "target/release/examples/llm_bench"), str(MODEL),
                          str(prompt_tokens), str(new_tokens)], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    return r["prefill_tok_s"], r["decode_tok_s"]


def run_llama_cpp(prompt_tokens, new_tokens, llm):
    import llama_cpp
    text = "The" + " the" * (prompt_tokens - 1)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)[:prompt_tokens]
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    # ignore_eos keeps decode going for exactly new_tokens, as a benchmark should.
    llm.create_completion(tokens, max_tokens=new_tokens, temperature=0.0, logit_bias={llm.token_eos(): -1e9})
    p = llama_cpp.llama_perf_context(llm.ctx)
    return p.n_p_eval / (p.t_p_eval_ms / 1000), p.n_eval / (p.t_eval_ms / 1000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--install-llama-cpp", action="store_true",
                    help="pip-build llama-cpp-python from source if missing (several minutes)")
    args = ap.parse_args()
    llm = None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if args.install_llama_cpp:
            env = dict(os.environ, CMAKE_ARGS=LLAMA_CPP_CMAKE, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count()))
            subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], env=env, check=True)
    try:
        from llama_cpp import Llama
        llm = Llama(model_path=str(MODEL), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    except ImportError:
        print("llama-cpp-python is not installed: run with --install-llama-cpp for the comparison")

    rows = {"flatmesh": [], "llama.cpp": []}
    for _ in range(args.runs):  # interleaved, so both see the same machine state
        rows["flatmesh"].append(flatmesh(args.prompt_tokens, args.new_tokens))
        if llm:
            rows["llama.cpp"].append(run_llama_cpp(args.prompt_tokens, args.new_tokens, llm))
    print(f"SmolLM2-135M Q4_1, {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, "
          f"{os.cpu_count()} cores, median of {args.runs} runs")
    print(f"  {'engine':10s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    med = {}
    for name, rs in rows.items():
        if rs:
            med[name] = (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            print(f"  {name:10s} {med[name][0]:14.1f} {med[name][1]:13.1f}")
    if len(med) == 2:
        print(f"  ratio flatmesh/llama.cpp: prefill {med['flatmesh'][0] / med['llama.cpp'][0]:.2f}x, "
              f"decode {med['flatmesh'][1] / med['llama.cpp'][1]:.2f}x")


if __name__ == "__main__":
    main()
