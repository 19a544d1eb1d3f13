"""`hexray patch --estimate clean.hxr corrupt.hxr --sweep features --dict D`: feature-level attribution patching from
two traces equals the same estimate computed directly in torch on an unprocessed bridge (the dictionaries' own
space): feature activations from the dictionary's encode at its input hook in both runs, the gradient of the metric
at its output hook in the corrupt run from a TransformerLens backward hook, (f_clean − f_corrupt) · W_dec[f] · g."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from test_feature_interventions import _native_bridge, _saelens, z_dictionaries

from hexray.cli.main import main
from hexray_core.replay.dictionary import load_dictionary

CLEAN, CORRUPT = "The quick brown fox jumps", "The slow green cat jumps"
METRIC = "logit-diff:#5,#7"


def _reference(raw, d, ids_clean, ids_corrupt):
    """[n, d_sae] AtP estimate computed on the bridge itself (a hook_z dictionary: the heads concatenated)."""
    import torch

    def feats(ids):
        got = {}
        with torch.no_grad():
            raw.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(d.hook_in, lambda x, hook: got.update(x=x[0]))])
        return d.encode(got["x"].float().flatten(1).numpy()).astype(np.float64)

    grads = {}

    def keep(g, hook):
        grads["g"] = g[0].detach().double().flatten(1).numpy()

    with torch.enable_grad(), raw.hooks(bwd_hooks=[(d.hook_out, keep)]):
        logits = raw(torch.tensor([ids_corrupt]))
        (logits[0, -1, 5] - logits[0, -1, 7]).backward()
    return (feats(ids_clean) - feats(ids_corrupt)) * (grads["g"] @ d.W_dec.astype(np.float64).T)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_feature_atp_equals_torch_on_the_bridge(arch, tiny, tiny_tokenizer, tmp_path, capsys):
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from hexray_core.record import Recorder
    from hexray_core.replay.atp_features import feature_estimates

    build = tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama
    rec = Recorder(build(tiny_tokenizer), tokenizer=tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = TransformerBridge.boot_transformers("raw", hf_model=build(tiny_tokenizer).eval(),
                                                  tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
    c, x = str(tmp_path / "clean.hxr"), str(tmp_path / "corrupt.hxr")
    ids_c, ids_x = rec.tokenize(CLEAN), rec.tokenize(CORRUPT)
    assert len(ids_c) == len(ids_x)
    rec.record(CLEAN, c, act_dtype="float32", grad=METRIC, lens=False)
    rec.record(CORRUPT, x, act_dtype="float32", grad=METRIC, lens=False)
    import hexray

    clean, corrupt = hexray.open(c), hexray.open(x)
    for name, hook, kind in [("sae", "blocks.1.hook_resid_pre", "standard"),
                             ("post", "blocks.0.hook_resid_post", "standard"),
                             ("tc", "blocks.1.ln2.hook_normalized", "transcoder"),
                             ("z", "blocks.1.attn.hook_z", "standard")]:
        path = _saelens(tmp_path / name, hook, arch=kind,
                        extra={"reshape_activations": "hook_z"} if "hook_z" in hook else None)
        dset = load_dictionary(path)
        layer = sorted(dset.layers)[0]
        got = feature_estimates(clean, corrupt, dset)[layer]
        want = _reference(raw, dset[layer], ids_c, ids_x)
        assert np.abs(want).max() > 1e-3, name
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4, err_msg=f"{arch} {name}")
    # the command line: the largest estimates, the same numbers
    rc = main(["patch", "--estimate", c, x, "--sweep", "features", "--dict", path, "--top", "5", "--json"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(capsys.readouterr().out)["patch"]["features"]
    flat = np.abs(want).reshape(-1)
    assert len(rows) == 5 and [abs(r["estimate"]) for r in rows] == pytest.approx(np.sort(flat)[::-1][:5], rel=1e-4)
    r0 = rows[0]
    assert r0["estimate"] == pytest.approx(want[r0["position"], r0["feature"]], rel=1e-4)
    assert main(["patch", "--estimate", c, x, "--sweep", "features", "--dict", path, "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert f"L{layer}F{r0['feature']}" in text and "the 3 largest" in text


def test_feature_atp_refusals(tiny_gpt2_recorder, tmp_path, capsys):
    rec = tiny_gpt2_recorder
    c, x = str(tmp_path / "c.hxr"), str(tmp_path / "x.hxr")
    rec.record(CLEAN, c, act_dtype="float32", lens=False)
    rec.record(CORRUPT, x, act_dtype="float32", lens=False, grad=METRIC, hooks="blocks.0.hook_resid_pre")
    sae = _saelens(tmp_path / "sae", "blocks.1.hook_resid_pre")
    for argv, part in [
        (["--estimate", c, x, "--sweep", "features"], "--sweep features needs --dict DIR"),
        (["--estimate", c, c, "--sweep", "features", "--dict", sae], "holds no gradients"),
        (["--estimate", c, x, "--sweep", "features", "--dict", sae], "holds no gradient at blocks.1.hook_resid_pre"),
        (["--clean", "a", "--corrupt", "b", "--sweep", "features"], "an estimate from two traces"),
        (["--estimate", c, x, "--sweep", "features", "--dict", str(tmp_path / "nothing")], "--dict"),
    ]:
        rc = main(["patch", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and part in err[0], err


@pytest.fixture(scope="module")
def zdicts(tmp_path_factory):
    return z_dictionaries(tmp_path_factory.mktemp("zdicts"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_feature_atp_for_hook_z_dictionaries(arch, tiny, tiny_tokenizer, zdicts, tmp_path):
    """An attention-output (hook_z) dictionary: features in its own value-bias space, the gradient recorded at
    attn.hook_z (in the default hooks), heads concatenated; equal to torch on a bridge processed as the
    dictionary's model was."""
    import hexray
    from hexray_core.record import Recorder
    from hexray_core.replay.atp_features import feature_estimates

    build = tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama
    rec = Recorder(build(tiny_tokenizer), tokenizer=tiny_tokenizer)
    c, x = str(tmp_path / "clean.hxr"), str(tmp_path / "corrupt.hxr")
    ids_c, ids_x = rec.tokenize(CLEAN), rec.tokenize(CORRUPT)
    rec.record(CLEAN, c, act_dtype="float32", grad=METRIC, lens=False)
    rec.record(CORRUPT, x, act_dtype="float32", grad=METRIC, lens=False)
    clean, corrupt = hexray.open(c), hexray.open(x)
    assert corrupt[0]["grad.blocks.1.attn.hook_z"].shape[1:] == (4, 16)
    for name in ("z_raw", "z_vb", "z_folded"):
        dset = load_dictionary(zdicts[name])
        layer = sorted(dset.layers)[0]
        got = feature_estimates(clean, corrupt, dset)[layer]
        want = _reference(_native_bridge(tiny, tiny_tokenizer, arch, dset.space), dset[layer], ids_c, ids_x)
        assert np.abs(want).max() > 1e-3, name
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4, err_msg=f"{arch} {name}")


def test_feature_atp_hook_z_without_its_gradient_is_one_line(tiny_gpt2_recorder, zdicts, tmp_path, capsys):
    rec = tiny_gpt2_recorder
    c, x = str(tmp_path / "c.hxr"), str(tmp_path / "x.hxr")
    rec.record(CLEAN, c, act_dtype="float32", lens=False)
    rec.record(CORRUPT, x, act_dtype="float32", lens=False, grad=METRIC, hooks="blocks.0.hook_resid_pre")
    rc = main(["patch", "--estimate", c, x, "--sweep", "features", "--dict", zdicts["z_raw"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "holds no gradient at blocks.1.attn.hook_z" in err[0], err
    assert "--hooks default,blocks.1.attn.hook_z" in err[0], err
