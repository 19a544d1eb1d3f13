"""What a new user tripped on (issue 25), each as the user meets it: the real CLI on real traces of a tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from prereq import missing

from hexray_core.replay import open_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def traces(tiny_gpt2_recorder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("frictions")
    one = tiny_gpt2_recorder.record("The quick brown fox jumps over the lazy dog.", folder / "one.hxr").path
    return {"one": one, "folder": folder}


def hexray(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "hexray", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def test_info_into_a_pipe_says_1_run_and_pads_no_line(traces):
    out = hexray("info", traces["one"], "--tensors")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [ln for ln in lines if ln != ln.rstrip()] == []
    assert re.search(r"^  total    1 run, \d+ tensors in", out.stdout, re.M), out.stdout
    assert "1 runs" not in out.stdout
    assert max(len(ln) for ln in lines) < 300  # nothing padded out to the table's or a 10,000-column width


def test_replay_tables_into_a_pipe_are_not_padded(traces):
    out = hexray("replay", traces["one"], "--lens", "--attention", "--resid", "--top-k", "2")
    assert out.returncode == 0, out.stderr
    assert [ln for ln in out.stdout.splitlines() if ln != ln.rstrip()] == []


def test_every_view_names_the_same_absolute_index(traces):
    out = hexray("replay", traces["one"], "--target", "top", "--lens", "--attention", "--top-k", "2")
    assert out.returncode == 0, out.stderr
    last = open_trace(traces["one"]).run(0).n_tokens - 1
    assert re.findall(r"\(index (-?\d+)\)", out.stdout) == [str(last)] * 3, out.stdout


def test_by_source_prints_the_target_p_and_logit(traces):
    out = hexray("replay", traces["one"], "--by", "source", "--top-k", "2")
    assert out.returncode == 0, out.stderr
    a = open_trace(traces["one"]).attribution()
    want = f"Target: {json.dumps(a.target)} (id {a.target_id}, p = {a.probability:.1%}, logit {a.logit:+.3f})"
    assert out.stdout.splitlines()[1] == want
    data = json.loads(hexray("replay", traces["one"], "--by", "source", "--json").stdout)["sources"]
    assert data["logit"] == pytest.approx(a.logit) and data["probability"] == pytest.approx(a.probability)
    assert data["logit_source"] == "recorded"


def test_the_missing_kit_hint_names_the_cache_that_is_in_use(traces, tmp_path):
    cache = tmp_path / "elsewhere"
    out = hexray("replay", traces["one"], "--by", "head", env={"HEXRAY_CACHE": str(cache)})
    assert out.returncode == 1
    assert out.stderr.startswith("hexray: error: ") and out.stderr.count("\n") == 1
    assert f"copy the kit file into {cache / 'kits'}{os.sep}" in out.stderr
    assert "~/.cache" not in out.stderr


def test_a_prompt_over_the_context_is_refused_before_torch_is_imported(tiny_gpt2_dir, tmp_path):
    n_ctx = json.load(open(os.path.join(tiny_gpt2_dir, "config.json")))["n_positions"]
    code = ("import sys; from hexray.cli.main import main; rc = main(sys.argv[1:]); "
            "print('IMPORTED', [m for m in ('torch', 'transformers') if m in sys.modules]); sys.exit(rc)")
    prompt = " hello" * (n_ctx + 5)
    out = subprocess.run([sys.executable, "-c", code, "record", "--model", str(tiny_gpt2_dir), "--prompt", prompt,
                          "-o", tmp_path / "t.hxr"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "IMPORTED []" in out.stdout
    m = re.fullmatch(r"hexray: error: the prompt is (\d+) tokens, over the model's context of (\d+) tokens "
                     r"\(from its config\.json; nothing was loaded\)\n", out.stderr)
    assert m and int(m.group(1)) >= n_ctx + 5 and int(m.group(2)) == n_ctx, out.stderr
    assert os.listdir(tmp_path) == []


def test_a_prompt_within_the_context_is_not_refused_early(tiny_gpt2_dir, tiny_tokenizer):
    from hexray_core.record.context import check_context

    n_ctx = json.load(open(os.path.join(tiny_gpt2_dir, "config.json")))["n_positions"]
    fits = " hello" * 4
    n = len(tiny_tokenizer(fits, add_special_tokens=False)["input_ids"])
    check_context("local", str(tiny_gpt2_dir), [fits], generate=n_ctx - n)  # exactly full: allowed
    with pytest.raises(Exception, match=rf"is {n} tokens \+ {n_ctx - n + 1} to generate, over"):
        check_context("local", str(tiny_gpt2_dir), [fits], generate=n_ctx - n + 1)


@pytest.mark.slow
def test_record_reports_load_and_record_time_and_list_hooks_marks_what_default_stores(tiny_gpt2_dir, tmp_path):
    out = hexray("record", "--model", tiny_gpt2_dir, "--prompt", "The quick brown fox", "-o", tmp_path / "t.hxr",
                 "-q")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"hexray: loaded {re.escape(str(tiny_gpt2_dir))} in \d+\.\d s; recorded 1 run, \d+ tokens, "
                        r"\d+ tensors, .* in \d+\.\d s -> .*t\.hxr \(kit [0-9a-f]{12}, [a-z ]+\)\n", out.stdout), \
        out.stdout
    out = hexray("record", "--model", tiny_gpt2_dir, "--list-hooks", "-q")
    assert out.returncode == 0, out.stderr
    marked = {ln[2:].split()[0] for ln in out.stdout.splitlines() if ln.startswith("* ")}
    stored = set(open_trace(tmp_path / "t.hxr").reader.names(0))
    assert "blocks.0.attn.hook_q" in marked and "blocks.0.attn.hook_k" in marked
    assert "blocks.0.attn.hook_pattern" not in marked  # the default recomputes patterns from q and k
    assert marked == {n for n in stored if not n.startswith("hexray.")}


def test_view_without_a_display_says_where_to_open_the_url(traces):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    proc = subprocess.Popen([sys.executable, "-m", "hexray", "view", str(traces["one"])], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        note = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    port = re.match(r"http://127\.0\.0\.1:(\d+)/", url).group(1)
    assert note.startswith("hexray: no browser could be opened here (no display); open the URL above")
    assert f"ssh -L {port}:127.0.0.1:{port}" in note


def test_what_the_readme_examples_write_is_ignored_by_git(tmp_path):
    if not os.path.exists(os.path.join(REPO, ".git")):
        missing("not a git checkout: no .gitignore to check")
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    written = set(re.findall(r"(?:-o|--save) ([\w.-]+(?:\.hxr|\.html|/))(?=\s)", readme))
    written |= set(re.findall(r"output=\"([\w.-]+\.hxr)\"", readme))
    written |= {m + "/" for m in re.findall(r"(?:-o|--save) (fz-[\w-]+)\b", readme)}
    written |= set(re.findall(r"cat > ([\w.-]+) <<", readme))
    assert {"letters.hxr", "many.hxr", "austen/", "letters.html"} <= written, written
    out = subprocess.run(["git", "check-ignore", "--no-index", *sorted(written)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert sorted(out.stdout.split()) == sorted(written), out.stdout


def test_a_json_error_says_where_in_the_line():
    from hexray.cli.record_cmd import parse_prompts_file
    from hexray_core.errors import HexRayError

    line = '{"prompt": "He said "hi" to her", "id": 1}'
    with pytest.raises(HexRayError) as e:
        parse_prompts_file('{"prompt": "ok"}\n' + line, "p.jsonl")
    assert str(e.value) == "--prompts-file p.jsonl:2: not JSON (Expecting ',' delimiter at column 22)"
    assert line[21] == "h"  # column 22, 1-based: what follows the string that ended early


def test_the_strips_texts_read_as_the_prompt_where_labels_show_bytes(tiny_gpt2_recorder, tmp_path):
    from hexray_view.data import _run_overview

    prompt = "Café 🍕 and 東京, naïve."
    t = open_trace(tiny_gpt2_recorder.record(prompt, tmp_path / "t.hxr").path)
    ov = _run_overview(t, 0)
    first = 1 if t[0].info.get("prepend_bos") else 0
    assert "".join(ov["texts"][first:]) == prompt
    assert any("\\x" in label for label in ov["labels"])  # this tokenizer splits characters into byte tokens
    assert not any("\\x" in text for text in ov["texts"])
    split = [i for i, label in enumerate(ov["labels"]) if "\\x" in label]
    assert all(ov["texts"][i] == "" or ov["texts"][i] in prompt for i in split)
