"""The viewer in a real browser (Playwright driving Debian's Chromium): `hexray report`'s file, the
page `hexray view` serves, and a notebook cell. Each loads with no console error and no network
request (beyond the loopback server), shows the prompt's tokens and the figures `hexray replay
--json` prints, and a click or an arrow key moves the selection. Screenshots go to the test's tmp folder.
"""

from __future__ import annotations

import html
import json

import pytest
from viewer_support import Served, hexray, new_page, record_demo, replay_json, require_browser, wait_for

pytestmark = pytest.mark.slow  # a real browser, and the demo model recorded in a subprocess per test

require_browser(module_level=True)


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory):
    return record_demo(tmp_path_factory.mktemp("viewer-browser"))


class Page:
    """A page that records console errors and every request it makes."""

    def __init__(self, browser):
        self.page, self.errors, self.requests = new_page(browser)

    def open(self, url: str):
        self.page.goto(url)
        self.page.wait_for_selector("body[data-pos]", timeout=20_000)
        return self.page

    def selected(self) -> int:
        return int(self.page.get_attribute("body", "data-pos"))

    def select(self, action) -> None:
        """Do something that changes the selection and wait until the panels show it."""
        self.page.evaluate("delete document.body.dataset.pos")
        action()
        self.page.wait_for_selector("body[data-pos]", timeout=20_000)


def strip_text(page) -> list[str]:
    return page.eval_on_selector_all("#strip .tok", "els => els.map(e => e.dataset.i)")


def assert_panels_match_replay(page, trace: str, pos: int) -> None:
    cli = replay_json("replay", trace, "--position", pos, "--top-k", 1000)["attribution"]
    shown = page.eval_on_selector_all("#p-dla .bar-row", "rows => rows.map(r => [r.dataset.label, "
                                      "r.querySelector('.val').textContent])")
    assert shown == [[c["label"], f"{c['value']:+.2f}"] for c in cli["contributions"]]
    assert page.text_content("#dla-target").startswith(f"target {json.dumps(cli['target'], ensure_ascii=False)}")
    preds = page.eval_on_selector_all("#p-pred tr.pred", "rows => rows.map(r => [r.querySelector('.tok-cell')"
                                      ".textContent, r.querySelector('.logit').textContent])")
    assert preds[0] == [json.dumps(cli["target"], ensure_ascii=False), f"{cli['logit']:+.2f}"]
    heads = replay_json("replay", trace, "--position", pos, "--by", "head", "--top-k", 1000)["attribution"]
    cells = dict(page.eval_on_selector_all("#p-heads .hm-cell",
                                           "cs => cs.map(c => [c.dataset.label, c.dataset.value])"))
    for c in heads["contributions"]:
        if c["kind"] == "head":
            assert cells[c["label"]] == f"{c['value']:+.2f}"
    neurons = replay_json("replay", trace, "--position", pos, "--by", "neuron", "--top-k", 40)["attribution"]["top"]
    shown_neurons = page.eval_on_selector_all("#p-neurons .bar-row", "rows => rows.map(r => [r.dataset.label, "
                                              "r.querySelector('.val').textContent])")
    assert shown_neurons == [[c["label"], f"{c['value']:+.2f}"] for c in neurons if c["kind"] == "neuron"][:10]
    from hexray_core.replay import open_trace
    from hexray_core.replay.sources import source_attribution

    with open_trace(trace) as t:
        top = source_attribution(t, position=pos).top_sources(12)
    shown_sources = page.eval_on_selector_all("#p-source .bar-row", "rows => rows.map(r => [Number(r.dataset.pos), "
                                              "r.querySelector('.val').textContent])")
    assert shown_sources == [[s, f"{v:+.2f}"] for s, v, _ in top]
    underlined = page.eval_on_selector_all("#strip .tok.src", "els => els.map(e => Number(e.dataset.i))")
    assert sorted(underlined) == sorted(s for s, _, _ in top)
    lens = replay_json("replay", trace, "--position", pos, "--lens")["lens"]
    cells = page.eval_on_selector_all(f"#p-lens .hm-cell[data-pos='{pos}']", "cs => cs.map(c => [c.dataset.layer, "
                                      "c.dataset.prob])")
    assert cells == [[x["label"], f"{x['target_prob']:.2%}"] for x in lens["layers"]]


