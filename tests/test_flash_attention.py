"""Blockwise ("flash") attention while recording equals the bridge's eager attention.

Reference: the same bridge run eagerly (TransformerLens's own attention, ``run_with_cache``). Models:
tiny GPT-2 (learned positions), Llama (rotary, grouped-query 4/2), Mistral (sliding window of 4) and
Gemma-2 (soft-capped logits, alternating sliding and global layers). ``BLOCK_BYTES`` is shrunk so a
60-token run spans many query blocks and windows cross block edges.

Bounds. In float32 the blocks put every visible score through the same operations as eager, in the
same dtype, and the fused CPU kernel (plain causal float32 layers) differs by its online softmax:
both only round differently, so every tensor agrees within 1e-5 of its own scale
(max |flash - eager| ≤ 1e-5 · max(1, max |eager|); measured ≤ 2.2e-6 here). In float16, layer 0's
inputs are identical on both paths; its z = Σ_s p_s v_s, with p a float16 softmax that may round
differently over a shorter row (each weight within 2u of eager's, u = 2^-11) and z itself rounded
once more:
|z_flash - z_eager| ≤ 2u · Σ_s p_s |v_s| + 2u · |z| (+ one float16 ulp of slack).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import hexray
from hexray_core.errors import HexRayError
from hexray_core.replay.attention import attention_pattern
from trace_format import TraceReader

ARCHS = ["gpt2", "llama", "mistral", "gemma2"]
PROMPT = "Alice and Bob went to the store. Bob gave a drink to Alice, and then"


def _build(tiny, tok, arch):
    return {"gpt2": tiny.build_tiny_gpt2, "llama": tiny.build_tiny_llama, "mistral": tiny.build_tiny_mistral,
            "gemma2": tiny.build_tiny_gemma2, "bloom": tiny.build_tiny_bloom}[arch](tok)


@pytest.fixture
def small_blocks(monkeypatch):
    from hexray_core.record import flash

    monkeypatch.setattr(flash, "BLOCK_BYTES", 4 * 4 * 64 * 5)  # about 5 queries per block at 64 keys


def _close(got, want, name: str, tol: float = 1e-5) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, name
    assert np.array_equal(np.isnan(got), np.isnan(want)), name  # hexray.next_logit: NaN after the last token
    got, want = np.nan_to_num(got), np.nan_to_num(want)
    err, scale = float(np.abs(got - want).max()), max(1.0, float(np.abs(want).max()))
    assert err <= tol * scale, f"{name}: max |flash - eager| = {err:.3g} > {tol:g} x {scale:.3g}"


def _ids(n=60, seed=1):
    import torch

    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_forward_equals_eager_float32(tiny, tiny_tokenizer, arch, small_blocks):
    import torch

    from hexray_core.record.attention import attention_spec
    from hexray_core.record.flash import flash_attention, flash_support
    from hexray_core.record.models import from_objects

    bridge = from_objects(_build(tiny, tiny_tokenizer, arch), tiny_tokenizer).bridge
    spec, _ = attention_spec(bridge)
    assert flash_support(bridge, spec) is None
    ids = _ids()
    no_patterns = [n for n in bridge.hook_dict if not n.endswith(("hook_pattern", "hook_attn_scores"))]
    with torch.no_grad():
        logits_e, eager = bridge.run_with_cache(ids)
        lses = {}
        with flash_attention(bridge, spec, on_lse=lambda layer, lse, used: lses.__setitem__(layer, lse)) as state:
            logits_f, flash = bridge.run_with_cache(ids, names_filter=lambda n: n in no_patterns)
    assert state.calls == bridge.cfg.n_layers and state.eager_calls == 0
    _close(logits_f, logits_e, "logits")
    names = [n for n in flash.keys() if flash[n].is_floating_point()]
    assert len(names) > 40 and any("hook_z" in n for n in names) and any("hook_rot_k" in n or "hook_k" in n
                                                                         for n in names)
    for name in names:
        _close(flash[name], eager[name], name)
    for layer in range(bridge.cfg.n_layers):  # the LSE is the eager pattern's normaliser
        scores = eager[f"blocks.{layer}.attn.hook_attn_scores"][0].float()
        _close(lses[layer][0], torch.logsumexp(scores, -1), f"LSE {layer}")
        pattern = torch.exp(scores - lses[layer][0][..., None])  # a pattern entry is exp(score - LSE)
        _close(pattern, eager[f"blocks.{layer}.attn.hook_pattern"][0], f"pattern {layer}")


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_float16_layer0_within_derived_bound(tiny, tiny_tokenizer, arch, small_blocks):
    import torch

    from hexray_core.record.attention import attention_spec
    from hexray_core.record.flash import flash_attention
    from hexray_core.record.models import from_objects

    bridge = from_objects(_build(tiny, tiny_tokenizer, arch).half(), tiny_tokenizer).bridge
    spec, _ = attention_spec(bridge)
    ids = _ids()
    with torch.no_grad():
        _, eager = bridge.run_with_cache(ids)
        with flash_attention(bridge, spec):
            _, flash = bridge.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.0.attn.hook_"))
    u = 2.0 ** -11
    p = eager["blocks.0.attn.hook_pattern"][0].float()  # [heads, q, k]
    v = eager["blocks.0.attn.hook_v"][0].float()  # [k, kv_heads, d]
    v = v.repeat_interleave(p.shape[0] // v.shape[1], dim=1)
    mass = torch.einsum("hqk,khd->qhd", p, v.abs())
    z_e, z_f = eager["blocks.0.attn.hook_z"][0].float(), flash["blocks.0.attn.hook_z"][0].float()
    bound = 2 * u * mass + 2 * u * z_e.abs() + u * 2.0 ** -14
    assert bool(((z_f - z_e).abs() <= bound).all()), float(((z_f - z_e).abs() - bound).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_recording_equals_eager_recording(tiny, tiny_tokenizer, arch, tmp_path, small_blocks):
    from hexray_core.record import Recorder

    rec = Recorder(_build(tiny, tiny_tokenizer, arch), tokenizer=tiny_tokenizer)
    warnings = []
    paths = {}
    for mode in ("eager", "flash"):
        paths[mode] = rec.record(PROMPT, tmp_path / f"{mode}.hxr", act_dtype="float32", attention=mode, generate=3,
                                 progress=lambda e, **kw: warnings.append(kw) if e == "warning" else None).path
    assert warnings == []
    te, tf = hexray.open(paths["eager"]), hexray.open(paths["flash"])
    assert te.meta["forward"] == {"attention": "eager", "requested": "eager", "fallback": None}
    assert tf.meta["forward"] == {"attention": "flash", "requested": "flash", "fallback": None}
    assert te.runs[0].tokens == tf.runs[0].tokens  # generation under the KV cache ran the same attention
    n = len(tf.runs[0].tokens)
    lse_names = [f"hexray.attn_lse.{layer}" for layer in range(tf.n_layers)]
    assert set(tf.names(0)) - set(te.names(0)) == set(lse_names)
    for name in te.names(0):
        _close(tf.tensor(name, 0), te.tensor(name, 0), name)
    assert tf.runs[0].info["attention"]["stored_patterns"] == []
    assert tf.runs[0].info["attention"]["checked_against"] == "hook_z and lse"
    import torch

    with torch.no_grad():
        _, cache = rec.bridge.run_with_cache(torch.tensor([tf.runs[0].tokens]))
    for layer in range(tf.n_layers):
        assert tf.tensor(lse_names[layer], 0).shape == (4, n) and tf.tensor(lse_names[layer], 0).dtype == np.float32
        want = cache[f"blocks.{layer}.attn.hook_pattern"][0].numpy()
        np.testing.assert_allclose(attention_pattern(tf, 0, layer), want, rtol=0, atol=1e-5)  # via exp(s - LSE)


def test_flash_builds_no_n_by_n_mask(tiny, tiny_tokenizer, tmp_path):
    """transformers' eager mask is never built: each attention call gets attention_mask=None."""
    from hexray_core.record import Recorder

    rec = Recorder(_build(tiny, tiny_tokenizer, "mistral"), tokenizer=tiny_tokenizer)
    masks = {"flash": [], "eager": []}
    mode = {}

    def spy(module, args, kwargs):
        masks[mode["now"]].append(kwargs.get("attention_mask"))

    handle = rec.bridge.blocks[0].attn.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        for m in ("flash", "eager"):
            mode["now"] = m
            rec.record(PROMPT, tmp_path / f"{m}.hxr", attention=m, generate=2)
    finally:
        handle.remove()
    assert len(masks["flash"]) >= 2 and all(x is None for x in masks["flash"])
    n = len(hexray.open(tmp_path / "eager.hxr").runs[0].tokens)
    assert masks["eager"][-1] is not None and tuple(masks["eager"][-1].shape[-2:]) == (n, n)  # what flash avoids


