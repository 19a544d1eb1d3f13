"""Source attribution: each head's direct logit attribution split over the source tokens it read.

Reference: an independent TransformerLens computation on the same bridge and tokens,
pattern[h, q, s] · (v[s, kv(h)] @ W_O[h]) @ centre(W_U[:, t]) / ln_final.hook_scale[q] from
``run_with_cache``, and completeness against ``stack_head_results`` + ``logit_attrs``. float32 traces:
1e-5 relative. float16 traces: v, q and k are rounded (unit roundoff u = 2^-11); with w = W_O[h] @ u_target, each
term Â·(v̂·w) differs from A·(v·w) by at most |ΔA|·|v̂·w| + |Â|·u·Σ_i|v_i w_i|, where |ΔA| is the
attention rounding bound of test_attention_recompute (max(A, Â)·(e^2Δ - 1)); and the per-head
attribution replay computes from the rounded hook_z differs by at most u·Σ_i|z_i w_i| more.
"""

from __future__ import annotations

import numpy as np
import pytest

import hexray
from hexray_core.errors import HexRayError
from hexray_core.replay.sources import source_attribution

PROMPT = "Alice and Bob went to the store. Bob gave a drink to"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def recorder(request):
    return request.getfixturevalue(f"tiny_{request.param}_recorder")


def _reference(rec, ids, q, target):
    import torch

    torch.set_grad_enabled(False)
    _, cache = rec.bridge.run_with_cache(torch.tensor([ids]), remove_batch_dim=True)
    b = rec.bridge
    u = b.W_U[:, target].double()
    if b.cfg.normalization_type.upper().startswith("LN"):
        u = u - u.mean()
    u = u / cache["ln_final.hook_scale"][q].double().reshape(())
    n_heads = b.cfg.n_heads
    out = []
    for layer in range(b.cfg.n_layers):
        A = cache[f"blocks.{layer}.attn.hook_pattern"][:, q, : q + 1].double()  # [h, s]
        v = cache[f"blocks.{layer}.attn.hook_v"][: q + 1].double()  # [s, kv, d]
        kv = torch.arange(n_heads) // (n_heads // v.shape[1])
        through = torch.einsum("shd,hdm,m->hs", v[:, kv], b.W_O[layer].double(), u)
        out.append((A * through).detach().numpy())
    heads = cache.stack_head_results(layer=-1, pos_slice=q)  # [layers*heads, d_model]
    head_dla = cache.logit_attrs(heads[:, None], tokens=target, pos_slice=q, has_batch_dim=False)
    return np.stack(out), head_dla.reshape(b.cfg.n_layers, n_heads).double().detach().numpy()


def _f16_bounds(t, q, target):
    """Per-term and per-head error bounds of a float16 trace against the unrounded model (module docstring)."""
    from hexray_core.replay.attention import attention_row, rounding_bound
    from hexray_core.replay.attribution import final_direction

    u16 = 2.0 ** -11  # float16 unit roundoff
    u, _ = final_direction(t, 0, q, target, None)
    W_O = t.require_kit("test")["W_O"]
    spec = t.meta["attention"]
    terms, heads = [], []
    for layer in range(t.n_layers):
        w = W_O[layer] @ u  # [heads, d_head]
        v = t.tensor(f"blocks.{layer}.attn.hook_v")[: q + 1]
        n_heads = w.shape[0]
        kv = np.arange(n_heads) // (n_heads // v.shape[1])
        vw = np.einsum("shd,hd->hs", v[:, kv], w)
        vw_abs = np.einsum("shd,hd->hs", np.abs(v[:, kv]), np.abs(w))
        A = attention_row(t, 0, layer, q)[:, : q + 1]
        qv, kv_ = t.tensor(spec["q"].format(layer=layer)), t.tensor(spec["k"].format(layer=layer))
        delta = rounding_bound(qv, kv_, [q], spec["layers"][layer]["scale"], u16)[:, 0]
        dA = A * np.expm1(2 * delta)[:, None] / np.exp(-2 * delta)[:, None]  # ≥ max(A, Â)·(e^2Δ - 1)
        terms.append(dA * np.abs(vw) + (A + dA) * u16 * vw_abs * 1.01)
        z = t.tensor(f"blocks.{layer}.attn.hook_z")[q]
        heads.append(u16 * np.einsum("hd,hd->h", np.abs(z), np.abs(w)) * 1.01)
    return np.stack(terms), np.stack(heads)


