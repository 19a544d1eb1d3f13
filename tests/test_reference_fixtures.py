"""The reference-oracle fixtures (tests/fixtures/reference, written by scripts/reference/make_fixtures.py in the
SAELens / circuit-tracer venv) are self-consistent and describe the model folders they ship with.

These tests do not compare HexRay's features or graphs with the references (the features and graph tests do);
they make sure the references are worth comparing with: the token ids are the ones HexRay's recorder gives, the
model folders compute the logits the oracle saw, every array has the shape and the meaning the README states,
and the stored feature activations follow from the stored weights and inputs by the architectures' formulas.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reference")
MANIFEST = json.load(open(os.path.join(REF, "manifest.json"), encoding="utf-8"))
KINDS = ("gpt2", "llama")
N_LAYERS = {"gpt2": 3, "llama": 2}
GRAPHS = [f"{k}_{g}" for k in KINDS for g in ("plt", "clt")]
SAES = [(k, name) for k in KINDS for name in MANIFEST["models"][k]["saes"]]


def _sae_npz(kind):
    return np.load(os.path.join(REF, f"sae_{kind}.npz"))


def _sae_weights(kind, name):
    from safetensors.numpy import load_file

    folder = os.path.join(REF, "sae", kind, name)
    cfg = json.load(open(os.path.join(folder, "cfg.json"), encoding="utf-8"))
    return cfg, load_file(os.path.join(folder, "sae_weights.safetensors"))


def _from_pre_6_0(cfg):
    """SAELens 6.54's reading of a pre-6.0 cfg.json (``handle_pre_6_0_config``), reduced to what encode needs:
    hook_point -> hook_name, architecture "standard" unless activation_fn_str is topk with a k, and
    apply_b_dec_to_input True when the key is missing."""
    assert "hook_point" in cfg and "architecture" not in cfg and "metadata" not in cfg
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    topk = cfg.get("activation_fn_str") == "topk" and k is not None
    return {"architecture": "topk" if topk else "standard", "k": k, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
            "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
            "metadata": {"hook_name": cfg["hook_point"],
                         "model_from_pretrained_kwargs": cfg["model_from_pretrained_kwargs"]}}


def _close(a, b, rtol=1e-5):
    scale = max(float(np.abs(b).max()), 1e-6)
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) <= rtol * scale


# ---------------------------------------------------------------- models and tokens


def test_manifest_lists_both_models_with_versions():
    assert set(MANIFEST["models"]) == set(KINDS)
    assert MANIFEST["versions"]["sae-lens"] == "6.54.12"
    assert MANIFEST["versions"]["circuit-tracer"] == "0.5.0"
    for kind in KINDS:
        m = MANIFEST["models"][kind]
        assert 8 <= len(m["token_ids"]) <= 16
        assert m["token_ids"][0] == m["bos_token_id"]
        assert list(_sae_npz(kind)["tokens"]) == m["token_ids"]
        for g in ("plt", "clt"):
            assert list(np.load(os.path.join(REF, f"graph_{kind}_{g}.npz"))["tokens"]) == m["token_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_hexray_records_the_fixture_token_ids(kind, tmp_path):
    """HexRay's recorder (transformers 5 + TransformerLens 4) loads the folder and tokenizes the prompt into the
    very ids the oracles ran on."""
    import hexray

    m = MANIFEST["models"][kind]
    trace = hexray.record(m["prompt"], model=os.path.join(REF, kind), output=str(tmp_path / "t.hxr"))
    assert [int(t) for t in trace.runs[0].tokens] == m["token_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_model_folder_computes_the_oracle_logits(kind):
    """transformers 5 on the committed folder gives the last-position logits TransformerLens 3 gave in the
    reference venv: the numbers belong to this model."""
    import torch
    from transformers import AutoModelForCausalLM

    m = MANIFEST["models"][kind]
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(REF, kind)).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([m["token_ids"]])).logits[0, -1].float().numpy()
    assert hf.config.vocab_size == m["d_vocab"]
    for g in ("plt", "clt"):
        ref = np.load(os.path.join(REF, f"graph_{kind}_{g}.npz"))["last_logits"]
        assert _close(logits, ref, 1e-5)


# ---------------------------------------------------------------- SAELens dictionaries


def _encode(arch, cfg, w, x):
    """SAELens 6.54's inference encode, in numpy (what the stored feature_acts must follow from)."""
    x = x.astype(np.float64)
    if cfg["apply_b_dec_to_input"]:
        x = x - w["b_dec"]
    # normalize_activations "expected_average_only_in": SAE.load_from_disk applies no scaling (see README).
    if arch == "gated":
        gate = (x @ w["W_enc"] + w["b_gate"]) > 0
        mag = np.maximum(x @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
        return gate * mag
    pre = x @ w["W_enc"] + w["b_enc"]
    if arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
        return np.maximum(pre, 0) * (pre > w["threshold"])
    if arch == "topk":
        keep = np.argsort(-pre, axis=-1)[:, : cfg["k"]]
        out = np.zeros_like(pre)
        np.put_along_axis(out, keep, np.take_along_axis(pre, keep, -1), -1)
        return np.maximum(out, 0)
    return np.maximum(pre, 0)


@pytest.mark.parametrize("kind,name", SAES, ids=[f"{k}-{n}" for k, n in SAES])
def test_sae_fixture_is_consistent(kind, name):
    info = MANIFEST["models"][kind]["saes"][name]
    cfg, w = _sae_weights(kind, name)
    if info["legacy_cfg"]:
        cfg = _from_pre_6_0(cfg)
    z = _sae_npz(kind)
    arch = cfg["architecture"]
    assert arch == info["architecture"]
    assert cfg["metadata"]["hook_name"] == info["hook_in"]
    assert cfg["metadata"].get("hook_name_out") == info["hook_out"]
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == info["model_from_pretrained_kwargs"]
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out", d_in)
    assert w["W_enc"].shape == (d_in, d_sae) and w["W_dec"].shape == (d_sae, d_out)
    assert w["b_dec"].shape == (d_out,)
    if arch.endswith("skip_transcoder"):
        assert w["W_skip"].shape == (d_out, d_in)  # SAELens: skip = x @ W_skip.T
    n = len(z["tokens"])
    x, acts = z[f"{name}/input"], z[f"{name}/feature_acts"]
    assert x.shape == (n, d_in) and acts.shape == (n, d_sae) and z[f"{name}/decoded"].shape == (n, d_out)
    for a in (x, acts, z[f"{name}/decoded"], *w.values()):
        assert np.isfinite(a).all()
    assert (acts >= 0).all()
    assert 0.1 < (acts > 0).mean() < 0.5  # a reasonable fraction of features is active
    assert _close(_encode(arch, cfg, w, x), acts, 1e-5)
    assert info["min_margin"] >= 1e-4  # no decision within float noise of flipping (README, Margins)
    if info["hook_out"]:
        assert z[f"{name}/target"].shape == (n, d_out)
    if info["hook_in"].endswith("ln2.hook_normalized"):
        # TransformerLens 3: normalised, before the norm's weight and bias (see README).
        if kind == "gpt2":
            assert np.abs(x.mean(-1)).max() < 1e-5
        rms = np.sqrt((x.astype(np.float64) ** 2).mean(-1))
        assert np.all((rms > 0.9) & (rms < 1.0 + 1e-5))


def test_centred_sae_space_is_the_raw_space_minus_its_mean():
    """The SAE loaded with center_writing_weights=True reads the raw residual minus its per-position mean."""
    z = _sae_npz("gpt2")
    raw = z["standard_norm_resid_post1/input"].astype(np.float64)  # same hook, default (raw) space
    centred = z["standard_centred_resid_post1/input"].astype(np.float64)
    assert np.abs(raw.mean(-1)).max() > 1e-2  # the raw residual really is not centred
    assert _close(centred, raw - raw.mean(-1, keepdims=True), 1e-5)


# ---------------------------------------------------------------- circuit-tracer transcoders and graphs


def _transcoder_set(name):
    import yaml
    from safetensors.numpy import load_file

    folder = os.path.join(REF, "transcoders", name)
    config = yaml.safe_load(open(os.path.join(folder, "config.yaml"), encoding="utf-8"))
    L = N_LAYERS[name.split("_")[0]]
    if config["model_kind"] == "transcoder_set":
        layers = [load_file(os.path.join(folder, p)) for p in config["transcoders"]]
        assert len(layers) == L
        W_enc = np.stack([t["W_enc"] for t in layers])
        b_enc = np.stack([t["b_enc"] for t in layers])
        thr = np.stack([t["activation_function.threshold"] for t in layers]) if "activation_function.threshold" \
            in layers[0] else None
        return config, W_enc, b_enc, thr, layers
    encs = [load_file(os.path.join(folder, f"W_enc_{i}.safetensors")) for i in range(L)]
    decs = [load_file(os.path.join(folder, f"W_dec_{i}.safetensors")) for i in range(L)]
    for i in range(L):
        assert decs[i][f"W_dec_{i}"].shape[1] == L - i  # layer i writes to layers i..L-1
    W_enc = np.stack([e[f"W_enc_{i}"] for i, e in enumerate(encs)])
    b_enc = np.stack([e[f"b_enc_{i}"] for i, e in enumerate(encs)])
    thr = np.stack([e[f"threshold_{i}"] for i, e in enumerate(encs)]) if "threshold_0" in encs[0] else None
    return config, W_enc, b_enc, thr, decs


@pytest.mark.parametrize("name", GRAPHS)
def test_transcoder_encode_fixture_is_consistent(name):
    config, W_enc, b_enc, thr, _ = _transcoder_set(name)
    z = np.load(os.path.join(REF, f"graph_{name}.npz"))
    L, n, d = z["input"].shape
    assert (L, n) == (N_LAYERS[name.split("_")[0]], len(z["tokens"]))
    assert W_enc.shape[0] == L and W_enc.shape[2] == d  # circuit-tracer: W_enc [d_transcoder, d_model]
    assert config["feature_output_hook"] == "hook_mlp_out"
    pre = np.einsum("lnd,lfd->lnf", z["input"].astype(np.float64), W_enc) + b_enc[:, None]
    acts = np.maximum(pre, 0) if thr is None else pre * (pre > thr.reshape(L, 1, -1))
    assert _close(acts, z["feature_acts"], 1e-5)
    # No pre-activation (positions >= 1, the graph's) within 1e-3 of its cut, relative to the largest.
    cut = 0.0 if thr is None else thr.reshape(L, 1, -1)
    assert np.abs(pre - cut)[:, 1:].min() >= 1e-3 * np.abs(pre[:, 1:]).max()
    assert 0.1 < (z["feature_acts"] > 0).mean() < 0.5


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_fixture_is_consistent(name):
    z = np.load(os.path.join(REF, f"graph_{name}.npz"))
    L, n, _ = z["input"].shape
    A = z["adjacency"]
    feats = z["feature_nodes"]
    n_feat, n_logit = len(feats), len(z["logit_token_ids"])
    N = n_feat + L * n + n + n_logit
    assert A.shape == (N, N) and np.isfinite(A).all()
    assert z["node_mask"].shape == (N,) and z["edge_mask"].shape == (N, N) and z["cumulative_scores"].shape == (N,)
    assert np.array_equal(feats, z["active_features"][z["selected_features"]])
    # Every active feature outside position 0 (BOS, zeroed by circuit-tracer) is a node, with its activation.
    acts = z["feature_acts"]
    assert n_feat == int((acts[:, 1:] > 0).sum()) and (feats[:, 1] > 0).all()
    assert _close(z["activation_values"], acts[feats[:, 0], feats[:, 1], feats[:, 2]], 1e-5)
    # Logit nodes: circuit-tracer's top logits (at most 10, to 95% probability) with their softmax probabilities.
    logits = z["last_logits"].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert list(z["logit_token_ids"]) == list(np.argsort(-logits)[:n_logit])
    assert _close(z["logit_probabilities"], probs[z["logit_token_ids"]], 1e-5)
    # Direct effects respect causality: nothing flows to an earlier position or from a layer to itself or below.
    pos = np.concatenate([feats[:, 1], np.tile(np.arange(n), L), np.arange(n), np.full(n_logit, n - 1)])
    layer = np.concatenate([feats[:, 0], np.repeat(np.arange(L), n), np.full(n, -1), np.full(n_logit, L)])
    tgt, src = np.nonzero(A)
    assert (pos[src] <= pos[tgt]).all() and (layer[src] < layer[tgt]).all()
    assert not A[:, -n_logit:].any() and not A[n_feat + L * n: N - n_logit].any()  # logits send, tokens receive
    assert not A[:, [n_feat + li * n for li in range(L)]].any()  # error vectors at position 0 are zeroed
    # Pruning: tokens and logits always kept; kept edges are real edges between kept nodes.
    keep, edges = z["node_mask"], z["edge_mask"]
    assert keep[-(n + n_logit):].all() and 0 < keep[:n_feat].sum() < n_feat
    assert not (edges & (A == 0)).any()
    assert not edges[~keep].any() and not edges[:, ~keep].any()
