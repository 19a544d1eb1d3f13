"""`hexray report`: one self-contained HTML file (no network request at all) with a bounded payload.

What a report embeds, per run: the token strip (every position), the logit lens and component
colours for up to `LENS_POSITIONS` positions, the chain-of-thought view, and the full detail of at
most `detail` positions: the last ones of the prompt, then the tokens the model found least likely
(what a bug report is usually about). Diff: the first run against every other run or trace.
Per trace: every patching sweep it holds (`hexray patch -o`), or the line saying why it cannot be shown.
A 1,000-token trace of the demo model makes a report of about 1 MB (bench/viewer_bench.py).
"""

from __future__ import annotations

import os

import numpy as np

from hexray_core.errors import HexRayError
from trace_format import TraceFormatError

from . import data, page

DEFAULT_DETAIL = 100
LENS_POSITIONS = 2048


def _compact(obj):
    """Floats to 7 significant digits (float32 holds no more): a third smaller, same figures on screen."""
    if isinstance(obj, float):
        return float(f"{obj:.7g}")
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_compact(v) for v in obj]
    return obj


def detail_positions(run_overview: dict, n: int, always: tuple[int, ...] = ()) -> list[int]:
    """Which positions get their full detail: the requested ones, the last tokens, then the least likely."""
    total = len(run_overview["labels"])
    chosen: list[int] = [p % total for p in always if -total <= p < total]
    tail = list(range(total - 1, max(-1, total - 1 - max(1, n // 4)), -1))
    probs = np.array([1.0 if p is None else p for p in run_overview["prob"]])
    surprising = [int(p) - 1 for p in np.argsort(probs, kind="stable") if p >= 1]  # the position predicting token p
    for p in tail + surprising + list(range(total)):
        if len(chosen) >= n:
            break
        if p not in chosen:
            chosen.append(p)
    return sorted(chosen)


def build(traces: list, names: list[str], *, detail: int = DEFAULT_DETAIL, positions: tuple[int, ...] = (),
          runs: set[int] | None = None, dictionary=None) -> dict:
    """The `Embedded` payload (viewer/src/source.ts) for the given open traces.

    runs: the run numbers whose views are embedded (None: all, and the diffs); the others get only their strip
    (a notebook cell of a trace with a thousand prompts embeds the one it shows)."""
    if detail < 1:
        raise HexRayError(f"--detail must be at least 1, not {detail}")
    out: dict = {"traces": [], "details": {}, "lens": {}, "colours": {}, "cot": {}, "diffs": [], "features": {},
                 "patch": {}}
    for t, (trace, name) in enumerate(zip(traces, names, strict=True)):
        ov = {**data.overview(trace, name), "features": dictionary.describe() if dictionary else None}
        out["traces"].append(ov)
        for s in ov["patch"]:
            out["patch"][f"{t}.{s['index']}"] = _sweep(trace, s["index"])
        for r, run in enumerate(ov["runs"]):
            if runs is not None and r not in runs:
                continue
            key = f"{t}.{r}"
            for p in detail_positions(run, detail, positions):
                out["details"][f"{key}.{p}"] = data.token_detail(trace, run["id"], p, rows=True)
            n = len(run["labels"])
            if run["has_lens"]:
                grids = _optional(lambda trace=trace, run=run, n=n: [
                    data.lens_grid(trace, run["id"], s, min(n, s + data.MAX_WINDOW))
                    for s in range(max(0, n - LENS_POSITIONS), n, data.MAX_WINDOW)])
                if grids:
                    out["lens"][key] = {**grids[0], "end": grids[-1]["end"],
                                        "columns": [c for g in grids for c in g["columns"]]}
            colours = _optional(lambda trace=trace, run=run: data.component_colours(trace, run["id"]))
            if colours is not None and n > 1:
                out["colours"][key] = _last_columns(colours, LENS_POSITIONS)
            out["cot"][key] = _optional(lambda trace=trace, run=run: data.cot(trace, run["id"]))
            if dictionary is not None:
                out["features"][key] = data.run_features(trace, run["id"], dictionary)
    sides = [] if runs is not None else [(t, r) for t, ov in enumerate(out["traces"]) for r in range(len(ov["runs"]))]
    for t, r in sides[1:]:
        a = {"trace": 0, "run": 0, "position": len(out["traces"][0]["runs"][0]["labels"]) - 1}
        b = {"trace": t, "run": r, "position": len(out["traces"][t]["runs"][r]["labels"]) - 1}
        diff = _optional(lambda a=a, b=b, t=t, r=r: data.diff(
            traces[0], traces[t], 0, out["traces"][t]["runs"][r]["id"], a["position"], b["position"]))
        if diff is not None:
            out["diffs"].append({"a": a, "b": b, "diff": diff})
    return _compact(data.plain(out))


def _last_columns(colours: dict, n: int) -> dict:
    """Component colours of the last n positions only (the strip leaves older tokens uncoloured)."""
    values = colours["values"]
    width = len(values[0]) if values else 0
    if width <= n:
        return colours
    return {**colours, "values": [[None] * (width - n) + row[-n:] for row in values]}


def _sweep(trace, index: int) -> dict:
    """A patching sweep, or {"error": why not} (a malformed sweep is reported in the tab, not fatal to the report)."""
    try:
        return data.patch_sweep(trace, index)
    except (HexRayError, TraceFormatError) as e:
        return {"error": str(e).splitlines()[0]}


def _optional(fn):
    """A view the trace may not support (no attention recorded, no text to split): left out of the report."""
    try:
        return fn()
    except HexRayError:
        return None


def write(paths: list[str], output: str, *, detail: int = DEFAULT_DETAIL, positions: tuple[int, ...] = (),
          dictionary=None) -> int:
    """Write the report atomically (a temporary file renamed over `output`); returns its size in bytes."""
    from hexray_core.replay import open_trace

    from . import graph

    graph_paths = [p for p in paths if graph.is_graph(p)]  # a graph JSON is recognised by content
    graphs = [graph.load(p) for p in graph_paths]
    trace_paths = [p for p in paths if p not in graph_paths]
    traces = [open_trace(p) for p in trace_paths]
    try:
        payload = build(traces, [os.path.basename(p) for p in trace_paths], detail=detail, positions=positions,
                        dictionary=dictionary)
    finally:
        for t in traces:
            t.close()
    if graphs:
        payload["graphs"] = graphs  # whole: the graph tab draws every node and edge (graph.MAX_LINKS bounds it)
    text = page.render(" + ".join(os.path.basename(p) for p in paths), payload).encode("utf-8")
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, output)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise HexRayError(f"cannot write {output}: {e.strerror or e}") from None
    return len(text)
