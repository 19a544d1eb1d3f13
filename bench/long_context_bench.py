#!/usr/bin/env python3
"""Long contexts: trace bytes per token, recorder memory, KV-cache generation, replay at 16k tokens.

Models (random weights, no hub access; text of random tokens, so activations are as incompressible
as real ones):

    tiny-long   GPT-2 architecture, 4 layers, d_model 256, 4 heads of 64, 16,384 positions, the demo
                model's 4,096-token vocabulary
    tiny-long-1h the same with 1 head of 256: TransformerBridge's eager attention holds ~8 copies of a
                layer's [heads, n, n] float32 scores at once (measured below), 33 GB at 16k tokens with
                4 heads, more than this 23 GB machine has; with 1 head it is ~8 GB. q, k and v are
                n × d_model either way, so bytes per token are the same
    tiny-64k    tiny-long with 4 heads and 65,536 positions (the flash section)
    gpt2-small  GPT2LMHeadModel(GPT2Config()): 12 layers, d_model 768, 12 heads, 50,257 tokens
    hexray-demo the embedded model (4 layers, d_model 128, 512 positions)

Sections (each measured in this one run, old beside new):

    size     bytes per token of `--hooks default` (q, k, v; no patterns) at 1k / 4k / 16k tokens, and of
             the previous default (the same plus blocks.*.attn.hook_pattern) where it fits on disk
    memory   the recorder's peak RSS (VmHWM of a fresh process, minus its RSS once the model is loaded)
    generate `--generate N`: KV-cache generation against one full forward per token (the previous
             implementation), same model, same prompt, same process
    flash    recorder peak memory and time, ``--attention flash`` beside ``--attention eager`` (eager until it
             runs out of memory), tiny-64k at 1k / 4k / 16k / 32k / 64k tokens; each recording in its own
             process under an address-space cap (``--cap-gb``, default 12) so the shared machine survives
    replay   on the 16k-token tiny-long trace: cold `hexray replay t.hxr --top-k 10` (fresh process),
             one attention row (all heads of one layer, warm), one position's attribution (warm), the
             CoT breakdown of the whole trace (cold trace object, in process)

    python bench/long_context_bench.py                     # everything (~15 min on 2 cores, ~14 GB RAM)
    python bench/long_context_bench.py --sections size,replay --lengths 1024,4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, os.path.join(REPO, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DEMO = os.path.join(REPO, "hexray_core", "models", "hexray-demo")
OLD_DEFAULT = "default,blocks.*.attn.hook_pattern"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def build(model: str):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from hexray_core.record import Recorder

    torch.manual_seed(0)
    if model == "hexray-demo":
        return Recorder("hexray-demo", device="cpu")
    if model.startswith(("tiny-long", "tiny-64k")):
        tok = AutoTokenizer.from_pretrained(DEMO)
        heads = 1 if model == "tiny-long-1h" else 4
        positions = 65536 if model == "tiny-64k" else 16384
        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=heads, n_positions=positions, vocab_size=len(tok),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        import tiny_models

        tok = tiny_models.build_tokenizer()
        cfg = GPT2Config()
    return Recorder(GPT2LMHeadModel(cfg).eval(), tokenizer=tok)


def text_of(rec, n_tokens: int, seed: int = 0) -> str:
    """A text of random tokens that the recorder tokenizes to about ``n_tokens`` (BOS included)."""
    import numpy as np

    tok = rec.tokenizer
    rng = np.random.default_rng(seed)
    special = set(tok.all_special_ids)
    ids = [int(i) for i in rng.integers(0, min(len(tok), 4096), size=n_tokens * 2) if int(i) not in special]
    text = tok.decode(ids[: n_tokens - 1])
    for _ in range(6):
        got = rec.tokenize(text)
        if len(got) <= n_tokens:
            return text
        text = tok.decode(got[1: n_tokens])
    return text


# -- workers (one measurement in its own process) ---------------------------------------------------

def worker_record(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    rec = build(args.model)
    text = text_of(rec, args.tokens)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    res = rec.record(text, args.out, hooks=args.hooks, lens=False, attention=args.attention)
    return {"tokens": res.tokens, "bytes": res.bytes, "seconds": time.perf_counter() - t0,
            "peak_kib": _status_kib("VmHWM"), "rss_loaded_kib": rss0}


def worker_forward(args) -> dict:
    """Peak RSS of one plain bridge forward (no hooks): the model's own transient memory."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    rec = build(args.model)
    ids = torch.tensor([rec.tokenize(text_of(rec, args.tokens))])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    rec.bridge(ids, return_type="logits")
    return {"tokens": ids.shape[1], "seconds": time.perf_counter() - t0, "peak_kib": _status_kib("VmHWM"),
            "rss_loaded_kib": rss0}


