"""Feature interventions (`--intervene L1F5=0 / *8 / =+5 / =mean` with `--dict`): each equals a hand-written
TransformerLens hook on a bridge running in the dictionary's own space (tiny GPT-2 and tiny Llama, float32), during
`--generate` too (the KV cache changes nothing); the CLI, `hexray.record(dict=...)` and `hexray info` agree; specs a
dictionary cannot serve are one line.

The reference reads the feature with the dictionary's own numpy ``encode`` at its input hook and adds
(a' − a) · W_dec[f] at its output hook. For a dictionary trained on an unprocessed model (SAELens's default
``center_writing_weights=False``, circuit-tracer's ``fold_ln=False``) that bridge is a fresh *unprocessed* one, so
the recorder's live conversion of spaces (the means compatibility mode removed, the norm's weight and bias) is
checked against the model itself, not against the same formula; for a centred dictionary it is the recording
bridge. Logits are compared within 1e-5 of their scale (two differently processed float32 models differ by
rounding only).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import hexray
from hexray.cli.main import main
from hexray_core.dataset.record_features import feature_dictionaries
from hexray_core.errors import HexRayError
from hexray_core.replay.dictionary import load_dictionary
from trace_format import TraceReader

PROMPT = "The quick brown fox jumps over"
D = 64


def _rand(*shape, scale=0.3, seed=[100]):  # noqa: B006 (a counter shared across calls)
    seed[0] += 1
    return (np.random.default_rng(seed[0]).standard_normal(shape) * scale).astype(np.float32)


def _saelens(path, hook, *, arch="standard", center=False, fold=True, n=48, extra=None):
    """A SAELens folder (cfg.json + sae_weights.safetensors) with random weights of the tiny models' shapes."""
    os.makedirs(path, exist_ok=True)
    w = {"W_enc": _rand(D, n), "W_dec": _rand(n, D), "b_enc": _rand(n, scale=0.1), "b_dec": _rand(D)}
    if "jumprelu" in arch:
        w["threshold"] = np.full(n, 0.05, np.float32)
    save_file(w, os.path.join(path, "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D, "d_sae": n, "d_out": D, "dtype": "float32",
           "apply_b_dec_to_input": "transcoder" not in arch, "normalize_activations": "none",
           "metadata": {"hook_name": hook, "hook_name_out": hook.replace("ln2.hook_normalized", "hook_mlp_out"),
                        "model_from_pretrained_kwargs": {"center_writing_weights": center, "fold_ln": fold}},
           **(extra or {})}
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


def _circuit_tracer(path):
    """A circuit-tracer transcoder set reading mlp.hook_in of an unprocessed model (the norm's weight and bias)."""
    os.makedirs(path, exist_ok=True)
    for i in range(2):
        save_file({"W_enc": _rand(40, D), "W_dec": _rand(40, D), "b_enc": _rand(40, scale=0.1), "b_dec": _rand(D),
                   "activation_function.threshold": np.full(40, 0.02, np.float32)},
                  os.path.join(path, f"layer_{i}.safetensors"))
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                        "feature_output_hook": "hook_mlp_out",
                        "transcoders": ["layer_0.safetensors", "layer_1.safetensors"]}, f)
    return str(path)


@pytest.fixture(scope="module")
def dicts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fdicts")
    return {
        "resid_pre": _saelens(root / "rp", "blocks.1.hook_resid_pre"),
        "resid_post": _saelens(root / "rq", "blocks.0.hook_resid_post", arch="jumprelu"),
        "centred": _saelens(root / "c", "blocks.1.hook_resid_pre", center=True),
        "attn_out": _saelens(root / "ao", "blocks.1.hook_attn_out", arch="topk", extra={"k": 6}),
        "transcoder": _saelens(root / "tc", "blocks.0.ln2.hook_normalized", arch="skip_transcoder"),
        "circuit_tracer": _circuit_tracer(root / "ct"),
    }


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tiny, tiny_tokenizer):
    """(the recorder, an unprocessed bridge of the same weights)."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    rec = request.getfixturevalue(f"tiny_{request.param}_recorder")
    build = tiny.build_tiny_gpt2 if request.param == "gpt2" else tiny.build_tiny_llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = TransformerBridge.boot_transformers("raw", hf_model=build(tiny_tokenizer).eval(),
                                                  tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
    return request.param, rec, raw


def _feature_hooks(d, f, new, positions=None, n_prompt=None):
    """Hand-written: read feature f with the dictionary's numpy encode at its input hook, add (a' − a)·W_dec[f] at
    its output hook. ``new(a, a_prompt)`` gives a'."""
    import torch

    seen = {}

    def read(x, hook):
        a = d.encode(x[0].detach().float().flatten(1).numpy())[:, f]  # hook_z: the heads concatenated
        seen["a"] = torch.from_numpy(a)
        if n_prompt is not None and x.shape[1] >= n_prompt:
            seen.setdefault("prompt", seen["a"][:n_prompt].clone())

    def write(x, hook):
        a = seen["a"]
        change = new(a, seen.get("prompt")) - a
        if positions is not None:
            keep = torch.zeros_like(change)
            idx = [p for p in positions if p < len(change)]
            keep[idx] = change[idx]
            change = keep
        return x + (change[:, None] * torch.from_numpy(d.W_dec[f])).reshape(x.shape).to(x.dtype)

    return [(d.hook_in, read), (d.hook_out, write)]


