"""`--intervene`: every form equals a hand-written TransformerLens hook on the bridge (tiny GPT-2 and tiny
Llama with GQA, float32 logits within 1e-5), steered generation with the KV cache equals it without, a
patch from a trace equals a patch from a live cache, bad specs are one line naming the wrong part."""

from __future__ import annotations

import numpy as np
import pytest

from hexray.cli.main import main
from hexray_core.errors import HexRayError
from hexray_core.record.intervene_spec import parse_intervention
from trace_format import TraceReader

PROMPT = "The quick brown fox jumps over"
CORRUPT = "The slow green cat jumps over"


# -- the grammar (no torch) -------------------------------------------------------------------------

def test_grammar_forms():
    iv = parse_intervention("L1H2=0")
    assert (iv.kind, iv.hook, iv.index, iv.op, iv.value, iv.positions) == ("head", "blocks.1.attn.hook_z", 2, "set",
                                                                           0.0, None)
    assert parse_intervention("L1H2@3=0").positions == (3,)
    iv = parse_intervention("L2N17=mean")
    assert (iv.kind, iv.hook, iv.index, iv.op) == ("neuron", "blocks.2.mlp.hook_post", 17, "mean")
    iv = parse_intervention("blocks.2.hook_resid_pre@5<-clean.hxr")
    assert (iv.hook, iv.positions, iv.op, iv.file, iv.run) == ("blocks.2.hook_resid_pre", (5,), "patch",
                                                              "clean.hxr", 0)
    assert parse_intervention("blocks.2.hook_resid_pre @ 5 <- clean.hxr#2").run == 2
    assert parse_intervention("L3F120*8").kind == "feature"
    assert parse_intervention("L3F120=+5").op == "add"
    assert parse_intervention("L0.attn@1,4:6=0").positions == (1, 4, 5)
    assert parse_intervention("L1.mlp=0").hook == "blocks.1.hook_mlp_out"
    iv = parse_intervention("blocks.1.hook_resid_post~d.npy=-2", base_dir="/x")
    assert (iv.direction, iv.op, iv.value) == ("/x/d.npy", "add", -2.0)
    iv = parse_intervention("blocks.1.hook_resid_post@2+=v.npy*4")
    assert (iv.op, iv.file, iv.value) == ("add_vector", "v.npy", 4.0)
    assert parse_intervention("L1N3=2.5").op == "set"


@pytest.mark.parametrize("spec, part", [
    ("", "empty spec"),
    ("L1H2", "no action"),
    ("L1H2=zero", "value 'zero' is not a number"),
    ("L1H2@x=0", "position 'x'"),
    ("L1H2@5:3=0", "range '5:3' is empty"),
    ("L1X2=0", "target 'L1X2'"),
    ("L1.foo=0", "unknown layer part 'foo'"),
    ("=0", "no target"),
    ("L1H2=3", "=3 sets one number; a head is a vector"),
    ("L1H2=+3", "a head is a vector"),
    ("L1N2+=v.npy", "a neuron takes =+X"),
    ("L1H2*1e999", "not finite"),
    ("blocks.1.hook_resid_pre<-", "<- needs a trace"),
    ("blocks.1.hook_resid_pre~=0", "~ needs a direction file"),
    ("bl ocks=0", "not a hook name"),
])
def test_grammar_errors(spec, part):
    with pytest.raises(HexRayError) as e:
        parse_intervention(spec)
    assert part in str(e.value) and "\n" not in str(e.value)


# -- equal to hand-written hooks --------------------------------------------------------------------

def _record(rec, tmp_path, specs, prompt=PROMPT, name="t.hxr", **kw):
    path = str(tmp_path / name)
    rec.record(prompt, path, act_dtype="float32", interventions=specs, top_k=8, lens=False, **kw)
    return path


def _check_logits(rec, path, hooks, prompt=PROMPT, what=""):
    """The trace's top-k logits and log-sum-exp equal the bridge run with the hand-written hooks."""
    import torch

    ids = torch.tensor([rec.tokenize(prompt)])
    with torch.no_grad():
        logits = rec.bridge.run_with_hooks(ids, fwd_hooks=hooks)[0].float()
        plain = rec.bridge(ids)[0].float()
    with TraceReader(path) as r:
        top = r.read("hexray.topk_logits")
        lse = r.read("hexray.logsumexp")
    want = logits.topk(top.shape[1], -1).values.numpy()
    np.testing.assert_allclose(top, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lse, torch.logsumexp(logits, -1).numpy(), atol=1e-5, rtol=0)
    assert float((logits - plain).abs().max()) > 1e-3, what  # the intervention changed something