def worker_generate(args) -> dict:
    import torch

    from hexray_core.record.generate import generate, generate_uncached

    torch.set_num_threads(args.threads)
    rec = build(args.model)
    ids = rec.tokenize(text_of(rec, args.tokens))
    device = rec.loaded.input_device
    out = {"prompt_tokens": len(ids), "new_tokens": args.generate}
    rounds = {"kv_cache": [], "full_forward": []}
    for _ in range(args.rounds):  # interleaved: the machine's load hits both alike
        t0 = time.perf_counter()
        cached = generate(rec.bridge, ids, args.generate, device=device).tokens
        rounds["kv_cache"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        full = generate_uncached(rec.bridge, ids, args.generate, device=device)
        rounds["full_forward"].append(time.perf_counter() - t0)
    out.update({k: statistics.median(v) for k, v in rounds.items()})
    out["same_tokens"] = cached == full
    return out


def worker_replay(args) -> dict:
    import numpy as np

    import hexray
    from hexray_core.replay.attention import attention_row

    def best(fn, n=7):
        fn()  # warm
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t = hexray.open(args.out)
    n = t.runs[0].n_tokens
    layer = t.n_layers - 1
    out = {"tokens": n}
    t0 = time.perf_counter()
    attention_row(t, 0, layer, n - 1)
    out["attention_row_cold_s"] = time.perf_counter() - t0
    out["attention_row_warm_s"] = best(lambda: attention_row(t, 0, layer, n - 1))
    t0 = time.perf_counter()
    t.attribution(position=n // 2)
    out["attribution_cold_s"] = time.perf_counter() - t0
    out["attribution_warm_s"] = best(lambda: t.attribution(position=int(np.random.randint(n))))
    t.close()
    t = hexray.open(args.out)
    t0 = time.perf_counter()
    cot = t.cot(mode="lines")
    out["cot_s"] = time.perf_counter() - t0
    out["cot_steps"] = len(cot.steps)
    return out


def spawn(kind: str, cap_gb: float | None = None, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]

    def cap():  # address space, not RSS: an allocation past it fails at once instead of swapping the machine
        import resource

        limit = int(cap_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap if cap_gb else None)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def cold_replay(path: str, rounds: int) -> float:
    hexray_bin = os.path.join(os.path.dirname(sys.executable), "hexray")
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        subprocess.run([hexray_bin, "replay", path, "--top-k", "10"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="size,generate,replay")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--worker")
    ap.add_argument("--model", default="tiny-long")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--hooks", default="default")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--cap-gb", type=float, default=12.0, help="flash section: address-space cap per recording")
    ap.add_argument("--flash-lengths", default="1024,4096,16384,32768,65536")
    ap.add_argument("--out")
    ap.add_argument("--trace", help="replay section: an existing tiny-long-1h trace instead of recording one")
    ap.add_argument("--generate-models", default="hexray-demo,tiny-long")
    args = ap.parse_args()
    if args.worker:
        fn = {"record": worker_record, "forward": worker_forward, "generate": worker_generate,
              "replay": worker_replay}[args.worker]
        print(json.dumps(fn(args)))
        return
    tmp = tempfile.mkdtemp(prefix="hexray-long-")
    os.environ["HEXRAY_CACHE"] = os.path.join(tmp, "cache")
    sections = set(args.sections.split(","))
    lengths = [int(x) for x in args.lengths.split(",")]
    results: dict = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
                     "load_start": os.getloadavg()[0]}

    def row(label, r):
        if "error" in r:
            print(f"  {label:34} ERROR {r['error']}", flush=True)
            return
        per = r["bytes"] / r["tokens"]
        mem = (r["peak_kib"] - r["rss_loaded_kib"]) / 1024
        print(f"  {label:34} {r['tokens']:>6} tokens {r['bytes'] / 1e6:>9.1f} MB {per / 1024:>8.1f} KiB/token "
              f"peak +{mem:>7.0f} MB (model loaded: {r['rss_loaded_kib'] / 1024:.0f} MB) {r['seconds']:.1f} s",
              flush=True)

    if "size" in sections:
        print("size and memory (--hooks default, lens off; peak = VmHWM growth during the call)")
        size = results["size"] = {}
        for model in ("tiny-long", "tiny-long-1h"):
            for n in lengths:
                if model == "tiny-long" and n > 4096:
                    continue  # ~33 GB of eager attention: see the docstring
                out = os.path.join(tmp, f"{model}-{n}.hxr")
                size[f"{model}/{n}/forward"] = f = spawn("forward", model=model, tokens=n, threads=args.threads)
                size[f"{model}/{n}/default"] = r = spawn("record", model=model, tokens=n, out=out,
                                                          threads=args.threads)
                row(f"{model} default {n}", r)
                if "error" not in f and "error" not in r:
                    print(f"  {'':34} plain forward peak +{(f['peak_kib'] - f['rss_loaded_kib']) / 1024:.0f} MB: "
                          f"the recorder adds {(r['peak_kib'] - f['peak_kib']) / 1024:+.0f} MB", flush=True)
                if n <= 4096:
                    old = os.path.join(tmp, f"{model}-{n}-old.hxr")
                    size[f"{model}/{n}/old"] = r = spawn("record", model=model, tokens=n, out=old,
                                                          hooks=OLD_DEFAULT, threads=args.threads)
                    row(f"{model} old default {n}", r)
                    os.unlink(old)
                if not (model == "tiny-long-1h" and n == max(lengths)):
                    os.unlink(out)
            ok = [size[f"{model}/{n}/default"] for n in lengths if "error" not in size.get(f"{model}/{n}/default",
                                                                                         {"error": 1})]
            if len(ok) > 1:
                ratio = (ok[-1]["bytes"] / ok[-1]["tokens"]) / (ok[0]["bytes"] / ok[0]["tokens"])
                size[f"{model}/bytes_per_token_ratio"] = ratio
                print(f"  {model}: bytes/token at {ok[-1]['tokens']} vs {ok[0]['tokens']} tokens: {ratio:.3f}x "
                      "(target <= 1.25)", flush=True)
        for hooks, label in (("default", "default"), (OLD_DEFAULT, "old default")):
            out = os.path.join(tmp, f"gpt2-{label}.hxr")
            size[f"gpt2-small/1000/{label}"] = r = spawn("record", model="gpt2-small", tokens=1000, out=out,
                                                          hooks=hooks, threads=args.threads)
            row(f"gpt2-small {label} 1000", r)
            if os.path.exists(out):
                os.unlink(out)
    if "flash" in sections:
        print(f"flash vs eager attention while recording (tiny-64k, --hooks default, lens off, {args.cap_gb:g} GB "
              "address-space cap per process; peak = VmHWM growth during the call)")
        fl = results["flash"] = {}
        eager_ok = True
        warm = os.path.join(tmp, "warm.hxr")  # the first recording writes the model kit to the cache: not timed
        spawn("record", model="tiny-64k", tokens=64, out=warm, threads=args.threads)
        if os.path.exists(warm):
            os.unlink(warm)
        for n in [int(x) for x in args.flash_lengths.split(",")]:
            for mode in ("flash", "eager"):
                if mode == "eager" and not eager_ok:
                    print(f"  {'tiny-64k ' + mode + ' ' + str(n):34} skipped (eager ran out of memory at a shorter "
                          "context)", flush=True)
                    continue
                out = os.path.join(tmp, f"tiny-64k-{mode}-{n}.hxr")
                fl[f"{n}/{mode}"] = r = spawn("record", cap_gb=args.cap_gb, model="tiny-64k", tokens=n, out=out,
                                              threads=args.threads, attention=mode)
                row(f"tiny-64k {mode} {n}", r)
                if "error" in r:
                    eager_ok = eager_ok and mode != "eager"
                    print(f"  {'':34} left a file behind: {os.path.exists(out)}", flush=True)
                if os.path.exists(out):
                    os.unlink(out)
    if "generate" in sections:
        print("generation (greedy; median of rounds, interleaved)")
        gen = results["generate"] = {}
        for model, prompt, n in (("hexray-demo", 16, 480), ("tiny-long", 16, 1000)):
            if model not in args.generate_models.split(","):
                continue
            gen[model] = r = spawn("generate", model=model, tokens=prompt, generate=n, rounds=args.rounds,
                                   threads=args.threads)
            if "error" in r:
                print(f"  {model}: ERROR {r['error']}")
                continue
            print(f"  {model:12} {n} new tokens: KV cache {r['kv_cache']:.2f} s, one forward per token "
                  f"{r['full_forward']:.2f} s ({r['full_forward'] / r['kv_cache']:.1f}x), same tokens: "
                  f"{r['same_tokens']}", flush=True)
    if "replay" in sections:
        n = max(lengths)
        path = args.trace or os.path.join(tmp, f"tiny-long-1h-{n}.hxr")
        if not os.path.exists(path):
            spawn("record", model="tiny-long-1h", tokens=n, out=path, threads=args.threads)
        print(f"replay of the {n}-token tiny-long-1h trace")
        r = results["replay"] = spawn("replay", out=path)
        r["cold_replay_top10_s"] = cold_replay(path, 5)
        for k, v in r.items():
            print(f"  {k:28} {v * 1000:.1f} ms" if k.endswith("_s") else f"  {k:28} {v}", flush=True)
    results["load_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
