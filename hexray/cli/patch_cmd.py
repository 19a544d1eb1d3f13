"""`hexray patch`: activation patching sweeps (TransformerLens's functions on the bridge), and attribution
patching estimated from two traces (``--estimate``, numpy only)."""

from __future__ import annotations

import argparse
import math

from hexray.cli.record_support import Progress, recorder_class
from hexray_core.errors import HexRayError

SWEEP_CHOICES = ("resid_pre", "attn_out", "mlp_out", "heads", "heads-by-pos", "pattern")
ESTIMATE_ONLY = ("q", "k", "features")  # AtP* of queries and keys, AtP of a dictionary's features (two traces)

DESCRIPTION = """\
Patch the clean run's activations into the corrupt run, one layer/position/head at a time, with
TransformerLens's patching functions, and show how much of the clean behaviour each patch restores:
0 = the corrupt run, 1 = the clean run (raw metric values are kept in --json and in the trace).
With -o, both runs are recorded into a trace and the sweep is stored beside them.

--estimate CLEAN.hxr CORRUPT.hxr estimates the same sweeps with attribution patching from two traces
alone (no model, numpy only): (a_clean - a_corrupt) . gradient, the gradient recorded in the corrupt
trace by hexray record --grad METRIC, and AtP* for queries and keys (--sweep q|k: the softmax
recomputed from both traces' q and k). With --model as well, the real sweep runs too and the
correlation of the estimates with it is reported. --sweep features --dict D: every feature of the
dictionary at every position, (f_clean - f_corrupt) x (W_dec[f] . gradient at the dictionary's
output hook); the --top largest are shown."""

