"""Helpers for the language-server tests (owned by the LSP work; conftest.py belongs to the recorder).

* `write_synthetic_trace`: a contract-conformant `.hxr` recording (docs/ARCHITECTURE.md, "What a
  recording contains") made with numpy only, whose numbers are self-consistent (every logit is
  the sum of its direct contributions, per-head and per-neuron sums match the layer outputs).
  It needs no torch, so the pure unit tests run in milliseconds, and it can build shapes a real
  tokenizer makes rarely (tokens that split a character, overlapping spans, several runs, a
  generated continuation, no kit).
* `tiny_gpt2_factory` / `tiny_gpt2_big_context_factory` / `crashing_factory`: model factories for
  the record worker's ``modelFactory`` setting (``tests.lsp_support:tiny_gpt2_factory``).
* LSP client helpers shared by the test modules: `units`, `hover_at`, `open_doc`.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TOKEN_RE = re.compile(r" ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]|\s+")


def synthetic_tokenize(text: str, *, split_non_ascii: bool = True):
    """Word-ish tokens; every non-ASCII character is split into one token per UTF-8 byte.

    Returns (token_strs, char_spans, byte_spans) per the trace contract: a token that covers part of a
    character gets the whole character's span.
    """
    strs, cspans, bspans = [], [], []
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8", "surrogatepass")))
    for m in _TOKEN_RE.finditer(text):
        s, e = m.start(), m.end()
        piece = m.group()
        if split_non_ascii and not piece.isascii():
            i = s
            while i < e:
                ch = text[i]
                if ch.isascii():
                    j = i
                    while j < e and text[j].isascii():
                        j += 1
                    strs.append(text[i:j])
                    cspans.append([i, j])
                    bspans.append([byte_at[i], byte_at[j]])
                    i = j
                    continue
                b = ch.encode("utf-8", "surrogatepass")
                for k in range(len(b)):
                    strs.append(ch if len(b) == 1 else "\ufffd")
                    cspans.append([i, i + 1])
                    bspans.append([byte_at[i] + k, byte_at[i] + k + 1])
                i += 1
        else:
            strs.append(piece)
            cspans.append([s, e])
            bspans.append([byte_at[s], byte_at[e]])
    return strs, cspans, bspans


def write_synthetic_trace(path, texts, *, n_layers: int = 2, d_model: int = 16, n_heads: int = 2, d_mlp: int = 32,
                          top_k: int = 5, bos: bool = True, bundle_kit: bool = True, seed: int = 0,
                          generated: str = "", model_name: str = "synthetic", peaked: float = 3.0) -> str:
    """Write a recording of ``texts`` (one run each) by a random numpy 'model'. Returns the path."""
    from trace_format import WEIGHTS_RUN, TraceWriter

    if isinstance(texts, str):
        texts = [texts]
    rng = np.random.default_rng(seed)
    runs = []
    vocab: dict[str, int] = {"<|bos|>": 0}
    for text in texts:
        full = text + generated
        strs, cspans, bspans = synthetic_tokenize(full)
        ids = []
        for i, s in enumerate(strs):
            key = s if s != "\ufffd" else f"<0x{full.encode()[bspans[i][0]]:02X}>"
            ids.append(vocab.setdefault(key, len(vocab)))
        n_prompt = len(synthetic_tokenize(text)[0])
        if bos:
            strs, cspans, bspans, ids = (["<|bos|>"] + strs, [[-1, -1]] + cspans, [[-1, -1]] + bspans, [0] + ids)
            n_prompt += 1
        runs.append((full, strs, cspans, bspans, ids, n_prompt))
    names = sorted(vocab, key=vocab.get)
    for extra in (" the", " a", ".", "\n", " model"):
        if extra not in vocab:
            vocab[extra] = len(vocab)
            names.append(extra)
    V = len(vocab) + 8
    names += [f"<extra{i}>" for i in range(V - len(names))]
    d_head = d_model // n_heads
    W_U = rng.normal(size=(d_model, V)).astype(np.float32)
    b_U = (0.1 * rng.normal(size=V)).astype(np.float32)
    W_O = (0.5 * rng.normal(size=(n_layers, n_heads, d_head, d_model))).astype(np.float32)
    b_O = (0.1 * rng.normal(size=(n_layers, d_model))).astype(np.float32)
    W_out = (0.3 * rng.normal(size=(n_layers, d_mlp, d_model))).astype(np.float32)
    b_out = (0.1 * rng.normal(size=(n_layers, d_model))).astype(np.float32)
    kit_sha = f"{seed:016x}" + "ab" * 24
    meta = {
        "hexray": {"version": "0.1.0", "trace": "recording"},
        "model": {"name": model_name, "source": "memory", "class": "Synthetic", "dtype": "float32",
                  "config": {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_head": d_head,
                             "d_mlp": d_mlp, "d_vocab": V, "n_ctx": 1 << 16, "normalization_type": "LN",
                             "positional_embedding_type": "standard", "gated_mlp": False}},
        "tokenizer": {"name": "synthetic", "vocab_size": V, "bos_token_id": 0 if bos else None},
        "kit": {"sha256": kit_sha, "bundled": bundle_kit, "vocab": names},
        "hooks": {"set": "default"},
    }
    with TraceWriter(path, meta=meta) as w:
        for full, strs, cspans, bspans, ids, n_prompt in runs:
            n = len(ids)
            w.begin_run(prompt=full, tokens=ids, token_strs=strs, char_spans=cspans, byte_spans=bspans,
                        n_prompt_tokens=n_prompt, generated={"n": n - n_prompt, "temperature": 0.0, "seed": None},
                        prepend_bos=bos)
            embed = rng.normal(size=(n, d_model)).astype(np.float32)
            # make the actual next token likely: push the embedding toward its unembedding
            for p in range(n - 1):
                embed[p] += peaked * W_U[:, ids[p + 1]] / np.linalg.norm(W_U[:, ids[p + 1]]) * rng.uniform(0, 2)
            pos = (0.3 * rng.normal(size=(n, d_model))).astype(np.float32)
            w.write("hook_embed", embed)
            w.write("hook_pos_embed", pos)
            resid = embed + pos
            for layer in range(n_layers):
                w.write(f"blocks.{layer}.hook_resid_pre", resid)
                z = (0.5 * rng.normal(size=(n, n_heads, d_head))).astype(np.float32)
                attn = np.einsum("nhk,hkd->nd", z, W_O[layer]) + b_O[layer]
                post = np.maximum(rng.normal(size=(n, d_mlp)), 0).astype(np.float32)
                mlp = post @ W_out[layer] + b_out[layer]
                w.write(f"blocks.{layer}.attn.hook_z", z)
                w.write(f"blocks.{layer}.hook_attn_out", attn.astype(np.float32))
                w.write(f"blocks.{layer}.mlp.hook_post", post)
                w.write(f"blocks.{layer}.hook_mlp_out", mlp.astype(np.float32))
                resid = (resid + attn + mlp).astype(np.float32)
                w.write(f"blocks.{layer}.hook_resid_post", resid)
            centred = resid - resid.mean(-1, keepdims=True)
            scale = np.sqrt((centred.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5).astype(np.float32)
            w.write("ln_final.hook_scale", scale)
            logits = (centred / scale) @ W_U + b_U
            lse = np.logaddexp.reduce(logits.astype(np.float64), axis=-1)
            k = min(top_k, V)
            top = np.argsort(-logits, axis=-1)[:, :k]
            w.write("hexray.topk_ids", top.astype(np.int32))
            w.write("hexray.topk_logits", np.take_along_axis(logits, top, -1).astype(np.float32))
            nxt = np.full(n, np.nan, dtype=np.float32)
            nxt[:-1] = logits[np.arange(n - 1), ids[1:]]
            w.write("hexray.next_logit", nxt)
            w.write("hexray.logsumexp", lse.astype(np.float32))
            uids = np.unique(np.concatenate([np.asarray(ids), top.reshape(-1)])).astype(np.int32)
            w.write("hexray.unembed_ids", uids)
            w.write("hexray.unembed_cols", np.ascontiguousarray(W_U[:, uids].T))
            w.write("hexray.unembed_bias", b_U[uids])
            w.end_run()
        if bundle_kit:
            for name, arr in (("W_U", W_U), ("b_U", b_U), ("W_O", W_O), ("b_O", b_O), ("W_out", W_out),
                              ("b_out", b_out)):
                w.write(f"kit/{name}", arr, run=WEIGHTS_RUN)
    return os.fspath(path)


# -- model factories for the worker's `modelFactory` setting ------------------------------------

def _tiny(n_ctx: int):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tests import tiny_models

    tok = tiny_models.build_tokenizer()
    return tiny_models.build_tiny_gpt2(tok, n_ctx=n_ctx), tok


def tiny_gpt2_factory():
    """Tiny GPT-2 (2 layers, d_model 64, n_ctx 256) with the in-memory byte-level BPE tokenizer."""
    return _tiny(256)


def tiny_gpt2_big_context_factory():
    """The same tiny GPT-2 with n_ctx 8192, for the 6,000-token benchmark."""
    return _tiny(8192)


def crashing_factory():
    """A factory that kills the worker process, to test that the server survives it."""
    os._exit(3)


# -- LSP client helpers ---------------------------------------------------------------------------

def units(s: str, encoding: str) -> int:
    if encoding == "utf-8":
        return len(s.encode("utf-8"))
    if encoding == "utf-32":
        return len(s)
    return len(s.encode("utf-16-le")) // 2


def position_of(text: str, offset: int, encoding: str) -> tuple[int, int]:
    """LSP (line, character) of a code point offset, computed independently of the server's index."""
    line_start = 0
    line = 0
    for m in re.finditer(r"\r\n|\r|\n", text):
        if m.end() > offset:
            break
        line += 1
        line_start = m.end()
    return line, units(text[line_start:offset], encoding)
