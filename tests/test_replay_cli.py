"""`hexray replay` / `hexray diff` / the one-shot mode on real traces, and the replay helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hexray_core.errors import HexRayError
from hexray_core.replay import open_trace, split_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COT = "If John has 3 apples and buys 2 more,\nhe has 3 + 2 = 5 apples.\nSo the answer is 5 🍎."


@pytest.fixture(scope="module")
def traces(tiny_gpt2_recorder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay-cli")
    main = tiny_gpt2_recorder.record(["The quick brown fox jumps over the lazy dog.", COT],
                                     folder / "t.hxr", act_dtype="float32").path
    other = tiny_gpt2_recorder.record("A lazy dog sleeps.", folder / "other.hxr", act_dtype="float32").path
    return main, other


def hexray(*args, env=None, input=None):
    return subprocess.run([sys.executable, "-m", "hexray", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, input=input, timeout=300)


def test_replay_prints_the_seed_table_without_importing_torch(traces):
    code = ("import sys; from hexray.cli.main import main; rc = main(['replay', sys.argv[1], '--top-k', '5']); "
            "bad = [m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules]; "
            "print('IMPORTED', bad); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, traces[0]], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    lines = out.stdout.splitlines()
    assert lines[0] == f'Token: "." (index {open_trace(traces[0]).run(0).n_tokens - 1})'
    n_parts = 2 + 2 * 2  # Embed, PosEmbed and two layers' attention and MLP
    assert lines[2] == f"Top Contributors to Final Logit (% of the total |attribution| of all {n_parts} parts):"
    rows = [ln for ln in lines if ln.startswith("- ")]
    assert len(rows) == 5
    import re

    pattern = re.compile(r"^- (Embed   |PosEmbed|Attn L\d|MLP  L\d) ?: [+-]\d+\.\d\d \(\d+\.\d%\)$")
    assert all(pattern.match(r) for r in rows), rows
    shares = [float(r.rsplit("(", 1)[1].rstrip("%)")) for r in rows]
    a = open_trace(traces[0]).attribution()
    total = sum(abs(c.value) for c in a.contributions if c.kind != "bias")
    assert shares == [pytest.approx(100 * abs(c.value) / total, abs=0.051) for c in a.top(5)]


def test_replay_json_schema_and_completeness(traces):
    out = hexray("replay", traces[0], "--json", "--top-k", "3", "--position", "4", "--target", "next")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)["attribution"]
    trace = open_trace(traces[0])
    assert data["position"] == 4 and data["target_id"] == trace.runs[0].tokens[5]
    assert {"token", "target", "logit", "total", "error", "probability", "contributions", "top"} <= set(data)
    assert abs(sum(c["value"] for c in data["contributions"]) - data["logit"]) < 1e-4
    assert [c["label"] for c in data["top"]] == [c.label for c in trace.attribution(4, target="next").top(3)]


def test_all_views_render_and_json(traces):
    out = hexray("replay", traces[0], "--run", "1", "--lens", "--resid", "--attention", "--cot")
    assert out.returncode == 0, out.stderr
    for text in ("Logit lens", "Residual stream", "Attention from", "Chain of Thought Attribution Trace", "Step 3:"):
        assert text in out.stdout
    data = json.loads(hexray("replay", traces[0], "--run", "1", "--lens", "--resid", "--attention", "--cot",
                             "--json").stdout)
    assert set(data) == {"lens", "resid", "attention", "cot"}
    assert len(data["lens"]["layers"]) == 3
    assert len(data["resid"]["resid_norm"]) == 2
    assert len(data["cot"]["steps"]) == 3


def test_baseline_is_a_logit_difference(traces):
    trace = open_trace(traces[0])
    run = trace.runs[0]
    a = trace.attribution(-1, target="top")
    second = int(trace.tensor("hexray.topk_ids")[-1, 1])
    d = trace.attribution(-1, target="top", baseline=f"#{second}")
    b = trace.attribution(-1, target=f"#{second}")
    assert d.logit == pytest.approx(a.logit - b.logit, abs=1e-5)
    assert d.error < 1e-4
    assert run.n_tokens > 2


@pytest.mark.parametrize("args, message", [
    (["replay", "/nonexistent/t.hxr"], "no such file"),
    (["replay", "{trace}", "--position", "999"], "--position 999 is out of range"),
    (["replay", "{trace}", "--run", "7"], "there is no run 7"),
    (["replay", "{trace}", "--target", "zzzz-not-a-token"], "unknown target token"),
    (["replay", "{notatrace}"], "not an .hxr trace"),
    (["replay", "{corrupt}"], "hexray: error:"),
])
def test_bad_input_is_one_line_and_nonzero(traces, tmp_path, args, message):
    notatrace = tmp_path / "x.hxr"
    notatrace.write_text("hello, I am a text file, not a trace at all; " * 4)
    corrupt = tmp_path / "c.hxr"
    data = bytearray(open(traces[0], "rb").read())
    corrupt.write_bytes(bytes(data[: len(data) // 2]))
    args = [a.format(trace=traces[0], notatrace=notatrace, corrupt=corrupt) for a in args]
    out = hexray(*args)
    assert out.returncode != 0
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr


def test_missing_kit_is_named_and_the_rest_still_works(traces, tmp_path):
    env = {"HEXRAY_CACHE": str(tmp_path / "empty-cache")}
    sha = open_trace(traces[0]).meta["kit"]["sha256"]
    out = hexray("replay", traces[0], "--by", "head", env=env)
    assert out.returncode == 1
    assert sha[:16] in out.stderr and "--bundle" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert hexray("replay", traces[0], env=env).returncode == 0  # per-layer attribution needs no kit
    assert hexray("replay", traces[0], "--cot", "--run", "1", env=env).returncode == 0


def test_diff_two_traces_and_two_runs(traces):
    out = hexray("diff", traces[0], traces[1], "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["a"]["target"] == data["b"]["target"]
    deltas = [abs(r["delta"]) for r in data["rows"]]
    assert deltas == sorted(deltas, reverse=True)
    for r in data["rows"]:
        assert r["delta"] == pytest.approx((r["b"] or 0) - (r["a"] or 0))
    out = hexray("diff", traces[0], "--runs", "0", "1")
    assert out.returncode == 0 and "Largest changes" in out.stdout


def test_step_splitting():
    text = "Step 1: add.\nStep 2: carry the one. Then stop.\n\nStep 3: done!"
    assert [text[a:b].strip() for a, b in split_steps(text, "lines")] == [
        "Step 1: add.", "Step 2: carry the one. Then stop.", "Step 3: done!"]
    assert [text[a:b].strip() for a, b in split_steps(text, "sentences")] == [
        "Step 1: add.", "Step 2: carry the one.", "Then stop.", "Step 3: done!"]
    assert [text[a:b].strip() for a, b in split_steps(text, step_regex=r"Step \d+:")] == [
        "Step 1: add.", "Step 2: carry the one. Then stop.", "Step 3: done!"]
    one = "One sentence only. And two."
    assert [one[a:b] for a, b in split_steps(one)] == ["One sentence only. ", "And two."]
    with pytest.raises(HexRayError, match="matches nowhere") as e:
        split_steps(text, step_regex=r"Lemma \d+:")
    assert "'Lemma \\d+:'" in str(e.value)  # as typed: one backslash, not repr's two
    with pytest.raises(HexRayError, match="bad step_regex="):
        split_steps(text, step_regex="(")


def test_cot_aggregates_each_steps_next_token_attribution(traces):
    trace = open_trace(traces[0])
    cot = trace.cot(1)
    run = trace.runs[1]
    assert [s.text for s in cot.steps] == [ln.strip() for ln in COT.splitlines()]
    for step in cot.steps:
        start, end = step.tokens
        # A step's total is the sum of the recorded logits of its tokens (each explained at the position before).
        expected = sum(trace.attribution(p - 1, 1, target="next").logit for p in range(max(start, 1), end))
        assert step.total == pytest.approx(expected, abs=1e-3)
        assert sum(v for _, v in step.components) + 0 == pytest.approx(
            step.total - sum(trace.attribution(p - 1, 1, target="next").by_label()["Bias"]
                             for p in range(max(start, 1), end)), abs=1e-3)
    assert cot.steps[0].attends_to == []
    assert [j for j, _ in cot.steps[2].attends_to] and {j for j, _ in cot.steps[2].attends_to} == {0, 1}
    masses = cot.attention
    for i, row in enumerate(masses):
        assert sum(row[: i + 1]) <= 1.0 + 1e-6 and all(m == 0 for m in row[i + 1:])
    assert run.n_tokens == len(run.char_spans)


@pytest.mark.slow
def test_oneshot_records_and_replays_with_the_model_loaded_once(tiny_gpt2_dir):
    out = hexray("--prompt", COT, "--cot-debug", "--top-k-attribution", "4", "--model", tiny_gpt2_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('Token: "')
    assert "Top Contributors to Final Logit:" in out.stdout
    assert "Chain of Thought Attribution Trace" in out.stdout
    assert len([ln for ln in out.stdout.splitlines() if ln.startswith("- ")]) == 4
    assert out.stderr.count("loading ") == 1


def test_python_api(traces):
    import hexray

    t = hexray.open(traces[0])
    assert t.runs[0].prompt.startswith("The quick")
    resid = t.tensor("blocks.1.hook_resid_post")
    assert resid.shape == (t.runs[0].n_tokens, 64) and str(resid.dtype) == "float32"
    assert t.attribution().top(3)[0].label
    assert t.logit_lens().layers[-1].target_rank == 1


def test_recording_without_torch_is_one_line_naming_the_extra(tmp_path):
    """A replay-only install (no torch) that tries to record gets the install command, not a traceback."""
    code = ("import sys; sys.modules['torch'] = None; from hexray.cli.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    for args in (["record", "--model", "hexray-demo", "--prompt", "hi", "-o", str(tmp_path / "t.hxr")],
                 ["--model", "hexray-demo", "--prompt", "hi", "-q"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert out.returncode == 1
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("hexray: error:")]
        assert len(errors) == 1 and "hexray[record]" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "t.hxr").exists()


def test_tokens_that_split_a_character_show_their_bytes(traces):
    import re

    run = open_trace(traces[0]).runs[1]  # COT holds 🍎, which the tiny tokenizer splits into byte tokens
    split = [i for i, s in enumerate(run.token_strs) if "\ufffd" in s]
    assert split, "the fixture should contain a token holding part of a character"
    for i in split:
        assert "\ufffd" not in run.labels[i] and re.search(r"(\\x[0-9a-f]{2})+", run.labels[i])

    def as_bytes(label: str) -> bytes:  # undo the display: \xNN escapes back to bytes, the rest as UTF-8
        parts = re.split(r"((?:\\x[0-9a-f]{2})+)", label)
        return b"".join(bytes.fromhex(p.replace("\\x", "")) if p.startswith("\\x") else p.encode() for p in parts)

    first = 1 if run.char_spans[0] == (-1, -1) else 0  # BOS
    assert b"".join(as_bytes(label) for label in run.labels[first:]) == run.prompt.encode()
    out = hexray("replay", traces[0], "--run", "1", "--position", str(split[-1]), "--top-k", "2")
    assert out.returncode == 0 and f'Token: "{run.labels[split[-1]]}"' in out.stdout


def _rows(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("- ")]


def _share(row: str) -> str:
    return row.rsplit("(", 1)[1]


@pytest.mark.slow
def test_a_share_does_not_change_with_the_rows_shown(traces, tiny_gpt2_dir):
    few, many = (_rows(hexray("replay", traces[0], "--top-k", k).stdout) for k in (2, 6))
    assert few == many[:2]  # same rows, same figures
    few_json, many_json = (json.loads(hexray("replay", traces[0], "--top-k", k, "--json").stdout) for k in (2, 6))
    assert few_json["attribution"]["top"] == many_json["attribution"]["top"][:2]
    # the one-shot seed format keeps shares over the rows it shows (and says nothing else in its header)
    out = hexray("--prompt", "The quick brown fox", "--top-k-attribution", "2", "--model", tiny_gpt2_dir, "-q")
    assert "Top Contributors to Final Logit:\n" in out.stdout
    assert sum(float(_share(r).rstrip("%)")) for r in _rows(out.stdout)) == pytest.approx(100, abs=0.2)


@pytest.mark.parametrize("by, kinds", [("head", ["LxHy:", "Attn Lx bias:", "Embed, PosEmbed, MLP  Lx:"]),
                                       ("neuron", ["LxNy:", "MLP  Lx bias:", "Embed, PosEmbed, Attn Lx:"])])
def test_finer_rows_are_aligned_and_explained(traces, by, kinds):
    out = hexray("replay", traces[0], "--by", by, "--top-k", "400")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [ln.strip().split(" ")[0] for ln in lines[3:6]] == [k.split(" ")[0] for k in kinds]
    assert all(ln.strip().startswith(k) for ln, k in zip(lines[3:6], kinds, strict=True))
    rows = _rows(out.stdout)
    assert any(" bias" in r for r in rows) and any(r[2:].startswith(("Embed", "PosEmbed")) for r in rows)
    assert len({r.index(":") for r in rows}) == 1, rows  # one column for the colon, "Attn L1 bias" included


def test_lens_shows_the_top_k_asked_for(traces, tmp_path):
    out = hexray("replay", traces[0], "--lens", "--top-k", "8")
    assert out.returncode == 0, out.stderr
    body = [ln for ln in out.stdout.splitlines() if ln.startswith("│")]
    assert "top 8" in out.stdout and len(body) == 3
    assert all(ln.split("│")[2].count("%") == 8 for ln in body)
    # without the kit only the recorded top 20 exist: asked for more, it shows 20 and says why
    env = {"HEXRAY_CACHE": str(tmp_path / "empty-cache")}
    t = open_trace(traces[0])
    if t.has("hexray.lens_topk_ids"):
        out = hexray("replay", traces[0], "--lens", "--top-k", "30", env=env)
        assert out.returncode == 0 and "top 20, not 30" in out.stdout


def _run_in_terminal(args: list[str], columns: int) -> str:
    """Run the CLI on a real pseudo-terminal of `columns` columns; its output as text (ANSI codes removed)."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of that size
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        os.environ.pop("COLUMNS", None)
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "hexray", *args])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode()).replace("\r\n", "\n")


