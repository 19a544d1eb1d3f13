"""What the recording commands share (record, a dataset, fuzz, the one-shot form): reading a text
argument, the progress display on stderr, --device-map, and the recorder class."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

from hexray_core.errors import HexRayError, json_problem

MAX_TEXT_BYTES = 256 << 20  # a prompts file of a million 256-byte prompts


def read_text(path: str, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A text argument's file ("-" for stdin): a regular file or a pipe (read as cat would: a FIFO
    with no writer waits for one), never a device, and at most ``limit`` bytes (/dev/zero is endless)."""
    import stat

    from trace_format.fileio import kind_of, shown

    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            full = os.path.expanduser(path)
            mode = os.stat(full).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
                raise HexRayError(f"{what} {shown(path)}: is {kind_of(mode)}, not a text file")
            with open(full, "rb") as f:
                data = f.read(limit + 1)
    except FileNotFoundError:
        raise HexRayError(f"{what} {shown(path)}: no such file") from None
    except IsADirectoryError:
        raise HexRayError(f"{what} {shown(path)}: is a folder") from None
    except OSError as e:
        raise HexRayError(f"{what} {shown(path)}: {e.strerror or e}") from None
    if len(data) > limit:
        raise HexRayError(f"{what} {shown(path)}: over {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HexRayError(f"{what} {shown(path)}: not UTF-8 text (byte {e.start})") from None


# -- progress ----------------------------------------------------------------------------------

class Progress:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise, nothing with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = None
        self.task = None
        self.total = 0
        self.t0 = time.perf_counter()
        if not quiet and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.live = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=True)
            except ImportError:
                self.live = None

    def __enter__(self):
        if self.live is not None:
            self.live.start()
            self.task = self.live.add_task("loading", total=None, info="")
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()

    def __call__(self, event: str, **info) -> None:
        if self.quiet and event != "warning":
            return
        from hexray_core.record.spec import human_bytes

        if event == "warning":
            self._line(f"hexray: warning: {info['message']}")
        elif event == "status":
            if self.live is not None:
                self.live.update(self.task, description=info["message"])
            else:
                self._line(f"hexray: {info['message']}")
        elif event == "kit":
            what = "wrote model kit to" if info["written"] else "using cached model kit"
            self._line(f"hexray: {what} {info['path']}")
        elif event == "run_start":
            self.total = info["total"]
            if self.live is not None:
                self.live.update(self.task, description="recording", total=info["total"], completed=info["index"])
        elif event == "generate":
            done, total, rate = info["done"], info["total"], info["tokens_per_s"]
            eta = (total - done) / rate if rate > 0 else 0.0
            msg = f"{rate:.1f} tokens/s, ETA {eta:.0f} s"
            if self.live is not None:
                self.live.update(self.task, description="generating", total=total, completed=done, info=msg)
            elif done == total or done % 100 == 0:
                self._line(f"hexray: generated {done}/{total} tokens, {msg}")
        elif event == "run_done":
            msg = f"{info['tokens']} tokens, {human_bytes(info['bytes'])} written"
            if self.live is not None:
                self.live.update(self.task, description="recording", total=self.total, completed=info["index"] + 1,
                                 info=msg)
            else:
                self._line(f"hexray: [{info['index'] + 1}/{info['total']}] {msg}")

    def _line(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)


# -- running -----------------------------------------------------------------------------------

def device_map(value: str | None):
    if value is None:
        return None
    value = value.strip()
    if value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise HexRayError(f"--device-map: not JSON ({json_problem(e)})") from None
    return value


def recorder_class():
    """The Recorder, or one clear line when the recording extra (torch, TransformerLens) is missing."""
    from hexray.recording import import_recorder

    return import_recorder().Recorder


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextlib.contextmanager
def ray_quietly(enabled: bool = True):
    """While Ray runs: what native code writes to file descriptor 2 (Ray's C++ core worker prints lines like
    ``[... E 5025 5025] core_worker.cc:2465: Actor with class name ...``) goes to a log file, while Python's own
    messages (ours, Ray's Python logging) still reach the terminal through a copy of the real stderr. A Ray
    session this block started is shut down inside it (its shutdown prints native lines too); one that was
    already running (a notebook, a test) is left as it was. The log is removed when the block succeeds and kept,
    its path said, when it fails."""
    if not enabled:
        yield
        return
    owned = not _ray_running()
    sys.stderr.flush()
    saved = os.dup(2)
    fd, path = tempfile.mkstemp(prefix="hexray-ray-", suffix=".log")
    old_stderr = sys.stderr
    try:
        is_fd2 = old_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest): Python writes go there anyway
        is_fd2 = False
    failed = True
    try:
        if is_fd2:
            sys.stderr = open(saved, "w", buffering=1, encoding=old_stderr.encoding or "utf-8",  # noqa: SIM115
                              errors="backslashreplace", closefd=False)
        os.dup2(fd, 2)
        yield
        if owned and _ray_running():
            sys.modules["ray"].shutdown()
        failed = False
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        if is_fd2:
            sys.stderr.close()
            sys.stderr = old_stderr
        os.close(saved)
        os.close(fd)
        if failed and os.path.getsize(path):
            print(f"hexray: Ray's own log lines are in {path}", file=sys.stderr)
        else:
            os.unlink(path)
