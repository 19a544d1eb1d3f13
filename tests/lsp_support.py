"""Helpers for the language-server tests (owned by the LSP work; conftest.py belongs to the recorder).

* `write_synthetic_trace`: a contract-conformant `.hxr` recording (docs/ARCHITECTURE.md, "What a
  recording contains") made with numpy only, whose numbers are self-consistent (every logit is
  the sum of its direct contributions, per-head and per-neuron sums match the layer outputs).
  It needs no torch, so the pure unit tests run in milliseconds, and it can build shapes a real
  tokenizer makes rarely (tokens that split a character, overlapping spans, several runs, a
  generated continuation, no kit).
* `tiny_gpt2_factory` / `tiny_gpt2_big_context_factory` / `crashing_factory`: model factories for
  the record worker's ``modelFactory`` setting (``tests.lsp_support:tiny_gpt2_factory``).
* `recorded_traces`: real traces of the test prompts, recorded once per test session with the
  conftest's ``tiny_gpt2_recorder`` (in-process, no worker).
* LSP client helpers shared by the test modules: `start_client`, `stop_client`, `open_doc`,
  `hover_at`, `units`, `position_of`.

Every client runs the real server over stdio (``python -m hexray_lsp``) with the capabilities
pytest-lsp recorded from VS Code 1.65 (utf-16), Neovim 0.11 (utf-8) and Emacs 29 eglot (utf-32).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TOKEN_RE = re.compile(r" ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]|\s+")


def synthetic_tokenize(text: str, *, split_non_ascii: bool = True):
    """Word-ish tokens; every non-ASCII character is split into one token per UTF-8 byte.

    Returns (token_strs, char_spans, byte_spans) per the trace contract: a token that covers part of a
    character gets the whole character's span.
    """
    strs, cspans, bspans = [], [], []
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8", "surrogatepass")))
    for m in _TOKEN_RE.finditer(text):
        s, e = m.start(), m.end()
        piece = m.group()
        if split_non_ascii and not piece.isascii():
            i = s
            while i < e:
                ch = text[i]
                if ch.isascii():
                    j = i
                    while j < e and text[j].isascii():
                        j += 1
                    strs.append(text[i:j])
                    cspans.append([i, j])
                    bspans.append([byte_at[i], byte_at[j]])
                    i = j
                    continue
                b = ch.encode("utf-8", "surrogatepass")
                for k in range(len(b)):
                    strs.append(ch if len(b) == 1 else "\ufffd")
                    cspans.append([i, i + 1])
                    bspans.append([byte_at[i] + k, byte_at[i] + k + 1])
                i += 1
        else:
            strs.append(piece)
            cspans.append([s, e])
            bspans.append([byte_at[s], byte_at[e]])
    return strs, cspans, bspans


def write_synthetic_trace(path, texts, *, n_layers: int = 2, d_model: int = 16, n_heads: int = 2, d_mlp: int = 32,
                          top_k: int = 5, bos: bool = True, bundle_kit: bool = True, seed: int = 0,
                          generated: str = "", model_name: str = "synthetic", peaked: float = 3.0) -> str:
    """Write a recording of ``texts`` (one run each) by a random numpy 'model'. Returns the path."""
    from trace_format import WEIGHTS_RUN, TraceWriter

    if isinstance(texts, str):
        texts = [texts]
    rng = np.random.default_rng(seed)
    runs = []
    vocab: dict[str, int] = {"<|bos|>": 0}
    for text in texts:
        full = text + generated
        strs, cspans, bspans = synthetic_tokenize(full)
        ids = []
        for i, s in enumerate(strs):
            key = s if s != "\ufffd" else f"<0x{full.encode()[bspans[i][0]]:02X}>"
            ids.append(vocab.setdefault(key, len(vocab)))
        n_prompt = len(synthetic_tokenize(text)[0])
        if bos:
            strs, cspans, bspans, ids = (["<|bos|>"] + strs, [[-1, -1]] + cspans, [[-1, -1]] + bspans, [0] + ids)
            n_prompt += 1
        runs.append((full, strs, cspans, bspans, ids, n_prompt))
    names = sorted(vocab, key=vocab.get)
    for extra in (" the", " a", ".", "\n", " model"):
        if extra not in vocab:
            vocab[extra] = len(vocab)
            names.append(extra)
    V = len(vocab) + 8
    names += [f"<extra{i}>" for i in range(V - len(names))]
    d_head = d_model // n_heads
    W_U = rng.normal(size=(d_model, V)).astype(np.float32)
    b_U = (0.1 * rng.normal(size=V)).astype(np.float32)
    W_O = (0.5 * rng.normal(size=(n_layers, n_heads, d_head, d_model))).astype(np.float32)
    b_O = (0.1 * rng.normal(size=(n_layers, d_model))).astype(np.float32)
    W_out = (0.3 * rng.normal(size=(n_layers, d_mlp, d_model))).astype(np.float32)
    b_out = (0.1 * rng.normal(size=(n_layers, d_model))).astype(np.float32)
    kit_sha = f"{seed:016x}" + "ab" * 24
    meta = {
        "hexray": {"version": "0.1.0", "trace": "recording"},
        "model": {"name": model_name, "source": "memory", "class": "Synthetic", "dtype": "float32",
                  "config": {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_head": d_head,
                             "d_mlp": d_mlp, "d_vocab": V, "n_ctx": 1 << 16, "normalization_type": "LN",
                             "positional_embedding_type": "standard", "gated_mlp": False}},
        "tokenizer": {"name": "synthetic", "vocab_size": V, "bos_token_id": 0 if bos else None},
        "kit": {"sha256": kit_sha, "bundled": bundle_kit, "vocab": names},
        "hooks": {"set": "default"},
    }
    with TraceWriter(path, meta=meta) as w:
        for full, strs, cspans, bspans, ids, n_prompt in runs:
            n = len(ids)
            w.begin_run(prompt=full, tokens=ids, token_strs=strs, char_spans=cspans, byte_spans=bspans,
                        n_prompt_tokens=n_prompt, generated={"n": n - n_prompt, "temperature": 0.0, "seed": None},
                        prepend_bos=bos)
            embed = rng.normal(size=(n, d_model)).astype(np.float32)
            # make the actual next token likely: push the embedding toward its unembedding
            for p in range(n - 1):
                embed[p] += peaked * W_U[:, ids[p + 1]] / np.linalg.norm(W_U[:, ids[p + 1]]) * rng.uniform(0, 2)
            pos = (0.3 * rng.normal(size=(n, d_model))).astype(np.float32)
            w.write("hook_embed", embed)
            w.write("hook_pos_embed", pos)
            resid = embed + pos
            for layer in range(n_layers):
                w.write(f"blocks.{layer}.hook_resid_pre", resid)
                z = (0.5 * rng.normal(size=(n, n_heads, d_head))).astype(np.float32)
                attn = np.einsum("nhk,hkd->nd", z, W_O[layer]) + b_O[layer]
                post = np.maximum(rng.normal(size=(n, d_mlp)), 0).astype(np.float32)
                mlp = post @ W_out[layer] + b_out[layer]
                w.write(f"blocks.{layer}.attn.hook_z", z)
                w.write(f"blocks.{layer}.hook_attn_out", attn.astype(np.float32))
                w.write(f"blocks.{layer}.mlp.hook_post", post)
                w.write(f"blocks.{layer}.hook_mlp_out", mlp.astype(np.float32))
                resid = (resid + attn + mlp).astype(np.float32)
                w.write(f"blocks.{layer}.hook_resid_post", resid)
            centred = resid - resid.mean(-1, keepdims=True)
            scale = np.sqrt((centred.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5).astype(np.float32)
            w.write("ln_final.hook_scale", scale)
            logits = (centred / scale) @ W_U + b_U
            lse = np.logaddexp.reduce(logits.astype(np.float64), axis=-1)
            k = min(top_k, V)
            top = np.argsort(-logits, axis=-1)[:, :k]
            w.write("hexray.topk_ids", top.astype(np.int32))
            w.write("hexray.topk_logits", np.take_along_axis(logits, top, -1).astype(np.float32))
            nxt = np.full(n, np.nan, dtype=np.float32)
            nxt[:-1] = logits[np.arange(n - 1), ids[1:]]
            w.write("hexray.next_logit", nxt)
            w.write("hexray.logsumexp", lse.astype(np.float32))
            uids = np.unique(np.concatenate([np.asarray(ids), top.reshape(-1)])).astype(np.int32)
            w.write("hexray.unembed_ids", uids)
            w.write("hexray.unembed_cols", np.ascontiguousarray(W_U[:, uids].T))
            w.write("hexray.unembed_bias", b_U[uids])
            w.end_run()
        if bundle_kit:
            for name, arr in (("W_U", W_U), ("b_U", b_U), ("W_O", W_O), ("b_O", b_O), ("W_out", W_out),
                              ("b_out", b_out)):
                w.write(f"kit/{name}", arr, run=WEIGHTS_RUN)
    return os.fspath(path)


# -- model factories for the worker's `modelFactory` setting ------------------------------------

SLOW_FLAG_ENV = "HEXRAY_TEST_SLOW_FLAG"


def _tiny(n_ctx: int):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tests import tiny_models

    tok = tiny_models.build_tokenizer()
    model = tiny_models.build_tiny_gpt2(tok, n_ctx=n_ctx)
    flag = os.environ.get(SLOW_FLAG_ENV)
    if flag:
        # While the flag file exists every block takes 0.6 s longer: recordings last long enough to
        # be cancelled, or to have their worker killed, in the middle of the forward pass.
        import time

        def slow(_module, _inputs, _output):
            if os.path.exists(flag):
                time.sleep(0.6)

        for block in model.transformer.h:
            block.register_forward_hook(slow)
    return model, tok


def tiny_gpt2_factory():
    """Tiny GPT-2 (2 layers, d_model 64, n_ctx 256) with the in-memory byte-level BPE tokenizer.

    With $HEXRAY_TEST_SLOW_FLAG set to a path, each block sleeps 0.6 s while that file exists.
    """
    return _tiny(256)


def tiny_gpt2_big_context_factory():
    """The same tiny GPT-2 with n_ctx 8192, for the 6,000-token benchmark."""
    return _tiny(8192)


def crashing_factory():
    """A factory that kills the worker process, to test that the server survives it."""
    os._exit(3)


# -- LSP client helpers ---------------------------------------------------------------------------

def units(s: str, encoding: str) -> int:
    if encoding == "utf-8":
        return len(s.encode("utf-8"))
    if encoding == "utf-32":
        return len(s)
    return len(s.encode("utf-16-le")) // 2


def position_of(text: str, offset: int, encoding: str) -> tuple[int, int]:
    """LSP (line, character) of a code point offset, computed independently of the server's index.

    An offset between the ``\\r`` and ``\\n`` of one line break has no position of its own: it is
    the end of its line (where the ``\\r`` is).
    """
    if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n":
        offset -= 1
    line_start = 0
    line = 0
    for m in re.finditer(r"\r\n|\r|\n", text):
        if m.end() > offset:
            break
        line += 1
        line_start = m.end()
    return line, units(text[line_start:offset], encoding)


# -- test prompts and their traces -------------------------------------------------------------

CLIENTS = ["visual-studio-code", "neovim@v0.11.0", "emacs"]
ENCODINGS = {"visual-studio-code": "utf-16", "neovim@v0.11.0": "utf-8", "emacs": "utf-32"}

#: ASCII, emoji (incl. a ZWJ sequence), CJK, a combining mark, CRLF, a lone CR, U+2028 and a
#: form feed (not line breaks in LSP).
PROMPTS = {
    "mixed": "The cat 🐱 sat on the mat.\r\n東京は日本の首都です。\rnaïve cafe\u0301 👨\u200d👩\u200d👧 ok\n",
    "ascii": "The quick brown fox jumps over the lazy dog.\nAlice and Bob went to the store.\n",
    "odd": "a\u2028b 🙂\x0cc\nthe model 😀 predicts\n",
}

_RECORDED: dict[str, str] = {}


def recorded_traces(recorder, folder) -> dict[str, str]:
    """``{name: trace path}`` of PROMPTS recorded once per session (kit in $HEXRAY_CACHE)."""
    if not _RECORDED:
        os.makedirs(folder, exist_ok=True)
        for name, text in PROMPTS.items():
            _RECORDED[name] = recorder.record(text, os.path.join(folder, f"{name}.hxr")).path
    return dict(_RECORDED)


def make_workspace(root, traces: dict[str, str]) -> Path:
    """A workspace: name.prompt + name.hxr for every prompt, cached/cjk.prompt with its trace in the
    trace folder, and nothing.prompt without a trace."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, text in PROMPTS.items():
        (root / f"{name}.prompt").write_text(text, encoding="utf-8", newline="")
        shutil.copy(traces[name], root / f"{name}.hxr")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "cached.prompt").write_text(PROMPTS["mixed"], encoding="utf-8", newline="")
    cache = root / ".hexray" / "traces" / "sub"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(traces["mixed"], cache / "cached.hxr")
    (root / "nothing.prompt").write_text("No trace for me.\n", encoding="utf-8")
    nokit = "A trace whose model kit is nowhere.\n"
    (root / "nokit.prompt").write_text(nokit, encoding="utf-8")
    write_synthetic_trace(root / "nokit.hxr", nokit, bundle_kit=False, seed=7)
    return root


