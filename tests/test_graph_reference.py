"""HexRay's attribution graphs equal circuit-tracer's on the oracle fixtures (tests/fixtures/reference/).

circuit-tracer 0.5 built each graph from the model itself (TransformerLens 3, unprocessed weights) on the tiny GPT-2
and tiny Llama with per-layer (GPT-2: with skip connections) and cross-layer transcoders (GPT-2's read the raw,
uncentred hook_resid_mid). Here HexRay records the same model in compatibility mode (float32) and builds the graph
from the trace and its kit alone: the same nodes, every entry of the adjacency within float32 1e-4 of the row's
largest, and the same pruned node set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hexray
from hexray_core.replay.dictionary import load_dictionary
from hexray_core.replay.graph import ERROR, FEATURE, LOGIT, TOKEN

REF = Path(__file__).parent / "fixtures" / "reference"
MANIFEST = json.loads((REF / "manifest.json").read_text())
GRAPHS = [(m, name) for m in sorted(MANIFEST["models"]) for name in sorted(MANIFEST["models"][m].get("graphs", {}))]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    from hexray_core.record import Recorder

    out = {}
    for kind, info in MANIFEST["models"].items():
        rec = Recorder(str(REF / info["folder"]), device="cpu")
        out[kind] = rec.record(info["prompt"], tmp_path_factory.mktemp(f"graph-ref-{kind}") / "t.hxr",
                               act_dtype="float32", bundle=True, lens=False).path
    return out


def _their_index(g, ref, i, n, L):
    F = len(ref["feature_nodes"])
    k = int(g.kind[i])
    if k == FEATURE:
        return ref["_feat"][(int(g.layer[i]), int(g.pos[i]), int(g.feature[i]))]
    if k == ERROR:
        return F + int(g.layer[i]) * n + int(g.pos[i])
    if k == TOKEN:
        return F + L * n + int(g.pos[i])
    return F + L * n + n + list(ref["logit_token_ids"]).index(int(g.feature[i]))


@pytest.mark.parametrize("model,name", GRAPHS)
def test_graph_equals_circuit_tracer(traces, model, name):
    ref = dict(np.load(REF / f"graph_{name}.npz"))
    with hexray.open(traces[model]) as t:
        assert t.run(0).tokens == ref["tokens"].tolist()
        g = t.graph(REF / "transcoders" / name)
        n, L = t.run(0).n_tokens, t.n_layers
        assert g.meta["drift"] < 1e-5
        # the features branch's loader gives the same transcoders, hence the same graph
        same = t.graph(load_dictionary(REF / "transcoders" / name))
        assert np.array_equal(same.tgt, g.tgt) and np.array_equal(same.weight, g.weight)
    ref["_feat"] = {tuple(int(v) for v in f): j for j, f in enumerate(ref["feature_nodes"])}
    A = ref["adjacency"].astype(np.float64)
    N = A.shape[0]
    # the same nodes: features (layer, position, feature) with their activations, logits with their probabilities
    assert g.n_nodes == N
    assert sorted(ref["_feat"]) == sorted((int(a), int(b), int(c)) for a, b, c in
                                          zip(g.layer[g.kind == FEATURE], g.pos[g.kind == FEATURE],
                                              g.feature[g.kind == FEATURE], strict=True))
    assert list(g.feature[g.kind == LOGIT]) == ref["logit_token_ids"].tolist()
    np.testing.assert_allclose(g.logit_probs, ref["logit_probabilities"], rtol=1e-4)
    perm = np.array([_their_index(g, ref, i, n, L) for i in range(g.n_nodes)])
    feats = g.kind == FEATURE
    want = ref["activation_values"][perm[feats]]
    np.testing.assert_allclose(g.activation[feats], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # every entry of the adjacency, as a dense matrix here only because the fixture is one
    M = np.zeros((N, N))
    M[perm[g.tgt], perm[g.src]] = g.weight
    scale = np.maximum(np.abs(A).max(1, keepdims=True), 1e-30)
    bad = np.abs(M - A) > 1e-4 * scale
    assert not bad.any(), f"{bad.sum()} of {N * N} entries differ, e.g. {np.argwhere(bad)[:3].tolist()}"
    assert np.count_nonzero(M) == np.count_nonzero(A)
    # the pruned node set (circuit-tracer's prune_graph(0.8, 0.98))
    p = g.prune(0.8, 0.98)
    assert sorted(perm[p.origin].tolist()) == np.nonzero(ref["node_mask"])[0].tolist()
    np.testing.assert_allclose(p.influence, ref["cumulative_scores"][perm[p.origin]], rtol=1e-4, atol=1e-6)


def test_hexray_graph_json_equals_circuit_tracers_own_file(traces, tmp_path, capsys):
    """circuit-tracer's own graph JSON (`create_graph_files`, pruned at 0.8 / 0.98; regenerate with
    `/work/refvenv/bin/python scripts/reference/circuit_tracer_json.py`) against `hexray graph` on the trace of the
    same model, prompt and transcoders: the same nodes (ids and types, circuit-tracer's id collisions included),
    the same links with weights within 1e-4 relative, the same activations and feature influences. HexRay's viewer
    opens both files with the same nodes and links."""
    from hexray.cli.main import main
    from hexray_view import graph as view_graph

    theirs_path = REF / "circuit_tracer_gpt2_plt.json"
    ours_path = tmp_path / "ours.json"
    assert main(["graph", traces["gpt2"], "--transcoders", str(REF / "transcoders" / "gpt2_plt"),
                 "-o", str(ours_path), "--qk", "0"]) == 0
    assert "checked by shapes and hooks only" in capsys.readouterr().err  # a local folder's name is no evidence
    ours, theirs = json.loads(ours_path.read_text()), json.loads(theirs_path.read_text())
    assert ours["metadata"]["prompt_tokens"] == theirs["metadata"]["prompt_tokens"]
    key = lambda n: (n["node_id"], n["feature_type"])  # noqa: E731
    assert sorted(map(key, ours["nodes"])) == sorted(map(key, theirs["nodes"]))
    assert len(theirs["nodes"]) > 30 and {n["feature_type"] for n in theirs["nodes"]} == {
        "embedding", "cross layer transcoder", "mlp reconstruction error", "logit"}
    by_key = {key(n): n for n in theirs["nodes"]}
    for n in ours["nodes"]:
        t = by_key[key(n)]
        if t.get("activation") is not None:
            assert n["activation"] == pytest.approx(t["activation"], rel=1e-5, abs=1e-6)
        if n["feature_type"] == "cross layer transcoder":
            assert n["influence"] == pytest.approx(t["influence"], rel=1e-4, abs=1e-6)
    links = lambda d: sorted((e["source"], e["target"], e["weight"]) for e in d["links"])  # noqa: E731
    a, b = links(ours), links(theirs)
    assert len(a) == len(b) > 300
    for (s1, t1, w1), (s2, t2, w2) in zip(a, b, strict=True):
        assert (s1, t1) == (s2, t2) and w1 == pytest.approx(w2, rel=1e-4, abs=1e-6)
    va, vb = view_graph.load(str(ours_path)), view_graph.load(str(theirs_path))
    assert (len(va["nodes"]), len(va["w"])) == (len(vb["nodes"]), len(vb["w"])) == (len(theirs["nodes"]), len(b))
