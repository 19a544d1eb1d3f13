#!/usr/bin/env python3
"""Source attribution speed: one position's per-head, per-source split at 1k and 16k tokens.

The trace has GPT-2 small's shape (12 layers, 12 heads of 64, d_model 768, d_mlp 3072, 50,257 tokens)
with random activations, written with the trace writer directly: recording 16k tokens of a 12-head
model through TransformerBridge's eager attention would need ~100 GB of RAM (see bench/README.md,
"Long contexts"). The trace holds what `--hooks default` records (q, k, v, z, residual, MLP post,
scales; no patterns), the per-run unembedding table and a bundled kit, so replay does the same work
as on a real recording.

Measured, in one process: source attribution at the last position, cold (first call: q/k/v decoded)
and warm (median of 7, another position each time), beside the plain per-head attribution of the same
position as the baseline.

    python bench/sources_bench.py               # 1024 and 16384 tokens
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from trace_format import WEIGHTS_RUN, TraceWriter  # noqa: E402

L, H, D, DM, DMLP, V = 12, 12, 64, 768, 3072, 50257


def write_trace(path: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    f16 = np.float16

    def act(*shape, scale=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(f16)

    config = {"n_layers": L, "d_model": DM, "n_heads": H, "d_head": D, "d_mlp": DMLP, "d_vocab": V, "n_ctx": n,
              "act_fn": "gelu_new", "normalization_type": "LN", "positional_embedding_type": "standard",
              "gated_mlp": False, "n_key_value_heads": None, "eps": 1e-5}
    meta = {"hexray": {"version": "bench", "trace": "recording"},
            "model": {"name": "gpt2-small-shape (random)", "source": "memory", "config": config,
                      "dtype": "float32", "processing": {"compatibility_mode": True}},
            "kit": {"sha256": "0" * 64, "bundled": True},
            "hooks": {"set": "default", "requested": ["default"]},
            "storage": {"act_dtype": "f16", "codec": "zstd:1", "chunk_bytes": 1 << 20, "lens": False},
            "attention": {"store": "qk", "q": "blocks.{layer}.attn.hook_q", "k": "blocks.{layer}.attn.hook_k",
                          "n_heads": H, "n_kv_heads": H,
                          "layers": [{"scale": D ** -0.5, "softcap": None, "window": None}] * L}}
    tokens = rng.integers(1, V, size=n).tolist()
    with TraceWriter(path, meta=meta) as w:
        w.begin_run(prompt="x" * n, tokens=tokens, token_strs=["x"] * n, char_spans=[[i, i + 1] for i in range(n)],
                    byte_spans=[[i, i + 1] for i in range(n)], n_prompt_tokens=n,
                    generated={"n": 0, "temperature": 0.0, "seed": None}, prepend_bos=False)
        w.write("hook_embed", act(n, DM))
        w.write("hook_pos_embed", act(n, DM))
        for layer in range(L):
            b = f"blocks.{layer}."
            for name in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"):
                w.write(b + name, act(n, DM))
            for name in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"):
                w.write(b + name, act(n, H, D))
            w.write(b + "mlp.hook_post", act(n, DMLP))
            for name in ("ln1.hook_scale", "ln2.hook_scale"):
                w.write(b + name, (1 + rng.random((n, 1))).astype(np.float32))
        w.write("ln_final.hook_scale", (1 + rng.random((n, 1))).astype(np.float32))
        top = rng.integers(0, V, size=(n, 20)).astype(np.int32)
        need = np.unique(np.concatenate([np.asarray(tokens), top.reshape(-1)])).astype(np.int32)
        w.write("hexray.topk_ids", top)
        w.write("hexray.topk_logits", np.sort(rng.standard_normal((n, 20)).astype(np.float32))[:, ::-1].copy())
        w.write("hexray.next_logit", rng.standard_normal(n).astype(np.float32))
        w.write("hexray.logsumexp", (5 + rng.random(n)).astype(np.float32))
        w.write("hexray.unembed_ids", need)
        w.write("hexray.unembed_cols", rng.standard_normal((len(need), DM), dtype=np.float32))
        w.write("hexray.unembed_bias", rng.standard_normal(len(need)).astype(np.float32))
        w.end_run(aliases={}, unembed_strs=["x"] * len(need))
        w.write("kit/W_U", act(DM, V), run=WEIGHTS_RUN)
        w.write("kit/b_U", act(V), run=WEIGHTS_RUN)
        w.write("kit/W_O", act(L, H, D, DM, scale=0.05), run=WEIGHTS_RUN)
        w.write("kit/b_O", act(L, DM), run=WEIGHTS_RUN)
        w.write("kit/W_out", act(L, DMLP, DM, scale=0.02), run=WEIGHTS_RUN)
        w.write("kit/b_out", act(L, DM), run=WEIGHTS_RUN)


def measure(path: str) -> dict:
    import hexray

    t = hexray.open(path)
    n = t.runs[0].n_tokens
    rng = np.random.default_rng(1)

    def warm(fn):
        times = []
        for _ in range(7):
            p = int(rng.integers(n // 2, n))
            t0 = time.perf_counter()
            fn(p)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t0 = time.perf_counter()
    t.sources(n - 1)
    cold = time.perf_counter() - t0
    return {"tokens": n, "sources_cold_s": cold, "sources_warm_s": warm(lambda p: t.sources(p)),
            "heads_warm_s": warm(lambda p: t.attribution(p, by="head"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,16384")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hexray-sources-")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for n in (int(x) for x in args.lengths.split(",")):
        path = os.path.join(tmp, f"gpt2-shape-{n}.hxr")
        write_trace(path, n)
        for budget in ("512", "2048"):  # a small decode cache, and the default (holds every layer's k and v)
            os.environ["HEXRAY_TRACE_CACHE_MB"] = budget
            r = measure(path)
            print(f"  {n:>6} tokens ({os.path.getsize(path) / 1e6:.0f} MB), cache {budget} MB: source attribution "
                  f"cold {r['sources_cold_s'] * 1e3:.0f} ms, warm {r['sources_warm_s'] * 1e3:.1f} ms; per-head "
                  f"attribution warm {r['heads_warm_s'] * 1e3:.1f} ms", flush=True)
        os.unlink(path)


if __name__ == "__main__":
    main()