# -- clients ---------------------------------------------------------------------------------------

def server_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    env.update({k: str(v) for k, v in extra.items()})
    return env


async def start_client(client_name: str, root, settings: dict | None = None, **env):
    """Start ``python -m hexray_lsp`` and initialize it as ``client_name`` would (``.name``, ``.root``); the server
    must pick the position encoding that client prefers."""
    from lsprotocol import types as t
    from pytest_lsp import ClientServerConfig, client_capabilities

    config = ClientServerConfig(server_command=[sys.executable, "-m", "hexray_lsp"], server_env=server_env(**env))
    client = await config.start()
    client.refreshes = []
    client.registrations = []
    for method in (t.WORKSPACE_INLAY_HINT_REFRESH, t.WORKSPACE_CODE_LENS_REFRESH):
        client.feature(method)(lambda params, m=method: client.refreshes.append(m))
    client.feature(t.CLIENT_REGISTER_CAPABILITY)(lambda params: client.registrations.extend(params.registrations))
    if settings is not None:
        client.set_configuration({"hexray": settings})
    root_uri = Path(root).as_uri()
    result = await client.initialize_session(t.InitializeParams(
        capabilities=client_capabilities(client_name), root_uri=root_uri,
        workspace_folders=[t.WorkspaceFolder(uri=root_uri, name="ws")],
        initialization_options={"hexray": settings} if settings is not None else None))
    client.position_encoding = result.capabilities.position_encoding or "utf-16"
    client.server_capabilities = result.capabilities
    client.name, client.root = client_name, root
    assert client.position_encoding == ENCODINGS.get(client_name, client.position_encoding)
    return client


