"""Activation patching sweeps (``hexray patch``): TransformerLens's ``patching.get_act_patch_*`` on the bridge.

    result = run_sweep(recorder, clean, corrupt, sweep="heads", target=" Mary", baseline=" John")

The clean run's activations (``run_with_cache``) are patched, one index at a time, into the corrupt
run by TransformerLens's own functions; HexRay adds the metric, the normalisation (0 = the corrupt
run, 1 = the clean run: (v − corrupt) / (clean − corrupt)) and the labels. ``values`` are the raw
metric values in TransformerLens's layout:

    resid_pre, attn_out, mlp_out   [n_layers, n]             (layer, position)
    heads                          [n_layers, n_heads]       every position of a head's output (hook_z)
    heads-by-pos                   [n_layers, n, n_heads]
    pattern                        [n_layers, n_heads]       a head's whole attention pattern

Every sweep patches at aligned positions, so clean and corrupt must have the same token count
(refused in one line naming both). This module imports torch only inside ``run_sweep``, so
``hexray patch --estimate`` (numpy only) shares ``SweepResult``. On GQA models these sweeps touch z
and the pattern, one per query head, never the shared k/v heads (TransformerLens#980).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from hexray_core.errors import HexRayError

SWEEPS = {
    "resid_pre": ("get_act_patch_resid_pre", ["layer", "pos"]),
    "attn_out": ("get_act_patch_attn_out", ["layer", "pos"]),
    "mlp_out": ("get_act_patch_mlp_out", ["layer", "pos"]),
    "heads": ("get_act_patch_attn_head_out_all_pos", ["layer", "head"]),
    "heads-by-pos": ("get_act_patch_attn_head_out_by_pos", ["layer", "pos", "head"]),
    "pattern": ("get_act_patch_attn_head_pattern_all_pos", ["layer", "head"]),
}
METRICS = ("logit-diff", "logit", "logprob")


@dataclass
class SweepResult:
    sweep: str
    metric: str                 # e.g. 'logit-diff " Mary" - " John" at position 9'
    axes: list[str]
    values: np.ndarray          # raw metric values, TransformerLens's layout
    clean_value: float
    corrupt_value: float
    clean: dict                 # {"prompt", "tokens", "token_strs"}
    corrupt: dict
    target: int
    baseline: int | None
    labels: dict = field(default_factory=dict)  # axis -> label of each index

    @property
    def normalized(self) -> np.ndarray:
        span = self.clean_value - self.corrupt_value
        if span == 0:
            return np.full_like(self.values, np.nan)
        return (self.values - self.corrupt_value) / span

    def to_json(self) -> dict:
        def rows(a):
            return np.where(np.isfinite(a), a, None).tolist()
        return {"patch": {"sweep": self.sweep, "metric": self.metric, "axes": self.axes,
                          "clean": {**self.clean, "value": self.clean_value},
                          "corrupt": {**self.corrupt, "value": self.corrupt_value},
                          "target": self.target, "baseline": self.baseline,
                          "labels": self.labels, "values": rows(self.values), "normalized": rows(self.normalized)}}

    def meta(self) -> dict:
        """``meta["patch"]`` of the trace (the values themselves are the tensor ``hexray.patch_values``)."""
        d = self.to_json()["patch"]
        d.pop("values")
        d.pop("normalized")
        return d


def token_id(tok, text: str, d_vocab: int, what: str) -> int:
    """'#id' or the exact text of one token."""
    if text.startswith("#") and text[1:].isdigit():
        i = int(text[1:])
    else:
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise HexRayError(f"--{what} {text!r} is {len(ids)} tokens, not one (give '#ID' for a token id)")
        i = int(ids[0])
    if not 0 <= i < d_vocab:
        raise HexRayError(f"--{what} {text!r}: token id {i} is outside the vocabulary of {d_vocab}")
    return i


def run_sweep(rec, clean: str, corrupt: str, *, sweep: str, target: str | None = None,
              baseline: str | None = None, metric: str = "logit-diff", position: int = -1,
              progress=None, map_chunks=None, model_ref=None, chunks: int = 2) -> SweepResult:
    """Patch clean activations into the corrupt run, index by index, with TransformerLens's function.

    ``map_chunks(fn, tasks)`` (e.g. Ray tasks) spreads the forward passes: the index table TransformerLens
    would walk is cut into ``chunks`` pieces, each run by ``sweep_chunk`` in a worker that loads
    ``model_ref`` (a name or path) itself and calls ``generic_activation_patch`` on its rows."""
    import torch
    from transformer_lens import patching

    if sweep not in SWEEPS:
        raise HexRayError(f"--sweep {sweep!r}: one of {', '.join(SWEEPS)}")
    if metric not in METRICS:
        raise HexRayError(f"--metric {metric!r}: one of {', '.join(METRICS)}")
    bridge, tok = rec.bridge, rec.tokenizer
    c_ids, x_ids = rec.tokenize(clean), rec.tokenize(corrupt)
    if len(c_ids) != len(x_ids):
        raise HexRayError(f"clean and corrupt prompts must have the same token count to patch position by position: "
                          f"clean is {len(c_ids)} tokens, corrupt {len(x_ids)}")
    n = len(c_ids)
    if not -n <= position < n:
        raise HexRayError(f"--position {position} is outside the prompts' {n} tokens")
    pos = position % n
    device = rec.loaded.input_device
    c_t, x_t = torch.tensor([c_ids], device=device), torch.tensor([x_ids], device=device)
    d_vocab = rec.loaded.d_vocab
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean_logits, cache = bridge.run_with_cache(c_t)
        corrupt_logits = bridge(x_t)
    t_id = token_id(tok, target, d_vocab, "target") if target else int(clean_logits[0, pos].argmax())
    b_id = None
    if metric == "logit-diff":
        b_id = token_id(tok, baseline, d_vocab, "baseline") if baseline else int(corrupt_logits[0, pos].argmax())
        if b_id == t_id:
            raise HexRayError(f"the target and the baseline are the same token (#{t_id}): give --target and "
                              "--baseline, or use --metric logit")
    elif baseline:
        raise HexRayError(f"--baseline applies to --metric logit-diff, not {metric}")

    def fn(logits):
        lg = logits[0, pos].float()
        if metric == "logprob":
            return torch.log_softmax(lg, -1)[t_id]
        return lg[t_id] - lg[b_id] if b_id is not None else lg[t_id]

    name, axes = SWEEPS[sweep]
    if progress is not None:
        progress("status", message=f"patching: {sweep} ({_count(bridge, axes, n)} forward passes)")
    if map_chunks is not None:
        values = _spread(map_chunks, model_ref, chunks, bridge, sweep, clean, corrupt, t_id, b_id, metric, pos, n)
    else:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_tqdm(patching):
            warnings.simplefilter("ignore")
            values = getattr(patching, name)(bridge, x_t, cache, fn)
    strs = [tok.decode([i]) for i in c_ids]
    text = _tok_text(tok, t_id) + (f" - {_tok_text(tok, b_id)}" if b_id is not None else "")
    labels = {"layer": [f"L{i}" for i in range(int(bridge.cfg.n_layers))],
              "pos": [f"{i}:{s!r}" for i, s in enumerate(strs)] if "pos" in axes else None,
              "head": [f"H{h}" for h in range(int(bridge.cfg.n_heads))] if "head" in axes else None}
    return SweepResult(sweep=sweep, metric=f"{metric} {text} at position {pos}", axes=axes,
                       values=values.detach().float().cpu().numpy().astype(np.float64),
                       clean_value=float(fn(clean_logits)), corrupt_value=float(fn(corrupt_logits)),
                       clean={"prompt": clean, "tokens": c_ids}, corrupt={"prompt": corrupt, "tokens": x_ids},
                       target=t_id, baseline=b_id, labels={k: v for k, v in labels.items() if v is not None})


def _ranges(bridge, axes, n) -> list[int]:
    return [{"layer": int(bridge.cfg.n_layers), "pos": n, "head": int(bridge.cfg.n_heads)}[a] for a in axes]


def _spread(map_chunks, model_ref, chunks, bridge, sweep, clean, corrupt, t_id, b_id, metric, pos, n):
    """The sweep's index table (TransformerLens's ``make_df_from_ranges``) cut into chunks, run elsewhere."""
    import torch
    from transformer_lens.patching import make_df_from_ranges

    if model_ref is None:
        raise HexRayError("spreading a sweep over workers needs the model as a name or path")
    axes = SWEEPS[sweep][1]
    shape = _ranges(bridge, axes, n)
    rows = make_df_from_ranges(shape, axes).to_numpy().tolist()
    k = max(1, min(int(chunks), len(rows)))
    parts = [rows[i * len(rows) // k:(i + 1) * len(rows) // k] for i in range(k)]
    tasks = [{"model": model_ref, "clean": clean, "corrupt": corrupt, "sweep": sweep, "target": t_id,
              "baseline": b_id, "metric": metric, "position": pos, "rows": part} for part in parts]
    values = torch.zeros(shape)
    for part, vals in map_chunks(sweep_chunk, tasks):
        for row, v in zip(part, vals, strict=True):
            values[tuple(row)] = v
    return values


_WORKER_MODELS: dict = {}


def sweep_chunk(task: dict) -> tuple[list, list[float]]:
    """A worker's share of a sweep: ``generic_activation_patch`` with the sweep's own setter and hook, on the
    given index rows (the model is loaded once per worker process)."""
    import pandas as pd
    import torch
    from transformer_lens import patching

    from .recorder import Recorder

    rec = _WORKER_MODELS.get(task["model"])
    if rec is None:
        torch.set_num_threads(1)
        rec = _WORKER_MODELS[task["model"]] = Recorder(task["model"], device="cpu")
    bridge = rec.bridge
    fn_name, axes = SWEEPS[task["sweep"]]
    partial = getattr(patching, fn_name)
    t_id, b_id, metric, pos = task["target"], task["baseline"], task["metric"], task["position"]

    def fn(logits):
        lg = logits[0, pos].float()
        if metric == "logprob":
            return torch.log_softmax(lg, -1)[t_id]
        return lg[t_id] - lg[b_id] if b_id is not None else lg[t_id]

    c_t = torch.tensor([rec.tokenize(task["clean"])])
    x_t = torch.tensor([rec.tokenize(task["corrupt"])])
    with torch.no_grad(), warnings.catch_warnings(), _quiet_tqdm(patching):
        warnings.simplefilter("ignore")
        _, cache = bridge.run_with_cache(c_t)
        vals = patching.generic_activation_patch(
            bridge, x_t, cache, fn, patch_setter=partial.keywords["patch_setter"],
            activation_name=partial.keywords["activation_name"],
            index_df=pd.DataFrame(task["rows"], columns=partial.keywords["index_axis_names"]))
    return task["rows"], [float(v) for v in vals]


@contextlib.contextmanager
def _quiet_tqdm(module):
    """TransformerLens draws a tqdm bar on stderr for every sweep; HexRay has its own progress line."""
    saved = getattr(module, "tqdm", None)
    module.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        module.tqdm = saved


def _tok_text(tok, i: int) -> str:
    return repr(tok.decode([i]))


def _count(bridge, axes, n) -> int:
    sizes = {"layer": int(bridge.cfg.n_layers), "pos": n, "head": int(bridge.cfg.n_heads)}
    out = 1
    for a in axes:
        out *= sizes[a]
    return out
