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
    p.add_argument("--by", choices=(*BY_CHOICES, "source"), default="component",
                   help="split attention layers into heads, or MLP layers into neurons; 'feature': MLPs (or the "
                        "residual) into a dictionary's features (--dict); 'source': the earlier tokens the heads "
                        "carried into the prediction (with --cot: per step). Needs the model kit")
    p.add_argument("--head", help="with --by source: only this head, e.g. L3H2")
    p.add_argument("--dict", metavar="DIR", help="with --by feature: a dictionary of features (SAELens folder, "
                                                 "circuit-tracer transcoders, Gemma/Llama Scope file, hf://...)")
    p.add_argument("--layer", type=int, help="with --by feature and a residual SAE set: its layer (default: last)")
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
    from hexray.cli import render

    views = [v for v in ("lens", "resid", "attention", "cot") if getattr(args, v)]
    results = {}
    by_source = args.by == "source"
    if getattr(args, "head", None) and not by_source:
        raise HexRayError("--head goes with --by source")
    if args.by == "feature" and not getattr(args, "dict", None):
        raise HexRayError("--by feature needs --dict DIR (a sparse autoencoder or transcoders)")
    if getattr(args, "dict", None) and args.by != "feature":
        raise HexRayError("--dict goes with --by feature (or use `hexray features`)")
    extra = {"dictionary": args.dict, "layer": args.layer} if args.by == "feature" else {}
    if by_source and not (views == ["cot"] and not (args.target or args.baseline)):
        results["sources"] = source_table(trace, args, top_k)
    elif always_attribution or not views or args.target or args.baseline or args.by not in ("component", "source"):
        results["attribution"] = trace.attribution(args.position, args.run, target=args.target,
                                                   baseline=args.baseline, by=args.by, **extra)
    if "lens" in views:
        results["lens"] = trace.logit_lens(args.position, args.run, target=args.target, top_k=top_k)
    if "resid" in views:
        results["resid"] = trace.residual(args.run)
    if "attention" in views:
        results["attention"] = trace.attention(args.position, args.run, top_heads=top_k)
    if "cot" in views:
        results["cot"] = trace.cot(args.run, mode=args.split, step_regex=args.step_regex, sources=by_source)

    if args.json:
        out = {}
        for key, value in results.items():
            out[key] = value.to_dict(top=top_k) if key == "attribution" else value if key == "sources" else \
                value.to_dict()
        render.print_json(out)
        return
    con = render.console()
    position = trace.run(args.run).position(args.position)
    for i, (key, value) in enumerate(results.items()):
        if i:
            con.line()
        if key == "attribution":
            render.attribution(con, value, top_k, shares_of_shown=shares_of_shown)
        elif key == "lens":
            render.lens(con, value, top_k)
        elif key == "resid":
            render.residual(con, value, position)
        elif key == "attention":
            render.attention(con, value)
        elif key == "cot":
            render.cot(con, value, top_k)
        elif key == "sources":
            render.sources(con, value)


def source_table(trace, args, top_k: int) -> dict:
    """`--by source`: the source tokens ranked by what they supplied through all heads (or `--head`), each with
    its strongest heads; completeness against the heads' attribution from hook_z."""
    import re

    import numpy as np

    from hexray_core.replay.attribution import head_results, target_logit

    sa = trace.sources(args.position, args.run, target=args.target, baseline=args.baseline)
    run = trace.run(args.run)
    values = sa.values  # [layers, heads, sources]
    n_layers, n_heads, _ = values.shape
    head = None
    if args.head:
        m = re.fullmatch(r"L(\d+)H(\d+)", args.head.strip())
        if not m or int(m.group(1)) >= n_layers or int(m.group(2)) >= n_heads:
            raise HexRayError(f"--head {args.head!r}: give a head as L<layer>H<head>, layers 0..{n_layers - 1}, "
                              f"heads 0..{n_heads - 1}")
        head = (int(m.group(1)), int(m.group(2)))
    per_source = values[head[0], head[1]] if head else values.sum((0, 1))
    order = np.argsort(-np.abs(per_source), kind="stable")[:top_k]
    rows = []
    for s in order:
        flat = values[:, :, s].reshape(-1)
        best = [] if head else np.argsort(-np.abs(flat), kind="stable")[:3]
        rows.append({"position": int(s), "token": run.labels[s], "value": float(per_source[s]),
                     "heads": [{"head": f"L{i // n_heads}H{i % n_heads}", "value": float(flat[i])} for i in best]})
    # Σ over sources against each head's own attribution (z @ W_O · u): the decomposition is exact
    u, bias = _direction(trace, sa)
    logit, logit_source, prob = target_logit(trace, run.id, sa.position, sa.target_id, sa.baseline_id, u, bias)
    heads = np.stack([head_results(trace, run.id, layer, sa.position) @ u for layer in range(n_layers)])
    want = float(heads[head] if head else heads.sum())
    got = float(per_source.sum())
    return {"position": sa.position, "token": run.labels[sa.position], "target": sa.target, "target_id": sa.target_id,
            "baseline": None if sa.baseline_id is None else trace.token_str(sa.baseline_id, run.id),
            "logit": logit, "logit_source": logit_source, "probability": prob,
            "head": args.head and f"L{head[0]}H{head[1]}", "rows": rows, "total": got, "heads_total": want,
            "error": abs(got - want), "n_sources": int(values.shape[-1])}


def _direction(trace, sa):
    from hexray_core.replay.attribution import final_direction

    return final_direction(trace, sa.run, sa.position, sa.target_id, sa.baseline_id)
