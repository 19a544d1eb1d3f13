"""A recorded dataset (``OUT/`` from ``hexray record --prompts-file ... -o OUT/``) opened for analysis.

    ds = open_dataset("out/")                     # hexray.open_dataset
    len(ds); ds.model
    for r in ds:                                  # runs across shards, one shard open at a time
        r.id, r.meta, r.prompt, r.attribution()   # each run's own target / baseline
    agg = ds.aggregate(by="head", position=-1)    # mean, std, 95% CI, fraction positive per label
    agg.labels, agg.mean, agg.ci95                # numpy arrays, sorted by |mean|
    agg.rows                                      # the same as a list of dicts (agg.to_pandas() with pandas)

The aggregate attributes each run's own target (its row's ``target``/``baseline``, else the defaults
given, else the model's top prediction) at ``position`` and keeps, per label, running moments
(count, mean, sum of squared deviations, count positive): memory depends on the number of labels and
on one shard, never on the number of runs. Shards are reduced independently and merged (Chan et
al.'s pairwise update), so the work spreads over processes, or over a Ray cluster when the caller
passes a ``map`` that runs there. Labels are those of ``hexray replay --json``. numpy only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hexray_core.dataset import folder as safe
from hexray_core.dataset import layout as store
from hexray_core.errors import HexRayError
from hexray_core.replay.attribution import BY_CHOICES, direct_logit_attribution
from hexray_core.replay.trace import Trace

from .aggregate import Aggregate, Moments, ShardStats, ShardTask, local_map, shard_stats


@dataclass
class DatasetRun:
    """One prompt of a dataset, with its shard's trace open while iterating."""

    id: str | int
    line: int | None
    meta: dict
    target: str | None
    baseline: str | None
    shard: str
    run: int
    trace: Trace

    @property
    def prompt(self) -> str:
        return self.trace.run(self.run).prompt

    @property
    def tokens(self) -> list[int]:
        return self.trace.run(self.run).tokens

    def attribution(self, position: int = -1, *, target: str | None = None, baseline: str | None = None,
                    by: str = "component"):
        """This run's attribution of its own target (or the one given)."""
        return direct_logit_attribution(self.trace, position=position, run=self.run,
                                        target=target or self.target, baseline=baseline or self.baseline, by=by)


