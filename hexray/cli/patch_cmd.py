"""`hexray patch`: activation patching sweeps (TransformerLens's functions on the bridge), and attribution
patching estimated from two traces (``--estimate``, numpy only)."""

from __future__ import annotations

import argparse
import math

from hexray.cli.record_support import Progress, recorder_class
from hexray_core.errors import HexRayError

SWEEP_CHOICES = ("resid_pre", "attn_out", "mlp_out", "heads", "heads-by-pos", "pattern")

DESCRIPTION = """\
Patch the clean run's activations into the corrupt run, one layer/position/head at a time, with
TransformerLens's patching functions, and show how much of the clean behaviour each patch restores:
0 = the corrupt run, 1 = the clean run (raw metric values are kept in --json and in the trace).
With -o, both runs are recorded into a trace and the sweep is stored beside them."""

EPILOG = """\
examples:
  hexray patch --model gpt2 --clean "When Mary and John went to the store, John gave a drink to" \\
      --corrupt "When Mary and John went to the store, Mary gave a drink to" --target " Mary" --baseline " John" \\
      --sweep heads -o ioi.hxr
  hexray patch --model hexray-demo --clean "..." --corrupt "..." --sweep resid_pre --json"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("patch", help="activation patching sweeps (clean -> corrupt)", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="as hexray record --model (default gpt2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--clean", metavar="TEXT", help="the clean prompt")
    p.add_argument("--corrupt", metavar="TEXT", help="the corrupt prompt (same token count)")
    p.add_argument("--sweep", choices=SWEEP_CHOICES, default="resid_pre",
                   help="resid_pre | attn_out | mlp_out (layer x position), heads | pattern (layer x head), "
                        "heads-by-pos (layer x position x head) (default resid_pre)")
    p.add_argument("--target", help="the token the metric reads (default: the clean run's top prediction)")
    p.add_argument("--baseline", help="logit-diff's second token (default: the corrupt run's top prediction)")
    p.add_argument("--metric", choices=["logit-diff", "logit", "logprob"], default="logit-diff",
                   help="logit-diff = logit(target) - logit(baseline) (default), logit, or logprob of the target")
    p.add_argument("--position", type=int, default=-1, help="the position the metric reads (default -1)")
    p.add_argument("-o", "--output", metavar="OUT.hxr", help="record both runs into this trace, with the sweep")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true",
                   help='print {"patch": {"sweep", "metric", "clean", "corrupt", "labels", "values"}}')
    return p


def run(args) -> int:
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

        result = run_sweep(rec, args.clean, args.corrupt, sweep=args.sweep, target=args.target,
                           baseline=args.baseline, metric=args.metric, position=args.position, progress=progress)
        if args.output:
            import numpy as np

            rec.record([args.clean, args.corrupt], args.output, progress=progress, act_dtype="float32",
                       extra_meta={"patch": result.meta()},
                       run_tensors={1: {"hexray.patch_values": result.values.astype(np.float32)}})
    if args.json:
        from hexray.cli import render

        render.print_json(result.to_json())
        return 0
    heatmap(result)
    if args.output:
        print(f"hexray: both runs and the sweep -> {args.output}")
    return 0


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
