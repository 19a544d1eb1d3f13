"""Build an attribution graph from a trace: circuit-tracer's ``attribute`` without the model, sparse.

1. Logit nodes: the top logits of the position covering ``desired_logit_prob`` of the probability (at most
   ``max_n_logits``), or the given targets. Each logit row is the direct effect of every source on the logit
   minus the mean logit (circuit-tracer's demeaned unembedding).
2. Feature rows in batches, in order of influence on the logits estimated from the rows computed so far
   (``compute_partial_influences``), until ``max_feature_nodes`` features have rows (all, by default).
3. Sources without a row (features not selected) are dropped, as circuit-tracer's adjacency drops them.

Each batch is one backward pass through the frozen model (``ReplacementModel.backward``): memory is the batch's
gradient ``[batch, positions, d_model]`` plus the attention rows of one block, and the edges kept; the
edge list holds only non-zero direct effects (a source after its target, or in a later layer, has none).
"""

from __future__ import annotations

import numpy as np

from hexray_core.errors import HexRayError

from .graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from .model import ReplacementModel, Target
from .prune import normalise
from .transcoders import as_transcoder_set

#: Floats of one batch's gradient (batch x positions x d_model): bounds the backward pass's memory.
GRAD_ELEMENTS = 1 << 22
#: ... but never fewer targets than this in a batch (each batch recomputes the attention rows it needs)
MIN_BATCH = 8
#: Edges kept per row (the largest by magnitude). A row has an edge from every earlier source, so a long
#: context would otherwise hold rows x sources floats; what is dropped is kept as a sum per row (completeness
#: stays exact) and the row's full |weight| sum still normalises it (influence as with every edge).
MAX_EDGES_PER_ROW = 1 << 12


class _Rows:
    """Computed rows, sparse: row r's non-zero entries over the model's sources."""

    def __init__(self, max_edges: int = MAX_EDGES_PER_ROW):
        self.max_edges = max_edges
        self.row_node: list[int] = []  # row -> node (feature index, or -(logit + 1))
        self.tgt: list[np.ndarray] = []
        self.src: list[np.ndarray] = []
        self.w: list[np.ndarray] = []
        self.const: list[float] = []
        self.abs_sum: list[float] = []  # Σ|w| over the whole row, dropped edges included
        self.dropped: list[float] = []  # Σw of the dropped edges

    def add(self, node: int, edges_row: np.ndarray, const: float) -> None:
        nz = np.nonzero(edges_row)[0]
        self.abs_sum.append(float(np.abs(edges_row[nz]).sum(dtype=np.float64)))
        dropped = 0.0
        if len(nz) > self.max_edges:
            keep = np.argpartition(-np.abs(edges_row[nz]), self.max_edges)[: self.max_edges]
            total = float(edges_row[nz].sum(dtype=np.float64))
            nz = np.sort(nz[keep])
            dropped = total - float(edges_row[nz].sum(dtype=np.float64))
        self.dropped.append(dropped)
        self.tgt.append(np.full(len(nz), len(self.row_node), np.int32))  # 12 bytes an edge
        self.src.append(nz.astype(np.int32))
        self.w.append(edges_row[nz].astype(np.float32))
        self.row_node.append(node)
        self.const.append(const)

    def arrays(self):
        if len(self.tgt) > 1:  # keep one array per kind: later calls (influence updates) copy nothing
            cat = np.concatenate
            self.tgt, self.src, self.w = [cat(self.tgt)], [cat(self.src)], [cat(self.w)]
        return self.tgt[0], self.src[0], self.w[0]


