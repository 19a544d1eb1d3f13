"""Dictionaries read from every format HexRay supports, written here in memory with the formats' own layouts.

Each encode is checked against the architecture's formula written out independently below; bad files (wrong
shapes, NaN, huge claimed sizes, unknown hooks) are one HexRayError line.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from hexray_core.errors import HexRayError
from hexray_core.replay.dictionary import hub_reference, load_dictionary, resolve_reference

D_IN, D_SAE = 16, 40
RNG = np.random.default_rng(0)


def _w(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _x(n=7):
    return _w(n, D_IN, scale=1.0)


def saelens_folder(path, arch="standard", *, hook="blocks.1.hook_resid_pre", extra_cfg=None, pre6=False, d_out=None,
                   weights=None):
    os.makedirs(path, exist_ok=True)
    d_out = d_out or D_IN
    w = {"W_enc": _w(D_IN, D_SAE), "W_dec": _w(D_SAE, d_out), "b_enc": _w(D_SAE), "b_dec": _w(d_out)}
    if "jumprelu" in arch:
        w["threshold"] = np.abs(_w(D_SAE, scale=0.3))
    if "skip" in arch:
        w["W_skip"] = _w(d_out, D_IN)
    if arch == "gated":
        w["b_gate"] = w.pop("b_enc")
        w["r_mag"], w["b_mag"] = _w(D_SAE, scale=0.2), _w(D_SAE)
    w.update(weights or {})
    save_file(w, os.path.join(path, "sae_weights.safetensors"))
    if pre6:
        cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": hook, "hook_point_layer": 1, "model_name": "tiny",
               "apply_b_dec_to_input": True, "sae_lens_version": "3.0.0"}
    else:
        cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
               "apply_b_dec_to_input": arch in ("standard", "gated", "topk", "jumprelu"),
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"model_name": "tiny", "hook_name": hook, "sae_lens_version": "6.54.12",
                            "model_from_pretrained_kwargs": {"center_writing_weights": False}}}
        if d_out != D_IN or "transcoder" in arch:
            cfg["d_out"] = d_out
            cfg["metadata"]["hook_name_out"] = hook.replace("ln2.hook_normalized", "hook_mlp_out")
    cfg.update(extra_cfg or {})
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return w, cfg


def relu(x):
    return np.maximum(x, 0)


def test_standard_sae_encode_decode_equal_the_formula(tmp_path):
    w, _ = saelens_folder(tmp_path / "sae")
    ds = load_dictionary(tmp_path / "sae")
    assert ds.kind == "sae" and list(ds.layers) == [1]
    d = ds[1]
    assert d.hook_in == d.hook_out == "blocks.1.hook_resid_pre"
    # SAELens runs it on from_pretrained_no_processing: flags the kwargs leave out are off
    assert not ds.space.center_writing_weights and not ds.space.fold_ln and not ds.space.fold_value_biases
    x = _x()
    f = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    np.testing.assert_allclose(d.encode(x), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.decode(f), f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-6)
    assert (f > 0).any() and (f == 0).any()


def test_jumprelu_topk_gated(tmp_path):
    x = _x()
    w, _ = saelens_folder(tmp_path / "j", "jumprelu")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    np.testing.assert_allclose(load_dictionary(tmp_path / "j")[1].encode(x), relu(pre) * (pre > w["threshold"]),
                               rtol=1e-5, atol=1e-6)
    w, _ = saelens_folder(tmp_path / "t", "topk", extra_cfg={"k": 3})
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    want = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row)[:3]
        want[i, top] = relu(row[top])
    np.testing.assert_allclose(load_dictionary(tmp_path / "t")[1].encode(x), want, rtol=1e-5, atol=1e-6)
    w, _ = saelens_folder(tmp_path / "g", "gated")
    xc = x - w["b_dec"]
    gate = (xc @ w["W_enc"] + w["b_gate"]) > 0
    mag = relu(xc @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"])
    np.testing.assert_allclose(load_dictionary(tmp_path / "g")[1].encode(x), gate * mag, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_transcoders(tmp_path, arch):
    w, _ = saelens_folder(tmp_path / arch, arch, hook="blocks.0.ln2.hook_normalized", d_out=12)
    ds = load_dictionary(tmp_path / arch)
    d = ds[0]
    assert ds.kind == "transcoder" and d.hook_out == "blocks.0.hook_mlp_out" and d.d_out == 12
    x = _x()
    pre = x @ w["W_enc"] + w["b_enc"]  # transcoders never subtract b_dec from their input
    f = relu(pre) * (pre > w["threshold"]) if "jumprelu" in arch else relu(pre)
    np.testing.assert_allclose(d.encode(x), f, rtol=1e-5, atol=1e-6)
    out = f @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "skip" in arch else 0)
    np.testing.assert_allclose(d.forward(x), out, rtol=1e-5, atol=1e-5)


def test_pre_6_config_and_normalisation(tmp_path):
    w, _ = saelens_folder(tmp_path / "old", pre6=True, hook="blocks.1.hook_resid_post")
    d = load_dictionary(tmp_path / "old")[1]
    assert d.hook_in == "blocks.1.hook_resid_post" and d.apply_b_dec_to_input
    x = _x()
    np.testing.assert_allclose(d.encode(x), relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]), rtol=1e-5, atol=1e-6)
    # expected_average_only_in: SAELens applies nothing at run time (the factor is folded in when known)
    w, _ = saelens_folder(tmp_path / "ea", extra_cfg={"normalize_activations": "expected_average_only_in",
                                                       "apply_b_dec_to_input": False})
    np.testing.assert_allclose(load_dictionary(tmp_path / "ea")[1].encode(x), relu(x @ w["W_enc"] + w["b_enc"]),
                               rtol=1e-5, atol=1e-6)
    w, _ = saelens_folder(tmp_path / "ln", extra_cfg={"normalize_activations": "layer_norm"})
    mu = x.mean(-1, keepdims=True)
    std = (x - mu).std(-1, keepdims=True, ddof=1)
    xn = (x - mu) / (std + 1e-5)
    d = load_dictionary(tmp_path / "ln")[1]
    f = relu((xn - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    np.testing.assert_allclose(d.encode(x), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.decode(f, x=x), (f @ w["W_dec"] + w["b_dec"]) * std + mu, rtol=1e-5, atol=1e-5)


def test_folder_of_saelens_folders_is_one_set(tmp_path):
    for layer in (0, 1):
        saelens_folder(tmp_path / "set" / f"layer_{layer}", "transcoder", hook=f"blocks.{layer}.ln2.hook_normalized")
    ds = load_dictionary(tmp_path / "set")
    assert ds.kind == "transcoder" and sorted(ds.layers) == [0, 1]
    with pytest.raises(HexRayError, match="no dictionary for layer 5"):
        ds[5]


def test_circuit_tracer_transcoder_set_and_clt(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    ws = []
    for i in range(2):
        w = {"W_enc": _w(D_SAE, D_IN), "W_dec": _w(D_SAE, D_IN), "b_enc": _w(D_SAE), "b_dec": _w(D_IN),
             "activation_function.threshold": np.abs(_w(D_SAE, scale=0.3)), "W_skip": _w(D_IN, D_IN)}
        save_file(w, str(folder / f"layer_{i}.safetensors"))
        ws.append(w)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "tiny", "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out", "transcoders": [f"layer_{i}.safetensors" for i in range(2)]}))
    ds = load_dictionary(folder)
    assert ds.kind == "transcoder" and not ds.space.fold_ln and not ds.space.center_writing_weights
    d = ds[1]
    assert d.hook_in == "blocks.1.mlp.hook_in" and d.hook_out == "blocks.1.mlp.hook_out"
    x = _x()
    w = ws[1]
    pre = x @ w["W_enc"].T + w["b_enc"]
    f = pre * (pre > w["activation_function.threshold"])
    np.testing.assert_allclose(d.encode(x), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.forward(x), f @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T, rtol=1e-5, atol=1e-5)

    clt = tmp_path / "clt"
    clt.mkdir()
    n = 3
    for i in range(n):
        save_file({f"W_enc_{i}": _w(D_SAE, D_IN), f"b_enc_{i}": _w(D_SAE), f"b_dec_{i}": _w(D_IN),
                   f"threshold_{i}": np.abs(_w(D_SAE, scale=0.3))}, str(clt / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": _w(D_SAE, n - i, D_IN)}, str(clt / f"W_dec_{i}.safetensors"))
    (clt / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder",
                                                     "feature_input_hook": "hook_resid_mid",
                                                     "feature_output_hook": "hook_mlp_out"}))
    ds = load_dictionary(clt)
    assert ds.kind == "clt" and ds[0].W_dec.shape == (D_SAE, 3, D_IN) and ds[2].W_dec.shape == (D_SAE, 1, D_IN)
    assert ds[1].hook_in == "blocks.1.hook_resid_mid"


def test_gemma_scope_npz_and_safetensors_and_llama_scope(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    w = {"W_enc": _w(D_IN, D_SAE), "W_dec": _w(D_SAE, D_IN), "b_enc": _w(D_SAE), "b_dec": _w(D_IN),
         "threshold": np.abs(_w(D_SAE, scale=0.3))}
    np.savez(folder / "params.npz", **w)
    ds = load_dictionary(folder / "params.npz")
    d = ds[3]
    assert d.hook_in == "blocks.3.hook_resid_post" and not d.apply_b_dec_to_input
    x = _x()
    pre = x @ w["W_enc"] + w["b_enc"]
    np.testing.assert_allclose(d.encode(x), relu(pre) * (pre > w["threshold"]), rtol=1e-5, atol=1e-6)

    att = tmp_path / "gemma-scope-2b-pt-att" / "layer_7" / "width_16k" / "average_l0_50"
    att.mkdir(parents=True)
    np.savez(att / "params.npz", **w)  # reads the heads' outputs concatenated (n_heads * d_head wide)
    da = load_dictionary(att / "params.npz")[7]
    assert (da.hook_in, da.hook_out, da.architecture) == ("blocks.7.attn.hook_z", "blocks.7.attn.hook_z", "jumprelu")
    assert not da.space.fold_value_biases  # Gemma Scope read an unprocessed model

    g2 = tmp_path / "gemma-scope-2-270m-pt-transcoders" / "layer_5" / "width_16k_l0_small"
    g2.mkdir(parents=True)
    w2 = {"w_enc": _w(D_IN, D_SAE), "w_dec": _w(D_SAE, D_IN), "b_enc": _w(D_SAE), "b_dec": _w(D_IN),
          "threshold": np.abs(_w(D_SAE, scale=0.3)), "affine_skip_connection": _w(D_IN, D_IN)}
    save_file(w2, str(g2 / "params.safetensors"))
    d2 = load_dictionary(g2)[5]
    assert d2.hook_out == "blocks.5.hook_mlp_out" and d2.W_skip is not None
    pre = x @ w2["w_enc"] + w2["b_enc"]
    f = relu(pre) * (pre > w2["threshold"])
    np.testing.assert_allclose(d2.forward(x), f @ w2["w_dec"] + w2["b_dec"] + x @ w2["affine_skip_connection"],
                               rtol=1e-5, atol=1e-5)

    ls = tmp_path / "Llama3_1-8B-Base-L2R-8x"
    (ls / "checkpoints").mkdir(parents=True)
    (ls / "hyperparams.json").write_text(json.dumps({
        "d_model": D_IN, "d_sae": D_SAE, "hook_point_in": "blocks.2.hook_resid_post",
        "hook_point_out": "blocks.2.hook_resid_post", "jump_relu_threshold": 0.1,
        "dataset_average_activation_norm": {"in": 8.0, "out": 8.0}}))
    w3 = {"encoder.weight": _w(D_SAE, D_IN), "decoder.weight": _w(D_IN, D_SAE), "encoder.bias": _w(D_SAE),
          "decoder.bias": _w(D_IN)}
    save_file(w3, str(ls / "checkpoints" / "final.safetensors"))
    d3 = load_dictionary(ls)[2]
    s = D_IN ** 0.5 / 8.0  # SAELens folds the norm factor into W_enc and the threshold
    pre = x @ (w3["encoder.weight"].T * s) + w3["encoder.bias"]
    np.testing.assert_allclose(d3.encode(x), relu(pre) * (pre > 0.1 * s), rtol=1e-5, atol=1e-6)
    assert load_dictionary(ls / "checkpoints" / "final.safetensors")[2].d_sae == D_SAE


def test_hub_references_resolve(tmp_path, monkeypatch):
    assert hub_reference("hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_82") == \
        ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_82")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HexRayError, match="needs the hub .*google/gemma-scope-2b-pt-res.*layer_3"):
        load_dictionary("hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_82")
    # a copy already in the Hugging Face cache is used without the hub
    snap = tmp_path / "hub" / "models--me--saes" / "snapshots" / "abc" / "blocks.1.hook_resid_pre"
    saelens_folder(snap)
    assert resolve_reference("hf://me/saes/blocks.1.hook_resid_pre") == str(snap)
    assert sorted(load_dictionary("hf://me/saes/blocks.1.hook_resid_pre").layers) == [1]
    table = tmp_path / "pretrained_saes.yaml"
    table.write_text(yaml.safe_dump({"gpt2-small-res-jb": {"repo_id": "jbloom/GPT2-Small-SAEs-Reformatted",
                                                           "saes": [{"id": "blocks.0.hook_resid_pre",
                                                                     "path": "blocks.0.hook_resid_pre"}]}}))
    monkeypatch.setenv("HEXRAY_SAELENS_DIRECTORY", str(table))
    assert hub_reference("sae-lens:gpt2-small-res-jb/blocks.0.hook_resid_pre") == \
        ("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.0.hook_resid_pre")
    with pytest.raises(HexRayError, match="needs the hub .*jbloom/GPT2-Small-SAEs-Reformatted"):
        load_dictionary("sae-lens:gpt2-small-res-jb/blocks.0.hook_resid_pre")
    with pytest.raises(HexRayError, match="has no SAE 'nope'"):
        hub_reference("sae-lens:gpt2-small-res-jb/nope")
    for bad in ("hf://only", "hf://a/../b", "sae-lens:norelease"):
        with pytest.raises(HexRayError):
            hub_reference(bad)


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith("--dict ")
    return msg


def test_bad_dictionary_files_are_one_line(tmp_path):
    saelens_folder(tmp_path / "shape", weights={"b_enc": _w(D_SAE + 1)})
    with pytest.raises(HexRayError, match="b_enc has shape") as e:
        load_dictionary(tmp_path / "shape")
    _one_line(e)
    saelens_folder(tmp_path / "dec", weights={"W_dec": _w(D_SAE - 1, D_IN)})
    with pytest.raises(HexRayError, match="W_dec has shape"):
        load_dictionary(tmp_path / "dec")
    nan = _w(D_IN, D_SAE)
    nan[3, 4] = np.nan
    saelens_folder(tmp_path / "nan", weights={"W_enc": nan})
    with pytest.raises(HexRayError, match="NaN") as e:
        load_dictionary(tmp_path / "nan")
    _one_line(e)
    # a header that claims a huge tensor in a small file: refused before anything is allocated
    saelens_folder(tmp_path / "huge")
    path = tmp_path / "huge" / "sae_weights.safetensors"
    header = json.dumps({"W_enc": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(HexRayError, match="claims shape") as e:
        load_dictionary(tmp_path / "huge")
    _one_line(e)
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(HexRayError, match="not a safetensors file"):
        load_dictionary(tmp_path / "huge")
    saelens_folder(tmp_path / "cfg")
    (tmp_path / "cfg" / "cfg.json").write_text("{not json")
    with pytest.raises(HexRayError, match="not valid JSON"):
        load_dictionary(tmp_path / "cfg")
    saelens_folder(tmp_path / "arch", extra_cfg={"architecture": "matching_pursuit"})
    with pytest.raises(HexRayError, match="not supported"):
        load_dictionary(tmp_path / "arch")
    saelens_folder(tmp_path / "nohook", extra_cfg={"metadata": {}})
    with pytest.raises(HexRayError, match="names no hook"):
        load_dictionary(tmp_path / "nohook")
    npz = tmp_path / "gemma-scope-res" / "layer_1"
    npz.mkdir(parents=True)
    np.savez(npz / "params.npz", W_enc=_w(D_IN, D_SAE))
    with pytest.raises(HexRayError, match="has no w_dec"):
        load_dictionary(npz / "params.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HexRayError, match="no dictionary here"):
        load_dictionary(tmp_path / "empty")
    with pytest.raises(HexRayError, match="no such file"):
        load_dictionary(tmp_path / "absent")


def test_hostile_dictionary_files(tmp_path):
    saelens_folder(tmp_path / "fifo")
    os.remove(tmp_path / "fifo" / "cfg.json")
    os.mkfifo(tmp_path / "fifo" / "cfg.json")  # never opened for reading: that would block
    with pytest.raises(HexRayError, match="not a dictionary file") as e:
        load_dictionary(tmp_path / "fifo")
    assert "\n" not in str(e.value)
    saelens_folder(tmp_path / "deep")
    (tmp_path / "deep" / "cfg.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(HexRayError, match="not valid JSON"):
        load_dictionary(tmp_path / "deep")
    saelens_folder(tmp_path / "hdr")
    path = tmp_path / "hdr" / "sae_weights.safetensors"
    for header in (b"[1, 2]", b'{"W_enc": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}',
                   b'{"W_enc": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}', b"[" * 50000):
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
        with pytest.raises(HexRayError) as e:
            load_dictionary(tmp_path / "hdr")
        assert "\n" not in str(e.value)
    (tmp_path / "big").mkdir()
    saelens_folder(tmp_path / "big")
    (tmp_path / "big" / "cfg.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(HexRayError, match="more than a dictionary config"):
        load_dictionary(tmp_path / "big")
