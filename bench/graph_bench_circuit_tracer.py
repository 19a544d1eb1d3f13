#!/usr/bin/env python3
"""circuit-tracer 0.5's attribution graph on a model folder, transcoders and token ids: seconds and peak memory.

Runs in the reference venv (scripts/reference/make_venv.sh), never HexRay's: bench/graph_bench.py starts it. The
model is loaded exactly as circuit-tracer loads it (scripts/reference/make_fixtures.py's helpers), then
``attribute(tokens, model, batch_size, max_feature_nodes)``; prints one JSON line.

    /work/refvenv/bin/python bench/graph_bench_circuit_tracer.py MODEL_DIR TC_DIR TOKENS.json MAX_FEATURE_NODES
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "reference"))


def main() -> None:
    model_dir, tc_dir, tokens_path, max_nodes = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    import torch
    import yaml
    from make_fixtures import allow_local_folders, load_set, tl_path

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel

    allow_local_folders()
    tokens = torch.tensor(json.loads(Path(tokens_path).read_text()))
    config = yaml.safe_load((tc_dir / "config.yaml").read_text())
    t0 = time.perf_counter()
    tset = load_set(tc_dir, config)
    model = TransformerLensReplacementModel.from_pretrained_and_transcoders(tl_path(Path(model_dir)), tset,
                                                                            device="cpu")
    t1 = time.perf_counter()
    graph = attribute(tokens, model, batch_size=64, max_feature_nodes=max_nodes, verbose=False)
    t2 = time.perf_counter()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"load_seconds": t1 - t0, "seconds": t2 - t1, "peak_mib": peak / 1024,
                      "n_nodes": int(graph.adjacency_matrix.shape[0]),
                      "n_features": int(len(graph.selected_features))}))


if __name__ == "__main__":
    main()