def test_uncovered_architecture_falls_back_and_says_so(tiny, tiny_tokenizer, tmp_path):
    from hexray_core.record import Recorder

    rec = Recorder(_build(tiny, tiny_tokenizer, "bloom"), tokenizer=tiny_tokenizer)
    warnings = []
    res = rec.record(PROMPT, tmp_path / "t.hxr", attention="flash",
                     progress=lambda e, **kw: warnings.append(kw["message"]) if e == "warning" else None)
    assert len(warnings) == 1 and "runs eager" in warnings[0] and "ALiBi" in warnings[0]
    t = hexray.open(res.path)
    assert t.meta["forward"] == {"attention": "eager", "requested": "flash",
                                 "fallback": "it uses ALiBi position biases"}
    assert t.has("blocks.0.attn.hook_pattern") and not t.has("hexray.attn_lse.0")


def test_asking_for_patterns_runs_eager_and_says_so(tiny_llama_recorder, tmp_path):
    warnings = []

    def progress(event, **kw):
        if event == "warning":
            warnings.append(kw["message"])

    res = tiny_llama_recorder.record(PROMPT, tmp_path / "t.hxr", hooks="default,blocks.*.attn.hook_pattern",
                                     attention="flash", progress=progress)
    assert len(warnings) == 1 and "hook_pattern" in warnings[0] and "eager" in warnings[0]
    assert hexray.open(res.path).meta["forward"]["attention"] == "eager"
    quiet = []
    res = tiny_llama_recorder.record(PROMPT, tmp_path / "u.hxr", hooks="default,blocks.*.attn.hook_pattern",
                                     progress=lambda e, **kw: quiet.append(kw) if e == "warning" else None)
    assert quiet == [] and hexray.open(res.path).meta["forward"]["attention"] == "eager"  # auto: eager, silently
    with pytest.raises(HexRayError, match="--attention fast: expected eager, flash or auto"):
        tiny_llama_recorder.record(PROMPT, tmp_path / "v.hxr", attention="fast")


