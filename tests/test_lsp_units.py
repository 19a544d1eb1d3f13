"""Unit tests of the language server's pure parts (no server process, no torch).

Line index against an independent reference (hypothesis), settings, rendering, the per-token
figures of `trace_view` against the replay engine, trace location and staleness, inlay-hint
building, diagnostics, the pre-serialised response path, and the record worker's protocol.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lsp_support import position_of, write_synthetic_trace

from hexray_lsp import settings as settings_mod
from hexray_lsp.diagnostics import compute as compute_diagnostics
from hexray_lsp.documents import Document, is_served, unusable_reason
from hexray_lsp.inlay_hints import build_hints, hints_in
from hexray_lsp.line_index import LineIndex, units
from hexray_lsp.protocol import HexRayProtocol, RawJSON
from hexray_lsp.render import bytes_text, pct, quote, table, width
from hexray_lsp.trace_view import TraceUnreadable, build_view, common_prefix
from hexray_lsp.traces import TraceStore, cache_path, candidate_paths, record_path

ENCS = ("utf-8", "utf-16", "utf-32")
TEXT = "The capital of France is Paris 🙂 and\r\nthe model 😀 predicts naïve cafe\u0301 東京\rok\n"

# -- line index ------------------------------------------------------------------------------------

_ALPHABET = ["a", "b", " ", "é", "e\u0301", "😀", "東", "👨\u200d👩", "\r", "\n", "\r\n", "\u2028", "\x0c", "\x85",
             "\t"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=30), st.sampled_from(ENCS))
def test_line_index_matches_reference(pieces, enc):
    text = "".join(pieces)
    idx = LineIndex(text, enc)
    offsets = list(range(len(text) + 1))
    lines, cols = idx.positions(offsets)
    for off in offsets:
        expect = position_of(text, off, enc)
        assert idx.position(off) == expect
        assert (int(lines[off]), int(cols[off])) == expect
        if text[off - 1:off + 1] != "\r\n":
            assert idx.offset(*expect) == off


@pytest.mark.parametrize("enc", ENCS)
def test_line_index_edges(enc):
    text = "a\u2028b😀c\x0cd\ne😀f\r\ng"
    idx = LineIndex(text, enc)
    assert idx.line_count == 3  # U+2028 and form feed are not LSP line breaks
    f = text.index("f")
    assert idx.position(f) == (1, units("e😀", enc))
    assert idx.offset(1, units("e😀", enc)) == f
    emoji = text.index("😀", 5)
    if enc != "utf-32":  # a column inside the emoji means the emoji
        assert idx.offset(1, units("e", enc) + 1) == emoji
        assert idx.offset_ceil(1, units("e", enc) + 1) == emoji + 1
    assert idx.offset(0, 10_000) == text.index("\n")  # past the end of a line: its end
    assert idx.offset(99, 0) == len(text)
    assert idx.offset(-1, 0) == 0
    assert idx.position(10_000) == (2, 1)


def test_units():
    assert [units("😀", e) for e in ENCS] == [4, 2, 1]
    assert [units("ï", e) for e in ENCS] == [2, 1, 1]
    assert [units("e\u0301", e) for e in ENCS] == [3, 2, 2]


# -- settings ----------------------------------------------------------------------------------------

def test_settings_defaults_and_shapes():
    s, problems = settings_mod.parse(None)
    assert s == settings_mod.Settings() and problems == []
    s, problems = settings_mod.parse({"hexray": {"inlayHints": "surprisal", "hover": {"predictions": 8},
                                                 "hover.contributors": 2, "recordOnSave": True, "unknown": 1}})
    assert (s.inlay_hints, s.hover_predictions, s.hover_contributors, s.record_on_save) == ("surprisal", 8, 2, True)
    assert problems == []
    s, _ = settings_mod.parse({"settings": {"hexray": {"filePatterns": "*.txt"}}})
    assert s.file_patterns == ("*.txt",)
    s, _ = settings_mod.parse({"extraPaths": ["/x"], "recordOptions": {"top_k": 5}})
    assert s.extra_paths == ("/x",) and s.record_options == {"top_k": 5}


def test_bad_settings_fall_back_and_say_so():
    s, problems = settings_mod.parse({"inlayHints": "loud", "surpriseThreshold": 2, "recordOnSave": "yes",
                                      "modelFactory": "no_colon", "hover": {"predictions": -1},
                                      "maxDocumentBytes": 10, "model": ""})
    assert s == settings_mod.Settings()
    assert len(problems) == 7
    assert any("inlayHints" in p and "'probability'" in p for p in problems)
    _, problems = settings_mod.parse([1, 2])
    assert problems and "object" in problems[0]
    assert settings_mod.Settings().to_json()["hover.predictions"] == 5


# -- rendering --------------------------------------------------------------------------------------

def test_quote_and_bytes():
    assert quote(" Paris") == '" Paris"'
    assert quote("a\nb\u2028\x0c") == '"a\\nb\\u2028\\f"'
    assert quote("👨\u200d👩") == '"👨\u200d👩"'  # ZWJ sequences stay whole
    assert quote(bytes_text(" 🍕".encode()[:3])) == '" \\xF0\\x9F"'
    assert pct(0.4213) == "42%" and pct(0.031) == "3.1%" and pct(1e-6) == "<0.01%" and pct(float("nan")) == "–"


def test_table_lines_up_with_wide_characters():
    rows = table(["#", "token"], [["1", '"東京"'], ["2", '"ab"'], ["3", "a|b"]], "rl")
    assert len({width(r) for r in rows}) == 1
    assert "a\\|b" in rows[-1]


# -- trace view vs the replay engine ----------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_trace(tmp_path_factory.mktemp("syn") / "t.hxr", TEXT)


def test_view_matches_replay_attribution(synthetic):
    view = build_view(synthetic)
    rv = view.runs[0]
    tr = view.trace
    assert rv.text == TEXT and view.kit_available
    for i in rv.shown[1:]:
        a = tr.attribution(position=int(i) - 1, target=int(rv.tokens[i]))
        assert a.probability == pytest.approx(rv.prob[i], rel=1e-4)
        assert a.error < 1e-3
        assert a.top(1)[0].label.replace("  ", " ") == rv.top_label[i]
        ids = tr.tensor("hexray.topk_ids")[i - 1]
        hit = np.nonzero(ids == rv.tokens[i])[0]
        assert rv.rank[i] == (hit[0] + 1 if hit.size else 0)


def test_view_split_characters(synthetic):
    rv = build_view(synthetic).runs[0]
    emoji = TEXT.index("😀")
    group = rv.tokens_at(emoji)
    assert len(group) == 4  # one token per UTF-8 byte
    assert all((rv.starts[i], rv.ends[i]) == (emoji, emoji + 1) for i in group)
    assert rv.tokens_at(TEXT.index("e\u0301") + 1)  # the combining mark is covered
    assert rv.tokens_at(len(TEXT)) == []


def test_view_generated_runs_and_no_kit(tmp_path):
    path = write_synthetic_trace(tmp_path / "g.hxr", ["first prompt", "second 🙂"], generated=" and more",
                                 bundle_kit=False, bos=False)
    view = build_view(path)
    assert [rv.text for rv in view.runs] == ["first prompt", "second 🙂"]
    assert view.run_for("second 🙂").index == 1 and view.run_for("first prompt and more") is None
    assert not view.kit_available and "kit" in view.kit_message
    rv = view.runs[0]
    assert max(rv.shown_ends) <= len(rv.text)
    assert math.isnan(rv.prob[0])  # no BOS: nothing predicted the first token


def test_unreadable_traces(tmp_path):
    bad = tmp_path / "bad.hxr"
    bad.write_bytes(b"not a trace at all" * 10)
    with pytest.raises(TraceUnreadable):
        build_view(str(bad))
    with pytest.raises(TraceUnreadable):
        build_view(str(tmp_path / "missing.hxr"))


def test_common_prefix():
    assert common_prefix("abcdef", "abcxyz") == 3
    assert common_prefix("abc", "abc") == 3 and common_prefix("", "a") == 0 and common_prefix("ab", "abc") == 2


# -- locating traces, staleness ---------------------------------------------------------------------

def test_candidate_and_record_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    s = settings_mod.Settings()
    root = str(tmp_path / "ws")
    doc = Document(uri="file:///x", text="", version=1, path=os.path.join(root, "a", "p.prompt"))
    assert candidate_paths(doc, s, [root]) == [os.path.join(root, "a", "p.hxr"),
                                               os.path.join(root, ".hexray", "traces", "a", "p.hxr")]
    assert record_path(doc, s, [root]) == os.path.join(root, "a", "p.hxr")
    s2, _ = settings_mod.parse({"recordTo": "cache", "traceFolder": str(tmp_path / "abs")})
    assert record_path(doc, s2, [root]) == os.path.join(str(tmp_path / "abs"), "a", "p.hxr")
    outside = Document(uri="file:///y", text="", version=1, path="/elsewhere/q.prompt")
    assert cache_path(outside, s, [root]).startswith(str(tmp_path / "cache" / "lsp-traces"))
    untitled = Document(uri="untitled:Untitled-1", text="", version=1)
    assert candidate_paths(untitled, s, [root])[0].startswith(str(tmp_path / "cache"))


def test_served_and_unusable():
    s = settings_mod.Settings()
    assert is_served(Document(uri="file:///a.prompt", text="", version=1, path="/a.prompt"), s)
    assert not is_served(Document(uri="file:///a.txt", text="", version=1, path="/a.txt"), s)
    assert is_served(Document(uri="untitled:1", text="", version=1, language_id="hexray-prompt"), s)
    s2, _ = settings_mod.parse({"filePatterns": ["prompts/*.txt"]})
    assert is_served(Document(uri="file:///w/prompts/a.txt", text="", version=1, path="/w/prompts/a.txt"), s2)
    assert "binary" in unusable_reason(Document(uri="u", text="a\x00b", version=1), s)
    small, _ = settings_mod.parse({"maxDocumentBytes": 1000})
    assert "maxDocumentBytes" in unusable_reason(Document(uri="u", text="ü" * 600, version=1), small)
    assert unusable_reason(Document(uri="u", text="ü" * 400, version=1), small) is None


def test_store_fresh_stale_error_none(synthetic, tmp_path):
    async def go():
        changes = []
        store = TraceStore(ThreadPoolExecutor(1), on_change=changes.append)
        doc = Document(uri="file:///t.prompt", text=TEXT, version=1, path=str(tmp_path / "t.prompt"))
        target = str(tmp_path / "t.hxr")
        paths = [target]
        await store.ensure(paths)
        assert store.status(doc, paths).state == "none"
        os.link(synthetic, target)
        await store.ensure(paths)
        st = store.status(doc, paths)
        assert st.fresh and st.run.index == 0 and changes == [target]
        doc.text = TEXT.replace("model", "modem")
        st = store.status(doc, paths)
        assert st.state == "stale" and st.diff_offset == TEXT.index("model") + 4
        os.unlink(target)
        with open(target, "wb") as f:
            f.write(b"\0" * 200)
        await store.ensure(paths)
        assert store.status(doc, paths).state == "error"
        os.unlink(target)
        await store.ensure(paths)
        assert store.status(doc, paths).state == "none"
        store.close()

    asyncio.run(go())


# -- inlay hints and diagnostics --------------------------------------------------------------------

@pytest.mark.parametrize("enc", ENCS)
def test_hints_positions_groups_and_ranges(synthetic, enc):
    view = build_view(synthetic)
    rv = view.runs[0]
    idx = LineIndex(TEXT, enc)
    hs = build_hints(view, rv, idx, "probability", doc_id=1)
    hints = json.loads(hints_in(hs, 0, len(TEXT)).text)
    ends = sorted({int(rv.ends[i]) for i in rv.shown if math.isfinite(rv.prob[i])})
    assert len(hints) == len(ends)  # one hint per distinct token end (split characters merged)
    emoji_end = TEXT.index("😀") + 1
    assert {"line": 1, "character": units("the model 😀", enc)} in [h["position"] for h in hints]
    assert sum(1 for h in hints if tuple(h["position"].values()) == position_of(TEXT, emoji_end, enc)) == 1
    crlf = [h for h in hints if h["label"].startswith("↵")]
    assert crlf and crlf[0]["position"] == dict(zip(("line", "character"), position_of(TEXT, TEXT.index("\r"), enc),
                                                     strict=True))
    line1 = json.loads(hints_in(hs, idx.offset(1, 0), idx.offset(1, 10_000)).text)
    assert line1 and all(h["position"]["line"] == 1 for h in line1)
    for mode, check in (("surprisal", lambda s: s.rstrip("b").lstrip("↵").replace(".", "").isdigit()),
                        ("contributor", lambda s: s.lstrip("↵").split()[0] in ("Embed", "PosEmbed", "Attn", "MLP"))):
        labels = [h["label"] for h in json.loads(hints_in(build_hints(view, rv, idx, mode, 1), 0, 999).text)]
        assert labels and all(check(lbl) for lbl in labels), labels


def test_diagnostics(synthetic, tmp_path):
    from hexray_lsp.traces import TraceStatus

    s = settings_mod.Settings()
    doc = Document(uri="file:///p.prompt", text=TEXT, version=3, path="/w/p.prompt")
    [d] = compute_diagnostics(doc, TraceStatus("none"), s, "utf-16")
    assert d.code == "no-trace" and "hexray record --model hexray-demo --prompt-file p.prompt -o p.hxr" in d.message
    view = build_view(synthetic)
    st = TraceStatus("stale", synthetic, view, diff_offset=TEXT.index("😀"), message="stale")
    [d] = compute_diagnostics(doc, st, s, "utf-16")
    assert d.code == "stale-trace" and (d.range.start.line, d.range.start.character) == (1, 10)
    assert d.range.end.character == 12  # the whole emoji, in UTF-16 units
    fresh = TraceStatus("fresh", synthetic, view, view.runs[0])
    assert compute_diagnostics(doc, fresh, s, "utf-16") == []
    s2, _ = settings_mod.parse({"surpriseThreshold": 0.9, "maxSurpriseDiagnostics": 4})
    diags = compute_diagnostics(doc, fresh, s2, "utf-16")
    assert len(diags) == 4 and {d.code for d in diags} == {"surprising-token"}
    assert [d.range.start for d in diags] == sorted((d.range.start for d in diags), key=lambda p: (p.line, p.character))
    nokit = build_view(write_synthetic_trace(tmp_path / "nk.hxr", TEXT, bundle_kit=False))
    [d] = compute_diagnostics(doc, TraceStatus("fresh", "x", nokit, nokit.runs[0]), s, "utf-16")
    assert d.code == "kit-missing" and d.severity == 3


# -- pre-serialised responses -------------------------------------------------------------------------

def test_raw_json_response_is_spliced():
    class Writer:
        def __init__(self):
            self.data = b""

        def write(self, data):
            self.data += data

    proto = HexRayProtocol.__new__(HexRayProtocol)
    proto.writer, proto._include_headers, proto._result_types = Writer(), True, {}
    proto._send_response(7, result=RawJSON('[{"label":"\\u00e9"}]'))
    head, body = proto.writer.data.split(b"\r\n\r\n")
    assert int(head.split(b"\r\n")[0].split(b": ")[1]) == len(body)
    assert json.loads(body) == {"id": 7, "jsonrpc": "2.0", "result": [{"label": "é"}]}


# -- the worker protocol (no model needed) ------------------------------------------------------------

def test_worker_protocol_and_crash(tmp_path):
    from hexray_lsp.worker import WorkerCancelled, WorkerClient, WorkerCrashed, WorkerError

    async def go():
        w = WorkerClient(sys.executable)
        res = await asyncio.wait_for(w.request("ping", {}), 30)
        assert res["pid"] == w.pid and res["model"] is None
        with pytest.raises(WorkerError, match="unknown op"):
            await w.request("nope", {})
        with pytest.raises(WorkerError, match="needs text"):
            await w.request("record", {"config": {}, "text": 3})
        # a request in flight when the worker dies fails (the worker is importing torch: slow enough)
        record = {"config": {"model": "no-such-model"}, "text": "hi", "output": str(tmp_path / "x.hxr")}
        req, fut = await w.submit("record", record)
        await asyncio.sleep(0.3)
        pid = w.pid
        w.proc.kill()
        with pytest.raises(WorkerCrashed, match="exited unexpectedly"):
            await asyncio.wait_for(fut, 10)
        assert not w.alive
        res = await asyncio.wait_for(w.request("ping", {}), 30)  # restarted on demand
        assert res["pid"] != pid and w.starts == 2
        req, fut = await w.submit("record", record)
        w.cancel(req)  # cancelled at once on the server side, whatever the worker is doing
        with pytest.raises(WorkerCancelled):
            await fut
        await w.stop()
        assert not w.alive

    asyncio.run(go())


def test_worker_dict_paths_expand_home_and_resolve_from_the_document(tmp_path, monkeypatch):
    from hexray_core.record.worker import dict_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "sae").mkdir(parents=True)
    (tmp_path / "doc" / "rel").mkdir(parents=True)
    doc = str(tmp_path / "doc")
    assert dict_path(doc, "~/sae") == str(tmp_path / "home" / "sae")  # was doc/~/sae, which does not exist
    assert dict_path(doc, "rel") == os.path.join(doc, "rel")
    assert dict_path(doc, "hf://org/repo") == "hf://org/repo"
