"""What a feature means: its statistics over every run of a recorded dataset (numpy only).

    stats = feature_stats(open_dataset("out/"), "dict/", features=[(3, 1234)])   # or features=None: all
    stats.to_dict()["layers"][0]["features"][0]["top_contexts"]

Per (layer, feature), over every token of every run, one shard at a time:
- **density**: the fraction of tokens where the feature is active (non-zero), with its count, sum and max;
- **histogram** of its non-zero activations over fixed log-spaced bins (``EDGES``: fixed so shards merge exactly),
  plus the count of negative values and of values under the first edge;
- **top contexts**: the ``k`` runs where it peaks highest (a run counts once, at its maximum; ties broken by the
  prompt's id), each with a window of tokens around the peak and the feature's activation on each;
- **quantile examples**: per histogram bin, ``m`` tokens drawn uniformly from those whose activation falls in it,
  by a bottom-m hash sketch (the m smallest hashes of (prompt id, position, feature)): deterministic, and the
  merge of two shards' sketches is the sketch of their union, so it does not depend on how shards are split.

Memory: the per-feature counters ([d_sae] and [d_sae, bins]), at most 2k candidates and m examples per bin per
feature, and one run's features: never the number of runs. Shards reduce independently (processes or Ray tasks,
``map``) and merge; the result equals one pass over the dataset.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hexray_core.dataset import layout as store
from hexray_core.errors import HexRayError
from hexray_core.replay.dictionary import DictionarySet, load_dictionary
from hexray_core.replay.features import feature_logits, run_features
from hexray_core.replay.trace import Trace

# 4 bins per decade from 1e-3 to 1e3 (24 bins); values under 1e-3 and over 1e3 are counted apart.
EDGES = 10.0 ** np.linspace(-3, 3, 25)
WINDOW = (8, 4)  # tokens shown before and after the peak of a context
_FEATURE = re.compile(r"L(\d+)F(\d+)")


def parse_feature(text: str) -> tuple[int, int]:
    """``L3F1234`` -> (3, 1234)."""
    m = _FEATURE.fullmatch(text.strip())
    if m is None:
        raise HexRayError(f"--feature must look like L3F1234 (layer 3, feature 1234), not {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class FeatureTask:
    """What a worker needs to reduce one shard (picklable: goes to a process or a Ray task)."""

    path: str
    entries: tuple[dict, ...]
    dictionary: str  # the path (or reference) the worker loads the dictionary from
    layers: tuple[int, ...]
    features: tuple[tuple[int, int], ...] | None  # None: every feature of those layers
    k: int = 10
    m: int = 3


@dataclass
class LayerStats:
    """One layer's running statistics for its chosen features (``ids``: dictionary feature numbers)."""

    ids: np.ndarray  # int64 [f]
    n_tokens: int = 0
    n_runs: int = 0
    active: np.ndarray = None  # int64 [f]: tokens where the feature is non-zero
    total: np.ndarray = None  # float64 [f]: sum of its activations
    peak: np.ndarray = None  # float64 [f]: max activation (-inf before any)
    hist: np.ndarray = None  # int64 [f, len(EDGES) + 1]: [under EDGES[0], bins..., at or over EDGES[-1]]
    negative: np.ndarray = None  # int64 [f]
    top: dict = field(default_factory=dict)  # column -> list of contexts (dicts), unsorted, <= 2k
    samples: dict = field(default_factory=dict)  # (column, bin) -> list of (hash, example dict), <= m
    # Filters that let most of a run skip the Python loops; each may lag (let more through), never cut too much.
    floor: np.ndarray = None  # float64 [f]: a lower bound on the k-th best context's activation (-inf: not full)
    ceiling: np.ndarray = None  # uint64 [f, bins]: the m-th smallest hash kept (max: not full)

    def __post_init__(self):
        f = len(self.ids)
        if self.active is None:
            self.active, self.total = np.zeros(f, np.int64), np.zeros(f, np.float64)
            self.peak = np.full(f, -np.inf)
            self.hist, self.negative = np.zeros((f, len(EDGES) + 1), np.int64), np.zeros(f, np.int64)
        if self.floor is None:
            self.floor = np.full(f, -np.inf)
            self.ceiling = np.full((f, len(EDGES) + 1), np.iinfo(np.uint64).max, np.uint64)


def _order(c: dict) -> tuple:
    return (-c["activation"], c["key"], c["position"])


def _prune(items: list, k: int) -> list:
    return sorted(items, key=_order)[:k]


