"""End-to-end tests of `hexray lsp` over stdio, as VS Code (utf-16), Neovim (utf-8) and Emacs (utf-32).

One server per client (module scope); traces are real recordings of a tiny GPT-2 made once per
session (tests/lsp_support.py). Expected positions are computed independently of the server's
line index; expected numbers come from the replay engine.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil

import numpy as np
import pytest
import pytest_asyncio
from lsp_support import (
    CLIENTS,
    PROMPTS,
    codes,
    execute,
    hover_at,
    inlay_hints,
    make_workspace,
    open_doc,
    position_of,
    recorded_traces,
    start_client,
    stop_client,
    wait_diagnostics,
)
from lsprotocol import types as t

from hexray_core.replay import open_trace
from hexray_lsp.render import code, pct, quote

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def workspace(tiny_gpt2_recorder, tmp_path_factory):
    traces = recorded_traces(tiny_gpt2_recorder, tmp_path_factory.getbasetemp() / "lsp-traces")
    return make_workspace(tmp_path_factory.mktemp("ws"), traces)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=CLIENTS)
async def client(request, workspace):
    c = await start_client(request.param, workspace, settings={})
    yield c
    await stop_client(c)


def expected_tokens(path: str, text: str):
    """(token index, start, end, probability) of every token shown in the document, from the replay engine."""
    tr = open_trace(path)
    run = tr.runs[0]
    assert run.prompt == text
    nxt = tr.tensor("hexray.next_logit").astype(np.float64)
    lse = tr.tensor("hexray.logsumexp").astype(np.float64)
    out = []
    for i, (s, e) in enumerate(run.char_spans):
        if s < 0:
            continue
        p = math.exp(nxt[i - 1] - lse[i - 1]) if i > 0 else math.nan
        out.append((i, s, e, p))
    return tr, out


async def code_lens(client, uri):
    return await client.text_document_code_lens_async(t.CodeLensParams(text_document=t.TextDocumentIdentifier(uri=uri)))


def watched(client, path, kind) -> None:
    client.workspace_did_change_watched_files(t.DidChangeWatchedFilesParams(
        changes=[t.FileEvent(uri=path.as_uri(), type=kind)]))


async def set_settings(client, settings: dict) -> None:
    client.set_configuration({"hexray": settings})
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings={"hexray": settings}))
    await asyncio.sleep(0.05)


# -- handshake -----------------------------------------------------------------------------------

async def test_initialize_capabilities(client):
    caps = client.server_capabilities
    assert caps.hover_provider
    assert caps.inlay_hint_provider.resolve_provider
    assert caps.code_lens_provider is not None
    assert {"hexray.recordTrace", "hexray.cancelRecording", "hexray.restartWorker", "hexray.status"} <= set(
        caps.execute_command_provider.commands)
    assert caps.text_document_sync.change == t.TextDocumentSyncKind.Full
    status = await execute(client, "hexray.status")
    assert status["server"]["torch_imported"] is False
    assert status["server"]["position_encoding"] == client.position_encoding
    ws = client.capabilities.workspace
    if ws.did_change_watched_files is not None and ws.did_change_watched_files.dynamic_registration:
        [reg] = client.registrations
        assert reg.method == t.WORKSPACE_DID_CHANGE_WATCHED_FILES


# -- hover ----------------------------------------------------------------------------------------

async def test_hover_ascii_emoji_cjk(client):
    path = client.root / "mixed.prompt"
    text = PROMPTS["mixed"]
    uri = open_doc(client, path)
    assert codes(await wait_diagnostics(client, uri, lambda d: True)) == []
    tr, toks = expected_tokens(str(client.root / "mixed.hxr"), text)
    enc = client.position_encoding

    async def hover_char(ch: str, occurrence: int = 0):
        off = -1
        for _ in range(occurrence + 1):
            off = text.index(ch, off + 1)
        line, col = position_of(text, off, enc)
        return off, await hover_at(client, uri, line, col)

    # ASCII token " cat"
    off, h = await hover_char("cat")
    i, s, e, p = next(x for x in toks if x[1] <= off < x[2])
    assert h.contents.kind == t.MarkupKind.Markdown
    md = h.contents.value
    assert quote(tr.runs[0].token_strs[i]) in md and f"id {tr.runs[0].tokens[i]}" in md
    assert f"p = **{pct(p)}**" in md
    a = tr.attribution(position=i - 1, target=tr.runs[0].tokens[i])
    assert a.probability == pytest.approx(p, rel=1e-5)
    top = a.top(1)[0].label.replace("  ", " ")
    assert f"| {top}" in md and "Top heads:" in md
    assert "Predicted after" in md and "**Next**" in md
    assert (h.range.start.line, h.range.start.character) == position_of(text, s, enc)
    assert (h.range.end.line, h.range.end.character) == position_of(text, e, enc)

    # the emoji is split into several byte tokens: one hover shows them all, over the whole character
    for ch in ("🐱", "東", "\u0301", "👨"):
        off, h = await hover_char(ch)
        group = [x for x in toks if x[1] <= off < x[2]]
        assert h is not None, ch
        md = h.contents.value
        start, end = min(x[1] for x in group), max(x[2] for x in group)
        assert (h.range.start.line, h.range.start.character) == position_of(text, start, enc), ch
        assert (h.range.end.line, h.range.end.character) == position_of(text, end, enc), ch
        if len(group) > 1:
            assert f"{len(group)} tokens" in md
            joint = float(np.prod([x[3] for x in group]))
            assert f"joint p **{pct(joint)}**" in md
        assert md.startswith(f"**{code(quote(text[start:end]))}**"), (ch, md)  # the whole text under the cursor

    # inside a character: the second UTF-16 unit / a continuation byte of 🐱 still hovers 🐱
    off = text.index("🐱")
    line, col = position_of(text, off, enc)
    if enc != "utf-32":
        h_in = await hover_at(client, uri, line, col + 1)
        h_at = await hover_at(client, uri, line, col)
        assert h_in.range == h_at.range and h_in.contents.value == h_at.contents.value


async def test_every_character_hovers_its_token(client):
    """Exhaustive: every character covered by a token hovers a range that contains it."""
    text = PROMPTS["mixed"]
    uri = (client.root / "mixed.prompt").as_uri()
    if uri not in client.diagnostics:
        open_doc(client, client.root / "mixed.prompt")
        await wait_diagnostics(client, uri, lambda d: True)
    _, toks = expected_tokens(str(client.root / "mixed.hxr"), text)
    enc = client.position_encoding
    covered = sorted({o for _, s, e, _ in toks for o in range(s, e)})
    for off in covered:
        if text[off - 1:off + 1] == "\r\n":
            continue  # the middle of a CRLF has no position of its own
        line, col = position_of(text, off, enc)
        h = await hover_at(client, uri, line, col)
        assert h is not None, (off, text[off])
        group = [x for x in toks if x[1] <= off < x[2]]
        start, end = min(x[1] for x in group), max(x[2] for x in group)
        assert (h.range.start.line, h.range.start.character) == position_of(text, start, enc), off
        assert (h.range.end.line, h.range.end.character) == position_of(text, end, enc), off
    # past the end of a line or of the document: an answer, no error
    await hover_at(client, uri, 0, 10_000)
    assert await hover_at(client, uri, 10_000, 0) is None


async def test_line_breaks_are_lsp_line_breaks(client):
    """U+2028 and form feed are not line breaks (pygls' own document.lines would say they are)."""
    text = PROMPTS["odd"]
    uri = open_doc(client, client.root / "odd.prompt")
    assert codes(await wait_diagnostics(client, uri, lambda d: True)) == []
    enc = client.position_encoding
    off = text.index("😀")
    line, col = position_of(text, off, enc)
    assert line == 1
    h = await hover_at(client, uri, line, col)
    assert h is not None and "😀" in h.contents.value
    assert (h.range.start.line, h.range.start.character)[0] == 1


# -- inlay hints -----------------------------------------------------------------------------------

def expected_hints(text: str, toks, enc: str) -> dict[tuple[int, int], str]:
    groups: dict[int, list] = {}
    for _i, _s, e, p in toks:
        groups.setdefault(e, []).append(p)
    out = {}
    for end, ps in groups.items():
        if not all(math.isfinite(p) for p in ps):
            continue
        at, label = end, pct(float(np.prod(ps)))
        if text[end - 1] in "\r\n":
            at = end - 1
            if text[at] == "\n" and text[at - 1] == "\r":
                at -= 1
            label = "↵" + label
        out.setdefault(position_of(text, at, enc), []).append(label)
    return out


async def test_inlay_hints_positions_and_resolve(client):
    text = PROMPTS["mixed"]
    uri = (client.root / "mixed.prompt").as_uri()
    if uri not in client.diagnostics:
        open_doc(client, client.root / "mixed.prompt")
        await wait_diagnostics(client, uri, lambda d: True)
    _, toks = expected_tokens(str(client.root / "mixed.hxr"), text)
    enc = client.position_encoding
    hints = await inlay_hints(client, uri)
    got: dict = {}
    for h in hints:
        got.setdefault((h.position.line, h.position.character), []).append(h.label)
    assert got == expected_hints(text, toks, enc)
    positions = [(h.position.line, h.position.character) for h in hints]
    assert positions == sorted(positions)
    # a range: only line 1
    line1 = await inlay_hints(client, uri, (1, 0), (1, 10_000))
    assert line1 and all(h.position.line == 1 for h in line1)
    assert len(line1) == sum(1 for h in hints if h.position.line == 1)
    resolved = await client.inlay_hint_resolve_async(hints[2])
    assert resolved.tooltip is not None and "bits" in resolved.tooltip.value


async def test_inlay_hint_modes(client):
    uri = (client.root / "ascii.prompt").as_uri()
    open_doc(client, client.root / "ascii.prompt")
    await wait_diagnostics(client, uri, lambda d: True)
    try:
        await set_settings(client, {"inlayHints": "surprisal"})
        hints = await inlay_hints(client, uri)
        assert hints and all(h.label.endswith("b") for h in hints)
        await set_settings(client, {"inlayHints": "contributor"})
        hints = await inlay_hints(client, uri)
        assert hints and all(h.label.split()[0] in ("Embed", "PosEmbed", "Attn", "MLP", "↵Embed", "↵PosEmbed",
                                                    "↵Attn", "↵MLP") for h in hints)
        await set_settings(client, {"inlayHints": "off"})
        assert len(await inlay_hints(client, uri)) == 0
    finally:
        await set_settings(client, {})
    assert all(h.label.endswith("%") for h in await inlay_hints(client, uri))


# -- diagnostics, staleness ------------------------------------------------------------------------

async def test_no_trace(client):
    uri = open_doc(client, client.root / "nothing.prompt")
    [d] = await wait_diagnostics(client, uri, lambda d: bool(d))
    assert d.code == "no-trace" and d.severity == t.DiagnosticSeverity.Information
    assert "hexray.recordTrace" in d.message and "hexray record" in d.message
    assert await hover_at(client, uri, 0, 1) is None
    assert len(await inlay_hints(client, uri)) == 0
    lenses = await code_lens(client, uri)
    assert "no trace" in lenses[0].command.title and lenses[0].command.command == "hexray.recordTrace"
    actions = await client.text_document_code_action_async(t.CodeActionParams(
        text_document=t.TextDocumentIdentifier(uri=uri), range=d.range,
        context=t.CodeActionContext(diagnostics=[d])))
    # lsprotocol 2025's client-side hook reads any code action that has a "command" as a Command
    # (_code_action_hook), so the nested command arrives as its string form: check that.
    action = actions[0]
    assert action.title == "HexRay: record trace"
    assert "hexray.recordTrace" in str(action.command) and uri in str(action.command)


async def test_stale_after_edit_and_back(client):
    path = client.root / "ascii.prompt"
    text = PROMPTS["ascii"]
    uri = path.as_uri()
    open_doc(client, path)
    assert codes(await wait_diagnostics(client, uri, lambda d: True)) == []
    fresh = (await hover_at(client, uri, 0, 1)).contents.value
    assert "Predicted after" in fresh and "**HexRay:**" not in fresh  # a real hover, not a stale notice
    edited = text.replace("lazy", "sleepy")
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=20),
        content_changes=[t.TextDocumentContentChangeWholeDocument(text=edited)]))
    [d] = await wait_diagnostics(client, uri, lambda d: codes(d) == ["stale-trace"])
    assert d.severity == t.DiagnosticSeverity.Warning
    assert (d.range.start.line, d.range.start.character) == position_of(edited, text.index("lazy"),
                                                                       client.position_encoding)
    h = await hover_at(client, uri, 0, 1)
    assert h is not None and "stale" in h.contents.value and "Predicted" not in h.contents.value
    assert len(await inlay_hints(client, uri)) == 0
    lenses = await code_lens(client, uri)
    assert "stale" in lenses[0].command.title
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=21),
        content_changes=[t.TextDocumentContentChangeWholeDocument(text=text)]))
    await wait_diagnostics(client, uri, lambda d: codes(d) == [])
    h = await hover_at(client, uri, 0, 1)
    assert h.contents.value == fresh  # back to the recorded text: the very hover it had before the edit