EPILOG = """\
examples:
  hexray patch --model gpt2 --clean "When Mary and John went to the store, John gave a drink to" \\
      --corrupt "When Mary and John went to the store, Mary gave a drink to" --target " Mary" --baseline " John" \\
      --sweep heads -o ioi.hxr
  hexray patch --model hexray-demo --clean "..." --corrupt "..." --sweep resid_pre --json
  hexray record --model gpt2 --prompt "$CORRUPT" --grad 'logit-diff:" Mary"," John"' --act-dtype float32 -o x.hxr
  hexray patch --estimate clean.hxr x.hxr --sweep heads-by-pos
  hexray patch --estimate clean.hxr x.hxr --sweep features --dict sae/ --top 10"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("patch", help="activation patching sweeps (clean -> corrupt)", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="as hexray record --model (default gpt2; with --estimate: also run the real sweep)")
    p.add_argument("--estimate", nargs=2, metavar=("CLEAN.hxr", "CORRUPT.hxr"),
                   help="attribution patching from two traces (the corrupt one recorded with --grad)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--clean", metavar="TEXT", help="the clean prompt")
    p.add_argument("--corrupt", metavar="TEXT", help="the corrupt prompt (same token count)")
    p.add_argument("--sweep", choices=SWEEP_CHOICES + ESTIMATE_ONLY, default="resid_pre",
                   help="resid_pre | attn_out | mlp_out (layer x position), heads | pattern (layer x head), "
                        "heads-by-pos (layer x position x head); with --estimate also q (layer x position x head) "
                        "and k (layer x position x kv head), AtP*, and features (with --dict) (default resid_pre)")
    p.add_argument("--dict", metavar="DIR", help="with --estimate --sweep features: the dictionary whose features "
                                                 "are estimated (as hexray features --dict)")
    p.add_argument("--top", type=int, default=20, metavar="N",
                   help="--sweep features: how many of the largest estimates to show (default 20)")
    p.add_argument("--target", help="the token the metric reads (default: the clean run's top prediction)")
    p.add_argument("--baseline", help="logit-diff's second token (default: the corrupt run's top prediction)")
    p.add_argument("--metric", choices=["logit-diff", "logit", "logprob"], default="logit-diff",
                   help="logit-diff = logit(target) - logit(baseline) (default), logit, or logprob of the target")
    p.add_argument("--position", type=int, default=-1, help="the position the metric reads (default -1)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="spread the sweep's forward passes over Ray workers (auto: $RAY_ADDRESS, else a local "
                        "cluster); each worker loads the model once")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="chunks of the sweep for --ray (default 2)")
    p.add_argument("-o", "--output", metavar="OUT.hxr", help="record both runs into this trace, with the sweep (with "
                                                             "--estimate: copy both traces' runs, with the estimate)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true",
                   help='print {"patch": {"sweep", "metric", "clean", "corrupt", "labels", "values"}}')
    return p


def run(args) -> int:
    if args.estimate:
        return run_estimate(args)
    if args.sweep in ESTIMATE_ONLY:
        raise HexRayError(f"--sweep {args.sweep} is an estimate from two traces: use it with --estimate CLEAN.hxr "
                          "CORRUPT.hxr")
    if args.dict:
        raise HexRayError("--dict goes with --estimate CLEAN.hxr CORRUPT.hxr --sweep features")
    args.model = args.model or "gpt2"
    if args.clean is None or args.corrupt is None:
        raise HexRayError("hexray patch needs --clean TEXT and --corrupt TEXT")
    from hexray_core.record.spec import check_output_path, precheck

    if args.output:
        check_output_path(args.output)
    precheck(args.model)
    with Progress(args.quiet) as progress:
        progress("status", message="importing torch and TransformerLens")
        rec = recorder_class()(args.model, device=args.device, dtype=args.dtype, progress=progress)
        from hexray_core.record.sweep import run_sweep

        spread = {}
        if args.ray is not None:
            import os

            from hexray_core.dataset.cluster import ray_map

            if args.workers < 1:
                raise HexRayError(f"--workers must be at least 1, not {args.workers}")
            spread = {"map_chunks": lambda fn, tasks: ray_map(fn, tasks, args.ray), "chunks": args.workers,
                      "model_ref": os.path.abspath(args.model) if os.path.exists(args.model) else args.model}
        result = run_sweep(rec, args.clean, args.corrupt, sweep=args.sweep, target=args.target,
                           baseline=args.baseline, metric=args.metric, position=args.position, progress=progress,
                           **spread)
        if args.output:
            import numpy as np

            from hexray_core.replay.patch_trace import PATCH_VALUES

            rec.record([args.clean, args.corrupt], args.output, progress=progress, act_dtype="float32",
                       extra_meta={"patch": result.meta()},
                       run_tensors={1: {PATCH_VALUES: result.values.astype(np.float32)}})
    if args.json:
        from hexray.cli import render

        render.print_json(result.to_json())
        return 0
    heatmap(result)
    if args.output:
        print(f"hexray: both runs and the sweep -> {args.output}")
    return 0


def run_estimate(args) -> int:
    """AtP from two traces (numpy only); with --model, the real sweep beside it."""
    import numpy as np

    from hexray_core.record.sweep import SweepResult
    from hexray_core.replay import open_trace
    from hexray_core.replay.atp import estimate

    if args.clean or args.corrupt or args.target or args.baseline:
        raise HexRayError("--estimate takes the prompts and the metric from the traces: drop --clean/--corrupt/"
                          "--target/--baseline")
    if args.output and args.sweep == "features":
        raise HexRayError("-o stores a layer x position or layer x head sweep; --sweep features prints its --top "
                          "features (use --json to keep them)")
    if (args.sweep == "features") != bool(args.dict):
        raise HexRayError("--sweep features needs --dict DIR (the dictionary), and --dict needs --sweep features")
    clean, corrupt = open_trace(args.estimate[0]), open_trace(args.estimate[1])
    if args.sweep == "features":
        return _feature_estimate(args, clean, corrupt)
    est = estimate(clean, corrupt)
    if args.sweep not in est:
        raise HexRayError(f"--sweep {args.sweep}: the traces lack what it needs (hooks or gradients); available: "
                          f"{', '.join(k for k in est if k not in ('metric', 'metric_value'))}")
    grad = est["metric"]
    ids = grad.get("token_ids") or []
    corrupt_value = est["metric_value"]
    cg = clean.meta.get("grad")
    clean_value = clean.run(0).info.get("grad", {}).get("metric_value") if isinstance(cg, dict) and \
        cg.get("spec") == grad.get("spec") else None
    values = np.asarray(est[args.sweep], dtype=np.float64)
    n_layers, n = corrupt.n_layers, corrupt.run(0).n_tokens
    axes = {"resid_pre": ["layer", "pos"], "attn_out": ["layer", "pos"], "mlp_out": ["layer", "pos"],
            "heads": ["layer", "head"], "heads-by-pos": ["layer", "pos", "head"], "pattern": ["layer", "head"],
            "q": ["layer", "pos", "head"], "k": ["layer", "pos", "head"]}[args.sweep]
    strs = corrupt.run(0).str_tokens
    labels = {"layer": [f"L{i}" for i in range(n_layers)]}
    if "pos" in axes:
        labels["pos"] = [f"{i}:{s!r}" for i, s in enumerate(strs[:n])]
    if "head" in axes:
        labels["head"] = [f"{'KV' if args.sweep == 'k' else 'H'}{h}" for h in range(values.shape[-1])]
    base = float(corrupt_value) if corrupt_value is not None else 0.0
    result = SweepResult(sweep=f"{args.sweep} (AtP{'*' if args.sweep in ESTIMATE_ONLY else ''} estimate)",
                         metric=f"{grad.get('spec')}", axes=axes, values=base + values,
                         clean_value=float(clean_value) if clean_value is not None else float("nan"),
                         corrupt_value=base, clean={"prompt": clean.run(0).prompt, "path": clean.path},
                         corrupt={"prompt": corrupt.run(0).prompt, "path": corrupt.path},
                         target=ids[0] if ids else None,
                         baseline=ids[1] if grad.get("kind") == "logit-diff" and len(ids) > 1 else None,
                         labels=labels)
    out = result.to_json()
    out["patch"]["estimate"] = values.tolist()
    if args.model:
        out["patch"]["real"] = _real_sweep(args, result, grad, values)
    if args.output:
        from hexray_core.replay.patch_trace import write_estimate_trace

        write_estimate_trace(clean, corrupt, args.output, result.meta(), result.values)
    if args.json:
        from hexray.cli import render

        render.print_json(out)
        return 0
    heatmap(result)
    if args.model:
        r = out["patch"]["real"]
        print(f"real sweep beside the estimates: Pearson r = {r['pearson']:.3f}, Spearman rho = {r['spearman']:.3f} "
              f"over {r['cells']} cells")
    if args.output:
        print(f"hexray: both runs and the estimate -> {args.output}")
    return 0


def _feature_estimate(args, clean, corrupt) -> int:
    """--sweep features: AtP of every feature at every position, the --top largest shown."""
    from hexray_core.replay.atp_features import feature_estimates, top_features
    from hexray_core.replay.dictionary import load_dictionary

    if args.model:
        raise HexRayError("--sweep features has no real sweep to compare with: drop --model")
    if args.top < 1:
        raise HexRayError(f"--top must be at least 1, not {args.top}")
    dset = load_dictionary(args.dict)
    est = feature_estimates(clean, corrupt, dset)
    strs = corrupt.run(0).str_tokens
    rows = [{"layer": layer, "position": p, "token": strs[p] if p < len(strs) else None, "feature": f,
             "label": dset[layer].labels.get(f), "estimate": v} for layer, p, f, v in top_features(est, args.top)]
    grad = corrupt.meta.get("grad") or {}
    if args.json:
        from hexray.cli import render

        render.print_json({"patch": {"sweep": "features (AtP estimate)", "metric": grad.get("spec"),
                                     "metric_value": corrupt.run(0).info.get("grad", {}).get("metric_value"),
                                     "dict": {"name": dset.name, "kind": dset.kind, "fingerprint": dset.fingerprint},
                                     "clean": {"prompt": clean.run(0).prompt, "path": clean.path},
                                     "corrupt": {"prompt": corrupt.run(0).prompt, "path": corrupt.path},
                                     "features": rows}})
        return 0
    print(f"AtP of {dset.name}'s features ({dset.kind}), metric {grad.get('spec')}: "
          f"(f_clean - f_corrupt) x W_dec[f] . gradient, the {len(rows)} largest")
    for r in rows:
        label = f"  {r['label']}" if r["label"] else ""
        where = f"pos {r['position']:>4} {r['token']!r:<14}"
        print(f"  L{r['layer']}F{r['feature']:<6} {where} {r['estimate']:+.4g}{label}")
    return 0


def _real_sweep(args, result, grad: dict, est) -> dict:
    """Run the real sweep of the same kind with the traces' prompts and metric; correlate."""
    if args.sweep in ESTIMATE_ONLY:
        raise HexRayError(f"--sweep {args.sweep} has no real sweep here to compare with (AtP* estimates only)")
    from hexray_core.record.sweep import run_sweep

    ids = grad.get("token_ids") or []
    with Progress(args.quiet) as progress:
        rec = recorder_class()(args.model, device=args.device, dtype=args.dtype, progress=progress)
        real = run_sweep(rec, result.clean["prompt"], result.corrupt["prompt"], sweep=args.sweep,
                         target=f"#{ids[0]}", baseline=f"#{ids[1]}" if grad.get("kind") == "logit-diff" else None,
                         metric=grad.get("kind"), position=int(grad.get("position", -1)), progress=progress)
    effect = real.values - real.corrupt_value
    return {"values": real.values.tolist(), "clean_value": real.clean_value, "corrupt_value": real.corrupt_value,
            "cells": int(effect.size), "pearson": pearson(est, effect), "spearman": spearman(est, effect)}


