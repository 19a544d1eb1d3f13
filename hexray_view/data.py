"""What the viewer shows, as JSON-ready dicts, computed by the replay engine (numpy only, no torch).

Every figure comes from `hexray_core.replay` (the same functions `hexray replay --json` prints), so
the browser formats numbers and never computes them. One function per panel; the server calls them
one request at a time (lazily: a 16k-token trace pays only for the token the user selects), the
report calls them for the positions it embeds.

    overview(trace, name)               model shape, what the trace can show, every run's token strip
    token_detail(trace, run, pos)       the selected token's predictions, DLA, heads, neurons, attention
    lens_grid(trace, run, start, end)   logit lens, layer × position
    attention_rows(trace, run, pos, layer, head, window)   one head's pattern rows
    component_colours(trace, run)       each component's attribution to every position's next token
    cot(trace, run) / diff(...)         the chain-of-thought and diff views
    patch_sweep(trace, index)           a `hexray patch -o` sweep as a heatmap grid (the Patching tab)
"""

from __future__ import annotations

import math
import os

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.replay import attention, attribution, lens
from hexray_core.replay import cot as cot_mod
from hexray_core.replay import diff as diff_mod
from hexray_core.replay.jsonable import plain
from hexray_core.replay.patch_trace import PATCH_VALUES
from hexray_core.replay.tokentext import running_texts

TOP_PREDICTIONS = 10
TOP_NEURONS = 10
TOP_SOURCES = 12
TOP_HEADS = 8  # heads whose pattern rows the report embeds per position
LENS_TOP = 3  # tokens per lens cell (hover)
MAX_WINDOW = 256  # positions per lens request, queries per attention request
KEY_MIN = 1e-3  # attention keys lighter than this travel as one sum (attention_rows)...
TOP_KEYS = 6  # ...unless among the heaviest, which the page lists


def _has_attention(trace, run: int) -> bool:
    """Whether every layer's attention can be read (stored patterns or recorded q/k)."""
    try:
        return trace.n_layers > 0 and all(attention.attention_source(trace, run, layer)
                                          for layer in range(trace.n_layers))
    except HexRayError:
        return False


def _n_heads(trace) -> int:
    return int(trace.config.get("n_heads", 0))


def overview(trace, name: str) -> dict:
    """The first thing the viewer loads: cheap (a few whole-run vectors per run, no per-position work)."""
    return {
        "name": name,
        "model": trace.model_name,
        "n_layers": trace.n_layers,
        "n_heads": _n_heads(trace),
        "has_kit": trace.kit is not None,
        "patch": patch_summaries(trace),
        "runs": [_run_overview(trace, r.id) for r in trace.runs],
    }


def _run_overview(trace, run: int) -> dict:
    r = trace.run(run)
    n = r.n_tokens
    prob: list[float | None] = [None] * n  # probability the model gave token i (from position i-1)
    if n > 1 and trace.has("hexray.next_logit", r.id) and trace.has("hexray.logsumexp", r.id):
        lp = trace.tensor("hexray.next_logit", r.id).astype(np.float64) - trace.tensor("hexray.logsumexp", r.id)
        prob[1:] = np.exp(lp[: n - 1]).tolist()
    top: list[str] = []
    if trace.has("hexray.topk_ids", r.id):
        top = [trace.token_str(int(t), r.id) for t in trace.tensor("hexray.topk_ids", r.id)[:, 0]]
    # The component names without loading the component stack (first paint reads no per-layer tensor).
    components = [c.label for c in attribution.components(trace, r.id)]
    return {
        "id": r.id,
        "prompt": r.prompt,
        "labels": r.labels,
        "texts": running_texts(r.prompt, r.char_spans, r.token_strs),  # the strip: the prompt as text
        "n_prompt_tokens": r.n_prompt_tokens,
        "prob": prob,
        "top": top,
        "components": components,
        "has_lens": trace.has("hexray.lens_topk_ids", r.id) or trace.kit is not None,
        "has_attention": _has_attention(trace, r.id),
        "has_source": _has_sources(),
    }