def _logit_targets(model: ReplacementModel, pos: int, targets, max_n_logits: int, desired_logit_prob: float):
    """(token ids, probabilities, direction vectors, constants) of the logit nodes at ``pos``."""
    trace, run = model.trace, model.run
    W_U, b_U = model.w["W_U"], model.w["b_U"] if model.w.has("b_U") else None
    if W_U.shape[0] != model.d:
        raise HexRayError(f"W_U {list(W_U.shape)} does not fit d_model {model.d}")
    V = W_U.shape[1]
    mean_u = W_U.mean(1)
    x = model.resid_final[pos]
    xn = model._centre(x) / model.scf[pos]
    logits_all = xn @ W_U + (b_U if b_U is not None else 0)
    lse = float(np.log(np.exp(logits_all - logits_all.max()).sum()) + logits_all.max())
    if targets:
        ids = []
        for t in targets:
            try:
                ids.append(trace.token_id(t, run) if isinstance(t, str) else int(t))
            except (KeyError, ValueError, HexRayError) as e:
                raise HexRayError(f"target {t!r} is not a token of this model: {e}") from None
        ids = list(dict.fromkeys(ids))
        for t in ids:
            if not 0 <= t < V:
                raise HexRayError(f"target token id {t} is outside the vocabulary (0..{V - 1})")
        probs = np.exp(logits_all[ids] - lse)
    else:
        order = np.argsort(-logits_all, kind="stable")[:max_n_logits]
        p = np.exp(logits_all[order] - lse)
        k = min(int(np.searchsorted(np.cumsum(p), desired_logit_prob)) + 1, len(order))
        ids, probs = [int(t) for t in order[:k]], p[:k]
    mean_b = float(b_U.mean()) if b_U is not None else 0.0
    us, consts = [], []
    for t in ids:
        us.append(model._centre(W_U[:, t] - mean_u) / model.scf[pos])
        consts.append((float(b_U[t]) if b_U is not None else 0.0) - mean_b)
    return ids, np.asarray(probs, np.float64), us, consts


def _partial_influence(rows: _Rows, n_sources: int, logit_probs: np.ndarray) -> np.ndarray:
    """circuit-tracer's ``compute_partial_influences`` over the rows so far: influence of every source."""
    tgt, src, w = rows.arrays()
    n_rows = len(rows.row_node)
    norm = normalise(tgt, w, n_rows, np.asarray(rows.abs_sum))
    row_node = np.asarray(rows.row_node)
    prod = np.zeros(n_rows, np.float64)
    is_logit = row_node < 0
    prod[is_logit] = logit_probs[-row_node[is_logit] - 1]
    feat_row = np.full(n_sources, -1, np.int64)
    feat_row[row_node[~is_logit]] = np.nonzero(~is_logit)[0]
    total = np.zeros(n_sources, np.float64)
    for _ in range(128):
        contrib = np.bincount(src, weights=norm * prod[tgt], minlength=n_sources)
        if not contrib.any():
            break
        total += contrib
        prod = np.zeros(n_rows, np.float64)
        has = feat_row[:len(contrib)] >= 0
        prod[feat_row[has]] = contrib[has]
    return total