def test_report_offline_figures_and_selection(browser, demo_trace, tmp_path):
    out = tmp_path / "report.html"
    hexray("report", demo_trace, "-o", out, "--detail", 60)
    p = Page(browser)
    page = p.open(out.as_uri())
    run0 = replay_json("replay", demo_trace, "--resid")["resid"]["tokens"]
    texts = page.eval_on_selector_all("#strip .tok", "els => els.map(e => e.textContent)")
    assert len(texts) == len(run0)
    assert "".join(texts).replace("\u00a0", " ").replace("↵", "\n") == "<|endoftext|>" + \
        "Step 1: The capital of France is Paris.\nStep 2: The capital of Germany is Berlin.\nSo the answer is"
    last = len(run0) - 1
    assert p.selected() == last
    assert_panels_match_replay(page, demo_trace, last)
    page.screenshot(path=str(tmp_path / "report-last.png"), full_page=True)

    p.select(lambda: page.click("#strip .tok[data-i='7']"))
    assert p.selected() == 7 and "sel" in page.get_attribute("#strip .tok[data-i='7']", "class").split()
    assert page.eval_on_selector_all("#strip .tok.sel", "els => els.map(e => e.dataset.i)") == ["7"]
    assert_panels_match_replay(page, demo_trace, 7)
    p.select(lambda: page.keyboard.press("ArrowRight"))
    assert p.selected() == 8
    assert_panels_match_replay(page, demo_trace, 8)
    p.select(lambda: page.keyboard.press("ArrowLeft"))
    p.select(lambda: page.keyboard.press("ArrowLeft"))
    assert p.selected() == 6
    page.screenshot(path=str(tmp_path / "report-6.png"), full_page=True)

    # token 5 is coloured by MLP L0's attribution to its own logit, predicted at position 4
    nxt = replay_json("replay", demo_trace, "--position", 4, "--target", "next", "--top-k", 1000)["attribution"]
    mlp0 = next(c for c in nxt["contributions"] if c["kind"] == "mlp" and c["layer"] == 0)
    page.select_option("#colour-select", mlp0["label"])
    wait_for(lambda: page.text_content("#legend").startswith("green"))  # (wait_for_function would eval: CSP)
    page.hover("#strip .tok[data-i='5']")  # titles are made on hover
    assert f"{mlp0['label']} → this token: {mlp0['value']:+.2f}" in page.get_attribute("#strip .tok[data-i='5']",
                                                                                       "title")

    page.click("button[data-tab='cot']")
    page.wait_for_selector("#cot .step")
    cot = replay_json("replay", demo_trace, "--cot")["cot"]
    heads = page.eval_on_selector_all("#cot .step-head", "els => els.map(e => e.textContent)")
    assert heads == [f"Step {s['index'] + 1}: {s['text']}" for s in cot["steps"]]
    page.screenshot(path=str(tmp_path / "report-cot.png"), full_page=True)

    page.click("button[data-tab='diff']")
    page.wait_for_selector("#diff-out .diff-row")
    cli = json.loads(hexray("diff", demo_trace, "--runs", "0", "1", "--json", "--top-k", 20).stdout)
    rows = page.eval_on_selector_all("#diff-out .diff-row", "rs => rs.map(r => [r.dataset.label, "
                                     "r.querySelector('.delta').textContent])")
    assert rows == [[r["label"], f"{r['delta']:+.2f}"] for r in cli["rows"]]
    page.screenshot(path=str(tmp_path / "report-diff.png"), full_page=True)

    assert p.errors == []
    assert p.requests == [out.as_uri()]  # the file itself, nothing else


