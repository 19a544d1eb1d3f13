"""Influence and pruning as circuit-tracer's ``graph.prune_graph``, on a sparse edge list.

The adjacency is ``A[target, source]`` (direct effects); circuit-tracer row-normalises ``|A|``, takes the
power series of the normalised matrix from the logits (weighted by their probabilities), keeps the nodes
carrying ``node_threshold`` of the cumulative influence (tokens and logits always), scores each remaining edge
by its normalised weight times its target's influence, keeps edges to ``edge_threshold``, then drops feature
and error nodes left without outgoing edges (and features without incoming ones) until nothing changes.
Here the matrix is a COO list ``(tgt, src, w)``: memory is the number of edges, never N x N. The graph is a
DAG (every edge goes to a later layer or position), so the series ends after at most its depth.
"""

from __future__ import annotations

import numpy as np


def normalise(tgt: np.ndarray, w: np.ndarray, n: int, row_abs: np.ndarray | None = None) -> np.ndarray:
    """|w| divided by the sum of |w| over the target's row (clamped as circuit-tracer, 1e-10); ``row_abs``: the
    rows' sums where some edges were not kept."""
    a = np.abs(w).astype(np.float64)
    sums = np.bincount(tgt, weights=a, minlength=n) if row_abs is None else row_abs
    return a / np.maximum(sums, 1e-10)[tgt]


def influence(tgt: np.ndarray, src: np.ndarray, norm: np.ndarray, seed: np.ndarray, max_iter: int = 1000
              ) -> np.ndarray:
    """Σ_k seed · Â^k for k ≥ 1 (the seed's own weight excluded)."""
    n = len(seed)
    cur = seed.astype(np.float64)
    total = np.zeros(n, np.float64)
    for _ in range(max_iter):
        cur = np.bincount(src, weights=norm * cur[tgt], minlength=n)
        if not cur.any():
            break
        total += cur
    return total


def find_threshold(scores: np.ndarray, threshold: float) -> float:
    """The smallest score kept when keeping the top scores up to ``threshold`` of their sum."""
    s = np.sort(np.asarray(scores, np.float64))[::-1]
    if len(s) == 0:
        return 0.0
    cum = np.cumsum(s) / max(s.sum(), 1e-300)
    i = min(int(np.searchsorted(cum, threshold)), len(s) - 1)
    return float(s[i])


def prune(tgt, src, w, n_nodes: int, logit_weights: np.ndarray, always: np.ndarray, prunable_in: np.ndarray,
          node_threshold: float = 0.8, edge_threshold: float = 0.98, row_abs: np.ndarray | None = None):
    """``(node_mask, edge_mask, node_influence)``. ``always``: nodes kept whatever (tokens, logits);
    ``prunable_in``: nodes dropped when left without incoming edges (features)."""
    norm = normalise(tgt, w, n_nodes, row_abs)
    node_inf = influence(tgt, src, norm, logit_weights)
    node_mask = node_inf >= find_threshold(node_inf, node_threshold)
    node_mask |= always
    keep = node_mask[tgt] & node_mask[src]
    pnorm = np.where(keep, normalise(tgt, np.where(keep, w, 0), n_nodes), 0.0)
    p_inf = influence(tgt, src, pnorm, logit_weights) + logit_weights
    score = pnorm * p_inf[tgt]
    edge_mask = score >= find_threshold(score[score > 0] if (score > 0).any() else score, edge_threshold)
    edge_mask &= score > 0
    while True:
        old = node_mask.copy()
        edge_mask &= node_mask[tgt] & node_mask[src]
        has_out = np.zeros(n_nodes, bool)
        has_out[src[edge_mask]] = True
        has_in = np.zeros(n_nodes, bool)
        has_in[tgt[edge_mask]] = True
        node_mask &= always | has_out
        node_mask &= ~prunable_in | has_in
        if np.array_equal(node_mask, old):
            break
    return node_mask, edge_mask, node_inf


def cumulative_scores(node_inf: np.ndarray) -> np.ndarray:
    """circuit-tracer's ``cumulative_scores`` (the JSON's ``influence``): each node's place in the cumulative
    influence, most influential first (0 < s ≤ 1; pruning at t keeps the nodes with s up to about t)."""
    order = np.argsort(-node_inf, kind="stable")
    out = np.zeros(len(node_inf))
    out[order] = np.cumsum(node_inf[order]) / max(float(node_inf.sum()), 1e-300)
    return out