def _has_sources() -> bool:
    try:
        from hexray_core.replay.sources import source_attribution  # noqa: F401
    except ImportError:
        return False
    return True


def _predictions(trace, run: int, pos: int) -> list[dict]:
    if not trace.has("hexray.topk_ids", run):
        return []
    ids = trace.tensor("hexray.topk_ids", run)[pos][:TOP_PREDICTIONS]
    logits = trace.tensor("hexray.topk_logits", run)[pos][:TOP_PREDICTIONS]
    lse = float(trace.tensor("hexray.logsumexp", run)[pos]) if trace.has("hexray.logsumexp", run) else None
    return [{"id": int(t), "token": trace.token_str(int(t), run), "logit": float(v),
             "prob": None if lse is None else math.exp(float(v) - lse)} for t, v in zip(ids, logits, strict=True)]


def _attribution(a) -> dict:
    d = a.to_dict()
    d["contributions"] = [{"label": c["label"], "kind": c["kind"], "value": c["value"]} for c in d["contributions"]]
    return d


def token_detail(trace, run: int, pos: int, *, rows: bool = False) -> dict:
    """Everything the side panels show for one selected token.

    rows=True adds the pattern rows of the most focused heads as sparse (key, weight) lists (the
    report embeds those, having no server to ask for a head's dense row)."""
    r = trace.run(run)
    p = r.position(pos)
    out: dict = {"run": r.id, "position": p, "token": r.labels[p], "predictions": _predictions(trace, r.id, p)}
    out["attribution"] = _attribution(attribution.direct_logit_attribution(trace, position=p, run=r.id))
    out["heads"] = out["neurons"] = None
    if trace.kit is not None:
        out["heads"] = _optional(lambda: _head_grid(trace, r.id, p))
        out["neurons"] = _optional(lambda: _top_neurons(trace, r.id, p))
    out["attention"] = None
    if _has_attention(trace, r.id):
        summary = attention.attention_summary(trace, position=p, run=r.id, top_heads=trace.n_layers * _n_heads(trace))
        focus = [[0.0] * _n_heads(trace) for _ in range(trace.n_layers)]
        for h in summary.heads:
            focus[h.layer][h.head] = h.focus
        out["attention"] = {"focus": focus, "top": [{"label": h.label, "layer": h.layer, "head": h.head,
                                                     "focus": h.focus, "keys": [[k, w] for k, _, w in h.keys]}
                                                    for h in summary.heads[:TOP_HEADS]]}
        if rows:
            out["attention"]["rows"] = {
                f"{h.layer}.{h.head}": sparse_row(attention.attention_row(trace, r.id, h.layer, p)[h.head, : p + 1])
                for h in summary.heads[:TOP_HEADS]}
    out["source"] = _source(trace, r, p)
    return out


def _head_grid(trace, run: int, p: int) -> list[list[float]]:
    grid = [[0.0] * _n_heads(trace) for _ in range(trace.n_layers)]
    for c in attribution.direct_logit_attribution(trace, position=p, run=run, by="head").contributions:
        if c.kind == "head":
            grid[c.layer][c.index] = c.value
    return grid


def _top_neurons(trace, run: int, p: int) -> list[dict]:
    parts = attribution.direct_logit_attribution(trace, position=p, run=run, by="neuron").contributions
    top = sorted((c for c in parts if c.kind == "neuron"), key=lambda c: -abs(c.value))
    return [{"label": c.label, "layer": c.layer, "index": c.index, "value": c.value} for c in top[:TOP_NEURONS]]


def _optional(fn):
    """A panel the trace cannot feed (a tensor it did not record): None, and the page says so."""
    try:
        return fn()
    except HexRayError:
        return None


def sparse_row(weights: np.ndarray, k: int = 24) -> list[list]:
    """The k heaviest keys of an attention row as [key, weight] pairs, key order."""
    keys = np.sort(np.argsort(-weights, kind="stable")[:k])
    return [[int(i), float(weights[i])] for i in keys]


