"""A graph JSON for the viewer (hexray_view/graph.py): what `hexray graph` writes converts whole, and a bad or
hostile file is one line from `hexray view` / `hexray report`, non-zero exit, read within a bounded size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hexray_core.errors import HexRayError
from hexray_view import graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc(**over) -> dict:
    nodes = [
        {"node_id": "E_5_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "jsNodeId": "E_5-0",
         "clerp": 'Emb: "a"'},
        {"node_id": "0_7_0", "feature": 35, "layer": "0", "ctx_idx": 0, "feature_type": "cross layer transcoder",
         "jsNodeId": "0_7-0", "clerp": "", "activation": 1.5, "influence": 0.4},
        {"node_id": "0_0_0", "feature": -1, "layer": "0", "ctx_idx": 0, "feature_type": "mlp reconstruction error",
         "jsNodeId": "0_0-0", "clerp": ""},
        {"node_id": "2_9_0", "feature": 9, "layer": "2", "ctx_idx": 0, "feature_type": "logit", "jsNodeId": "L_9-0",
         "clerp": 'Output " b" (p=0.500)', "token_prob": 0.5, "is_target_logit": True},
    ]
    links = [{"source": "E_5_0", "target": "0_7_0", "weight": 0.25}, {"source": "0_7_0", "target": "2_9_0",
                                                                       "weight": -1.0}]
    doc = {"metadata": {"slug": "s", "scan": "m", "prompt_tokens": ["a"], "prompt": "a"},
           "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
           "nodes": nodes, "links": links,
           "hexray_features": {"0_7": {"top_logits": [[9, " b", 2.0]], "bottom_logits": [[3, "c", -1.0]]}}}
    doc.update(over)
    return doc


def _write(tmp_path, obj, name="g.json") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_a_graph_converts_with_rows_labels_and_index_links(tmp_path):
    from hexray_core.replay.graph.neuronpedia import validate

    doc = _doc()
    validate(doc)  # the extra key keeps the file Neuronpedia's
    path = _write(tmp_path, doc)
    assert graph.is_graph(path)
    v = graph.load(path)
    assert [n["label"] for n in v["nodes"]] == ['"a"@0', "L0F7@0", "MLP L0 error@0", 'logit " b"']
    assert [n["row"] for n in v["nodes"]] == [0, 1, 1, 3]  # embeddings lowest, logits on top
    assert (v["src"], v["tgt"], v["w"]) == ([0, 1], [1, 3], [0.25, -1.0])
    assert v["nodes"][1]["fkey"] == "0_7" and v["features"]["0_7"]["top_logits"] == [[9, " b", 2.0]]
    assert v["nodes"][1]["activation"] == 1.5 and v["nodes"][3]["prob"] == 0.5


def _one_line_refusal(*cmd) -> str:
    p = subprocess.run([sys.executable, "-m", "hexray", *map(str, cmd)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and p.stdout == "", (p.returncode, p.stderr)
    return p.stderr


BAD = [
    ("{\"nodes\": [", "not JSON (Expecting"),
    ("[1, 2]", "not a graph JSON"),
    ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    (_doc(nodes={"a": 1}), "nodes: expected list"),
    (_doc(links=[{"source": "E_5_0", "target": "nowhere", "weight": 1.0}]), "target 'nowhere' is not a node"),
    (_doc(links=[{"source": "E_5_0", "target": "0_7_0", "weight": "x"}]), "links[0].weight: expected number"),
    (_doc(metadata={"prompt_tokens": "abc"}), "metadata.prompt_tokens: expected list"),
    (_doc(hexray_features={"0_7": {"top_logits": [["x"]]}}), "top_logits: expected [[token id"),
    # integers no float holds: 1e400 written out (a weight, a top logit's value), and one Python will not parse
    (json.dumps(_doc()).replace('"weight": 0.25', '"weight": 1' + "0" * 400), "links[0].weight: not a finite number"),
    (_doc(hexray_features={"0_7": {"top_logits": [[9, " b", 10 ** 400]]}}), "top_logits: expected [[token id"),
    ('{"metadata": {}, "n": 1' + "0" * 5000 + "}", "not JSON (an integer of 5,001 digits"),
]


@pytest.mark.parametrize("content,words", BAD, ids=[w.split(":")[0][:24] for _, w in BAD])
def test_a_bad_graph_is_one_line(tmp_path, content, words):
    path = _write(tmp_path, content)
    with pytest.raises(HexRayError) as e:
        graph.load(path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_non_finite_numbers_and_oversized_files(tmp_path):
    path = _write(tmp_path, json.dumps(_doc()).replace('"weight": 0.25', '"weight": NaN'))
    with pytest.raises(HexRayError, match=r"links\[0\]\.weight: not a finite number"):
        graph.load(path)
    many = _write(tmp_path, '{"nodes": [' + "{}," * (graph.MAX_CONTAINERS + 1) + "{}]}", "many.json")
    with pytest.raises(HexRayError, match="JSON objects and arrays, more than"):
        graph.read(many)  # refused before parsing: a million empty objects would cost Python ~100 MB
    values = _write(tmp_path, '{"nodes": [' + "1," * (graph.MAX_SEPARATORS + 1) + "1]}", "values.json")
    with pytest.raises(HexRayError, match="JSON values, more than"):
        graph.read(values)
    big = _write(tmp_path, _doc(), "big.json")
    with pytest.raises(HexRayError, match="over 100 bytes"):
        graph.read(big, limit=100)  # the limit is read, not the file: memory stays bounded


@pytest.mark.slow  # subprocesses (the CLI)
def test_view_and_report_refuse_a_bad_graph_in_one_line(tmp_path):
    bad = _write(tmp_path, _doc(links=[{"source": "E_5_0", "target": "zz", "weight": 1.0}]))
    assert "not a node of the graph" in _one_line_refusal("report", bad, "-o", tmp_path / "r.html")
    assert "not a node of the graph" in _one_line_refusal("view", bad, "--no-browser")
    assert not os.path.exists(tmp_path / "r.html")
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)  # never blocks: not a regular file, left to the trace reader's one line
    assert "pipe.json" in _one_line_refusal("report", fifo, "-o", tmp_path / "r.html")
    good = _write(tmp_path, _doc(), "ok.json")
    p = subprocess.run([sys.executable, "-m", "hexray", "report", good, "-o", tmp_path / "ok.html"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert '"src":[0,1]' in (tmp_path / "ok.html").read_text()