def test_served_view_lazy_figures_and_selection(browser, demo_trace, tmp_path):
    s = Served(demo_trace)
    try:
        p = Page(browser)
        page = p.open(s.url)
        n = len(page.eval_on_selector_all("#strip .tok", "els => els"))
        assert p.selected() == n - 1
        assert_panels_match_replay(page, demo_trace, n - 1)
        for pos in (3, 29):  # any position: details are computed on demand
            p.select(lambda pos=pos: page.click(f"#strip .tok[data-i='{pos}']"))
            assert p.selected() == pos
            assert_panels_match_replay(page, demo_trace, pos)
        p.select(lambda: page.keyboard.press("ArrowLeft"))
        assert p.selected() == 28
        assert_panels_match_replay(page, demo_trace, 28)
        # a click on a head of the attention grid shows that head's pattern rows
        p.select(lambda: page.click("#p-attn .focus .hm-cell[data-label='L1H2']"))
        assert page.text_content("#head-rows h4").startswith("L1H2 from")
        assert page.query_selector("#head-rows .pattern") is not None
        page.screenshot(path=str(tmp_path / "served.png"), full_page=True)

        page.select_option("#run-select", "1")
        run1 = len(replay_json("replay", demo_trace, "--run", 1, "--resid")["resid"]["tokens"])
        wait_for(lambda: len(page.query_selector_all("#strip .tok")) == run1)
        page.wait_for_selector("body[data-pos]")
        page.click("button[data-tab='diff']")
        page.wait_for_selector("#diff-out .diff-row")
        assert p.errors == []
        assert p.requests and all(u.startswith(f"http://127.0.0.1:{s.port}/{s.token}/") for u in p.requests)
    finally:
        s.close()


def test_notebook_repr_renders_inline(browser, demo_trace, tmp_path):
    import hexray

    t = hexray.open(demo_trace)
    markup = t._repr_html_()
    assert markup.startswith("<iframe") and 'sandbox="allow-scripts"' in markup
    shown = t.run(1).show(position=4)
    assert "iframe" in shown._repr_html_()
    p = Page(browser)
    page = p.page
    page.set_content(f"<html><body><h1>notebook</h1>{shown._repr_html_()}</body></html>")
    frame = page.frames[1]
    frame.wait_for_selector("body[data-pos]", timeout=20_000)
    assert frame.get_attribute("body", "data-pos") == "4"
    texts = frame.eval_on_selector_all("#strip .tok", "els => els.map(e => e.textContent)")
    assert "".join(texts).replace("\u00a0", " ") == "<|endoftext|>The cat sat on the mat. The dog sat on the"
    cli = replay_json("replay", demo_trace, "--run", 1, "--position", 4, "--top-k", 1000)["attribution"]
    shown_rows = frame.eval_on_selector_all("#p-dla .bar-row", "rows => rows.map(r => r.querySelector('.val')"
                                            ".textContent)")
    assert shown_rows == [f"{c['value']:+.2f}" for c in cli["contributions"]]
    page.screenshot(path=str(tmp_path / "notebook.png"), full_page=True)
    assert p.errors == [] and all(u in ("about:blank", "about:srcdoc") for u in p.requests)
    assert html.unescape(markup).count("<script") >= 2