def _source(trace, r, p: int) -> list[dict] | None:
    """The source tokens of the prediction at p (one-hop source attribution, `hexray_core.replay.sources`),
    largest |total| first; None where the replay engine cannot compute it (no kit, no attention)."""
    try:
        from hexray_core.replay.sources import source_attribution
    except ImportError:  # an older replay engine: nothing to show
        return None
    try:
        sa = source_attribution(trace, position=p, run=r.id)
    except HexRayError:
        return None
    return [{"position": s, "value": v, "heads": heads} for s, v, heads in sa.top_sources(TOP_SOURCES)]


def lens_grid(trace, run: int, start: int, end: int) -> dict:
    """Logit lens of positions [start, end): each layer's probability of the position's final top
    prediction (the CLI's default target), with the layer's top tokens for the hover."""
    r = trace.run(run)
    start, end = max(0, start), min(r.n_tokens, end)
    if not 0 <= start < end or end - start > MAX_WINDOW:
        raise HexRayError(f"lens window [{start}, {end}) must hold 1..{MAX_WINDOW} positions of run {r.id}")
    columns = []
    for p in range(start, end):
        ll = lens.logit_lens(trace, position=p, run=r.id, top_k=LENS_TOP)
        columns.append({"position": p, "target": ll.target,
                        "prob": [layer.target_prob for layer in ll.layers],
                        "rank": [layer.target_rank for layer in ll.layers],
                        "top": [[[s, pr] for _, s, pr in layer.top] for layer in ll.layers]})
    layers = [layer.label for layer in ll.layers] if columns else []
    return {"run": r.id, "start": start, "end": end, "layers": layers, "columns": columns}


def attention_rows(trace, run: int, pos: int, layer: int, head: int, window: int = 24) -> dict:
    """The selected head's pattern: the keys of `pos`'s row that weigh at least KEY_MIN and the TOP_KEYS
    heaviest (every key the page shows: its underlines start at 0.01, its list is the 6 heaviest), what the
    others weigh together, and the
    rows of the `window` queries ending at pos over the keys in that window (a small lower-triangular heatmap).

    Sparse because a row of a 16k-token trace is 16k numbers (290 KB of JSON per click) of which a few
    dozen are visible."""
    r = trace.run(run)
    p = r.position(pos)
    if not 0 <= layer < trace.n_layers or not 0 <= head < _n_heads(trace):
        raise HexRayError(f"no head L{layer}H{head} in a model of {trace.n_layers} layers × {_n_heads(trace)} heads")
    window = max(1, min(window, MAX_WINDOW))
    first = max(0, p - window + 1)
    rows = attention.attention_rows(trace, r.id, layer, list(range(first, p + 1)))[head]  # [queries, n]
    row = rows[-1, : p + 1]
    shown = row >= KEY_MIN
    shown[np.argsort(-row, kind="stable")[:TOP_KEYS]] = True  # a diffuse head still lists its heaviest keys
    return {"run": r.id, "position": p, "layer": layer, "head": head, "label": f"L{layer}H{head}",
            "keys": [[int(k), float(row[k])] for k in np.flatnonzero(shown)], "n_keys": p + 1,
            "rest": float(row[~shown].sum(dtype=np.float64)), "first": first,
            "window": rows[:, first: p + 1].tolist()}


def component_colours(trace, run: int) -> dict:
    """Each component's attribution to the logit of every actual next token (column p explains token p+1)."""
    r = trace.run(run)
    labels, values = cot_mod.next_token_attributions(trace, r.id)
    return {"run": r.id, "labels": labels, "values": values.tolist()}


def cot(trace, run: int) -> dict:
    return plain(trace.cot(run).to_dict())


def diff(trace_a, trace_b, run_a: int, run_b: int, pos_a: int, pos_b: int, top: int = 20) -> dict:
    d = diff_mod.attribution_diff(trace_a, trace_b, run_a=run_a, run_b=run_b, position_a=pos_a, position_b=pos_b)
    out = d.to_dict(top=top)
    for side in ("a", "b"):
        out[side] = _attribution(getattr(d, side))
    return plain(out)


