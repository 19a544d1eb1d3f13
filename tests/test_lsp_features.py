"""The language server with a dictionary configured (``features.dictionary``): the hover lists a token's top
features and the ``feature`` inlay hint shows the strongest, both equal to what replay computes for the trace.

A real tiny GPT-2 trace; a random SAE in SAELens's layout (uncentred residual: the trace's centred residual is
shifted back) at layer 1, given relative to the workspace folder.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import pytest_asyncio
from lsp_support import (
    PROMPTS,
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
from safetensors.numpy import save_file

from hexray_core.replay import open_trace
from hexray_core.replay.dictionary import load_dictionary
from hexray_core.replay.features import dictionary_input

pytestmark = pytest.mark.asyncio(loop_scope="module")
HOOK = "blocks.1.hook_resid_pre"


def _sae(path, d_in: int, n: int = 96) -> None:
    rng = np.random.default_rng(3)
    os.makedirs(path, exist_ok=True)
    save_file({"W_enc": (rng.standard_normal((d_in, n)) * 0.3).astype(np.float32),
               "W_dec": (rng.standard_normal((n, d_in)) * 0.3).astype(np.float32),
               "b_enc": (rng.standard_normal(n) * 0.3 - 0.5).astype(np.float32),
               "b_dec": np.zeros(d_in, np.float32)}, os.path.join(path, "sae_weights.safetensors"))
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump({"architecture": "standard", "d_in": d_in, "d_sae": n, "dtype": "float32",
                   "apply_b_dec_to_input": True, "normalize_activations": "none",
                   "metadata": {"hook_name": HOOK, "model_from_pretrained_kwargs": {"center_writing_weights": False}}},
                  f)


@pytest.fixture(scope="module")
def workspace(tiny_gpt2_recorder, tmp_path_factory):
    traces = recorded_traces(tiny_gpt2_recorder, tmp_path_factory.getbasetemp() / "lsp-traces")
    root = make_workspace(tmp_path_factory.mktemp("wsf"), traces)
    _sae(root / "dicts" / "sae", 64)
    _sae(root / "dicts" / "wide", 32)  # another model's width: refused
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(workspace):
    c = await start_client("visual-studio-code", workspace,
                           settings={"features": {"dictionary": "dicts/sae"}, "inlayHints": "feature"})
    yield c
    await stop_client(c)


def expected(root, text: str):
    """(token index, start, end, [(label, activation)] strongest first) from replay."""
    tr = open_trace(str(root / "ascii.hxr"))
    d = load_dictionary(str(root / "dicts" / "sae"))[1]
    acts = d.encode(dictionary_input(tr.run(0), d))
    out = []
    for i, (s, e) in enumerate(tr.runs[0].char_spans):
        if s >= 0:
            order = [int(j) for j in np.argsort(-acts[i], kind="stable") if acts[i, j] > 0]
            out.append((i, s, e, [(f"L1F{j}", float(acts[i, j])) for j in order]))
    return out


async def test_hover_lists_the_tokens_top_features(client, workspace):
    text = PROMPTS["ascii"]
    uri = open_doc(client, workspace / "ascii.prompt")
    await wait_diagnostics(client, uri, lambda d: True)
    toks = expected(workspace, text)
    checked = 0
    for _, s, _, feats in toks[1:6]:
        h = await hover_at(client, uri, *position_of(text, s, client.position_encoding))
        md = h.contents.value
        assert "**Top features** at this token (sae, sae)" in md
        rows = [line for line in md.splitlines() if line.startswith("| L1F")]
        assert [r.split("|")[1].strip() for r in rows] == [label for label, _ in feats[:5]]
        for r, (_, v) in zip(rows, feats, strict=False):
            assert r.split("|")[2].strip() == f"{v:.3g}"
        checked += bool(rows)
    assert checked >= 3


async def test_inlay_hints_show_the_top_feature(client, workspace):
    text = PROMPTS["ascii"]
    uri = (workspace / "ascii.prompt").as_uri()
    if uri not in client.diagnostics:
        open_doc(client, workspace / "ascii.prompt")
        await wait_diagnostics(client, uri, lambda d: True)
    hints = await inlay_hints(client, uri)
    got = {(h.position.line, h.position.character): h.label.lstrip("↵") for h in hints}
    want = {}
    for _, _, e, feats in expected(workspace, text):
        at = e - 1 if text[e - 1] == "\n" else e
        if feats:
            want[position_of(text, at, client.position_encoding)] = f"{feats[0][0]} {feats[0][1]:.3g}"
    assert got == want and len(got) > 5


async def test_a_dictionary_the_trace_cannot_give_is_refused_in_the_hover(workspace):
    c = await start_client("neovim@v0.11.0", workspace, settings={"features": {"dictionary": "dicts/wide"}})
    try:
        uri = open_doc(c, workspace / "ascii.prompt")
        await wait_diagnostics(c, uri, lambda d: True)
        h = await hover_at(c, uri, 0, 5)
        md = h.contents.value
        assert "*Features unavailable:" in md and "d_model 64" in md
        assert "Top features" not in md
    finally:
        await stop_client(c)