def _set_head(layer_pos=None, head=2, value=0.0):
    def hook(z, hook):
        z = z.clone()
        if layer_pos is None:
            z[:, :, head, :] = value
        else:
            z[:, layer_pos, head, :] = value
        return z
    return hook


def _unit(d, seed):
    v = np.random.default_rng(seed).standard_normal(d)
    return v / np.linalg.norm(v)


def test_forms_equal_hand_written_hooks(tiny_recorder, tmp_path):
    import torch

    rec = tiny_recorder
    d_model = rec.bridge.cfg.d_model
    n = len(rec.tokenize(PROMPT))
    u = _unit(d_model, 1)
    np.save(tmp_path / "dir.npy", u)
    steer = np.random.default_rng(2).standard_normal(d_model).astype(np.float32)
    np.save(tmp_path / "steer.npy", steer)
    ut = torch.tensor(u, dtype=torch.float32)

    def neuron_mean(z, hook):
        z = z.clone()
        z[:, :, 17] = z[:, :n, 17].mean()
        return z

    def zero_out(x, hook):
        return torch.zeros_like(x)

    def zero_at(pos):
        def hook(x, hook):
            x = x.clone()
            x[:, pos] = 0
            return x
        return hook

    def dir_set(value=None, add=None):
        def hook(x, hook):
            c = x @ ut
            new = torch.full_like(c, value) if value is not None else c + add
            return x + (new - c)[..., None] * ut
        return hook

    def mean_head(x, hook):
        x = x.clone()
        x[:, :, 1] = x[:, :, 1].mean(dim=1, keepdim=True)
        return x

    def add_steer(x, hook):
        x = x.clone()
        x[:, 2:4] += 4 * torch.tensor(steer)
        return x

    def scale(x, hook):
        x = x.clone()
        x[:, 3] *= 8
        return x

    cases = [
        (["L1H2=0"], [("blocks.1.attn.hook_z", _set_head())]),
        (["L1H2@3=0"], [("blocks.1.attn.hook_z", _set_head(3))]),
        (["L1N17=mean"], [("blocks.1.mlp.hook_post", neuron_mean)]),
        (["L0H1=mean"], [("blocks.0.attn.hook_z", mean_head)]),
        (["L1.attn=0"], [("blocks.1.hook_attn_out", zero_out)]),
        (["L0.mlp@1,4=0"], [("blocks.0.hook_mlp_out", zero_at([1, 4]))]),
        ([f"blocks.1.hook_resid_pre~{tmp_path}/dir.npy=0"], [("blocks.1.hook_resid_pre", dir_set(value=0.0))]),
        ([f"blocks.1.hook_resid_pre~{tmp_path}/dir.npy=+5"], [("blocks.1.hook_resid_pre", dir_set(add=5.0))]),
        ([f"blocks.0.hook_resid_post@2:4+={tmp_path}/steer.npy*4"], [("blocks.0.hook_resid_post", add_steer)]),
        (["L1N5@3*8"], [("blocks.1.mlp.hook_post", lambda x, hook: _scale_neuron(x, 5, 3, 8))]),
        (["blocks.0.hook_resid_post@3*8"], [("blocks.0.hook_resid_post", scale)]),
        (["L1H2=0", "L0N3=mean"], [("blocks.1.attn.hook_z", _set_head()),
                                   ("blocks.0.mlp.hook_post", lambda x, hook: _mean_neuron(x, 3, n))]),
    ]
    for i, (specs, hooks) in enumerate(cases):
        path = _record(rec, tmp_path, specs, name=f"c{i}.hxr")
        _check_logits(rec, path, hooks, what=specs)
        with TraceReader(path) as r:
            assert [iv["spec"] for iv in r.meta["interventions"]] == specs


def _scale_neuron(x, neuron, pos, s):
    x = x.clone()
    x[:, pos, neuron] *= s
    return x


def _mean_neuron(x, neuron, n):
    x = x.clone()
    x[:, :, neuron] = x[:, :n, neuron].mean()
    return x


def test_recorded_activation_is_the_intervened_one(tiny_gpt2_recorder, tmp_path):
    path = _record(tiny_gpt2_recorder, tmp_path, ["L1H2@3=0"])
    with TraceReader(path) as r:
        z = r.read("blocks.1.attn.hook_z")
    assert np.all(z[3, 2] == 0) and np.abs(z[2, 2]).max() > 0 and np.abs(z[3, 1]).max() > 0


