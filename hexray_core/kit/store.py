"""Where model kits live and what they hold: shared by the recorder and the replay (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path

# After compatibility-mode processing, as the bridge has them (W_pos: learned positions only; W_gate: gated MLPs).
KIT_TENSORS = ("W_U", "b_U", "W_O", "b_O", "W_out", "b_out", "W_E", "W_pos", "W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V",
               "W_in", "b_in", "W_gate")
# What processing removed, read from the weights before compatibility mode (float32), so replay can rebuild the
# unprocessed ("raw") activation space exactly: the norms fold_ln folded away (no .b for RMSNorm) and, for
# LayerNorm models, the per-row means over d_model that center_writing_weights subtracted. raw/b_O.mean is the
# whole constant an attention layer lost: mean(b_O) + sum_h b_V(ln1 folded)[h] . mean_d(W_O[h]), because the
# recorded hook_z no longer carries the value bias (fold_value_biases).
RAW_PREFIX = "raw/"
RAW_NORMS = ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "ln_final.w", "ln_final.b")
RAW_MEANS = ("W_E.mean", "W_pos.mean", "W_O.mean", "b_O.mean", "W_out.mean", "b_out.mean")
# The model's tokenizer, its tokenizer.json as UTF-8 bytes (u8), so that replay tokenizes with the `tokenizers`
# package alone (Trace.to_tokens): no transformers, no model folder.
TOKENIZER = "tokenizer.json"
BUNDLE_PREFIX = "kit/"  # a bundled kit's tensors in a trace: kit/W_U, ... at WEIGHTS_RUN


def cache_dir() -> Path:
    """``$HEXRAY_CACHE``, or ``~/.cache/hexray``."""
    return Path(os.path.expanduser(os.environ.get("HEXRAY_CACHE") or os.path.join("~", ".cache", "hexray")))


def kit_folder() -> str:
    """The folder of cached kits as this process sees it (``$HEXRAY_CACHE`` honoured), for messages."""
    return os.path.join(cache_dir(), "kits") + os.sep


def kit_path(sha256: str, root: str | os.PathLike | None = None) -> str:
    """The cached kit file of a model: ``<cache>/kits/<sha256>.hxr``."""
    return os.path.join(root or cache_dir(), "kits", f"{sha256}.hxr")
