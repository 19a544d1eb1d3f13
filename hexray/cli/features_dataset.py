"""`hexray features DATASET/ --dict DIR [--feature L3F1234]`: what features mean, over a recorded dataset."""

from __future__ import annotations

import os
import sys

from hexray_core.errors import HexRayError


def add_arguments(p) -> None:
    """The options that apply when `hexray features` is given a dataset folder."""
    g = p.add_argument_group("over a dataset (hexray features DATASET/ ...)")
    g.add_argument("--feature", action="append", metavar="L3F1234",
                   help="a feature to describe (repeatable; default: every feature of the dictionary's layers, the "
                        "--top-k densest shown)")
    g.add_argument("--contexts", type=int, default=10, metavar="K", help="top-activating contexts per feature "
                                                                         "(default 10)")
    g.add_argument("--examples", type=int, metavar="M",
                   help="examples per activation interval (quantile examples; default 3 with --feature, 0 for the "
                        "whole dictionary: each kept example holds a window of tokens, per feature and interval)")
    g.add_argument("--jobs", type=int, metavar="N", help="processes (default: one per CPU, at most one per shard)")
    g.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="reduce the shards as Ray tasks (auto: $RAY_ADDRESS, else a local cluster)")


def run(args, top_k: int | None) -> int:
    from hexray.cli import render
    from hexray_core.dataset.features import feature_stats, parse_feature
    from hexray_core.dataset.reader import open_dataset
    from hexray_core.replay.dictionary import load_dictionary

    if args.jobs is not None and args.jobs < 1:
        raise HexRayError(f"--jobs must be at least 1, not {args.jobs}")
    features = [parse_feature(f) for f in args.feature] if args.feature else None
    ds = open_dataset(args.trace)
    dset = load_dictionary(args.dict)
    if args.ray is not None:
        from hexray_core.dataset.cluster import ray_map

        def mapper(fn, tasks):
            return ray_map(fn, tasks, args.ray)
    else:
        jobs = args.jobs or min(os.cpu_count() or 1, sum(1 for _ in ds.shards()))

        def mapper(fn, tasks):
            from hexray_core.dataset.aggregate import local_map

            return local_map(fn, tasks, jobs)
    examples = args.examples if args.examples is not None else (3 if features else 0)
    stats = feature_stats(ds, dset, layers=args.layer, features=features, k=args.contexts, m=examples,
                          logits=args.logits, top=top_k, map=mapper)
    if not ds.complete:
        print(f"hexray: warning: {ds.path} is incomplete (its last recording was interrupted); reading the runs "
              "recorded", file=sys.stderr)
    doc = stats.to_dict(top=top_k)
    if args.json:
        render.print_json({"feature_stats": doc})
        return 0
    con = render.console()
    con.line(f"Dataset: {doc['dataset']}")
    con.line(f"Dictionary: {dset.name} ({dset.kind}; trained on {dset.space})")
    for layer in doc["layers"]:
        con.line()
        con.line(f"Layer {layer['layer']}  {layer['hook']}: {layer['n_tokens']} tokens in {layer['n_runs']} runs, "
                 f"{layer['n_fired']} of {layer['n_features']} features fired")
        for f in layer["features"]:
            _feature(con, render, f)
    return 0


def _feature(con, render, f: dict) -> None:
    con.line()
    label = f"  {f['explanation']}" if "explanation" in f else ""
    con.line(f"{f['label']}: density {f['density']:.3%} ({f['n_active']} tokens), max {f['max']:.3f}, "
             f"mean when active {f['mean_active']:.3f}{label}")
    if f.get("top_logits"):
        con.line("  promotes " + " ".join(render.q(t) for _, t, _ in f["top_logits"][:5])
                 + "   suppresses " + " ".join(render.q(t) for _, t, _ in f["bottom_logits"][:3]))
    h = f["histogram"]
    bars = [(lo, c) for lo, c in zip(h["edges"], h["counts"], strict=False) if c]
    if bars:
        peak = max(c for _, c in bars)
        con.line("  histogram (log bins): " + "  ".join(f"≥{lo:.3g}:{'█' * max(1, round(8 * c / peak))}{c}"
                                                         for lo, c in bars))
    for c in f["top_contexts"]:
        con.line(f"  {c['activation']:8.3f}  {c['id']!s:>8}  {_context(render, c)}")
    for q in f["quantile_examples"]:
        if q["examples"]:
            lo, hi = q["range"]
            con.line(f"  interval [{lo:.3g}, {hi:.3g}) ({q['count']} tokens): "
                     + " | ".join(_context(render, e) for e in q["examples"]))


def _context(render, c: dict) -> str:
    """The window with the peak token bracketed: ... " the" [" cat"] " sat" ..."""
    at = c["position"] - c["start"]
    return "".join(f"[{t}]" if i == at else t for i, t in enumerate(c["tokens"])).replace("\n", "⏎")
