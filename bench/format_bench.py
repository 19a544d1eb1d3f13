"""Trace format benchmark: write/read throughput and random-access latency of `.hxr` on a
GPT-2-small-shaped activation set, against numpy.save and safetensors measured in the same run.

The activation set is the 208 legacy TransformerLens hooks of GPT-2 small at N tokens (default
1024: 967 MB in fp16), generated with numpy to look like the real thing: residual-like tensors
are random normal with a few large outlier dimensions (as trained GPT-2 has), attention scores
are causal (upper triangle -inf, as TransformerLens records them), attention patterns are
softmaxes of those (upper triangle exactly 0; some heads sink on token 0, some look at the
previous token), MLP pre/post activations go through GELU, LayerNorm scales are positive.

    python bench/format_bench.py                       # everything, files under /tmp/hxr_bench
    python bench/format_bench.py --rounds 1 --tokens 256
    python bench/format_bench.py --json results.json   # also write the numbers as JSON

Throughput is MB/s of raw (fp16) data, MB = 10**6 bytes, wall clock, median of --rounds
interleaved rounds; the CPU seconds of the writing process are reported beside each figure,
because on a shared VM the wall clock also measures the neighbours. Latency is measured in a
fresh process (file in the page cache, i.e. warm), whose peak RSS is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trace_format import TraceReader, TraceWriter  # noqa: E402

MB = 1e6
N_LAYERS, D_MODEL, N_HEADS, D_HEAD, D_MLP = 12, 768, 12, 64, 3072


def hook_shapes(n: int) -> dict[str, tuple[int, ...]]:
    """The 208 legacy hook points of GPT-2 small (batch dimension removed), in the order they fire."""
    shapes = {"hook_embed": (n, D_MODEL), "hook_pos_embed": (n, D_MODEL)}
    for L in range(N_LAYERS):
        b = f"blocks.{L}."
        shapes.update({
            b + "hook_resid_pre": (n, D_MODEL),
            b + "ln1.hook_scale": (n, 1), b + "ln1.hook_normalized": (n, D_MODEL),
            b + "attn.hook_q": (n, N_HEADS, D_HEAD), b + "attn.hook_k": (n, N_HEADS, D_HEAD),
            b + "attn.hook_v": (n, N_HEADS, D_HEAD),
            b + "attn.hook_attn_scores": (N_HEADS, n, n), b + "attn.hook_pattern": (N_HEADS, n, n),
            b + "attn.hook_z": (n, N_HEADS, D_HEAD), b + "hook_attn_out": (n, D_MODEL),
            b + "hook_resid_mid": (n, D_MODEL),
            b + "ln2.hook_scale": (n, 1), b + "ln2.hook_normalized": (n, D_MODEL),
            b + "mlp.hook_pre": (n, D_MLP), b + "mlp.hook_post": (n, D_MLP),
            b + "hook_mlp_out": (n, D_MODEL), b + "hook_resid_post": (n, D_MODEL),
        })
    shapes["ln_final.hook_scale"] = (n, 1)
    shapes["ln_final.hook_normalized"] = (n, D_MODEL)
    assert len(shapes) == 208
    return shapes


def make_activations(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Real-looking fp16 activations for every hook (see the module docstring)."""
    rng = np.random.default_rng(seed)
    outlier_dims = rng.choice(D_MODEL, 4, replace=False)  # GPT-2's residual stream has a few huge dimensions
    causal = np.triu(np.ones((n, n), dtype=bool), k=1)
    out = {}
    for name, shape in hook_shapes(n).items():
        if name.endswith("hook_scale"):
            x = (0.05 + rng.gamma(4.0, 0.05, size=shape)).astype(np.float32)
        elif name.endswith("hook_attn_scores") or name.endswith("hook_pattern"):
            continue  # made per layer below
        elif "mlp.hook_p" in name:
            x = rng.standard_normal(shape, dtype=np.float32) * 1.5 - 0.5
            if name.endswith("hook_post"):
                x = 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))  # gelu_new
        else:
            x = rng.standard_normal(shape, dtype=np.float32)
            if "resid" in name or name in ("hook_embed", "hook_pos_embed"):
                x *= 2.0
                x[:, outlier_dims] *= 40  # |x| up to a few hundred: fine in fp16 (max 65504)
        out[name] = x.astype(np.float16)
    for L in range(N_LAYERS):
        scores = rng.standard_normal((N_HEADS, n, n), dtype=np.float32) * 2.0
        scores[: N_HEADS // 3, :, 0] += 6.0  # attention sinks on the first token
        idx = np.arange(1, n)
        scores[N_HEADS // 3: N_HEADS // 2, idx, idx - 1] += 8.0  # previous-token heads
        scores[:, causal] = -np.inf  # TransformerLens records masked scores as -inf
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        pattern = e / e.sum(axis=-1, keepdims=True)
        out[f"blocks.{L}.attn.hook_attn_scores"] = scores.astype(np.float16)
        out[f"blocks.{L}.attn.hook_pattern"] = pattern.astype(np.float16)
        del scores, e, pattern
    return {name: out[name] for name in hook_shapes(n)}


# -- writers -------------------------------------------------------------------------------------

def _timed(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process (all threads), CPU seconds of the calling thread) of fn()."""
    w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0, time.thread_time() - t0


def write_hxr(acts, path, *, threads: int, level: int | None, shuffle: bool) -> None:
    with TraceWriter(path, meta={"model": {"name": "gpt2-shaped (synthetic)"}}, threads=threads, level=level,
                     shuffle=shuffle) as w:
        w.begin_run(prompt="benchmark", tokens=list(range(next(iter(acts.values())).shape[0])))
        for name, x in acts.items():
            w.write(name, x)


def write_npy(acts, folder) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, x in acts.items():
        np.save(os.path.join(folder, name + ".npy"), x)


def write_safetensors(acts, path) -> None:
    from safetensors.numpy import save_file

    save_file(acts, path)


def read_hxr(path) -> int:
    n = 0
    with TraceReader(path) as r:
        for name in r.names(0):
            n += r.read(name, dtype="stored").nbytes
    return n


def read_npy(folder, names) -> int:
    return sum(np.load(os.path.join(folder, name + ".npy")).nbytes for name in names)


def read_safetensors(path) -> int:
    from safetensors.numpy import load_file

    return sum(x.nbytes for x in load_file(path).values())


def size_of(path) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


# -- latency in a fresh process ------------------------------------------------------------------

_LATENCY = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from trace_format import TraceReader

    def hwm_mb():  # VmHWM, not ru_maxrss: after exec, ru_maxrss still counts the parent's memory at fork time
        return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024

    path, samples = sys.argv[2], int(sys.argv[3])
    layer = 6
    cases = {
        "open (tail read + index)": None,
        "resid [1024, 768] fp16 -> f32": (f"blocks.{layer}.hook_resid_post", ()),
        "attention row (1 head, 1 query)": (f"blocks.{layer}.attn.hook_pattern", (3, slice(-1, None))),
        "whole attention layer [12, n, n] -> f32": (f"blocks.{layer}.attn.hook_pattern", ()),
    }
    out = {"rss_after_import_mb": hwm_mb()}
    t0 = time.perf_counter()
    r = TraceReader(path)
    first_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    r.read(cases["resid [1024, 768] fp16 -> f32"][0])
    first_read = time.perf_counter() - t0
    for label, case in cases.items():
        if label.startswith("whole"):
            out["peak_rss_mb"] = hwm_mb()  # the process that did the reads the targets are about
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            if case is None:
                TraceReader(path).close()
            else:
                x = r.read(case[0], index=case[1])
            times.append(time.perf_counter() - t0)
        times.sort()
        out[label] = {"median_ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0], "max_ms": 1e3 * times[-1],
                      "shape": None if case is None else list(x.shape)}
    out["first open (new process)"] = {"median_ms": 1e3 * first_open}
    out["first read after open"] = {"median_ms": 1e3 * first_read}
    out["peak_rss_after_whole_layer_mb"] = hwm_mb()
    print(json.dumps(out))
""")


def latency(path: str, samples: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _LATENCY, REPO, path, str(samples)], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)


