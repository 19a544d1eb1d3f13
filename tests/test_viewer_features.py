"""The viewer's features panel (`hexray view --dict`, `hexray report --dict`) in a real browser (Playwright driving
Debian's Chromium): the selected token's strongest features equal `hexray features --json` at that position, and
clicking one colours exactly the tokens where it is active. A dictionary the trace cannot be read through shows its
refusal in the panel. The dictionary is a random SAE for the demo model (SAELens layout, uncentred residual).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file
from viewer_support import Served, hexray, new_page, record_demo, replay_json, require_browser

require_browser(module_level=True)
pytestmark = pytest.mark.slow


def _sae(path, d_in: int, n: int = 160) -> str:
    rng = np.random.default_rng(11)
    os.makedirs(path, exist_ok=True)
    save_file({"W_enc": (rng.standard_normal((d_in, n)) * 0.3).astype(np.float32),
               "W_dec": (rng.standard_normal((n, d_in)) * 0.3).astype(np.float32),
               "b_enc": (rng.standard_normal(n) * 0.5 - 1.5).astype(np.float32),
               "b_dec": np.zeros(d_in, np.float32)}, os.path.join(path, "sae_weights.safetensors"))
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump({"architecture": "standard", "d_in": d_in, "d_sae": n, "dtype": "float32",
                   "apply_b_dec_to_input": True, "normalize_activations": "none",
                   "metadata": {"hook_name": "blocks.2.hook_resid_pre",
                                "model_from_pretrained_kwargs": {"center_writing_weights": False}}}, f)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer-features")
    trace = record_demo(root)
    return trace, _sae(root / "sae", 128), _sae(root / "wide", 96)


def _select(page, action) -> None:
    page.evaluate("delete document.body.dataset.pos")
    action()
    page.wait_for_selector("body[data-pos]", timeout=30_000)


def _check_panel_and_strip(page, trace: str, sae: str, run: int) -> None:
    pos = int(page.get_attribute("body", "data-pos"))
    want = replay_json("features", trace, "--dict", sae, "--run", run, "--position", pos, "--top-k", "10", "--logits",
                       "0")
    want = [(a["label"], f"{a['activation']:.3f}") for layer in want["features"]["layers"] for a in layer["active"]]
    rows = page.eval_on_selector_all("#p-features .feat-row", "rs => rs.map(r => [r.dataset.label, r.dataset.value])")
    assert [tuple(r) for r in rows] == want[:10] and rows
    label = rows[0][0]
    _select(page, lambda: page.click(f"#p-features .feat-row[data-label='{label}']"))
    assert page.get_attribute(f"#p-features .feat-row[data-label='{label}']", "class").endswith(" on")
    coloured = page.eval_on_selector_all("#strip .tok", "ts => ts.map(t => t.style.background !== '')")
    # the feature's activation at every position, from the replay engine (what `hexray features` prints)
    from hexray_core.replay import open_trace
    from hexray_core.replay.dictionary import load_dictionary
    from hexray_core.replay.features import run_features

    layer, feature = (int(x) for x in label[1:].split("F"))
    with open_trace(trace) as tr:
        dense = run_features(tr.run(run), load_dictionary(sae), layer).dense()
    active = (dense[:, feature] != 0).tolist()
    assert coloured == active and 0 < sum(active)
    assert label in page.text_content("#legend")


def test_served_viewer_features_panel_colours_the_strip(browser, setup):
    trace, sae, _ = setup
    server = Served(trace, extra=["--dict", sae])
    try:
        page, errors, _ = new_page(browser, server.url + "#trace=0&run=1&pos=5")
        _check_panel_and_strip(page, trace, sae, 1)
        assert not errors
    finally:
        server.close()


def test_report_embeds_the_features(browser, setup, tmp_path):
    trace, sae, _ = setup
    out = tmp_path / "r.html"
    hexray("report", trace, "--dict", sae, "-o", out, "--detail", "4")
    page, errors, _ = new_page(browser, out.as_uri() + "#trace=0&run=1&pos=3")
    _check_panel_and_strip(page, trace, sae, 1)
    assert not errors


def test_a_dictionary_for_another_model_is_refused_in_the_panel(browser, setup):
    trace, _, wide = setup
    server = Served(trace, extra=["--dict", wide])
    try:
        page, _, _ = new_page(browser, server.url)
        page.wait_for_selector("#features-error", timeout=30_000)
        assert "d_model 128" in page.text_content("#features-error")
    finally:
        server.close()


def test_a_clicked_feature_shows_its_meaning_over_a_dataset(browser, setup):
    trace, sae, _ = setup
    folder = os.path.dirname(trace)
    dataset = os.path.join(folder, "ds") + "/"
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompts-file",
           os.path.join(folder, "prompts.jsonl"), "-o", dataset, "--act-dtype", "float32", "-q")
    server = Served(trace, extra=["--dict", sae, "--dataset", dataset])
    try:
        page, errors, _ = new_page(browser, server.url + "#trace=0&run=0&pos=4")
        label = page.get_attribute("#p-features .feat-row", "data-label")
        page.click(f"#p-features .feat-row[data-label='{label}']")
        page.wait_for_selector("#p-meaning .feat-ctx", timeout=60_000)
        doc = replay_json("features", dataset, "--dict", sae, "--feature", label, "--contexts", "10", "--examples", "2")
        want = doc["feature_stats"]["layers"][0]["features"][0]
        assert page.text_content("#p-meaning h3").startswith(f"{label} over ")
        assert f"({want['n_active']} of " in page.text_content("#meaning-summary")
        shown = page.eval_on_selector_all("#p-meaning .feat-ctx",
                                          "cs => cs.map(c => [c.dataset.id, c.dataset.position])")
        assert shown == [[str(c["id"]), str(c["position"])] for c in want["top_contexts"]] and shown
        assert not errors
    finally:
        server.close()
