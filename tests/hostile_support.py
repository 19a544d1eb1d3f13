"""Helpers for the hostile-input tests: a real recording to start from, rewriting it with one thing
wrong, running every entry point on the result, and measuring a subprocess's peak memory.

The base trace is a real `hexray record` of the embedded demo model (4 layers, d_model 128), bundled
kit included, so every view can run on it; each hostile case changes one field or tensor of it.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np

from hexray_core.errors import HexRayError
from trace_format import WEIGHTS_RUN, TraceFormatError, TraceReader, TraceWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The capital of France is Paris.\nThe capital of Spain is"


def hexray(*args, input=None, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "hexray", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, input=input, timeout=timeout, env={**os.environ, **(env or {})})


def record_base(folder) -> str:
    path = os.path.join(str(folder), "base.hxr")
    res = hexray("record", "--model", "hexray-demo", "--prompt", PROMPT, "--bundle", "-o", path, timeout=300)
    assert res.returncode == 0, res.stderr
    return path


def load(path: str):
    """Everything in a trace as plain data: meta, runs, and (run, name, stored array, attrs) per tensor."""
    with TraceReader(path) as r:
        tensors = [(t.run, t.name, r.read(t.name, t.run, dtype="stored"), t.dtype, t.attrs) for t in r.tensors()]
        return copy.deepcopy(r.meta), copy.deepcopy(r.runs), tensors


def write(path: str, meta: dict, runs: list[dict], tensors) -> str:
    """A valid container holding exactly this content (whatever it says)."""
    meta = {k: v for k, v in meta.items() if k not in ("created", "closed")}
    with TraceWriter(path, meta=meta) as w:
        for info in runs:
            w.begin_run(**{k: v for k, v in info.items() if k not in ("id", "status")})
            for run, name, arr, dtype, attrs in tensors:
                if run == info["id"]:
                    w.write(name, arr, dtype=dtype, attrs=attrs)
            w.end_run()
        for run, name, arr, dtype, attrs in tensors:
            if run == WEIGHTS_RUN:
                w.write(name, arr, run=WEIGHTS_RUN, dtype=dtype, attrs=attrs)
    return path


def replace_tensor(tensors, name: str, arr: np.ndarray, *, run: int = 0, dtype: str | None = None):
    out = []
    for r, n, a, d, attrs in tensors:
        if (r, n) == (run, name):
            a, d = arr, dtype or ("bf16" if d == "bf16" and arr.dtype == np.uint16 else _tag(arr))
        out.append((r, n, a, d, attrs))
    return out


def _tag(arr: np.ndarray) -> str:
    return {"float32": "f32", "float16": "f16", "float64": "f64", "int32": "i32", "int64": "i64", "bool": "bool",
            "uint8": "u8", "int8": "i8", "int16": "i16"}[arr.dtype.name]


def every_view(path: str) -> list[str]:
    """Open the trace with the Python API and run every view; return the user errors met.

    Any exception that is not a HexRayError / TraceFormatError propagates and fails the test.
    """
    from hexray_core.replay import open_trace

    errors = []
    try:
        trace = open_trace(path)
    except (HexRayError, TraceFormatError) as e:
        return [str(e)]
    with trace:
        views = [
            lambda: trace.attribution(), lambda: trace.attribution(by="head"), lambda: trace.attribution(by="neuron"),
            lambda: trace.attribution(position=0, target="next"), lambda: trace.logit_lens(),
            lambda: trace.logit_lens(target="the"), lambda: trace.residual(), lambda: trace.attention(),
            lambda: trace.cot(), lambda: trace.runs[0].labels, lambda: trace.token_str(5),
            # the notebook API: a run as a TransformerLens ActivationCache
            lambda: trace.runs[0]["blocks.0.attn.hook_pattern"], lambda: trace.runs[0].accumulated_resid(),
            lambda: trace.runs[0].decompose_resid(), lambda: trace.runs[0].stack_head_results(),
            lambda: trace.cfg,
        ]
        for view in views:
            try:
                view()
            except (HexRayError, TraceFormatError) as e:  # (a hook not recorded: MissingHook, a HexRayError)
                errors.append(str(e))
    return errors


def peak_rss_mb(code: str, *args: str, timeout: float = 120, as_limit_mb: int | None = None,
                input: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run Python ``code`` in a fresh interpreter; its peak resident memory in MB.

    VmHWM of /proc/self/status, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child
    of a big pytest process would report the parent's size.
    """
    wrapper = ("import sys\n"
               "try:\n"
               f"    exec(compile({code!r}, '<probe>', 'exec'), {{'__name__': '__main__'}})\n"
               "finally:\n"
               "    hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
               "    print('PEAK_RSS_KB', hwm, file=sys.stderr)\n")
    repo = REPO  # (bench/hostile_memory.py --against points this at another checkout)
    def limit():  # an address-space cap, so a regression fails the test instead of the machine
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (as_limit_mb << 20, as_limit_mb << 20))

    res = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=repo,
                         timeout=timeout, env={**os.environ, "PYTHONPATH": repo}, input=input,
                         preexec_fn=limit if as_limit_mb else None)
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    assert line, res.stderr
    return int(line[-1].split()[1]) / 1024, res


CLI = "import sys; from hexray.cli.main import main; sys.exit(main(sys.argv[1:]))"


def bounded(*args, timeout: float = 120, as_limit_mb: int | None = None, input: str | None = None):
    """``hexray ARGS`` in a fresh interpreter under a timeout (and an address-space cap if given):
    (peak RSS in MB, exit code, stdout, stderr lines without the probe's own)."""
    mb, res = peak_rss_mb(CLI, *map(str, args), timeout=timeout, as_limit_mb=as_limit_mb, input=input)
    err = [ln for ln in res.stderr.splitlines() if not ln.startswith("PEAK_RSS_KB")]
    return mb, res.returncode, res.stdout, err


def one_line(rc: int, err: list[str], *needles: str) -> str:
    """The verdict of the hostile suites: a non-zero exit and exactly one line, no traceback."""
    assert rc != 0 and len(err) == 1 and err[0].startswith("hexray: error: "), (rc, err)
    for n in needles:
        assert n in err[0], err[0]
    return err[0]
