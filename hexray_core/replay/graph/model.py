"""The local replacement model of one run, rebuilt from a trace (numpy only).

Space: everything here lives in the trace's own space, TransformerLens compatibility mode (LayerNorm folded
into the next weights, writing weights centred). Frozen, as circuit-tracer freezes them: every attention
pattern (recomputed from the recorded q and k, rows in blocks, or read where stored) and every norm's
``hook_scale``. The MLPs are replaced by transcoders: each MLP output is its features' decoder vectors times
their activations plus the decoder bias plus an error node (the recorded ``hook_mlp_out`` minus that
reconstruction), so the replacement is exact. Attention outputs are recomputed by the frozen model itself from
the residual it builds (never read back from the trace): the model is then exactly linear in its nodes and the
completeness identities hold to float32 rounding; ``drift`` says how far its residual is from the recorded one.

Why centring is free: a LayerNorm subtracts the mean over d_model before anything reads the residual, so a
write v acts only through centre(v). Every gradient here is taken through such a norm and is therefore centred
(``_centre`` below), and a raw decoder vector (``space="raw"``) has the same effect as its centred, compatibility
-mode counterpart. RMSNorm models (not centred in compatibility mode) skip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.replay.attention import attention_blocks, attention_source
from hexray_core.replay.missing import MissingHook

from .transcoders import NORM_OUT_HOOKS, TranscoderSet

#: Attention patterns of a run kept in memory when all layers together stay under this (bytes); else rows are
#: recomputed from q/k in blocks whenever they are needed.
PATTERN_CACHE_BYTES = 256 << 20
#: Floats of one block of attention rows (heads x queries x keys).
BLOCK_ELEMENTS = 1 << 22


@dataclass
class Target:
    """Where a linear read enters the frozen model: ``stage`` "final" (after the last block), "mid" (a layer's
    ``resid_mid``: a transcoder's input) or "pre" (a layer's ``resid_pre``: its q, k, v), position, direction."""

    stage: str
    layer: int
    pos: int
    u: np.ndarray  # [d_model], a gradient in compatibility-mode residual space


class Weights:
    """The weights a graph reads: an explicit mapping first, then the trace's kit; one line naming what lacks."""

    def __init__(self, trace, weights=None):
        self.trace, self.extra = trace, weights or {}

    def has(self, name: str) -> bool:
        if name in self.extra:
            return True
        kit = self.trace.kit
        return kit is not None and kit.has(name)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.extra:
            return np.asarray(self.extra[name], dtype=np.float32)
        kit = self.trace.kit
        if kit is None or not kit.has(name):
            where = "no model kit was found" if kit is None else f"the model kit ({kit.source}) lacks it"
            raise HexRayError(f"an attribution graph needs the weight {name} and {where}: record again with a HexRay "
                              "whose kit holds the attention weights (W_Q, W_K, W_V), or pass weights=")
        return np.asarray(kit[name], dtype=np.float32)