def test_tables_fit_an_80_column_terminal_and_never_wrap_when_piped(traces):
    from rich.cells import cell_len

    args = ["replay", traces[0], "--run", "1", "--lens", "--attention", "--top-k", "12", "--by", "neuron"]
    shown = _run_in_terminal([str(a) for a in args], 80)
    lines = [ln for ln in shown.splitlines() if ln.strip()]
    assert lines and max(cell_len(ln) for ln in lines) <= 80, shown
    lens_rows = [ln for ln in lines if ln.startswith("│ L") and "pre" in ln]
    assert lens_rows and all("…" in ln for ln in lens_rows)  # the wide column shrank, cut with an ellipsis
    assert all(ln.rstrip(" │").endswith("%") for ln in lens_rows)  # the narrow columns kept their figures
    piped = hexray(*args).stdout
    table_lines = [ln for ln in piped.splitlines() if ln.startswith(("│", "┃", "┏", "┡", "└"))]
    lens_table = table_lines[:next(i for i, ln in enumerate(table_lines) if ln.startswith("└")) + 1]
    widths = {cell_len(ln) for ln in lens_table}
    assert len(widths) == 1 and widths.pop() > 80  # one line per row, however long: no wrapping in a pipe
    assert "…" not in piped
    diff = hexray("diff", traces[0], "--runs", "0", "1").stdout
    assert "Largest changes in attribution (B − A)\n" in diff  # the title is one line, not wrapped to the table
    info = hexray("info", traces[0]).stdout.splitlines()
    (writer,) = [ln for ln in info if ln.startswith("  writer   ")]
    assert "platform" in writer and len(writer) > 80  # one line in a pipe
    shown = _run_in_terminal(["info", str(traces[0])], 80).splitlines()
    assert max(cell_len(ln) for ln in shown) <= 80
    (writer,) = [ln for ln in shown if ln.startswith("  writer   ")]  # cut with an ellipsis, not wrapped
    assert writer.rstrip().endswith("…") and not any(ln.startswith("platform") for ln in shown)


