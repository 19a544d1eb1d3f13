"""`hexray aggregate OUT/`: attribution statistics over every run of a recorded dataset (no torch)."""

from __future__ import annotations

import argparse
import csv
import os
import sys

from hexray_core.errors import HexRayError
from hexray_core.replay.attribution import BY_CHOICES

DESCRIPTION = """\
Attribute each run's own target (its row's "target"/"baseline" in the prompts file, else --target /
--baseline, else the model's top prediction) at --position, then give per component (or head, or
neuron) the mean, standard deviation, 95% confidence interval of the mean (Student t) and the
fraction of runs where it is positive, sorted by |mean|. Memory does not grow with the number of
runs; shards are reduced in parallel (local processes, or Ray tasks with --ray)."""


def add_parser(sub) -> None:
    p = sub.add_parser("aggregate", help="attribution statistics over every run of a recorded dataset",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: hexray aggregate out/ --by head --position -1 --top-k 15")
    p.add_argument("dataset", help="a folder written by hexray record --prompts-file FILE -o DIR/")
    p.add_argument("--by", choices=BY_CHOICES, default="component", help="component (default), head or neuron")
    p.add_argument("--position", type=int, default=-1, help="token position in each run (default -1, the last)")
    p.add_argument("--target", help="target for rows without one: top (default), next, a token's text, or '#id'")
    p.add_argument("--baseline", help="baseline for rows without one (explain target − baseline)")
    p.add_argument("--top-k", type=int, metavar="N", help="rows to show (default: 20 in the table, all in JSON/CSV)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    p.add_argument("--jobs", type=int, metavar="N", help="processes (default: one per CPU, at most one per shard)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="reduce the shards as Ray tasks (auto: $RAY_ADDRESS, else a local cluster)")


def run(args) -> int:
    from hexray_core.dataset.reader import open_dataset

    if args.top_k is not None and args.top_k < 1:
        raise HexRayError(f"--top-k must be at least 1, not {args.top_k}")
    if args.jobs is not None and args.jobs < 1:
        raise HexRayError(f"--jobs must be at least 1, not {args.jobs}")
    ds = open_dataset(args.dataset)
    if args.ray is not None:
        from hexray_core.dataset.cluster import ray_map

        def mapper(fn, tasks):
            return ray_map(fn, tasks, args.ray)
    else:
        jobs = args.jobs or min(os.cpu_count() or 1, _count_shards(ds))

        def mapper(fn, tasks):
            from hexray_core.dataset.aggregate import local_map

            return local_map(fn, tasks, jobs)
    from hexray.cli.record_support import ray_quietly

    with ray_quietly(args.ray is not None):  # Ray's native log lines go to a file, not the terminal
        agg = ds.aggregate(by=args.by, position=args.position, target=args.target, baseline=args.baseline,
                           map=mapper)
    if not ds.complete:
        print(f"hexray: warning: {ds.path} is incomplete (its last recording was interrupted); "
              f"aggregating the {agg.n} runs recorded", file=sys.stderr)
    if args.json:
        from hexray.cli import render

        render.print_json({"aggregate": agg.to_dict(top=args.top_k)})
    elif args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["label", "mean", "std", "ci95_low", "ci95_high", "frac_positive", "n"])
        for r in agg.rows[:args.top_k]:
            w.writerow([r["label"], _num(r["mean"]), _num(r["std"]), _num(r["ci95"][0]), _num(r["ci95"][1]),
                        _num(r["frac_positive"]), agg.n])
    else:
        from hexray.cli import render

        render.aggregate(render.console(), agg, args.top_k or 20)
    return 0


def _num(v: float) -> str:
    return "" if v != v else repr(float(v))  # NaN (a single run's std) as an empty cell


def _count_shards(ds) -> int:
    return max(1, sum(1 for _ in ds.shards()))