def test_patch_from_trace_equals_live_cache(tiny_recorder, tmp_path):
    import torch

    rec = tiny_recorder
    a, b = rec.tokenize(PROMPT), rec.tokenize(CORRUPT)
    assert len(a) == len(b)
    pos = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    clean = _record(rec, tmp_path, None, name="clean.hxr")
    _, cache = rec.bridge.run_with_cache(torch.tensor([rec.tokenize(PROMPT)]))
    live = cache["blocks.1.hook_resid_pre"]

    def patch(x, hook):
        x = x.clone()
        x[:, pos] = live[:, pos]
        return x

    path = _record(rec, tmp_path, [f"blocks.1.hook_resid_pre@{pos}<-{clean}"], prompt=CORRUPT, name="p.hxr")
    _check_logits(rec, path, [("blocks.1.hook_resid_pre", patch)], prompt=CORRUPT)
    # A whole head from the trace (its hook_z slice at every position).
    live_z = cache["blocks.0.attn.hook_z"]

    def patch_head(z, hook):
        z = z.clone()
        z[:, :, 1] = live_z[:, :, 1]
        return z

    path = _record(rec, tmp_path, [f"L0H1<-{clean}"], prompt=CORRUPT, name="h.hxr")
    _check_logits(rec, path, [("blocks.0.attn.hook_z", patch_head)], prompt=CORRUPT)


def test_steered_generation_cache_equals_no_cache(tiny_recorder, tmp_path):
    """Greedy generation with the KV cache under steering = one full steered forward per token."""
    import torch

    rec = tiny_recorder
    d_model = rec.bridge.cfg.d_model
    steer = (3 * np.random.default_rng(5).standard_normal(d_model)).astype(np.float32)
    np.save(tmp_path / "s.npy", steer)
    ids = rec.tokenize(PROMPT)
    n = len(ids)
    specs = [f"blocks.1.hook_resid_pre+={tmp_path}/s.npy", "L0H1=0", f"L1N7@{n + 1}=mean"]
    path = _record(rec, tmp_path, specs, name="g.hxr", generate=6)
    with TraceReader(path) as r:
        got = r.runs[0]["tokens"]

    def add(x, hook):
        return x + torch.tensor(steer)

    def neuron(x, hook):
        x = x.clone()
        if x.shape[1] > n + 1:
            x[:, n + 1, 7] = x[:, :n, 7].mean()
        return x

    hooks = [("blocks.1.hook_resid_pre", add), ("blocks.0.attn.hook_z", _set_head(None, 1)),
             ("blocks.1.mlp.hook_post", neuron)]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(rec.bridge.run_with_hooks(torch.tensor([seq]), fwd_hooks=hooks)[0, -1].argmax()))
        plain = list(ids)
        for _ in range(6):
            plain.append(int(rec.bridge(torch.tensor([plain]))[0, -1].argmax()))
    assert got == seq
    assert seq != plain  # the steering changed the continuation
    with TraceReader(path) as r:
        top = r.read("hexray.topk_logits")
    with torch.no_grad():
        want = rec.bridge.run_with_hooks(torch.tensor([seq]), fwd_hooks=hooks)[0].float().topk(8, -1).values
    np.testing.assert_allclose(top, want.numpy(), atol=1e-5, rtol=0)


# -- refused against the model ----------------------------------------------------------------------

def test_bad_specs_against_the_model(tiny_llama_recorder, tmp_path):
    rec = tiny_llama_recorder
    clean = _record(rec, tmp_path, None, prompt="a b", name="short.hxr", hooks="blocks.0.hook_resid_pre")
    np.save(tmp_path / "v3.npy", np.ones(3))
    cases = [
        ("L5H0=0", "layer 5 does not exist (the model has layers 0-1)"),
        ("L1H4=0", "head 4 does not exist"),
        ("L1N128=0", "neuron 128 does not exist"),
        ("L1H2@99=0", "position 99 is past the run's"),
        ("L3F120*8", "layer 3 does not exist"),
        ("L1F120*8", "needs a dictionary: add --dict DIR"),
        ("blocks.0.hook_nope=0", "the model has no hook 'blocks.0.hook_nope'"),
        (f"blocks.0.hook_resid_pre+={tmp_path}/v3.npy", "vector has 3 entries, the target 64"),
        (f"blocks.0.hook_resid_pre~{tmp_path}/none.npy=0", "direction file"),
        (f"blocks.0.hook_resid_pre<-{clean}", "token counts must agree"),
        (f"blocks.1.hook_resid_pre<-{clean}", "did not record blocks.1.hook_resid_pre"),
        (f"blocks.0.hook_resid_pre<-{clean}#3", "not run 3"),
        ("blocks.0.attn.hook_result=0", "does not fire on this model as loaded"),
        ("L0.resid_mid=0", "does not reach the residual stream"),
    ]
    for spec, part in cases:
        with pytest.raises(HexRayError) as e:
            rec.record(PROMPT, str(tmp_path / "bad.hxr"), interventions=[spec])
        assert part in str(e.value), (spec, str(e.value))
        assert not (tmp_path / "bad.hxr").exists()


