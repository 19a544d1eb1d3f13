"""The graph tab in a real browser (Playwright driving Debian's Chromium), on a graph the real `hexray graph` built
from a demo-model trace and random transcoders, with a recorded dataset for the features' top contexts.

Checked against the file and against independent computations: the tab draws one element per node of the JSON;
a clicked feature shows the activation the JSON holds, the top logits of its decoder row through W_U (computed
here from the transcoders' safetensors and the model kit's W_U), and the top contexts `hexray features` prints
for it over the same dataset; hovering the traced attention score shows its query × key split as the JSON holds
it. `hexray report`'s file makes no network request; `hexray view` serves the same tab alone and beside a trace.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from viewer_support import Served, hexray, new_page, require_browser

pytestmark = pytest.mark.slow  # the demo model recorded in subprocesses, a real browser

require_browser(module_level=True)

PROMPT = "The capital of France is Paris. The capital of Germany is"
DATASET = ["The cat sat on the mat. The dog sat on the", "Step 1: The capital of France is Paris.",
           "So the answer is 5, and the cat is here."]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(trace, transcoders folder, dataset folder, graph JSON path, its document)."""
    from hexray_core.replay import open_trace
    from hexray_core.replay.graph import random_transcoders, save_circuit_tracer

    tmp = tmp_path_factory.mktemp("viewer-graph")
    trace = str(tmp / "t.hxr")
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompt", PROMPT, "-o", trace, "-q")
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DATASET))
    ds = str(tmp / "ds") + "/"
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompts-file", prompts, "-o", ds, "-q")
    with open_trace(trace) as t:
        tc = str(tmp / "tc")
        save_circuit_tracer(random_transcoders(t.n_layers, int(t.config["d_model"]), 256, seed=1), tc)
    out = str(tmp / "g.json")
    hexray("graph", trace, "--transcoders", tc, "--dataset", ds, "-o", out)
    with open(out, encoding="utf-8") as f:
        doc = json.load(f)
    return trace, tc, ds, out, doc


def _click(page, selector: str) -> None:
    page.evaluate("delete document.body.dataset.node")
    page.click(selector)
    page.wait_for_selector("body[data-node]", timeout=20_000)


def _hover_arc(page, j: int) -> None:
    """The mouse onto the middle of QK arc j's stroke (its bounding box's centre is off the curve)."""
    x, y = page.evaluate("""j => { const el = document.querySelector(`.qk-hit[data-q='${j}']`);
      el.scrollIntoView({ block: "center", inline: "center" });
      const p = el.getPointAtLength(el.getTotalLength() / 2), m = el.getScreenCTM();
      return [m.a * p.x + m.c * p.y + m.e, m.b * p.x + m.d * p.y + m.f]; }""", j)
    page.mouse.move(x, y)


def _top_logits(trace: str, tc: str, layer: int, feature: int, k: int = 10):
    """The feature's decoder row (from the transcoders' own file) through the kit's W_U, centred as the final
    LayerNorm centres what is written: [(token id, value)] of the k largest."""
    from safetensors.numpy import load_file

    from hexray_core.replay import open_trace

    w = load_file(os.path.join(tc, f"layer_{layer}.safetensors"))["W_dec"][feature].astype(np.float32)
    with open_trace(trace) as t:
        assert t.uses_layernorm
        W_U = np.asarray(t.require_kit("test")["W_U"], np.float32)
    logits = (w - w.mean()) @ W_U
    top = np.argsort(-logits, kind="stable")[:k]
    return [(int(i), float(logits[i])) for i in top]


def _feature_node(doc) -> dict:
    """The most active feature node that has top contexts over the dataset."""
    extra = doc["hexray_features"]
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"
             and extra[f"{n['layer']}_{n['node_id'].split('_')[1]}"]["top_contexts"]]
    assert feats, "no kept feature fired on the dataset"
    return max(feats, key=lambda n: n["activation"])


