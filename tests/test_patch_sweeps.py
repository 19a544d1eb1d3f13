"""`hexray patch`: every sweep equals TransformerLens's function called directly on the bridge (tiny GPT-2 and
tiny Llama with GQA), normalised 0 = corrupt, 1 = clean, stored in a trace with both runs; length mismatch refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ray_support import local_ray

from hexray.cli.main import main
from hexray_core.errors import HexRayError
from trace_format import TraceReader

CLEAN, CORRUPT = "The fox", "The cat"  # 7 tokens each with the tiny tokenizer


def _direct(rec, fn_name, target, baseline, pos=-1):
    import torch
    from transformer_lens import patching

    c = torch.tensor([rec.tokenize(CLEAN)])
    x = torch.tensor([rec.tokenize(CORRUPT)])
    with torch.no_grad():
        _, cache = rec.bridge.run_with_cache(c)
        return getattr(patching, fn_name)(rec.bridge, x, cache,
                                          lambda lg: lg[0, pos, target] - lg[0, pos, baseline]).numpy()


@pytest.mark.parametrize("sweep", ["resid_pre", "attn_out", "mlp_out", "heads", "pattern",
                                   pytest.param("heads-by-pos", marks=pytest.mark.slow)])
def test_sweep_equals_transformer_lens(tiny_recorder, sweep):
    from hexray_core.record.sweep import SWEEPS, run_sweep

    rec = tiny_recorder
    assert len(rec.tokenize(CLEAN)) == len(rec.tokenize(CORRUPT))
    r = run_sweep(rec, CLEAN, CORRUPT, sweep=sweep, target="#5", baseline="#7")
    want = _direct(rec, SWEEPS[sweep][0], 5, 7)
    assert r.values.shape == want.shape
    np.testing.assert_allclose(r.values, want, atol=1e-5, rtol=0)
    # 0 = corrupt, 1 = clean: patching the whole stream entering layer 0 at every position gives the clean run.
    norm = r.normalized
    np.testing.assert_allclose(norm, (want - r.corrupt_value) / (r.clean_value - r.corrupt_value), atol=1e-6)
    if sweep == "resid_pre":
        # Position 0 (BOS) is the same in both runs: patching it changes nothing (0 = corrupt).
        assert abs(norm[0, 0]) < 1e-5
        diff = [i for i, (a, b) in enumerate(zip(rec.tokenize(CLEAN), rec.tokenize(CORRUPT), strict=True)) if a != b]
        if len(diff) == 1:  # one differing token: patching the stream entering layer 0 there gives the clean run
            assert abs(norm[0, diff[0]] - 1) < 1e-4


def test_length_mismatch_refused(tiny_gpt2_recorder):
    from hexray_core.record.sweep import run_sweep

    with pytest.raises(HexRayError, match=r"clean is 10 tokens, corrupt 9"):
        run_sweep(tiny_gpt2_recorder, "The cat sat", "The dog sat", sweep="resid_pre")
    with pytest.raises(HexRayError, match="tokens, not one"):
        run_sweep(tiny_gpt2_recorder, CLEAN, CORRUPT, sweep="heads", target=" fox jumps")


def test_cli_json_and_trace(tiny_llama_dir, tmp_path, capsys):
    out = str(tmp_path / "p.hxr")
    rc = main(["patch", "--model", tiny_llama_dir, "--clean", CLEAN, "--corrupt", CORRUPT, "--sweep", "heads",
               "--target", "#5", "--baseline", "#7", "-q", "--json", "-o", out])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(capsys.readouterr().out)["patch"]
    assert d["sweep"] == "heads" and d["metric"].startswith("logit-diff") and d["axes"] == ["layer", "head"]
    assert d["clean"]["prompt"] == CLEAN and d["corrupt"]["prompt"] == CORRUPT
    assert d["labels"]["head"] == ["H0", "H1", "H2", "H3"] and len(d["values"]) == 2 and len(d["values"][0]) == 4
    with TraceReader(out) as r:
        assert [run["prompt"] for run in r.runs] == [CLEAN, CORRUPT]
        np.testing.assert_allclose(r.read("hexray.patch_values", 1), np.array(d["values"]), atol=1e-6)
        assert r.meta["patch"]["sweep"] == "heads" and r.meta["patch"]["clean"]["value"] == d["clean"]["value"]
    rc = main(["patch", "--model", tiny_llama_dir, "--clean", CLEAN, "--corrupt", CORRUPT, "--sweep", "resid_pre",
               "--target", "#5", "--baseline", "#7", "-q"])
    text = capsys.readouterr().out
    assert rc == 0 and "resid_pre: logit-diff" in text and text.splitlines()[2].startswith("L0 ")
    rc = main(["patch", "--model", tiny_llama_dir, "--clean", "The cat sat", "--corrupt", "The dog sat", "-q"])
    assert rc == 1 and "clean is 10 tokens, corrupt 9" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_on_ray_equals_one_process(tiny_gpt2_dir, capsys):
    """--ray: the index table cut into chunks, each a Ray task in its own worker, gives the same values."""
    args = ["patch", "--model", tiny_gpt2_dir, "--clean", CLEAN, "--corrupt", CORRUPT, "--sweep", "attn_out",
            "--target", "#5", "--baseline", "#7", "-q", "--json"]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)["patch"]["values"]
    with local_ray():
        assert main([*args, "--ray", "--workers", "3"]) == 0
        spread = json.loads(capsys.readouterr().out)["patch"]["values"]
    assert spread == one