def _logits_of(path):
    with TraceReader(path) as r:
        return r.read("hexray.topk_logits"), r.read("hexray.logsumexp"), r.runs[0]["tokens"]


def _assert_equal(path, ref, ids, what):
    import torch

    top, lse, _ = _logits_of(path)
    with torch.no_grad():
        logits = ref.run_with_hooks(torch.tensor([ids]), fwd_hooks=what[1])[0].float()
        plain = ref(torch.tensor([ids]))[0].float()
    scale = max(1.0, float(logits.abs().max()))
    np.testing.assert_allclose(top, logits.topk(top.shape[1], -1).values.numpy(), atol=1e-5 * scale, rtol=0,
                               err_msg=what[0])
    np.testing.assert_allclose(lse, torch.logsumexp(logits, -1).numpy(), atol=1e-5 * scale, rtol=0, err_msg=what[0])
    assert float((logits - plain).abs().max()) > 1e-2, what[0]  # the intervention changed something


CASES = [  # (dictionary, spec with {l} the layer and {f} the feature, a' from (a, a over the prompt), positions)
    ("resid_pre", "L{l}F{f}=0", lambda a, p: a * 0, None),
    ("resid_pre", "L{l}F{f}*8", lambda a, p: a * 8, None),
    ("resid_pre", "L{l}F{f}@2,4=+5", lambda a, p: a + 5, (2, 4)),
    ("resid_post", "L{l}F{f}=mean", lambda a, p: p.mean().expand_as(a), None),
    ("centred", "L{l}F{f}=-3", lambda a, p: a - 3, None),
    ("attn_out", "L{l}F{f}*4", lambda a, p: a * 4, None),
    ("transcoder", "L{l}F{f}=0", lambda a, p: a * 0, None),
    ("transcoder", "L{l}F{f}@1:4=2.5", lambda a, p: torch_full(a, 2.5), (1, 2, 3)),
    ("circuit_tracer", "L1F{f}*-2", lambda a, p: a * -2, None),
]


def torch_full(a, v):
    import torch

    return torch.full_like(a, v)


def _active_feature(d, ref, ids):
    """A feature that fires on this prompt (so =0 and *8 change something)."""
    import torch

    got = {}
    with torch.no_grad():
        ref.run_with_hooks(torch.tensor([ids]),
                           fwd_hooks=[(d.hook_in, lambda x, hook: got.update(x=x[0].float().flatten(1)))])
    acts = d.encode(got["x"].numpy())
    return int(np.argmax((acts > 0).sum(0) * 1000 + acts.sum(0)))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] + ":" + c[1] for c in CASES])
def test_feature_interventions_equal_hand_written_hooks(models, dicts, tmp_path, case):
    arch, rec, raw = models
    name, spec, new, positions = CASES[case]
    dset = load_dictionary(dicts[name])
    layer = sorted(dset.layers)[-1] if name == "circuit_tracer" else sorted(dset.layers)[0]
    d = dset[layer]
    centred_dict = dset.space.center_writing_weights
    ref = rec.bridge if centred_dict else raw  # the bridge whose activations are in the dictionary's space
    ids = rec.tokenize(PROMPT)
    f = _active_feature(d, ref, ids)
    spec = spec.format(l=layer, f=f)
    path = str(tmp_path / "t.hxr")
    rec.record(PROMPT, path, act_dtype="float32", interventions=[spec], top_k=8, lens=False,
               features=feature_dictionaries([dset]))
    hooks = _feature_hooks(d, f, new, positions, n_prompt=len(ids))
    _assert_equal(path, ref, ids, (f"{arch} {name} {spec}", hooks))
    with TraceReader(path) as r:
        iv = r.meta["interventions"][0]
    assert iv["kind"] == "feature" and iv["index"] == f and iv["dict"]["fingerprint"] == dset.fingerprint
    assert iv["hook_in"] == d.hook_in


