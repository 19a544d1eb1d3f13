"""Where a hook sits along the residual stream, for both sides (the recorder and replay import it; it imports nothing).

An edit of the stream or of a layer's whole write (``--intervene L0.mlp=0``) leaves the uncentred residual undefined
from where it happens on: the raw residual is rebuilt from the means of what each layer wrote, and such an edit's
mean is not defined (or not recorded). Both the recorder's live tracker and replay refuse the reads it reaches.
"""

from __future__ import annotations

import re

# hooks whose edit changes what a layer writes into the residual stream as a whole (or the stream itself)
RESIDUAL_WRITE = re.compile(r"(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out|attn\.hook_out|mlp\.hook_out|"
                            r"hook_embed|hook_pos_embed)$")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_STEP = {"hook_resid_pre": 0, "hook_attn_out": 1, "attn.hook_out": 1, "hook_resid_mid": 2, "hook_mlp_in": 2,
         "hook_mlp_out": 3, "mlp.hook_out": 3, "hook_resid_post": 4}


def stream_order(hook: str) -> int:
    """Embeddings -1, then per layer L: resid_pre 4L, attention write 4L+1, resid_mid 4L+2, MLP write 4L+3,
    resid_post 4L+4 (= the next resid_pre). An edit at one order reaches every read at that order and after."""
    m = _BLOCK.fullmatch(hook or "")
    if m is None:
        return -1
    return 4 * int(m.group(1)) + _STEP.get(m.group(2), 0)


def reaches(edit_hook: str, read_hook: str) -> bool:
    """Whether an edit at ``edit_hook`` (a residual-stream write) changes the residual a read at ``read_hook`` sees."""
    return bool(RESIDUAL_WRITE.search(edit_hook or "")) and stream_order(edit_hook) <= stream_order(read_hook)