# -- features (a dictionary given with --dict) ------------------------------------------------------

TOP_FEATURES = 5  # features per position whose top logits travel with the run
MAX_FEATURE_INFO = 200  # ... at most this many per run (the most frequent), the rest show without


def run_features(trace, run: int, dset) -> dict:
    """The run's features through ``dset``, sparse (per layer: row p is ``indices[indptr[p]:indptr[p+1]]``, strongest
    first), for the features panel and the strip's colouring by one feature; ``info`` holds the top and bottom logits
    and label of the features most often among a position's strongest. A dictionary the trace cannot be read
    through gives ``error`` (its one-line refusal) instead."""
    from collections import Counter

    from hexray_core.replay.features import feature_logits
    from hexray_core.replay.features import run_features as features_of

    r = trace.run(run)
    out: dict = {"run": r.id, "dict": dset.name, "kind": dset.kind, "layers": [], "info": {}, "error": None}
    try:
        counts: Counter = Counter()
        for layer in sorted(dset.layers):
            f = features_of(r, dset, layer)
            out["layers"].append({"layer": layer, "hook": dset[layer].hook_in, "d_sae": f.d_sae,
                                  "indptr": f.indptr.tolist(), "indices": f.indices.tolist(),
                                  "values": [round(float(v), 5) for v in f.values]})
            for p in range(f.n):
                counts.update((layer, int(j)) for j in f.at(p)[0][:TOP_FEATURES])
        chosen = [k for k, _ in counts.most_common(MAX_FEATURE_INFO)]
        for layer in sorted({lay for lay, _ in chosen}):
            ids = [j for lay, j in chosen if lay == layer]
            labels = dset[layer].labels
            for j, (top, bottom) in zip(ids, feature_logits(trace, dset[layer], ids, k=5), strict=True):
                out["info"][f"L{layer}F{j}"] = {"top": [t for _, t, _ in top], "bottom": [t for _, t, _ in bottom],
                                                "explanation": labels.get(j)}
    except HexRayError as e:
        return {"run": r.id, "dict": dset.name, "kind": dset.kind, "layers": [], "info": {},
                "error": str(e).splitlines()[0]}
    return out



# -- activation patching (a trace written by `hexray patch -o`) --------------------------------------

PATCH_AXES = (["layer", "pos"], ["layer", "head"], ["layer", "pos", "head"])


def _patch_metas(trace) -> list:
    """The sweeps' metadata: `meta["patch"]` is one sweep (what `hexray patch -o` writes)."""
    p = trace.meta.get("patch")
    return [] if p is None else [p]


def patch_summaries(trace) -> list[dict]:
    """The sweeps a trace holds, as the tab's menu lists them; metadata only, and never an error (a malformed
    sweep is listed, and says what is wrong when it is opened)."""
    out = []
    for i, m in enumerate(_patch_metas(trace)):
        d = m if isinstance(m, dict) else {}
        out.append({"index": i, "sweep": str(d.get("sweep", "?"))[:80], "metric": str(d.get("metric", "?"))[:200]})
    return out


