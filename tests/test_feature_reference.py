"""HexRay's features equal those SAELens and circuit-tracer compute, on the same model and prompt.

The fixtures under tests/fixtures/reference/ were written in a separate venv by scripts/reference/make_fixtures.py
(SAELens 6.54 and circuit-tracer 0.5 cannot be installed beside HexRay's recorder): the tiny models as Hugging Face
folders, dictionaries saved by the libraries' own save functions, and the libraries' own inputs (the activations
the dictionary reads, from TransformerLens 3 loaded as each library loads it), feature activations and
reconstructions. Here HexRay records the same model with TransformerLens 4 in compatibility mode, rebuilds each
dictionary's space from the trace and the kit, and must agree in float32 to 1e-5 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hexray
from hexray_core.replay.dictionary import load_dictionary
from hexray_core.replay.features import dictionary_input, dictionary_target

REF = Path(__file__).parent / "fixtures" / "reference"
MANIFEST = json.loads((REF / "manifest.json").read_text())
MODELS = sorted(MANIFEST["models"])


def close(got, want, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


@pytest.fixture(scope="module", params=MODELS)
def recorded(request, tmp_path_factory):
    from hexray_core.record import Recorder

    kind = request.param
    info = MANIFEST["models"][kind]
    rec = Recorder(str(REF / info["folder"]), device="cpu")
    path = rec.record(info["prompt"], tmp_path_factory.mktemp(f"ref-{kind}") / "t.hxr", act_dtype="float32",
                      bundle=True).path
    return kind, info, hexray.open(path)[0]


def test_saelens_features_equal_saelens(recorded):
    kind, info, run = recorded
    ref = np.load(REF / f"sae_{kind}.npz")
    assert run.tokens == ref["tokens"].tolist()
    assert info["saes"]
    for name, sae in info["saes"].items():
        ds = load_dictionary(REF / "sae" / kind / name)
        (d,) = ds.layers.values()
        assert d.hook_in == sae["hook_in"] and d.architecture == sae["architecture"]
        x = dictionary_input(run, d)
        close(x, ref[f"{name}/input"], f"{name}: the activations it reads")
        f = d.encode(x)
        close(f, ref[f"{name}/feature_acts"], f"{name}: feature activations")
        assert (f > 0).any()
        close(d.decode(f, x=x) + (0 if d.W_skip is None else d.skip(x)), ref[f"{name}/decoded"],
              f"{name}: reconstruction")
        if f"{name}/target" in ref:
            close(dictionary_target(run, d), ref[f"{name}/target"], f"{name}: what it reconstructs")


def test_circuit_tracer_features_equal_circuit_tracer(recorded):
    kind, info, run = recorded
    graphs = info.get("graphs") or {}
    assert graphs
    for name, g in graphs.items():
        ref = np.load(REF / f"graph_{name}.npz")
        assert run.tokens == ref["tokens"].tolist()
        ds = load_dictionary(REF / "transcoders" / name)
        assert ds.kind == ("clt" if g["model_kind"] == "cross_layer_transcoder" else "transcoder")
        for layer, d in sorted(ds.layers.items()):
            x = dictionary_input(run, d)
            close(x, ref["input"][layer], f"{name} layer {layer}: the activations it reads")
            close(d.encode(x), ref["feature_acts"][layer], f"{name} layer {layer}: feature activations")
            close(dictionary_target(run, d), ref["mlp_out"][layer], f"{name} layer {layer}: MLP output")


def test_attention_output_features_read_hook_z_and_promote_through_w_o(recorded):
    """hook_z dictionaries (heads concatenated): the top logits of a feature are its decoder row through the
    model's own output projection and unembedding, computed here from the Hugging Face weights (the final norm's
    weight; a LayerNorm also centres whatever is written)."""
    from safetensors.numpy import load_file

    from hexray_core.replay.features import feature_logits

    kind, info, run = recorded
    hf = {k: v.astype(np.float64) for k, v in load_file(str(REF / info["folder"] / "model.safetensors")).items()}
    if kind == "gpt2":  # Conv1D weights are [in, out]; the unembedding is tied to wte
        w_o, norm = "transformer.h.{}.attn.c_proj.weight", hf["transformer.ln_f.weight"]
        w_u = hf["transformer.wte.weight"].T
    else:  # Linear weights are [out, in]
        w_o, norm, w_u = "model.layers.{}.self_attn.o_proj.weight", hf["model.norm.weight"], hf["lm_head.weight"].T
    names = [n for n, s in info["saes"].items() if s["hook_in"].endswith("attn.hook_z")]
    assert len(names) == {"gpt2": 2, "llama": 1}[kind]
    for name in names:
        d = next(iter(load_dictionary(REF / "sae" / kind / name).layers.values()))
        proj = hf[w_o.format(d.layer)]
        w = d.W_dec[:6].astype(np.float64) @ (proj if kind == "gpt2" else proj.T)
        if kind == "gpt2":
            w = w - w.mean(-1, keepdims=True)
        want = (w * norm) @ w_u
        for f, (top, bottom) in enumerate(feature_logits(run.trace, d, range(6), k=5)):
            assert [t[0] for t in top] == np.argsort(-want[f], kind="stable")[:5].tolist()
            assert [t[0] for t in bottom] == np.argsort(want[f], kind="stable")[:5].tolist()
            np.testing.assert_allclose([t[2] for t in top], np.sort(want[f])[::-1][:5], rtol=1e-4)
