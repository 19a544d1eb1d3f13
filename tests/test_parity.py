"""TransformerLens parity on a trace (issue 25): the weights (`W_E` ... `W_U`, biases) from the kit, `to_tokens`,
`to_str_tokens`, `to_string` from the tokenizer bundled in the kit, and resid_mid / resid_post derived from a
default recording, checked against the TransformerBridge the trace was recorded from (tiny GPT-2 and Llama)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hexray_core.errors import HexRayError
from hexray_core.replay import open_trace

PROMPT = "Alice and Bob went to the store. Bob gave a drink to"
WEIGHTS = ("W_E", "W_pos", "W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_in", "b_in", "W_gate",
           "W_out", "b_out", "W_U", "b_U")
U = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}  # unit roundoff of the storage dtype
TINY = {"float32": 0.0, "float16": 2.0**-25, "bfloat16": 2.0**-134}  # half the smallest subnormal step


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def recorder(request):
    return request.getfixturevalue(f"tiny_{request.param}_recorder")


@pytest.fixture(scope="module")
def tl(recorder):
    import torch

    torch.set_grad_enabled(False)
    ids = recorder.tokenize(PROMPT, True)
    _, cache = recorder.bridge.run_with_cache(torch.tensor([ids]), remove_batch_dim=True)
    return ids, cache


@pytest.fixture(scope="module", params=["float32", "float16"])
def recorded(request, recorder, tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / f"{request.param}.hxr"
    # no resid_mid recorded (--hooks default); eager attention: compared bit for bit with run_with_cache
    recorder.record(PROMPT, path, act_dtype=request.param, lens=False, attention="eager")
    return request.param, str(path)


def _np(x) -> np.ndarray:
    return x.detach().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def test_weights_are_the_bridges(recorder, recorded):
    t = open_trace(recorded[1])
    for name in WEIGHTS:
        try:
            want = getattr(recorder.bridge, name)
        except (AttributeError, NotImplementedError, RuntimeError):  # W_pos of a rotary model
            want = None
        if want is None:
            with pytest.raises(HexRayError, match=rf"model\.{name} is not available: ") as e:
                getattr(t, name)
            assert "\n" not in str(e.value)
            continue
        got = getattr(t, name)
        assert got.shape == tuple(want.shape), name
        np.testing.assert_array_equal(got, want.detach().float().numpy(), err_msg=name)  # float32: the very values


def test_tokenizer_methods_are_the_recorders(recorder, recorded):
    t = open_trace(recorded[1])
    ids = recorder.tokenize(PROMPT, True)
    assert t.to_tokens(PROMPT).tolist() == [ids] == [t[0].tokens]
    assert t.to_tokens(PROMPT, prepend_bos=False).tolist() == [ids[1:]]
    bridge = recorder.bridge
    assert t.to_str_tokens(PROMPT) == bridge.to_str_tokens(PROMPT)
    assert t.to_str_tokens(np.array(ids)) == [recorder.tokenizer.decode([i]) for i in ids]
    assert t.to_string(np.array(ids[1:])) == PROMPT
    assert t.to_string(np.array([ids, ids])) == [recorder.tokenizer.decode(ids)] * 2
    batch = t.to_tokens([PROMPT, "Bob"])
    bob = recorder.tokenize("Bob", True)
    assert batch.shape == (2, len(ids)) and batch[1, :len(bob)].tolist() == bob


def test_tokenizer_comes_from_the_kit_without_transformers(recorded):
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['torch'] = None\n"
            "from hexray_core.replay import open_trace\n"
            "t = open_trace(sys.argv[1]); print(t.to_tokens(sys.argv[2]).tolist(), t.to_str_tokens(sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, recorded[1], "Bob"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[[" in out.stdout


def test_resid_mid_and_post_are_derived_from_a_default_recording(recorded, tl):
    dtype, path = recorded
    t = open_trace(path)
    run = t[0]
    _, cache = tl
    n_layers = t.n_layers
    assert not t.reader.has("blocks.0.hook_resid_mid", 0)
    assert all(f"blocks.{i}.hook_resid_mid" in run for i in range(n_layers))
    u, tiny = U[dtype], TINY[dtype]
    for i in range(n_layers):
        pre, attn, mlp = (_np(cache[f"blocks.{i}.hook_{h}"]) for h in ("resid_pre", "attn_out", "mlp_out"))
        mid, post = _np(cache[f"blocks.{i}.hook_resid_mid"]), _np(cache[f"blocks.{i}.hook_resid_post"])
        got = run[f"blocks.{i}.hook_resid_mid"]
        assert got.dtype == np.float32 and not got.flags.writeable
        if dtype == "float32":  # the block's own float32 sum: the very values
            np.testing.assert_array_equal(got, mid.astype(np.float32))
        else:  # each part rounded once to the storage dtype, then one float32 addition
            bound = u * (np.abs(pre) + np.abs(attn)) + 2.0**-24 * np.abs(mid) + 2 * tiny
            assert np.all(np.abs(got - mid) <= bound), float(np.max(np.abs(got - mid) - bound))
        # resid_post is stored by default; the derivation is checked by the same sum
        np.testing.assert_allclose(np.add(got, run[f"blocks.{i}.hook_mlp_out"], dtype=np.float32), post,
                                   rtol=0, atol=float(np.max(u * (np.abs(pre) + np.abs(attn) + np.abs(mlp))
                                                             + 2.0**-23 * np.abs(post))) + 1e-30)


def test_accumulated_resid_demo_cell_runs_on_a_default_recording(recorded, tl):
    """TransformerLens's own demo cell, on a trace recorded with --hooks default."""
    t = open_trace(recorded[1])
    _, cache = tl
    accumulated_residual, labels = t[0].accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    want, want_labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    assert labels == want_labels
    assert accumulated_residual.shape == tuple(want.shape)
    tol = 0 if recorded[0] == "float32" else 3 * 2.0**-11 * float(np.abs(_np(want)).max() * 4)
    np.testing.assert_allclose(accumulated_residual, _np(want), rtol=0, atol=tol)


def test_resid_post_is_derived_where_it_was_not_recorded(recorder, tmp_path, tl):
    path = tmp_path / "no-post.hxr"
    hooks = "hook_embed,hook_pos_embed,blocks.*.hook_resid_pre,blocks.*.hook_attn_out,blocks.*.hook_mlp_out," \
            "blocks.*.ln1.hook_scale,blocks.*.ln2.hook_scale,ln_final.hook_scale"
    names = [n for n in hooks.split(",") if n != "hook_pos_embed" or recorder.bridge.cfg.positional_embedding_type
             == "standard"]
    recorder.record(PROMPT, path, act_dtype="float32", hooks=",".join(names), lens=False, attention="eager")
    run = open_trace(path)[0]
    _, cache = tl
    last = open_trace(path).n_layers - 1
    assert not run.trace.reader.has(f"blocks.{last}.hook_resid_post", 0)
    np.testing.assert_array_equal(run[f"blocks.{last}.hook_resid_post"],
                                  _np(cache[f"blocks.{last}.hook_resid_post"]).astype(np.float32))


def test_no_tokenizer_is_one_line(tmp_path):
    from trace_format import TraceWriter

    path = tmp_path / "bare.hxr"
    with TraceWriter(path, meta={"model": {"name": "gpt2"}}) as w:
        w.begin_run(prompt="hi", tokens=[1, 2])
    with pytest.raises(HexRayError, match="the tokenizer of gpt2 is not available") as e:
        open_trace(path).to_tokens("hi")
    assert "\n" not in str(e.value)