async def stop_client(client) -> None:
    try:
        await asyncio.wait_for(client.shutdown_session(), 15)
    finally:
        await client.stop()


def open_doc(client, path, text: str | None = None, language_id: str = "hexray-prompt", version: int = 1) -> str:
    from lsprotocol import types as t

    path = Path(path)
    if text is None:
        text = path.read_bytes().decode("utf-8") if path.exists() else ""
    uri = path.as_uri()
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        text_document=t.TextDocumentItem(uri=uri, language_id=language_id, version=version, text=text)))
    return uri


async def wait_diagnostics(client, uri: str, pred, timeout: float = 10.0):
    """Wait until the diagnostics published for ``uri`` satisfy ``pred`` (a function of the list)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        diags = list(client.diagnostics.get(uri, ()))
        if uri in client.diagnostics and pred(diags):
            return diags
        if loop.time() > end:
            raise AssertionError(f"diagnostics for {uri} never matched; last: {[(d.code, d.message) for d in diags]}")
        await asyncio.sleep(0.02)


def codes(diags) -> list:
    return [d.code for d in diags]


async def hover_at(client, uri: str, line: int, character: int):
    from lsprotocol import types as t

    return await client.text_document_hover_async(t.HoverParams(
        text_document=t.TextDocumentIdentifier(uri=uri), position=t.Position(line=line, character=character)))


async def inlay_hints(client, uri: str, start=(0, 0), end=(10_000, 0)):
    from lsprotocol import types as t

    return await client.text_document_inlay_hint_async(t.InlayHintParams(
        text_document=t.TextDocumentIdentifier(uri=uri),
        range=t.Range(start=t.Position(line=start[0], character=start[1]),
                      end=t.Position(line=end[0], character=end[1]))))


async def execute(client, command: str, *args):
    from lsprotocol import types as t

    return await client.workspace_execute_command_async(t.ExecuteCommandParams(command=command, arguments=list(args)))