def patch_sweep(trace, index: int = 0) -> dict:
    """One sweep as the heatmap shows it: rows are layers (layer × head for heads-by-pos), columns positions or
    heads; each cell's raw metric value and its normalised value (0 = the corrupt run, 1 = the clean run).

    The values are checked against the trace (axes, the model's layers and heads, the runs' token count)
    before they are read, so a malformed sweep is one HexRayError naming what is wrong; non-finite cells
    travel as None and are counted in ``notes``."""
    metas = _patch_metas(trace)
    if not 0 <= index < len(metas):
        raise HexRayError(f"{trace.path} holds {len(metas)} patching sweep(s); there is no sweep {index}")
    m = metas[index]
    where = f"{os.path.basename(trace.path)}: patching sweep"
    if not isinstance(m, dict):
        raise HexRayError(f"{where}: meta['patch'] is a {type(m).__name__}, not a mapping")
    axes = m.get("axes")
    if axes not in PATCH_AXES:
        raise HexRayError(f"{where}: axes {str(axes)[:80]} are none of layer × pos, layer × head, layer × pos × head")
    holders = [r.id for r in trace.runs if trace.has(PATCH_VALUES, r.id)]
    if not holders:
        raise HexRayError(f"{where}: no run holds its values ({PATCH_VALUES})")
    corrupt_run = holders[-1]
    clean_run = trace.runs[0].id if len(trace.runs) > 1 else corrupt_run
    n = trace.run(corrupt_run).n_tokens
    if trace.run(clean_run).n_tokens != n:
        raise HexRayError(f"{where}: the clean run has {trace.run(clean_run).n_tokens} tokens, the corrupt run {n} "
                          "(a sweep patches aligned positions)")
    # AtP* of keys (`hexray patch --estimate --sweep k -o`) has a column per key/value head (grouped-query models)
    kv = str(m.get("sweep", "")).startswith("k ")
    n_heads = int(trace.config.get("n_key_value_heads") or _n_heads(trace)) if kv else _n_heads(trace)
    head = "KV" if kv else "H"
    want = [{"layer": trace.n_layers, "pos": n, "head": n_heads}[a] for a in axes]
    shape = list(trace.reader.info(trace.stored_name(PATCH_VALUES, corrupt_run), corrupt_run).shape)
    if shape != want:  # checked on the index, before a byte of the tensor is decoded
        raise HexRayError(f"{where}: {PATCH_VALUES} has shape {shape}, but {' × '.join(axes)} of this trace "
                          f"({trace.n_layers} layers, {n_heads} {'key/value ' if kv else ''}heads, {n} tokens) is "
                          f"{want}")
    values = np.asarray(trace.tensor(PATCH_VALUES, corrupt_run), dtype=np.float64)
    clean, corrupt = _metric_value(m, "clean"), _metric_value(m, "corrupt")
    notes = []
    span = None if clean is None or corrupt is None else clean - corrupt
    if span is None or span == 0:
        normalized = np.full_like(values, np.nan)
        notes.append("the clean and corrupt metric values are " + ("equal" if span == 0 else "not both known") +
                     ": there is no normalised scale (hover a cell for its raw value)")
    else:
        normalized = (values - corrupt) / span
    bad = int((~np.isfinite(values)).sum())
    if bad:
        notes.append(f"{bad} of {values.size} values are not finite numbers (NaN or ±inf): shown as —")
    heads = [f"{head}{h}" for h in range(n_heads)]
    if axes == ["layer", "pos", "head"]:  # as the terminal: a row per head of each layer, a column per position
        rows = [f"L{la}{head}{h}" for la in range(values.shape[0]) for h in range(values.shape[2])]
        row_keys = [[la, h] for la in range(values.shape[0]) for h in range(values.shape[2])]
        values, normalized = (a.transpose(0, 2, 1).reshape(len(rows), n) for a in (values, normalized))
    else:
        rows = [f"L{la}" for la in range(values.shape[0])]
        row_keys = [[la, None] for la in range(values.shape[0])]
    out = {"index": index, "sweep": str(m.get("sweep", "?")), "metric": str(m.get("metric", "?")), "axes": axes,
           "columns": axes[1], "rows": rows, "row_keys": row_keys,
           "clean": {"run": clean_run, "prompt": trace.run(clean_run).prompt, "value": clean},
           "corrupt": {"run": corrupt_run, "prompt": trace.run(corrupt_run).prompt, "value": corrupt},
           "values": values, "normalized": normalized, "notes": notes}
    if axes[1] == "pos":
        out["cols"] = {"clean": trace.run(clean_run).labels, "corrupt": trace.run(corrupt_run).labels}
    else:
        out["cols"] = {"clean": heads, "corrupt": heads}
    return plain(out)


def _metric_value(m: dict, side: str) -> float | None:
    """The clean or corrupt run's metric value from the sweep's metadata (None: absent or not a finite number)."""
    d = m.get(side)
    v = d.get("value") if isinstance(d, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)
