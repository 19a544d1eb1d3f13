#!/usr/bin/env python3
"""`hexray features` cold: a GPT-2-small-shaped trace (128 tokens) through a 24,576-feature residual SAE.

Side by side in one run (fresh processes, interleaved, median of N): the floor (a process that imports numpy,
msgpack and zstandard), `hexray replay t.hxr` (the cold attribution table of the same trace), and
`hexray features t.hxr --dict SAE` (load the 151 MB SAELens folder, rebuild the raw residual at
blocks.6.hook_resid_pre from the trace and the kit, encode the position, top logits of the 10 strongest
features through W_U). The model is GPT-2-small-shaped with random weights and the real GPT-2 tokenizer
(replay_bench.py builds it); the SAE is random (d_in 768, d_sae 24576, float32, SAELens layout).
Target: <= 0.5 s. Usage: python bench/features_bench.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay_bench import CPU_TIMES, FLOOR, PROMPT_WORDS, build_model, timed  # noqa: E402

D_SAE = 24576


def write_sae(folder: str, d_in: int = 768) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    w_dec = rng.standard_normal((D_SAE, d_in), dtype=np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    save_file({"W_enc": np.ascontiguousarray(w_dec.T), "W_dec": w_dec, "b_enc": np.full(D_SAE, -0.5, np.float32),
               "b_dec": np.zeros(d_in, np.float32)}, os.path.join(folder, "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.6.hook_resid_pre",
                                                         "sae_lens_version": "6.54.12",
                                                         "model_from_pretrained_kwargs":
                                                         {"center_writing_weights": False}}}
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hexray-features-bench-")
    env = {**os.environ, "HEXRAY_CACHE": os.path.join(work, "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    os.environ.update(env)
    model_dir = os.path.join(work, "gpt2-small-random")
    build_model(model_dir)
    from hexray_core.record import Recorder

    rec = Recorder(model_dir, device="cpu")
    ids = rec.tokenize(" ".join(PROMPT_WORDS * 20), True)
    text = rec.tokenizer.decode(ids[1:args.tokens])
    trace = os.path.join(work, "t.hxr")
    n_tokens = rec.record(text, trace, lens=False).tokens
    del rec
    sae = os.path.join(work, "sae")
    write_sae(sae)
    sae_bytes = sum(os.path.getsize(os.path.join(sae, f)) for f in os.listdir(sae))

    feats = [sys.executable, "-m", "hexray", "features", trace, "--dict", sae]
    replay = [sys.executable, "-m", "hexray", "replay", trace]
    floor = [sys.executable, "-c", FLOOR]
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    _, out = timed(feats, env)  # bytecode caches
    times: dict[str, list[float]] = {"floor": [], "replay": [], "features": []}
    for _ in range(args.reps):
        for label, cmd in (("floor", floor), ("replay", replay), ("features", feats)):
            times[label].append(timed(cmd, env, label)[0])
    res = {"tokens": n_tokens, "d_sae": D_SAE, "sae_mb": round(sae_bytes / 1e6, 1), "reps": args.reps,
           "wall_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
           "cpu_s": {k: round(statistics.median(v), 3) for k, v in CPU_TIMES.items()},
           "features_output_head": out.splitlines()[:6], "load": os.getloadavg()}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