def build_graph(trace, transcoders, *, run: int = 0, position: int = -1, targets=None,
                max_feature_nodes: int | None = None, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                batch_size: int = 64, weights=None, update_interval: int = 4, progress=None,
                max_edges_per_row: int = MAX_EDGES_PER_ROW) -> Graph:
    """The unpruned attribution graph of one position of one run (``Graph.prune()`` prunes it)."""
    model = ReplacementModel(trace, run, as_transcoder_set(transcoders, trace.n_layers), weights=weights)
    r = model.r
    pos = r.position(position)
    ids, probs, us, consts = _logit_targets(model, pos, targets, max_n_logits, desired_logit_prob)
    n_src = model.n_sources
    # a batch's gradient is [batch, positions, d_model]: cap it for long contexts
    bs = max(1, min(batch_size, max(MIN_BATCH, GRAD_ELEMENTS // max((pos + 1) * model.d, 1))))
    rows = _Rows(max_edges_per_row)
    logit_value = []
    for a in range(0, len(ids), bs):
        tg = [Target("final", model.L, pos, u) for u in us[a:a + bs]]
        edges, const = model.backward(tg)
        for j in range(len(tg)):
            i = a + j
            rows.add(-(i + 1), edges[j], float(const[j]) + consts[i])
            logit_value.append(float(edges[j].sum(dtype=np.float64)) + float(const[j]) + consts[i])
    # candidate features: active at or before the position
    cand = np.nonzero(model.f_pos <= pos)[0]
    n_feat = len(cand)
    limit = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    visited = np.zeros(model.n_features, bool)
    n_visited = 0
    while n_visited < limit:
        if limit == n_feat:
            pending = cand[~visited[cand]]
        else:
            infl = _partial_influence(rows, n_src, probs)
            rank = cand[np.argsort(-infl[cand], kind="stable")]
            pending = rank[~visited[rank]][: min(update_interval * bs, limit - n_visited)]
        # a batch of one layer and nearby positions: no work above its layer, a gradient no longer than needed
        pending = pending[np.lexsort((model.f_pos[pending], model.f_layer[pending]))]
        for a in range(0, len(pending), bs):
            idx = pending[a:a + bs]
            tg, cs = [], []
            for i in idx:
                u, c = model.input_direction(int(model.f_layer[i]), int(model.f_pos[i]), int(model.f_feat[i]))
                tg.append(Target("mid", int(model.f_layer[i]), int(model.f_pos[i]), u))
                cs.append(c)
            edges, const = model.backward(tg)
            for j, i in enumerate(idx):
                rows.add(int(i), edges[j], float(const[j]) + cs[j])
            visited[idx] = True
            n_visited += len(idx)
            if progress:
                progress(n_visited, limit)
    return _assemble(model, pos, rows, visited, ids, probs, np.asarray(logit_value))


def _assemble(model: ReplacementModel, pos: int, rows: _Rows, visited, ids, probs, logit_value) -> Graph:
    L, n = model.L, model.n
    m = pos + 1  # nodes at positions after the target position have no effect on it: left out
    sel = np.nonzero(visited)[0]
    n_sel = len(sel)
    n_nodes = n_sel + L * m + m + len(ids)
    # source index (model) -> node index (graph); -1 drops the source
    src_map = np.full(model.n_sources, -1, np.int64)
    src_map[sel] = np.arange(n_sel)
    lay, p = np.meshgrid(np.arange(L), np.arange(m), indexing="ij")
    src_map[model.n_features + lay.ravel() * n + p.ravel()] = n_sel + lay.ravel() * m + p.ravel()
    src_map[model.n_features + L * n + np.arange(m)] = n_sel + L * m + np.arange(m)
    row_map = np.asarray([src_map[r] if r >= 0 else n_sel + L * m + m + (-r - 1) for r in rows.row_node], np.int64)
    t_all, src, w = rows.arrays()
    keep = src_map[src] >= 0
    tgt, src, w = row_map[t_all[keep]].astype(np.int32), src_map[src[keep]].astype(np.int32), w[keep]
    order = np.lexsort((src, tgt))
    kind = np.concatenate([np.full(n_sel, FEATURE), np.full(L * m, ERROR), np.full(m, TOKEN),
                           np.full(len(ids), LOGIT)]).astype(np.int8)
    layer = np.concatenate([model.f_layer[sel], lay.ravel(), np.zeros(m), np.full(len(ids), L)]).astype(np.int32)
    npos = np.concatenate([model.f_pos[sel], p.ravel(), np.arange(m), np.full(len(ids), pos)]).astype(np.int32)
    feature = np.concatenate([model.f_feat[sel], np.full(L * m, -1), np.asarray(model.r.tokens[:m]),
                              np.asarray(ids)]).astype(np.int64)
    act = np.concatenate([model.f_act[sel], np.zeros(L * m + m), probs]).astype(np.float32)
    value = np.full(n_nodes, np.nan)
    const = np.full(n_nodes, np.nan)
    row_abs = np.zeros(n_nodes)
    dropped = np.full(n_nodes, np.nan)
    value[:n_sel] = model.f_pre[sel]
    value[n_sel + L * m + m:] = logit_value
    const[row_map] = rows.const
    row_abs[row_map] = rows.abs_sum
    dropped[row_map] = rows.dropped
    # edges from sources without a node (features not selected) leave the graph: their sum joins ``dropped``
    gone = ~keep
    if gone.any():
        np.add.at(dropped, row_map[t_all[gone]], rows.w[0][gone].astype(np.float64))
    r = model.r
    g = Graph(kind, layer, npos, feature, act, value, const, tgt[order], src[order], w[order], L,
              list(r.tokens[:m]), list(r.str_tokens[:m]), r.prompt, model.trace.model_name, pos, probs,
              row_abs=row_abs, dropped=dropped)
    g.meta = {"run": r.id, "n_active_features": int(np.sum(model.f_pos <= pos)), "n_selected_features": n_sel,
              "drift": model.drift, "transcoders": model.tc.source, "space": model.tc.space,
              "kind": model.tc.kind, "logit_strs": {int(t): model.trace.token_str(int(t), r.id) for t in ids}}
    g.model = model  # for QK tracing and tests; not serialised
    return g
