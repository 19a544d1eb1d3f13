"""Replay edge cases found in review: markup in token text, NaN in JSON, broken pipes, aliases of
`--hooks full`, out-of-range target ids, the recorded lens without the kit, diff's side-B target."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hexray.cli import render
from hexray_core.errors import HexRayError
from hexray_core.kit.reader import Kit
from hexray_core.replay import open_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COT = "First line of text.\nSecond line, and more.\nThird line."


@pytest.fixture(scope="module")
def traces(tiny_gpt2_recorder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay-edge")
    main = tiny_gpt2_recorder.record(["The quick brown fox jumps over the lazy dog.", COT], folder / "t.hxr",
                                     act_dtype="float32", lens=True).path
    full = tiny_gpt2_recorder.record("A lazy dog sleeps.", folder / "full.hxr", hooks="full").path
    return main, full


def hexray(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hexray", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def test_token_text_is_never_rich_markup(traces, capsys):
    trace = open_trace(traces[0])
    strs = trace.runs[0].token_strs
    con = render.console()
    for text in ("[/]", "[bold]x:fire:"):  # "[/]" used to raise MarkupError, "[bold]" to vanish
        strs[-1] = text
        trace.runs[0].__dict__.pop("labels", None)  # Run.labels is derived from token_strs once
        render.attribution(con, trace.attribution(-1), 3)
        render.attention(con, trace.attention(-1, top_heads=3))
        render.residual(con, trace.residual(), trace.runs[0].n_tokens - 1)
        render.lens(con, trace.logit_lens(-1), 3)
        out = capsys.readouterr().out
        for head in ("Token: ", "Attention from ", "Residual stream at ", "Logit lens at "):
            assert f"{head}{json.dumps(text)} (index" in out, (head, out)


def test_json_has_no_nan_and_plain_numbers(capsys):
    render.print_json({"a": float("nan"), "b": np.float32("inf"), "c": (np.int64(3), np.bool_(True)),
                       "d": np.array([1.5, np.nan]), "e": -float("inf"), "f": "x"})

    def reject(name):
        raise AssertionError(f"not JSON: {name}")

    data = json.loads(capsys.readouterr().out, parse_constant=reject)
    assert data == {"a": None, "b": None, "c": [3, True], "d": [1.5, None], "e": None, "f": "x"}


def test_closed_stdout_is_not_a_traceback(traces):
    proc = subprocess.Popen([sys.executable, "-m", "hexray", "replay", traces[0], "--by", "neuron", "--json",
                             "--top-k", "5"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -0`: closed before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert err == ""


def test_aliases_of_hooks_full_resolve(traces):
    trace = open_trace(traces[1])
    aliases = trace.runs[0].info.get("aliases") or {}
    assert aliases, "a --hooks full trace of a GPT-2 records aliases"
    name, stored = next(iter(aliases.items()))
    assert not trace.reader.has(name, 0) and trace.has(name)
    np.testing.assert_array_equal(trace.tensor(name), trace.tensor(stored))
    out = hexray("replay", traces[1], "--lens", "--resid", "--attention", "--cot", "--by", "head")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("target", ["#99999", 99999, -1])
def test_lens_target_outside_the_vocabulary(traces, target):
    with pytest.raises(HexRayError, match="outside the vocabulary"):
        open_trace(traces[0]).logit_lens(-1, target=target)


def test_recorded_lens_serves_any_spelling_and_needs_no_kit(traces, tmp_path):
    trace = open_trace(traces[0])
    assert trace.has("hexray.lens_topk_ids")
    top_text = trace.attribution(-1).target
    env = {"HEXRAY_CACHE": str(tmp_path / "empty")}
    for args in (["--target", top_text], ["--top-k", "40", "--json"], ["--target", "next", "--position", "2"]):
        out = hexray("replay", traces[0], "--lens", *args, env=env)
        assert out.returncode == 0, (args, out.stderr)
    by_text = trace.logit_lens(-1, target=top_text)
    by_top = trace.logit_lens(-1)
    assert [la.target_rank for la in by_text.layers] == [la.target_rank for la in by_top.layers]


@pytest.mark.parametrize("command", ["replay", "diff"])
def test_top_k_must_be_positive(traces, command):
    out = hexray(command, traces[0], "--top-k", "0")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["hexray: error: --top-k must be at least 1, not 0"]


def test_diff_side_b_target_and_messages(traces):
    a, b = open_trace(traces[0]), open_trace(traces[1])
    assert b.token_id("987654") == 987654  # bare digits that are no token's text: an id, unless literal
    with pytest.raises(HexRayError, match="unknown target token"):
        b.token_id("987654", literal=True)
    assert b.token_id("#7") == 7  # '#id' is an id only when not literal
    with pytest.raises(HexRayError, match="unknown target token"):
        b.token_id("#987654", literal=True)
    from hexray_core.replay import attribution_diff

    d = attribution_diff(a, b)  # same tokenizer: the very same id on both sides
    assert d.a.target_id == d.b.target_id
    p = b.runs[0].n_tokens
    assert a.runs[0].n_tokens > p
    out = hexray("diff", traces[0], traces[1], "--position", p)
    assert out.returncode == 1
    assert f"side B: --position {p} is out of range" in out.stderr and "pick a target" not in out.stderr


def test_cot_reports_the_split_it_used(traces):
    assert open_trace(traces[0]).cot(1).mode == "lines"
    assert open_trace(traces[0]).cot(0).mode == "sentences"


def test_incomplete_kit_is_a_user_error(traces):
    trace = open_trace(traces[0])
    kit = Kit(trace.reader, "nothing-here/", None, None)
    with pytest.raises(HexRayError, match="has no W_O"):
        kit["W_O"]
