"""`hexray record` on the command line: success, and every error path as one line with a non-zero exit."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys

import pytest
from prereq import missing

from hexray.cli.main import main
from hexray.cli.record_cmd import parse_prompts_file
from hexray_core.errors import HexRayError
from trace_format import WEIGHTS_RUN, TraceReader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.endswith((".tmp", ".probe")) or f.endswith(".hxr")]


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("hexray: error: "), err
    assert "Traceback" not in err
    return lines[-1]


def cli_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HEXRAY_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", **extra)
    return env


def hexray_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "hexray", "record", *args]


# -- prompts files -------------------------------------------------------------------------------

def test_prompts_file_formats():
    assert parse_prompts_file("one\n\ntwo  \n") == ["one", "two  "]
    assert parse_prompts_file('{"prompt": "a\\nb", "id": 1}\n\n{"prompt": "🍕"}\n') == ["a\nb", "🍕"]
    with pytest.raises(HexRayError, match=r"p.jsonl:2: not JSON"):
        parse_prompts_file('{"prompt": "a"}\n{oops\n', "p.jsonl")
    with pytest.raises(HexRayError, match=r":1: expected an object"):
        parse_prompts_file('{"text": "a"}\n', "p.jsonl")
    with pytest.raises(HexRayError, match="no prompts"):
        parse_prompts_file("\n \n", "p.txt")


# -- in-process error paths ------------------------------------------------------------------------

def test_empty_prompt(tmp_path, capsys):
    assert main(["record", "--prompt", "", "-o", str(tmp_path / "t.hxr")]) == 1
    assert one_error_line(capsys.readouterr().err) == "hexray: error: empty prompt: nothing to record"
    assert not leftovers(tmp_path)


def test_no_prompt_and_no_output(tmp_path, capsys):
    assert main(["record", "-o", str(tmp_path / "t.hxr")]) == 1
    assert "nothing to record" in one_error_line(capsys.readouterr().err)
    assert main(["record", "--prompt", "x"]) == 1
    assert "no output file" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("target", ["missing/t.hxr", "."])
def test_unwritable_output(tmp_path, capsys, target):
    assert main(["record", "--prompt", "x", "-o", str(tmp_path / target)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("hexray: error: cannot write")


def test_unwritable_output_read_only_filesystem(capsys):
    if not os.path.exists("/proc/self"):
        missing("no /proc (not Linux): no folder where nobody, root included, can create a file")
    target = "/proc/hexray-test.hxr"  # nobody, root included, can create a file in /proc
    assert main(["record", "--prompt", "x", "-o", target]) == 1
    assert one_error_line(capsys.readouterr().err).startswith("hexray: error: cannot write /proc/hexray-test.hxr")


def test_prompt_longer_than_context(tiny_gpt2_dir, tmp_path, capsys):
    rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", "word " * 100, "-o", str(tmp_path / "t.hxr")])
    assert rc == 1
    line = one_error_line(capsys.readouterr().err)
    assert "over the model's context of 64 tokens" in line
    assert not leftovers(tmp_path)


def test_unknown_hook(tiny_gpt2_dir, tmp_path, capsys):
    rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", "x", "--hooks", "blocks.0.nope",
               "-o", str(tmp_path / "t.hxr")])
    assert rc == 1 and "no hook named 'blocks.0.nope'" in one_error_line(capsys.readouterr().err)


def test_disk_full_leaves_nothing(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    """The file write fails with ENOSPC midway (simulated at the writer's file): one line, nothing left."""
    from trace_format import writer as writer_mod

    real = writer_mod.TraceWriter._write_record
    calls = {"n": 0}

    def failing(self, *a, **kw):
        calls["n"] += 1
        if self.path.endswith("t.hxr") and calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)

    monkeypatch.setattr(writer_mod.TraceWriter, "_write_record", failing)
    out = tmp_path / "out"
    out.mkdir()
    (out / "t.hxr").write_bytes(b"previous trace")
    rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", "hello world", "-o", str(out / "t.hxr")])
    assert rc == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cannot write" in line and "no space left on device" in line
    assert sorted(os.listdir(out)) == ["t.hxr"] and (out / "t.hxr").read_bytes() == b"previous trace"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 300 kB tmpfs (a really full disk): mounted as root, or through passwordless sudo (as .ci/run has); where
    neither is allowed the test skips, and fails under CI."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    try:
        p = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", "size=300k,mode=1777", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        missing(f"cannot run mount ({e}): a full disk needs root or passwordless sudo")
    if p.returncode != 0:
        missing(f"cannot mount a tmpfs here ({p.stderr.strip()}): a full disk needs root or passwordless sudo")
    try:
        yield mnt
    finally:
        subprocess.run([*sudo, "umount", str(mnt)], capture_output=True, timeout=30)


def test_real_full_disk_leaves_nothing(tiny_gpt2_dir, tiny_tmpfs, capsys):
    """ENOSPC from a real (tiny) filesystem: one line, exit 1, and the disk is left as it was."""
    rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", "Alice and Bob went to the store", "--hooks", "full",
               "--act-dtype", "float32", "--bundle", "-o", str(tiny_tmpfs / "t.hxr")])
    assert rc == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cannot write" in line and "no space left on device" in line
    assert os.listdir(tiny_tmpfs) == []