async def test_trace_in_workspace_cache_folder(client):
    # opened as Dotprompt's language: *.prompt files are served whatever their language id
    uri = open_doc(client, client.root / "sub" / "cached.prompt", language_id="dotprompt")
    assert codes(await wait_diagnostics(client, uri, lambda d: True)) == []
    h = await hover_at(client, uri, 0, 5)
    assert h is not None and "cached.hxr" in h.contents.value


async def test_kit_missing(client):
    uri = open_doc(client, client.root / "nokit.prompt")
    [d] = await wait_diagnostics(client, uri, lambda d: bool(d))
    assert d.code == "kit-missing" and d.severity == t.DiagnosticSeverity.Information
    h = await hover_at(client, uri, 0, 3)
    assert "Top contributors" in h.contents.value and "need the model kit" in h.contents.value


async def test_surprising_tokens(client):
    uri = (client.root / "ascii.prompt").as_uri()
    open_doc(client, client.root / "ascii.prompt")
    try:
        await set_settings(client, {"surpriseThreshold": 0.5, "maxSurpriseDiagnostics": 3})
        diags = await wait_diagnostics(client, uri, lambda d: "surprising-token" in codes(d))
        assert codes(diags) == ["surprising-token"] * 3
    finally:
        await set_settings(client, {})
    await wait_diagnostics(client, uri, lambda d: codes(d) == [])