# -- the command line ---------------------------------------------------------------------------------

def test_cli_intervene_and_info(tiny_gpt2_dir, tmp_path, capsys):
    out = str(tmp_path / "a.hxr")
    rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "-q", "--intervene", "L1H2=0",
               "--intervene", "L1N17@2=mean", "-o", out])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "intervene L1H2=0" in text and "L1N17@2=mean" in text
    assert main(["info", out, "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["interventions"] == ["L1H2=0", "L1N17@2=mean"]


def test_cli_bad_spec_is_one_line(tmp_path, capsys):
    rc = main(["record", "--model", "hexray-demo", "--prompt", "x", "--intervene", "L1H2@x=0",
               "-o", str(tmp_path / "t.hxr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0] == "hexray: error: --intervene 'L1H2@x=0': position 'x' is not an index or a range A:B " \
                     "(indices count from 0)"


@pytest.mark.parametrize("edit", ["L0N5*20", "L0H1*3"])
def test_a_raw_space_feature_read_sees_an_edit_of_an_earlier_layer(tiny, tiny_tokenizer, tmp_path, edit):
    """A neuron or head edit and a feature intervention whose dictionary reads an unprocessed model's residual: the
    means compatibility mode removed are tracked from the edited hook_post / hook_z (what the residual stream gets),
    so the logits equal hand-written hooks on an unprocessed bridge, in either order of the specs."""
    import warnings

    import torch
    from test_feature_interventions import PROMPT as FPROMPT
    from test_feature_interventions import _active_feature, _assert_equal, _feature_hooks, _saelens
    from transformer_lens.model_bridge import TransformerBridge

    from hexray_core.dataset.record_features import feature_dictionaries
    from hexray_core.record import Recorder
    from hexray_core.replay.dictionary import load_dictionary

    rec = Recorder(tiny.build_tiny_gpt2(tiny_tokenizer), tokenizer=tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = TransformerBridge.boot_transformers("raw", hf_model=tiny.build_tiny_gpt2(tiny_tokenizer).eval(),
                                                  tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
    dset = load_dictionary(_saelens(tmp_path / "sae", "blocks.1.hook_resid_pre"))  # center_writing_weights off
    d = dset[1]
    ids = rec.tokenize(FPROMPT)
    f = _active_feature(d, raw, ids)

    with torch.no_grad():  # what compatibility mode's fold_ln + fold_value_biases take out of head 1's z
        b_v = raw.b_V[0, 1] + torch.einsum("d,de->e", raw.blocks[0].ln1.bias, raw.W_V[0, 1])

    def edited(x, hook):
        x = x.clone()
        if edit.startswith("L0N"):
            x[..., 5] *= 20  # mlp.hook_post [batch, pos, d_mlp]
        else:  # attn.hook_z [batch, pos, head, d_head]: the recorder scales the processed z, z_raw - b_v
            x[..., 1, :] = 3 * (x[..., 1, :] - b_v) + b_v
        return x

    hook = "blocks.0.mlp.hook_post" if edit.startswith("L0N") else "blocks.0.attn.hook_z"
    hooks = [(hook, edited)] + _feature_hooks(d, f, lambda a, p: a * 0)
    for specs in ([edit, f"L1F{f}=0"], [f"L1F{f}=0", edit]):
        path = str(tmp_path / "t.hxr")
        rec.record(FPROMPT, path, act_dtype="float32", interventions=specs, top_k=8, lens=False,
                   features=feature_dictionaries([dset]))
        _assert_equal(path, raw, ids, (f"{specs}", hooks))
