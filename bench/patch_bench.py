"""Activation patching on the embedded demo model: one process vs Ray, and attribution patching (AtP) from
two traces vs the real sweep.

    python bench/patch_bench.py --workers 2 --json /tmp/patch_bench.json

Cases (same prompts, same metric: logit of the clean run's top token at the last position):

  sweep/process   run_sweep(..., sweep="heads-by-pos") in this process (model loaded beforehand)
  sweep/ray cold  ray.init(num_cpus=N) then the same sweep cut into N chunks as Ray tasks (each worker
                  imports torch and loads the model: start-up included)
  sweep/ray warm  the same again on the running cluster (workers keep their model)
  atp             record clean and corrupt with --grad (two forwards + one backward), then
                  replay.atp.estimate from the two traces (numpy); beside the real sweep of each kind:
                  Pearson r and Spearman rho of the estimated effects against the real ones
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CLEAN = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
CORRUPT = "It is a fact universally acknowledged, that a single man in possession of a good fortune"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import hexray
    from hexray.cli.patch_cmd import pearson, spearman
    from hexray_core.record import Recorder
    from hexray_core.record.sweep import run_sweep
    from hexray_core.replay.atp import estimate

    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
                 "torch_threads": 1}
    rec = Recorder("hexray-demo", device="cpu")
    n = len(rec.tokenize(CLEAN))
    assert n == len(rec.tokenize(CORRUPT)), "prompts must have equal token counts"
    out["tokens"] = n
    t = time.perf_counter()
    proc = run_sweep(rec, CLEAN, CORRUPT, sweep="heads-by-pos", metric="logit")
    out["sweep_process_s"] = time.perf_counter() - t
    out["forward_passes"] = int(proc.values.size)
    target = f"#{proc.target}"
    if not args.no_ray:
        import ray

        from hexray_core.dataset.cluster import ray_map

        t = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        spread = {"map_chunks": lambda f, ts: ray_map(f, ts, "auto"), "model_ref": "hexray-demo",
                  "chunks": args.workers}
        cold = run_sweep(rec, CLEAN, CORRUPT, sweep="heads-by-pos", metric="logit", target=target, **spread)
        out["sweep_ray_cold_s"] = time.perf_counter() - t
        t = time.perf_counter()
        warm = run_sweep(rec, CLEAN, CORRUPT, sweep="heads-by-pos", metric="logit", target=target, **spread)
        out["sweep_ray_warm_s"] = time.perf_counter() - t
        out["ray_max_abs_diff"] = float(max(np.abs(cold.values - proc.values).max(),
                                            np.abs(warm.values - proc.values).max()))
        ray.shutdown()
    with tempfile.TemporaryDirectory() as d:
        c, x = os.path.join(d, "c.hxr"), os.path.join(d, "x.hxr")
        metric = f"logit:{target}"
        t = time.perf_counter()
        rec.record(CLEAN, c, act_dtype="float32", grad=metric, lens=False)
        rec.record(CORRUPT, x, act_dtype="float32", grad=metric, lens=False)
        out["atp_record_s"] = time.perf_counter() - t
        t = time.perf_counter()
        est = estimate(hexray.open(c), hexray.open(x))
        out["atp_estimate_s"] = time.perf_counter() - t
    out["atp"] = {}
    for kind in ("heads-by-pos", "heads", "resid_pre", "attn_out", "mlp_out", "pattern"):
        t = time.perf_counter()
        real = proc if kind == "heads-by-pos" else run_sweep(rec, CLEAN, CORRUPT, sweep=kind, metric="logit",
                                                             target=target)
        secs = out["sweep_process_s"] if kind == "heads-by-pos" else time.perf_counter() - t
        effect = real.values - real.corrupt_value
        moved = effect != 0  # cells before the first differing token are exactly 0 in both
        out["atp"][kind] = {"real_sweep_s": round(secs, 3), "cells": int(effect.size),
                            "pearson": round(pearson(est[kind], effect), 3),
                            "spearman": round(spearman(est[kind], effect), 3),
                            "moved_cells": int(moved.sum()),
                            "spearman_moved": round(spearman(est[kind][moved], effect[moved]), 3)}
    for k, v in list(out.items()):
        if isinstance(v, float):
            out[k] = round(v, 3)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
