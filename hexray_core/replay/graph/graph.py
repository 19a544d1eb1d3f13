"""The attribution graph object: nodes, sparse edges, pruning, paths.

Nodes are in circuit-tracer's order: selected features, error nodes (layer-major, ``n_layers x n_pos``), token
embeddings, logits. ``kind`` is one of FEATURE, ERROR, TOKEN, LOGIT. Edges are a COO list
``(target, source, weight)``: ``weight`` is the direct effect of the source (its activation times its write, for
a feature) on the target's pre-activation (features) or demeaned logit (logits), in the frozen local
replacement model. ``value[i] = Σ incoming weights + const[i]`` for every feature and logit node whose row
was computed (completeness; ``const`` names the frozen biases and the encoder bias).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from hexray_core.replay.tokentext import quote

from .prune import cumulative_scores, influence, normalise, prune

FEATURE, ERROR, TOKEN, LOGIT = 0, 1, 2, 3
KIND_NAMES = ("feature", "error", "token", "logit")


@dataclass
class Graph:
    kind: np.ndarray  # [N] int8
    layer: np.ndarray  # [N] int32 (token: -1... tokens are layer 0 in Neuronpedia, logits n_layers + 1)
    pos: np.ndarray  # [N] int32
    feature: np.ndarray  # [N] int64: feature index, vocab id for tokens and logits, -1 for errors
    activation: np.ndarray  # [N] float32: feature activation, logit probability, 0 otherwise
    value: np.ndarray  # [N] float64: pre-activation / demeaned logit for rows computed, else NaN
    const: np.ndarray  # [N] float64: frozen-bias part of ``value`` (NaN where no row)
    tgt: np.ndarray  # [E] int64
    src: np.ndarray  # [E] int64
    weight: np.ndarray  # [E] float32
    n_layers: int
    tokens: list[int]
    token_strs: list[str]
    prompt: str
    scan: str
    position: int
    logit_probs: np.ndarray  # [n_logits]
    influence: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    qk: list = field(default_factory=list)  # QK tracing results (qk.py), for the JSON
    row_abs: np.ndarray | None = None  # [N] Σ|w| of each computed row over every source (normalisation)
    dropped: np.ndarray | None = None  # [N] Σw of a row's edges not in the graph (too small to keep, or from
    #                                    features without a row); value = Σ incoming + dropped + const
    origin: np.ndarray | None = None  # [N] index of each node in the graph this one was cut from (prune, subset)

    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    @property
    def n_edges(self) -> int:
        return len(self.tgt)

    @property
    def nodes(self) -> list[dict]:
        return [self.node(i) for i in range(self.n_nodes)]

    def node(self, i: int) -> dict:
        return {"index": i, "kind": KIND_NAMES[self.kind[i]], "layer": int(self.layer[i]), "pos": int(self.pos[i]),
                "feature": int(self.feature[i]), "activation": float(self.activation[i]),
                "influence": None if self.influence is None else float(self.influence[i])}

    @property
    def logit_nodes(self) -> np.ndarray:
        return np.nonzero(self.kind == LOGIT)[0]

    def logit_weights(self) -> np.ndarray:
        w = np.zeros(self.n_nodes, np.float64)
        w[self.logit_nodes] = self.logit_probs
        return w

    def incoming(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources, weights) of node i's incoming edges."""
        m = self.tgt == i
        return self.src[m], self.weight[m]

    def _row_abs(self) -> np.ndarray | None:
        """The full rows' |w| sums, when the graph is unpruned (a pruned graph renormalises over what it kept)."""
        return None if self.row_abs is None or "pruning" in self.meta else self.row_abs

    def compute_influence(self) -> np.ndarray:
        norm = normalise(self.tgt, self.weight, self.n_nodes, self._row_abs())
        self.influence = influence(self.tgt, self.src, norm, self.logit_weights())
        return self.influence

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98, *, max_nodes: int | None = None,
              max_edges: int | None = None) -> Graph:
        """A new graph with the nodes and edges circuit-tracer's pruning keeps, then at most ``max_nodes`` nodes
        (most influential first; tokens and logits always) and ``max_edges`` edges (highest weight magnitude)."""
        always = (self.kind == TOKEN) | (self.kind == LOGIT)
        node_mask, edge_mask, node_inf = prune(self.tgt, self.src, self.weight, self.n_nodes, self.logit_weights(),
                                               always, self.kind == FEATURE, node_threshold, edge_threshold,
                                               self._row_abs())
        if max_nodes is not None and node_mask.sum() > max_nodes:
            cand = np.nonzero(node_mask & ~always)[0]
            room = max(0, max_nodes - int(always.sum()))
            drop = cand[np.argsort(-node_inf[cand], kind="stable")[room:]]
            node_mask[drop] = False
            edge_mask &= node_mask[self.tgt] & node_mask[self.src]
        if max_edges is not None and edge_mask.sum() > max_edges:
            idx = np.nonzero(edge_mask)[0]
            edge_mask[idx[np.argsort(-np.abs(self.weight[idx]), kind="stable")[max_edges:]]] = False
        g = self.subset(node_mask, edge_mask)
        g.influence = cumulative_scores(node_inf)[node_mask]  # as circuit-tracer writes into its JSON
        g.meta = {**self.meta, "pruning": {"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                                           "max_nodes": max_nodes, "max_edges": max_edges}}
        return g

    def subset(self, node_mask: np.ndarray, edge_mask: np.ndarray) -> Graph:
        new = np.full(self.n_nodes, -1, np.int64)
        new[node_mask] = np.arange(int(node_mask.sum()))
        em = edge_mask & node_mask[self.tgt] & node_mask[self.src]
        logit_keep = node_mask[self.logit_nodes]
        return Graph(self.kind[node_mask], self.layer[node_mask], self.pos[node_mask], self.feature[node_mask],
                     self.activation[node_mask], self.value[node_mask], self.const[node_mask], new[self.tgt[em]],
                     new[self.src[em]], self.weight[em], self.n_layers, self.tokens, self.token_strs, self.prompt,
                     self.scan, self.position, self.logit_probs[logit_keep],
                     None if self.influence is None else self.influence[node_mask], dict(self.meta), list(self.qk),
                     None if self.row_abs is None else self.row_abs[node_mask],
                     None if self.dropped is None else self.dropped[node_mask],
                     np.nonzero(node_mask)[0] if self.origin is None else self.origin[node_mask])

    def node_id(self, i: int) -> str:
        """circuit-tracer's node ids: ``{layer}_{feature}_{pos}``, ``0_{layer}_{pos}`` errors, ``E_{id}_{pos}``
        tokens, ``{n_layers + 1}_{id}_{pos}`` logits (as its ``frontend/graph_models.py``; an error id can equal
        a layer-0 feature's, there too)."""
        k, lay, p, f = int(self.kind[i]), int(self.layer[i]), int(self.pos[i]), int(self.feature[i])
        if k == FEATURE:
            return f"{lay}_{f}_{p}"
        if k == ERROR:
            return f"0_{lay}_{p}"
        if k == TOKEN:
            return f"E_{f}_{p}"
        return f"{self.n_layers + 1}_{f}_{p}"

    def label(self, i: int) -> str:
        """A node as HexRay's other views name things: ``L3F120@5``, ``MLP L3 error@5``, ``" the"@5`` (a token's
        embedding), ``logit " Paris"``."""
        k, lay, p, f = int(self.kind[i]), int(self.layer[i]), int(self.pos[i]), int(self.feature[i])
        if k == FEATURE:
            return f"L{lay}F{f}@{p}"
        if k == ERROR:
            return f"MLP L{lay} error@{p}"
        if k == TOKEN:
            return f"{quote(self.token_strs[p]) if 0 <= p < len(self.token_strs) else f'#{f}'}@{p}"
        text = (self.meta.get("logit_strs") or {}).get(f)
        return f"logit {quote(text) if text is not None else f'#{f}'}"

    def find(self, node) -> int:
        """A node by index or node id."""
        if isinstance(node, int | np.integer):
            return int(node)
        for i in range(self.n_nodes):
            if self.node_id(i) == node:
                return i
        raise KeyError(f"no node {node!r} in this graph")

    def paths(self, target=None, k: int = 5, max_pops: int = 100_000) -> list[tuple[float, list[int]]]:
        """The k strongest paths into ``target`` (default: the most likely logit), strongest first. A path's
        score is the product of its edges' normalised weights |w| / Σ|w| over the target's row: the fraction of
        the target's direct input that each hop carries. Paths start at a node with no incoming edge."""
        t = int(self.logit_nodes[np.argmax(self.logit_probs)]) if target is None else self.find(target)
        norm = normalise(self.tgt, self.weight, self.n_nodes, self._row_abs())
        order = np.argsort(self.tgt, kind="stable")
        starts = np.searchsorted(self.tgt[order], np.arange(self.n_nodes + 1))
        heap = [(-1.0, [t])]
        out = []
        pops = 0
        while heap and len(out) < k and pops < max_pops:
            neg, path = heapq.heappop(heap)
            pops += 1
            head = path[0]
            a, b = starts[head], starts[head + 1]
            if a == b:
                if len(path) > 1:
                    out.append((-neg, path))
                continue
            for e in order[a:b]:
                heapq.heappush(heap, (neg * norm[e], [int(self.src[e])] + path))
        return out

    def to_neuronpedia(self, **kw) -> dict:
        from .neuronpedia import to_neuronpedia

        return to_neuronpedia(self, **kw)
