"""`hexray diff`: per-component attribution of two runs or two traces, side by side."""

from __future__ import annotations

from hexray_core.errors import HexRayError
from hexray_core.replay.attribution import BY_CHOICES


def add_parser(sub) -> None:
    p = sub.add_parser("diff", help="compare the attribution of two runs or two traces",
                       description="Attribute the same target on two sides and list the largest changes. "
                                   "`hexray diff a.hxr b.hxr` compares run 0 of each; `hexray diff a.hxr --runs 0 1` "
                                   "compares two runs of one trace.")
    p.add_argument("a", help="a trace")
    p.add_argument("b", nargs="?", help="a second trace (default: the same as A)")
    p.add_argument("--runs", type=int, nargs=2, metavar=("A", "B"), default=None, help="run numbers (default 0 0, "
                   "or 0 1 for a single trace)")
    p.add_argument("--position", type=int, default=-1, help="token position on both sides (default -1)")
    p.add_argument("--target", help="token to explain on both sides (default: A's top prediction)")
    p.add_argument("--baseline", help="explain target − baseline instead")
    p.add_argument("--by", choices=BY_CHOICES, default="component")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from hexray.cli import render
    from hexray_core.replay import attribution_diff, open_trace

    if args.top_k < 1:
        raise HexRayError(f"--top-k must be at least 1, not {args.top_k}")
    ta = open_trace(args.a)
    tb = open_trace(args.b) if args.b else ta
    runs = args.runs or ((0, 0) if args.b else (0, 1))
    d = attribution_diff(ta, tb, run_a=runs[0], run_b=runs[1], position_a=args.position, position_b=args.position,
                         target=args.target, baseline=args.baseline, by=args.by)
    if args.json:
        render.print_json(d.to_dict(top=args.top_k))
    else:
        render.diff(render.console(), d, args.top_k)
    return 0
