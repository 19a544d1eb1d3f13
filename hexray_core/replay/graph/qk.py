"""QK tracing: why a head attended. The score ``scale · q · k`` at (query, key) of one head, split exactly into
query-side x key-side contributions of the graph's sources (features, errors, tokens) and the frozen biases.

In the frozen model q = Σ_i q_i + q_bias, where q_i is source i's direct effect on the head's query vector
(one backward pass per query dimension, entering at ``resid_pre`` of the head's layer: ``Target("pre")``),
and q_bias gathers the frozen biases and ``b_Q``; the same for k. Then
``score = scale · Σ_ij q_i · k_j + bias`` with ``bias = scale · (q_bias · k + q · k_bias − q_bias · k_bias)``:
the pairwise terms, and the marginal terms ``scale · q_i · k`` (source i's share of the score given the whole
key). Rotary models rotate each side by its position: q_query = R_query (W_Q x + b_Q), k_key = R_key (W_K x + b_K),
and R is linear, so each q_i above is R_query applied to source i's direct effect on the pre-rotation query (the
same for k, and for the bias terms): the split stays exact (``hexray_core/replay/rotary.py`` rebuilds R from the
trace's ``meta.attention.rotary``; a model whose rotation the recorder could not write down is refused, in one line
saying why). Under grouped-query attention the key side is the head's key/value group. The split is of the
pre-soft-cap score.
"""

from __future__ import annotations

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.replay.rotary import rotary_params, rotation

from .model import ReplacementModel, Target


def _source_desc(model: ReplacementModel, i: int) -> tuple[str, dict]:
    """circuit-tracer's node id and Neuronpedia's descriptor of model source i."""
    nf, n = model.n_features, model.n
    if i < nf:
        lay, p, f = int(model.f_layer[i]), int(model.f_pos[i]), int(model.f_feat[i])
        nid = f"{lay}_{f}_{p}"
        return nid, {"node_id": nid, "feature": (lay + f) * (lay + f + 1) // 2 + f, "layer": str(lay), "ctx_idx": p,
                     "feature_type": "cross layer transcoder", "jsNodeId": f"{lay}_{f}-0", "clerp": "",
                     "activation": float(model.f_act[i])}
    if i < nf + model.L * n:
        lay, p = divmod(i - nf, n)
        nid = f"0_{lay}_{p}"
        return nid, {"node_id": nid, "feature": -1, "layer": str(lay), "ctx_idx": p,
                     "feature_type": "mlp reconstruction error", "jsNodeId": f"{lay}_{p}-0", "clerp": ""}
    p = i - nf - model.L * n
    tok = int(model.r.tokens[p])
    nid = f"E_{tok}_{p}"
    return nid, {"node_id": nid, "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
                 "jsNodeId": f"E_{tok}-{p}", "clerp": ""}


def qk_unavailable(trace) -> str | None:
    """Why this trace's scores cannot be QK-traced (patterns stored, a rotation not rebuilt exactly), or None."""
    spec = trace.meta.get("attention")
    if not isinstance(spec, dict) or spec.get("store") != "qk":
        return "QK tracing needs a trace that stores q and k (meta.attention); this one stores patterns"
    try:
        rotary_params(trace)
    except HexRayError as e:
        return str(e)
    return None