def test_failing_layer_stores_the_models_pattern(tiny, tiny_tokenizer, tmp_path):
    """The flash-path check is real: a wrong scale in the spec fails layer 1's hook_z/LSE check, and the
    pattern stored instead is the model's own."""
    import torch

    from hexray_core.record import Recorder

    rec = Recorder(_build(tiny, tiny_tokenizer, "llama"), tokenizer=tiny_tokenizer)
    spec = rec.attention_spec()
    wrong = {**spec, "layers": [spec["layers"][0], {**spec["layers"][1], "scale": 3 * spec["layers"][1]["scale"]}]}
    rec.loaded.cache["attention"] = (wrong, None)
    res = rec.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32")
    t = hexray.open(res.path)
    assert t.meta["forward"]["attention"] == "flash"
    assert t.runs[0].info["attention"]["stored_patterns"] == [1]
    assert t.has("blocks.1.attn.hook_pattern") and not t.has("blocks.0.attn.hook_pattern")
    with torch.no_grad():
        _, cache = rec.bridge.run_with_cache(torch.tensor([t.runs[0].tokens]))
    for layer in range(2):
        np.testing.assert_allclose(attention_pattern(t, 0, layer), cache[f"blocks.{layer}.attn.hook_pattern"][0],
                                   rtol=0, atol=1e-5)


def test_out_of_memory_is_one_line():
    import torch

    from hexray_core.record.recorder import RecordPlan, _out_of_memory

    plan = RecordPlan(hooks=None, attention=None, check_attention=False, lens=False, lens_layers=[], forward="eager")
    with pytest.raises(HexRayError) as e, _out_of_memory(32000, plan):
        torch.empty(1 << 60, dtype=torch.uint8)  # a real allocation failure
    msg = str(e.value)
    assert "out of memory recording 32000 tokens with --attention eager" in msg and "\n" not in msg
    assert "--attention flash" in msg


@pytest.mark.slow  # the CLI in a subprocess that records (imports torch): the slow tier
def test_cli_attention_flag_and_info(tiny_llama_dir, tmp_path):
    from test_record_cli import cli_env, hexray_cmd

    out = tmp_path / "t.hxr"
    p = subprocess.run(hexray_cmd("--model", tiny_llama_dir, "--prompt", PROMPT, "--attention", "flash", "-o",
                                  str(out)), capture_output=True, text=True, env=cli_env(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    with TraceReader(out) as r:
        assert r.meta["forward"]["attention"] == "flash" and r.has("hexray.attn_lse.1", 0)
    import sys

    info = subprocess.run([sys.executable, "-m", "hexray", "info", str(out)], capture_output=True, text=True,
                          env=cli_env(tmp_path), timeout=120)
    assert info.returncode == 0 and "attention flash (--attention flash)" in info.stdout, info.stdout
    js = json.loads(subprocess.run([sys.executable, "-m", "hexray", "info", str(out), "--json"], capture_output=True,
                                   text=True, env=cli_env(tmp_path), timeout=120).stdout)
    assert js["forward"] == {"attention": "flash", "requested": "flash", "fallback": None}


def test_run_tensors_and_lens_in_row_chunks_equal_whole(tiny_llama_recorder, tmp_path, monkeypatch):
    """The per-run logits tensors and the logit lens are computed a few rows at a time (a long run's float32
    logits are gigabytes): chunks of 3 rows give the same tensors as one chunk."""
    from hexray_core.record import recorder

    whole = tiny_llama_recorder.record(PROMPT, tmp_path / "whole.hxr", lens=True, act_dtype="float32").path
    monkeypatch.setattr(recorder, "RUN_TENSOR_BYTES", 3 * 4 * tiny_llama_recorder.loaded.d_vocab)
    chunked = tiny_llama_recorder.record(PROMPT, tmp_path / "chunked.hxr", lens=True, act_dtype="float32").path
    with TraceReader(whole) as a, TraceReader(chunked) as b:
        names = [n for n in a.names(0) if n.startswith("hexray.") and not n.startswith("hexray.attn_lse")]
        assert "hexray.lens_next_rank" in names and "hexray.topk_logits" in names
        for name in names:  # floats: a matrix product over fewer rows may round its last bit differently
            x, y = a.read(name, 0), b.read(name, 0)
            if x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(y, x, err_msg=name)