class Dataset:
    """An ``OUT/`` folder of shards written by ``hexray record --prompts-file ... -o OUT/``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise HexRayError(f"{self.path}: no such folder" if not os.path.exists(self.path)
                              else f"{self.path}: not a dataset folder (a trace file? use hexray replay)")
        info = store.read_dataset_info(self.path)
        if info is None:
            raise HexRayError(f"{self.path}: not a HexRay dataset (no {store.DATASET_FILE}; record one with "
                              "hexray record --prompts-file FILE -o DIR/)")
        self.info = info
        self.manifest = os.path.join(self.path, store.MANIFEST_FILE)
        self._open_manifest().close()
        self._len: int | None = None

    def _open_manifest(self):
        try:
            return safe.open_read(self.path, store.MANIFEST_FILE)  # a regular file inside the folder, no link
        except FileNotFoundError:
            raise HexRayError(f"{self.manifest}: missing (rerun the hexray record command to rebuild it)") from None

    @property
    def model(self) -> str:
        return str(self.info.get("model"))

    @property
    def complete(self) -> bool:
        """Whether the last recording command recorded every prompt it was given."""
        last = self.info.get("last") or {}
        return bool(last) and last.get("recorded") == last.get("prompts")

    def __len__(self) -> int:
        if self._len is None:
            with self._open_manifest() as f:
                self._len = sum(1 for _ in safe.lines(f, self.manifest))
        return self._len

    def shards(self) -> Iterator[tuple[str, list[dict]]]:
        """(shard trace path, its manifest entries), streaming the manifest one shard at a time."""
        current, entries, seen_runs, seen_ids = None, [], set(), set()
        with self._open_manifest() as f:
            for number, line in safe.lines(f, self.manifest):
                where = f"{self.manifest}:{number}"
                e = safe.loads(line, where)
                wrong = _entry_problem(e)
                if wrong:
                    raise HexRayError(f"{where}: not a manifest entry ({wrong})")
                shard = e["shard"]
                # One run is one prompt: a manifest naming a run (or an id) twice is not one HexRay wrote,
                # and 200,000 lines naming one run would otherwise be 200,000 attributions of it.
                if (shard, e["run"]) in seen_runs or store.id_key(e["id"]) in seen_ids:
                    raise HexRayError(f"{where}: run {e['run']} of {shard} (id {store.id_key(e['id'])}) is listed "
                                      "twice")
                seen_runs.add((shard, e["run"]))
                seen_ids.add(store.id_key(e["id"]))
                if shard != current:
                    if entries:
                        yield safe.inside(self.path, current), entries
                    current, entries = shard, []
                entries.append(e)
        if entries:
            yield safe.inside(self.path, current), entries

    def __iter__(self) -> Iterator[DatasetRun]:
        for path, entries in self.shards():
            with Trace(path) as trace:
                for e in entries:
                    yield DatasetRun(e["id"], e.get("line"), e.get("meta") or {}, e.get("target"), e.get("baseline"),
                                     path, int(e["run"]), trace)

    def tasks(self, *, by: str = "component", position: int = -1, target: str | None = None,
              baseline: str | None = None) -> Iterator[ShardTask]:
        if by not in BY_CHOICES:
            raise HexRayError(f"--by must be one of {', '.join(BY_CHOICES)}, not {by!r}")
        for path, entries in self.shards():
            yield ShardTask(path, tuple(entries), by, position, target, baseline)

    def aggregate(self, *, by: str = "component", position: int = -1, target: str | None = None,
                  baseline: str | None = None, jobs: int = 1, map: Callable | None = None) -> Aggregate:  # noqa: A002
        """Per-label statistics of each run's attribution; ``map(fn, tasks)`` may run the shards elsewhere."""
        tasks = self.tasks(by=by, position=position, target=target, baseline=baseline)
        results = map(shard_stats, tasks) if map is not None else local_map(shard_stats, tasks, jobs)
        parts, logit = Moments(()), Moments(("logit",))
        for s in results:
            parts, logit = parts.merge(s.parts), logit.merge(s.logit)
        return Aggregate.from_stats(ShardStats(parts, logit, parts.n), by, position)

    def feature_stats(self, dictionary, *, features=None, layers=None, k: int = 10, m: int = 3, jobs: int = 1,
                      map: Callable | None = None):  # noqa: A002
        """What features mean over this dataset (``dataset.features.feature_stats``): density, histogram, top
        contexts and quantile examples of ``features`` ([(layer, id)] or ["L3F12"]; None: the whole dictionary)."""
        from .features import feature_stats, parse_feature

        if features is not None:
            features = [parse_feature(f) if isinstance(f, str) else f for f in features]
        if map is None and jobs > 1:
            def map(fn, tasks):  # noqa: A001
                return local_map(fn, tasks, jobs)
        return feature_stats(self, dictionary, layers=layers, features=features, k=k, m=m, map=map)

    def __repr__(self) -> str:
        return f"<Dataset {self.path}: {self.model}, {len(self)} run(s)>"


_SHARD_PATH = re.compile(r"shards/shard-\d{9}-[0-9a-f]{12}\.hxr")
MAX_RUN = 100_000  # trace_format's max_runs


def _entry_problem(e) -> str | None:
    """What is wrong with one manifest line's object (the fields read), or None."""
    if not isinstance(e, dict):
        return "not an object"
    if not isinstance(e.get("shard"), str) or not _SHARD_PATH.fullmatch(e["shard"]):
        return "\"shard\" is not shards/shard-NNNNNNNNN-HASH.hxr"
    run = e.get("run")
    if isinstance(run, bool) or not isinstance(run, int) or not 0 <= run < MAX_RUN:
        return f"\"run\" is not an integer from 0 to {MAX_RUN - 1:,}"
    if isinstance(e.get("id"), bool) or not isinstance(e.get("id"), str | int):
        return "\"id\" is not a string or an integer"
    for key in ("target", "baseline"):
        if e.get(key) is not None and not isinstance(e[key], str):
            return f"\"{key}\" is not a string"
    if e.get("meta") is not None and not isinstance(e["meta"], dict):
        return "\"meta\" is not an object"
    if e.get("line") is not None and (isinstance(e["line"], bool) or not isinstance(e["line"], int)):
        return "\"line\" is not an integer"
    return None


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a dataset folder for analysis."""
    return Dataset(path)
