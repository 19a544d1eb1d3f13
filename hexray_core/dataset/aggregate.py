"""Aggregation over a dataset's runs: per-label running moments per shard, merged (`Dataset.aggregate`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from hexray_core.dataset import layout as store
from hexray_core.errors import HexRayError
from hexray_core.replay.attribution import direct_logit_attribution
from hexray_core.replay.trace import Trace

# Student's t 97.5% quantiles for 1..30 degrees of freedom; beyond, a Cornish-Fisher expansion (< 1e-4 off).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595,
         2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass
class Moments:
    """Running count, mean, sum of squared deviations and count positive of a vector per run."""

    labels: tuple[str, ...]
    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    positive: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.mean is None:
            self.mean, self.m2, self.positive = np.zeros_like(x), np.zeros_like(x), np.zeros(x.shape, np.int64)
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        self.positive += x > 0

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        if other.labels != self.labels:
            raise HexRayError("the dataset's runs do not share one set of components (recorded with different "
                              "models or hooks?)")
        n = self.n + other.n
        d = other.mean - self.mean
        mean = self.mean + d * (other.n / n)
        m2 = self.m2 + other.m2 + d * d * (self.n * other.n / n)
        return Moments(self.labels, n, mean, m2, self.positive + other.positive)


@dataclass
class ShardStats:
    parts: Moments  # per label
    logit: Moments  # the explained logit (or logit difference)
    runs: int


@dataclass
class Aggregate:
    """Per-label statistics of the attribution over a dataset's runs, sorted by |mean|."""

    n: int
    by: str
    position: int
    labels: list[str]
    mean: np.ndarray
    std: np.ndarray  # sample standard deviation (NaN for a single run)
    ci95: np.ndarray  # [labels, 2]: Student-t 95% confidence interval of the mean
    frac_positive: np.ndarray
    logit: dict = field(default_factory=dict)  # the same statistics of the explained logit itself

    @classmethod
    def from_stats(cls, stats: ShardStats, by: str, position: int) -> Aggregate:
        m = stats.parts
        if m.n == 0:
            raise HexRayError("the dataset holds no recorded runs")
        std, half = _spread(m)
        order = np.argsort(-np.abs(m.mean), kind="stable")
        ls, lh = _spread(stats.logit)
        logit = {"mean": float(stats.logit.mean[0]), "std": float(ls[0]),
                 "ci95": [float(stats.logit.mean[0] - lh[0]), float(stats.logit.mean[0] + lh[0])],
                 "frac_positive": float(stats.logit.positive[0] / stats.logit.n)}
        return cls(m.n, by, position, [m.labels[i] for i in order], m.mean[order], std[order],
                   np.stack([m.mean[order] - half[order], m.mean[order] + half[order]], axis=1),
                   m.positive[order] / m.n, logit)

    @property
    def rows(self) -> list[dict]:
        return [{"label": lab, "mean": float(mu), "std": float(sd), "ci95": [float(lo), float(hi)],
                 "frac_positive": float(fp)}
                for lab, mu, sd, (lo, hi), fp in zip(self.labels, self.mean, self.std, self.ci95,
                                                     self.frac_positive, strict=True)]

    def to_dict(self, top: int | None = None) -> dict:
        rows = self.rows if top is None else self.rows[:top]
        return {"n": self.n, "by": self.by, "position": self.position, "logit": self.logit, "rows": rows}

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({"label": self.labels, "mean": self.mean, "std": self.std, "ci95_low": self.ci95[:, 0],
                             "ci95_high": self.ci95[:, 1], "frac_positive": self.frac_positive})


def _spread(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    if m.n < 2:
        nan = np.full(m.mean.shape, np.nan)
        return nan, nan
    std = np.sqrt(np.maximum(m.m2, 0) / (m.n - 1))
    return std, t975(m.n - 1) * std / math.sqrt(m.n)


# -- one shard ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to reduce one shard (picklable: goes to a process or a Ray task)."""

    path: str
    entries: tuple[dict, ...]
    by: str = "component"
    position: int = -1
    target: str | None = None
    baseline: str | None = None


def run_attribution(trace: Trace, entry: dict, *, by: str, position: int, target: str | None,
                    baseline: str | None):
    """A dataset run's attribution of its own target (row target, else the default), with its id in errors."""
    try:
        return direct_logit_attribution(trace, position=position, run=int(entry["run"]),
                                        target=entry.get("target") or target,
                                        baseline=entry.get("baseline") or baseline, by=by)
    except HexRayError as e:
        raise HexRayError(f"prompt id {store.id_key(entry['id'])} (line {entry.get('line')}): {e}") from None


def _forget(trace: Trace, run: int) -> None:
    # A run keeps what it derives (component stack, unembedding table) for the life of the trace; a
    # dataset visits each run once, so drop it to keep memory to one run at a time.
    trace.run(run).forget()


def shard_stats(task: ShardTask) -> ShardStats:
    parts: Moments | None = None
    logit = Moments(("logit",))
    with Trace(task.path) as trace:
        for entry in task.entries:
            a = run_attribution(trace, entry, by=task.by, position=task.position, target=task.target,
                                baseline=task.baseline)
            kept = [c for c in a.contributions if c.kind != "bias"]
            labels = tuple(c.label for c in kept)
            if parts is None:
                parts = Moments(labels)
            elif labels != parts.labels:
                raise HexRayError(f"{task.path}: run {entry['run']} has other components than the first run")
            parts.add(np.array([c.value for c in kept]))
            logit.add(np.array([a.logit]))
            _forget(trace, int(entry["run"]))
    return ShardStats(parts or Moments(()), logit, len(task.entries))


def local_map(fn: Callable, tasks: Iterable, jobs: int = 1, window: int | None = None) -> Iterator:
    """fn over tasks in up to `jobs` processes, at most `window` tasks in flight (results in any order)."""
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    import concurrent.futures as cf
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    window = window or 2 * jobs
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
        pending: set = set()
        for task in tasks:
            pending.add(pool.submit(fn, task))
            if len(pending) >= window:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        for f in cf.as_completed(pending):
            yield f.result()


# -- the dataset ----------------------------------------------------------------------------------
