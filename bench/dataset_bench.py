"""Recording a dataset: one process vs Ray Data with N CPU workers, same prompts, same run.

    python bench/dataset_bench.py --prompts 500 --workers 2 --json /tmp/dataset_bench.json

Each case records the same prompts (the embedded hexray-demo model, default hooks, float16
activations, shards of --shard-size) into a fresh folder, from a fresh state:

  process   record_dataset(..., ray=None): this process loads the model, records shard after shard;
            once per value of --threads (torch threads), 1 and the CPU count by default
  ray       ray.init(num_cpus=N) then record_dataset(..., ray="auto"): N actors, one CPU and one torch
            thread each, each loading the model

Reported: wall time end to end (model loading and, for Ray, cluster start included), Ray's start-up
(ray.init, and the time to the first finished shard beyond the in-process one), steady-state
throughput (prompts/s between the first and the last finished shard), and each case's figures
relative to the one-process case. On a GPU machine pass --device cuda: each actor then takes one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Elizabeth had three letters to answer, and she answered the first",
    "He spoke with the greatest kindness, and the rest of the evening",
    "\"I am very glad to see you,\" said Emma, \"Mr. Knightley was here",
    "Mr. Darcy walked towards the window and looked out upon the",
    "The ball was to be on Tuesday, and every one of the family",
    "She could not help smiling at his manner of",
    "Mrs. Bennet was never so pleased as when her daughters",
    "Jane and Elizabeth were left together in the drawing room after",
    "They went to the library, where the fire had been",
]


def prompts(n: int) -> list[dict]:
    out = []
    for i in range(n):
        s = SENTENCES[i % len(SENTENCES)]
        words = s.split()
        cut = 6 + (i // len(SENTENCES)) % (len(words) - 5)  # prompts of 6 words up to the whole sentence
        out.append({"prompt": " ".join(words[:cut]), "id": i})
    return out


def timed_run(items, out, *, ray_address, workers, shard_size, device, act_dtype):
    from hexray_core.dataset.writer import record_dataset

    marks = []

    def progress(event, **info):
        if event == "shard_done":
            marks.append((time.perf_counter(), info["done"]))

    t0 = time.perf_counter()
    res = record_dataset(items, out, model="hexray-demo", ray=ray_address, workers=workers, shard_size=shard_size,
                         progress=progress, model_opts={"device": device}, act_dtype=act_dtype)
    wall = time.perf_counter() - t0
    (t_first, n_first), (t_last, n_last) = marks[0], marks[-1]
    steady = (n_last - n_first) / (t_last - t_first) if t_last > t_first else float("nan")
    return {"wall_s": wall, "first_shard_s": t_first - t0, "steady_prompts_per_s": steady,
            "overall_prompts_per_s": res.recorded / wall, "recorded": res.recorded, "bytes": res.bytes,
            "tokens": res.tokens, "workers": res.workers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--threads", default=None, help="torch threads of the one-process cases, comma-separated "
                                                    "(default: 1 and the CPU count)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--act-dtype", default="auto")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    os.environ.setdefault("HEXRAY_CACHE", tempfile.mkdtemp(prefix="hexray-bench-cache-"))
    items = prompts(args.prompts)
    root = tempfile.mkdtemp(prefix="hexray-dataset-bench-")
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
               "prompts": args.prompts, "shard_size": args.shard_size, "workers": args.workers}
    try:
        import torch

        threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, os.cpu_count() or 1})
        for th in threads:
            torch.set_num_threads(th)
            case = f"process_{th}thread"
            results[case] = timed_run(items, os.path.join(root, case), ray_address=None, workers=None,
                                      shard_size=args.shard_size, device=args.device, act_dtype=args.act_dtype)
            results[case]["torch_threads"] = th
            print(f"{case}: {json.dumps(results[case])}", flush=True)
        best = max((k for k in results if k.startswith("process_")), key=lambda k: results[k]["steady_prompts_per_s"])
        results["process"] = results[best]

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        results["ray_init_s"] = time.perf_counter() - t0
        results["ray"] = timed_run(items, os.path.join(root, "ray"), ray_address="auto", workers=args.workers,
                                   shard_size=args.shard_size, device=args.device, act_dtype=args.act_dtype)
        results["ray"]["wall_with_init_s"] = results["ray"]["wall_s"] + results["ray_init_s"]
        print(f"ray: {json.dumps(results['ray'])}", flush=True)
        ray.shutdown()
        p, r = results["process"], results["ray"]
        results["ratios"] = {
            "baseline": best,
            "steady_throughput_ray_over_process": r["steady_prompts_per_s"] / p["steady_prompts_per_s"],
            "wall_process_over_ray_with_init": p["wall_s"] / r["wall_with_init_s"],
            "ray_startup_overhead_s": results["ray_init_s"] + r["first_shard_s"] - p["first_shard_s"],
        }
        results["load_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
