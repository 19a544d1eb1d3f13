"""Source tokens of a prediction in the editor: ``textDocument/documentHighlight`` and the hover's Sources.

Over stdio with the real server, as VS Code (utf-16), Neovim (utf-8) and Emacs (utf-32), on real
recordings of a tiny GPT-2 (tests/lsp_support.py). Expected sources come from the replay engine's
`source_attribution` (itself checked against TransformerLens in tests/test_sources.py); expected
ranges from `position_of`, independent of the server's line index.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from lsp_support import (
    CLIENTS,
    PROMPTS,
    hover_at,
    make_workspace,
    open_doc,
    position_of,
    recorded_traces,
    start_client,
    stop_client,
    wait_diagnostics,
    write_synthetic_trace,
)
from lsprotocol import types as t

from hexray_core.replay import open_trace
from hexray_core.replay.sources import source_attribution
from hexray_lsp.render import quote

pytestmark = pytest.mark.asyncio(loop_scope="module")

NO_V = "A recording made before hook_v was a default hook.\n"


@pytest.fixture(scope="module")
def workspace(tiny_gpt2_recorder, tmp_path_factory):
    traces = recorded_traces(tiny_gpt2_recorder, tmp_path_factory.getbasetemp() / "lsp-traces")
    root = make_workspace(tmp_path_factory.mktemp("ws-highlight"), traces)
    (root / "nov.prompt").write_text(NO_V, encoding="utf-8")
    write_synthetic_trace(root / "nov.hxr", NO_V, bundle_kit=True, seed=3)  # kit bundled, no hook_v
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=CLIENTS)
async def client(request, workspace):
    c = await start_client(request.param, workspace, settings={})
    yield c
    await stop_client(c)


async def highlight_at(client, uri: str, line: int, character: int):
    return await client.text_document_document_highlight_async(t.DocumentHighlightParams(
        text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line=line, character=character)))


async def set_settings(client, settings: dict) -> None:
    client.set_configuration({"hexray": settings})
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings={"hexray": settings}))
    await asyncio.sleep(0.1)


def shown_tokens(run, text: str) -> list[int]:
    return [i for i, (s, e) in enumerate(run.char_spans) if 0 <= s < e <= len(text)]


def expected_highlights(tr, i: int, text: str, enc: str, threshold: float = 0.1, limit: int = 20):
    """(range, kind) of token i's sources, computed from replay's per-source totals."""
    run = tr.runs[0]
    sa = source_attribution(tr, position=i - 1, run=0, target=int(run.tokens[i]))
    assert sa.values.shape[-1] == i
    shown = [s for s in shown_tokens(run, text) if s < i]
    totals = {s: float(sa.per_source[s]) for s in shown}
    if not shown:  # the token right after BOS: its only source is not in the document
        return sa, []
    top = max(abs(v) for v in totals.values())
    ranked = sorted(shown, key=lambda s: (-abs(totals[s]), s))[:limit]
    out = []
    for s in ranked:
        if abs(totals[s]) < threshold * top:
            break
        a, b = run.char_spans[s]
        kind = t.DocumentHighlightKind.Write if abs(totals[s]) >= 0.5 * top else t.DocumentHighlightKind.Read
        out.append(((position_of(text, a, enc), position_of(text, b, enc)), kind))
    return sa, out


def as_tuples(hl):
    return [(((h.range.start.line, h.range.start.character), (h.range.end.line, h.range.end.character)), h.kind)
            for h in hl]


async def test_capability(client):
    assert client.server_capabilities.document_highlight_provider


async def test_highlights_are_the_strongest_sources(client):
    """Every token of a prompt with emoji, CJK, combining marks and CR/CRLF: its highlights are its
    sources above the threshold, strongest first, at the tokens' exact spans in the client's units."""
    text = PROMPTS["mixed"]
    uri = open_doc(client, client.root / "mixed.prompt")
    await wait_diagnostics(client, uri, lambda d: True)
    tr = open_trace(str(client.root / "mixed.hxr"))
    run = tr.runs[0]
    enc = client.position_encoding
    seen_first = set()
    checked = nonascii = 0
    for i in shown_tokens(run, text):
        a, b = run.char_spans[i]
        if 0 < a and text[a - 1:a + 1] == "\r\n":
            continue  # between the \r and \n of one line break: no position of its own (it is the \r's)
        first = min(j for j in shown_tokens(run, text) if run.char_spans[j][0] <= a < run.char_spans[j][1])
        if first in seen_first:
            continue  # a later byte token of a split character hovers the character's first token
        seen_first.add(first)
        line, col = position_of(text, a, enc)
        got = as_tuples(await highlight_at(client, uri, line, col))
        if first == 0:
            assert got == []
            continue
        _, want = expected_highlights(tr, first, text, enc)
        assert got == want, (first, run.token_strs[first])
        checked += bool(want)
        nonascii += any(not text[run.char_spans[s][0]:run.char_spans[s][1]].isascii()
                        for s in range(first) if run.char_spans[s][0] >= 0)
    assert checked > 20 and nonascii > 5


async def test_hover_lists_the_top_sources(client):
    text = PROMPTS["ascii"]
    uri = open_doc(client, client.root / "ascii.prompt")
    await wait_diagnostics(client, uri, lambda d: True)
    tr = open_trace(str(client.root / "ascii.hxr"))
    run = tr.runs[0]
    off = text.index(" store")
    i = next(j for j, (s, e) in enumerate(run.char_spans) if s <= off < e)
    h = await hover_at(client, uri, *position_of(text, off, client.position_encoding))
    md = h.contents.value
    assert "**Sources**" in md and "Top contributors" in md
    sa = source_attribution(tr, position=i - 1, run=0, target=int(run.tokens[i]))
    top = sa.top_sources(5, heads=1)
    lines = [ln for ln in md.splitlines() if ln.startswith("- from ")]
    assert len(lines) == 5
    for ln, (s, total, [(head, v)]) in zip(lines, top, strict=True):
        assert ln == f"- from `{quote(run.token_strs[s])}`@{s} via {head} {v:+.2f} (total {total:+.2f})"
    # the sources sum to the heads' direct logit attribution (hook_z against attention × hook_v: float32 recording)
    heads = tr.attribution(position=i - 1, target=int(run.tokens[i]), by="head")
    head_sum = sum(c.value for c in heads.contributions if c.kind == "head")
    assert float(sa.per_source.sum()) == pytest.approx(head_sum, rel=2e-3, abs=1e-4)
    assert f"Σ {float(sa.per_source.sum()):+.2f}" in md


async def test_threshold_and_limit_settings(client):
    text = PROMPTS["ascii"]
    uri = open_doc(client, client.root / "ascii.prompt")
    await wait_diagnostics(client, uri, lambda d: True)
    tr = open_trace(str(client.root / "ascii.hxr"))
    run = tr.runs[0]
    enc = client.position_encoding
    off = text.index("Bob")
    i = next(j for j, (s, e) in enumerate(run.char_spans) if s <= off < e)
    pos = position_of(text, off, enc)
    try:
        await set_settings(client, {"highlights": {"threshold": 0.0, "max": 1000}})
        got = as_tuples(await highlight_at(client, uri, *pos))
        _, want = expected_highlights(tr, i, text, enc, threshold=0.0, limit=1000)
        assert got == want and len(got) == len([s for s in shown_tokens(run, text) if s < i])
        await set_settings(client, {"highlights.threshold": 0.0, "highlights.max": 3})
        assert as_tuples(await highlight_at(client, uri, *pos)) == want[:3]
        await set_settings(client, {"highlights": {"threshold": 1.0}})
        [(rng, kind)] = as_tuples(await highlight_at(client, uri, *pos))
        assert rng == want[0][0] and kind == t.DocumentHighlightKind.Write
        await set_settings(client, {"highlights": {"max": 0}, "hover": {"sources": 0}})
        assert as_tuples(await highlight_at(client, uri, *pos)) == []
        assert "**Sources**" not in (await hover_at(client, uri, *pos)).contents.value
    finally:
        await set_settings(client, {})
    assert as_tuples(await highlight_at(client, uri, *pos)) == expected_highlights(tr, i, text, enc)[1]


@pytest.mark.parametrize("name, why", [("nov", "blocks.0.attn.hook_v"), ("nokit", "model kit")])
async def test_no_sources_without_hook_v_or_kit(client, name, why):
    text = (client.root / f"{name}.prompt").read_text(encoding="utf-8")
    uri = open_doc(client, client.root / f"{name}.prompt")
    await wait_diagnostics(client, uri, lambda d: True)
    tr = open_trace(str(client.root / f"{name}.hxr"))
    assert not tr.has("blocks.0.attn.hook_v")
    off = text.index("hook" if name == "nov" else "kit")
    pos = position_of(text, off, client.position_encoding)
    assert as_tuples(await highlight_at(client, uri, *pos)) == []
    h = await hover_at(client, uri, *pos)
    md = h.contents.value
    assert "Top contributors" in md and "**Next**" in md
    [why_line] = [ln for ln in md.splitlines() if ln.startswith("*Sources unavailable")]
    assert why in why_line


async def test_no_highlights_outside_tokens_or_without_trace(client):
    uri = open_doc(client, client.root / "nothing.prompt")
    await asyncio.sleep(0.1)
    assert as_tuples(await highlight_at(client, uri, 0, 2)) == []
    uri = open_doc(client, client.root / "ascii.prompt")
    await wait_diagnostics(client, uri, lambda d: True)
    assert as_tuples(await highlight_at(client, uri, 0, 0)) == []  # "The" follows BOS: no source in the document
    assert as_tuples(await highlight_at(client, uri, 500, 0)) == []  # past the end: no token