def test_ctrl_c_leaves_nothing(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    from hexray_core.record import capture

    real = capture.Capture._write
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(capture.Capture, "_write", interrupted)
    rc = main(["record", "--model", tiny_gpt2_dir, "--prompt", "hello world", "-o", str(tmp_path / "t.hxr")])
    assert rc == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "hexray: interrupted" and "Traceback" not in err
    assert not leftovers(tmp_path)


def test_list_hooks(tiny_gpt2_dir, capsys):
    assert main(["record", "--model", tiny_gpt2_dir, "--list-hooks", "-q"]) == 0
    out = capsys.readouterr().out
    assert "* blocks.0.hook_resid_pre    (also: blocks.0.hook_in)" in out
    # the default recomputes attention from q and k: they are marked, the pattern is not
    assert "* blocks.0.attn.hook_q    (also: blocks.0.attn.q.hook_out)" in out
    assert "  blocks.0.attn.hook_pattern" in out


# -- subprocesses (the real command, as a user runs it) --------------------------------------------

def test_cli_offline_hub_model_one_line(tmp_path):
    p = subprocess.run(hexray_cmd("--model", "gpt2", "--prompt", "Hello", "-o", str(tmp_path / "t.hxr")),
                       capture_output=True, text=True, env=cli_env(tmp_path), timeout=120)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    line = one_error_line(p.stderr)
    assert "cannot load model 'gpt2'" in line and "hexray-demo" in line
    # refused before torch loads, without half a minute of hub retries: said so, not timed
    assert "the Hugging Face hub is switched off" in line or "cannot reach the Hugging Face hub" in line
    assert "importing torch" not in p.stderr
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_cli_records_prompts_file(tiny_gpt2_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Alice 🍕"}) + "\n" + json.dumps({"prompt": "東京"}) + "\n")
    out = tmp_path / "t.hxr"
    p = subprocess.run(hexray_cmd("--model", tiny_gpt2_dir, "--prompts-file", str(prompts), "--generate", "2",
                                  "--bundle", "--top-k", "5", "--act-dtype", "float32", "-o", str(out)),
                       capture_output=True, text=True, env=cli_env(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    assert re.match(r"hexray: loaded \S+ in \d+\.\d s; recorded 2 runs,", p.stdout) and str(out) in p.stdout
    assert "[2/2]" in p.stderr
    with TraceReader(out) as r:
        assert [run["generated"]["n"] for run in r.runs] == [2, 2]
        assert r.runs[0]["prompt"].startswith("Alice 🍕")
        assert r.meta["kit"]["bundled"] and r.has("kit/W_U", WEIGHTS_RUN)
        assert r.info("hexray.topk_ids", 1).shape[1] == 5
        assert r.meta["storage"]["act_dtype"] == "f32"


def _limit_file_size():  # runs in the child: writes past 200 kB fail with EFBIG instead of killing it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
def test_cli_real_write_failure(tiny_gpt2_dir, tmp_path):
    """A real failing write(2) (file size limit, as a full disk would): one line, nothing at the target."""
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run(hexray_cmd("--model", tiny_gpt2_dir, "--prompt", "Alice and Bob", "--hooks", "full",
                                  "--act-dtype", "float32", "--bundle", "-o", str(out / "t.hxr")),
                       capture_output=True, text=True, env=cli_env(tmp_path), timeout=300,
                       preexec_fn=_limit_file_size)
    assert p.returncode == 1, p.stderr
    line = one_error_line(p.stderr)
    assert "cannot write" in line and "file too large" in line
    assert os.listdir(out) == []


@pytest.mark.slow
def test_cli_sigint_leaves_nothing(tiny_gpt2_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i} 🍕\n" for i in range(5000)))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(hexray_cmd("--model", tiny_gpt2_dir, "--prompts-file", str(prompts),
                                       "-o", str(out / "t.hxr")),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=cli_env(tmp_path),
                            # A shell without job control starts background children with SIGINT ignored; undo that.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in proc.stderr:  # wait until it is recording
            lines.append(line)
            if line.startswith("hexray: [3/"):
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()  # (communicate() would skip what the line reader already buffered)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "hexray: interrupted" and "Traceback" not in err
    assert os.listdir(out) == []


def test_embedded_demo_model(tmp_path, capsys):
    from hexray_core.record.spec import demo_model_dir

    if not os.path.isfile(os.path.join(demo_model_dir(), "config.json")):
        missing("the embedded demo model is not installed in this checkout (scripts/package_demo_model.py)")
    out = tmp_path / "t.hxr"
    assert main(["record", "--model", "hexray-demo", "--prompt", "It is a truth universally", "--generate", "2",
                 "-q", "-o", str(out)]) == 0
    assert re.match(r"hexray: loaded hexray-demo in \d+\.\d s; recorded 1 run,", capsys.readouterr().out)
    with TraceReader(out) as r:
        assert r.meta["model"]["source"] == "embedded" and r.meta["model"]["name"] == "hexray-demo"
        assert r.runs[0]["generated"]["n"] == 2


def test_record_json_says_what_was_written(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "t.hxr"
    assert main(["record", "--model", tiny_gpt2_dir, "--prompt", "Alice 🍕", "-o", str(out), "-q", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"path", "runs", "tokens", "tensors", "bytes", "seconds", "load_seconds", "kit"}
    assert data["load_seconds"] > 0 and data["seconds"] > 0  # loading the model and recording, apart
    assert data["path"] == str(out) and data["bytes"] == os.path.getsize(out) and data["runs"] == 1
    with TraceReader(out) as r:
        assert data["tokens"] == len(r.runs[0]["tokens"])
        assert data["kit"]["sha256"] == r.meta["kit"]["sha256"] and data["kit"]["bundled"] is False
        assert data["tensors"] == len(r.names(0))
    assert os.path.exists(data["kit"]["path"])
    assert main(["record", "--model", tiny_gpt2_dir, "--list-hooks", "-q", "--json"]) == 0
    hooks = json.loads(capsys.readouterr().out)["hooks"]
    assert {"name": "blocks.0.hook_resid_pre", "default": True, "aliases": ["blocks.0.hook_in"]} in hooks