def test_a_long_strip_in_blocks_reads_as_one_text_and_scrolls_to_the_selection(browser, tmp_path):
    """Past ~200 tokens the strip is cut into content-visibility blocks (app.ts buildStrip): each ends where a
    line does, every token is there once in order, and the selection scrolls into view from any block."""
    lines = [f"Line {i}: the cat sat on the mat and the dog ran to the park." for i in range(20)]
    path = tmp_path / "long.hxr"
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompt", "\n".join(lines), "-o", path, "-q")
    s = Served(path)
    p = Page(browser)
    try:
        page = p.open(s.url)
        blocks = page.eval_on_selector_all("#strip .strip-block", "bs => bs.map(b => [...b.querySelectorAll("
                                           "'.tok')].map(t => Number(t.dataset.i)))")
        assert len(blocks) >= 2
        assert [i for b in blocks for i in b] == list(range(sum(map(len, blocks))))
        run = replay_json("info", path)["runs"][0]
        assert sum(map(len, blocks)) == run["n_tokens"]
        # every block but the last ends with a token that ends a line (its ↵ and <br>)
        assert all(page.inner_html(f"#strip .tok[data-i='{b[-1]}']").endswith("<br>") for b in blocks[:-1])

        def in_view(i: int) -> bool:
            return page.evaluate(f"""(() => {{ const s = document.getElementById('strip').getBoundingClientRect();
                const t = document.querySelector("#strip .tok[data-i='{i}']").getBoundingClientRect();
                return t.top >= s.top && t.bottom <= s.bottom; }})()""")

        last = run["n_tokens"] - 1
        assert p.selected() == last and in_view(last)  # opened on the last token, in the last block
        page.evaluate("document.getElementById('strip').scrollTop = 0")
        page.focus("#strip")
        p.select(lambda: page.keyboard.press("ArrowLeft"))
        assert p.selected() == last - 1 and in_view(last - 1)  # scrolled back down to it
        mid = blocks[1][len(blocks[1]) // 2]
        page.evaluate(f"document.querySelector(\"#strip .tok[data-i='{mid}']\").scrollIntoView({{block: 'center'}})")
        before = page.evaluate("document.getElementById('strip').scrollTop")
        p.select(lambda: page.click(f"#strip .tok[data-i='{mid}']"))
        assert p.selected() == mid and in_view(mid)
        assert page.evaluate("document.getElementById('strip').scrollTop") == before  # in view: no jump
        page.screenshot(path=str(tmp_path / "long-strip.png"))
        assert not p.errors, p.errors
    finally:
        p.page.close()
        s.close()


STRIP_GEOMETRY = """(() => {
    const s = document.getElementById('strip'), box = s.getBoundingClientRect();
    const toks = [...s.querySelectorAll('.tok')].map(t => t.getBoundingClientRect());
    return {scroll: s.scrollWidth, client: s.clientWidth, right: Math.max(...toks.map(t => t.right)),
            boxRight: box.right, lines: new Set(toks.map(t => Math.round(t.top + s.scrollTop))).size}; })()"""


def token_in_view(page, i: int) -> bool:
    """Token i lies wholly inside the strip's box, both ways."""
    return page.evaluate(f"""(() => {{ const s = document.getElementById('strip').getBoundingClientRect();
        const t = document.querySelector("#strip .tok[data-i='{i}']").getBoundingClientRect();
        return t.top >= s.top && t.bottom <= s.bottom && t.left >= s.left && t.right <= s.right; }})()""")


def test_a_one_line_strip_wraps_shows_text_and_keeps_the_selection_in_view(browser, tmp_path):
    """A prompt with no line break, far wider than the panel, wraps inside the strip at every window size (no
    token clipped, nothing to scroll sideways), reads as its text (Café and emoji, not byte escapes), and the
    selection scrolls into view (issue 25: a 488-token line was 16,380 px wide in a 1,358 px panel)."""
    prompt = " ".join(["Café au lait 🍕 and tea 🫖 at the inn, said Emma."] * 12)
    path, out = tmp_path / "line.hxr", tmp_path / "line.html"
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompt", prompt, "-o", path, "-q")
    hexray("report", path, "-o", out)
    n = replay_json("info", path)["runs"][0]["n_tokens"]
    for width, height in ((700, 300), (1024, 600), (1600, 900)):
        p = Page(browser)
        p.page.set_viewport_size({"width": width, "height": height})
        try:
            page = p.open(out.as_uri())
            geometry = page.evaluate(STRIP_GEOMETRY)
            assert geometry["scroll"] <= geometry["client"], (width, geometry)  # nothing hidden to the right
            assert geometry["right"] <= geometry["boxRight"], (width, geometry)  # no token clipped
            assert geometry["lines"] >= 3, (width, geometry)  # it wrapped
            text = page.evaluate("document.getElementById('strip').textContent")
            assert text.endswith(prompt), text[-200:]  # the prompt's own text, after the BOS token
            assert "\\x" not in text and "Café" in text and "🍕" in text and "🫖" in text
            assert p.selected() == n - 1 and token_in_view(page, n - 1)
            page.evaluate("document.getElementById('strip').scrollTop = 0")
            page.focus("#strip")
            p.select(lambda page=page: page.keyboard.press("ArrowLeft"))
            assert p.selected() == n - 2 and token_in_view(page, n - 2)
            page.screenshot(path=str(tmp_path / f"line-{width}x{height}.png"))
            assert not p.errors, p.errors
        finally:
            p.page.close()
