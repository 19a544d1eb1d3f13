"""Special files everywhere, and hostile command lines: one line and a non-zero exit, never a hang or a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from hostile_support import REPO, hexray, record_base

from hexray_core.errors import HexRayError
from hexray_core.record.spec import check_output_path as record_output_check
from trace_format import TraceFormatError, TraceReader, TraceWriter, verify

DEMO = os.path.join(REPO, "hexray_core", "models", "hexray-demo")


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return record_base(tmp_path_factory.mktemp("hostile-files"))


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "t.hxr"
    os.mkfifo(path)
    return str(path)


def _one_line_error(res, *needles):
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# -- special files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["info"], ["verify"], ["replay"], ["replay", "--lens"], ["diff"]])
def test_a_fifo_named_like_a_trace_is_refused_not_waited_on(fifo, trace, cmd):
    args = [*cmd, fifo] + ([trace] if cmd == ["diff"] else [])
    res = hexray(*args, timeout=60)  # blocking in open() would hit the timeout
    _one_line_error(res, "FIFO")


def test_special_files_in_the_python_api(fifo, tmp_path):
    import hexray

    for path, what in ((fifo, "FIFO"), ("/dev/null", "character device"), (str(tmp_path), "directory")):
        for call in (lambda p: TraceReader(p), lambda p: verify(p), lambda p: hexray.open(p),
                     lambda p: TraceWriter(p, append=True)):
            with pytest.raises(TraceFormatError, match=what):
                call(path)


def test_outputs_that_are_not_regular_files_are_refused(fifo, tmp_path):
    for path in ("/dev/null", fifo):
        with pytest.raises(TraceFormatError, match="not a regular file|FIFO|device"):
            TraceWriter(path)
        with pytest.raises(HexRayError, match="not a regular file"):
            record_output_check(path)
        res = hexray("record", "--model", "hexray-demo", "--prompt", "hi", "-o", path, timeout=120)
        _one_line_error(res, "not a regular file")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")  # still the device node
    # replacing a regular file is what -o does
    target = tmp_path / "old.hxr"
    target.write_bytes(b"old")
    with TraceWriter(target) as w:
        w.begin_run()
    assert TraceReader(target).runs


def test_a_newline_in_a_path_does_not_split_the_error(tmp_path, trace):
    odd = tmp_path / "two\nlines.hxr"
    odd.write_bytes(b"not a trace" * 10)
    missing = tmp_path / "gone\r\nhere.hxr"
    for args in (["info", odd], ["verify", odd], ["replay", odd], ["replay", missing], ["verify", missing]):
        line = _one_line_error(hexray(*args))
        assert "\\n" in line
    shutil.copy(trace, tmp_path / "ok\nname.hxr")
    res = hexray("verify", tmp_path / "ok\nname.hxr")
    assert res.returncode == 0 and len(res.stdout.strip().splitlines()) == 1, res.stdout


def test_verify_says_no_such_file_for_a_missing_one(tmp_path):
    line = _one_line_error(hexray("verify", tmp_path / "missing.hxr"), "no such file")
    assert "DAMAGED" not in line


# -- the command line ------------------------------------------------------------------------------

def _record(*args, timeout=120):
    return hexray("record", "--model", "hexray-demo", "-o", os.devnull + ".unused.hxr", *args, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "hi", "--seed", str(2**64)], "--seed"),
    (["--prompt", "hi", "--seed", str(-(2**63) - 1)], "--seed"),
    (["--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["--prompt", "hi", "--temperature", "inf"], "--temperature"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["--prompt", "hi", "--device", ""], "--device"),
    (["--prompt", "hi", "--device", "  "], "--device"),
    (["--prompt", "hi", "--device", "cuda:x"], "--device"),
    (["--prompt", "hi", "--n-devices", "0"], "--n-devices"),
    (["--prompt", "hi", "--n-devices", "-2"], "--n-devices"),
])
def test_bad_record_values_are_one_line(args, needle):
    _one_line_error(_record(*args), needle)


def test_a_prompt_with_a_non_utf8_byte_is_one_line(tmp_path):
    argv = [sys.executable.encode(), b"-m", b"hexray", b"record", b"--model", b"hexray-demo", b"--prompt",
            b"caf\xe9 au lait", b"-o", os.fsencode(tmp_path / "t.hxr")]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    _one_line_error(res, "UTF-8")
    assert not (tmp_path / "t.hxr").exists()


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_model_folder_with_a_truncated_weights_file_is_one_line(tmp_path, cut):
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:6] if cut == "header" else data[: len(data) // 2])
    res = hexray("record", "--model", folder, "--prompt", "hi", "-o", tmp_path / "t.hxr", timeout=120)
    _one_line_error(res, "model.safetensors", "damaged")


@pytest.mark.parametrize("args", [
    ["--bogus"], ["record", "--bogus"], ["replay", "t.hxr", "--top-k", "many"], ["info"], ["verify"],
    ["replay", "t.hxr", "--by", "layer"], ["lsp", "--tcp"], ["diff"], ["record", "--dtype", "f8"],
    ["--prompt", "hi", "--top-k-attribution", "x"],
])
def test_usage_errors_are_one_line(args):
    line = _one_line_error(hexray(*args))
    assert line.startswith("hexray") and "error:" in line and "--help" in line
    assert hexray(*args).returncode == 2


def test_info_prints_metadata_strings_literally(tmp_path):
    import numpy as np

    markup = "[/] [bold red]gpt2[/bold red] :fire: [link=x]y[/link]"
    with TraceWriter(tmp_path / "m.hxr", meta={"model": {"name": markup, "source": "[/", "config": {"act_fn": "[/]"}},
                                              "writer": {"hexray": "[/i]"}}) as w:
        w.begin_run(prompt="[/] prompt [b]")
        w.write("[/]tensor", np.zeros(3, np.float32))
    res = hexray("info", tmp_path / "m.hxr", "--tensors")
    assert res.returncode == 0, res.stderr
    for literal in (markup, "[/]tensor", "[/] prompt [b]", "[/i]"):
        assert literal in res.stdout, literal