async def test_bad_settings_fall_back(client):
    n = len(client.messages)
    await set_settings(client, {"inlayHints": "loud", "surpriseThreshold": 3, "model": 7})
    for _ in range(100):
        if len(client.messages) > n:
            break
        await asyncio.sleep(0.02)
    msg = client.messages[-1]
    assert msg.type == t.MessageType.Warning
    assert "inlayHints" in msg.message and "default 'probability'" in msg.message and "surpriseThreshold" in msg.message
    uri = (client.root / "ascii.prompt").as_uri()
    open_doc(client, client.root / "ascii.prompt")
    assert all(h.label.endswith("%") for h in await inlay_hints(client, uri))
    await set_settings(client, {})


# -- robustness ------------------------------------------------------------------------------------

async def test_binary_and_huge_documents(client):
    uri = open_doc(client, client.root / "binary.prompt", text="\x00\x01\x02PK\x03\x04" * 100)
    [d] = await wait_diagnostics(client, uri, lambda d: bool(d))
    assert d.code == "unusable" and "binary" in d.message
    assert await hover_at(client, uri, 0, 3) is None
    big = ("All work and no play makes Jack a dull boy. 🙂\n" * 50_000)
    uri = open_doc(client, client.root / "huge.prompt", text=big)
    [d] = await wait_diagnostics(client, uri, lambda d: bool(d))
    assert d.code == "unusable" and "maxDocumentBytes" in d.message
    assert await hover_at(client, uri, 3, 3) is None
    assert len(await inlay_hints(client, uri)) == 0


