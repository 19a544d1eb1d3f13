"""The notebook API: a recorded run is a TransformerLens ActivationCache that needs no model.

The direct-logit-attribution cells of TransformerLens's own demos (Exploratory Analysis Demo: logit
difference directions, accumulated residual with apply_ln_to_stack, decomposed residual, per-head
results; the ActivationCache docstrings the Main Demo points to: decompose_resid(mode="attn") with
logit_attrs, the logit lens through accumulated_resid(apply_ln=True) @ W_U, the full decomposition
with neurons) run unchanged on ``(trace, run)`` and on ``(bridge, ActivationCache)`` of the same
model and prompt (``run_with_cache(..., remove_batch_dim=True)``): same labels, equal values.

Tolerances as tests/test_replay_agreement.py derives them: float32 traces agree to 1e-5 relative to
the largest value compared; a float16/bfloat16 trace stores every activation rounded (relative
error eps/2) and the norm's scale too, so a value sum_i a_i b_i (a the normalised stack, b the
direction) is within eps · sum_i |a_i b_i| + 1e-6 of TransformerLens's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import einops
import numpy as np
import pytest

import hexray
from hexray_core.errors import HexRayError
from hexray_core.replay import open_trace

EPS = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
PROMPT = "Alice and Bob went to the store. Bob gave a drink to"
HOOKS = "default,blocks.*.hook_resid_mid"  # the demo's accumulated_resid(incl_mid=True) reads resid_mid


def _np(x) -> np.ndarray:
    return x.detach().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def recorder(request):
    return request.getfixturevalue(f"tiny_{request.param}_recorder")


@pytest.fixture(scope="module")
def tl(recorder):
    """TransformerLens's own cache of PROMPT, batch dim removed, and its answer / wrong-answer ids."""
    import torch

    torch.set_grad_enabled(False)
    ids = recorder.tokenize(PROMPT, True)
    logits, cache = recorder.bridge.run_with_cache(torch.tensor([ids]), remove_batch_dim=True)
    top2 = logits[0, -1].topk(2).indices.tolist()
    return ids, logits[0], cache, top2


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def recorded(request, recorder, tmp_path_factory):
    path = tmp_path_factory.mktemp("nb") / f"{request.param}.hxr"
    # eager: the same attention arithmetic as the run_with_cache it is compared with, to the last float32 bit
    # (blockwise attention is compared with eager in tests/test_flash_attention.py)
    recorder.record(PROMPT, path, act_dtype=request.param, hooks=HOOKS, lens=False, attention="eager")
    return request.param, str(path)