def qk_trace(model: ReplacementModel, layer: int, head: int, query: int, key: int, *, top: int = 10) -> dict:
    """The split of one recorded attention score; ``results`` in circuit-tracer's ``qk_tracing_results`` shape."""
    trace = model.trace
    why = qk_unavailable(trace)
    if why is not None:
        raise HexRayError(why)
    spec, rot = trace.meta["attention"], rotary_params(trace)
    if not (0 <= layer < model.L and 0 <= head < model.H and 0 <= key <= query < model.n):
        raise HexRayError(f"no attention score at layer {layer}, head {head}, query {query}, key {key}")
    scale = float(spec["layers"][layer]["scale"])
    W_Q, W_K = model.w["W_Q"][layer, head], model.w["W_K"][layer, head // model.rep]  # [d, dh]
    b_Q = model.w["b_Q"][layer, head] if model.w.has("b_Q") else np.zeros(model.dh, np.float32)
    b_K = model.w["b_K"][layer, head // model.rep] if model.w.has("b_K") else np.zeros(model.dh, np.float32)
    dh = model.dh
    tq = [Target("pre", layer, query, model._centre(W_Q[:, e]) / model.sc1[layer][query]) for e in range(dh)]
    tk = [Target("pre", layer, key, model._centre(W_K[:, e]) / model.sc1[layer][key]) for e in range(dh)]
    eq, cq = model.backward_batched(tq)  # [dh, n_src], [dh]
    ek, ck = model.backward_batched(tk)
    q_bias, k_bias = cq + b_Q, ck + b_K
    if rot is not None:  # into the rotated space where the score is a dot product (linear: exact per source)
        Rq, Rk = rotation(rot, query, dh), rotation(rot, key, dh)
        eq, ek = (Rq @ eq).astype(np.float32), (Rk @ ek).astype(np.float32)
        q_bias, k_bias = Rq @ q_bias, Rk @ k_bias
    q = eq.sum(1, dtype=np.float64) + q_bias
    k = ek.sum(1, dtype=np.float64) + k_bias
    score = scale * float(q @ k)
    q_marg = scale * (eq.T.astype(np.float64) @ k)  # [n_src]
    k_marg = scale * (ek.T.astype(np.float64) @ q)
    pair_sum = scale * float(eq.sum(1, dtype=np.float64) @ ek.sum(1, dtype=np.float64))  # Σ_ij of the pairs
    # the pairwise terms among the strongest marginal contributors of each side
    qi = np.argsort(-np.abs(q_marg), kind="stable")[: max(top, 50)]
    ki = np.argsort(-np.abs(k_marg), kind="stable")[: max(top, 50)]
    qi, ki = qi[q_marg[qi] != 0], ki[k_marg[ki] != 0]
    pair = scale * (eq[:, qi].T.astype(np.float64) @ ek[:, ki].astype(np.float64))  # [|qi|, |ki|]
    flat = np.argsort(-np.abs(pair), axis=None, kind="stable")[:top]
    descs: dict[str, dict] = {}

    def nid(i):
        name, desc = _source_desc(model, int(i))
        descs[name] = desc
        return name

    pairs = [[nid(qi[a]), nid(ki[b]), float(pair[a, b])] for a, b in zip(*np.unravel_index(flat, pair.shape),
                                                                          strict=True)]
    results = {"pair_wise_contributors": pairs,
               "top_q_marginal_contributors": [[nid(i), float(q_marg[i])] for i in qi[:top]],
               "top_k_marginal_contributors": [[nid(i), float(k_marg[i])] for i in ki[:top]]}
    recorded = None
    qn, kn = spec["q"].format(layer=layer), spec["k"].format(layer=layer)
    if trace.has(qn, model.run) and trace.has(kn, model.run):
        rq = np.asarray(trace.tensor(qn, model.run)[query, head], np.float64)
        rk = np.asarray(trace.tensor(kn, model.run)[key, head // model.rep], np.float64)
        recorded = scale * float(rq @ rk)
    return {"layer": layer, "head": head, "query": query, "key": key, "score": score, "recorded_score": recorded,
            "pair_sum": pair_sum, "bias": score - pair_sum, "q": q, "k": k, "q_edges": eq, "k_edges": ek,
            "results": results, "nodes": descs, "q_contrib": q_marg, "k_contrib": k_marg}


def top_heads(model: ReplacementModel, u: np.ndarray, query: int, n: int = 3) -> list[tuple[int, int, int, float]]:
    """The (layer, head, key, effect) with the largest direct effect on the direction ``u`` at ``query`` through
    one head reading one key: A[h, query, key] · (v_key W_O[h]) · u."""
    out = []
    for lay in range(model.L):
        rows = None
        for q0, q1, blk in model.blocks(lay, query + 1):
            if q0 <= query < q1:
                rows = blk[:, query - q0, : query + 1]
        x = model.resid_pre[lay][: query + 1]
        v = (model._centre(x) / model.sc1[lay][: query + 1, None]) @ model.W_V[lay].transpose(1, 0, 2).reshape(
            model.d, -1)
        v = v.reshape(query + 1, -1, model.dh)
        for h in range(model.H):
            eff = rows[h] * (v[:, h // model.rep] @ (model.W_O[lay, h] @ u))
            s = int(np.argmax(np.abs(eff)))
            out.append((lay, h, s, float(eff[s])))
    out.sort(key=lambda t: -abs(t[3]))
    return out[:n]


def attach_qk(graph, n: int = 3, top: int = 10) -> None:
    """QK-trace the ``n`` head/key pairs that write most directly into the graph's top logit; the first result is
    attached to that logit node in the JSON (``qk_tracing_results``), all are listed beside it."""
    model = graph.model
    W_U = model.w["W_U"]
    lg = graph.logit_nodes
    j = int(np.argmax(graph.logit_probs))
    tok = int(graph.feature[lg[j]])
    pos = graph.position
    u = model._centre(W_U[:, tok] - W_U.mean(1)) / model.scf[pos]
    res = []
    for lay, h, key, eff in top_heads(model, u, pos, n):
        r = qk_trace(model, lay, h, pos, key, top=top)
        for key_ in ("q_contrib", "k_contrib", "q", "k", "q_edges", "k_edges"):
            r.pop(key_)
        r["direct_effect_on_logit"] = eff
        r["attach"] = graph.node_id(int(lg[j]))
        res.append(r)
    graph.qk = res