async def test_rapid_edits(client):
    path = client.root / "ascii.prompt"
    uri = path.as_uri()
    open_doc(client, path)
    text = PROMPTS["ascii"]
    for v in range(100, 300):
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=v),
            content_changes=[t.TextDocumentContentChangeWholeDocument(text=text + "x" * (v % 7))]))
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=300),
        content_changes=[t.TextDocumentContentChangeWholeDocument(text=text)]))
    h = await asyncio.wait_for(hover_at(client, uri, 0, 1), 5)
    assert h is not None and "stale" not in h.contents.value
    # a client that sends ranged changes although the server asked for full sync: still followed
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=301),
        content_changes=[t.TextDocumentContentChangePartial(
            range=t.Range(start=t.Position(line=0, character=4), end=t.Position(line=0, character=9)),
            text="slow")]))
    await wait_diagnostics(client, uri, lambda d: codes(d) == ["stale-trace"])
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=302),
        content_changes=[t.TextDocumentContentChangeWholeDocument(text=text)]))
    await wait_diagnostics(client, uri, lambda d: codes(d) == [])


async def test_trace_deleted_corrupted_and_restored(client):
    folder = client.root / f"robust-{client.name.split('@')[0]}"
    folder.mkdir(exist_ok=True)
    path = folder / "r.prompt"
    path.write_text(PROMPTS["ascii"], encoding="utf-8")
    good = client.root / "ascii.hxr"
    trace = folder / "r.hxr"
    shutil.copy(good, trace)
    uri = open_doc(client, path)
    assert codes(await wait_diagnostics(client, uri, lambda d: True)) == []
    assert (await hover_at(client, uri, 0, 5)) is not None

    # corrupt it in place (same size: only the content changes) -> unreadable, no crash
    data = bytearray(trace.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * 64
    bad = folder / "r.tmp"
    bad.write_bytes(bytes(data[: len(data) - 100]))
    os.replace(bad, trace)
    watched(client, trace, t.FileChangeType.Changed)  # as an editor with a file watcher would
    [d] = await wait_diagnostics(client, uri, lambda d: codes(d) == ["trace-unreadable"])
    assert d.severity == t.DiagnosticSeverity.Warning
    assert await hover_at(client, uri, 0, 5) is None

    # deleted -> no trace
    trace.unlink()
    watched(client, trace, t.FileChangeType.Deleted)
    await wait_diagnostics(client, uri, lambda d: codes(d) == ["no-trace"])
    assert await hover_at(client, uri, 0, 5) is None

    # a good trace appears (written by someone else, e.g. `hexray record`): the server's own poll
    # notices it, with no notification and no request
    shutil.copy(good, folder / "r.tmp")
    os.replace(folder / "r.tmp", trace)
    await wait_diagnostics(client, uri, lambda d: codes(d) == [])
    ws = client.capabilities.workspace
    if ws is not None and ws.inlay_hint is not None and ws.inlay_hint.refresh_support:
        assert t.WORKSPACE_INLAY_HINT_REFRESH in client.refreshes  # the client was told to pull hints again
    assert (await hover_at(client, uri, 0, 5)) is not None


async def test_untitled_and_unserved_documents(client):
    uri = "untitled:Untitled-1"
    client.text_document_did_open(t.DidOpenTextDocumentParams(text_document=t.TextDocumentItem(
        uri=uri, language_id="hexray-prompt", version=1, text="Hello 🙂 world\n")))
    [d] = await wait_diagnostics(client, uri, lambda d: bool(d))
    assert d.code == "no-trace"
    assert await hover_at(client, uri, 0, 1) is None
    txt = open_doc(client, client.root / "notes.txt", text="not a prompt", language_id="plaintext")
    await asyncio.sleep(0.2)
    assert txt not in client.diagnostics
    assert await hover_at(client, txt, 0, 1) is None


async def test_record_without_a_usable_worker(client):
    """A worker that cannot start is a message and a diagnostic; the server stays up."""
    await set_settings(client, {"python": "/nonexistent/python3"})
    try:
        uri = open_doc(client, client.root / "nothing.prompt")
        res = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri), 20)
        assert res["status"] == "error" and "cannot start the record worker" in res["message"]
        await wait_diagnostics(client, uri, lambda d: "recording-failed" in codes(d))
        assert any("recording failed" in m.message for m in client.messages)
        assert (await execute(client, "hexray.status"))["server"]["torch_imported"] is False
    finally:
        await set_settings(client, {})
    res = await execute(client, "hexray.recordTrace")
    assert res["status"] == "error"
    h = await hover_at(client, (client.root / "mixed.prompt").as_uri(), 0, 1)
    assert h is not None


async def test_did_close_clears_diagnostics(client):
    uri = open_doc(client, client.root / "nothing.prompt", version=50)
    await wait_diagnostics(client, uri, lambda d: bool(d))
    client.text_document_did_close(t.DidCloseTextDocumentParams(text_document=t.TextDocumentIdentifier(uri=uri)))
    await wait_diagnostics(client, uri, lambda d: d == [])