def demo_cells(model, cache, answer: int, wrong: int, tensor) -> dict:
    """The DLA cells of TransformerLens's demos, for one prompt (no batch dim). ``tensor`` builds a token
    array in the caller's framework. Each entry: (labels, values, A, B) with values = A · B (for the bound)."""
    out = {}
    # Exploratory Analysis Demo, "Logit difference directions".
    answer_residual_directions = model.tokens_to_residual_directions(tensor([answer, wrong]))
    logit_diff_direction = answer_residual_directions[0] - answer_residual_directions[1]
    final_residual_stream = cache["resid_post", -1]
    final_token_residual_stream = final_residual_stream[-1, :]
    scaled_final = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1, has_batch_dim=False)
    out["logit_diff"] = (None, scaled_final @ logit_diff_direction, scaled_final, logit_diff_direction)

    def residual_stack_to_logit_diff(residual_stack, cache):
        scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
        return scaled_residual_stack, scaled_residual_stack @ logit_diff_direction

    # "Logit Lens": the accumulated residual, each layer through the final norm's recorded scale.
    accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    scaled, diffs = residual_stack_to_logit_diff(accumulated_residual, cache)
    out["accumulated_resid"] = (labels, diffs, scaled, logit_diff_direction)
    # "Layer Attribution"
    per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    scaled, diffs = residual_stack_to_logit_diff(per_layer_residual, cache)
    out["decompose_resid"] = (labels, diffs, scaled, logit_diff_direction)
    # "Head Attribution"
    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    scaled, per_head = residual_stack_to_logit_diff(per_head_residual, cache)
    per_head = einops.rearrange(per_head, "(layer head_index) -> layer head_index",
                                layer=model.cfg.n_layers, head_index=model.cfg.n_heads)
    out["stack_head_results"] = (labels, per_head.reshape(-1), scaled, logit_diff_direction)
    # logit_attrs with a logit difference (tokens and incorrect_tokens).
    attrs = cache.logit_attrs(per_layer_residual, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)
    out["logit_attrs_diff"] = (None, attrs, cache.apply_ln_to_stack(per_layer_residual, -1, pos_slice=-1),
                               logit_diff_direction)
    # ActivationCache's own example: attention layers only, every position, one answer.
    residual_stream, labels = cache.decompose_resid(return_labels=True, mode="attn")
    attrs = cache.logit_attrs(residual_stream, answer)
    direction = model.tokens_to_residual_directions(answer)
    out["logit_attrs_attn"] = (labels, attrs, cache.apply_ln_to_stack(residual_stream, -1), direction)
    # accumulated_resid's example: the logit lens, recomputed final norm, times W_U.
    accum_resid, labels = cache.accumulated_resid(return_labels=True, apply_ln=True)
    last = accum_resid[:, -1, :]
    out["logit_lens"] = (labels, last @ model.W_U, last, model.W_U)
    # Every head and neuron and the biases (get_full_resid_decomposition), attributed to the answer.
    full, labels = cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1, return_labels=True)
    attrs = cache.logit_attrs(full, answer, pos_slice=-1)
    out["full_decomposition"] = (labels, attrs, cache.apply_ln_to_stack(full, -1, pos_slice=-1), direction)
    # The neurons with the norm folded into the projection (no [.., d_mlp, d_model] intermediate).
    neurons, labels = cache.stack_neuron_results(-1, pos_slice=-1, return_labels=True, apply_ln=True,
                                                 project_output_onto=direction)
    plain = cache.stack_neuron_results(-1, pos_slice=-1, apply_ln=True)
    out["stack_neuron_results"] = (labels, neurons, plain, direction)
    return out


def _compare(mine: dict, theirs: dict, eps: float) -> None:
    assert mine.keys() == theirs.keys()
    for name in theirs:
        l_mine, v_mine, _, _ = mine[name]
        l_tl, v_tl, a_tl, b_tl = theirs[name]
        assert l_mine == l_tl, name
        v_mine, v_tl = _np(v_mine), _np(v_tl)
        assert v_mine.shape == v_tl.shape, name
        if not eps:
            np.testing.assert_allclose(v_mine, v_tl, rtol=1e-5, atol=1e-5 * np.abs(v_tl).max(), err_msg=name)
        else:
            bound = eps * (np.abs(_np(a_tl)) @ np.abs(_np(b_tl))) + 1e-6
            err = np.abs(v_mine - v_tl)
            assert (err <= bound).all(), f"{name}: max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_demo_cells_agree_with_transformer_lens(recorder, tl, recorded, framework):
    import torch

    dtype, path = recorded
    ids, _logits, cache, (answer, wrong) = tl
    trace = hexray.open(path, framework=framework)
    run = trace[0]
    assert run.tokens == ids
    array = torch.tensor if framework == "pt" else np.array
    mine = demo_cells(trace, run, answer, wrong, array)
    theirs = demo_cells(recorder.bridge, cache, answer, wrong, torch.tensor)
    _compare(mine, theirs, EPS[dtype])
    kind = torch.Tensor if framework == "pt" else (np.ndarray, np.generic)  # 1-d @ 1-d: a numpy scalar
    assert all(isinstance(v, kind) for _, v, _, _ in mine.values())
    # The parts add up: decompose_resid's logit difference plus the bias difference is the model's.
    if dtype == "float32":
        _, diffs, _, _ = mine["decompose_resid"]
        b_U = trace.b_U
        total = float(_np(diffs).sum() + float(b_U[answer]) - float(b_U[wrong]))
        logits = _logits[-1]
        assert total == pytest.approx(float(logits[answer] - logits[wrong]), abs=1e-4)


@pytest.mark.parametrize("kw", [{"targets": "ANSWERS"}, {"top_k": 5, "incl_mid": True}, {"vocab": [3, 7, 11]},
                                {"targets": "ANSWERS", "return_type": "log_probs", "layers": [0, -1]}])
