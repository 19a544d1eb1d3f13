"""Features of real traces: `hexray features`, `hexray replay --by feature`, `run.features`, refusals.

Dictionaries are random (the right shapes for the tiny models) and written in each library's layout; the spaces
themselves are checked against the unprocessed Hugging Face model in test_feature_spaces.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import hexray
from hexray.cli.main import main
from hexray_core.errors import HexRayError
from hexray_core.replay.features import activations, dictionary_input

PROMPT = "The quick brown fox jumps over the lazy dog."
D = 64  # tiny models' d_model


def _rand(*shape, scale=0.3, seed=[0]):  # noqa: B006 (a counter shared across calls)
    seed[0] += 1
    return (np.random.default_rng(seed[0]).standard_normal(shape) * scale).astype(np.float32)


def _sae(path, hook, *, arch="standard", d_out=D, center=False, fold=True, d_in=D, n=96):
    os.makedirs(path, exist_ok=True)
    w = {"W_enc": _rand(d_in, n), "W_dec": _rand(n, d_out), "b_enc": _rand(n, scale=0.1), "b_dec": _rand(d_out)}
    if "skip" in arch:
        w["W_skip"] = _rand(d_out, d_in, scale=0.05)
    save_file(w, os.path.join(path, "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": n, "d_out": d_out, "dtype": "float32",
           "apply_b_dec_to_input": "transcoder" not in arch, "normalize_activations": "none",
           "metadata": {"hook_name": hook, "hook_name_out": hook.replace("ln2.hook_normalized", "hook_mlp_out"),
                        "sae_lens_version": "6.54.12",
                        "model_from_pretrained_kwargs": {"center_writing_weights": center, "fold_ln": fold}}}
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def setup(tiny_gpt2_recorder, tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    trace = tiny_gpt2_recorder.record([PROMPT, "Alice and Bob"], root / "t.hxr", act_dtype="float32",
                                      bundle=True).path
    sae = _sae(root / "sae", "blocks.1.hook_resid_pre")
    tcs = root / "tcs"
    for layer in (0, 1):
        _sae(tcs / f"layer_{layer}", f"blocks.{layer}.ln2.hook_normalized", arch="skip_transcoder")
    ct = root / "ct"
    ct.mkdir()
    for i in range(2):
        save_file({"W_enc": _rand(80, D), "W_dec": _rand(80, D), "b_enc": _rand(80, scale=0.1), "b_dec": _rand(D),
                   "activation_function.threshold": np.full(80, 0.05, np.float32)}, str(ct / f"layer_{i}.safetensors"))
    (ct / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                                    "feature_output_hook": "hook_mlp_out",
                                                    "transcoders": ["layer_0.safetensors", "layer_1.safetensors"]}))
    clt = root / "clt"
    clt.mkdir()
    for i in range(2):
        save_file({f"W_enc_{i}": _rand(50, D), f"b_enc_{i}": _rand(50, scale=0.1), f"b_dec_{i}": _rand(D),
                   f"threshold_{i}": np.full(50, 0.02, np.float32)}, str(clt / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": _rand(50, 2 - i, D)}, str(clt / f"W_dec_{i}.safetensors"))
    (clt / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder",
                                                     "feature_input_hook": "hook_resid_mid",
                                                     "feature_output_hook": "hook_mlp_out"}))
    return {"trace": trace, "sae": str(sae), "tcs": str(tcs), "ct": str(ct), "clt": str(clt), "root": root}


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_features_json_shape_and_values(setup, capsys):
    rc, out, err = _cli(capsys, "features", setup["trace"], "--dict", setup["sae"], "--json", "--position", "3",
                        "--top-k", "all")
    assert rc == 0, err
    doc = json.loads(out)["features"]
    assert doc["position"] == 3 and [x["layer"] for x in doc["layers"]] == [1]
    layer = doc["layers"][0]
    assert layer["hook"] == "blocks.1.hook_resid_pre"
    run = hexray.open(setup["trace"])[0]
    d = hexray.load_dictionary(setup["sae"])[1]
    f = d.encode(dictionary_input(run, d))[3]
    active = np.flatnonzero(f)
    assert layer["l0"] == len(active) > 0
    assert sorted(a["feature"] for a in layer["active"]) == sorted(active.tolist())
    acts = [a["activation"] for a in layer["active"]]
    assert acts == sorted(acts, reverse=True)
    for a in layer["active"]:
        assert a["activation"] == pytest.approx(float(f[a["feature"]]), rel=1e-5, abs=1e-5)  # one row vs the run
        assert a["label"] == f"L1F{a['feature']}" and len(a["top_logits"]) == 5
        tid, text, value = a["top_logits"][0]
        w = d.W_dec[a["feature"]]
        w_u = run.trace.kit["W_U"]
        assert value == pytest.approx(float((w - w.mean()) @ w_u[:, tid]), rel=1e-4)
        assert value >= a["top_logits"][-1][2] and isinstance(text, str)
    x = activations(run, "blocks.1.hook_resid_pre", d.space)[3]
    assert layer["error_norm"] == pytest.approx(float(np.linalg.norm(x - d.forward(x[None])[0])), rel=1e-5)
    rc, out, _ = _cli(capsys, "features", setup["trace"], "--dict", setup["sae"], "--top-k", "2")
    assert rc == 0 and "L1F" in out and "reconstruction error norm" in out


@pytest.mark.parametrize("which", ["sae", "tcs", "ct", "clt"])
def test_replay_by_feature_is_complete(setup, capsys, which):
    trace = hexray.open(setup["trace"])
    by_comp = trace.attribution(-1).by_label()
    a = trace.attribution(-1, by="feature", dictionary=setup[which])
    assert a.error < 1e-4 * max(1.0, abs(a.logit))
    labels = a.by_label()
    assert any(c.kind == "feature" for c in a.contributions)
    if which in ("tcs", "ct", "clt"):
        for layer in (0, 1):
            assert f"MLP L{layer}" not in labels and f"MLP L{layer} error" in labels
            parts = [c.value for c in a.contributions if c.label.startswith(f"MLP L{layer} ")]
            feats = [c.value for c in a.contributions if c.kind == "feature" and c.layer == layer]
            if which != "clt":  # a cross-layer feature's row sums what it writes into every MLP
                assert sum(parts) + sum(feats) == pytest.approx(by_comp[f"MLP L{layer}"], abs=1e-4)
        assert labels["Attn L1"] == pytest.approx(by_comp["Attn L1"])
        if which == "tcs":
            assert "MLP L1 skip" in labels
    else:
        assert "Embed" not in labels and "Resid L1 error" in labels and "Attn L1" in labels
        inside = by_comp["Embed"] + by_comp["PosEmbed"] + by_comp["Attn L0"] + by_comp["MLP L0"]
        assert sum(c.value for c in a.contributions if c.layer == 1 and c.kind.startswith("feature")) == \
            pytest.approx(inside, abs=1e-4)
    rc, out, err = _cli(capsys, "replay", setup["trace"], "--by", "feature", "--dict", setup[which], "--top-k", "5")
    assert rc == 0, err
    assert "error" in out.splitlines()[-1] and any(ln.startswith("- L") and "F" in ln for ln in out.splitlines())


def test_run_features_sparse_rows(setup):
    run = hexray.open(setup["trace"])[1]
    ds = hexray.load_dictionary(setup["ct"])
    f = run.features(ds, 0)
    dense = ds[0].encode(dictionary_input(run, ds[0]))
    np.testing.assert_array_equal(f.dense(), dense)
    assert f.indices.dtype == np.int32 and f.n == run.n_tokens
    idx, val = f.at(0)
    assert list(val) == sorted(val, reverse=True) and (dense[0, idx] == val).all()


def test_refusals_are_one_line(setup, capsys, tiny, tiny_tokenizer, tmp_path):
    root = setup["root"]
    bad_hook = _sae(root / "badhook", "blocks.7.hook_resid_pre")
    rc, _, err = _cli(capsys, "features", setup["trace"], "--dict", bad_hook)
    assert rc == 1 and "names layer 7" in err and err.count("\n") == 1
    odd = _sae(root / "odd", "blocks.0.attn.hook_q")
    rc, _, err = _cli(capsys, "features", setup["trace"], "--dict", odd)
    assert rc == 1 and "not one HexRay can rebuild" in err
    wide = _sae(root / "wide", "blocks.0.hook_resid_pre", d_in=32, d_out=32)
    rc, _, err = _cli(capsys, "features", setup["trace"], "--dict", wide)
    assert rc == 1 and "d_model 64" in err
    rc, _, err = _cli(capsys, "replay", setup["trace"], "--by", "feature")
    assert rc == 1 and "--dict" in err
    # a trace whose kit does not hold what centring removed (the model was handed over already processed)
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from hexray_core.record import Recorder

    bridge = TransformerBridge.boot_transformers("tiny", hf_model=tiny.build_tiny_gpt2(tiny_tokenizer),
                                                 tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True, center_unembed=False)
    path = Recorder(bridge, tokenizer=tiny_tokenizer).record(PROMPT, tmp_path / "old.hxr", bundle=True).path
    rc, _, err = _cli(capsys, "features", path, "--dict", setup["sae"])
    assert rc == 1 and "raw/W_E.mean" in err and "record again" in err
    # a dictionary trained on the centred model needs nothing from the kit: the recorded stream is its space
    centred = _sae(root / "centred", "blocks.1.hook_resid_pre", center=True)
    rc, _, err = _cli(capsys, "features", path, "--dict", centred)
    assert rc == 0, err
    # a missing hook names the --hooks that records it
    slim = Recorder(bridge, tokenizer=tiny_tokenizer).record(PROMPT, tmp_path / "slim.hxr", bundle=True,
                                                             hooks="blocks.*.hook_resid_pre").path
    rc, _, err = _cli(capsys, "features", slim, "--dict", setup["tcs"])
    assert rc == 1 and "--hooks default," in err
    with pytest.raises(HexRayError):
        hexray.open(slim)[0].features(setup["tcs"], 0)


def test_record_dict_stores_features_that_replay_reads_like_computed_ones(setup, tiny_gpt2_recorder, tmp_path,
                                                                           capsys):
    from hexray_core.dataset.record_features import run_extra

    rec = tiny_gpt2_recorder
    extra = run_extra(rec, [setup["tcs"], setup["sae"], setup["clt"]])
    slim = rec.record([PROMPT, "Alice and Bob"], tmp_path / "slim.hxr", act_dtype="float32", bundle=True,
                      hooks="blocks.*.hook_resid_post", extra=extra).path
    half = rec.record([PROMPT], tmp_path / "half.hxr", bundle=True, hooks="blocks.*.hook_resid_post",
                      extra=extra).path
    full = hexray.open(setup["trace"])
    stored = hexray.open(slim)
    assert "blocks.0.hook_mlp_out" not in stored[0] and len(stored.meta["features"]) == 3
    for which, layers in (("tcs", (0, 1)), ("sae", (1,)), ("clt", (0, 1))):
        ds = hexray.load_dictionary(setup[which])
        for layer in layers:
            for i in (0, 1):
                a, b = stored[i].features(ds, layer), full[i].features(ds, layer)
                assert a.source == "stored" and b.source == "computed"
                np.testing.assert_allclose(a.dense(), b.dense(), rtol=1e-5, atol=1e-5)
        f16 = hexray.open(half)[0].features(ds, layers[-1])
        assert f16.source == "stored" and f16.indices.dtype == np.int32
        assert hexray.open(half).reader.info("hexray.features.0.L0.values", 0).dtype == "f16"
        np.testing.assert_allclose(f16.dense(), full[0].features(ds, layers[-1]).dense(), rtol=2e-3, atol=2e-3)
    rc, out, err = _cli(capsys, "features", slim, "--dict", setup["tcs"], "--json")
    assert rc == 0, err
    doc = json.loads(out)["features"]
    assert doc["layers"][0]["error_norm"] is None and doc["layers"][0]["l0"] > 0
    # attribution needs the components themselves recorded: the missing one is named with its --hooks
    rc, _, err = _cli(capsys, "replay", slim, "--by", "feature", "--dict", setup["tcs"])
    assert rc == 1 and "--hooks default," in err
