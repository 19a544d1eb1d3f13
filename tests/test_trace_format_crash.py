"""Crash safety of the writer: kills, Ctrl-C and exceptions never leave a file that looks valid."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from trace_format import TraceFormatError, TraceReader, TraceWriter, verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Streams a large tensor set (6 MiB per tensor, up to 1.2 GB) until it is stopped.
_STREAMER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from trace_format import TraceWriter
    x = np.random.default_rng(0).standard_normal((1024, 3072)).astype(np.float16)
    with TraceWriter(sys.argv[2], append=sys.argv[3] == "append", threads=2) as w:
        w.begin_run(prompt="streaming")
        for i in range(200):
            w.write(f"blocks.{i}.mlp.hook_post", x)
            if i == 2:
                print("writing", flush=True)
    print("finished", flush=True)
""")


def default_sigint():
    """Child starts with SIGINT's default action: a shell without job control (a CI script running
    a command in the background) starts its children with SIGINT ignored, and Python then never
    turns Ctrl-C into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_streamer(target, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _STREAMER, REPO, str(target), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    line = proc.stdout.readline()
    assert line.strip() == "writing", proc.stderr.read()
    time.sleep(0.2)  # well inside the stream: ~20 chunks in, ~1 GB to go
    assert proc.poll() is None
    return proc


def _small_trace(path) -> bytes:
    with TraceWriter(path, meta={"model": {"name": "tiny"}}) as w:
        w.begin_run(prompt="first")
        w.write("resid", np.arange(12, dtype=np.float16).reshape(3, 4))
    return path.read_bytes()


def test_sigkill_mid_write_leaves_no_file_at_target(tmp_path):
    target = tmp_path / "t.hxr"
    proc = _start_streamer(target, "new")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    # What a kill leaves is a hidden temporary file, which no reader takes for a trace.
    assert all(p.name.startswith(".t.hxr.") and p.name.endswith(".tmp") for p in leftovers), leftovers
    for p in leftovers:
        assert p.stat().st_size > 1 << 20
        with pytest.raises(TraceFormatError, match="no trailer|truncated"):
            TraceReader(p)


def test_sigint_mid_write_removes_the_temporary_file(tmp_path):
    target = tmp_path / "t.hxr"
    proc = _start_streamer(target, "new")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_inside_with_block_leaves_nothing(tmp_path):
    target = tmp_path / "t.hxr"
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(target, threads=2) as w:
            w.begin_run()
            for i in range(8):
                w.write(f"x{i}", np.ones((512, 1024), np.float16))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_abandoned_writer_cleans_up(tmp_path):
    w = TraceWriter(tmp_path / "t.hxr")
    w.begin_run()
    w.write("x", np.ones(10))
    w.abort()
    w.abort()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_append_leaves_a_file_every_reader_refuses(tmp_path):
    target = tmp_path / "t.hxr"
    original = _small_trace(target)
    proc = _start_streamer(target, "append")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    data = target.read_bytes()
    assert len(data) > len(original) and data.startswith(original)  # old bytes untouched
    with pytest.raises(TraceFormatError, match="no trailer|data ends"):
        TraceReader(target)
    with pytest.raises(TraceFormatError):
        verify(target)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_append_that_raises_rolls_back_to_identical_bytes(tmp_path, exc):
    target = tmp_path / "t.hxr"
    original = _small_trace(target)
    with pytest.raises(exc):
        with TraceWriter(target, append=True, threads=2) as w:
            w.begin_run(prompt="second")
            w.write("big", np.ones((2048, 1024), np.float16))
            w.flush()
            assert target.stat().st_size > len(original)
            raise exc("stop")
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(original).digest()
    with TraceReader(target) as r:
        assert len(r.runs) == 1


def test_append_failing_while_closing_rolls_back(tmp_path, monkeypatch):
    import trace_format.writer as writer_mod

    target = tmp_path / "t.hxr"
    original = _small_trace(target)
    w = TraceWriter(target, append=True)
    w.begin_run()
    w.write("x", np.ones((100, 100), np.float32))

    def broken(obj):
        raise OSError("disk full")

    monkeypatch.setattr(writer_mod, "pack_obj", broken)
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert target.read_bytes() == original


def test_reader_opened_before_an_append_keeps_working(tmp_path):
    target = tmp_path / "t.hxr"
    _small_trace(target)
    with TraceReader(target) as old:
        with TraceWriter(target, append=True) as w:
            w.begin_run(prompt="second")
            w.write("resid", np.zeros((5, 4), np.float16))
            w.flush()
            np.testing.assert_array_equal(old.read("resid"), np.arange(12).reshape(3, 4))  # mid-append
        np.testing.assert_array_equal(old.read("resid"), np.arange(12).reshape(3, 4))  # after it
        assert len(old.runs) == 1
    with TraceReader(target) as new:
        assert len(new.runs) == 2 and new.read("resid", run=1).shape == (5, 4)


def test_append_on_a_full_disk_rolls_back(tmp_path):
    target = tmp_path / "t.hxr"
    original = _small_trace(target)

    class DiskFull:  # the writer's file, failing like a full disk after some bytes went through
        def __init__(self, f):
            self.f, self.budget = f, 5000

        def write(self, b):
            if len(b) > self.budget:
                self.f.write(bytes(b)[:self.budget])
                raise OSError(28, "No space left on device")
            self.budget -= len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    with pytest.raises(OSError, match="No space"):
        with TraceWriter(target, append=True) as w:
            w._f = DiskFull(w._f)
            w.begin_run()
            w.write("x", np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32))
            w.flush()
    assert target.read_bytes() == original
    verify(target)