def test_logit_lens_agrees_with_transformer_lens(recorder, tl, tmp_path, kw):
    dtype_path = recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32", hooks=HOOKS, lens=False).path
    _, _, cache, answers = tl
    kw = {k: (answers if v == "ANSWERS" else v) for k, v in kw.items()}
    mine, theirs = hexray.open(dtype_path)[0].logit_lens(**kw), cache.logit_lens(**kw)
    assert mine.labels == theirs.labels and mine.has_batch_dim == theirs.has_batch_dim
    for field in ("values", "entropy", "top_ids", "vocab_ids", "target_ids", "target_ranks"):
        a, b = getattr(mine.readout, field), getattr(theirs.readout, field)
        assert (a is None) == (b is None), field
        if b is not None:
            np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-4, err_msg=field)
    if "targets" in kw:
        np.testing.assert_array_equal(_np(mine.rank_trajectory(answers[1])), _np(theirs.rank_trajectory(answers[1])))


def test_the_run_is_a_lazy_mapping_of_the_recorded_tensors(recorder, tl, tmp_path):
    from transformer_lens.utilities import get_act_name as tl_act_name

    from hexray_core.replay.cache import get_act_name

    path = recorder.record([PROMPT, "Bob"], tmp_path / "t.hxr", act_dtype="float32")
    t = hexray.open(path.path)
    assert t.runs[1] is t[1] and len(t) == 2 and list(t) == t.runs
    run = t[0]
    names = [n for n in t.names(0) if not n.startswith("hexray.")]
    # Default recordings store q and k, not patterns: the patterns are keys too, recomputed when read.
    patterns = [f"blocks.{i}.attn.hook_pattern" for i in range(t.n_layers)]
    # and resid_mid is resid_pre + attn_out, a key too (resid_post is stored)
    mids = [f"blocks.{i}.hook_resid_mid" for i in range(t.n_layers)]
    assert not set(patterns + mids) & set(names)
    assert list(run.keys()) == names + patterns + mids and len(run) == len(names) + len(patterns) + len(mids)
    assert not t._cache  # nothing read yet: keys come from the index
    assert run["resid_post", 1] is run["blocks.1.hook_resid_post"]
    assert len(t._cache) == 1  # one tensor decoded
    _, _, cache, _ = tl
    for key in [("resid_post", 1), ("resid_pre", -1), ("pattern", 0), ("resid_mid", 0), ("z", 1, "attn"),
                ("scale", 0, "ln1"), ("post", 1), "scale", "embed", "hook_embed", ("attn_out", 0), ("mlp_out", -2)]:
        np.testing.assert_allclose(run[key], cache[key].numpy(), rtol=1e-5, atol=1e-5, err_msg=str(key))
        assert key in run
    for args in [("k6",), ("scale4ln1",), ("pre5",), ("normalized", 27, "ln2"), ("k", 6, "a"), ("attn", 2),
                 ("value", 1), ("embed",), ("resid_mid", 0, "b"), ("blocks.0.hook_resid_pre",), ("rot_q", 3)]:
        assert get_act_name(*args) == tl_act_name(*args), args
    assert ("normalized", 0, "ln2") not in run and "blocks.9.hook_resid_post" not in run and 3 not in run
    assert dict(run.items()).keys() == set(names + patterns + mids)
    assert run.str_tokens == run.token_strs and run.prompt == PROMPT
    assert run != t[1] and run == run and hash(run) == hash(run)


def test_missing_hooks_name_the_hook_and_how_to_record_it(recorder, tmp_path, monkeypatch):
    path = recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32", hooks="default").path
    run = hexray.open(path)[0]
    with pytest.raises(KeyError, match=r"blocks\.0\.ln2\.hook_normalized.*--hooks default,blocks\.\*\.ln2\."
                                       r"hook_normalized"):
        run["normalized", 0, "ln2"]
    assert run.get(("normalized", 0, "ln2")) is None  # a Mapping: missing keys are KeyErrors
    # resid_mid is derived from resid_pre + attn_out; without attn_out it is missing, and named
    bare = recorder.record(PROMPT, tmp_path / "bare.hxr", act_dtype="float32",
                           hooks="blocks.*.hook_resid_pre,blocks.*.hook_resid_post", lens=False).path
    with pytest.raises(HexRayError, match=r"accumulated_resid\(incl_mid=True\) needs blocks\.0\.hook_resid_mid"):
        hexray.open(bare)[0].accumulated_resid(incl_mid=True)
    # Without the model kit (not bundled, and this cache is empty): the weights are named, with the way to get them.
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "empty-cache"))
    fresh = hexray.open(path)[0]
    with pytest.raises(HexRayError, match=r"needs the model kit .*--bundle"):
        fresh.stack_head_results(pos_slice=-1)
    # What needs no kit still works: the run's own unembedding columns cover its tokens and predictions.
    stack = fresh.decompose_resid(pos_slice=-1)
    target = int(fresh.trace.tensor("hexray.topk_ids", 0)[-1, 0])
    assert fresh.logit_attrs(stack, target, pos_slice=-1).shape == (len(stack),)