def test_two_features_raw_space_after_a_centred_write(models, dicts, tmp_path):
    """A raw-space read after an earlier feature write: the tracker counts the mean the centred write removed."""
    arch, rec, raw = models
    d0, d1 = load_dictionary(dicts["resid_post"]), load_dictionary(dicts["resid_pre"])
    ids = rec.tokenize(PROMPT)
    f0, f1 = _active_feature(d0[0], raw, ids), _active_feature(d1[1], raw, ids)
    path = str(tmp_path / "two.hxr")
    rec.record(PROMPT, path, act_dtype="float32", interventions=[f"L0F{f0}=+4", f"L1F{f1}*3"], top_k=8,
               lens=False, features=feature_dictionaries([d0, d1]))
    hooks = _feature_hooks(d0[0], f0, lambda a, p: a + 4) + _feature_hooks(d1[1], f1, lambda a, p: a * 3)
    _assert_equal(path, raw, ids, (f"{arch} two features", hooks))


@pytest.mark.parametrize("which", ["resid_pre", "z_raw"])
def test_steered_generation_with_the_cache_equals_without(models, request, tmp_path, which):
    """Greedy `--generate` with the KV cache under feature steering = one full steered forward per token (a
    residual SAE, and an attention-output SAE steering hook_z)."""
    import torch

    arch, rec, raw = models
    folders = request.getfixturevalue("zdicts" if which.startswith("z_") else "dicts")
    dset = load_dictionary(folders[which])
    d = dset[1]
    ids = rec.tokenize(PROMPT)
    n = len(ids)
    f = _active_feature(d, raw, ids)
    g = (f + 1) % d.d_sae
    specs = [f"L1F{f}*6", f"L1F{g}@{n + 1}=+7"]
    path = str(tmp_path / "g.hxr")
    rec.record(PROMPT, path, act_dtype="float32", interventions=specs, top_k=8, lens=False, generate=6,
               features=feature_dictionaries([dset]))
    _, _, got = _logits_of(path)
    hooks = _feature_hooks(d, f, lambda a, p: a * 6) + _feature_hooks(d, g, lambda a, p: a + 7, positions=(n + 1,))
    seq, plain = list(ids), list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(raw.run_with_hooks(torch.tensor([seq]), fwd_hooks=hooks)[0, -1].argmax()))
            plain.append(int(raw(torch.tensor([plain]))[0, -1].argmax()))
    assert got == seq
    assert seq != plain  # the steering changed the continuation
    _assert_equal(path, raw, seq, (f"{arch} {which} steered generation", hooks))


def test_refusals_are_one_line(tiny_gpt2_recorder, tiny_gpt2_dir, dicts, tmp_path, capsys):
    rec = tiny_gpt2_recorder
    fd = feature_dictionaries([load_dictionary(dicts["resid_pre"])])
    out = str(tmp_path / "bad.hxr")
    for specs, features, part in [
        (["L1F48=0"], fd, "feature 48 does not exist (rp layer 1 has features 0-47)"),
        (["L0F3=0"], fd, "no --dict has a dictionary for layer 0 (rp: layers [1])"),
        (["L1F3=0"], None, "a feature intervention needs a dictionary: add --dict DIR"),
        (["L1F3~x.npy=0"], fd, "a feature is one number"),
        # a raw-space read after an edit of a layer's whole write: its uncentred residual is not defined
        (["L0.mlp=0", "L1F3=0"], fd, "it edits blocks.0.hook_mlp_out, before 'L1F3=0' reads blocks.1.hook_resid_pre "
                                     "in the uncentred space"),
        (["blocks.0.hook_resid_post*2", "L1F3=0"], fd, "their raw-space residual is not defined"),
    ]:
        with pytest.raises(HexRayError) as e:
            rec.record(PROMPT, out, interventions=specs, features=features)
        assert part in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not os.path.exists(out)
    # an edit after the feature's read (layer 1's MLP writes after blocks.1.hook_resid_pre) leaves it defined
    rec.record(PROMPT, str(tmp_path / "after.hxr"), interventions=["L1.mlp=0", "L1F3=0"], features=fd)
    # the command line: refused before the model loads, one line, exit 1
    for argv, part in [
        (["--intervene", "L1F3=0"], "a feature intervention needs a dictionary: add --dict DIR"),
        (["--dict", dicts["resid_pre"], "--intervene", "L1F480*8"], "feature 480 does not exist"),
        (["--dict", dicts["resid_pre"], "--intervene", "L0F3*8"], "no --dict has a dictionary for layer 0"),
        (["--dict", dicts["resid_pre"], "--dict", dicts["centred"], "--intervene", "L1F3*8"],
         "2 --dict dictionaries have layer 1"),
    ]:
        rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "-q", "-o", out, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and part in err[0], err
        assert not os.path.exists(out)


