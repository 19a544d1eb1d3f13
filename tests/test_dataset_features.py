"""What a feature means over a real recorded dataset (`hexray features DATASET/ --dict DIR`).

The embedded demo model records the prompts of test_dataset into shards; a random SAE (SAELens layout, trained
space without centring, so the trace's centred residual is shifted back) reads its layer 2. Every statistic is
checked against a brute-force pass that encodes each run densely; the shards also reduce in two processes and as
Ray tasks on a real local cluster, with the same result.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from ray_support import local_ray
from safetensors.numpy import save_file
from test_dataset import PROMPTS, run_cli, write_jsonl

from hexray_core.dataset import features as dfeat
from hexray_core.dataset.reader import open_dataset
from hexray_core.replay.dictionary import load_dictionary
from hexray_core.replay.features import dictionary_input

pytestmark = pytest.mark.slow  # records a dataset with the demo model
LAYER, D_SAE = 2, 192


def _sae(path, d_model: int) -> str:
    rng = np.random.default_rng(7)
    os.makedirs(path, exist_ok=True)
    save_file({"W_enc": (rng.standard_normal((d_model, D_SAE)) * 0.3).astype(np.float32),
               "W_dec": (rng.standard_normal((D_SAE, d_model)) * 0.3).astype(np.float32),
               "b_enc": (rng.standard_normal(D_SAE) * 0.5 - 1.5).astype(np.float32),
               "b_dec": (rng.standard_normal(d_model) * 0.1).astype(np.float32)},
              os.path.join(path, "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": d_model, "d_sae": D_SAE, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_pre", "sae_lens_version": "6.54.12",
                        "model_from_pretrained_kwargs": {"center_writing_weights": False}}}
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny):
    from hexray.cli.main import main

    tmp = tmp_path_factory.mktemp("dsf")
    src = write_jsonl(tmp / "p.jsonl", [{"prompt": p, "id": f"q{i}"} for i, p in enumerate(PROMPTS)])
    out = str(tmp / "out") + "/"  # a trailing slash: a dataset folder, not one trace
    assert main(["record", "--model", "hexray-demo", "--prompts-file", src, "-o", out, "--shard-size", "4",
                 "--act-dtype", "float32", "-q"]) == 0
    ds = open_dataset(out)
    d_model = int(next(iter(ds)).trace.config["d_model"])
    return out, _sae(tmp / "sae", d_model)


def brute_force(out: str, sae: str):
    """Every run encoded densely: [(id key, entry id, labels, acts [n, d_sae])]."""
    d = load_dictionary(sae)[LAYER]
    rows = []
    for r in open_dataset(out):
        acts = d.encode(dictionary_input(r.trace.run(r.run), d)).astype(np.float64)
        rows.append((json.dumps(r.id), r.id, r.trace.run(r.run).labels, acts))
    return rows


def expected_feature(rows, f: int, k: int, m: int) -> dict:
    peaks = []
    values, examples = [], {}
    for key, rid, labels, acts in rows:
        col = acts[:, f]
        if np.any(col != 0):
            p = int(np.argmax(col))  # first position of the maximum
            peaks.append((-col[p], key, p, rid, col, labels))
        for p in np.flatnonzero(col > 0):
            b = int(dfeat._bins(col[p:p + 1])[0])
            h = int(dfeat._hash(key, np.array([p]), np.array([f]))[0])
            examples.setdefault(b, []).append((h, rid, int(p)))
        values.extend(col[col != 0])
    peaks.sort(key=lambda t: t[:3])
    values = np.asarray(values)
    pos = values[values > 0]
    hist = np.bincount(dfeat._bins(pos), minlength=len(dfeat.EDGES) + 1)
    return {"n_active": len(values), "max": float(values.max()) if len(values) else 0.0,
            "counts": hist[1:-1].tolist(), "under": int(hist[0]), "over": int(hist[-1]),
            "top": [(rid, p, -v, col, labels) for v, _, p, rid, col, labels in peaks[:k]],
            "samples": {b: [(rid, p) for _, rid, p in sorted(x)[:m]] for b, x in examples.items()}}


def check_against_brute_force(doc: dict, rows, k: int, m: int, features) -> None:
    n_tokens = sum(len(a) for *_, a in rows)
    (layer,) = doc["layers"]
    assert (layer["layer"], layer["n_runs"], layer["n_tokens"]) == (LAYER, len(PROMPTS), n_tokens)
    by_id = {e["feature"]: e for e in layer["features"]}
    assert sorted(by_id) == sorted(features)
    for f in features:
        got, want = by_id[f], expected_feature(rows, f, k, m)
        assert got["n_active"] == want["n_active"] and got["density"] == pytest.approx(want["n_active"] / n_tokens)
        assert got["max"] == pytest.approx(want["max"], rel=1e-6)
        h = got["histogram"]
        assert (h["counts"], h["under"], h["over"]) == (want["counts"], want["under"], want["over"])
        assert [(c["id"], c["position"]) for c in got["top_contexts"]] == [(r, p) for r, p, *_ in want["top"]]
        for c, (_, p, v, col, labels) in zip(got["top_contexts"], want["top"], strict=True):
            assert c["activation"] == pytest.approx(v, rel=1e-6)
            assert c["tokens"] == labels[c["start"]:c["start"] + len(c["tokens"])]
            assert c["start"] <= p < c["start"] + len(c["tokens"])
            np.testing.assert_allclose(c["activations"], col[c["start"]:c["start"] + len(c["tokens"])], rtol=1e-6)
        for q in got["quantile_examples"]:
            b = int(dfeat._bins(np.array([q["range"][0] * (1 + 1e-9) if q["range"][0] else 1e-9]))[0])
            assert [(e["id"], e["position"]) for e in q["examples"]] == want["samples"][b]
        assert sum(q["count"] for q in got["quantile_examples"]) == sum(want["counts"]) + want["under"] + want["over"]
        assert len(got["top_logits"]) == 5


def test_dataset_statistics_equal_a_brute_force_pass(data):
    out, sae = data
    rows = brute_force(out, sae)
    stats = dfeat.feature_stats(open_dataset(out), sae, k=3, m=2, top=None)
    doc = stats.to_dict()
    fired = sorted(f for f in range(D_SAE) if any(np.any(a[:, f] != 0) for *_, a in rows))
    assert len(fired) > 20  # the check means something: many features fire
    check_against_brute_force(doc, rows, 3, 2, fired)
    densest = [e["feature"] for e in stats.to_dict(top=4)["layers"][0]["features"]]
    counts = {f: sum(int(np.count_nonzero(a[:, f])) for *_, a in rows) for f in fired}
    assert densest == sorted(fired, key=lambda f: (-counts[f], f))[:4]


def test_two_processes_and_the_cli_give_the_same_statistics(data, capsys):
    out, sae = data
    features = [3, 50, 101]
    rows = brute_force(out, sae)
    rc, text, err = run_cli(capsys, "features", out, "--dict", sae, *sum((["--feature", f"L{LAYER}F{f}"]
                                                                          for f in features), []),
                            "--contexts", "4", "--examples", "2", "--jobs", "2", "--json")
    assert rc == 0, err
    doc = json.loads(text)["feature_stats"]
    check_against_brute_force(doc, rows, 4, 2, features)
    rc, text, _ = run_cli(capsys, "features", out, "--dict", sae, "--feature", f"L{LAYER}F3", "--contexts", "2")
    assert rc == 0 and f"L{LAYER}F3: density" in text and "histogram" in text


def test_candidates_stay_bounded_by_twice_k(data):
    out, sae = data
    ds = open_dataset(out)
    path, entries = next(ds.shards())
    stats = dfeat.shard_feature_stats(dfeat.FeatureTask(path, tuple(entries), sae, (LAYER,), None, k=1, m=1))
    st = stats[LAYER]
    assert st.top and all(len(v) < 2 for v in st.top.values())
    assert all(len(v) <= 1 for v in st.samples.values())


@pytest.mark.parametrize("argv, message", [
    (["--feature", "L2X3"], "--feature must look like L3F1234"),
    (["--feature", f"L2F{D_SAE}"], f"has {D_SAE} features"),
    (["--feature", "L0F1"], "no dictionary for layer 0"),
    (["--contexts", "0"], "--contexts must be at least 1"),
])
def test_bad_requests_get_one_line(data, capsys, argv, message):
    out, sae = data
    rc, _, err = run_cli(capsys, "features", out, "--dict", sae, *argv)
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1


def test_ray_tasks_give_the_same_statistics(data, capsys):
    out, sae = data
    with local_ray():
        rc, text, err = run_cli(capsys, "features", out, "--dict", sae, "--feature", f"L{LAYER}F3",
                                "--feature", f"L{LAYER}F50", "--contexts", "4", "--ray", "--json")
    assert rc == 0, err
    check_against_brute_force(json.loads(text)["feature_stats"], brute_force(out, sae), 4, 3, [3, 50])


def test_the_notebook_method_names_features_as_the_cli_does(data):
    out, sae = data
    got = open_dataset(out).feature_stats(sae, features=[f"L{LAYER}F50"], k=2).feature(LAYER, 50)
    want = expected_feature(brute_force(out, sae), 50, 2, 3)
    assert got["n_active"] == want["n_active"] > 0
    assert [(c["id"], c["position"]) for c in got["top_contexts"]] == [(r, p) for r, p, *_ in want["top"]]


@pytest.mark.parametrize("engine", ["process", "ray"])
def test_a_dataset_recorded_with_dict_stores_features_the_statistics_read(data, tmp_path, capsys, engine):
    """`record --prompts-file ... -o DIR/ --dict D` (here without the dictionary's input hook): every shard
    stores the features, on Ray too (each worker builds them from the dictionary's path), and the statistics
    read from them equal a brute-force pass over the dataset recorded with that hook."""
    from trace_format import TraceReader

    out, sae = data
    src = os.path.join(os.path.dirname(out.rstrip("/")), "p.jsonl")
    slim = str(tmp_path / "slim") + "/"
    argv = ["record", "--model", "hexray-demo", "--prompts-file", src, "-o", slim, "--shard-size", "4",
            "--act-dtype", "float32", "--hooks", "blocks.0.hook_resid_post", "--dict", sae, "-q"]
    if engine == "ray":
        with local_ray():
            rc, _, err = run_cli(capsys, *argv, "--ray", "auto", "--workers", "2")
    else:
        rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    info = json.load(open(os.path.join(slim, "dataset.json")))
    assert info["record"]["dicts"] == [os.path.abspath(sae)]
    for name in os.listdir(os.path.join(slim, "shards")):
        if name.endswith(".hxr"):
            with TraceReader(os.path.join(slim, "shards", name)) as r:
                assert not any(".hook_resid_pre" in t.name for t in r.tensors())  # the input was not stored
    doc = dfeat.feature_stats(open_dataset(slim), sae, k=3, m=2, top=None).to_dict()
    rows = brute_force(out, sae)
    fired = sorted(f for f in range(D_SAE) if any(np.any(a[:, f] != 0) for *_, a in rows))
    check_against_brute_force(doc, rows, 3, 2, fired)
    rc, _, err = run_cli(capsys, *argv[:-3], "-q")  # a resume without the dictionary is refused
    assert rc == 1 and "other options" in err and "dicts" in err


def test_a_dataset_recorded_with_an_embedded_dictionary_by_name(tmp_path, capsys):
    """`--dict hexray-demo-sae` (a name, not a folder) reaches every shard as it does a single trace, and a resume
    from another folder names the same dictionary."""
    from trace_format import TraceReader

    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    out = str(tmp_path / "ds") + "/"
    argv = ["record", "--model", "hexray-demo", "--prompts-file", src, "-o", out, "--dict", "hexray-demo-sae", "-q"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert json.load(open(os.path.join(out, "dataset.json")))["record"]["dicts"] == ["hexray-demo-sae"]
    shard = next(n for n in os.listdir(os.path.join(out, "shards")) if n.endswith(".hxr"))
    with TraceReader(os.path.join(out, "shards", shard)) as r:
        assert [f["name"] for f in r.meta["features"]] == ["hexray-demo-sae"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc, _, err = run_cli(capsys, *argv)
    finally:
        os.chdir(cwd)
    assert rc == 0, err