def _hash(key: str, positions: np.ndarray, features: np.ndarray) -> np.ndarray:
    """A 64-bit mix of (prompt id, position, feature): the sample's priority (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(zlib.crc32(key.encode())) << np.uint64(32)) ^ (positions.astype(np.uint64) << np.uint64(20)) \
            ^ features.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _bins(values: np.ndarray) -> np.ndarray:
    """Histogram column of each positive value: 0 under EDGES[0], i in [1, 24] inside, 25 at or over EDGES[-1]."""
    return np.searchsorted(EDGES, values, side="right")


class _RunView:
    """One run's tokens, for context windows."""

    def __init__(self, trace: Trace, run: int, key: str, entry: dict):
        r = trace.run(run)
        self.labels, self.key, self.id, self.run, self.shard = r.labels, key, entry["id"], run, entry.get("shard")

    def context(self, position: int, column: np.ndarray, value: float) -> dict:
        lo, hi = max(0, position - WINDOW[0]), min(len(self.labels), position + WINDOW[1] + 1)
        return {"id": self.id, "key": self.key, "shard": self.shard, "run": self.run, "position": int(position),
                "activation": float(value),
                "start": lo, "tokens": list(self.labels[lo:hi]), "activations": [float(v) for v in column[lo:hi]]}


def _add_run(st: LayerStats, feats, view: _RunView, k: int, m: int, select: np.ndarray | None) -> None:
    """Fold one run's sparse features (``feats``: replay.features.Features) into ``st``."""
    n = feats.n
    st.n_tokens += n
    st.n_runs += 1
    pos = np.repeat(np.arange(n), np.diff(feats.indptr))
    fid, val = feats.indices.astype(np.int64), feats.values.astype(np.float64)
    if select is not None:  # keep the chosen features, renumbered to their column in st.ids
        col = select[fid]
        keep = col >= 0
        pos, col, val, fid = pos[keep], col[keep], val[keep], fid[keep]
    else:
        col = fid
    if not len(val):
        return
    np.add.at(st.active, col, 1)
    np.add.at(st.total, col, val)
    np.maximum.at(st.peak, col, val)
    neg = val < 0
    np.add.at(st.negative, col[neg], 1)
    b = _bins(val[~neg])
    np.add.at(st.hist, (col[~neg], b), 1)
    # Candidates, filtered in numpy: this run's peak per feature (first position on ties) where it may enter the
    # top contexts, and positive activations whose hash may enter their (feature, bin) sample.
    order = np.lexsort((pos, -val, col))
    first = order[np.r_[True, col[order][1:] != col[order][:-1]]]
    first = first[val[first] >= st.floor[col[first]]]
    cp, pp, vp, fp = col[~neg], pos[~neg], val[~neg], fid[~neg]
    if m > 0:
        h = _hash(view.key, pp, fp)
        cand = np.flatnonzero(h < st.ceiling[cp, b])
        cand = cand[np.lexsort((h[cand], b[cand], cp[cand]))]
    else:
        cand = np.zeros(0, np.int64)
    # Dense columns of this run for the features that touch the lists (windows show their activations).
    needed = np.unique(np.concatenate([col[first], cp[cand]]))
    if not len(needed):
        return
    slot = np.full(int(max(needed.max(), col.max())) + 1, -1)
    slot[needed] = np.arange(len(needed))
    dense = np.zeros((n, len(needed)))
    hit = slot[col] >= 0
    dense[pos[hit], slot[col[hit]]] = val[hit]

    for i in first:
        c, v = int(col[i]), float(val[i])
        if v < st.floor[c]:
            continue  # an earlier candidate of this run raised the floor
        lst = st.top.setdefault(c, [])
        lst.append(view.context(int(pos[i]), dense[:, slot[c]], v))
        if len(lst) >= 2 * k:
            lst[:] = _prune(lst, k)  # sorted: the k-th best is the floor from now on
            st.floor[c] = lst[-1]["activation"]
        elif len(lst) == k:
            st.floor[c] = min(x["activation"] for x in lst)  # k contexts: the k-th best is at least their min
    for i in cand:
        c, bb = int(cp[i]), int(b[i])
        if h[i] >= st.ceiling[c, bb]:
            continue  # an earlier candidate of this run filled the sample below it
        lst = st.samples.setdefault((c, bb), [])
        lst.append((int(h[i]), view.context(int(pp[i]), dense[:, slot[c]], float(vp[i]))))
        lst.sort(key=lambda t: t[0])
        del lst[m:]
        if len(lst) == m:
            st.ceiling[c, bb] = lst[-1][0]


