#!/usr/bin/env python3
"""Attribution graphs from a trace: time, peak memory and file size of `hexray graph`.

Models (random weights, no hub access; texts of random tokens):

    hexray-demo  the embedded model (4 layers, d_model 128, 512 positions), random transcoders of 1,024
                 features per layer (the demo ships none yet), at 64 and 512 tokens
    tiny-long    the long-context bench's model (GPT-2 architecture, 4 layers, d_model 256, 4 heads, 16,384
                 positions), random transcoders of 4,096 features per layer, at 1,000 and 8,000 tokens

Each graph is built in a fresh process (`hexray graph ... -o graph.json`, the CLI itself), timed end to end,
peak memory = that process's VmHWM (what it holds on top of Python, numpy and the trace). The attention
weights come from the recording bridge (`--weights`) until the kit carries them.

circuit-tracer 0.5 runs on the same model (saved unprocessed), transcoders (circuit-tracer's folder format) and
token ids, in the reference venv (scripts/reference/make_venv.sh: its pins conflict with HexRay's recorder), in
its own process under a 16 GiB address-space limit (a MemoryError rather than the OOM killer on a shared machine):
time of ``attribute`` and peak memory (VmHWM). The dense float32 adjacency it allocates, (features visited + errors
+ tokens + logits)², is printed beside as a derived lower bound.

    python bench/graph_bench.py                         # everything (tens of minutes on 2 cores)
    python bench/graph_bench.py --cases demo-64,long-1000 --max-feature-nodes 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE, os.path.join(REPO, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

CASES = {"demo-64": ("hexray-demo", 64, 1024), "demo-512": ("hexray-demo", 512, 1024),
         "long-1000": ("tiny-long", 1000, 4096), "long-8000": ("tiny-long", 8000, 4096),
         # the same with 1 head of 256 (long_context_bench's tiny-long-1h): recording 8k tokens with 4 eager heads
         # holds ~8 GB of attention scores, too much beside other jobs on this 23 GB machine
         "long1h-8000": ("tiny-long-1h", 8000, 4096)}
WEIGHTS = ["W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_U", "b_U"]


def prepare(model: str, tokens: int, d_sae: int, folder: str, density: float) -> dict:
    """Record the trace, save the weights and random transcoders (in a worker process: torch)."""
    import torch
    from long_context_bench import build, text_of
    from safetensors.numpy import save_file

    from hexray_core.replay.graph import random_transcoders, save_circuit_tracer

    torch.set_num_threads(2)
    rec = build(model)
    b = rec.bridge
    save_file({n: getattr(b, n).detach().float().numpy().copy() for n in WEIGHTS}, os.path.join(folder, "w.st"))
    cfg = b.cfg
    ts = random_transcoders(cfg.n_layers, cfg.d_model, d_sae, seed=0, density=density)
    ts.model_name = None
    save_circuit_tracer(ts, os.path.join(folder, "tc"))
    save_unprocessed(model, os.path.join(folder, "model"))
    from hexray_core.errors import HexRayError

    for ask in range(tokens, tokens - 64, -4):  # decoding and re-encoding random tokens may merge or split some
        try:
            res = rec.record(text_of(rec, ask), os.path.join(folder, "t.hxr"), lens=False)
            break
        except HexRayError as e:
            if "over the model's context" not in str(e):
                raise
    return {"tokens": res.tokens, "trace_bytes": res.bytes}


def save_unprocessed(model: str, out: str) -> None:
    """The model as a Hugging Face folder before compatibility mode (the recorder's bridge rewrote its own copy):
    the demo's folder, or tiny-long rebuilt with long_context_bench's seed and config."""
    import shutil

    import torch
    from long_context_bench import DEMO
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if model == "hexray-demo":
        shutil.copytree(DEMO, out)
        return
    tok = AutoTokenizer.from_pretrained(DEMO)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=1 if model == "tiny-long-1h" else 4, n_positions=16384,
                     vocab_size=len(tok),
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, name), out)


def _status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker_graph(folder: str, extra: list[str]) -> dict:
    """One `hexray graph` in this process: seconds, peak RSS, output size, node/edge counts."""
    from hexray.cli.main import main as hexray_main

    out = os.path.join(folder, "graph.json")
    summary = os.path.join(folder, "summary.json")
    t0 = time.perf_counter()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = hexray_main(["graph", os.path.join(folder, "t.hxr"), "--transcoders", os.path.join(folder, "tc"),
                          "--weights", os.path.join(folder, "w.st"), "-o", out, "--json", *extra])
    secs = time.perf_counter() - t0
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    if rc != 0:
        raise SystemExit(rc)
    s = json.loads(buf.getvalue())
    with open(summary, "w") as f:
        json.dump(s, f)
    return {"seconds": secs, "cpu_seconds": ru.ru_utime + ru.ru_stime,
            "peak_mib": _status_kib("VmHWM") / 1024, "json_bytes": os.path.getsize(out),
            "nodes": s["nodes"], "edges": s["edges"], "unpruned_nodes": s["unpruned_nodes"],
            "unpruned_edges": s["unpruned_edges"], "active_features": s["active_features"],
            "selected_features": s["selected_features"], "n_logits": len(s["logits"])}


def spawn(*args) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


REFVENV = os.environ.get("HEXRAY_REFVENV", "/work/refvenv")
#: circuit-tracer's address-space limit: a MemoryError here instead of the kernel's OOM killer on a shared machine.
CT_LIMIT = 16 << 30


def circuit_tracer(folder: str, max_feature_nodes: int) -> dict:
    """circuit-tracer on the same model, transcoders and token ids, in the reference venv (its own process)."""
    import resource

    import hexray

    py = os.path.join(REFVENV, "bin", "python")
    if not os.path.exists(py):
        return {"error": f"no reference venv at {REFVENV} (scripts/reference/make_venv.sh)"}
    with hexray.open(os.path.join(folder, "t.hxr")) as t:
        tokens = t.run(0).tokens
    with open(os.path.join(folder, "tokens.json"), "w") as f:
        json.dump(tokens, f)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (CT_LIMIT, CT_LIMIT))

    r = subprocess.run([py, os.path.join(HERE, "graph_bench_circuit_tracer.py"), os.path.join(folder, "model"),
                        os.path.join(folder, "tc"), os.path.join(folder, "tokens.json"), str(max_feature_nodes)],
                       capture_output=True, text=True, preexec_fn=limit)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {r.returncode}: {last[:200]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def baseline_python_mib() -> float:
    """VmHWM of a process that imports what `hexray graph` imports and opens nothing: subtracted below."""
    code = ("import numpy, hexray.cli.main, hexray_core.replay.graph, safetensors.numpy, yaml;"
            "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.strip()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--max-feature-nodes", type=int, default=1024, help="features given rows (default 1024)")
    ap.add_argument("--density", type=float, default=0.005, help="random transcoders' target firing rate")
    ap.add_argument("--circuit-tracer", action=argparse.BooleanOptionalAction, default=True,
                    help="also run circuit-tracer in the reference venv (default: yes)")
    ap.add_argument("--worker", choices=["prepare", "graph"])
    ap.add_argument("--folder")
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--d-sae", type=int)
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if args.worker == "prepare":
        print(json.dumps(prepare(args.model, args.tokens, args.d_sae, args.folder, args.density)))
        return
    if args.worker == "graph":
        print(json.dumps(worker_graph(args.folder, extra)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    base = baseline_python_mib()
    print(f"baseline process (imports only): {base:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            model, tokens, d_sae = CASES[case]
            folder = os.path.join(tmp, case)
            os.makedirs(folder)
            prep = spawn("--worker", "prepare", "--folder", folder, "--model", model, "--tokens", str(tokens),
                         "--d-sae", str(d_sae), "--density", str(args.density))
            if "error" in prep:
                print(f"{case}: prepare failed: {prep['error']}")
                continue
            r = spawn("--worker", "graph", "--folder", folder, "--", "--max-feature-nodes",
                      str(args.max_feature_nodes), *extra)  # e.g. --qk 0
            if "error" in r:
                print(f"{case}: graph failed: {r['error']}")
                continue
            n_dense = r["selected_features"] + 4 * prep["tokens"] + prep["tokens"] + r["n_logits"]
            dense_mib = n_dense * n_dense * 4 / 2**20
            print(f"{case}: {prep['tokens']} tokens, {r['active_features']} active features, "
                  f"{r['selected_features']} with rows; {r['seconds']:.1f} s wall ({r['cpu_seconds']:.1f} s CPU), "
                  f"{r['peak_mib']:.0f} MiB "
                  f"({r['peak_mib'] - base:.0f} above imports), JSON {r['json_bytes'] / 1e6:.2f} MB "
                  f"({r['nodes']} nodes, {r['edges']} edges; unpruned {r['unpruned_nodes']} nodes, "
                  f"{r['unpruned_edges']} edges); circuit-tracer's dense adjacency alone (derived): "
                  f"{dense_mib:.0f} MiB")
            sys.stdout.flush()
            if args.circuit_tracer:
                ct = circuit_tracer(folder, args.max_feature_nodes)
                if "error" in ct:
                    print(f"{case}: circuit-tracer: {ct['error']}")
                else:
                    print(f"{case}: circuit-tracer 0.5 (same model, transcoders, tokens): {ct['seconds']:.1f} s "
                          f"(+ {ct['load_seconds']:.1f} s loading), peak {ct['peak_mib']:.0f} MiB, "
                          f"{ct['n_nodes']} nodes; HexRay peak is {ct['peak_mib'] / r['peak_mib']:.1f}x less")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
