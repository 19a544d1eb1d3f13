"""`hexray features`: the active features of a trace at one position, through a dictionary (numpy only)."""

from __future__ import annotations

import os

from hexray_core.errors import HexRayError


def add_parser(sub) -> None:
    p = sub.add_parser("features", help="a trace's active features through sparse autoencoders or transcoders",
                       description="The features active at a position, strongest first, each with its activation, "
                                   "the tokens its decoder direction promotes and suppresses (through the "
                                   "unembedding, from the model kit) and its label where the dictionary ships "
                                   "explanations. The trace is read in the dictionary's own activation space.")
    p.add_argument("trace", help="a .hxr trace written by `hexray record`, or a dataset folder (what each feature "
                                 "means over it: top contexts, density, histogram)")
    p.add_argument("--dict", required=True, metavar="DIR",
                   help="SAELens folder, circuit-tracer transcoders (config.yaml), Gemma Scope params.npz / "
                        "params.safetensors, Llama Scope folder, hf://REPO/PATH or sae-lens:RELEASE/ID")
    p.add_argument("--layer", type=int, action="append", help="only this layer (repeatable; default: every layer "
                                                              "the dictionary has)")
    p.add_argument("--position", type=int, default=-1, help="token position; negative counts from the end (default -1)")
    p.add_argument("--run", type=int, default=0, help="run (prompt) number in the trace (default 0)")
    p.add_argument("--top-k", default="10", help="features to show per layer, or 'all' (default 10)")
    p.add_argument("--logits", type=int, default=5, help="top and bottom logits per feature (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    from hexray.cli import features_dataset

    features_dataset.add_arguments(p)


def _top_k(text: str) -> int | None:
    if text == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise HexRayError(f"--top-k must be a positive number or 'all', not {text!r}")
    return k


def report(trace, dset, *, run: int = 0, position: int = -1, layers=None, top_k: int | None = 10,
           logits: int = 5) -> dict:
    """The `--json` document: {"features": {"position", "dict", "layers": [...]}}."""
    from hexray_core.replay.features import feature_logits, features_at, reconstruction_error
    from hexray_core.replay.missing import MissingHook

    r = trace.run(run)
    p = r.position(position)
    chosen = sorted(dset.layers) if not layers else [x + trace.n_layers if x < 0 else x for x in layers]
    out_layers = []
    for layer in chosen:
        d = dset[layer]
        idx, val = features_at(r, dset, layer, p)
        shown = idx if top_k is None else idx[:top_k]
        explained = feature_logits(trace, d, shown, k=logits) if logits > 0 else [([], [])] * len(shown)
        active = []
        for j, v, (top, bottom) in zip(shown, val, explained, strict=False):
            entry = {"feature": int(j), "label": f"L{layer}F{int(j)}", "activation": float(v), "top_logits": top,
                     "bottom_logits": bottom}
            if int(j) in d.labels:
                entry["explanation"] = d.labels[int(j)]
            active.append(entry)
        try:
            error = reconstruction_error(r, dset, layer, p)
        except MissingHook:  # features stored by `record --dict` without the hooks the dictionary reads
            error = None
        out_layers.append({"layer": layer, "hook": d.hook_in, "active": active, "l0": int(len(idx)),
                           "error_norm": error})
    return {"features": {"position": p, "token": r.labels[p], "run": r.id, "dict": dset.path, "kind": dset.kind,
                         "space": str(dset.space), "layers": out_layers}}


def run(args) -> int:
    from hexray.cli import render
    from hexray_core.replay import open_trace
    from hexray_core.replay.dictionary import load_dictionary

    top_k = _top_k(args.top_k)
    if args.logits < 0:
        raise HexRayError(f"--logits must be 0 or more, not {args.logits}")
    if os.path.isdir(args.trace):
        from hexray.cli import features_dataset

        return features_dataset.run(args, top_k)
    if args.feature or args.ray is not None:
        raise HexRayError("--feature and --ray read a dataset folder (hexray record --prompts-file FILE -o DIR/), "
                          f"not a trace: {args.trace}")
    dset = load_dictionary(args.dict)
    with open_trace(args.trace) as trace:
        doc = report(trace, dset, run=args.run, position=args.position, layers=args.layer, top_k=top_k,
                     logits=args.logits)
    if args.json:
        render.print_json(doc)
        return 0
    f = doc["features"]
    con = render.console()
    con.line(f"Token: {render.q(f['token'])} (position {f['position']}, run {f['run']})")
    con.line(f"Dictionary: {dset.name} ({dset.kind}; read as trained, {dset.space})")
    for layer in f["layers"]:
        con.line()
        error = "" if layer["error_norm"] is None else f", reconstruction error norm {layer['error_norm']:.3g}"
        con.line(f"Layer {layer['layer']}  {layer['hook']}: {layer['l0']} active{error}")
        for a in layer["active"]:
            top = " ".join(render.q(t) for _, t, _ in a["top_logits"][:5])
            bottom = " ".join(render.q(t) for _, t, _ in a["bottom_logits"][:3])
            label = f"  {a['explanation']}" if "explanation" in a else ""
            promotes = f"  + {top}" if top else ""
            suppresses = f"  − {bottom}" if bottom else ""
            con.line(f"- {a['label']:<10} {a['activation']:8.3f}{promotes}{suppresses}{label}")
    return 0
