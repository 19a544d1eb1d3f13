"""`hexray graph`: an attribution graph of one position, from a trace and transcoders (numpy, no model).

Writes Neuronpedia's graph JSON (opens in Neuronpedia's and circuit-tracer's viewers); ``--json`` prints a
summary: node and edge counts, the top paths into the target logit, the QK tracing of the heads that write
most directly into it. The math is in ``hexray_core/replay/graph/``.
"""

from __future__ import annotations

import json
import os
import sys

from hexray_core.errors import HexRayError


def add_parser(sub) -> None:
    p = sub.add_parser("graph", help="attribution graph of a position (transcoders; Neuronpedia's JSON)",
                       description="Build the attribution graph of one position from a trace: active transcoder "
                                   "features, error nodes, token embeddings and logits, with the direct effects "
                                   "between them in the local replacement model (frozen attention and norms), "
                                   "pruned by influence as circuit-tracer does. Writes Neuronpedia's graph JSON.")
    p.add_argument("trace", help="a .hxr trace written by `hexray record`")
    p.add_argument("--transcoders", required=True, metavar="DIR",
                   help="transcoders: circuit-tracer's folder (config.yaml + layer_i.safetensors, or a cross-layer "
                        "set), or any transcoder `hexray features --dict` reads (SAELens, Gemma Scope, ...)")
    p.add_argument("--weights", metavar="FILE",
                   help="a .safetensors file with the attention weights (W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, "
                        "W_U, b_U; compatibility mode) where the trace's model kit lacks them")
    p.add_argument("--run", type=int, default=0, help="run (prompt) number (default 0)")
    p.add_argument("--position", type=int, default=-1, help="position of the logits; negative counts from the end")
    p.add_argument("--target", action="append", metavar="T",
                   help="a logit node for this token (text such as ' Paris', or '#id'); repeatable. Default: the top "
                        "logits covering 95%% of the probability, at most 10")
    p.add_argument("--max-feature-nodes", type=int, metavar="N", help="features given rows, most influential first "
                                                                      "(default: all active)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="cumulative node influence kept (default 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative edge influence kept (default 0.98)")
    p.add_argument("--max-nodes", type=int, metavar="N", help="at most N nodes after pruning")
    p.add_argument("--max-edges", type=int, metavar="N", help="at most N edges after pruning")
    p.add_argument("--batch-size", type=int, default=64, help="targets per backward pass (default 64)")
    p.add_argument("--qk", type=int, default=3, metavar="N",
                   help="QK-trace the N head/key pairs writing most into the top logit (default 3; 0: none; each "
                        "costs 2 x d_head backward passes, like as many feature rows)")
    p.add_argument("--dataset", metavar="DIR",
                   help="a recorded dataset (hexray record --prompts-file F -o DIR/): each kept feature's top "
                        "activating contexts over it go into the JSON, for the viewer's graph tab (one pass over the "
                        "dataset; the transcoders must load as a dictionary, as for hexray features --dict)")
    p.add_argument("--contexts", type=int, default=5, metavar="K",
                   help="with --dataset: top-activating contexts per feature (default 5)")
    p.add_argument("--top-logits", type=int, default=10, metavar="K",
                   help="tokens each kept feature promotes and suppresses most (decoder direction . W_U), written "
                        "into the JSON for the viewer (default 10; 0: none)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the graph JSON")
    p.add_argument("--json", action="store_true", help="print a JSON summary (nodes, edges, top paths)")


def _check(args) -> None:
    for name in ("node_threshold", "edge_threshold"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise HexRayError(f"--{name.replace('_', '-')} must be between 0 and 1, not {v}")
    for name in ("max_feature_nodes", "max_nodes", "max_edges", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise HexRayError(f"--{name.replace('_', '-')} must be at least 1, not {v}")
    if args.contexts < 1:
        raise HexRayError(f"--contexts must be at least 1, not {args.contexts}")
    if args.top_logits < 0:
        raise HexRayError(f"--top-logits must be 0 or more, not {args.top_logits}")
    if args.qk < 0:
        raise HexRayError(f"--qk must be 0 or more, not {args.qk}")


def _targets(values):
    out = []
    for t in values or []:
        if t.startswith("#") and t[1:].isdigit():
            out.append(int(t[1:]))
        else:
            out.append(t)
    return out


def _load_weights(path):
    if path is None:
        return None
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type, OSError, ...
        raise HexRayError(f"{path}: cannot read weights: {e}") from None


def run(args) -> int:
    from hexray_core.replay import open_trace
    from hexray_core.replay.graph import build_graph
    from hexray_core.replay.graph.qk import attach_qk, qk_unavailable
    from hexray_core.replay.graph.transcoders import as_transcoder_set

    _check(args)
    weights = _load_weights(args.weights)
    dataset = None
    if args.dataset:  # opened first: a wrong folder is one line before the graph's minutes, not after
        from hexray_core.dataset.reader import open_dataset

        dataset = open_dataset(args.dataset)
    with open_trace(args.trace) as trace:
        tset = as_transcoder_set(args.transcoders, trace.n_layers)
        if tset.model_name and tset.model_name != trace.model_name:
            if trace.meta.get("model", {}).get("source") == "hub":  # two hub ids: another model
                raise HexRayError(f"{args.transcoders}: transcoders for {tset.model_name}, but the trace recorded "
                                  f"{trace.model_name}")
            # A local folder's name says nothing about which model it holds: the shapes and hooks decide
            print(f"hexray: warning: {args.transcoders} names the model {tset.model_name}; the trace recorded the "
                  f"folder {trace.model_name} (checked by shapes and hooks only)", file=sys.stderr)
        full = build_graph(trace, tset, run=args.run, position=args.position, targets=_targets(args.target),
                           max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size, weights=weights)
        g = full.prune(args.node_threshold, args.edge_threshold, max_nodes=args.max_nodes, max_edges=args.max_edges)
        g.model = full.model
        g.meta["generation"] = {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": args.batch_size,
                                "max_feature_nodes": args.max_feature_nodes or full.meta["n_active_features"]}
        why = qk_unavailable(trace) if args.qk else None
        if why is not None:  # the graph stands without it: say so, once
            print(f"hexray: warning: no QK tracing: {why}", file=sys.stderr)
        elif args.qk:
            attach_qk(g, args.qk)
        doc = g.to_neuronpedia(slug=os.path.splitext(os.path.basename(args.output))[0] or "graph")
        if args.top_logits or args.dataset:
            from hexray_core.replay.graph.neuronpedia import feature_extras

            contexts = _contexts(args, dataset, g) if dataset is not None else None
            doc["hexray_features"] = feature_extras(g, max(args.top_logits, 0), contexts)
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        os.replace(tmp, args.output)
        summary = _summary(full, g, args.output)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        s = summary
        print(f"{s['output']}: {s['nodes']} nodes, {s['edges']} edges (of {s['unpruned_nodes']} nodes, "
              f"{s['unpruned_edges']} edges; {s['active_features']} active features)", file=sys.stdout)
        for p in s["top_paths"]:
            print(f"  {p['score']:.3f}  " + " -> ".join(p["labels"]))
    return 0


def _contexts(args, ds, g) -> dict:
    """(layer, feature) -> {"top_contexts", "density", "dataset"} of every kept feature, in one pass over the dataset
    (hexray_core.dataset.features, as `hexray features DATASET --dict DIR --feature ...`)."""
    from hexray_core.dataset.features import feature_stats
    from hexray_core.replay.dictionary import load_dictionary
    from hexray_core.replay.graph.neuronpedia import kept_features

    feats = kept_features(g)
    if not feats:
        return {}
    stats = feature_stats(ds, load_dictionary(args.transcoders), features=feats, k=args.contexts, m=0, logits=0)
    out = {}
    for layer, f in feats:
        e = stats.feature(layer, f)
        out[(layer, f)] = {"top_contexts": e["top_contexts"], "density": e["density"], "dataset": str(ds.path)}
    return out


def _summary(full, g, output: str) -> dict:
    def label(i):
        return g.node_id(i)

    return {
        "output": output, "nodes": g.n_nodes, "edges": g.n_edges, "unpruned_nodes": full.n_nodes,
        "unpruned_edges": full.n_edges, "active_features": full.meta["n_active_features"],
        "selected_features": full.meta["n_selected_features"], "position": g.position,
        "logits": [{"token": int(g.feature[i]), "text": g.meta["logit_strs"].get(int(g.feature[i])),
                    "probability": float(p)} for i, p in zip(g.logit_nodes, g.logit_probs, strict=True)],
        "top_paths": [{"score": s, "path": [label(i) for i in path], "labels": [g.label(i) for i in path]}
                      for s, path in g.paths(k=5)],
        "qk_tracing": [{k: r[k] for k in ("layer", "head", "query", "key", "score", "recorded_score", "bias")}
                       for r in g.qk],
        "drift": full.meta["drift"],
    }
