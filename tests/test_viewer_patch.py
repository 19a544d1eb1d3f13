"""The Patching tab: a sweep `hexray patch -o` stored beside its two runs (a tiny GPT-2, resid_pre, 2 layers × 7
positions), read by the viewer's data layer (numpy only) and shown by `hexray view` and `hexray report` as a
layers × positions heatmap whose cells carry the values `hexray patch --json` printed. A malformed sweep in a
trace (a wrong shape, NaN values, no values, nonsense metadata) is one line in the tab, never a crash."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import threading

import numpy as np
import pytest
from hostile_support import load, replace_tensor, write
from viewer_support import Served, hexray, new_page

from hexray_core.errors import HexRayError

CLEAN, CORRUPT = "The fox", "The cat"  # 7 tokens each with the tiny tokenizer; positions 4-6 differ


def _patch(model_dir: str, out, sweep: str) -> dict:
    """`hexray patch ... --json -o out` in this process (the model fixture has paid for torch already)."""
    from hexray.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["patch", "--model", model_dir, "--clean", CLEAN, "--corrupt", CORRUPT, "--sweep", sweep,
                   "--target", "#5", "--baseline", "#7", "-q", "--json", "-o", str(out)])
    assert rc == 0
    return json.loads(buf.getvalue())["patch"]


@pytest.fixture(scope="module")
def resid(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch-view") / "resid.hxr"
    return str(out), _patch(tiny_gpt2_dir, out, "resid_pre")


def _open(path):
    from hexray_core.replay import open_trace

    return open_trace(path)


# -- the data layer -------------------------------------------------------------------------------------------


def test_the_sweep_as_the_viewer_gets_it_is_what_patch_json_printed(resid):
    from hexray_view import data

    path, want = resid
    with _open(path) as t:
        assert data.overview(t, "resid.hxr")["patch"] == [{"index": 0, "sweep": "resid_pre", "metric": want["metric"]}]
        d = data.patch_sweep(t, 0)
        labels = [t.run(0).labels, t.run(1).labels]
    assert d["sweep"] == "resid_pre" and d["axes"] == ["layer", "pos"] and d["columns"] == "pos"
    assert d["rows"] == ["L0", "L1"] and d["row_keys"] == [[0, None], [1, None]]
    assert [d["cols"]["clean"], d["cols"]["corrupt"]] == labels and len(labels[0]) == 7
    assert labels[0][:4] == labels[1][:4] and labels[0][4:] != labels[1][4:]
    np.testing.assert_allclose(d["values"], want["values"], rtol=1e-6, atol=1e-7)  # stored as float32
    np.testing.assert_allclose(d["normalized"], want["normalized"], rtol=1e-5, atol=1e-6)
    assert d["clean"] == {"run": 0, "prompt": CLEAN, "value": want["clean"]["value"]}
    assert d["corrupt"] == {"run": 1, "prompt": CORRUPT, "value": want["corrupt"]["value"]}
    assert d["notes"] == [] and d["metric"] == want["metric"]
    json.dumps(d, allow_nan=False)  # what the server sends
    with _open(path) as t, pytest.raises(HexRayError, match="holds 1 patching sweep.*no sweep 1"):
        data.patch_sweep(t, 1)


def test_heads_by_pos_has_a_row_per_head_of_each_layer(tiny_gpt2_dir, tmp_path):
    from hexray_view import data

    want = _patch(tiny_gpt2_dir, tmp_path / "hbp.hxr", "heads-by-pos")
    with _open(tmp_path / "hbp.hxr") as t:
        d = data.patch_sweep(t, 0)
    v = np.array(want["values"])  # [layer, pos, head]
    assert v.shape == (2, 7, 4)
    assert d["rows"] == [f"L{la}H{h}" for la in range(2) for h in range(4)]
    assert d["row_keys"] == [[la, h] for la in range(2) for h in range(4)] and d["columns"] == "pos"
    for i, (la, h) in enumerate(d["row_keys"]):
        np.testing.assert_allclose(d["values"][i], v[la, :, h], rtol=1e-6, atol=1e-7)


def _rewrite(src: str, dst, *, meta=None, values=None, drop=False) -> str:
    m, runs, tensors = load(src)
    if meta is not None:
        m = meta(m)
    if values is not None:
        tensors = replace_tensor(tensors, "hexray.patch_values", np.asarray(values, dtype=np.float32), run=1)
    if drop:
        tensors = [x for x in tensors if x[1] != "hexray.patch_values"]
    return write(str(dst), m, runs, tensors)


def _with(m, **patch):
    return {**m, "patch": {**m["patch"], **patch}}


HOSTILE = {  # name: (rewrite arguments, the line the viewer shows)
    "wrong shape": ({"values": np.zeros((3, 7))}, r"hexray.patch_values has shape \[3, 7\], but layer × pos of this "
                                                 r"trace \(2 layers, 4 heads, 7 tokens\) is \[2, 7\]"),
    "one axis": ({"values": np.zeros(7)}, r"has shape \[7\], but layer × pos"),
    "no values": ({"drop": True}, r"no run holds its values \(hexray.patch_values\)"),
    "axes": ({"meta": lambda m: _with(m, axes=["layer", "neuron"])}, r"axes \['layer', 'neuron'\] are none of"),
    "not a mapping": ({"meta": lambda m: {**m, "patch": "resid_pre"}}, r"meta\['patch'\] is a str, not a mapping"),
    "axes disagree": ({"meta": lambda m: _with(m, axes=["layer", "head"])}, r"has shape \[2, 7\], but layer × head"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_malformed_sweep_is_one_line_in_the_overview_server_and_report(resid, tmp_path, case):
    from hexray_view import data, report
    from hexray_view.server import ViewServer

    kwargs, line = HOSTILE[case]
    path = _rewrite(resid[0], tmp_path / "bad.hxr", **kwargs)
    with _open(path) as t:
        summary = data.overview(t, "bad.hxr")["patch"]  # the tab is listed: it says what is wrong when opened
        assert len(summary) == 1 and summary[0]["index"] == 0
        with pytest.raises(HexRayError, match=line):
            data.patch_sweep(t, 0)
        embedded = report.build([t], ["bad.hxr"], detail=1)["patch"]["0.0"]
        assert set(embedded) == {"error"} and "\n" not in embedded["error"]
        srv = ViewServer([t], ["bad.hxr"])
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            conn.request("GET", f"/{srv.token}/api/patch?t=0&i=0")
            resp = conn.getresponse()
            body = json.loads(resp.read())
            conn.close()
        finally:
            srv.shutdown()
            srv.server_close()
    assert resp.status == 400 and body["error"] == embedded["error"]


def test_nan_values_and_an_unknown_clean_value_are_shown_not_fatal(resid, tmp_path):
    from hexray_view import data

    v = np.array(resid[1]["values"], dtype=np.float32)
    v[1, 2], v[0, 6] = np.nan, np.inf
    path = _rewrite(resid[0], tmp_path / "nan.hxr", values=v)
    with _open(path) as t:
        d = data.patch_sweep(t, 0)
    assert d["values"][1][2] is None and d["values"][0][6] is None and d["normalized"][1][2] is None
    assert d["values"][1][3] == pytest.approx(float(v[1, 3]))
    assert d["notes"] == ["2 of 14 values are not finite numbers (NaN or ±inf): shown as —"]
    json.dumps(d, allow_nan=False)
    path = _rewrite(resid[0], tmp_path / "noclean.hxr",
                    meta=lambda m: _with(m, clean={**m["patch"]["clean"], "value": float("nan")}))
    with _open(path) as t:
        d = data.patch_sweep(t, 0)
    assert d["clean"]["value"] is None and all(x is None for row in d["normalized"] for x in row)
    assert d["notes"][0].startswith("the clean and corrupt metric values are not both known")


# -- in a real browser ----------------------------------------------------------------------------------------


def _open_tab(page) -> None:
    page.click("button[data-tab='patch']")
    page.wait_for_selector("body[data-patch]", timeout=20_000)


def _assert_heatmap_is_the_sweep(page, want: dict, labels: list[list[str]]) -> None:
    assert page.get_attribute("body", "data-patch") == "0.0"
    cells = page.eval_on_selector_all(".patch-grid .hm-cell", "cs => cs.map(c => [Number(c.dataset.layer), "
                                      "Number(c.dataset.pos), c.dataset.raw, c.dataset.norm, c.textContent])")
    values, norm = np.array(want["values"]), np.array(want["normalized"])
    assert len(cells) == values.size == 2 * 7  # layers × positions
    assert sorted((la, p) for la, p, *_ in cells) == [(la, p) for la in range(2) for p in range(7)]
    for la, p, raw, nv, text in cells:
        assert float(raw) == pytest.approx(values[la, p], rel=1e-6, abs=1e-7)
        assert float(nv) == pytest.approx(norm[la, p], rel=1e-5, abs=1e-6)
        assert text == f"{norm[la, p] + 0.0:+.2f}"  # (+ 0.0: Python prints -0.0 as -0.00, JavaScript as 0.00)
    rows = page.eval_on_selector_all(".patch-grid .hm-row", "rs => rs.map(r => r.textContent)")
    cols = page.eval_on_selector_all(".patch-grid .hm-col", "cs => cs.map(c => c.textContent)")
    assert rows == ["L0", "L1"]
    quote = json.dumps  # as the CLI quotes a token
    assert cols == [quote(c) if c == x else f"{quote(c)}/{quote(x)}" for c, x in zip(*labels, strict=True)]
    # a cell clicked shows its raw value as `hexray patch --json` printed it, and the run's metric values
    la, p = 0, 4
    page.click(f".patch-grid .hm-cell[data-layer='{la}'][data-pos='{p}']")
    assert page.text_content("#patch-raw") == f"{values[la, p]:+.4f}"
    assert page.text_content("#patch-norm") == f"{norm[la, p]:+.2f}"
    text = page.text_content("#patch-cell")
    assert f"clean {want['clean']['value']:+.4f} · corrupt {want['corrupt']['value']:+.4f}" in text
    assert f"sweep resid_pre · metric {want['metric']}" in text and f"L{la} · position {p}" in text
    assert "L0" in page.get_attribute(f".hm-cell[data-layer='{la}'][data-pos='{p}']", "title")


@pytest.mark.slow
def test_served_view_and_report_show_the_sweep(browser, resid, tmp_path):
    path, want = resid
    with _open(path) as t:
        labels = [t.run(0).labels, t.run(1).labels]
    s = Served(path)
    try:
        page, errors, _ = new_page(browser, s.url)  # a sweep's trace opens on its heatmap
        page.wait_for_selector("body[data-patch]", timeout=20_000)
        assert page.eval_on_selector_all("button.tab.on", "bs => bs.map(b => b.dataset.tab)") == ["patch"]
        _assert_heatmap_is_the_sweep(page, want, labels)
        tokens, _, _ = new_page(browser, s.url + "#tab=tokens")  # unless the URL names another tab
        tokens.wait_for_selector("body[data-pos]", timeout=20_000)
        assert tokens.eval_on_selector_all("button.tab.on", "bs => bs.map(b => b.dataset.tab)") == ["tokens"]
        page.screenshot(path=str(tmp_path / "patch-served.png"), full_page=True)
        assert errors == []
    finally:
        s.close()
    out = tmp_path / "resid.html"
    hexray("report", path, "-o", out)
    page, errors, requests = new_page(browser, out.as_uri())
    _open_tab(page)
    _assert_heatmap_is_the_sweep(page, want, labels)
    page.screenshot(path=str(tmp_path / "patch-report.png"), full_page=True)
    assert errors == [] and requests == [out.as_uri()]


@pytest.mark.slow
def test_report_of_two_sweeps_selects_each_and_shows_what_is_wrong(browser, resid, tmp_path):
    """Two traces, two sweeps: the menu lists both; a wrong shape is its one line, a NaN cell a dash."""
    from hexray_view import report

    bad = _rewrite(resid[0], tmp_path / "bad.hxr", values=np.zeros((3, 7)))
    v = np.array(resid[1]["values"], dtype=np.float32)
    v[1, 2] = np.nan
    nan = _rewrite(resid[0], tmp_path / "nan.hxr", values=v)
    report.write([bad, nan], str(tmp_path / "two.html"), detail=2)
    page, errors, _ = new_page(browser, (tmp_path / "two.html").as_uri())
    _open_tab(page)
    assert page.get_attribute("body", "data-patch") == "error"
    assert "hexray.patch_values has shape [3, 7]" in page.text_content("#patch-error")
    assert page.eval_on_selector_all("#patch-select option", "os => os.map(o => o.textContent)") == [
        f"bad.hxr: resid_pre · {resid[1]['metric']}", f"nan.hxr: resid_pre · {resid[1]['metric']}"]
    page.evaluate("delete document.body.dataset.patch")
    page.select_option("#patch-select", "1")
    page.wait_for_selector("body[data-patch='1.0']", timeout=20_000)
    assert page.text_content(".hm-cell[data-layer='1'][data-pos='2']") == "—"
    assert page.text_content(".hm-cell[data-layer='1'][data-pos='3']") == f"{resid[1]['normalized'][1][3] + 0.0:+.2f}"
    assert "1 of 14 values are not finite" in page.text_content(".patch-note") and errors == []


@pytest.mark.slow
def test_no_patching_tab_without_a_sweep(browser, resid, tmp_path):
    from hexray_view import report

    plain = _rewrite(resid[0], tmp_path / "plain.hxr", meta=lambda m: {k: v for k, v in m.items() if k != "patch"},
                     drop=True)
    report.write([plain], str(tmp_path / "plain.html"), detail=2)
    page, errors, _ = new_page(browser, (tmp_path / "plain.html").as_uri())
    assert page.eval_on_selector_all("button.tab", "bs => bs.map(b => b.dataset.tab)") == ["tokens", "cot", "diff"]
    assert errors == []
