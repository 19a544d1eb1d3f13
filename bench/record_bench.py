#!/usr/bin/env python3
"""Recording overhead: `hexray record` against a bare `run_with_cache` on the same model and prompt.

Model: a GPT-2-small-shaped random-init model (GPT2LMHeadModel(GPT2Config()), 124M parameters,
12 layers, d_model 768), booted with TransformerBridge.boot_transformers(hf_model=...) and put in
compatibility mode, exactly as the recorder does. No hub access. Prompts of 128 and 1024 tokens.

Modes, each measured in a fresh subprocess (so peak-RSS numbers do not bleed into each other):

    forward          bridge forward, no hooks
    run_with_cache   bridge.run_with_cache(tokens): TransformerLens's own cache of every hook
    capture:SET      HexRay's streaming hooks with a writer that drops the data
                     (conversion + device-to-host copy, no compression, no file)
    record:SET       Recorder.record(prompt, path): the whole recording (hooks, conversion,
                     compression, file, top-k, unembedding columns, index), after a warm-up call
                     that also built and cached the model kit (reported separately as kit_s)

SET is `default` or `full`. Time: median wall seconds over --reps calls after one warm-up.
Peak RSS: the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) during one call, above its resident set just before it.

GPU (when CUDA is available, or with --gpu): forward / device-to-host / write split at 1024 tokens
with full hooks: forward alone, capture with a dropping writer (forward + conversion + copies), and
the full recording; the differences give the copy and the write parts.

    python bench/record_bench.py                  # CPU table (+ GPU section if CUDA is present)
    python bench/record_bench.py --threads 2      # torch threads (default 1)
    python bench/record_bench.py --lengths 128    # fewer cases
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, os.path.join(REPO, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# -- worker (one mode, one length, in its own process) -------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class DroppingWriter:
    """A TraceWriter stand-in that accepts tensors and keeps nothing."""

    bytes_written = 0

    def write(self, name, array, **kw):
        return None


def build(device: str):
    import tiny_models
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hexray_core.record import Recorder

    torch.manual_seed(0)
    tok = tiny_models.build_tokenizer()
    hf = GPT2LMHeadModel(GPT2Config()).eval().to(device)
    return Recorder(hf, tokenizer=tok), tok


def prompt_of(tok, n_tokens: int) -> str:
    """A text of exactly n_tokens tokens including the BOS the recorder prepends."""
    text = "Q" * (n_tokens - 1)  # 'Q' never merges in the test tokenizer: one token per character
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == n_tokens - 1
    return text


def worker(mode: str, n_tokens: int, reps: int, threads: int, device: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    rec, tok = build(device)
    setup_s = time.perf_counter() - t0
    prompt = prompt_of(tok, n_tokens)
    ids = rec.tokenize(prompt)
    tokens = torch.tensor([ids], device=rec.loaded.input_device)
    tmp = tempfile.mkdtemp(prefix="hexray-bench-")
    os.environ["HEXRAY_CACHE"] = os.path.join(tmp, "cache")
    out = os.path.join(tmp, "t.hxr")
    kit_s = None
    extra = {}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if mode == "forward":
        def call():
            rec.bridge(tokens, return_type="logits")
    elif mode == "run_with_cache":
        def call():
            logits, cache = rec.bridge.run_with_cache(tokens)
            del logits, cache
    elif mode.startswith("capture:"):
        from hexray_core.record.capture import Capture
        from hexray_core.record.hooks import plan_hooks

        plan = plan_hooks(rec.bridge, mode.split(":", 1)[1])
        cap = Capture(rec.bridge, plan, DroppingWriter(), act_tag="f16", dedupe=plan.label != "default")

        def call():
            cap.forward(tokens)
    elif mode.startswith("record:"):
        hooks = mode.split(":", 1)[1]
        k0 = time.perf_counter()
        rec.kit().ensure_cached()
        kit_s = time.perf_counter() - k0

        def call():
            res = rec.record(prompt, out, hooks=hooks)
            extra["trace_bytes"] = res.bytes
            extra["tensors"] = res.tensors
    else:
        raise SystemExit(f"unknown mode {mode}")

    # Peak RSS during the first call (later calls reuse memory the allocator kept, and show nothing).
    base = _rss_kib("VmRSS")
    peak_ok = _reset_peak()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    call()
    sync()
    peak = _rss_kib("VmHWM")
    times, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        call()
        sync()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    result = {"mode": mode, "n_tokens": n_tokens, "median_s": statistics.median(times), "min_s": min(times),
              "cpu_s": statistics.median(cpu),
              "reps": reps, "peak_rss_mb": (peak - base) / 1024 if peak_ok else None, "setup_s": setup_s,
              "kit_s": kit_s, **extra}
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# -- driver --------------------------------------------------------------------------------------

def run_mode(mode: str, n: int, reps: int, threads: int, device: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--n", str(n), "--reps", str(reps),
           "--threads", str(threads), "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"worker {mode} {n} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} CPUs (load average {load:.1f} at start){gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def table(rows: list[dict], baseline: dict) -> str:
    lines = ["| tokens | mode | wall s (median / min) | wall vs run_with_cache | CPU s (all threads) "
             "| CPU vs run_with_cache | peak RSS +MB | trace MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = baseline[r["n_tokens"]]
        ratio = r["median_s"] / base["median_s"]
        cpu_ratio = r["cpu_s"] / base["cpu_s"]
        rss = "n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        size = f"{r['trace_bytes'] / 1e6:.1f}" if r.get("trace_bytes") else ""
        lines.append(f"| {r['n_tokens']} | {r['mode']} | {r['median_s']:.3f} / {r['min_s']:.3f} | {ratio:.2f}x "
                     f"| {r['cpu_s']:.3f} | {cpu_ratio:.2f}x | {rss} | {size} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--n", type=int)
    ap.add_argument("--lengths", default="128,1024")
    ap.add_argument("--reps", type=int, default=0, help="timed calls per mode (default: 7 at 128 tokens, 3 at 1024)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-CPU box)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu", action="store_true", help="run the GPU section (default: when CUDA is available)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    ap.add_argument("--json", help="also write all results to this file")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.reps or 3, args.threads, args.device)))
        return 0
    import torch

    print(f"machine: {machine()}")
    print(f"torch threads: {args.threads}; model: GPT-2-small shape (124M, random init), fp32 weights, "
          "act dtype f16 (auto)\n")
    results = []
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = ["forward", "run_with_cache", "capture:default", "record:default", "capture:full", "record:full"]
    if not args.no_cpu:
        rows, baseline = [], {}
        for n in lengths:
            reps = args.reps or (7 if n <= 256 else 3)
            for mode in modes:
                r = run_mode(mode, n, reps, args.threads, "cpu")
                rows.append(r)
                if mode == "run_with_cache":
                    baseline[n] = r
                print(f"  cpu {n:5d} {mode:16s} wall {r['median_s']:.3f} s  cpu {r['cpu_s']:.3f} s  "
                      f"peak +{r['peak_rss_mb'] or 0:.0f} MB", flush=True)
        print()
        print(table(rows, baseline))
        kit = [r["kit_s"] for r in rows if r.get("kit_s")]
        if kit:
            print(f"\nmodel kit (hash + write, once per model): {min(kit):.2f} s")
        results += rows
    if args.gpu or torch.cuda.is_available():
        print("\nGPU: 1024 tokens, full hooks")
        n = 1024
        g = {m: run_mode(m, n, args.reps or 5, args.threads, "cuda")
             for m in ("forward", "capture:full", "record:full")}
        fwd, cap, rec = (g[m]["median_s"] for m in ("forward", "capture:full", "record:full"))
        print("| part | seconds |\n|---|---|")
        print(f"| forward (no hooks) | {fwd:.3f} |\n| conversion + device-to-host copies | {cap - fwd:.3f} |")
        print(f"| compression + file (+ top-k, index) | {rec - cap:.3f} |\n| total recording | {rec:.3f} |")
        print(f"peak GPU memory: forward {g['forward'].get('peak_gpu_mb', 0):.0f} MB, "
              f"recording {g['record:full'].get('peak_gpu_mb', 0):.0f} MB; "
              f"trace {g['record:full'].get('trace_bytes', 0) / 1e6:.0f} MB")
        results += list(g.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "threads": args.threads, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