@pytest.mark.parametrize("act_dtype", ["float32", "float16"])
def test_sources_equal_transformerlens_and_sum_to_heads(recorder, tmp_path, act_dtype):
    t = hexray.open(recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype=act_dtype).path)
    run = t.runs[0]
    for q in (run.n_tokens - 1, run.n_tokens // 2):
        target = int(t.tensor("hexray.topk_ids")[q, 0])
        sa = source_attribution(t, position=q)
        want, heads = _reference(recorder, run.tokens, q, target)
        assert sa.values.shape == (t.n_layers, want.shape[1], q + 1) and sa.target_id == target
        per_head = {c.label: c.value for c in t.attribution(q, by="head").contributions}
        replayed = np.array([[per_head[f"L{layer}H{h}"] for h in range(want.shape[1])] for layer in range(t.n_layers)])
        if act_dtype == "float32":
            scale = np.abs(want).max()
            np.testing.assert_allclose(sa.values, want, rtol=1e-5, atol=1e-5 * scale)
            np.testing.assert_allclose(sa.per_head, heads, rtol=1e-5, atol=1e-5 * np.abs(heads).max())
            np.testing.assert_allclose(sa.per_head, replayed, rtol=1e-5, atol=1e-5 * np.abs(heads).max())
        else:
            term_bound, z_bound = _f16_bounds(t, q, target)
            assert (np.abs(sa.values - want) <= term_bound + 1e-7).all()
            # completeness against the replayed per-head attribution (from the rounded hook_z)
            assert (np.abs(sa.per_head - replayed) <= term_bound.sum(-1) + z_bound + 1e-7).all()


def test_logit_difference_and_top_sources(tiny_llama_recorder, tmp_path):
    t = hexray.open(tiny_llama_recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32").path)
    top = t.tensor("hexray.topk_ids")[-1]
    a = source_attribution(t, target=f"#{top[0]}")
    b = source_attribution(t, target=f"#{top[1]}")
    d = source_attribution(t, target=f"#{top[0]}", baseline=f"#{top[1]}")
    np.testing.assert_allclose(d.values, a.values - b.values, rtol=0, atol=1e-6 * np.abs(a.values).max())
    ranked = d.top_sources(3, heads=2)
    assert len(ranked) == 3 and abs(ranked[0][1]) >= abs(ranked[1][1]) >= abs(ranked[2][1])
    assert ranked[0][1] == pytest.approx(d.per_source[ranked[0][0]])


def test_trace_without_hook_v_names_the_hook(tiny_gpt2_recorder, tmp_path):
    hooks = "hook_embed,hook_pos_embed,blocks.*.hook_attn_out,blocks.*.hook_mlp_out,blocks.*.hook_resid_post," \
            "blocks.*.attn.hook_pattern,ln_final.hook_scale"
    t = hexray.open(tiny_gpt2_recorder.record(PROMPT, tmp_path / "t.hxr", hooks=hooks).path)
    with pytest.raises(HexRayError, match=r"blocks\.0\.attn\.hook_v.*--hooks default"):
        source_attribution(t)
    assert t.attribution().error < 1e-3  # everything else still works


def test_run_method_matches_and_speaks_tokens(tiny_gpt2_recorder, tmp_path):
    t = hexray.open(tiny_gpt2_recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32").path)
    run = t[0]
    top = t.tensor("hexray.topk_ids")[-1]
    np.testing.assert_array_equal(run.source_attribution(-1), source_attribution(t).values)
    text = t.token_str(int(top[1]))
    np.testing.assert_allclose(run.source_attribution(-1, tokens=int(top[0]), incorrect_tokens=text),
                               source_attribution(t, target=f"#{top[0]}", baseline=f"#{top[1]}").values)
    assert run.source_attribution(3).shape == (t.n_layers, 4, 4)


def test_step_sources_sum_per_position_sources(tiny_llama_recorder, tmp_path):
    """A CoT step's sources are the per-position source attributions of its tokens' logits, summed; with the
    layers' b_O they make up the steps' attention attribution."""
    from hexray_core.replay.attribution import logit_directions, next_token_attributions
    from hexray_core.replay.cot import _token_steps, split_steps
    from hexray_core.replay.sources import step_sources

    text = "Step 1: Alice went to the store.\nStep 2: Bob gave a drink to Alice.\nStep 3: so"
    t = hexray.open(tiny_llama_recorder.record(text, tmp_path / "t.hxr", act_dtype="float32").path)
    r = t[0]
    ranges = split_steps(r.prompt, "lines")
    steps_of = _token_steps(r, ranges)
    drawn = step_sources(t, 0, steps_of, len(ranges))
    want = np.zeros_like(drawn)
    for p in range(r.n_tokens - 1):
        if steps_of[p + 1] >= 0:
            want[steps_of[p + 1], : p + 1] += source_attribution(t, position=p, target="next").per_source
    np.testing.assert_allclose(drawn, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    labels, values = next_token_attributions(t, 0)
    attn = values[[i for i, lab in enumerate(labels) if lab.startswith("Attn")]].sum(0)  # [n - 1]
    u, _ = logit_directions(t, 0, np.arange(r.n_tokens - 1), np.asarray(r.tokens[1:]))
    b_O = t.require_kit("test")["b_O"].sum(0) @ u.T  # [n - 1]
    for i in range(len(ranges)):
        rows = np.nonzero(steps_of[1:] == i)[0]
        assert drawn[i].sum() + b_O[rows].sum() == pytest.approx(attn[rows].sum(), abs=1e-4)
    cot = t.cot(mode="lines", sources=True)
    assert cot.steps[0].sources == [] and len(cot.steps[2].sources) == 5
    top = cot.steps[2].sources[0]
    assert top[0] < cot.steps[2].tokens[0] and top[2] == pytest.approx(drawn[2, top[0]])


def _hexray(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "hexray", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_by_source(tiny_gpt2_recorder, tmp_path):
    import json

    path = tiny_gpt2_recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32").path
    t = hexray.open(path)
    sa = source_attribution(t, position=-2, target="next")
    out = _hexray("replay", path, "--by", "source", "--position", -2, "--target", "next", "--top-k", 4, "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)["sources"]
    order = np.argsort(-np.abs(sa.per_source), kind="stable")[:4]
    assert [r["position"] for r in st["rows"]] == order.tolist()
    np.testing.assert_allclose([r["value"] for r in st["rows"]], sa.per_source[order], rtol=1e-9)
    assert st["error"] < 1e-4 and st["total"] == pytest.approx(sa.per_source.sum())
    one = json.loads(_hexray("replay", path, "--by", "source", "--head", "L1H2", "--json").stdout)["sources"]
    full = source_attribution(t)
    assert one["total"] == pytest.approx(full.values[1, 2].sum()) and one["error"] < 1e-4
    text = _hexray("replay", path, "--by", "source", "--top-k", 3).stdout
    assert "through all heads" in text and "via L" in text and "error" in text.splitlines()[-1]
    bad = _hexray("replay", path, "--by", "source", "--head", "L9H0")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "--head" in bad.stderr
    cot = _hexray("replay", path, "--cot", "--split", "sentences", "--by", "source")
    assert cot.returncode == 0 and "draws on:" in cot.stdout, cot.stderr


def test_cli_by_source_without_hook_v(tiny_gpt2_recorder, tmp_path):
    hooks = ("hook_embed,hook_pos_embed,blocks.*.hook_attn_out,blocks.*.hook_mlp_out,blocks.*.hook_resid_post,"
             "blocks.*.attn.hook_pattern,ln_final.hook_scale")
    path = tiny_gpt2_recorder.record(PROMPT, tmp_path / "t.hxr", hooks=hooks).path
    out = _hexray("replay", path, "--by", "source")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "blocks.0.attn.hook_v" in out.stderr and "--hooks default" in out.stderr
    assert _hexray("replay", path).returncode == 0  # the rest still works
