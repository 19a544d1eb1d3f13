"""Residual-stream trace: how large the stream is after each layer, and how much each layer writes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ResidualTrace:
    run: int
    tokens: list[str]
    layers: list[str]  # "L0" ...
    resid_norm: np.ndarray  # [n_layers, n_tokens]: |resid_post| after each layer
    attn_norm: np.ndarray  # [n_layers, n_tokens]: |attn_out|
    mlp_norm: np.ndarray  # [n_layers, n_tokens]: |mlp_out|
    embed_norm: np.ndarray  # [n_tokens]: |embeddings| (the stream entering layer 0)

    def to_dict(self) -> dict:
        return {
            "run": self.run, "tokens": self.tokens, "layers": self.layers,
            "embed_norm": self.embed_norm.tolist(), "resid_norm": self.resid_norm.tolist(),
            "attn_norm": self.attn_norm.tolist(), "mlp_norm": self.mlp_norm.tolist(),
        }


def residual_trace(trace, *, run: int = 0) -> ResidualTrace:
    r = trace.run(run)
    L = trace.n_layers

    def norms(name: str) -> np.ndarray:
        return np.linalg.norm(trace.tensor(name, r.id), axis=-1)

    embed = trace.tensor("hook_embed", r.id)
    if trace.has("hook_pos_embed", r.id):
        embed = embed + trace.tensor("hook_pos_embed", r.id)
    return ResidualTrace(
        r.id, r.labels, [f"L{i}" for i in range(L)],
        np.stack([norms(f"blocks.{i}.hook_resid_post") for i in range(L)]),
        np.stack([norms(f"blocks.{i}.hook_attn_out") for i in range(L)]),
        np.stack([norms(f"blocks.{i}.hook_mlp_out") for i in range(L)]),
        np.linalg.norm(embed, axis=-1),
    )