# -- main ----------------------------------------------------------------------------------------

def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    import msgpack
    import zstandard

    return (f"{os.cpu_count()} vCPU {cpu}, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, numpy {np.__version__}, zstandard {zstandard.__version__} "
            f"(libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}), msgpack {'.'.join(map(str, msgpack.version))}; "
            f"load average at start {load[0]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/hxr_bench", help="scratch folder for the files (default /tmp/hxr_bench)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=2, help="compression threads of the .hxr writer (default 2)")
    ap.add_argument("--level", type=int, default=1, help="zstd level of the .hxr writer (default 1)")
    ap.add_argument("--samples", type=int, default=30, help="latency samples per read")
    ap.add_argument("--no-baselines", action="store_true", help="skip numpy.save and safetensors")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    info = machine()
    print(f"machine: {info}")
    t0 = time.perf_counter()
    acts = make_activations(args.tokens)
    raw = sum(x.nbytes for x in acts.values())
    print(f"activation set: {len(acts)} tensors, {raw / MB:.1f} MB fp16, generated in {time.perf_counter() - t0:.1f} s")

    paths = {"hxr": os.path.join(args.out, "bench.hxr"), "hxr_raw": os.path.join(args.out, "bench_raw.hxr"),
             "npy": os.path.join(args.out, "npy"), "safetensors": os.path.join(args.out, "bench.safetensors")}
    writers = {
        "hxr": lambda: write_hxr(acts, paths["hxr"], threads=args.threads, level=args.level, shuffle=True),
        "hxr_raw": lambda: write_hxr(acts, paths["hxr_raw"], threads=args.threads, level=None, shuffle=False),
    }
    readers = {"hxr": lambda: read_hxr(paths["hxr"]), "hxr_raw": lambda: read_hxr(paths["hxr_raw"])}
    if not args.no_baselines:
        writers["npy"] = lambda: write_npy(acts, paths["npy"])
        writers["safetensors"] = lambda: write_safetensors(acts, paths["safetensors"])
        readers["npy"] = lambda: read_npy(paths["npy"], list(acts))
        readers["safetensors"] = lambda: read_safetensors(paths["safetensors"])

    command = " ".join(["python", "bench/format_bench.py", *(argv if argv is not None else sys.argv[1:])])
    results: dict = {"machine": info, "command": command, "tokens": args.tokens, "tensors": len(acts), "raw_bytes": raw,
                     "threads": args.threads, "level": args.level, "write": {}, "read": {}, "size": {}}
    samples = {k: {"write": [], "write_cpu": [], "write_main": [], "read": [], "read_cpu": []} for k in writers}
    for rnd in range(args.rounds):
        for key, fn in writers.items():
            for p in (paths[key],):
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
            wall, cpu, main_cpu = _timed(fn)
            samples[key]["write"].append(wall)
            samples[key]["write_cpu"].append(cpu)
            samples[key]["write_main"].append(main_cpu)
            wall, cpu, _ = _timed(readers[key])
            samples[key]["read"].append(wall)
            samples[key]["read_cpu"].append(cpu)
            print(f"  round {rnd + 1}: {key:<12} write {raw / MB / samples[key]['write'][-1]:7.0f} MB/s "
                  f"(cpu {samples[key]['write_cpu'][-1]:.2f} s)  read {raw / MB / samples[key]['read'][-1]:7.0f} MB/s",
                  flush=True)
    for key, s in samples.items():
        results["write"][key] = {"mb_s": raw / MB / statistics.median(s["write"]),
                                 "all_mb_s": [raw / MB / t for t in s["write"]],
                                 "cpu_s": statistics.median(s["write_cpu"]),
                                 "main_thread_cpu_s": statistics.median(s["write_main"])}
        results["read"][key] = {"mb_s": raw / MB / statistics.median(s["read"]),
                                "all_mb_s": [raw / MB / t for t in s["read"]],
                                "cpu_s": statistics.median(s["read_cpu"])}
        results["size"][key] = size_of(paths[key])

    results["latency"] = latency(paths["hxr"], args.samples)
    results["rss_bench_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print()
    print("| format | file size | vs fp16 raw | write MB/s: median, best (CPU s) | read MB/s: median, best (CPU s) |")
    print("|---|---|---|---|---|")
    labels = {"hxr": f".hxr zstd L{args.level} + shuffle, {args.threads} threads", "hxr_raw": ".hxr uncompressed",
              "npy": "numpy.save (one .npy per tensor)", "safetensors": "safetensors (save_file)"}
    for key in writers:
        size = results["size"][key]
        w, r = results["write"][key], results["read"][key]
        print(f"| {labels[key]} | {size / MB:.1f} MB | {size / raw:.3f} | {w['mb_s']:.0f}, {max(w['all_mb_s']):.0f} "
              f"({w['cpu_s']:.2f}) | {r['mb_s']:.0f}, {max(r['all_mb_s']):.0f} ({r['cpu_s']:.2f}) |")
    w = results["write"]["hxr"]
    bound = raw / MB / max(w["cpu_s"] / 2, w["main_thread_cpu_s"])
    print(f"\n.hxr writer CPU: {w['cpu_s']:.2f} s in all threads, {w['main_thread_cpu_s']:.2f} s in the calling "
          f"thread -> {raw / MB / w['cpu_s']:.0f} MB per CPU-second; on 2 otherwise idle cores the wall clock "
          f"could reach ~{bound:.0f} MB/s (CPU-bound estimate, not a measurement)")
    results["write"]["hxr"]["idle_2core_estimate_mb_s"] = bound
    print()
    lat = results["latency"]
    print("| read from the .hxr file (fresh process, warm page cache) | median ms | min | max |")
    print("|---|---|---|---|")
    for label, v in lat.items():
        if isinstance(v, dict) and "min_ms" in v:
            print(f"| {label} | {v['median_ms']:.2f} | {v['min_ms']:.2f} | {v['max_ms']:.2f} |")
    print(f"| first open in the new process / first read | {lat['first open (new process)']['median_ms']:.2f} / "
          f"{lat['first read after open']['median_ms']:.2f} | | |")
    print(f"\npeak RSS of the reading process: {lat['peak_rss_mb']:.0f} MB after open + resid + row reads "
          f"({lat['rss_after_import_mb']:.0f} MB after imports), {lat['peak_rss_after_whole_layer_mb']:.0f} MB "
          "after also reading whole attention layers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
