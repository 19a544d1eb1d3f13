"""`hexray replay`: every view of a recording, from the trace alone (no torch)."""

from __future__ import annotations

import argparse

from hexray_core.errors import HexRayError
from hexray_core.replay.attribution import BY_CHOICES


def add_view_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `hexray replay` and the one-shot `hexray --prompt` mode."""
    p.add_argument("--run", type=int, default=0, help="run (prompt) number in the trace (default 0)")
    p.add_argument("--position", type=int, default=-1, help="token position; negative counts from the end (default -1)")
    p.add_argument("--target", help="token to explain: 'top' (the model's top prediction, default), 'next' "
                                    "(the actual next token), a token's text such as ' Paris', or '#id'")
    p.add_argument("--baseline", help="explain the logit difference target − baseline (a token's text or '#id')")
    p.add_argument("--by", choices=BY_CHOICES, default="component",
                   help="split attention layers into heads, or MLP layers into neurons (needs the model kit)")
    p.add_argument("--lens", action="store_true", help="logit lens: top tokens after every layer")
    p.add_argument("--resid", action="store_true", help="residual-stream norms and per-layer writes")
    p.add_argument("--attention", action="store_true", help="heads that attend most at the position, and to what")
    p.add_argument("--cot", action="store_true", help="chain-of-thought breakdown: per-step attribution and attention")
    p.add_argument("--split", choices=["auto", "lines", "sentences"], default="auto",
                   help="how --cot splits the text into steps (default: lines if several, else sentences)")
    p.add_argument("--step-regex", help="split --cot steps where this regex matches, e.g. 'Step \\d+:'")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="attribution, logit lens, attention, residual and CoT views from a trace",
                       description="Analyse a recorded trace. By default: the top contributors to the logit of the "
                                   "model's prediction at the last position of the first run. Shares are "
                                   "|contribution| / Σ|contribution| over every part (not only the rows shown).")
    p.add_argument("trace", help="a .hxr trace written by `hexray record`")
    p.add_argument("--top-k", type=int, default=10, help="rows to show (default 10)")
    add_view_options(p)


def run(args) -> int:
    from hexray_core.replay import open_trace

    if args.top_k < 1:
        raise HexRayError(f"--top-k must be at least 1, not {args.top_k}")
    with open_trace(args.trace) as trace:
        show(trace, args, args.top_k)
    return 0


def show(trace, args, top_k: int, *, always_attribution: bool = False, shares_of_shown: bool = False) -> None:
    """Compute and print the views the options ask for (attribution unless another view is chosen)."""
    from hexray_core.cli import render

    views = [v for v in ("lens", "resid", "attention", "cot") if getattr(args, v)]
    results = {}
    if always_attribution or not views or args.target or args.baseline or args.by != "component":
        results["attribution"] = trace.attribution(args.position, args.run, target=args.target,
                                                   baseline=args.baseline, by=args.by)
    if "lens" in views:
        results["lens"] = trace.logit_lens(args.position, args.run, target=args.target, top_k=top_k)
    if "resid" in views:
        results["resid"] = trace.residual(args.run)
    if "attention" in views:
        results["attention"] = trace.attention(args.position, args.run, top_heads=top_k)
    if "cot" in views:
        results["cot"] = trace.cot(args.run, mode=args.split, step_regex=args.step_regex)

    if args.json:
        out = {}
        for key, value in results.items():
            out[key] = value.to_dict(top=top_k) if key == "attribution" else value.to_dict()
        render.print_json(out)
        return
    con = render.console()
    position = trace.run(args.run).position(args.position)
    for i, (key, value) in enumerate(results.items()):
        if i:
            con.line()
        if key == "attribution":
            render.attribution(con, value, top_k, position_label=args.position, shares_of_shown=shares_of_shown)
        elif key == "lens":
            render.lens(con, value, top_k)
        elif key == "resid":
            render.residual(con, value, position)
        elif key == "attention":
            render.attention(con, value)
        elif key == "cot":
            render.cot(con, value, top_k)
