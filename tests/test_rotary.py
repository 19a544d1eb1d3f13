"""Rotary embeddings as linear maps (hexray_core/replay/rotary.py, written down by hexray_core/record/rotary.py).

References: the bridge itself (a float32 trace holding both ``hook_q``, before the rotation, and ``hook_rot_q``, after
it: R_p applied to the first must give the second, for every position, head and layer), and the rotary functions
TransformerLens's bridge calls (Hugging Face's ``apply_rotary_pos_emb``, TL's adjacent-pair variant) applied to the
basis vectors, for the conventions the tiny models do not use (adjacent pairs, partial rotation, bfloat16 tables).
"""

from __future__ import annotations

import numpy as np
import pytest

import hexray
from hexray_core.errors import HexRayError
from hexray_core.replay.rotary import check_params, rotation

PROMPT = "Alice and Bob went to the store. Bob gave a drink to Alice, and then"
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _recorder(tiny, tok, arch):
    from hexray_core.record import Recorder

    build = {"llama": tiny.build_tiny_llama, "mistral": tiny.build_tiny_mistral, "gemma2": tiny.build_tiny_gemma2,
             "llama-yarn": lambda t: tiny.build_tiny_llama(t, rope=YARN),
             "llama3-rope": lambda t: tiny.build_tiny_llama(t, rope=LLAMA3)}[arch]
    return Recorder(build(tok), tokenizer=tok)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "llama-yarn", "llama3-rope"])
def test_rotation_turns_the_recorded_q_and_k_into_the_rotated_ones(tiny, tiny_tokenizer, tmp_path, arch):
    rec = _recorder(tiny, tiny_tokenizer, arch)
    path = tmp_path / "t.hxr"
    rec.record(PROMPT, path, act_dtype="f32", lens=False, hooks="default,blocks.*.attn.hook_q,blocks.*.attn.hook_k")
    with hexray.open(path) as t:
        rot = t.meta["attention"]["rotary"]
        assert check_params(rot) is None and rot["style"] == "half" and rot["dtype"] == "f32"
        if arch == "llama-yarn":
            assert rot["scale"] > 1.1  # YaRN scales cos and sin: the rotation is not orthogonal
        r = t.run(0)
        d_head = int(t.config["d_head"])
        for lay in range(t.n_layers):
            for pre, post in (("hook_q", "hook_rot_q"), ("hook_k", "hook_rot_k")):
                x, want = r[f"blocks.{lay}.attn.{pre}"].astype(np.float64), r[f"blocks.{lay}.attn.{post}"]
                got = np.stack([x[p] @ rotation(rot, p, d_head).T for p in range(r.n_tokens)])
                assert np.abs(got - x).max() > 0.1  # the rotation really moves them
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_recorder_refuses_a_rotation_that_depends_on_the_context_length(tiny, tiny_tokenizer):
    from hexray_core.record import Recorder

    hf = tiny.build_tiny_llama(tiny_tokenizer, rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    spec = Recorder(hf, tokenizer=tiny_tokenizer).attention_spec()
    assert spec["store"] == "qk"  # patterns are still recomputed from the recorded (rotated) q and k
    assert spec["rotary"] == {"refused": "its rotary frequencies depend on the context length (rope_type dynamic)"}
    assert check_params(spec["rotary"]) is None


def _tables(inv: np.ndarray, n: int, scale: float = 1.0):
    import torch

    ang = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor(inv, dtype=torch.float32)[None]
    return (ang.cos() * scale)[None], (ang.sin() * scale)[None]  # [1, n, dim/2]


def _reference_matrix(apply, d_head: int, pos: int) -> np.ndarray:
    """The matrix of ``apply`` (a rotation of one head's vector at ``pos``), from the basis vectors."""
    import torch

    eye = torch.eye(d_head, dtype=torch.float32)[None, :, None, :]  # [1, d_head (as heads), 1 position, d_head]
    out = apply(eye, pos)[0, :, 0].double().numpy()  # row e: the image of basis vector e
    return out.T


@pytest.mark.parametrize("variant", ["half", "partial", "adjacent-relayout", "adjacent-interleaved", "bf16"])
def test_rotation_equals_the_bridges_rotary_functions(variant):
    import torch
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        _apply_rotary_pos_emb_adjacent_pairs,
    )
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d_head, n = 16, 40
    dim = 8 if variant == "partial" else d_head
    inv = (1.0 / (10000.0 ** (np.arange(0, dim, 2) / dim))).astype(np.float32)
    scale = 1.25
    c, s = _tables(inv, n, scale)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    full = lambda t: torch.cat([t, t], -1).to(dtype)  # noqa: E731 (HF's half-duplicated layout)
    inter = lambda t: t.repeat_interleave(2, -1)  # noqa: E731 (Cohere's)

    def apply(x, pos):
        cp, sp = slice(pos, pos + 1), slice(pos, pos + 1)
        if variant in ("half", "bf16"):
            return apply_rotary_pos_emb(x, x, full(c[:, cp]).float(), full(s[:, sp]).float())[0]
        if variant == "partial":  # the bridge's split: rotate the first cos.shape[-1] dimensions, pass the rest
            r = apply_rotary_pos_emb(x[..., :dim], x[..., :dim], full(c[:, cp]), full(s[:, sp]))[0]
            return torch.cat([r, x[..., dim:]], -1)
        if variant == "adjacent-relayout":
            return _apply_rotary_pos_emb_adjacent_pairs(x, x, full(c[:, cp]), full(s[:, sp]))[0]
        return _apply_rotary_pos_emb_adjacent_pairs(x, x, inter(c[:, cp]), inter(s[:, sp]), relayout_cos_sin=False)[0]

    rot = {"style": "adjacent" if variant.startswith("adjacent") else "half", "dim": dim,
           "inv_freq": [float(x) for x in inv], "scale": scale, "dtype": "bf16" if variant == "bf16" else "f32"}
    assert check_params(rot) is None
    for pos in (0, 1, 7, n - 1):
        want = _reference_matrix(apply, d_head, pos)
        np.testing.assert_allclose(rotation(rot, pos, d_head), want, rtol=0, atol=1e-6)
    if variant == "bf16":  # the tables really are rounded: float32 ones would differ
        assert np.abs(rotation({**rot, "dtype": "f32"}, n - 1, d_head) - want).max() > 1e-4


def test_bad_rotary_meta_is_one_line():
    assert "refused" in check_params({"style": "spiral", "dim": 4, "inv_freq": [1.0, 0.1], "scale": 1.0,
                                      "dtype": "f32"})
    assert check_params({"style": "half", "dim": 4, "inv_freq": [1.0], "scale": 1.0, "dtype": "f32"}) is not None
    with pytest.raises(HexRayError, match="not a rotation HexRay knows"):
        rotation({"style": "half", "dim": 32, "inv_freq": [1.0] * 16, "scale": 1.0}, 3, 16)