def test_to_activation_cache_is_a_real_transformer_lens_cache(recorder, tl, tmp_path):
    from transformer_lens import ActivationCache

    path = recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32").path
    run = hexray.open(path, framework="pt")[0]
    real = run.to_activation_cache(recorder.bridge)
    assert isinstance(real, ActivationCache) and not real.has_batch_dim and real.model is recorder.bridge
    assert set(real.keys()) == set(run.keys())
    ours, labels = run.decompose_resid(pos_slice=-1, return_labels=True)
    theirs, tl_labels = real.decompose_resid(pos_slice=-1, return_labels=True)
    assert labels == tl_labels
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6)
    heads = run.stack_head_results(pos_slice=-1)
    np.testing.assert_allclose(heads.numpy(), real.stack_head_results(pos_slice=-1).numpy(), rtol=1e-4, atol=1e-5)


def test_pt_tensors_share_the_trace_memory(recorder, tmp_path):
    import torch

    path = recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32").path
    t = hexray.open(path, framework="pt")
    x = t[0]["resid_post", -1]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert x.data_ptr() == t.tensor("blocks.1.hook_resid_post").ctypes.data  # zero-copy
    assert isinstance((x[-1] @ t.W_U[:, 0]).item(), float)
    with pytest.raises(HexRayError, match="framework= must be one of np, pt"):
        hexray.open(path, framework="jax")


def test_record_returns_the_opened_trace_and_dir_lists_the_api(tiny, tiny_tokenizer, tmp_path):
    t = hexray.record("Bob went", model=tiny.build_tiny_gpt2(tiny_tokenizer), tokenizer=tiny_tokenizer,
                      output=tmp_path / "r.hxr", device="cpu")
    assert isinstance(t, hexray.Trace) and os.path.samefile(t.path, tmp_path / "r.hxr")
    assert isinstance(t[0], hexray.Run) and t[0].prompt == "Bob went"
    public = dir(hexray)
    for name in ("open", "record", "Recorder", "Trace", "Run", "MissingHook", "HexRayError", "get_act_name",
                 "Slice", "direct_logit_attribution", "logit_lens", "cot_breakdown", "attribution_diff"):
        assert name in public
        assert getattr(hexray, name) is not None
    assert public == sorted(hexray.__all__)