def pearson(a, b) -> float:
    import numpy as np

    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a, b) -> float:
    import numpy as np

    def ranks(x):  # tied values share their average rank
        x = np.ravel(x)
        r = np.empty(x.size)
        r[np.argsort(x, kind="stable")] = np.arange(x.size)
        _, inv = np.unique(x, return_inverse=True)
        return (np.bincount(inv, weights=r) / np.bincount(inv))[inv]
    return pearson(ranks(a), ranks(b))


# -- the terminal heatmap ----------------------------------------------------------------------------

def _grid(result) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels, column labels, normalised values) of a sweep as a 2-d grid."""
    v, lab = result.normalized, result.labels
    if result.axes == ["layer", "pos", "head"]:  # rows: each head of each layer; columns: positions
        rows = [f"{la}{h}" for la in lab["layer"] for h in lab["head"]]
        grid = [[float(x) for x in v[li, :, hi]] for li in range(v.shape[0]) for hi in range(v.shape[2])]
        return rows, lab["pos"], grid
    cols = lab["pos"] if result.axes[1] == "pos" else lab["head"]
    return lab["layer"], cols, [[float(x) for x in row] for row in v]


def heatmap(result, out=None) -> None:
    """Rows x columns of normalised values: numbers in a pipe, coloured cells on a terminal."""
    import sys

    out = out or sys.stdout
    rows, cols, grid = _grid(result)
    print(f"{result.sweep}: {result.metric}; clean {result.clean_value:+.3f}, corrupt {result.corrupt_value:+.3f} "
          "(cells: 0 = corrupt, 1 = clean)", file=out)
    w = max(len(r) for r in rows)
    tty = out.isatty()
    print(" " * w + " " + " ".join(f"{c[:5]:>5}" for c in (_short(c) for c in cols)), file=out)
    for label, vals in zip(rows, grid, strict=True):
        cells = [_cell(x, tty) for x in vals]
        print(f"{label:>{w}} " + " ".join(cells), file=out)


def _short(label: str) -> str:
    """Position labels are 'i:'token''; the column shows the index."""
    return label.split(":", 1)[0]


def _cell(x: float, tty: bool) -> str:
    if not math.isfinite(x):
        return "    -"
    text = f"{x:+5.2f}" if abs(x) < 10 else f"{x:+5.0f}"
    if not tty:
        return text
    shade = min(int(abs(x) * 5), 5)
    colour = (196, 203, 210, 217, 224, 231)[5 - shade] if x < 0 else (21, 27, 33, 39, 45, 231)[5 - shade]
    return f"\x1b[48;5;{colour}m{text}\x1b[0m"
