"""Attention in linear space: traces store q and k, replay recomputes patterns that equal the model's.

Reference: ``run_with_cache``'s ``hook_pattern`` on the same bridge and tokens. Models: tiny GPT-2
(learned positions), Llama (rotary, grouped-query attention 4/2), Mistral (sliding window of 4) and
Gemma-2 (soft-capped logits, sliding and global layers alternating, a non-1/sqrt(d) query scale).

Bounds. A float32 trace holds q and k exactly: recomputed weights equal the model's up to float32
arithmetic (1e-5). A float16 trace rounds each q_i and k_i with unit roundoff u = 2^-11, so a score
scale·Σ q_i k_i moves by at most Δ = |scale|·Σ_i |q_i k_i|·(2u + u²) (soft-capping only shrinks
differences), and softmax turns score shifts within ±Δ into weight ratios within [e^-2Δ, e^2Δ]:
|p̂ - p| ≤ max(p, p̂)·(e^2Δ - 1) (``rounding_bound``; the recorder checks sampled rows against the
same bound while the model runs).
"""

from __future__ import annotations

import numpy as np
import pytest

import hexray
from hexray_core.errors import HexRayError
from hexray_core.replay.attention import (
    attention_blocks,
    attention_pattern,
    attention_row,
    attention_rows,
    rounding_bound,
)
from hexray_core.replay.cot import step_attention
from trace_format import TraceReader

PROMPT = "Alice and Bob went to the store. Bob gave a drink to Alice, and then"
ARCHS = ["gpt2", "llama", "mistral", "gemma2"]


def _recorder(tiny, tok, arch, seed=0):
    from hexray_core.record import Recorder

    build = {"gpt2": tiny.build_tiny_gpt2, "llama": tiny.build_tiny_llama, "mistral": tiny.build_tiny_mistral,
             "gemma2": tiny.build_tiny_gemma2, "bloom": tiny.build_tiny_bloom}[arch]
    return Recorder(build(tok, seed=seed), tokenizer=tok)


def _patterns(rec, ids):
    import torch

    with torch.no_grad():
        _, cache = rec.bridge.run_with_cache(torch.tensor([ids]), remove_batch_dim=True)
    n_layers = int(rec.bridge.cfg.n_layers)
    return [cache[f"blocks.{i}.attn.hook_pattern"].float().numpy() for i in range(n_layers)]


@pytest.fixture(scope="module", params=ARCHS)
def arch_recorder(request, tiny, tiny_tokenizer):
    return request.param, _recorder(tiny, tiny_tokenizer, request.param)


@pytest.mark.parametrize("act_dtype", ["float32", "float16"])
def test_recomputed_patterns_equal_hook_pattern(arch_recorder, tmp_path, act_dtype):
    arch, rec = arch_recorder
    events = []
    res = rec.record(PROMPT, tmp_path / "t.hxr", act_dtype=act_dtype, progress=lambda e, **kw: events.append(e))
    assert "warning" not in events
    t = hexray.open(res.path)
    run = t.runs[0]
    n = run.n_tokens
    assert n > 8  # longer than the sliding window: the last rows exercise it
    spec = t.meta["attention"]
    assert spec["store"] == "qk" and len(spec["layers"]) == t.n_layers
    assert run.info["attention"]["stored_patterns"] == []
    if arch == "mistral":
        assert all(layer["window"] == 4 for layer in spec["layers"])
    if arch == "gemma2":
        assert [layer["window"] for layer in spec["layers"]] == [4, None]
        assert all(layer["softcap"] == 5.0 for layer in spec["layers"])
    wants = _patterns(rec, run.tokens)
    for layer, want in enumerate(wants):
        assert not t.has(f"blocks.{layer}.attn.hook_pattern")
        got = attention_pattern(t, 0, layer)
        assert got.shape == want.shape == (spec["n_heads"], n, n)
        if act_dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{arch} layer {layer}")
        else:
            q = t.tensor(spec["q"].format(layer=layer))
            k = t.tensor(spec["k"].format(layer=layer))
            delta = rounding_bound(q, k, np.arange(n), spec["layers"][layer]["scale"], 2.0 ** -11)[..., None]
            bound = np.maximum(got, want) * np.expm1(2 * delta) + 1e-5
            excess = np.abs(got - want) - bound
            assert excess.max() <= 0, f"{arch} layer {layer}: error over the bound by {excess.max():.3g}"
            assert np.abs(got - want).max() > 0  # the trace really was rounded
        # the row and block interfaces give the same numbers as the whole pattern
        # (products of other shapes round differently: float32 noise only)
        np.testing.assert_allclose(attention_row(t, 0, layer, n - 1), got[:, n - 1, :], rtol=0, atol=1e-6)
        np.testing.assert_allclose(attention_rows(t, 0, layer, [2, -1])[:, 1], got[:, n - 1, :], rtol=0, atol=1e-6)
        seen = 0
        for q0, q1, rows in attention_blocks(t, 0, layer, elements=3 * n * spec["n_heads"]):
            assert rows.shape == (spec["n_heads"], q1 - q0, q1) and q0 == seen
            np.testing.assert_allclose(rows, got[:, q0:q1, :q1], rtol=0, atol=1e-6)  # other sum lengths
            seen = q1
        assert seen == n