def test_report_graph_offline_click_and_qk(built, browser, tmp_path):
    trace, tc, ds, path, doc = built
    html = str(tmp_path / "g.html")
    hexray("report", path, "-o", html)
    page, errors, requests = new_page(browser, width=1400)
    url = "file://" + html
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    assert page.eval_on_selector_all(".gnode", "els => els.length") == len(doc["nodes"])
    kinds = page.eval_on_selector_all(".gnode.k-logit", "els => els.length")
    assert kinds == sum(n["feature_type"] == "logit" for n in doc["nodes"])
    assert f"{len(doc['nodes'])} nodes" in page.text_content("#graph-summary")
    assert f"{len(doc['links'])} edges" in page.text_content("#graph-summary")

    node = _feature_node(doc)
    layer, index = int(node["layer"]), int(node["node_id"].split("_")[1])
    _click(page, f".gnode[data-id='{node['node_id']}']")
    assert page.get_attribute("body", "data-node") == node["node_id"]
    assert page.text_content("#gp-label") == f"L{layer}F{index}@{node['ctx_idx']}"
    assert float(page.get_attribute("#gp-activation", "data-value")) == node["activation"]
    shown = page.eval_on_selector_all("#gp-logits .glogit", "els => els.map(e => [Number(e.dataset.token), "
                                      "Number(e.dataset.value)])")
    want = _top_logits(trace, tc, layer, index)
    assert [i for i, _ in shown] == [i for i, _ in want]
    np.testing.assert_allclose([v for _, v in shown], [v for _, v in want], rtol=1e-5, atol=1e-6)
    # the top contexts are those `hexray features` finds for the feature over the same dataset
    cli = json.loads(hexray("features", ds, "--dict", tc, "--feature", f"L{layer}F{index}", "--contexts", "5",
                            "--json").stdout)["feature_stats"]["layers"][0]["features"][0]["top_contexts"]
    ctx = page.eval_on_selector_all("#gp-contexts .gctx", "els => els.map(e => Number(e.dataset.activation))")
    assert ctx and ctx == [c["activation"] for c in cli]
    # incoming edges listed: the node's strongest, with the JSON's weights
    inc = sorted((e for e in doc["links"] if e["target"] == node["node_id"]), key=lambda e: -abs(e["weight"]))
    rows = page.eval_on_selector_all("#gp-in .gedge", "els => els.map(e => Number(e.dataset.weight))")
    np.testing.assert_allclose(rows, [e["weight"] for e in inc[:len(rows)]], rtol=1e-6)
    assert len(rows) == min(12, len(inc))
    page.screenshot(path=str(tmp_path / "graph-node.png"))

    # a traced attention score: hover its arc, the split is the JSON's
    qk = doc["hexray_qk_tracing"][0]
    _hover_arc(page, 0)
    page.wait_for_selector("#graph-qk:not([hidden])", timeout=5_000)
    assert page.get_attribute("body", "data-qk") == "0"
    head = page.text_content("#qk-hover h4")
    assert head == f"L{qk['layer']}H{qk['head']}: query @{qk['query']} ← key @{qk['key']}"
    pairs = page.eval_on_selector_all("#qk-hover .qk-pair", "els => els.map(e => [e.dataset.q, e.dataset.k])")
    assert pairs == [[a, b] for a, b, _ in qk["results"]["pair_wise_contributors"]]
    qside = page.eval_on_selector_all("#qk-hover .qk-q .bar-row", "els => els.map(e => e.dataset.id)")
    assert qside == [a for a, _ in qk["results"]["top_q_marginal_contributors"]]
    recorded = re.search(r"recorded (\S+)\)", page.text_content("#qk-hover .qk-score")).group(1)
    assert float(recorded) == pytest.approx(qk["recorded_score"], rel=1e-3)
    page.screenshot(path=str(tmp_path / "graph-qk.png"))
    # the logit node it is attached to shows the same split in its panel
    target = next(n for n in doc["nodes"] if "qk_tracing_results" in n)
    _click(page, f".gnode[data-id='{target['node_id']}']")
    assert page.eval_on_selector_all("#gp-qk .qk-pair", "els => els.length") == \
        len(target["qk_tracing_results"]["pair_wise_contributors"])
    assert all(r == url for r in requests), requests  # offline: the file itself, nothing else
    assert errors == []
    page.close()


def test_view_serves_the_graph_alone_and_beside_a_trace(built, browser):
    trace, _, _, path, doc = built
    s = Served(path)
    try:
        page, errors, requests = new_page(browser, width=1400)
        page.goto(s.url)
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert page.eval_on_selector_all(".gnode", "els => els.length") == len(doc["nodes"])
        logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
        _click(page, f".gnode[data-id='{logit['node_id']}']")
        assert float(page.get_attribute("#gp-prob", "data-value")) == logit["token_prob"]
        assert errors == [] and all(r.startswith(s.url) for r in requests), (errors, requests)
        page.close()
    finally:
        s.close()
    s = Served(trace, path)  # a trace and its graph: the token view, and a graph tab
    try:
        page, errors, _ = new_page(browser, width=1400)
        page.goto(s.url)
        page.wait_for_selector("body[data-pos]", timeout=20_000)
        page.click("button[data-tab='graph']")
        page.wait_for_selector(".gnode", timeout=20_000)
        assert page.eval_on_selector_all(".gnode", "els => els.length") == len(doc["nodes"])
        assert errors == []
        page.close()
    finally:
        s.close()