class ReplacementModel:
    """Frozen pieces, node values and the block-wise backward pass of one run's local replacement model."""

    def __init__(self, trace, run: int, transcoders: TranscoderSet, *, weights=None, zero_first: bool = True):
        self.trace = trace
        self.r = trace.run(run)
        self.run = self.r.id
        self.tc = transcoders
        # circuit-tracer's zero_positions: position 0 (BOS, an attention sink) gets no feature or error nodes; its
        # MLP writes are constants
        self.zero_first = zero_first
        cfg = trace.config
        self.L, self.d, self.n = trace.n_layers, int(cfg["d_model"]), self.r.n_tokens
        transcoders.check(self.L, self.d)
        self.ln = trace.uses_layernorm
        self.w = Weights(trace, weights)
        self._load_weights()
        self._load_trace()
        self._patterns: dict[int, np.ndarray] = {}
        self._cache_patterns = self.L * self.H * self.n * self.n * 4 <= PATTERN_CACHE_BYTES
        self._forward()

    # -- inputs ------------------------------------------------------------------------------------------

    def _load_weights(self) -> None:
        w = self.w
        self.W_O = w["W_O"]  # [L, H, dh, d]
        self.W_V = w["W_V"]  # [L, H_kv, d, dh]
        L, d = self.L, self.d
        if self.W_O.ndim != 4 or self.W_O.shape[0] != L or self.W_O.shape[3] != d or self.W_V.ndim != 4 \
                or self.W_V.shape[:1] + self.W_V.shape[2:] != (L, d, self.W_O.shape[2]) \
                or self.W_O.shape[1] % self.W_V.shape[1]:
            raise HexRayError(f"weights W_O {list(self.W_O.shape)} and W_V {list(self.W_V.shape)} do not fit the "
                              f"trace's model ({L} layers, d_model {d})")
        self.H, self.dh = self.W_O.shape[1], self.W_O.shape[2]
        self.rep = self.H // self.W_V.shape[1]
        b_O = w["b_O"] if w.has("b_O") else np.zeros((L, d), np.float32)
        # the value bias reaches the output through rows that sum to one: a constant per layer
        b_V = w["b_V"] if w.has("b_V") else np.zeros(self.W_V.shape[:2] + (self.dh,), np.float32)
        bv = np.repeat(b_V, self.rep, axis=1)  # [L, H, dh]
        self.b_attn = b_O + np.einsum("lhe,lhed->ld", bv, self.W_O)
        raw = self.tc.space == "raw"
        # TransformerLens 3 fires ln2.hook_normalized before the norm's weight and bias, folded or not: only
        # ln2.hook_out / mlp.hook_in (the norm's output) of an unprocessed model carry them (raw/ln2.*)
        outs = [raw and tc.hook_in.endswith(NORM_OUT_HOOKS) for tc in self.tc.layers.values()]
        self.ln2_w = [w["raw/ln2.w"][lay] if outs[lay] else None for lay in range(L)]
        self.ln2_b = [w["raw/ln2.b"][lay] if outs[lay] and self.ln else None for lay in range(L)]
        # raw-space transcoders reading the residual itself of a LayerNorm model read it uncentred: the model
        # then carries the raw residual (every write plus the mean centring removed, from the kit's raw/ means)
        self.raw_resid = raw and self.ln and any(tc.hook_in.endswith("hook_resid_mid")
                                                 for tc in self.tc.layers.values())
        if self.raw_resid:
            self.W_O = self.W_O + w["raw/W_O.mean"][..., None]
            self.b_attn = self.b_attn + w["raw/b_O.mean"][:, None]

    def _get(self, name: str, why: str) -> np.ndarray:
        try:
            return np.asarray(self.trace.tensor(name, self.run), dtype=np.float32)
        except MissingHook as e:
            raise HexRayError(str(e).replace(f"run {self.run} has no", f"an attribution graph ({why}) needs")) \
                from None
        except KeyError:
            raise MissingHook(self.trace, self.run, name, f"an attribution graph ({why})") from None

    def _load_trace(self) -> None:
        L = self.L
        self.embed = self._get("hook_embed", "token nodes")
        has_pos = self.trace.has("hook_pos_embed", self.run)
        self.pos_embed = self._get("hook_pos_embed", "positions") if has_pos else np.zeros_like(self.embed)
        self.mlp_out = [self._get(f"blocks.{lay}.hook_mlp_out", "error nodes") for lay in range(L)]
        if self.raw_resid:
            toks = np.asarray(self.r.tokens, np.int64)
            self.embed = self.embed + self.w["raw/W_E.mean"][toks][:, None]
            if has_pos:
                self.pos_embed = self.pos_embed + self.w["raw/W_pos.mean"][: self.n][:, None]
            w_out, b_out = self.w["raw/W_out.mean"], self.w["raw/b_out.mean"]
            for lay in range(L):
                post = self._get(f"blocks.{lay}.mlp.hook_post", "the raw residual")
                self.mlp_out[lay] = self.mlp_out[lay] + (post @ w_out[lay] + b_out[lay])[:, None]
        self.sc1 = [self._get(f"blocks.{lay}.ln1.hook_scale", "frozen norms")[:, 0] for lay in range(L)]
        self.sc2 = [self._get(f"blocks.{lay}.ln2.hook_scale", "frozen norms")[:, 0] for lay in range(L)]
        self.scf = self._get("ln_final.hook_scale", "frozen norms")[:, 0]
        for lay in range(L):
            try:
                attention_source(self.trace, self.run, lay)
            except HexRayError as e:
                raise HexRayError(f"an attribution graph freezes attention: {e}") from None

    # -- frozen attention ---------------------------------------------------------------------------------

    def blocks(self, layer: int, P: int):
        """``(q0, q1, rows [H, q1 - q0, q1])`` for queries below P: cached patterns or recomputed rows."""
        if self._cache_patterns:
            if layer not in self._patterns:
                pat = np.zeros((self.H, self.n, self.n), np.float32)
                for q0, q1, rows in attention_blocks(self.trace, self.run, layer, elements=BLOCK_ELEMENTS):
                    pat[:, q0:q1, :q1] = rows
                self._patterns[layer] = pat
            pat = self._patterns[layer]
            step = max(1, BLOCK_ELEMENTS // (self.H * P))
            for q0 in range(0, P, step):
                q1 = min(P, q0 + step)
                yield q0, q1, pat[:, q0:q1, :q1]
            return
        for q0, q1, rows in attention_blocks(self.trace, self.run, layer, elements=BLOCK_ELEMENTS):
            if q0 >= P:
                return
            q1c = min(q1, P)
            yield q0, q1c, rows[:, : q1c - q0, :q1c]

    def _centre(self, x: np.ndarray) -> np.ndarray:
        return x - x.mean(-1, keepdims=True) if self.ln else x

    def attn_forward(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The frozen attention output of a residual ``x [n, d]`` (biases included)."""
        v = (self._centre(x) / self.sc1[layer][:, None]) @ self.W_V[layer].transpose(1, 0, 2).reshape(self.d, -1)
        v = v.reshape(self.n, -1, self.dh)  # [n, H_kv, dh]
        z = np.zeros((self.n, self.H, self.dh), np.float32)
        for q0, q1, rows in self.blocks(layer, self.n):
            for h in range(self.H):
                z[q0:q1, h] = rows[h] @ v[:q1, h // self.rep]
        return z.reshape(self.n, -1) @ self.W_O[layer].reshape(-1, self.d) + self.b_attn[layer]

    def attn_backward(self, layer: int, G: np.ndarray) -> np.ndarray:
        """Gradient at ``resid_pre`` through the frozen attention from the gradient ``G [B, P, d]`` at its output."""
        B, P, _ = G.shape
        H, dh, d = self.H, self.dh, self.d
        # matrix products, not einsum (which would loop in C without BLAS)
        Y = (G.reshape(B * P, d) @ self.W_O[layer].reshape(H * dh, d).T).reshape(B, P, H, dh)
        Y = np.ascontiguousarray(Y.transpose(2, 1, 0, 3)).reshape(H, P, B * dh)
        Z = np.zeros_like(Y)
        for q0, q1, rows in self.blocks(layer, P):
            for h in range(H):
                Z[h, :q1] += rows[h].T @ Y[h, q0:q1]
        n_kv = self.W_V.shape[1]
        Z = Z.reshape(n_kv, self.rep, P, B, dh).sum(1)  # per key/value group
        Z = np.ascontiguousarray(Z.transpose(1, 2, 0, 3)).reshape(P * B, n_kv * dh)
        out = (Z @ self.W_V[layer].transpose(0, 2, 1).reshape(n_kv * dh, d)).reshape(P, B, d).transpose(1, 0, 2)
        out = out / self.sc1[layer][None, :P, None]
        return self._centre(out)

    # -- the transcoders' inputs and the nodes --------------------------------------------------------------

    def tc_input(self, layer: int, mid: np.ndarray) -> np.ndarray:
        """What ``layer``'s transcoder reads, from the residual ``mid [n, d]`` the model carries."""
        tc = self.tc.layers[layer]
        if tc.hook_in.endswith("hook_resid_mid"):
            return mid
        x = self._centre(mid) / self.sc2[layer][:, None]
        if self.ln2_w[layer] is not None:
            x = x * self.ln2_w[layer]
        if self.ln2_b[layer] is not None:
            x = x + self.ln2_b[layer]
        return x

    def input_grad(self, layer: int, g: np.ndarray, pos) -> np.ndarray:
        """Gradient at ``resid_mid`` of a linear read ``g · input`` of ``layer``'s transcoder input (``g [..., d]``,
        ``pos`` its positions): through the frozen ln2 unless the transcoder reads the residual itself."""
        tc = self.tc.layers[layer]
        if tc.hook_in.endswith("hook_resid_mid"):
            return g
        if self.ln2_w[layer] is not None:
            g = g * self.ln2_w[layer]
        return self._centre(g) / np.asarray(self.sc2[layer][pos], np.float32)[..., None]

    def input_direction(self, layer: int, pos: int, feature: int) -> tuple[np.ndarray, float]:
        """(u, c): the feature's pre-activation is u · resid_mid[pos] + c exactly, c its named constant (encoder
        bias, the raw norm's bias through the encoder, the decoder bias when subtracted from the input)."""
        tc = self.tc.layers[layer]
        w = tc.W_enc[:, feature].astype(np.float32)
        c = float(tc.b_enc[feature])
        if tc.apply_b_dec_to_input:
            c -= float((tc.b_dec if tc.b_dec.ndim == 1 else tc.b_dec[0]) @ w)
        if self.ln2_b[layer] is not None and not tc.hook_in.endswith("hook_resid_mid"):
            c += float(self.ln2_b[layer] @ w)
        return self.input_grad(layer, w, pos), c

    def _write(self, v: np.ndarray) -> np.ndarray:
        """A vector written into the residual as the model carries it: centred in compatibility mode (a LayerNorm
        downstream removes the mean anyway), as is in the raw residual."""
        return v if self.raw_resid else self._centre(v)

    def decoder(self, layer: int, features: np.ndarray, out_layer: int) -> np.ndarray:
        """[len(features), d] decoder vectors of ``layer``'s features into ``out_layer``'s MLP output."""
        W = self.tc.layers[layer].W_dec
        v = W[features, out_layer - layer] if W.ndim == 3 else W[features]
        return self._write(v.astype(np.float32))

    def skip(self, layer: int, mid: np.ndarray) -> np.ndarray:
        """The transcoder's skip connection ``input @ W_skip.T`` (zero without one): linear, so not detached."""
        W = self.tc.layers[layer].W_skip
        if W is None:
            return np.zeros_like(mid)
        return self._write(self.tc_input(layer, mid) @ W.T)

    def _forward(self) -> None:
        """Run the frozen model once: feature activations, reconstructions, error nodes, the final residual."""
        L, n = self.L, self.n
        clt = self.tc.kind == "clt"
        x = self.embed + self.pos_embed
        self.resid_mid: list[np.ndarray] = []
        self.resid_pre: list[np.ndarray] = []
        f_layer, f_pos, f_feat, f_act, f_pre = [], [], [], [], []
        recon = [np.zeros((n, self.d), np.float32) for _ in range(L)]
        self.pos0 = [np.zeros(self.d, np.float32) for _ in range(L)]  # position 0's MLP writes, when zeroed
        self.errors: list[np.ndarray] = []
        for lay in range(L):
            self.resid_pre.append(x)
            mid = x + self.attn_forward(lay, x)
            self.resid_mid.append(mid)
            tc = self.tc.layers[lay]
            pre = tc.pre_acts(self.tc_input(lay, mid)).astype(np.float32)
            act = tc.activation(pre)
            pos, feat = np.nonzero(act[1:] if self.zero_first else act)  # row-major: by position, then feature
            pos = pos + 1 if self.zero_first else pos
            f_layer.append(np.full(len(pos), lay, np.int32))
            f_pos.append(pos.astype(np.int32))
            f_feat.append(feat.astype(np.int32))
            f_act.append(act[pos, feat].astype(np.float32))
            f_pre.append(pre[pos, feat].astype(np.float32))
            W = tc.W_dec
            for out in range(lay, L if clt else lay + 1):
                dec = W[:, out - lay] if W.ndim == 3 else W
                recon[out] += act @ dec
                if self.zero_first:
                    self.pos0[out] += self._write(act[0] @ dec)
            recon[lay] += self.tc.layers[lay].b_dec if self.tc.layers[lay].b_dec.ndim == 1 \
                else self.tc.layers[lay].b_dec[0]
            err = self.mlp_out[lay] - self._write(recon[lay]) - self.skip(lay, mid)
            if self.zero_first:  # circuit-tracer zeroes position 0: its error joins the constants
                self.pos0[lay] += err[0]
                err[0] = 0
            self.errors.append(err)
            x = mid + self.mlp_out[lay]
        self.resid_final = x
        cat = np.concatenate
        self.f_layer, self.f_pos, self.f_feat = cat(f_layer), cat(f_pos), cat(f_feat)
        self.f_act, self.f_pre = cat(f_act), cat(f_pre)
        self.layer_start = np.searchsorted(self.f_layer, np.arange(L + 1)).astype(np.int64)
        self.n_features = len(self.f_layer)
        self.b_dec = [self._write(np.asarray(self.tc.layers[lay].b_dec, np.float32).reshape(-1, self.d)[0])
                      for lay in range(L)]
        name = f"blocks.{L - 1}.hook_resid_post"
        self.drift = None
        if self.trace.has(name, self.run):
            rec = np.asarray(self.trace.tensor(name, self.run), np.float32)
            mine = self._centre(x) if self.raw_resid else x  # the trace is centred
            self.drift = float(np.abs(rec - mine).max() / max(float(np.abs(rec).max()), 1e-30))

    # -- sources: features, then errors (layer-major), then tokens -----------------------------------------

    @property
    def n_sources(self) -> int:
        return self.n_features + self.L * self.n + self.n

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.L * self.n + pos

    # -- the backward pass ---------------------------------------------------------------------------------

    def backward(self, targets: list[Target]) -> tuple[np.ndarray, np.ndarray]:
        """Direct effects of every source on each target: ``(edges [B, n_sources], const [B])``: target value =
        edges.sum(1) + const, where const gathers the frozen biases (positional embeddings, attention output and
        value biases, transcoder decoder biases) reaching the target."""
        B, L, d = len(targets), self.L, self.d
        P = max(t.pos for t in targets) + 1
        G = np.zeros((B, P, d), np.float32)
        edges = np.zeros((B, self.n_sources), np.float32)
        const = np.zeros(B, np.float64)
        clt = self.tc.kind == "clt"

        def inject(stage, layer) -> bool:
            hit = False
            for b, t in enumerate(targets):
                if t.stage == stage and (stage == "final" or t.layer == layer):
                    G[b, t.pos] += t.u
                    hit = True
            return hit

        live = inject("final", L)  # until a target enters, G is zero: the layers above it cost nothing
        for lay in range(L - 1, -1, -1):
            if live:
                # G: gradient at resid_post[lay]; the MLP's writes (features, error, decoder bias) land here
                for src in range(0, lay + 1) if clt else (lay,):
                    self._feature_edges(src, lay, G, edges)
                e0 = self.error_index(lay, 0)
                edges[:, e0:e0 + P] = np.einsum("bpd,pd->bp", G, self.errors[lay][:P])
                const += G.sum(1) @ self.b_dec[lay] + G[:, 0] @ self.pos0[lay]
                if self.tc.layers[lay].W_skip is not None:  # the skip connection is the MLP's only live path
                    G = G + self.input_grad(lay, self._write_grad(G) @ self.tc.layers[lay].W_skip, np.arange(P))
            live |= inject("mid", lay)  # otherwise the MLP is detached: the residual carries G on unchanged
            if live:
                const += G.sum(1) @ self.b_attn[lay]
                G += self.attn_backward(lay, G)
            live |= inject("pre", lay)
        t0 = self.token_index(0)
        edges[:, t0:t0 + P] = np.einsum("bpd,pd->bp", G, self.embed[:P])
        const += np.einsum("bpd,pd->b", G, self.pos_embed[:P])
        return edges, const

    def backward_batched(self, targets: list[Target], grad_elements: int = 1 << 22, min_batch: int = 8):
        """``backward`` in batches whose gradient stays under ``grad_elements`` floats."""
        P = max(t.pos for t in targets) + 1
        bs = max(min_batch, grad_elements // max(P * self.d, 1))
        parts = [self.backward(targets[a:a + bs]) for a in range(0, len(targets), bs)]
        return np.concatenate([e for e, _ in parts]), np.concatenate([c for _, c in parts])

    def _write_grad(self, G: np.ndarray) -> np.ndarray:
        """The gradient a raw write sees: as is in the raw residual; centred in compatibility mode, where the model
        carries centre(write)."""
        return G if self.raw_resid else self._centre(G)

    def _feature_edges(self, layer: int, out_layer: int, G: np.ndarray, edges: np.ndarray) -> None:
        """Edges from ``layer``'s active features through their writes into ``out_layer``'s MLP output."""
        P = G.shape[1]
        lo, hi = int(self.layer_start[layer]), int(self.layer_start[layer + 1])
        hi = lo + int(np.searchsorted(self.f_pos[lo:hi], P))  # positions sorted within a layer
        chunk = max(1, (1 << 22) // max(G.shape[0] * self.d, 1))
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            dec = self.decoder(layer, self.f_feat[a:b], out_layer)  # [m, d]
            g = G[:, self.f_pos[a:b]]  # [B, m, d]
            edges[:, a:b] += np.einsum("bmd,md->bm", g, dec) * self.f_act[a:b]
