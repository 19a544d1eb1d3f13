"""The record command end to end: `hexray lsp` drives its record worker (a subprocess with a tiny
GPT-2 from ``tests.lsp_support:tiny_gpt2_factory``), reports progress, refreshes, records on save
(debounced), cancels, and survives the worker dying.

One server (and one warm worker) per client capability set; the cancellation and crash tests run
once, as VS Code.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest
import pytest_asyncio
from lsp_support import (
    CLIENTS,
    PROMPTS,
    REPO,
    SLOW_FLAG_ENV,
    codes,
    execute,
    hover_at,
    inlay_hints,
    open_doc,
    position_of,
    start_client,
    stop_client,
    wait_diagnostics,
)
from lsprotocol import types as t

pytestmark = pytest.mark.asyncio(loop_scope="module")

SETTINGS = {"modelFactory": "tests.lsp_support:tiny_gpt2_factory", "extraPaths": [REPO]}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=CLIENTS)
async def client(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    flag = root / "slow.flag"
    c = await start_client(request.param, root, settings=dict(SETTINGS), **{SLOW_FLAG_ENV: str(flag)})
    c.name, c.root, c.flag = request.param, root, flag
    yield c
    if flag.exists():
        flag.unlink()
    await stop_client(c)


# runs once, with the VS Code capabilities (and that client's server and warm worker)
vscode_only = pytest.mark.parametrize("client", ["visual-studio-code"], indirect=True)


async def set_settings(client, settings: dict) -> None:
    client.set_configuration({"hexray": settings})
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings={"hexray": settings}))
    await asyncio.sleep(0.05)


def new_doc(client, name: str, text: str) -> str:
    path = client.root / name
    path.write_text(text, encoding="utf-8", newline="")
    return open_doc(client, path, text)


def edit(client, uri: str, text: str, version: int) -> None:
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[t.TextDocumentContentChangeWholeDocument(text=text)]))


def progress_of(client, token_before: set) -> list:
    new = [tok for tok in client.progress_reports if tok not in token_before]
    return [client.progress_reports[tok] for tok in new]


async def wait_until(pred, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_record_command_end_to_end(client):
    text = PROMPTS["mixed"]
    uri = new_doc(client, "hello.prompt", text)
    await wait_diagnostics(client, uri, lambda d: codes(d) == ["no-trace"])
    before = set(client.progress_reports)
    res = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri), 120)
    assert res["status"] == "recorded" and res["fresh"] is True and res["tokens"] > 20
    assert res["path"] == str(client.root / "hello.hxr") and os.path.exists(res["path"])

    [reports] = progress_of(client, before)
    assert isinstance(reports[0], t.WorkDoneProgressBegin) and reports[0].cancellable
    assert any(isinstance(r, t.WorkDoneProgressReport) and "layer" in (r.message or "") for r in reports)
    pcts = [r.percentage for r in reports if isinstance(r, t.WorkDoneProgressReport) and r.percentage is not None]
    assert pcts == sorted(pcts)
    assert isinstance(reports[-1], t.WorkDoneProgressEnd) and "tokens" in reports[-1].message

    await wait_diagnostics(client, uri, lambda d: codes(d) == [])
    off = text.index("🐱")
    line, col = position_of(text, off, client.position_encoding)
    h = await hover_at(client, uri, line, col)
    assert h is not None and "🐱" in h.contents.value and "Top contributors" in h.contents.value
    assert len(await inlay_hints(client, uri)) > 10
    lens = await client.text_document_code_lens_async(t.CodeLensParams(text_document=t.TextDocumentIdentifier(uri=uri)))
    assert "up to date" in lens[0].command.title
    status = await execute(client, "hexray.status")
    assert status["server"]["torch_imported"] is False
    assert status["worker"]["alive"] and status["worker"]["pid"] != status["server"]["pid"]


async def test_record_on_save_is_debounced(client):
    text = PROMPTS["ascii"]
    uri = new_doc(client, "save.prompt", text)
    await wait_diagnostics(client, uri, lambda d: codes(d) == ["no-trace"])
    await set_settings(client, {**SETTINGS, "recordOnSave": True, "recordOnSaveDelayMs": 150})
    try:
        edited = text + "One more line.\n"
        edit(client, uri, edited, 2)
        before = set(client.progress_reports)
        for _ in range(3):  # three saves in a row: one recording
            client.text_document_did_save(t.DidSaveTextDocumentParams(text_document=t.TextDocumentIdentifier(uri=uri)))
            await asyncio.sleep(0.03)
        await wait_diagnostics(client, uri, lambda d: codes(d) == [], timeout=600)  # a hang is the failure
        h = await hover_at(client, uri, 2, 1)
        assert h is not None and "Predicted after" in h.contents.value
        await wait_until(lambda: all(r and isinstance(r[-1], t.WorkDoneProgressEnd)
                                     for r in progress_of(client, before)), what="progress end")
        assert len(progress_of(client, before)) == 1
    finally:
        await set_settings(client, dict(SETTINGS))


@vscode_only
async def test_hover_while_recording_and_cancel(client):
    text = PROMPTS["ascii"]
    uri = new_doc(client, "cancel.prompt", text)
    assert (await execute(client, "hexray.recordTrace", uri))["status"] == "recorded"
    trace = client.root / "cancel.hxr"
    shutil.copy(trace, client.root / "other.hxr")  # a second document with a fresh trace, to hover
    other = new_doc(client, "other.prompt", text)
    await wait_diagnostics(client, other, lambda d: codes(d) == [])
    mtime = trace.stat().st_mtime_ns
    edit(client, uri, text + "Changed.\n", 2)
    await wait_diagnostics(client, uri, lambda d: codes(d) == ["stale-trace"])
    client.flag.write_text("slow")
    try:
        # 1. cancel from the progress UI (window/workDoneProgress/cancel)
        before = set(client.progress_reports)
        task = asyncio.ensure_future(execute(client, "hexray.recordTrace", uri))
        await wait_until(lambda: progress_of(client, before), what="progress begin")
        [token] = [tok for tok in client.progress_reports if tok not in before]
        await asyncio.sleep(0.3)
        for _ in range(20):  # the server answers while the worker computes (the recording is still running after)
            assert await hover_at(client, other, 0, 1) is not None
        assert not task.done()
        [lens] = await client.text_document_code_lens_async(
            t.CodeLensParams(text_document=t.TextDocumentIdentifier(uri=uri)))
        assert "recording" in lens.command.title and lens.command.command == "hexray.cancelRecording"
        client.protocol.notify(t.WINDOW_WORK_DONE_PROGRESS_CANCEL, t.WorkDoneProgressCancelParams(token=token))
        res = await asyncio.wait_for(task, 10)
        assert res["status"] == "cancelled"
        assert isinstance(client.progress_reports[token][-1], t.WorkDoneProgressEnd)

        # 2. cancel with the command
        task = asyncio.ensure_future(execute(client, "hexray.recordTrace", uri))
        await asyncio.sleep(0.5)
        assert (await execute(client, "hexray.cancelRecording", uri))["cancelled"] == 1
        assert (await asyncio.wait_for(task, 10))["status"] == "cancelled"

        # 3. a newer recording of the same document supersedes the running one
        first = asyncio.ensure_future(execute(client, "hexray.recordTrace", uri))
        await asyncio.sleep(0.3)
        client.flag.unlink()
        second = asyncio.ensure_future(execute(client, "hexray.recordTrace", uri))
        assert (await asyncio.wait_for(first, 30))["status"] == "superseded"
        assert (await asyncio.wait_for(second, 60))["status"] == "recorded"
    finally:
        if client.flag.exists():
            client.flag.unlink()
    assert trace.stat().st_mtime_ns != mtime
    await wait_diagnostics(client, uri, lambda d: codes(d) == [])
    assert not [p for p in os.listdir(client.root) if p.endswith(".recording.hxr")]


@vscode_only
async def test_record_untitled_document(client):
    """An unsaved, untitled buffer records into $HEXRAY_CACHE/lsp-traces and shows its trace."""
    uri = "untitled:Untitled-7"
    text = "Nothing saved yet 🙂\n"
    client.text_document_did_open(t.DidOpenTextDocumentParams(text_document=t.TextDocumentItem(
        uri=uri, language_id="hexray-prompt", version=1, text=text)))
    await wait_diagnostics(client, uri, lambda d: codes(d) == ["no-trace"])
    res = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri), 60)
    assert res["status"] == "recorded" and res["fresh"]
    assert res["path"].startswith(os.path.join(os.environ["HEXRAY_CACHE"], "lsp-traces"))
    await wait_diagnostics(client, uri, lambda d: codes(d) == [])
    assert await hover_at(client, uri, 0, 2) is not None


@vscode_only
async def test_cancel_request(client):
    uri = new_doc(client, "cancel2.prompt", "Cancel me, please.\n")
    client.flag.write_text("slow")
    try:
        pending = set(client.protocol._request_futures)
        task = asyncio.ensure_future(execute(client, "hexray.recordTrace", uri))
        await asyncio.sleep(0.5)
        [msg_id] = [i for i in client.protocol._request_futures if i not in pending]
        client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=msg_id))
        with pytest.raises(Exception, match="cancel"):
            await asyncio.wait_for(task, 10)
    finally:
        client.flag.unlink()
    status = await execute(client, "hexray.status")
    assert status["documents"][uri]["recording"] is False
    assert not (client.root / "cancel2.hxr").exists()
    # the worker is still warm and usable
    assert (await asyncio.wait_for(execute(client, "hexray.recordTrace", uri), 60))["status"] == "recorded"


@pytest.mark.slow
@vscode_only
async def test_worker_crash_is_survived(client):
    uri = new_doc(client, "crash.prompt", "The worker dies while recording this.\n")
    starts = (await execute(client, "hexray.status"))["worker"]["starts"]
    client.flag.write_text("slow")
    try:
        task = asyncio.ensure_future(execute(client, "hexray.recordTrace", uri))
        await asyncio.sleep(0.6)
        pid = (await execute(client, "hexray.status"))["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        res = await asyncio.wait_for(task, 10)
        assert res["status"] == "error" and "exited unexpectedly" in res["message"]
    finally:
        client.flag.unlink()
    await wait_diagnostics(client, uri, lambda d: "recording-failed" in codes(d))
    assert await hover_at(client, uri, 0, 1) is None  # answered: there is no trace to show
    res = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri), 120)
    assert res["status"] == "recorded"
    status = await execute(client, "hexray.status")
    assert status["worker"]["starts"] == starts + 1 and status["worker"]["alive"]
    await wait_diagnostics(client, uri, lambda d: codes(d) == [])
    assert (await execute(client, "hexray.restartWorker"))["status"] == "stopped"
    assert (await execute(client, "hexray.status"))["worker"]["alive"] is False


@vscode_only
async def test_record_command_with_interventions(client):
    """`hexray.recordTrace [uri, {"interventions": [...]}]`: the worker applies them (file names relative to
    the document's folder) and the trace's metadata lists them; a bad spec fails as one message."""
    import numpy as np

    from trace_format import TraceReader

    np.save(client.root / "steer.npy", np.ones(64, np.float32))
    uri = new_doc(client, "steered.prompt", "The quick brown fox")
    specs = ["L1H2=0", "blocks.0.hook_resid_post@1+=steer.npy*2"]
    res = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri, {"interventions": specs}), 120)
    assert res["status"] == "recorded", res
    with TraceReader(res["path"]) as r:
        assert [iv["spec"] for iv in r.meta["interventions"]] == specs
        assert r.meta["interventions"][1]["file"] == str(client.root / "steer.npy")
    bad = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri, {"interventions": ["L9H0=0"]}), 120)
    assert bad["status"] != "recorded" and "layer 9 does not exist" in bad["message"]


@vscode_only
async def test_record_command_with_feature_interventions(client):
    """`hexray.recordTrace [uri, {"interventions": ["L1F3*8"], "dict": "sae"}]`: the worker reads the dictionary
    (relative to the document's folder), steers by the feature and names the dictionary in the metadata; a feature
    the dictionary lacks, or no dictionary, is one message."""
    from test_feature_interventions import _saelens

    from hexray_core.replay.dictionary import load_dictionary
    from trace_format import TraceReader

    _saelens(client.root / "sae", "blocks.1.hook_resid_pre")
    uri = new_doc(client, "featured.prompt", "The quick brown fox")
    res = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri,
                                         {"interventions": ["L1F3*8"], "dict": "sae"}), 120)
    assert res["status"] == "recorded", res
    with TraceReader(res["path"]) as r:
        iv = r.meta["interventions"][0]
        fp = load_dictionary(str(client.root / "sae")).fingerprint
        assert iv["kind"] == "feature" and iv["dict"]["fingerprint"] == fp
        assert r.meta["features"][0]["fingerprint"] == iv["dict"]["fingerprint"]
    for extra, part in [({"interventions": ["L1F999*8"], "dict": "sae"}, "feature 999 does not exist"),
                        ({"interventions": ["L1F3*8"]}, "needs a dictionary"),
                        ({"interventions": ["L1F3*8"], "dict": 5}, "dict must be a dictionary path")]:
        bad = await asyncio.wait_for(execute(client, "hexray.recordTrace", uri, extra), 120)
        assert bad["status"] != "recorded" and part in bad["message"], bad
