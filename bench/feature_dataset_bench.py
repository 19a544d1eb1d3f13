"""What a feature means over a dataset: top-activating contexts of every feature over 500 demo prompts,
one process vs Ray tasks.

    python bench/feature_dataset_bench.py --prompts 500 --cpus 2 --json /tmp/feature_dataset_bench.json

The dataset (the embedded hexray-demo model, default hooks, float32 activations, shards of --shard-size) is recorded
once into --data (kept: later runs reuse it). The dictionary is the shipped hexray-demo-sae when this checkout has
it, else a random TopK SAE (k = 32 active features per token, a trained SAE's usual L0) of --d-sae features at
blocks.2.hook_resid_pre written beside the data. Each case computes the statistics
of the whole dictionary (density, histogram, top --contexts contexts, quantile examples; top logits of the 20
densest), from a fresh state:

  process   feature_stats(...) in this process, shard after shard
  jobs      the same in --cpus worker processes (local_map, what `hexray features DATASET/` does by default)
  ray       ray.init(num_cpus=--cpus), then Ray tasks (ray_map, `--ray`); start-up reported apart

Every case must give the same JSON (checked); reported: wall time and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataset_bench import prompts  # noqa: E402 - the same 500 prompts as the recording bench


def ensure_dataset(folder: str, n: int, shard_size: int) -> str:
    from hexray_core.dataset.layout import read_dataset_info
    from hexray_core.dataset.writer import record_dataset

    last = (read_dataset_info(folder) or {}).get("last") or {}
    if last.get("recorded") != n:  # not yet, or interrupted: record_dataset resumes
        import torch

        torch.set_num_threads(1)  # one thread: 2 threads are 5.7x slower on the shared VM (Datasets on Ray)
        t0 = time.perf_counter()
        record_dataset(prompts(n), folder, model="hexray-demo", shard_size=shard_size, act_dtype="float32",
                       model_opts={"device": "cpu"})
        print(f"recorded {n} prompts in {time.perf_counter() - t0:.1f} s -> {folder}", file=sys.stderr)
    return folder


def dictionary(folder: str, d_sae: int) -> str:
    from hexray_core.errors import HexRayError
    from hexray_core.replay.dictionary import load_dictionary

    try:
        load_dictionary("hexray-demo-sae")
        return "hexray-demo-sae"
    except HexRayError:
        pass
    import numpy as np
    from safetensors.numpy import save_file

    path = os.path.join(folder, f"random-topk-sae-{d_sae}")
    if not os.path.exists(os.path.join(path, "cfg.json")):
        rng = np.random.default_rng(0)
        os.makedirs(path, exist_ok=True)
        save_file({"W_enc": (rng.standard_normal((128, d_sae)) * 0.3).astype(np.float32),
                   "W_dec": (rng.standard_normal((d_sae, 128)) * 0.1).astype(np.float32),
                   "b_enc": (rng.standard_normal(d_sae) * 0.5 - 3.0).astype(np.float32),
                   "b_dec": np.zeros(128, np.float32)}, os.path.join(path, "sae_weights.safetensors"))
        with open(os.path.join(path, "cfg.json"), "w") as f:
            json.dump({"architecture": "topk", "k": 32, "d_in": 128, "d_sae": d_sae, "dtype": "float32",
                       "apply_b_dec_to_input": True, "normalize_activations": "none",
                       "metadata": {"hook_name": "blocks.2.hook_resid_pre",
                                    "model_from_pretrained_kwargs": {"center_writing_weights": False}}}, f)
    return path


def run_case(name: str, ds, dict_ref: str, k: int, mapper) -> tuple[float, dict]:
    from hexray_core.dataset.features import feature_stats

    t0 = time.perf_counter()
    stats = feature_stats(ds, dict_ref, k=k, m=3, top=20, map=mapper)
    doc = stats.to_dict(top=None)
    return time.perf_counter() - t0, doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--contexts", type=int, default=10)
    ap.add_argument("--data", default="/tmp/hexray-feature-bench")
    ap.add_argument("--json")
    args = ap.parse_args()

    from hexray_core.dataset.aggregate import local_map
    from hexray_core.dataset.reader import open_dataset

    folder = ensure_dataset(os.path.join(args.data, f"demo-{args.prompts}"), args.prompts, args.shard_size)
    ds = open_dataset(folder)
    dict_ref = dictionary(args.data, args.d_sae)
    results, docs = {}, {}
    t, docs["process"] = run_case("process", ds, dict_ref, args.contexts, None)
    results["process"] = {"wall_s": t}
    t, docs["jobs"] = run_case("jobs", ds, dict_ref, args.contexts, lambda fn, tasks: local_map(fn, tasks, args.cpus))
    results["jobs"] = {"wall_s": t, "processes": args.cpus}

    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")  # Ray's workers import this
    import ray

    from hexray_core.dataset.cluster import ray_map

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter() - t0
    try:
        t, docs["ray"] = run_case("ray", ds, dict_ref, args.contexts, lambda fn, tasks: ray_map(fn, tasks))
        t2, _ = run_case("ray-warm", ds, dict_ref, args.contexts, lambda fn, tasks: ray_map(fn, tasks))
    finally:
        ray.shutdown()
    results["ray"] = {"wall_s": t, "ray_init_s": start, "wall_warm_s": t2, "cpus": args.cpus}
    base = json.dumps(docs["process"], sort_keys=True)
    same = {k: json.dumps(v, sort_keys=True) == base for k, v in docs.items()}
    layer = docs["process"]["layers"][0]
    tokens = layer["n_tokens"]
    for r in results.values():
        r["tokens_per_s"] = tokens / r["wall_s"]
    out = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "load_avg": os.getloadavg(),
           "prompts": args.prompts, "tokens": tokens, "shards": sum(1 for _ in ds.shards()), "dictionary": dict_ref,
           "d_sae": layer["n_features"], "fired": layer["n_fired"], "same_result": same, "cases": results}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
