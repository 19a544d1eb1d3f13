"""Replay's numbers against TransformerLens's own computation on the same input.

Tiny GPT-2 (LayerNorm, learned positions) and tiny Llama (RMSNorm, rotary, gated MLP, GQA), with
norms and biases perturbed so weight folding matters, recorded to real trace files; TransformerLens
runs the same tokens through the same bridge in compatibility mode.

Tolerances. float32 traces: 1e-5 relative to the largest value compared (both sides do the same
float32 arithmetic in a different order). float16/bfloat16 traces store each activation rounded
to the nearest representable value, a relative error of at most eps/2 (eps = 2**-10 for float16,
2**-7 for bfloat16); the final norm's scale is rounded the same way. A contribution c·u then
differs from the float32 value by at most eps/2 · Σ|c_i u_i| (activations) plus eps/2 · |c·u|
(scale), so each component is checked against eps · Σ|c_i u_i| + 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

from hexray_core.replay import open_trace

EPS = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
PROMPT = "The quick brown fox 🦊 jumps over the lazy dog. 苹果"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_kind(request):
    return request.param


@pytest.fixture(scope="module")
def recorder(request, model_kind):
    return request.getfixturevalue(f"tiny_{model_kind}_recorder")


@pytest.fixture(scope="module")
def tl_run(recorder):
    """TransformerLens's logits and cache for PROMPT on the recorder's own bridge."""
    import torch

    torch.set_grad_enabled(False)
    ids = recorder.tokenize(PROMPT, True)
    logits, cache = recorder.bridge.run_with_cache(torch.tensor([ids]))
    return ids, logits, cache


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def recorded(request, recorder, tmp_path_factory):
    """A trace without the precomputed lens: replay computes everything from activations and the kit."""
    path = tmp_path_factory.mktemp("agree") / f"{request.param}.hxr"
    recorder.record(PROMPT, path, act_dtype=request.param, lens=False)
    trace = open_trace(path)
    assert not trace.has("hexray.lens_topk_ids")
    return request.param, trace


def _tl_dla(cache, bridge, stack, p, target):
    return cache.logit_attrs(stack, tokens=target, pos_slice=p)[:, 0].numpy().astype(np.float64)


def _bound(cache, bridge, stack, p, target, eps):
    """eps · Σ_i |c_i u_i| per component, u the scaled, centred unembedding direction."""

    u = bridge.W_U[:, target].double()
    if bridge.cfg.normalization_type.upper().startswith("LN"):
        u = u - u.mean()
    scale = cache["ln_final.hook_scale"][0, p].double()
    terms = (stack[:, 0].double().abs() * (u / scale).abs()).sum(-1)
    return eps * terms.numpy() + 1e-6 if eps else None


def _check(mine, theirs, bound):
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    if bound is None:
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
    else:
        err = np.abs(mine - theirs)
        assert (err <= bound).all(), f"max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("position", [-1, 5])
def test_components_agree_and_sum_to_the_logit(recorder, tl_run, recorded, position):
    dtype, trace = recorded
    ids, logits, cache = tl_run
    assert trace.runs[0].tokens == ids
    p = position % len(ids)
    a = trace.attribution(position)
    target = int(logits[0, p].argmax())
    assert a.target_id == target
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=p, return_labels=True)
    theirs = _tl_dla(cache, recorder.bridge, stack, p, target)
    names = {"embed": "Embed", "pos_embed": "PosEmbed"}
    mine = a.by_label()
    mine_ordered = [mine[names.get(lab) or ("Attn L" if "attn" in lab else "MLP L") + lab.split("_")[0]]
                    for lab in labels]
    _check(mine_ordered, theirs, _bound(cache, recorder.bridge, stack, p, target, EPS[dtype]))
    # Completeness: the parts and the bias add up to the logit the model produced.
    true_logit = float(logits[0, p, target])
    assert a.error < 1e-4 if dtype == "float32" else a.error < 1e-4 + EPS[dtype] * sum(
        abs(c.value) for c in a.contributions) * 4
    assert abs(a.logit - true_logit) < 1e-4 * max(1.0, abs(true_logit))
    assert abs(float(a.probability) - float(logits[0, p].softmax(-1)[target])) < 1e-5


def test_heads_agree(recorder, tl_run, recorded):
    dtype, trace = recorded
    ids, logits, cache = tl_run
    p = len(ids) - 1
    target = int(logits[0, p].argmax())
    a = trace.attribution(-1, by="head")
    heads, labels = cache.stack_head_results(layer=-1, pos_slice=p, return_labels=True)
    theirs = _tl_dla(cache, recorder.bridge, heads, p, target)
    mine = a.by_label()
    _check([mine[lab] for lab in labels], theirs, _bound(cache, recorder.bridge, heads, p, target, EPS[dtype]))
    # Each layer's heads plus its bias equal the whole attention layer.
    comp = trace.attribution(-1).by_label()
    for layer in range(trace.n_layers):
        parts = sum(v for k, v in mine.items() if k.startswith(f"L{layer}H")) + mine[f"Attn L{layer} bias"]
        assert parts == pytest.approx(comp[f"Attn L{layer}"], abs=1e-4 + 4 * EPS[dtype] * abs(comp[f"Attn L{layer}"]))
    assert a.error < 1e-4 + 4 * EPS[dtype] * sum(abs(c.value) for c in a.contributions)


def test_neurons_agree(recorder, tl_run, recorded):
    dtype, trace = recorded
    ids, logits, cache = tl_run
    p = len(ids) - 1
    target = int(logits[0, p].argmax())
    a = trace.attribution(-1, by="neuron")
    full, labels = cache.get_full_resid_decomposition(layer=-1, expand_neurons=True, pos_slice=p, return_labels=True)
    keep = [i for i, lab in enumerate(labels) if "N" in lab and lab.startswith("L")]
    theirs = _tl_dla(cache, recorder.bridge, full[keep], p, target)
    mine = a.by_label()
    _check([mine[labels[i]] for i in keep], theirs, _bound(cache, recorder.bridge, full[keep], p, target, EPS[dtype]))
    assert len([c for c in a.contributions if c.kind == "neuron"]) == len(keep)
    assert a.error < 1e-4 + 4 * EPS[dtype] * sum(abs(c.value) for c in a.contributions)


def test_logit_lens_agrees(recorder, tl_run, recorded):
    from transformer_lens.tools.analysis import logit_lens

    dtype, trace = recorded
    ids, logits, cache = tl_run
    p = len(ids) - 1
    theirs = logit_lens(cache, positions=p, top_k=5).readout
    lens = trace.logit_lens(-1, top_k=5)
    assert [layer.label for layer in lens.layers] == ["L0 pre", "L1 pre", "final"]
    for i, layer in enumerate(lens.layers):
        tl_ids = theirs.top_ids[i, 0].tolist()
        tl_vals = theirs.values[i, 0].numpy()
        if dtype == "float32":
            assert [t for t, _, _ in layer.top] == tl_ids
            np.testing.assert_allclose(layer.top_logits, tl_vals, rtol=1e-5, atol=1e-4)
        else:
            # Rounded activations may swap near-ties; the logits of TL's top tokens must still match.
            np.testing.assert_allclose(sorted(layer.top_logits, reverse=True), tl_vals,
                                       atol=8 * EPS[dtype] * np.abs(tl_vals).max() + 1e-4)
    final = lens.layers[-1]
    assert final.target_rank == 1
    assert final.target_prob == pytest.approx(float(logits[0, p].softmax(-1).max()), abs=1e-3 if EPS[dtype] else 1e-5)


@pytest.mark.parametrize("act_dtype", ["float32", "float16"])
@pytest.mark.parametrize("target", [None, "next"])
def test_recorded_logit_lens_agrees(recorder, tl_run, tmp_path, act_dtype, target):
    """The lens the recorder precomputes (from unrounded activations) equals TransformerLens's in any act dtype."""
    from transformer_lens.tools.analysis import logit_lens

    ids, logits, cache = tl_run
    path = recorder.record(PROMPT, tmp_path / "lens.hxr", act_dtype=act_dtype, lens=True).path
    trace = open_trace(path)
    assert trace.meta["storage"]["lens"] is True
    for p in (3, len(ids) - 2):
        theirs = logit_lens(cache, positions=p, top_k=5).readout
        lens = trace.logit_lens(p, top_k=5, target=target)
        want = int(logits[0, p].argmax()) if target is None else ids[p + 1]
        assert lens.target_id == want
        for i, layer in enumerate(lens.layers):
            assert [t for t, _, _ in layer.top] == theirs.top_ids[i, 0].tolist()
            np.testing.assert_allclose(layer.top_logits, theirs.values[i, 0].numpy(), rtol=1e-5, atol=1e-4)
        # Rank and probability of the target at each layer, against TransformerLens's full readout.
        full = logit_lens(cache, positions=p).readout.values[:, 0]  # [layers + 1, vocab]
        for i, layer in enumerate(lens.layers):
            row = full[i].double()
            assert layer.target_rank == int((row > row[want]).sum()) + 1
            assert layer.target_prob == pytest.approx(float(row.softmax(-1)[want]), abs=1e-5)