def test_default_trace_stores_q_k_v_not_patterns(tiny_llama_recorder, tmp_path):
    res = tiny_llama_recorder.record(PROMPT, tmp_path / "t.hxr")
    with TraceReader(res.path) as r:
        names = set(r.names(0))
        n = len(r.runs[0]["tokens"])
        assert {"blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k", "blocks.0.attn.hook_v"} <= names
        assert not any(name.endswith("hook_pattern") for name in names)
        assert r.info("blocks.1.attn.hook_rot_k", 0).shape == (n, 2, 16)  # per key/value head
        assert r.info("blocks.1.attn.hook_rot_q", 0).shape == (n, 4, 16)
        assert r.info("blocks.1.attn.hook_v", 0).shape == (n, 2, 16)


def test_a_layer_that_cannot_be_recomputed_keeps_its_pattern(tiny, tiny_tokenizer, tmp_path):
    """The record-time check is real: give layer 1 a wrong scale and its patterns are stored instead."""
    rec = _recorder(tiny, tiny_tokenizer, "gpt2", seed=4)
    spec, _ = rec.loaded.cache.setdefault("attention", (rec.attention_spec(), None))
    wrong = {**spec, "layers": [spec["layers"][0], {**spec["layers"][1], "scale": 3 * spec["layers"][1]["scale"]}]}
    rec.loaded.cache["attention"] = (wrong, None)
    warnings = []
    res = rec.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32",
                     progress=lambda e, **kw: warnings.append(kw["message"]) if e == "warning" else None)
    assert len(warnings) == 1 and "layer 1" in warnings[0] and "patterns are stored" in warnings[0]
    t = hexray.open(res.path)
    assert t.runs[0].info["attention"]["stored_patterns"] == [1]
    assert not t.has("blocks.0.attn.hook_pattern") and t.has("blocks.1.attn.hook_pattern")
    wants = _patterns(rec, t.runs[0].tokens)
    for layer in range(2):  # layer 0 recomputed, layer 1 read back: both equal the model's
        np.testing.assert_allclose(attention_pattern(t, 0, layer), wants[layer], atol=1e-5)


def test_alibi_model_stores_patterns_and_says_so(tiny, tiny_tokenizer, tmp_path):
    rec = _recorder(tiny, tiny_tokenizer, "bloom")
    warnings = []
    res = rec.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32",
                     progress=lambda e, **kw: warnings.append(kw["message"]) if e == "warning" else None)
    assert any("ALiBi" in w and "stored as full patterns" in w for w in warnings)
    t = hexray.open(res.path)
    assert "attention" not in t.meta and t.has("blocks.0.attn.hook_pattern")
    wants = _patterns(rec, t.runs[0].tokens)
    np.testing.assert_allclose(attention_row(t, 0, 1, -1), wants[1][:, -1, :], atol=1e-5)


def test_pattern_traces_replay_as_before(tiny_gpt2_recorder, tmp_path):
    """Patterns asked for explicitly (as every trace recorded before q/k) are read, not recomputed, and the
    CoT step attention computed either way is the same."""
    qk = hexray.open(tiny_gpt2_recorder.record(PROMPT, tmp_path / "qk.hxr", act_dtype="float32").path)
    pat = hexray.open(tiny_gpt2_recorder.record(PROMPT, tmp_path / "p.hxr", act_dtype="float32",
                                                hooks="default,blocks.*.attn.hook_pattern").path)
    assert "attention" not in pat.meta and pat.has("blocks.1.attn.hook_pattern")
    for layer in range(2):
        np.testing.assert_allclose(attention_pattern(qk, 0, layer), pat.tensor(f"blocks.{layer}.attn.hook_pattern"),
                                   atol=1e-5)
    steps_of = np.minimum(np.arange(qk.runs[0].n_tokens) // 5, 2)
    np.testing.assert_allclose(step_attention(qk, 0, steps_of, 3), step_attention(pat, 0, steps_of, 3), atol=1e-6)


def test_trace_without_attention_names_the_hooks(tiny_gpt2_recorder, tmp_path):
    t = hexray.open(tiny_gpt2_recorder.record(PROMPT, tmp_path / "t.hxr", hooks="blocks.0.hook_resid_post").path)
    with pytest.raises(HexRayError, match=r"blocks\.0\.attn\.hook_pattern.*--hooks default"):
        attention_row(t, 0, 0, -1)


def test_generation_reports_progress_and_is_reproducible(tiny, tiny_tokenizer, tmp_path):
    """Sampled continuations with a seed repeat exactly; greedy ones equal the full-forward-per-token loop."""
    from hexray_core.record.generate import generate_uncached

    rec = _recorder(tiny, tiny_tokenizer, "llama", seed=2)
    events = []
    a = rec.record("The quick", tmp_path / "a.hxr", generate=12, temperature=0.8, seed=5,
                   progress=lambda e, **kw: events.append(kw) if e == "generate" else None)
    b = rec.record("The quick", tmp_path / "b.hxr", generate=12, temperature=0.8, seed=5)
    with TraceReader(a.path) as ra, TraceReader(b.path) as rb:
        assert ra.runs[0]["tokens"] == rb.runs[0]["tokens"]
        assert ra.runs[0]["generated"] == {"n": 12, "temperature": 0.8, "seed": 5}
    assert [e["done"] for e in events] == list(range(1, 13)) and all(e["tokens_per_s"] > 0 for e in events)
    g = rec.record("The quick", tmp_path / "g.hxr", generate=20)
    ids = rec.tokenize("The quick")
    with TraceReader(g.path) as r:
        assert r.runs[0]["tokens"][len(ids):] == generate_uncached(rec.bridge, ids, 20, device="cpu")
