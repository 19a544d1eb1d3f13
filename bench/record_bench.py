#!/usr/bin/env python3
"""Recording overhead: `hexray record` against a bare `run_with_cache` on the same model and prompt.

Model: a GPT-2-small-shaped random-init model (GPT2LMHeadModel(GPT2Config()), 124M parameters,
12 layers, d_model 768), booted with TransformerBridge.boot_transformers(hf_model=...) and put in
compatibility mode, exactly as the recorder does. No hub access. Prompts of 128 and 1024 tokens.

Modes:

    forward          bridge forward, no hooks
    run_with_cache   bridge.run_with_cache(tokens): TransformerLens's own cache of every hook
    capture:SET      HexRay's streaming hooks with a writer that drops the data
                     (conversion + device-to-host copy, no compression, no file)
    record:SET       Recorder.record(prompt, path): the whole recording (hooks, conversion,
                     compression, file, top-k, unembedding columns, index), after a warm-up call
                     that also built and cached the model kit (reported separately as kit_s)

SET is `default` or `full`. Time: the modes run interleaved in ONE process (round after round, after
a warm-up round), so that the load of a shared machine hits them alike; wall seconds (median and
min over the rounds) and process CPU seconds (all threads: the writer compresses on a thread pool).
Peak RSS: each mode in a fresh subprocess, the growth of the peak resident set (VmHWM, reset via
/proc/self/clear_refs) during its first call above the resident set just before it.

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


def setup(device: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    tmp = tempfile.mkdtemp(prefix="hexray-bench-")
    os.environ["HEXRAY_CACHE"] = os.path.join(tmp, "cache")
    rec, tok = build(device)
    return rec, tok, tmp


def make_call(mode: str, rec, tok, n_tokens: int, tmp: str, device: str, extra: dict):
    import torch

    prompt = prompt_of(tok, n_tokens)
    tokens = torch.tensor([rec.tokenize(prompt)], device=rec.loaded.input_device)
    out = os.path.join(tmp, f"t-{n_tokens}-{mode.replace(':', '-')}.hxr")
    if mode == "forward":
        return lambda: rec.bridge(tokens, return_type="logits")
    if mode == "run_with_cache":
        def call():
            logits, cache = rec.bridge.run_with_cache(tokens)
            del logits, cache
        return call
    if mode.startswith("capture:"):
        from hexray_core.record.capture import Capture
        from hexray_core.record.hooks import plan_hooks

        plan = plan_hooks(rec.bridge, mode.split(":", 1)[1])
        cap = Capture(rec.bridge, plan, DroppingWriter(), act_tag="f16", dedupe=plan.label != "default")
        return lambda: cap.forward(tokens)
    if mode.startswith("record:"):
        hooks = mode.split(":", 1)[1]
        if "kit_s" not in extra:
            k0 = time.perf_counter()
            rec.kit().ensure_cached()
            extra["kit_s"] = time.perf_counter() - k0

        def call():
            res = rec.record(prompt, out, hooks=hooks)
            extra[f"trace_bytes:{mode}:{n_tokens}"] = res.bytes
        return call
    raise SystemExit(f"unknown mode {mode}")


def _sync(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_worker(modes: list[str], n_tokens: int, rounds: int, threads: int, device: str) -> list[dict]:
    """All modes in this process, interleaved: one warm-up round, then ``rounds`` timed rounds."""
    rec, tok, tmp = setup(device, threads)
    extra: dict = {}
    calls = {m: make_call(m, rec, tok, n_tokens, tmp, device, extra) for m in modes}
    for m in modes:
        calls[m]()
    _sync(device)
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    for _ in range(rounds):
        for m in modes:
            t, c = time.perf_counter(), time.process_time()
            calls[m]()
            _sync(device)
            wall[m].append(time.perf_counter() - t)
            cpu[m].append(time.process_time() - c)
    out = []
    for m in modes:
        out.append({"mode": m, "n_tokens": n_tokens, "median_s": statistics.median(wall[m]), "min_s": min(wall[m]),
                    "cpu_s": statistics.median(cpu[m]), "rounds": rounds, "kit_s": extra.get("kit_s"),
                    "trace_bytes": extra.get(f"trace_bytes:{m}:{n_tokens}")})
    return out


def rss_worker(mode: str, n_tokens: int, threads: int, device: str) -> dict:
    """Peak resident-set growth during the first call of one mode, in a fresh process."""
    import torch

    rec, tok, tmp = setup(device, threads)
    extra: dict = {}
    call = make_call(mode, rec, tok, n_tokens, tmp, device, extra)
    base = _rss_kib("VmRSS")
    ok = _reset_peak()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    call()
    _sync(device)
    first_s = time.perf_counter() - t
    peak = _rss_kib("VmHWM")
    result = {"mode": mode, "n_tokens": n_tokens, "peak_rss_mb": (peak - base) / 1024 if ok else None,
              "first_call_s": first_s}
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# -- driver --------------------------------------------------------------------------------------

def run_worker(args: list[str], threads: int) -> object:
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if p.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{p.stderr[-3000:]}")
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


def table(rows: list[dict]) -> str:
    base = {r["n_tokens"]: r for r in rows if r["mode"] == "run_with_cache"}
    lines = ["| tokens | mode | wall s, median (min) | wall vs run_with_cache | CPU s | CPU vs run_with_cache "
             "| peak RSS +MB | trace MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["n_tokens"]]
        rss = "n/a" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        size = f"{r['trace_bytes'] / 1e6:.1f}" if r.get("trace_bytes") else ""
        lines.append(f"| {r['n_tokens']} | {r['mode']} | {r['median_s']:.3f} ({r['min_s']:.3f}) "
                     f"| {r['median_s'] / b['median_s']:.2f}x | {r['cpu_s']:.3f} | {r['cpu_s'] / b['cpu_s']:.2f}x "
                     f"| {rss} | {size} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-worker", help=argparse.SUPPRESS)
    ap.add_argument("--rss-worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--lengths", default="128,1024")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds (default: 9 at 128 tokens, 3 at 1024)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-CPU box)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu", action="store_true", help="run the GPU section (default: when CUDA is available)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--json", help="also write all results to this file")
    args = ap.parse_args(argv)
    if args.time_worker:
        print(json.dumps(time_worker(args.time_worker.split(","), args.n, args.rounds or 3, args.threads,
                                     args.device)))
        return 0
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker, args.n, args.threads, args.device)))
        return 0
    import torch

    print(f"machine: {machine()}")
    print(f"torch threads: {args.threads}; model: GPT-2-small shape (124M, random init), fp32 weights, "
          "act dtype f16 (auto)\n")
    results = []
    modes = ["forward", "run_with_cache", "capture:default", "record:default", "capture:full", "record:full"]
    if not args.no_cpu:
        for n in (int(x) for x in args.lengths.split(",")):
            rounds = args.rounds or (9 if n <= 256 else 3)
            rows = run_worker(["--time-worker", ",".join(modes), "--n", str(n), "--rounds", str(rounds),
                               "--device", "cpu"], args.threads)
            for r in rows:
                if not args.no_rss:
                    r.update(run_worker(["--rss-worker", r["mode"], "--n", str(n), "--device", "cpu"], args.threads))
                print(f"  cpu {n:5d} {r['mode']:16s} wall {r['median_s']:.3f} s  cpu {r['cpu_s']:.3f} s  "
                      f"peak +{r.get('peak_rss_mb') or 0:.0f} MB", flush=True)
            results += rows
        print()
        print(table(results))
        kit = [r["kit_s"] for r in results if r.get("kit_s")]
        if kit:
            print(f"\nmodel kit (hash + write, once per model): {min(kit):.2f} s")
    if args.gpu or torch.cuda.is_available():
        print("\nGPU: 1024 tokens, full hooks")
        g = {r["mode"]: r for r in run_worker(["--time-worker", "forward,capture:full,record:full", "--n", "1024",
                                                "--rounds", str(args.rounds or 5), "--device", "cuda"],
                                               args.threads)}
        for m in g:
            g[m].update(run_worker(["--rss-worker", m, "--n", "1024", "--device", "cuda"], args.threads))
        fwd, cap, rec = (g[m]["median_s"] for m in ("forward", "capture:full", "record:full"))
        print("| part | seconds |\n|---|---|")
        print(f"| forward (no hooks) | {fwd:.3f} |\n| conversion + device-to-host copies | {cap - fwd:.3f} |")
        print(f"| compression + file (+ top-k, index) | {rec - cap:.3f} |\n| total recording | {rec:.3f} |")
        print(f"peak GPU memory: forward {g['forward'].get('peak_gpu_mb', 0):.0f} MB, "
              f"recording {g['record:full'].get('peak_gpu_mb', 0):.0f} MB; "
              f"trace {(g['record:full'].get('trace_bytes') or 0) / 1e6:.0f} MB")
        results += list(g.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "threads": args.threads, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