def _merge(a: LayerStats, b: LayerStats, k: int, m: int) -> LayerStats:
    a.n_tokens += b.n_tokens
    a.n_runs += b.n_runs
    # New arrays, not +=: what Ray hands back is read-only.
    a.active, a.total, a.peak = a.active + b.active, a.total + b.total, np.maximum(a.peak, b.peak)
    a.hist, a.negative = a.hist + b.hist, a.negative + b.negative
    for c, lst in b.top.items():
        a.top[c] = _prune(a.top.get(c, []) + lst, k)
    for key, lst in b.samples.items():
        a.samples[key] = sorted(a.samples.get(key, []) + lst, key=lambda t: t[0])[:m]
    return a


def _selection(dset: DictionarySet, layers: tuple[int, ...], features) -> dict[int, np.ndarray | None]:
    """layer -> the chosen feature ids (None: all), checked against the dictionary."""
    out: dict[int, list[int] | None] = {}
    for layer in layers:
        dset[layer]  # noqa: B018 - a layer the dictionary lacks is refused here
        out[layer] = None if features is None else []
    for layer, f in features or ():
        if layer not in out:
            raise HexRayError(f"feature L{layer}F{f}: layer {layer} is not among the layers read "
                              f"({', '.join(map(str, layers))})")
        if not 0 <= f < dset[layer].d_sae:
            raise HexRayError(f"feature L{layer}F{f}: layer {layer}'s dictionary has {dset[layer].d_sae} features "
                              f"(0..{dset[layer].d_sae - 1})")
        if f not in out[layer]:
            out[layer].append(f)
    return {layer: None if ids is None else np.asarray(sorted(ids), np.int64) for layer, ids in out.items()
            if ids is None or ids}


def shard_feature_stats(task: FeatureTask) -> dict[int, LayerStats]:
    dset = load_dictionary(task.dictionary)
    chosen = _selection(dset, task.layers, task.features)
    stats, select = {}, {}
    for layer, ids in chosen.items():
        d_sae = dset[layer].d_sae
        stats[layer] = LayerStats(np.arange(d_sae) if ids is None else ids)
        if ids is not None:
            select[layer] = np.full(d_sae, -1, np.int64)
            select[layer][ids] = np.arange(len(ids))
    with Trace(task.path) as trace:
        for entry in task.entries:
            run = int(entry["run"])
            key = store.id_key(entry["id"])
            try:
                view = _RunView(trace, run, key, entry)
                for layer, st in stats.items():
                    _add_run(st, run_features(trace.run(run), dset, layer), view, task.k, task.m, select.get(layer))
            except HexRayError as e:
                raise HexRayError(f"prompt id {key} (line {entry.get('line')}): {e}") from None
            trace.run(run).forget()  # one run's tensors and features in memory at a time
    return stats


@dataclass
class FeatureStats:
    """The merged statistics of a dataset, layer by layer; ``to_dict`` is the ``--json`` document."""

    dataset: str
    dictionary: DictionarySet
    layers: dict[int, LayerStats]
    k: int
    m: int
    logits: dict = field(default_factory=dict)  # (layer, feature) -> (top, bottom)

    def feature(self, layer: int, feature: int) -> dict:
        st = self.layers[layer]
        hits = np.flatnonzero(st.ids == feature)
        if not len(hits):
            raise HexRayError(f"feature L{layer}F{feature} was not among those read")
        return self._entry(layer, int(hits[0]))

    def _entry(self, layer: int, c: int) -> dict:
        st = self.layers[layer]
        f = int(st.ids[c])
        n_active = int(st.active[c])
        contexts = [{k: v for k, v in x.items() if k != "key"} for x in _prune(st.top.get(c, []), self.k)]
        hist = st.hist[c]
        seen = 0
        quantiles = []
        total_pos = int(hist.sum())
        for bb in range(len(hist) - 1, -1, -1):  # strongest bin first
            if not hist[bb]:
                continue
            lo = 0.0 if bb == 0 else float(EDGES[bb - 1])
            hi = float(EDGES[bb]) if bb < len(EDGES) else float("inf")
            frac_above = seen / total_pos
            seen += int(hist[bb])
            quantiles.append({"range": [lo, hi], "count": int(hist[bb]),
                              "quantile": [1 - seen / total_pos, 1 - frac_above],
                              "examples": [{k: v for k, v in x.items() if k != "key"}
                                           for _, x in st.samples.get((c, bb), [])]})
        entry = {"feature": f, "label": f"L{layer}F{f}", "n_active": n_active,
                 "density": n_active / st.n_tokens if st.n_tokens else 0.0,
                 "max": float(st.peak[c]) if n_active else 0.0,
                 "mean_active": float(st.total[c] / n_active) if n_active else 0.0,
                 "histogram": {"edges": [float(e) for e in EDGES], "counts": [int(v) for v in hist[1:-1]],
                               "under": int(hist[0]), "over": int(hist[-1]), "negative": int(st.negative[c])},
                 "top_contexts": contexts, "quantile_examples": quantiles}
        if (layer, f) in self.logits:
            entry["top_logits"], entry["bottom_logits"] = self.logits[(layer, f)]
        label = self.dictionary[layer].labels.get(f)
        if label is not None:
            entry["explanation"] = label
        return entry

    def ranked(self, layer: int, top: int | None = None) -> list[int]:
        """Columns of the features that fired, densest first (ties: lower feature id)."""
        st = self.layers[layer]
        cols = np.flatnonzero(st.active)
        cols = cols[np.lexsort((st.ids[cols], -st.active[cols]))]
        return [int(c) for c in (cols if top is None else cols[:top])]

    def to_dict(self, top: int | None = None) -> dict:
        out = []
        for layer, st in sorted(self.layers.items()):
            d = self.dictionary[layer]
            explicit = len(st.ids) < d.d_sae
            cols = range(len(st.ids)) if explicit else self.ranked(layer, top)
            out.append({"layer": layer, "hook": d.hook_in, "n_runs": st.n_runs, "n_tokens": st.n_tokens,
                        "n_features": len(st.ids), "n_fired": int(np.count_nonzero(st.active)),
                        "features": [self._entry(layer, c) for c in cols]})
        return {"dataset": self.dataset, "dict": self.dictionary.path, "kind": self.dictionary.kind,
                "space": str(self.dictionary.space), "k": self.k, "layers": out}


