"""A prompt over the model's context, refused before the model loads (no torch, no transformers).

The context comes from the model's config.json and the token count from its tokenizer.json, read with
the small `tokenizers` package (the file a fast tokenizer is built from, so the count is the same). The
count leaves out special tokens: a BOS the recorder may prepend is one more, which the exact check after
loading (``Recorder.validate``) still catches. So this check refuses only what is certainly too long, and
says nothing where it cannot read the files (a .gguf, a model not in the hub cache).
"""

from __future__ import annotations

import json
import os

from hexray_core.errors import HexRayError

# config.json keys that give the number of positions, in the order TransformerLens reads them
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length")
MAX_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 64 << 20


def _model_file(source: str, where: str, name: str) -> str | None:
    if source in ("local", "embedded"):
        path = os.path.join(where, name)
        return path if os.path.isfile(path) else None
    if source == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(where, name)
        except Exception:  # an odd cache or id: the loader will say what is wrong
            return None
        return path if isinstance(path, str) else None
    return None


def config_context(source: str, where: str) -> int | None:
    """The model's context in tokens from its config.json (a multimodal config's text_config included)."""
    path = _model_file(source, where, "config.json")
    if path is None or os.path.getsize(path) > MAX_CONFIG_BYTES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for cfg in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(cfg, dict):
            for key in CONTEXT_KEYS:
                value = cfg.get(key)
                if type(value) is int and value > 0:
                    return value
    return None


def check_context(source: str, where: str, prompts: list[str], generate: int = 0) -> None:
    """Refuse (one line) a prompt whose tokens plus ``generate`` exceed the context: before any model loads."""
    n_ctx = config_context(source, where)
    if n_ctx is None:
        return
    # No tokenizer is needed while every prompt has fewer UTF-8 bytes than the context has room for: byte-level
    # BPE and SentencePiece with byte fallback give at most one token per byte (+1 for a leading "▁").
    long = [(i, p) for i, p in enumerate(prompts) if len(p.encode("utf-8")) + 1 + generate > n_ctx]
    if not long:
        return
    path = _model_file(source, where, "tokenizer.json")
    if path is None or os.path.getsize(path) > MAX_TOKENIZER_BYTES:
        return
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(path)
    except Exception:  # not a tokenizer file this version reads: the model's loader decides
        return
    for i, prompt in long:
        n = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
        if n + generate > n_ctx:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            extra = f" + {generate} to generate" if generate else ""
            raise HexRayError(f"{which} is {n} tokens{extra}, over the model's context of {n_ctx} tokens "
                              "(from its config.json; nothing was loaded)")
