"""Neuronpedia's graph JSON (the format circuit-tracer's ``create_graph_files`` writes and both viewers open).

Node ids, ``feature`` (Cantor pairing of layer and feature index; -1 for errors, the position for tokens),
``jsNodeId`` and ``feature_type`` follow circuit-tracer's ``frontend/graph_models.py``; ``influence`` is its
cumulative influence score. The schema is vendored beside this module
(``graph-schema.json``, Neuronpedia, Apache-2.0: ``graph-schema.LICENSE``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from .graph import ERROR, FEATURE, LOGIT, TOKEN, Graph

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "graph-schema.json")


def cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


def _node(g: Graph, i: int) -> dict:
    k, lay, p, f = int(g.kind[i]), int(g.layer[i]), int(g.pos[i]), int(g.feature[i])
    infl = None if g.influence is None else float(g.influence[i])
    node = {"node_id": g.node_id(i), "ctx_idx": p, "influence": infl, "clerp": ""}
    if k == FEATURE:
        node.update(feature=cantor(lay, f), layer=str(lay), feature_type="cross layer transcoder",
                    jsNodeId=f"{lay}_{f}-0", activation=float(g.activation[i]))
    elif k == ERROR:
        node.update(feature=-1, layer=str(lay), feature_type="mlp reconstruction error", jsNodeId=f"{lay}_{p}-0",
                    activation=None)
    elif k == TOKEN:
        node.update(feature=p, layer="E", feature_type="embedding", jsNodeId=f"E_{f}-{p}", activation=None,
                    clerp=f'Emb: "{g.token_strs[p]}"')
    else:
        j = int(list(g.logit_nodes).index(i))
        prob = float(g.logit_probs[j])
        node.update(feature=f, layer=str(g.n_layers + 1), feature_type="logit", jsNodeId=f"L_{f}-{p}",
                    activation=None, token_prob=prob, is_target_logit=j == 0,
                    clerp=f'Output "{g.meta.get("logit_strs", {}).get(f, f)}" (p={prob:.3f})')
    return node


def to_neuronpedia(g: Graph, *, slug: str = "hexray-graph", qk: bool = True) -> dict:
    """The graph as Neuronpedia's JSON (prune first: this writes every node and edge it is given)."""
    if g.influence is None:
        g.compute_influence()
    nodes = [_node(g, i) for i in range(g.n_nodes)]
    ids = [n["node_id"] for n in nodes]
    links = [{"source": ids[s], "target": ids[t], "weight": float(w)}
             for t, s, w in zip(g.tgt.tolist(), g.src.tolist(), g.weight.tolist(), strict=True)]
    pruning = g.meta.get("pruning") or {}
    out = {
        "metadata": {
            "slug": slug, "scan": g.scan, "prompt_tokens": list(g.token_strs), "prompt": g.prompt,
            "node_threshold": pruning.get("node_threshold", 0.8),
            "info": {"generator": {"name": "hexray graph", "url": "https://github.com/hexray"},
                     "create_time_ms": int(time.time() * 1000),
                     "description": f"run {g.meta.get('run', 0)}, position {g.position}; "
                                    f"transcoders {g.meta.get('transcoders')} ({g.meta.get('space')} space)"},
            "generation_settings": {k: v for k, v in g.meta.get("generation", {}).items()},
            "pruning_settings": {k: v for k, v in pruning.items() if k in ("node_threshold", "edge_threshold")},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
    if qk and g.qk:
        extra: dict[str, dict] = {}
        for res in g.qk:
            for nid, desc in res.get("nodes", {}).items():
                if nid not in ids:
                    extra[nid] = desc
        target = g.qk[0].get("attach")
        if target in ids:
            nodes[ids.index(target)]["qk_tracing_results"] = g.qk[0]["results"]
        out["qk_only_nodes"] = extra
        out["hexray_qk_tracing"] = [{k: v for k, v in r.items() if k != "nodes"} for r in g.qk]
    return out


def feature_key(layer: int, feature: int) -> str:
    """The key of a feature in ``hexray_features`` (what the viewer looks a clicked node up by)."""
    return f"{layer}_{feature}"


def kept_features(g: Graph) -> list[tuple[int, int]]:
    """(layer, feature index) of every feature the graph keeps, once each (a feature can fire at many positions)."""
    idx = np.nonzero(g.kind == FEATURE)[0]
    return sorted({(int(g.layer[i]), int(g.feature[i])) for i in idx})


def feature_extras(g: Graph, k: int = 10, contexts: dict | None = None) -> dict:
    """``hexray_features`` of the JSON: per kept feature, the ``k`` tokens its decoder direction promotes and
    suppresses most through the unembedding (``[[id, text, value]]``, as ``hexray features`` prints them), and
    its top-activating contexts over a dataset where ``contexts`` holds them. Top-level keys beside the schema's
    are allowed by it (it sets no ``additionalProperties``); Neuronpedia's viewer ignores them.

    A cross-layer feature's direction is the sum of what it writes into every layer; LayerNorm models centre it
    (the final norm removes the mean of whatever is written), as ``hexray_core.replay.features.feature_logits``."""
    model = g.model
    W_U = np.asarray(model.w["W_U"], np.float32)  # [d, V]
    k = min(k, W_U.shape[1])
    out: dict = {}
    feats = kept_features(g)
    for layer in sorted({lay for lay, _ in feats}):
        ids = np.array([f for lay, f in feats if lay == layer], np.int64)
        w = np.asarray(model.tc.layers[layer].W_dec[ids], np.float32)
        if w.ndim == 3:
            w = w.sum(1)
        if model.ln:
            w = w - w.mean(-1, keepdims=True)
        logits = w @ W_U
        for f, row in zip(ids.tolist(), logits, strict=True):
            top = np.argsort(-row, kind="stable")[:k]
            bot = np.argsort(row, kind="stable")[:k]
            entry = {"top_logits": [[int(i), model.trace.token_str(int(i)), float(row[i])] for i in top],
                     "bottom_logits": [[int(i), model.trace.token_str(int(i)), float(row[i])] for i in bot]}
            if contexts and (layer, f) in contexts:
                entry.update(contexts[(layer, f)])
            out[feature_key(layer, f)] = entry
    return out


def validate(doc: dict) -> None:
    """Raise jsonschema's ValidationError if ``doc`` does not follow Neuronpedia's schema."""
    import jsonschema

    jsonschema.validate(doc, schema())


def node_kind_name(kind: int) -> str:
    return {FEATURE: "feature", ERROR: "error", TOKEN: "token", LOGIT: "logit"}[kind]
