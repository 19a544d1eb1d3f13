"""The model's tokenizer on the replay side: TransformerLens's ``to_tokens``, ``to_str_tokens`` and ``to_string``
on a trace, with the small `tokenizers` package (no transformers, no torch).

The tokenizer is the one the recording used: its tokenizer.json bundled in the model kit (``tokenizer.json``, u8),
else the model folder the trace names when it is on this machine (an embedded or local model). Encoding is the
recorder's (``hexray_core.record.tokens.encode_prompt``): the text without special tokens, then the BOS id when
``prepend_bos`` (by default as the trace's runs were recorded).
"""

from __future__ import annotations

import os

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.kit.store import TOKENIZER

MAX_TOKENIZER_BYTES = 64 << 20


def load(trace):
    """The trace's tokenizer (a ``tokenizers.Tokenizer``), or one HexRayError saying why there is none."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise HexRayError("to_tokens needs the tokenizers package: pip install tokenizers") from None
    kit = trace.kit
    if kit is not None and kit.has(TOKENIZER):
        raw = kit[TOKENIZER]
        source = f"the tokenizer bundled in the model kit ({kit.source})"
        text = raw.tobytes().decode("utf-8", errors="strict") if raw.dtype == np.uint8 else None
    else:
        folder = (trace.meta.get("model") or {}).get("path")
        path = os.path.join(folder, TOKENIZER) if isinstance(folder, str) else None
        if path is None or not os.path.isfile(path) or os.path.getsize(path) > MAX_TOKENIZER_BYTES:
            raise HexRayError(f"the tokenizer of {trace.model_name} is not available: its model kit holds none "
                              "(recorded before HexRay bundled it, or no kit found) and the model's folder is not on "
                              "this machine; record again (with --bundle to carry it in the trace)")
        source = path
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # a damaged or newer file: one line, whatever tokenizers raises
        raise HexRayError(f"cannot read {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


class TokenizerMethods:
    """``to_tokens``, ``to_str_tokens``, ``to_string`` as TransformerLens's (mixed into Trace, with ``output``)."""

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` the recording used (loaded once)."""
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load(self)
        return self._tokenizer

    def _default_prepend_bos(self) -> bool:
        flags = [r.info.get("prepend_bos") for r in self.runs]
        return bool(flags[0]) if flags and isinstance(flags[0], bool) else self._bos_id() is not None

    def _bos_id(self) -> int | None:
        bos = (self.meta.get("tokenizer") or {}).get("bos_token_id")
        return bos if type(bos) is int and bos >= 0 else None

    def _encode(self, text: str, prepend_bos: bool | None) -> list[int]:
        if not isinstance(text, str):
            raise HexRayError(f"input= must be a text or a list of texts, not {type(text).__name__}")
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        bos = self._bos_id()
        if (self._default_prepend_bos() if prepend_bos is None else prepend_bos) and bos is not None:
            ids = [bos] + ids
        return ids

    def to_tokens(self, input, prepend_bos: bool | None = None, padding_side: str = "right", **_ignored):
        """Token ids ``[batch, pos]`` (int64) of a text or a list of texts, as the recorder tokenized them; a
        batch is padded on ``padding_side`` with the tokenizer's pad id (else BOS, else 0), as TransformerLens."""
        texts = [input] if isinstance(input, str) else list(input)
        if padding_side not in ("left", "right"):
            raise HexRayError(f"padding_side= must be 'left' or 'right', not {padding_side!r}")
        rows = [self._encode(t, prepend_bos) for t in texts]
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.padding["pad_id"] if self.tokenizer.padding else (self._bos_id() or 0)
        out = np.full((len(rows), width), pad, dtype=np.int64)
        for i, r in enumerate(rows):
            if r:
                if padding_side == "right":
                    out[i, :len(r)] = r
                else:
                    out[i, width - len(r):] = r
        return self.output(out)

    def to_str_tokens(self, input, prepend_bos: bool | None = None, **_ignored):
        """Each token decoded alone: a text (or list of texts) is tokenized first; ids (a list, an array, a
        tensor) are decoded as they are ([batch, pos] gives a list per row)."""
        if isinstance(input, str):
            return [self._decode_one(i) for i in self._encode(input, prepend_bos)]
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos) for t in input]
        ids = _ids(input)
        if ids.ndim == 2:
            return [[self._decode_one(int(i)) for i in row] for row in ids]
        return [self._decode_one(int(i)) for i in ids.reshape(-1)]

    def to_string(self, tokens):
        """Ids back to text: one string for [pos], a list of strings for [batch, pos]."""
        ids = _ids(tokens)
        if ids.ndim == 2:
            return [self.tokenizer.decode([int(i) for i in row], skip_special_tokens=False) for row in ids]
        return self.tokenizer.decode([int(i) for i in ids.reshape(-1)], skip_special_tokens=False)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _ids(tokens) -> np.ndarray:
    if hasattr(tokens, "detach"):  # a torch tensor: its values, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens)
    if ids.dtype.kind not in "iu" and ids.size:
        raise HexRayError(f"tokens= must be token ids (integers), not {ids.dtype} values")
    if ids.ndim > 2:
        raise HexRayError(f"tokens= must be [pos] or [batch, pos], not {ids.ndim}-dimensional")
    return ids.astype(np.int64)