def feature_stats(ds, dictionary, *, layers=None, features=None, k: int = 10, m: int = 3, logits: int = 5,
                  top: int | None = None, map: Callable | None = None) -> FeatureStats:  # noqa: A002
    """Statistics of ``features`` ([(layer, id)], None: all of ``layers``) over dataset ``ds``'s runs.

    ``map(fn, tasks)`` may reduce the shards elsewhere (processes, Ray); default: this process. ``top``: top
    logits are computed for the ``top`` densest features per layer when every feature is read (None: all)."""
    from hexray_core.dataset.aggregate import local_map

    if k < 1:
        raise HexRayError(f"--contexts must be at least 1, not {k}")
    if m < 0:
        raise HexRayError(f"--examples must be 0 or more, not {m}")
    dset = dictionary if isinstance(dictionary, DictionarySet) else load_dictionary(dictionary)
    if layers:
        chosen = tuple(sorted({int(x) for x in layers}))
    elif features:
        chosen = tuple(sorted({layer for layer, _ in features}))
    else:
        chosen = tuple(sorted(dset.layers))
    _selection(dset, chosen, features)  # refuse a bad feature before any shard is read
    features = None if features is None else tuple((int(a), int(b)) for a, b in features)
    ref = os.path.abspath(dset.path) if os.path.exists(str(dset.path)) else str(dset.path)  # workers' cwd differs
    tasks = (FeatureTask(path, tuple(entries), ref, chosen, features, k, m) for path, entries in ds.shards())
    merged: dict[int, LayerStats] | None = None
    first = None
    for path_stats in (map or local_map)(shard_feature_stats, tasks):
        merged = path_stats if merged is None else {lay: _merge(merged[lay], st, k, m)
                                                    for lay, st in path_stats.items()}
    if merged is None:
        raise HexRayError(f"{ds.path}: the dataset holds no recorded runs")
    result = FeatureStats(ds.path, dset, merged, k, m)
    if logits > 0:
        first = next(ds.shards())[0]
        with Trace(first) as trace:
            for layer, st in merged.items():
                explicit = len(st.ids) < dset[layer].d_sae
                cols = range(len(st.ids)) if explicit else result.ranked(layer, top)
                ids = [int(st.ids[c]) for c in cols]
                for f, pair in zip(ids, feature_logits(trace, dset[layer], ids, k=logits), strict=True):
                    result.logits[(layer, f)] = pair
    return result


def feature_meaning(dataset, dset: DictionarySet, layer: int, feature: int, k: int = 10, m: int = 2) -> dict:
    """One feature over a dataset, as the viewer shows it when a feature is clicked (``hexray view --dataset``)."""
    stats = feature_stats(dataset, dset, features=[(layer, feature)], k=k, m=m)
    return {**stats.feature(layer, feature), "dataset": dataset.path, "n_tokens": stats.layers[layer].n_tokens,
            "n_runs": stats.layers[layer].n_runs}