def test_cot_step_label_is_shown_once(tiny_gpt2_recorder, tmp_path):
    path = tiny_gpt2_recorder.record("Step 1: read the question. Step 2: write the answer.", tmp_path / "s.hxr").path
    out = hexray("replay", path, "--cot", "--step-regex", r"Step \d+:")
    assert out.returncode == 0, out.stderr
    assert "Step 1: read the question." in out.stdout and "Step 2: write the answer." in out.stdout
    assert "Step 1: Step 1" not in out.stdout and "Step 2: Step 2" not in out.stdout
    out = hexray("replay", path, "--cot", "--split", "sentences")
    assert "Step 1: read" in out.stdout


@pytest.mark.slow
def test_oneshot_options_are_in_the_top_level_help_and_need_a_prompt():
    out = hexray("--help")
    assert out.returncode == 0
    for flag in ("--prompt TEXT", "--top-k-attribution N", "--cot-debug", "--save TRACE"):
        assert flag in out.stdout
    for args in (["--top-k-attribution", "5"], ["--cot-debug"], ["--save", "t.hxr"]):
        out = hexray(*args)
        assert out.returncode == 2 and "the following arguments are required: --prompt" in out.stderr
        assert "invalid choice" not in out.stderr
    out = hexray("bogus")
    assert out.returncode == 2 and "invalid choice: 'bogus'" in out.stderr
    out = hexray("--prompt", "x", "--help")
    assert out.returncode == 0 and "--step-regex" in out.stdout


def test_python_record_without_torch_gives_the_install_advice(tmp_path):
    code = ("import sys; sys.modules['torch'] = None; import hexray\n"
            "for call in (lambda: hexray.record('hi', model='hexray-demo', output=sys.argv[1]),"
            " lambda: hexray.Recorder):\n"
            "    try:\n        call()\n    except ImportError as e:\n"
            "        print(type(e).__name__, '|', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.hxr")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("RecordExtraMissing | recording needs torch") for ln in lines)
    assert all("pip install 'hexray[record]'" in ln for ln in lines)
    assert not (tmp_path / "t.hxr").exists()