def test_cli_api_and_info_agree(tiny, tiny_tokenizer, tiny_gpt2_dir, dicts, tmp_path, capsys):
    """`hexray record --dict D --intervene L1F3*8` = `hexray.record(..., dict=D, interventions=[...])`; `hexray
    info` names the dictionary (whose layer-1 features are not stored: an uncentred-space SAE steered at its own hook
    has no defined input there, see test_an_edit_of_a_whole_write_leaves_no_uncentred_residual)."""
    out = str(tmp_path / "cli.hxr")
    spec = "L1F3*8"
    rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "-q", "--act-dtype", "float32",
               "--top-k", "8", "--dict", dicts["resid_pre"], "--intervene", spec, "-o", out])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    tr = hexray.record(PROMPT, tiny.build_tiny_gpt2(tiny_tokenizer), str(tmp_path / "api.hxr"),
                       tokenizer=tiny_tokenizer, act_dtype="float32", top_k=8, dict=dicts["resid_pre"],
                       interventions=[spec])
    a, b = _logits_of(out), _logits_of(tr.path)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=0)
    plain = hexray.record(PROMPT, tiny.build_tiny_gpt2(tiny_tokenizer), str(tmp_path / "plain.hxr"),
                          tokenizer=tiny_tokenizer, act_dtype="float32", top_k=8)
    assert np.abs(_logits_of(plain.path)[0] - a[0]).max() > 1e-3
    fp = load_dictionary(dicts["resid_pre"]).fingerprint
    assert tr.meta["features"][0]["fingerprint"] == fp
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert f"intervene {spec}  (dictionary rp, sae, fingerprint {fp})" in text, text
    assert main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["interventions"] == [spec] and info["intervention_dicts"][spec]["fingerprint"] == fp


