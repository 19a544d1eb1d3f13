"""`hexray patch --estimate ... -o OUT.hxr`: the estimate stored as `hexray patch -o` stores a real sweep.

A new trace holds the clean trace's first run (run 0), the corrupt trace's first run (run 1) with the values as
``hexray.patch_values`` (raw metric, TransformerLens's layout) and ``meta["patch"]``, so `hexray view`/`report`
draw its heatmap and `hexray info`/`diff` read it like any recording. Tensors are copied at their stored dtype
(no rounding); a bundled kit comes along. numpy and the trace format only.
"""

from __future__ import annotations

import os

import numpy as np

from hexray_core.errors import HexRayError
from trace_format import WEIGHTS_RUN, check_output_path

from .features import STORED

PATCH_VALUES = "hexray.patch_values"  # the raw metric of every patch, in the corrupt run (written by hexray patch -o)


def _copy_run(w, reader, run: int, extra: dict | None = None, features: bool = True) -> None:
    info = {k: v for k, v in reader.runs[run].items() if k not in ("id", "status")}
    w.begin_run(**info)
    for t in reader.tensors(run):
        if not features and t.name.startswith(STORED + "."):
            continue
        w.write(t.name, reader.read(t.name, run, dtype="stored"), dtype=t.dtype, attrs=t.attrs or None)
    for name, arr in (extra or {}).items():
        w.write(name, arr)
    w.end_run()


def write_estimate_trace(clean, corrupt, out: str, patch_meta: dict, values: np.ndarray) -> str:
    """Write ``out``: both runs and the estimate (see the module docstring). Returns ``out``."""
    from trace_format import TraceWriter  # loaded on first use (the viewer imports this module for its name)

    check_output_path(out)
    sources = {os.path.realpath(p) for p in (clean.path, corrupt.path)}
    if os.path.realpath(out) in sources:
        raise HexRayError(f"-o {out}: that is one of the traces the estimate reads; write to another file")
    if (clean.meta.get("kit") or {}).get("sha256") != (corrupt.meta.get("kit") or {}).get("sha256"):
        raise HexRayError("the clean and corrupt traces were recorded from different models (their kits differ)")
    meta = {k: v for k, v in corrupt.meta.items() if k != "patch"}
    meta["patch"] = patch_meta
    cr, xr = clean.reader, corrupt.reader
    # stored features (record --dict) are named by slot in meta["features"], which is the corrupt trace's: the
    # clean run's go along only where its trace stored the same dictionaries (else its features are computed)
    same = clean.meta.get("features") == corrupt.meta.get("features")
    with TraceWriter(out, meta) as w:
        _copy_run(w, cr, clean.run(0).id, features=same)
        _copy_run(w, xr, corrupt.run(0).id, {PATCH_VALUES: np.asarray(values, dtype=np.float32)})
        for t in xr.tensors(WEIGHTS_RUN):  # a bundled kit (--bundle) travels with the runs
            w.write(t.name, xr.read(t.name, WEIGHTS_RUN, dtype="stored"), run=WEIGHTS_RUN, dtype=t.dtype,
                    attrs=t.attrs or None)
    return out
