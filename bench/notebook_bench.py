"""Notebook API: the cost of TransformerLens's cache methods on a trace, beside TransformerLens itself.

Measured in one run, on the embedded hexray-demo model (4 layers, d_model 128, d_vocab 4096) and a
prompt of ~500 tokens recorded in float32:

1. next-token attribution of every position (CoT, the language server): the vectorised primitive
   (`next_token_attributions`, one einsum) against the per-position loop it replaced;
2. the DLA cells of TransformerLens's Exploratory Analysis Demo (decompose_resid, stack_head_results,
   accumulated_resid + apply_ln_to_stack, logit_attrs with a logit difference, the full decomposition
   with neurons) on the trace (numpy) and on TransformerLens's ActivationCache of the same prompt;
3. a fresh process answering one logit_attrs question from the trace (numpy only) against a fresh
   process that boots TransformerLens and runs the model.

    python bench/notebook_bench.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters. ")


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cells(model, cache, answer, wrong):
    direction = model.tokens_to_residual_directions(answer) - model.tokens_to_residual_directions(wrong)
    out = []
    stack = cache.decompose_resid(layer=-1, pos_slice=-1)
    out.append(cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) @ direction)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    out.append(cache.logit_attrs(heads, answer, incorrect_tokens=wrong, pos_slice=-1))
    acc = cache.accumulated_resid(layer=-1, pos_slice=-1)
    out.append(cache.apply_ln_to_stack(acc, layer=-1, pos_slice=-1) @ direction)
    full = cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1)
    out.append(cache.logit_attrs(full, answer, incorrect_tokens=wrong, pos_slice=-1))
    every = cache.decompose_resid(layer=-1)  # every position at once
    out.append(cache.logit_attrs(every, answer, incorrect_tokens=wrong))
    return out


FRESH_TRACE = """
import sys, time; t0 = time.perf_counter()
import hexray
t = hexray.open(sys.argv[1]); run = t[0]
a, w = (int(x) for x in t.tensor("hexray.topk_ids")[-1, :2])
run.logit_attrs(run.decompose_resid(pos_slice=-1), a, incorrect_tokens=w, pos_slice=-1)
print(time.perf_counter() - t0)
"""

FRESH_TL = """
import sys, time; t0 = time.perf_counter()
import torch
from transformer_lens.model_bridge import TransformerBridge
m = TransformerBridge.boot_transformers(sys.argv[1], device="cpu"); m.enable_compatibility_mode(center_unembed=False)
_, c = m.run_with_cache(torch.tensor([[int(x) for x in sys.argv[2].split(",")]]), remove_batch_dim=True)
a, w = int(sys.argv[3]), int(sys.argv[4])
c.logit_attrs(c.decompose_resid(pos_slice=-1), a, incorrect_tokens=w, pos_slice=-1)
print(time.perf_counter() - t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    torch.set_grad_enabled(False)
    import hexray
    from hexray_core.record import Recorder
    from hexray_core.replay.attribution import final_direction, next_token_attributions

    folder = tempfile.mkdtemp(prefix="hxr_nb_")
    os.environ.setdefault("HEXRAY_CACHE", os.path.join(folder, "cache"))
    rec = Recorder("hexray-demo", device="cpu")
    ids = rec.tokenize(TEXT * 8)[:500]
    text = rec.tokenizer.decode(ids[1:])
    path = os.path.join(folder, "t.hxr")
    rec.record(text, path, act_dtype="float32")
    t = hexray.open(path)
    run = t[0]
    n = run.n_tokens
    answer, wrong = (int(x) for x in t.tensor("hexray.topk_ids")[-1, :2])

    # 1. every position's next-token attribution
    def loop():
        from hexray_core.replay.attribution import component_stack

        comps, stack = component_stack(t, 0)
        values = np.zeros((len(comps) + 1, n - 1))
        for p in range(n - 1):
            u, bias = final_direction(t, 0, p, run.tokens[p + 1], None)
            values[:-1, p] = stack[:, p, :] @ u
            values[-1, p] = bias
        return values

    next_token_attributions(t, 0)  # warm the stack and the unembedding table
    vec_s, loop_s = best(lambda: next_token_attributions(t, 0), args.repeats), best(loop, args.repeats)
    np.testing.assert_allclose(next_token_attributions(t, 0)[1], loop(), rtol=1e-4, atol=1e-4)

    # 2. the demo cells, both sides
    _, cache = rec.bridge.run_with_cache(torch.tensor([run.tokens]), remove_batch_dim=True)
    mine, theirs = cells(t, run, answer, wrong), cells(rec.bridge, cache, answer, wrong)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-4, atol=1e-4)
    hx_s = best(lambda: cells(t, run, answer, wrong), args.repeats)
    tl_s = best(lambda: cells(rec.bridge, cache, answer, wrong), args.repeats)

    # 3. fresh processes
    env = {**os.environ, "PYTHONPATH": REPO}
    demo = os.path.join(REPO, "hexray_core", "models", "hexray-demo")

    def fresh(code, *argv):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    fresh_hx = min(fresh(FRESH_TRACE, path) for _ in range(3))
    fresh_tl = min(fresh(FRESH_TL, demo, ",".join(map(str, run.tokens)), str(answer), str(wrong)) for _ in range(3))

    result = {
        "tokens": n, "repeats": args.repeats,
        "next_token_attributions_s": vec_s, "per_position_loop_s": loop_s, "loop_over_vectorised": loop_s / vec_s,
        "demo_cells_trace_s": hx_s, "demo_cells_transformer_lens_s": tl_s, "trace_over_tl": hx_s / tl_s,
        "fresh_process_trace_s": fresh_hx, "fresh_process_transformer_lens_s": fresh_tl,
        "load": os.getloadavg()[0],
    }
    for k, v in result.items():
        print(f"{k:36s} {v:.4g}" if isinstance(v, float) else f"{k:36s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