def _clt(path):
    """A circuit-tracer cross-layer transcoder on hook_resid_mid of an unprocessed model: layer 0's features write
    into layers 0 and 1."""
    os.makedirs(path, exist_ok=True)
    for i in range(2):
        save_file({f"W_enc_{i}": _rand(30, D), f"b_enc_{i}": _rand(30, scale=0.1), f"b_dec_{i}": _rand(D),
                   f"threshold_{i}": np.full(30, 0.02, np.float32)}, os.path.join(path, f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": _rand(30, 2 - i, D)}, os.path.join(path, f"W_dec_{i}.safetensors"))
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump({"model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
                        "feature_output_hook": "hook_mlp_out"}, f)
    return str(path)


def test_cross_layer_transcoder_feature_writes_every_later_layer(models, tmp_path):
    import torch

    arch, rec, raw = models
    dset = load_dictionary(_clt(tmp_path / "clt"))
    d = dset[0]
    ids = rec.tokenize(PROMPT)
    f = _active_feature(d, raw, ids)
    path = str(tmp_path / "clt.hxr")
    rec.record(PROMPT, path, act_dtype="float32", interventions=[f"L0F{f}*5"], top_k=8, lens=False,
               features=feature_dictionaries([dset]))
    seen = {}

    def read(x, hook):
        seen["a"] = torch.from_numpy(d.encode(x[0].detach().float().numpy())[:, f])

    def write(j):
        return lambda x, hook: x + (4 * seen["a"][:, None] * torch.tensor(d.W_dec[f, j]))[None]

    hooks = [("blocks.0.hook_resid_mid", read), ("blocks.0.hook_mlp_out", write(0)),
             ("blocks.1.hook_mlp_out", write(1))]
    _assert_equal(path, raw, ids, (f"{arch} clt", hooks))
    with TraceReader(path) as r:
        assert r.meta["interventions"][0]["hooks_out"] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


# -- attention-output (hook_z) dictionaries ------------------------------------------------------------------------

def _saelens_z(path, layer, kwargs, *, arch="standard", extra=None):
    """A SAELens hook_z SAE (``reshape_activations: hook_z``): reads blocks.L.attn.hook_z with the heads concatenated
    (4 heads x 16 = 64 wide on the tiny models), trained on a model from_pretrained with ``kwargs``."""
    hook = f"blocks.{layer}.attn.hook_z"
    return _saelens(path, hook, arch=arch, extra={
        "reshape_activations": "hook_z", **(extra or {}),
        "metadata": {"hook_name": hook, "model_from_pretrained_kwargs": kwargs}})


def z_dictionaries(root):
    return {  # SAELens's default space is unprocessed: value biases stay in hook_z
        "z_raw": _saelens_z(root / "zr", 1, {"fold_value_biases": False}),
        "z_raw0": _saelens_z(root / "zr0", 0, {"fold_value_biases": False}),
        "z_vb": _saelens_z(root / "zv", 1, {"fold_value_biases": True}, arch="topk", extra={"k": 6}),  # b_V only
        "z_folded": _saelens_z(root / "zf", 0, {"fold_ln": True, "fold_value_biases": True}),
    }


@pytest.fixture(scope="module")
def zdicts(tmp_path_factory):
    return z_dictionaries(tmp_path_factory.mktemp("zdicts"))


_NATIVE: dict = {}


def _native_bridge(tiny, tok, arch, space):
    """A bridge of the same weights processed as the dictionary's model was (its native hook_z): unprocessed, or
    TransformerLens's own fold_ln / fold_value_biases (no centring: it moves no hook_z). TransformerLens 4.3 cannot
    fold a GQA model's value biases without fold_ln; an RMSNorm's fold moves nothing in hook_z, so Llama folds it."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    fold_ln = bool(space.fold_ln or (arch == "llama" and space.fold_value_biases))
    key = (arch, fold_ln, bool(space.fold_value_biases))
    if key not in _NATIVE:
        build = tiny.build_tiny_gpt2 if arch == "gpt2" else tiny.build_tiny_llama
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = TransformerBridge.boot_transformers("native", hf_model=build(tok).eval(), tokenizer=tok, device="cpu",
                                                    dtype=torch.float32)
            if key[1] or key[2]:
                b.enable_compatibility_mode(disable_warnings=True, fold_ln=key[1], center_writing_weights=False,
                                            center_unembed=False, fold_value_biases=key[2])
        _NATIVE[key] = b
    return _NATIVE[key]


Z_CASES = [
    ("z_raw", "L1F{f}*8", lambda a, p: a * 8, None),
    ("z_raw", "L1F{f}@2,4=+5", lambda a, p: a + 5, (2, 4)),
    ("z_vb", "L1F{f}=0", lambda a, p: a * 0, None),
    ("z_vb", "L1F{f}*-3", lambda a, p: a * -3, None),
    ("z_folded", "L0F{f}=mean", lambda a, p: p.mean().expand_as(a), None),
    ("z_folded", "L0F{f}@1:4=2.5", lambda a, p: torch_full(a, 2.5), (1, 2, 3)),
]


@pytest.mark.parametrize("case", range(len(Z_CASES)), ids=[c[0] + ":" + c[1] for c in Z_CASES])
def test_hook_z_feature_interventions_equal_hand_written_hooks(models, zdicts, tiny, tiny_tokenizer, tmp_path, case):
    """The live (value-bias folded) hook_z, moved into the dictionary's space, encoded, and the change written back
    through the decoder row reshaped to [n_heads, d_head] = the same edit on a bridge processed as the dictionary's
    model was."""
    arch, rec, _ = models
    name, spec, new, positions = Z_CASES[case]
    dset = load_dictionary(zdicts[name])
    layer = sorted(dset.layers)[0]
    d = dset[layer]
    assert dset.space.fold_value_biases == (name != "z_raw")
    ref = _native_bridge(tiny, tiny_tokenizer, arch, dset.space)
    ids = rec.tokenize(PROMPT)
    f = _active_feature(d, ref, ids)
    spec = spec.format(f=f)
    path = str(tmp_path / "z.hxr")
    fds = feature_dictionaries([dset])
    assert fds[0].fold_value_biases == dset.space.fold_value_biases
    rec.record(PROMPT, path, act_dtype="float32", interventions=[spec], top_k=8, lens=False, features=fds)
    hooks = _feature_hooks(d, f, new, positions, n_prompt=len(ids))
    _assert_equal(path, ref, ids, (f"{arch} {name} {spec}", hooks))
    with TraceReader(path) as r:
        iv = r.meta["interventions"][0]
    assert iv["hook"] == iv["hook_in"] == f"blocks.{layer}.attn.hook_z"
    assert iv["dict"]["space"]["fold_value_biases"] == dset.space.fold_value_biases


def test_hook_z_spaces_differ(models, zdicts, tiny, tiny_tokenizer):
    """The spaces really differ on these models (value biases on, and ln1's bias through W_V on GPT-2), so the tests
    above exercise the conversion: the recording bridge's hook_z is off the unprocessed one's."""
    import torch

    arch, rec, _ = models
    d = load_dictionary(zdicts["z_raw"])
    ref = _native_bridge(tiny, tiny_tokenizer, arch, d.space)
    ids = torch.tensor([rec.tokenize(PROMPT)])
    got = {}
    with torch.no_grad():
        for k, b in (("live", rec.bridge), ("raw", ref)):
            b.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", lambda x, hook, k=k: got.update({k: x}))])
    assert float((got["live"] - got["raw"]).abs().max()) > 1e-2


def test_hook_z_write_then_raw_space_read(models, dicts, zdicts, tmp_path):
    """A hook_z feature write at layer 0, then a raw-space residual read at layer 1 (GPT-2: the read adds back the
    means compatibility mode removed, and the hook_z write moved layer 0's attention mean through W_O)."""
    arch, rec, raw = models
    dz, dr = load_dictionary(zdicts["z_raw0"]), load_dictionary(dicts["resid_pre"])
    ids = rec.tokenize(PROMPT)
    f0, f1 = _active_feature(dz[0], raw, ids), _active_feature(dr[1], raw, ids)
    path = str(tmp_path / "zr.hxr")
    rec.record(PROMPT, path, act_dtype="float32", interventions=[f"L0F{f0}*6", f"L1F{f1}*3"], top_k=8,
               lens=False, features=feature_dictionaries([dz, dr]))
    hooks = _feature_hooks(dz[0], f0, lambda a, p: a * 6) + _feature_hooks(dr[1], f1, lambda a, p: a * 3)
    _assert_equal(path, raw, ids, (f"{arch} hook_z then resid_pre", hooks))


@pytest.mark.parametrize("which", ["centred", "z_folded"])
def test_grad_sees_the_feature_intervention(models, request, tmp_path, which):
    """`--grad` with a feature intervention: the stored gradient is that of the intervened model (the feature's
    activation is differentiated through), equal to a TransformerLens backward hook with a hand-written one on the
    recording bridge, whose space both dictionaries read: a centred residual SAE at layer 1, and an
    attention-output SAE at layer 0 (its hook_z folded as the bridge's: fold_ln and fold_value_biases, centring
    moves nothing there)."""
    import torch

    arch, rec, _ = models
    folders = request.getfixturevalue("zdicts" if which.startswith("z_") else "dicts")
    dset = load_dictionary(folders[which])
    layer = min(dset.layers)
    d = dset[layer]
    bridge = rec.bridge
    ids = rec.tokenize(PROMPT)
    f = _active_feature(d, bridge, ids)
    path = str(tmp_path / "g.hxr")
    rec.record(PROMPT, path, act_dtype="float32", interventions=[f"L{layer}F{f}*8"], lens=False,
               grad="logit-diff:#5,#7", features=feature_dictionaries([dset]))
    w, b, bd, wd = (torch.tensor(a) for a in (d.W_enc[:, f], d.b_enc[f:f + 1], d.b_dec, d.W_dec[f]))

    def steer(x, hook):  # hook_z [b, n, heads, d_head] is read with its heads concatenated
        flat = x.flatten(-2) if d.hook_in.endswith("hook_z") else x
        a = torch.relu((flat - bd) @ w + b)
        return x + (7 * a[..., None] * wd).reshape(x.shape)

    def grad(fwd):
        grads = {}
        with torch.enable_grad(), bridge.hooks(fwd_hooks=fwd, bwd_hooks=[
                ("blocks.0.hook_resid_pre", lambda g, hook: grads.update(g=g[0].detach()))]):
            logits = bridge(torch.tensor([ids]))
            (logits[0, -1, 5] - logits[0, -1, 7]).backward()
        return grads["g"].numpy()

    want, plain = grad([(d.hook_in, steer)]), grad([])
    with TraceReader(path) as r:
        got = r.read("grad.blocks.0.hook_resid_pre")
    # float32 backward through every layer: the two graphs sum in different orders (and thread splits), ~1e-5 relative
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=3e-5 if which == "centred" else 0)
    assert np.abs(want - plain).max() > 1e-2 * np.abs(want).max()  # the intervention changed the gradient


def test_hook_z_refusals(tiny, tiny_tokenizer, zdicts, tmp_path):
    """A bridge handed over already processed has no raw/b_V: a dictionary in another value-bias space is refused
    in one line; one in the bridge's own space still works."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from hexray_core.record import Recorder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = TransformerBridge.boot_transformers("done", hf_model=tiny.build_tiny_gpt2(tiny_tokenizer).eval(),
                                                tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
        b.enable_compatibility_mode(disable_warnings=True, center_unembed=False)
    rec = Recorder(b, tokenizer=tiny_tokenizer)
    out = str(tmp_path / "bad.hxr")
    with pytest.raises(HexRayError) as e:
        rec.record(PROMPT, out, interventions=["L1F3*8"],
                   features=feature_dictionaries([load_dictionary(zdicts["z_raw"])]))
    msg = str(e.value)
    assert "lacks raw/b_V, raw/ln1.b.W_V" in msg and "\n" not in msg, msg
    assert not os.path.exists(out)
    rec.record(PROMPT, out, interventions=["L0F3*8"], features=feature_dictionaries([load_dictionary(
        zdicts["z_folded"])]))


def test_neuron_edit_then_raw_space_read(models, dicts, tmp_path):
    """The raw-space tracker sees the edited hook_post (its hooks run after every edit of the same hook point): a
    neuron scaled at layer 0, then a raw-space residual read at layer 1, equals the same on the unprocessed bridge."""
    arch, rec, raw = models
    dr = load_dictionary(dicts["resid_pre"])
    ids = rec.tokenize(PROMPT)
    f1 = _active_feature(dr[1], raw, ids)
    path = str(tmp_path / "nr.hxr")
    rec.record(PROMPT, path, act_dtype="float32", interventions=["L0N5*40", f"L1F{f1}*3"], top_k=8, lens=False,
               features=feature_dictionaries([dr]))

    def neuron(x, hook):
        x = x.clone()
        x[..., 5] *= 40
        return x

    hooks = [("blocks.0.mlp.hook_post", neuron)] + _feature_hooks(dr[1], f1, lambda a, p: a * 3)
    _assert_equal(path, raw, ids, (f"{arch} neuron then resid_pre", hooks))


def test_an_edit_of_a_whole_write_leaves_no_uncentred_residual(tiny_gpt2_dir, dicts, tmp_path, capsys):
    """`--intervene L0.mlp=0` zeroes the centred MLP output: what the uncentred (raw) model's residual would be is
    not defined, so a raw-space dictionary's features are left out at record time with `--dict` (one warning line)
    and refused in one line at replay on such a trace; a centred-space dictionary, or an edit after the
    dictionary's layer, is fine."""
    out = tmp_path / "t.hxr"
    base = ["record", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "-q", "-o", str(out)]
    rc = main([*base, "--dict", dicts["resid_pre"], "--intervene", "L0.mlp=0"])  # stored features: left out, said
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and len(err) == 1 and "rp layer 1: features not stored" in err[0], err
    assert "the uncentred residual this dictionary reads is not defined" in err[0]
    with TraceReader(str(out)) as r:
        assert not [n for n in r.names(0) if n.startswith("hexray.features.")]
    assert main([*base, "--dict", dicts["centred"], "--intervene", "L0.mlp=0"]) == 0  # the trace's own space
    assert main([*base, "--dict", dicts["resid_pre"], "--intervene", "L1.mlp=0"]) == 0  # after layer 1's input
    capsys.readouterr()
    assert main([*base, "--intervene", "L0.mlp=0"]) == 0
    capsys.readouterr()
    rc = main(["features", str(out), "--dict", dicts["resid_pre"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "recorded with --intervene 'L0.mlp=0'" in err[0], err
    assert main(["features", str(out), "--dict", dicts["centred"]]) == 0
