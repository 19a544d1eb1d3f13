"""The dictionary spaces a trace rebuilds equal what the unprocessed Hugging Face model computes.

The kit keeps what compatibility mode removed (raw/ tensors); `features.activations` adds it back. Checked
against the Hugging Face model itself (float32 trace, 1e-5 relative): residual streams before and after each
layer, what each layer writes, and the second norm's output with and without its weight and bias.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hexray
from hexray_core.replay.dictionary import Space
from hexray_core.replay.features import activations, trace_centred

PROMPT = "The quick brown fox 🍕 jumps"
RAW = Space(fold_ln=False, center_writing_weights=False, source="test")
FOLDED = Space(fold_ln=True, center_writing_weights=False, source="test")
CENTRED = Space(fold_ln=True, center_writing_weights=True, source="test")


def _hf_reference(hf, ids, arch):
    """Hidden states, each block's ln2 input/output and attention/MLP outputs, from the untouched HF model."""
    import torch

    blocks = hf.transformer.h if arch == "gpt2" else hf.model.layers
    got = {}
    handles = []
    for i, b in enumerate(blocks):
        ln2 = b.ln_2 if arch == "gpt2" else b.post_attention_layernorm
        handles.append(ln2.register_forward_hook(
            lambda m, inp, out, i=i: got.update({("mid", i): inp[0][0].clone(), ("ln2", i): out[0].clone()})))
        mlp = b.mlp
        handles.append(mlp.register_forward_hook(lambda m, inp, out, i=i: got.update({("mlp", i): out[0].clone()})))
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    for h in handles:
        h.remove()
    got["hidden"] = [h[0] for h in out.hidden_states]
    return got


def _close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_raw_spaces_equal_the_unprocessed_model(tiny, tiny_tokenizer, tmp_path, arch):
    from hexray_core.record import Recorder

    hf = (tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama)(tiny_tokenizer)
    reference = copy.deepcopy(hf)
    rec = Recorder(hf, tokenizer=tiny_tokenizer)
    res = rec.record(PROMPT, tmp_path / "t.hxr", act_dtype="float32", bundle=True)
    tr = hexray.open(res.path)
    run = tr[0]
    ref = _hf_reference(reference, run.tokens, arch)
    # the recording really is centred for LayerNorm models, so the test below exercises the offsets
    assert trace_centred(tr) == (arch == "gpt2")
    if arch == "gpt2":
        assert np.abs(run["blocks.1.hook_resid_pre"] - ref["hidden"][1].numpy()).max() > 1e-3
    n_layers = tr.n_layers
    for layer in range(n_layers):
        _close(activations(run, f"blocks.{layer}.hook_resid_pre", RAW), ref["hidden"][layer])
        _close(activations(run, f"blocks.{layer}.hook_resid_mid", RAW), ref[("mid", layer)])
        _close(activations(run, f"blocks.{layer}.hook_mlp_out", RAW), ref[("mlp", layer)])
        _close(activations(run, f"blocks.{layer}.mlp.hook_in", RAW), ref[("ln2", layer)])
        _close(activations(run, f"blocks.{layer}.ln2.hook_out", RAW), ref[("ln2", layer)])
        if layer + 1 < n_layers:
            _close(activations(run, f"blocks.{layer}.hook_resid_post", RAW), ref["hidden"][layer + 1])
        # fold_ln=True (a dictionary whose kwargs turn it on): the norm without weight and bias, the same residual
        mid = ref[("mid", layer)].numpy().astype(np.float64)
        if arch == "gpt2":
            mid = mid - mid.mean(-1, keepdims=True)
        eps = tr.eps
        normed = mid / np.sqrt((mid ** 2).mean(-1, keepdims=True) + eps)
        _close(activations(run, f"blocks.{layer}.ln2.hook_normalized", FOLDED), normed)
        _close(activations(run, f"blocks.{layer}.hook_resid_pre", FOLDED), ref["hidden"][layer])
        # centred (TL's from_pretrained default): the residual minus its mean, as recorded
        hid = ref["hidden"][layer].numpy().astype(np.float64)
        want = hid - hid.mean(-1, keepdims=True) if arch == "gpt2" else hid
        _close(activations(run, f"blocks.{layer}.hook_resid_pre", CENTRED), want)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hook_z_in_every_processing_equals_a_bridge_processed_so(tiny, tiny_tokenizer, tmp_path, arch):
    """attn.hook_z (heads concatenated) rebuilt for each fold_ln × fold_value_biases equals the z of a TransformerLens
    bridge processed with those flags (unprocessed: the Hugging Face weights as they are). TransformerLens itself
    cannot fold the value biases of an unfolded grouped-query model (the tiny Llama), so that case is left out."""
    import warnings

    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from hexray_core.record import Recorder

    build = tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama
    res = Recorder(build(tiny_tokenizer), tokenizer=tiny_tokenizer).record(PROMPT, tmp_path / "t.hxr",
                                                                            act_dtype="float32", lens=False)
    run = hexray.open(res.path)[0]
    ids = torch.tensor([run.tokens])
    got = {}
    for fold_ln, fold_vb in [(False, False), (True, False), (True, True)] + [(False, True)] * (arch == "gpt2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = TransformerBridge.boot_transformers("ref", hf_model=build(tiny_tokenizer).eval(),
                                                    tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
            if fold_ln or fold_vb:
                b.enable_compatibility_mode(disable_warnings=True, fold_ln=fold_ln, center_writing_weights=False,
                                            center_unembed=False, fold_value_biases=fold_vb)
        with torch.no_grad():
            b.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", lambda x, hook: got.update(z=x[0]))])
        space = Space(fold_ln, False, "test", fold_vb)
        _close(activations(run, "blocks.1.attn.hook_z", space), got["z"].reshape(len(run.tokens), -1))


def test_attention_feature_logits_are_left_out_where_a_norm_follows_attention(tiny, tiny_tokenizer, tmp_path):
    """Gemma 2 normalises the attention output (ln1_post, weight not in the kit) before the residual: a hook_z
    feature's decoder row through W_O is not the direction it writes, so no top logits are given rather than a
    plausible wrong ranking; the recording says so (config post_norms). GPT-2 has none and gets them."""
    from hexray_core.record import Recorder
    from hexray_core.replay.dictionary import Dictionary
    from hexray_core.replay.features import feature_logits

    def z_dict(trace):
        cfg = trace.config
        width, d_sae = int(cfg["n_heads"]) * int(cfg["d_head"]), 8
        rng = np.random.default_rng(0)
        w = rng.standard_normal((2, width, d_sae)).astype(np.float32)
        return Dictionary(W_enc=w[0], b_enc=np.zeros(d_sae, np.float32), W_dec=w[1].T.copy(),
                          b_dec=np.zeros(width, np.float32), hook_in="blocks.0.attn.hook_z",
                          hook_out="blocks.0.attn.hook_z", architecture="standard", layer=0)

    for build, post in ((tiny.build_tiny_gemma2, True), (tiny.build_tiny_gpt2, False)):
        path = Recorder(build(tiny_tokenizer), tokenizer=tiny_tokenizer, device="cpu").record(
            PROMPT, tmp_path / f"{post}.hxr", bundle=True).path
        trace = hexray.open(path)
        assert trace.config["post_norms"] is post
        logits = feature_logits(trace, z_dict(trace), range(3), k=4)
        assert all((len(top), len(bottom)) == ((0, 0) if post else (4, 4)) for top, bottom in logits)
