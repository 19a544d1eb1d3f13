"""`hexray record --grad` and `hexray patch --estimate`: attribution patching from two traces equals
TransformerLens's `attribution_patch` (node level), and AtP*'s query/key estimates equal the exact
pattern change times the recorded pattern gradient (tiny GPT-2 and tiny Llama with GQA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hexray.cli.main import main
from hexray_core.errors import HexRayError

CLEAN, CORRUPT = "The fox", "The cat"
METRIC = "logit-diff:#5,#7"


def _metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 7]


def _traces(rec, tmp_path):
    import hexray

    c = str(tmp_path / "clean.hxr")
    x = str(tmp_path / "corrupt.hxr")
    rec.record(CLEAN, c, act_dtype="float32", grad=METRIC, lens=False)
    rec.record(CORRUPT, x, act_dtype="float32", grad=METRIC, lens=False)
    return hexray.open(c), hexray.open(x)


def test_grad_equals_transformer_lens(tiny_recorder, tmp_path):
    import torch
    from transformer_lens.tools.analysis.attribution_patching import Node, attribution_patch

    from hexray_core.replay.atp import estimate

    rec = tiny_recorder
    clean, corrupt = _traces(rec, tmp_path)
    est = estimate(clean, corrupt)
    tl = attribution_patch(rec.bridge, torch.tensor([rec.tokenize(CLEAN)]), torch.tensor([rec.tokenize(CORRUPT)]),
                           _metric).node_scores
    n_layers, n_heads = rec.bridge.cfg.n_layers, rec.bridge.cfg.n_heads
    n = len(rec.tokenize(CLEAN))
    want_heads = np.array([[[tl[Node("attn_head_out", p, layer, h)] for h in range(n_heads)] for p in range(n)]
                           for layer in range(n_layers)])
    want_mlp = np.array([[tl[Node("mlp_out", p, layer)] for p in range(n)] for layer in range(n_layers)])
    want_embed = np.array([tl[Node("embed", p)] for p in range(n)])
    np.testing.assert_allclose(est["heads-by-pos"], want_heads, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(est["mlp_out"], want_mlp, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(est["embed"], want_embed, atol=1e-5, rtol=1e-4)
    assert np.abs(want_heads).max() > 1e-3
    np.testing.assert_allclose(est["heads"], want_heads.sum(1), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert abs(est["metric_value"] - float(_metric(rec.bridge(torch.tensor([rec.tokenize(CORRUPT)]))))) < 1e-5


def test_atp_star_equals_exact_pattern_change(tiny_recorder, tmp_path):
    """Patch one query (one head, one position) or one key (one kv head, one position) in the model, read the
    layer's new pattern, and contract its change with TransformerLens's d metric / d pattern."""
    import torch
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    from hexray_core.replay.atp import estimate

    rec = tiny_recorder
    clean, corrupt = _traces(rec, tmp_path)
    est = estimate(clean, corrupt)
    att = corrupt.meta["attention"]
    layer = 1
    qn, kn = att["q"].format(layer=layer), att["k"].format(layer=layer)
    pn = f"blocks.{layer}.attn.hook_pattern"
    c_ids, x_ids = torch.tensor([rec.tokenize(CLEAN)]), torch.tensor([rec.tokenize(CORRUPT)])
    with torch.enable_grad():
        gc = cache_activation_and_gradient(rec.bridge, x_ids, _metric, names_filter=[pn])
    ga, a0 = gc.gradients[pn][0].double(), gc.activations[pn][0].double()
    with torch.no_grad():
        _, cache = rec.bridge.run_with_cache(c_ids)
    n = x_ids.shape[1]
    for kind, name, head in (("q", qn, 3), ("k", kn, 1)):
        for pos in (2, n - 1):
            seen = {}

            def patch(x, hook, pos=pos, head=head, name=name):
                x = x.clone()
                x[:, pos, head] = cache[name][:, pos, head]
                return x

            def grab(x, hook, seen=seen):
                seen["p"] = x[0].double()

            with torch.no_grad():
                rec.bridge.run_with_hooks(x_ids, fwd_hooks=[(name, patch), (pn, grab)])
            want = float(((seen["p"] - a0) * ga).sum())
            got = est[kind][layer, pos, head]
            assert abs(got - want) < 1e-5 + 1e-4 * abs(want), (kind, pos, got, want)
    assert np.abs(est["k"]).max() > 1e-4 and np.abs(est["q"]).max() > 1e-4


def test_estimate_cli(tiny_gpt2_recorder, tiny_gpt2_dir, tmp_path, capsys):
    clean, corrupt = _traces(tiny_gpt2_recorder, tmp_path)
    rc = main(["patch", "--estimate", clean.path, corrupt.path, "--sweep", "heads", "--json", "-q"])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(capsys.readouterr().out)["patch"]
    assert d["sweep"].startswith("heads (AtP") and len(d["estimate"]) == 2 and len(d["estimate"][0]) == 4
    np.testing.assert_allclose(np.array(d["values"]) - d["corrupt"]["value"], np.array(d["estimate"]), atol=1e-9)
    rc = main(["patch", "--estimate", clean.path, corrupt.path, "--sweep", "k", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "AtP* estimate" in out and "KV0" in out
    # Beside the real sweep (same prompts and metric, the model run): correlation reported.
    rc = main(["patch", "--estimate", clean.path, corrupt.path, "--sweep", "mlp_out", "--model", tiny_gpt2_dir,
               "-q", "--json"])
    real = json.loads(capsys.readouterr().out)["patch"]["real"]
    assert rc == 0 and -1 <= real["pearson"] <= 1 and real["cells"] == len(d["labels"]["layer"]) * 7
    # An MLP output feeds the rest of the model through norms only: the linear estimate tracks it (0.99 measured;
    # resid_pre at layer 0, a whole token's embedding swapped, is where AtP is poor: -0.28 on this model).
    assert real["pearson"] > 0.9
    rc = main(["patch", "--estimate", corrupt.path, clean.path.replace("clean", "nope"), "-q"])
    assert rc == 1


def test_estimate_needs_gradients(tiny_gpt2_recorder, tmp_path):
    import hexray
    from hexray_core.replay.atp import estimate

    a = str(tmp_path / "a.hxr")
    tiny_gpt2_recorder.record(CLEAN, a, act_dtype="float32", lens=False)
    with pytest.raises(HexRayError, match="holds no gradients"):
        estimate(hexray.open(a), hexray.open(a))


@pytest.mark.parametrize("spec, part", [("logit-diff:#5", "takes 2 tokens"), ("loss", "not one of"),
                                        ("logit:Mary", "not a quoted text"), ("logit", "needs its token")])
def test_bad_metric(spec, part):
    from hexray_core.record.metric_spec import parse_metric

    with pytest.raises(HexRayError, match=part):
        parse_metric(spec)


def test_estimate_stored_in_a_trace_reads_like_a_real_sweep(tiny_gpt2_recorder, tmp_path, capsys):
    """-o with --estimate: both runs copied at their stored dtype, the estimate as hexray.patch_values; the
    viewer's heatmap data equals what --json printed, and the copied runs replay as the originals do."""
    import hexray
    from hexray_view.data import patch_sweep

    clean, corrupt = _traces(tiny_gpt2_recorder, tmp_path)
    out = str(tmp_path / "est.hxr")
    rc = main(["patch", "--estimate", clean.path, corrupt.path, "--sweep", "resid_pre", "-o", out, "--json", "-q"])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(capsys.readouterr().out)["patch"]
    est = hexray.open(out)
    assert [r.prompt for r in est.runs] == [clean.run(0).prompt, corrupt.run(0).prompt]
    for src, run in ((clean, 0), (corrupt, 1)):
        for name in src.reader.names(0):
            np.testing.assert_array_equal(est.reader.read(name, run, dtype="stored"),
                                          src.reader.read(name, 0, dtype="stored"), err_msg=name)
    grid = patch_sweep(est)
    assert grid["sweep"] == d["sweep"] and grid["axes"] == ["layer", "pos"]
    np.testing.assert_allclose(grid["values"], np.array(d["values"], dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(grid["normalized"], np.array(d["normalized"], dtype=np.float64), rtol=1e-5)
    a, b = est.attribution(-1, run=1), corrupt.attribution(-1, run=0)
    assert (a.target, a.logit, a.probability) == (b.target, b.logit, b.probability)
    assert [(c.label, c.value) for c in a.contributions] == [(c.label, c.value) for c in b.contributions]
    rc = main(["patch", "--estimate", clean.path, corrupt.path, "--sweep", "resid_pre", "-o", clean.path, "-q"])
    assert rc == 1 and "one of the traces the estimate reads" in capsys.readouterr().err


def test_a_key_estimate_stored_in_a_trace_has_a_column_per_kv_head(tiny_llama_recorder, tmp_path, capsys):
    """--sweep k -o on a grouped-query model (tiny Llama: 4 heads, 2 key/value heads): the viewer's grid has a row
    per key/value head of each layer, with the values --json printed."""
    import hexray
    from hexray_view.data import patch_sweep

    clean, corrupt = _traces(tiny_llama_recorder, tmp_path)
    out = str(tmp_path / "k.hxr")
    rc = main(["patch", "--estimate", clean.path, corrupt.path, "--sweep", "k", "-o", out, "--json", "-q"])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(capsys.readouterr().out)["patch"]
    grid = patch_sweep(hexray.open(out))
    assert grid["rows"] == ["L0KV0", "L0KV1", "L1KV0", "L1KV1"] and grid["cols"]["clean"] == clean.run(0).labels
    want = np.array(d["values"], dtype=np.float64)  # [layer, pos, kv head]
    np.testing.assert_allclose(grid["values"], want.transpose(0, 2, 1).reshape(4, -1), rtol=1e-6)


def test_an_estimate_trace_keeps_only_the_stored_features_its_metadata_names(tiny_gpt2_recorder, tmp_path):
    """Clean and corrupt recorded with different --dict: the estimate trace carries the corrupt trace's metadata, so
    the clean run's stored features (of another dictionary, in the same slot) are left behind, and its features
    are computed from its recorded hooks instead of read as the other dictionary's."""
    from test_feature_interventions import _saelens

    import hexray
    from hexray_core.dataset.record_features import run_extra
    from hexray_core.replay.dictionary import load_dictionary

    rec = tiny_gpt2_recorder
    a = load_dictionary(_saelens(tmp_path / "a", "blocks.1.hook_resid_pre"))
    b = load_dictionary(_saelens(tmp_path / "b", "blocks.1.hook_resid_pre"))
    c, x, out = (str(tmp_path / n) for n in ("clean.hxr", "corrupt.hxr", "est.hxr"))
    rec.record(CLEAN, c, act_dtype="float32", grad=METRIC, lens=False, extra=run_extra(rec, [a]))
    rec.record(CORRUPT, x, act_dtype="float32", grad=METRIC, lens=False, extra=run_extra(rec, [b]))
    assert main(["patch", "--estimate", c, x, "--sweep", "resid_pre", "-o", out, "-q"]) == 0
    est, clean, corrupt = hexray.open(out), hexray.open(c), hexray.open(x)
    np.testing.assert_allclose(est.run(0).features(b, 1).dense(), clean.run(0).features(b, 1).dense(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(est.run(1).features(b, 1).dense(), corrupt.run(0).features(b, 1).dense())


def test_traces_of_two_models_are_refused(tiny_gpt2_recorder, tiny_llama_recorder, tmp_path, capsys):
    """An estimate pairs two recordings of one model: traces of another model (another kit) are one line."""
    clean, _ = _traces(tiny_gpt2_recorder, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, corrupt = _traces(tiny_llama_recorder, other)
    for sweep in ("resid_pre", "heads"):
        rc = main(["patch", "--estimate", clean.path, corrupt.path, "--sweep", sweep, "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and "recorded from different models" in err[0], err