def test_next_token_attributions_add_up_to_the_recorded_logits(recorder, tmp_path):
    """The vectorised primitive behind CoT and the language server equals the per-position table."""
    from hexray_core.replay.attribution import next_token_attributions

    path = recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32").path
    t = open_trace(path)
    labels, values = next_token_attributions(t, 0)
    n = t[0].n_tokens
    assert values.shape == (len(labels), n - 1) and labels[-1] == "Bias" and "MLP L1" in labels
    np.testing.assert_allclose(values.sum(0), t.tensor("hexray.next_logit")[:-1], atol=1e-4)
    for p in (0, n // 2, n - 2):
        a = t.attribution(p, target="next")
        np.testing.assert_allclose(values[:, p], [a.by_label()[lab] for lab in labels], rtol=1e-6, atol=1e-6)


def test_cli_names_flags_where_the_library_names_parameters():
    from hexray.cli.main import as_flags

    assert as_flags("by= must be one of component, head, neuron") == "--by must be one of component, head, neuron"
    assert as_flags("side B: position=17 is out of range") == "side B: --position 17 is out of range"
    assert as_flags("bad step_regex='(': x; mode= (the step split)") == \
        "bad --step-regex '(': x; --split (the step split)"
    assert as_flags("blocks.0.hook_z=1 stays") == "blocks.0.hook_z=1 stays"
    assert as_flags("top_k= must be at least 1, not 0") == "--top-k must be at least 1, not 0"
    assert as_flags("act_dtype='f8': unknown") == "--act-dtype 'f8': unknown"
    with pytest.raises(HexRayError, match="^by= must be one of"):
        from hexray_core.replay.attribution import direct_logit_attribution

        direct_logit_attribution(None, by="layer")


NO_TORCH = r"""
import builtins, json, sys
real_import = builtins.__import__
def guarded(name, *a, **kw):
    if name.split(".")[0] in ("torch", "transformer_lens", "transformers"):
        raise ImportError(f"No module named {name!r} (blocked by the test)")
    return real_import(name, *a, **kw)
builtins.__import__ = guarded

import numpy as np
import hexray
from hexray_core.errors import HexRayError

t = hexray.open(sys.argv[1])
run = t[0]
out = {"keys": list(run.keys()), "resid": run["resid_post", -1][-1].tolist()}
answer = int(t.tensor("hexray.topk_ids", 0)[-1, 0]); wrong = int(t.tensor("hexray.topk_ids", 0)[-1, 1])
d = t.tokens_to_residual_directions(np.array([answer, wrong]))
stack, labels = run.decompose_resid(pos_slice=-1, return_labels=True)
out["decompose"] = [labels, run.logit_attrs(stack, answer, incorrect_tokens=wrong, pos_slice=-1).tolist()]
acc, labels = run.accumulated_resid(apply_ln=True, return_labels=True)
out["lens"] = [labels, (acc[:, -1] @ t.W_U).argmax(-1).tolist()]
heads, labels = run.stack_head_results(pos_slice=-1, return_labels=True, incl_remainder=True)
out["heads"] = [labels, run.logit_attrs(heads, answer, pos_slice=-1).tolist()]
full, labels = run.get_full_resid_decomposition(pos_slice=-1, return_labels=True, expand_neurons=False)
out["full"] = [labels, run.logit_attrs(full, answer, pos_slice=-1).tolist()]
neurons = run.stack_neuron_results(-1, pos_slice=-1, apply_ln=True, project_output_onto=d[0] - d[1])
out["neurons"] = neurons.tolist()
out["attribution"] = t.attribution(-1, by="head").by_label()
out["cot"] = len(t.cot().steps)
for call in (lambda: hexray.open(sys.argv[1], framework="pt"), lambda: run.to_activation_cache(None)):
    try:
        call()
    except HexRayError as e:
        out.setdefault("errors", []).append(str(e))
out["imported"] = [m for m in ("torch", "transformer_lens", "transformers") if m in sys.modules]
print(json.dumps(out))
"""


def test_the_notebook_api_works_without_torch(recorder, tmp_path):
    path = recorder.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32", bundle=True).path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, path], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["imported"] == []
    assert [e.split(" ")[0] for e in out["errors"]] == ["framework='pt'", "to_activation_cache"]
    assert "pip install" in out["errors"][0] and "pip install" in out["errors"][1]
    # The same numbers as in this process (where torch is importable).
    t = hexray.open(path)
    run = t[0]
    answer, wrong = (int(v) for v in t.tensor("hexray.topk_ids", 0)[-1, :2])
    stack, labels = run.decompose_resid(pos_slice=-1, return_labels=True)
    assert out["decompose"] == [labels, run.logit_attrs(stack, answer, incorrect_tokens=wrong, pos_slice=-1).tolist()]
    assert out["keys"] == list(run.keys()) and out["resid"] == run["resid_post", -1][-1].tolist()
    assert out["lens"][0][-1] == "final_post" and out["lens"][1][-1] == answer
    assert out["heads"][0][-1] == "remainder" and out["full"][0][-1] == "bias"
    assert len(out["neurons"]) == t.n_layers * t.cfg.d_mlp
    assert out["attribution"] == t.attribution(-1, by="head").by_label() and out["cot"] >= 1


def test_readme_from_transformer_lens_runs_as_written(tiny, tmp_path, monkeypatch, capsys):
    """Both snippets of the README's "From TransformerLens" print the figures the README shows."""
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### From TransformerLens"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    shown = re.search(r"```\n(\[.*?)```", section, re.S).group(1).splitlines()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    printed = []
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
        printed.append(capsys.readouterr().out.splitlines())
    assert printed[0][0] == printed[1][0] == shown[0]
    assert printed[1][1] == shown[1] and printed[0][1] == shown[1].replace("ndarray", "Tensor")
